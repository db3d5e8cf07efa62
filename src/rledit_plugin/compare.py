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
(:mod:`rledit_plugin.compare_cli`) writes ``compare.json``, ``compare.md`` and
``compare.png`` (:mod:`rledit_plugin.compare_report`).  EasyEdit is only
imported when a baseline is asked for.
"""
from __future__ import annotations

import hashlib
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
                 fact_pairs: Optional[Sequence[Tuple[str, str]]] = None,
                 rledit_archive: Optional[str] = None, mend_archive: Optional[str] = None,
                 mend_overrides: Optional[Dict[str, Any]] = None, stats_dir: Optional[str] = None,
                 reuse_stats: bool = False, stats_damping: float = 1e-4):
        self.work_dir = Path(work_dir).resolve()
        self.hparams = {hparams_key_name(k): str(v) for k, v in (hparams or {}).items()}
        self.hparams_key, self.model_dir = hparams_key, model_dir
        self.corpus, self.train_records, self.val_records = corpus, train_records, val_records
        # the corpus's statements split before their object, when known (the embedded world)
        self.fact_pairs = fact_pairs
        self.rledit_archive, self.mend_archive = rledit_archive, mend_archive
        self.mend_overrides = dict(mend_overrides or {})
        self.stats_dir = stats_dir or str(self.work_dir / "stats")
        # recomputed per method by default, so each method's set-up time is its own
        self.reuse_stats = reuse_stats
        self.stats_damping = stats_damping     # MEMIT/ROME: hosts/easyedit_memit_stats.py

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
        from .hosts.easyedit_memit_stats import LAST_DEAD_UNITS, write_stats
        hp = eb.load_hparams(alg, self.hparams_path(alg))
        info: Dict[str, Any] = {"hparams_file": self.hparams_path(alg)}
        if alg in ("MEMIT", "ROME"):
            hp.stats_dir = self.stats_dir
            if not self.corpus:
                raise ValueError(f"{alg} needs local text for its statistics (--corpus FILE)")
            t0 = time.perf_counter()
            files = write_stats(model, tok, hp, self.corpus, overwrite=not self.reuse_stats,
                                damping=self.stats_damping)
            info.update(stats_files=[str(f) for f in files], stats_texts=min(len(self.corpus),
                        hp.mom2_n_samples), stats_seconds=time.perf_counter() - t0,
                        stats_dead_units={str(f): LAST_DEAD_UNITS.get(str(f)) for f in files},
                        stats_damping=self.stats_damping)
        if alg == "MEND":
            info.update(self._setup_mend(hp, model, tok))
        editor = eb.EasyEditBaseline(alg, model, tok, hp, log=self.log(alg))
        info["hparams"] = {k: v for k, v in vars(hp).items() if not k.startswith("_")}
        return editor, info

    def _setup_rledit(self, model, tok):
        from .core.editor import RLEditor
        from .core.whitening import statistics_pairs, statistics_texts
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
        # an archive without key statistics measures them as `rledit train` does: on the
        # corpus MEMIT's statistics use (and its statements' answers), then the training prompts
        texts = statistics_texts(self.train_records or (), self.corpus or ())
        pairs = statistics_pairs(self.train_records or (), self.fact_pairs or ())
        return RLEditor(model, tok, hp, keep_journal=False, whitening_texts=texts,
                        whitening_pairs=pairs), info

    def _setup_mend(self, hp, model, tok) -> Dict[str, Any]:
        from .hosts.easyedit_mend import check_mend_architecture, train_mend
        info: Dict[str, Any] = {}
        archive = self.mend_archive
        if not archive:
            if self.train_records is None or self.val_records is None:
                raise ValueError("MEND needs training records (or --mend-archive)")
            check_mend_architecture(hp, self.hparams_path("MEND", training=True))
            model_dir = self.model_dir or self._save_model(model, tok)
            trained = train_mend(model_dir, self.hparams_path("MEND", training=True),
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


if __name__ == "__main__":          # python -m rledit_plugin.compare ... = rledit compare ...
    from .compare_cli import main as _main
    raise SystemExit(_main())
