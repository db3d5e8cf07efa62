"""``rledit`` command line: world | train | edit | demo | compare | export-lora."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO_HPARAMS = Path(__file__).resolve().parents[2] / "hparams"


def _default_hparams(rel: str) -> str:
    path = REPO_HPARAMS / rel
    if not path.exists():
        raise SystemExit(f"default hparams {path} not found: pass --hparams explicitly")
    return str(path)


def _set_threads(model_name: str) -> None:
    """Torch threads for editing and scoring: $RLEDIT_THREADS, else 1 for the embedded tiny
    model (its matrices are too small to split: scoring 500 records took 1.9 s on one thread
    and 4.0 s on two on the 2-core dev machine), else torch's default."""
    import torch
    if os.environ.get("RLEDIT_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["RLEDIT_THREADS"])))
    elif model_name.startswith("embedded"):
        torch.set_num_threads(1)


# -- world ------------------------------------------------------------------
def cmd_world(args) -> int:
    from .world import WorldConfig, build_world, write_world_files
    world = build_world(WorldConfig(seed=args.seed))
    paths = write_world_files(world, args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# -- train ------------------------------------------------------------------
def _train_records(hp, world_records, path_attr: str):
    from .data.formats import load_records
    path = getattr(hp, path_attr)
    return load_records(path) if path else world_records


def _key_statistics(model_name: str, records, world=None) -> dict:
    """The key statistics' sources (``whitening_texts``, ``whitening_pairs``) for an embedded
    tiny LM: its pre-training sentences, and the same statements split before their object,
    then the records' prompts (docs/TUNING.md sections 10, 14); both None (the trainer's
    default: the records alone) otherwise."""
    from .core.whitening import statistics_pairs, statistics_texts
    from .models import EMBEDDED_PREFIX, embedded_world
    if not model_name.startswith(EMBEDDED_PREFIX) or not records:
        return {"whitening_texts": None, "whitening_pairs": None}
    world = world or embedded_world(model_name)
    return {"whitening_texts": statistics_texts(records, world.corpus),
            "whitening_pairs": statistics_pairs(records, world.fact_pairs)}


def cmd_train(args) -> int:
    from .core.trainer import train_hypernetwork
    from .hparams import RLEditTrainingHyperParams
    from .models import embedded_world, load_model_and_tokenizer
    hp = RLEditTrainingHyperParams.from_hparams(args.hparams or _default_hparams("TRAINING/RLEdit/tiny.yaml"))
    for key in ("train_data", "val_data", "results_dir", "n_trajectories"):
        if getattr(args, key, None) is not None:
            setattr(hp, key, getattr(args, key))
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    world = embedded_world(hp.model_name) if not (hp.train_data and hp.val_data) else None
    train = _train_records(hp, world.train_records if world else None, "train_data")
    val = _train_records(hp, world.val_records if world else None, "val_data")
    start = time.perf_counter()
    _, history = train_hypernetwork(model, tok, hp, train, val,
                                    **_key_statistics(hp.model_name, train, world))
    print(json.dumps({"archive": hp.results_dir, "seconds": round(time.perf_counter() - start, 1),
                      "final": history[-1]}, indent=2))
    return 0


# -- edit -------------------------------------------------------------------
def run_edit_stream(hp, records, turns: int, batch: int, out: str, curve_every: Optional[int],
                    name: str = "RLEdit", model=None, tok=None, heldout=None, whitening_texts=None,
                    whitening_pairs=None):
    """Lifelong stream of RLEdit edits scored by the harness; writes JSON, table and plot."""
    from .core.editor import RLEditor
    from .evaluation import run_stream, write_report
    from .models import load_model_and_tokenizer
    if model is None:
        model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    editor = RLEditor(model, tok, hp, keep_journal=False, whitening_texts=whitening_texts,
                      whitening_pairs=whitening_pairs)
    result = run_stream(editor, model, tok, records, turns=turns, batch_size=batch,
                        curve_every=curve_every, heldout_texts=heldout,
                        config={"method": name, "hparams": hp.to_dict()})
    paths = write_report({name: result}, out, "edit")
    return result, paths


def cmd_edit(args) -> int:
    from .core.whitening import record_answer_pairs, record_texts
    from .data.formats import load_records
    from .hparams import RLEditHyperParams
    from .models import embedded_world
    hp = RLEditHyperParams.from_hparams(args.hparams or _default_hparams("RLEdit/tiny.yaml"))
    if args.archive:
        hp.archive = args.archive
    if not hp.archive:
        logging.warning("no archive given: editing with an UNTRAINED hypernetwork")
    world = None if args.data else embedded_world(hp.model_name)
    records = load_records(args.data, format=args.format) if args.data else world.eval_records
    heldout = world.heldout_corpus if world is not None else None
    # an untrained, whitened hypernetwork measures its key statistics on the world's train split
    # (and, for the embedded tiny LM, its pre-training sentences)
    stats = {"whitening_texts": None, "whitening_pairs": None}
    if world is not None:
        stats = _key_statistics(hp.model_name, world.train_records, world)
        stats["whitening_texts"] = stats["whitening_texts"] or record_texts(world.train_records)
        stats["whitening_pairs"] = stats["whitening_pairs"] or record_answer_pairs(world.train_records)
    used = min(len(records), args.turns * args.batch)
    if used < len(records):
        print(f"[edit] editing the first {used} of {len(records)} records ({args.turns} turns x "
              f"{args.batch}; --turns/--batch edit more)", file=sys.stderr)
    result, paths = run_edit_stream(hp, records, args.turns, args.batch, args.out, args.curve_every or None,
                                    heldout=heldout, **stats)
    print(json.dumps({"post": result["post"], "files": paths}, indent=2, default=str))
    return 0


# -- demo -------------------------------------------------------------------
def cmd_demo(args) -> int:
    """world -> tiny LM -> train the hypernetwork -> lifelong stream -> table + plot."""
    from .core.trainer import train_hypernetwork
    from .cpu_kernels import cpu_kernels
    from .evaluation import markdown_table
    from .hparams import RLEditTrainingHyperParams
    from .models import EMBEDDED_PREFIX, QUICK_SUFFIX, embedded_world, load_model_and_tokenizer
    from .world import write_world_files
    out = Path(args.out)
    start = time.perf_counter()
    # --quick: the small world, its narrower tiny LM (pre-trained in ~1 min) and one trajectory
    default = "TRAINING/RLEdit/tiny-quick.yaml" if args.quick else "TRAINING/RLEdit/tiny.yaml"
    hp = RLEditTrainingHyperParams.from_hparams(args.hparams or _default_hparams(default))
    if not hp.model_name.startswith(EMBEDDED_PREFIX):
        raise SystemExit(f"rledit demo runs on the embedded tiny LM; {hp.model_name!r} is not one "
                         "(use `rledit train` and `rledit edit` for other models)")
    hp.results_dir = str(out / "archive")
    turns, batch = args.turns or (20 if args.quick else 100), args.batch
    if args.quick and args.hparams and not hp.model_name.endswith(QUICK_SUFFIX):
        hp.n_trajectories = max(1, hp.n_trajectories // 4)    # the user's YAML, scaled down
        hp.model_name += QUICK_SUFFIX
    world = embedded_world(hp.model_name)
    write_world_files(world, out / "world")
    print(f"[demo] tiny LM ({hp.model_name}) ...", flush=True)
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    _set_threads(hp.model_name)     # after the tiny LM's pre-training, which picks its own
    print(f"[demo] training the hypernetwork: {hp.n_trajectories} trajectories x {hp.traj_len} "
          f"batches x {hp.n_edits} edits ...", flush=True)
    _, history = train_hypernetwork(model, tok, hp, world.train_records, world.val_records,
                                    **_key_statistics(hp.model_name, world.train_records, world))
    edit_hp = hp.editing()
    edit_hp.archive = hp.results_dir
    print(f"[demo] lifelong stream: {turns} turns x {batch} held-out edits ...", flush=True)
    # Perplexity drift on a fixed sample of the held-out text: at every curve point the whole
    # corpus (4,776 sentences) would cost more than the edits themselves.
    curve_every = max(1, turns // (4 if args.quick else 10))
    result, paths = run_edit_stream(edit_hp, world.eval_records, turns, batch, str(out), curve_every,
                                    model=model, tok=tok, heldout=world.heldout_corpus[:1000])
    print(markdown_table({"RLEdit": result}))
    summary = {"seconds_total": round(time.perf_counter() - start, 1), "edits": result["edits"],
               "cpu_kernels": cpu_kernels(),
               "post": result["post"], "files": paths, "training": history[-1]}
    with open(out / "demo_summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rledit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress details, and show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    from .data.formats import FORMAT_CHOICES

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text)

    w = command("world", "write the synthetic world's datasets and pre-training corpus")
    w.add_argument("--out", required=True, help="directory for the files")
    w.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    w.set_defaults(func=cmd_world)

    t = command("train", "train the hypernetwork along edit sequences; writes an archive")
    t.add_argument("--hparams", help="training YAML (default: the repository's hparams/TRAINING/RLEdit/tiny.yaml)")
    t.add_argument("--train-data", dest="train_data",
                   help="training records file (overrides the YAML's train_data; default: the "
                        "embedded world's train split)")
    t.add_argument("--val-data", dest="val_data", help="validation records file (overrides val_data)")
    t.add_argument("--results-dir", dest="results_dir", help="archive directory (overrides results_dir)")
    t.add_argument("--trajectories", dest="n_trajectories", type=int,
                   help="number of training trajectories (overrides n_trajectories; 0 = untrained)")
    t.set_defaults(func=cmd_train)

    e = command("edit", "a lifelong editing stream, scored; writes JSON, a table and a plot")
    e.add_argument("--hparams", help="editing YAML (default: the repository's hparams/RLEdit/tiny.yaml)")
    e.add_argument("--archive", help="trained hypernetwork directory (overrides the YAML's archive)")
    e.add_argument("--data", help="records file (default: the embedded world's eval split)")
    e.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="format of --data (default: auto, from the first record's keys)")
    e.add_argument("--turns", type=int, default=100, help="edit batches in the stream (default 100)")
    e.add_argument("--batch", type=int, default=20, help="records per edit batch (default 20)")
    e.add_argument("--curve-every", dest="curve_every", type=int, default=10,
                   help="also score the records edited so far every N turns (default 10; 0: end of "
                        "stream only)")
    e.add_argument("--out", default="runs/edit", help="output directory (default runs/edit)")
    e.set_defaults(func=cmd_edit)

    d = command("demo", "the embedded default end to end: world, tiny LM, training, stream")
    d.add_argument("--quick", action="store_true",
                   help="the small world's tiny LM, shorter training and a 20 x 20 stream")
    d.add_argument("--hparams", help="training YAML (default: hparams/TRAINING/RLEdit/tiny.yaml, "
                                     "tiny-quick.yaml with --quick)")
    d.add_argument("--turns", type=int, help="edit batches in the stream (default: 100, 20 with --quick)")
    d.add_argument("--batch", type=int, default=20, help="records per edit batch (default 20)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.set_defaults(func=cmd_demo)

    from .compare_cli import add_compare_parser
    from .export import add_export_parser
    add_compare_parser(sub)
    add_export_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. A mistake in the user's input (a data file, a YAML file, an archive)
    is one line on stderr and exit status 2, the traceback only with --verbose."""
    from .core.archive import ArchiveError
    from .cpu_kernels import pin_cpu_kernels
    from .data.records import RecordError
    from .hparams import HParamsError
    args = build_parser().parse_args(argv)
    try:
        pin_cpu_kernels()       # before torch's first operation: the same numbers on every CPU
    except ValueError as e:
        print(f"rledit: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (RecordError, HParamsError, ArchiveError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"rledit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
