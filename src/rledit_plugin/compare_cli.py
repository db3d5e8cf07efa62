"""``rledit compare``: the command line of :mod:`rledit_plugin.compare`.

``rledit compare --algs RLEdit,MEMIT,MEND,FT --turns T --batch B --out DIR``
(:func:`add_compare_parser`; also ``python -m rledit_plugin.compare``) loads the
model once, runs every algorithm on a fresh copy of it and writes the report
(:func:`rledit_plugin.compare_report.write_comparison`) after each method.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .compare import (ALGORITHMS, DEFAULT_ALGS, Comparison, hparams_key_name, is_failure,
                      parse_algs, run_comparison)
from .compare_report import write_comparison
from .cpu_kernels import cpu_kernels
from .data.formats import FORMAT_CHOICES


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
    from .data.formats import load_records
    from .models import EMBEDDED_PREFIX, embedded_world, load_model_and_tokenizer
    try:
        algs = parse_algs(args.algs)
    except ValueError as e:
        raise SystemExit(f"--algs: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    embedded = args.model.startswith(EMBEDDED_PREFIX)
    world = None
    if embedded or not (args.data and args.corpus and (args.mend_archive or args.mend_train)):
        world = embedded_world(args.model)     # the quick model's small world for its -quick name
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
        fact_pairs=world.fact_pairs if world and not args.corpus else None,
        rledit_archive=args.rledit_archive, mend_archive=args.mend_archive,
        mend_overrides={"max_iters": args.mend_iters} if args.mend_iters else None,
        stats_dir=args.stats_dir, reuse_stats=args.reuse_stats, stats_damping=args.stats_damping)
    heldout = _read_lines(args.heldout) if args.heldout else (world.heldout_corpus if world else None)
    rest = sys.argv[1:]
    rest = rest[1:] if rest[:1] == ["compare"] else rest      # `rledit compare` or `python -m`
    meta = {"argv": ["rledit", "compare"] + rest, "model": args.model, "turns": args.turns,
            "batch": args.batch, "algs": algs, "torch_threads": torch.get_num_threads(),
            "cpu_kernels": cpu_kernels(),
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
    c.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                   help="format of --data (default: auto, from the first record's keys)")
    c.add_argument("--turns", type=int, default=20, help="edit batches in the stream (default 20)")
    c.add_argument("--batch", type=int, default=20, help="records per edit batch (default 20)")
    c.add_argument("--curve-every", dest="curve_every", type=int, default=0,
                   help="score the records edited so far every N turns (0: end of stream only)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    c.add_argument("--name", default="compare", help="file stem of the report")
    c.add_argument("--model", default="embedded-tiny-gpt2",
                   help="local model directory, or embedded-tiny-gpt2 (default)")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
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
    c.add_argument("--stats-damping", dest="stats_damping", type=float, default=1e-4,
                   help="MEMIT/ROME: add this times the mean diagonal to the key second moment "
                        "(default 1e-4; 0: EasyEdit's statistics, with never-active units floored)")
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
    c.add_argument("--seed", type=int, default=0, help="seed of every method (default 0)")
    c.set_defaults(func=cmd_compare)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m rledit_plugin.compare ...`` = ``rledit compare ...`` (the same CPU-kernel pin
    and input-error handling: cli.main)."""
    from .cli import main as cli_main
    return cli_main(["compare"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
