"""Same-stream comparison of RLEdit and EasyEdit baselines (MEMIT, MEND, FT, ROME, LoRA).

Every method gets the identical lifelong stream: the same records in the same
order, starting from the same weights (a fresh copy of the pristine model per
method; the copy's weights are fingerprinted into the result), edits
accumulating turn after turn, all scored by the one harness
(:func:`rledit_plugin.evaluation.run_stream`).  One-time set-up (MEMIT/ROME
statistics, MEND training, loading RLEdit's archive) is timed apart from the
per-edit time; peak memory is measured per method (Linux: the process's RSS
high-water mark is reset before each method).  A method that fails is
recorded with its error and the others go on.

``rledit compare --algs RLEdit,MEMIT,MEND,FT --turns T --batch B --out DIR``
(:func:`add_compare_parser`) writes ``compare.json``, ``compare.md`` and
``compare.png``.  EasyEdit is only imported when a baseline is asked for.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

REPO_HPARAMS = Path(__file__).resolve().parents[2] / "hparams"
RLEDIT = "RLEdit"
ALGORITHMS = (RLEDIT, "MEMIT", "MEND", "FT", "ROME", "LoRA")
DEFAULT_ALGS = "RLEdit,MEMIT,MEND,FT"


def canonical_alg(name: str) -> str:
    for alg in ALGORITHMS:
        if alg.lower() == name.strip().lower():
            return alg
    raise ValueError(f"unknown algorithm {name!r}; expected some of {', '.join(ALGORITHMS)}")


def parse_algs(text: str) -> List[str]:
    algs = [canonical_alg(a) for a in text.split(",") if a.strip()]
    if not algs:
        raise ValueError("no algorithm given")
    if len(set(algs)) != len(algs):
        raise ValueError(f"an algorithm is listed twice: {text}")
    return algs


def hparams_key_name(key: str) -> str:
    """``memit`` -> ``MEMIT``; ``training/mend`` -> ``TRAINING/MEND`` (keys of hparams overrides)."""
    if key.strip().upper().startswith("TRAINING/"):
        return "TRAINING/" + canonical_alg(key.strip()[len("TRAINING/"):])
    return canonical_alg(key)


def default_hparams_path(alg: str, key: str = "tiny", training: bool = False) -> Path:
    """``hparams/<ALG>/<key>.yaml`` (``hparams/TRAINING/<ALG>/...`` for training)."""
    return REPO_HPARAMS / ("TRAINING" if training else "") / alg / f"{key}.yaml"


def weights_fingerprint(model) -> str:
    """A hash of every parameter's bytes: the same value means the same starting weights."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ memory

def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ set-up per method

class Comparison:
    """Settings shared by every method of one comparison (see :func:`run_comparison`)."""

    def __init__(self, *, work_dir: str, hparams: Optional[Mapping[str, str]] = None,
                 hparams_key: str = "tiny", model_dir: Optional[str] = None,
                 corpus: Optional[Sequence[str]] = None, train_records=None, val_records=None,
                 rledit_archive: Optional[str] = None, mend_archive: Optional[str] = None,
                 mend_overrides: Optional[Dict[str, Any]] = None, stats_dir: Optional[str] = None,
                 reuse_stats: bool = False):
        self.work_dir = Path(work_dir).resolve()
        self.hparams = {hparams_key_name(k): str(v) for k, v in (hparams or {}).items()}
        self.hparams_key, self.model_dir = hparams_key, model_dir
        self.corpus, self.train_records, self.val_records = corpus, train_records, val_records
        self.rledit_archive, self.mend_archive = rledit_archive, mend_archive
        self.mend_overrides = dict(mend_overrides or {})
        self.stats_dir = stats_dir or str(self.work_dir / "stats")
        # recomputed per method by default, so each method's set-up time is its own
        self.reuse_stats = reuse_stats

    def hparams_path(self, alg: str, training: bool = False) -> str:
        key = f"TRAINING/{alg}" if training else alg
        if key in self.hparams:
            return self.hparams[key]
        return str(default_hparams_path(alg, self.hparams_key, training))

    def log(self, alg: str) -> str:
        return str(self.work_dir / "logs" / f"{alg}.log")

    # each returns (editor, set-up info); the caller times it
    def setup(self, alg: str, model, tok) -> Tuple[Any, Dict[str, Any]]:
        if alg == RLEDIT:
            return self._setup_rledit(model, tok)
        from .hosts import easyedit_baselines as eb
        hp = eb.load_hparams(alg, self.hparams_path(alg))
        info: Dict[str, Any] = {"hparams_file": self.hparams_path(alg)}
        if alg in ("MEMIT", "ROME"):
            hp.stats_dir = self.stats_dir
            if not self.corpus:
                raise ValueError(f"{alg} needs local text for its statistics (--corpus FILE)")
            t0 = time.perf_counter()
            files = eb.write_stats(model, tok, hp, self.corpus, overwrite=not self.reuse_stats)
            info.update(stats_files=[str(f) for f in files], stats_texts=min(len(self.corpus),
                        hp.mom2_n_samples), stats_seconds=time.perf_counter() - t0)
        if alg == "MEND":
            info.update(self._setup_mend(hp, model, tok))
        editor = eb.EasyEditBaseline(alg, model, tok, hp, log=self.log(alg))
        info["hparams"] = {k: v for k, v in vars(hp).items() if not k.startswith("_")}
        return editor, info

    def _setup_rledit(self, model, tok):
        from .core.editor import RLEditor
        from .hparams import RLEditHyperParams
        path = self.hparams_path(RLEDIT)
        hp = RLEditHyperParams.from_hparams(path)
        if self.rledit_archive:
            hp.archive = self.rledit_archive
        hp.device = str(next(model.parameters()).device)
        info = {"hparams_file": path, "archive": hp.archive, "hparams": hp.to_dict()}
        if not hp.archive:
            info["warning"] = "no archive: RLEdit edits with an UNTRAINED hypernetwork"
        else:     # its training ran before (rledit train / demo): show its record, not timed here
            from .core.archive import read_meta
            history = read_meta(hp.archive).get("history") or []
            info["archive_training_last"] = history[-1] if history else None
        # untrained with key whitening: its statistics come from the same text as MEMIT's
        return RLEditor(model, tok, hp, keep_journal=False, whitening_texts=self.corpus), info

    def _setup_mend(self, hp, model, tok) -> Dict[str, Any]:
        from .hosts import easyedit_baselines as eb
        info: Dict[str, Any] = {}
        archive = self.mend_archive
        if not archive:
            if self.train_records is None or self.val_records is None:
                raise ValueError("MEND needs training records (or --mend-archive)")
            eb.check_mend_architecture(hp, self.hparams_path("MEND", training=True))
            model_dir = self.model_dir or self._save_model(model, tok)
            trained = eb.train_mend(model_dir, self.hparams_path("MEND", training=True),
                                    self.train_records, self.val_records,
                                    str(self.work_dir / "mend"), overrides=self.mend_overrides,
                                    log=self.log("MEND-training"))
            archive = trained["archive"]
            info["training"] = trained
        hp.archive = archive
        info["archive"] = archive
        return info

    def _save_model(self, model, tok) -> str:
        """The pristine model as a directory (EasyEdit's trainer loads from a path); called
        before any edit, so the copy still holds the starting weights."""
        path = self.work_dir / f"model-{getattr(model.config, 'model_type', 'model')}"
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        return str(path)


# ------------------------------------------------------------------ the comparison

def failure(alg: str, stage: str, error: BaseException, setup_seconds: Optional[float]) -> Dict[str, Any]:
    return {"method": alg, "status": "failed", "stage": stage,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=-6),
            "timing": {"seconds_setup": setup_seconds}}


def is_failure(entry: Mapping[str, Any]) -> bool:
    return entry.get("status") == "failed"


def run_comparison(algs: Sequence[str], model_factory: Callable[[], Tuple[Any, Any]], records,
                   *, turns: int, batch_size: int, comparison: Comparison,
                   heldout_texts: Optional[Sequence[str]] = None, curve_every: Optional[int] = None,
                   seed: int = 0, progress: bool = True, generation: bool = True,
                   eval_batch_size: int = 32, max_length: int = 128,
                   on_result: Optional[Callable[[str, Dict[str, Any]], None]] = None
                   ) -> Dict[str, Dict[str, Any]]:
    """Run every algorithm on the same stream; ``{alg: harness result | failure record}``.

    ``model_factory()`` must return a fresh ``(model, tok)`` with the pristine
    weights on every call.  A harness result gains ``timing.seconds_setup``,
    ``timing.peak_rss_mb_method`` and ``config.{method, setup, start_weights}``;
    a failure is ``{"method", "status": "failed", "stage", "error", "traceback",
    "timing"}``.
    """
    from .evaluation import run_stream

    records = list(records)
    algs = [canonical_alg(a) for a in algs]
    if len(set(algs)) != len(algs):
        raise ValueError(f"an algorithm is listed twice: {algs}")
    results: Dict[str, Dict[str, Any]] = {}
    for alg in algs:
        if progress:
            print(f"[compare] {alg}: set-up ...", flush=True)
        setup_seconds = t0 = None
        stage = "load"
        try:
            model, tok = model_factory()
            start_weights = weights_fingerprint(model)
            torch.manual_seed(seed)            # MEMIT/ROME sample context templates
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rss_reset = _reset_peak_rss()
            stage = "setup"
            t0 = time.perf_counter()
            editor, info = comparison.setup(alg, model, tok)
            setup_seconds = time.perf_counter() - t0
            stage = "edit"
            if progress:
                print(f"[compare] {alg}: {turns} turns x {batch_size} edits ...", flush=True)
            result = run_stream(editor, model, tok, records, turns=turns, batch_size=batch_size,
                                curve_every=curve_every, heldout_texts=heldout_texts,
                                progress=progress, generation=generation,
                                eval_batch_size=eval_batch_size, max_length=max_length,
                                config={"method": alg, "setup": info, "start_weights": start_weights,
                                        "seed": seed})
            result["timing"]["seconds_setup"] = setup_seconds
            result["timing"]["peak_rss_mb_method"] = _peak_rss_mb() if rss_reset else None
            result["status"] = "ok"
        except Exception as e:                # one baseline failing must not stop the others
            if stage == "setup":              # time spent until it failed
                setup_seconds = time.perf_counter() - t0
            result = failure(alg, stage, e, setup_seconds)
            if progress:
                print(f"[compare] {alg} FAILED ({stage}): {result['error']}", flush=True)
        finally:
            model = tok = editor = None        # noqa: F841  (free the copy before the next method)
        results[alg] = result
        if on_result is not None:
            on_result(alg, result)
    return results


# ------------------------------------------------------------------ report

_COST_COLUMNS = ("s/edit", "set-up s", "peak RSS MB")


def _cell(value: Optional[float], key: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if key in ("perplexity", "weight_change_norm") else f"{value:.3f}"


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: an "unedited" row, then one row per method (its error when it failed)."""
    from .evaluation.report import METRIC_LABELS
    ok = {m: r for m, r in results.items() if not is_failure(r)}
    metrics = [(k, label) for k, label in METRIC_LABELS
               if any((r.get("post") or {}).get(k) is not None for r in ok.values())]
    header = ["Method", "Edits"] + [label for _, label in metrics] + list(_COST_COLUMNS) + ["Status"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---:"] + ["---:"] * (len(metrics) + len(_COST_COLUMNS)) + ["---"]) + "|"]
    if ok:
        pre = next(iter(ok.values())).get("pre") or {}
        lines.append("| " + " | ".join(["(unedited)", "0"] + [_cell(pre.get(k), k) for k, _ in metrics]
                                       + ["-"] * len(_COST_COLUMNS) + [""]) + " |")
    for method, r in results.items():
        timing = r.get("timing") or {}
        cost = [timing.get("seconds_per_edit"), timing.get("seconds_setup"),
                timing.get("peak_rss_mb_method", timing.get("peak_rss_mb"))]
        cost_cells = ["-" if v is None else f"{v:.3g}" for v in cost]
        if is_failure(r):
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:200]
            cells = [method, "-"] + ["-"] * len(metrics) + cost_cells + [f"failed ({r.get('stage')}): {error}"]
        else:
            post = r.get("post") or {}
            cells = [method, str(r.get("edits"))] + [_cell(post.get(k), k) for k, _ in metrics] \
                + cost_cells + [((r.get("config") or {}).get("setup") or {}).get("warning", "ok")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics are scored on every edited record after the whole stream "
              "(end-of-stream protocol); s/edit excludes the one-time set-up (MEMIT/ROME "
              "statistics, MEND training, archive loading), which is in set-up s."]
    return "\n".join(lines) + "\n"


def write_comparison(results: Mapping[str, Mapping[str, Any]], out_dir: str, name: str = "compare",
                     meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """``{name}.json`` (every method, failures included), ``{name}.md``, ``{name}.png``."""
    from .evaluation.report import plot_curves
    from .evaluation.stream import json_safe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    payload = {"meta": json_safe(dict(meta or {})), "results": json_safe(dict(results))}
    paths["json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    title = f"# {name}\n\n"
    if meta:
        title += "`" + " ".join(str(a) for a in meta.get("argv", [])) + "`\n\n" if meta.get("argv") else ""
    paths["markdown"].write_text(title + comparison_table(results))
    ok = {m: r for m, r in results.items() if not is_failure(r)}
    if ok:
        paths["plot"] = plot_curves(ok, out / f"{name}.png", title=name)
    return paths


# ------------------------------------------------------------------ command line

def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh]
    texts = [line for line in lines if line]
    if not texts:
        raise SystemExit(f"{path}: no text lines")
    return texts


def _hparams_overrides(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items or []:
        alg, sep, path = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"--hparams expects ALG=PATH (e.g. MEMIT=my.yaml), got {item!r}")
        try:
            out[hparams_key_name(alg)] = path
        except ValueError as e:
            raise SystemExit(f"--hparams: {e}")
    return out


def cmd_compare(args) -> int:
    """``rledit compare``: load the model once, run every algorithm on a fresh copy, report."""
    import sys
    from .data.formats import load_records
    from .models import EMBEDDED_PREFIX, load_model_and_tokenizer
    try:
        algs = parse_algs(args.algs)
    except ValueError as e:
        raise SystemExit(f"--algs: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    embedded = args.model.startswith(EMBEDDED_PREFIX)
    world = None
    if embedded or not (args.data and args.corpus and (args.mend_archive or args.mend_train)):
        from .world import build_world
        world = build_world()
    records = load_records(args.data, format=args.format) if args.data else world.eval_records
    pristine, pristine_tok = load_model_and_tokenizer(args.model, args.device)
    model_dir = getattr(pristine.config, "_name_or_path", "")
    model_dir = model_dir if model_dir and os.path.isdir(model_dir) else None

    def fresh():
        return copy.deepcopy(pristine), copy.deepcopy(pristine_tok)

    key = args.hparams_key or ("tiny" if embedded else os.path.basename(args.model.rstrip("/")))
    overrides = _hparams_overrides(args.hparams)
    comparison = Comparison(
        work_dir=args.out, hparams=overrides, hparams_key=key, model_dir=model_dir,
        corpus=_read_lines(args.corpus) if args.corpus else (world.corpus if world else None),
        train_records=load_records(args.mend_train) if args.mend_train else
        (world.train_records if world else None),
        val_records=load_records(args.mend_val) if args.mend_val else
        (world.val_records if world else None),
        rledit_archive=args.rledit_archive, mend_archive=args.mend_archive,
        mend_overrides={"max_iters": args.mend_iters} if args.mend_iters else None,
        stats_dir=args.stats_dir, reuse_stats=args.reuse_stats)
    heldout = _read_lines(args.heldout) if args.heldout else (world.heldout_corpus if world else None)
    rest = sys.argv[1:]
    rest = rest[1:] if rest[:1] == ["compare"] else rest      # `rledit compare` or `python -m`
    meta = {"argv": ["rledit", "compare"] + rest, "model": args.model, "turns": args.turns,
            "batch": args.batch, "algs": algs, "torch_threads": torch.get_num_threads(),
            "data": args.data or "embedded eval split"}

    done: Dict[str, Dict[str, Any]] = {}

    def save(alg, result):          # a partial report after each method
        done[alg] = result
        write_comparison(done, args.out, args.name, meta)

    results = run_comparison(algs, fresh, records, turns=args.turns, batch_size=args.batch,
                             comparison=comparison, heldout_texts=heldout,
                             curve_every=args.curve_every or None, seed=args.seed,
                             generation=not args.no_generation, on_result=save)
    paths = write_comparison(results, args.out, args.name, meta)
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0 if all(not is_failure(r) for r in results.values()) else 1


def add_compare_parser(subparsers) -> None:
    """Register ``rledit compare`` on the CLI's subparsers."""
    c = subparsers.add_parser("compare", help="RLEdit vs EasyEdit baselines on the same lifelong stream")
    c.add_argument("--algs", default=DEFAULT_ALGS,
                   help=f"comma-separated, from {','.join(ALGORITHMS)} (default {DEFAULT_ALGS})")
    c.add_argument("--data", help="records file (default: the embedded world's eval split)")
    c.add_argument("--format", default="auto")
    c.add_argument("--turns", type=int, default=20)
    c.add_argument("--batch", type=int, default=20)
    c.add_argument("--curve-every", dest="curve_every", type=int, default=0,
                   help="score the records edited so far every N turns (0: end of stream only)")
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--name", default="compare", help="file stem of the report")
    c.add_argument("--model", default="embedded-tiny-gpt2",
                   help="local model directory, or embedded-tiny-gpt2 (default)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--hparams-key", dest="hparams_key",
                   help="hparams/<ALG>/<KEY>.yaml (default: tiny for the embedded model, else "
                        "the model directory's name)")
    c.add_argument("--hparams", action="append", metavar="ALG=PATH",
                   help="hparams file of one algorithm (repeatable; TRAINING/MEND=PATH too)")
    c.add_argument("--rledit-archive", dest="rledit_archive",
                   help="trained RLEdit hypernetwork (default: the RLEdit YAML's archive)")
    c.add_argument("--corpus", help="text file, one text per line, for MEMIT/ROME statistics "
                                    "(default: the embedded world's corpus)")
    c.add_argument("--stats-dir", dest="stats_dir", help="statistics directory (default OUT/stats)")
    c.add_argument("--reuse-stats", dest="reuse_stats", action="store_true",
                   help="reuse MEMIT/ROME statistics files already there (set-up time then "
                        "excludes computing them)")
    c.add_argument("--mend-train", dest="mend_train", help="MEND training records "
                   "(default: the embedded world's train split)")
    c.add_argument("--mend-val", dest="mend_val", help="MEND validation records")
    c.add_argument("--mend-archive", dest="mend_archive", help="use this MEND archive, no training")
    c.add_argument("--mend-iters", dest="mend_iters", type=int, help="MEND training iterations")
    c.add_argument("--heldout", help="text file for perplexity (default: the world's held-out text)")
    c.add_argument("--no-generation", dest="no_generation", action="store_true",
                   help="skip greedy-decoding exact match")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compare)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m rledit_plugin.compare ...`` = ``rledit compare ...``."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="rledit")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare"] + list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
