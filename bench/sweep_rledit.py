"""Choose RLEdit defaults by measurement on the embedded default.

Each configuration (YAML overrides) trains a hypernetwork (unless n_trajectories=0:
the untrained rule) on the world's train split, then runs a lifelong stream over held-out
records and scores it end of stream.  Writes a JSON list and prints a markdown table.

    python bench/sweep_rledit.py --turns 20 --batch 20 \
        --config 'init_lr=1e-3,n_trajectories=0' --config 'init_lr=1e-3,n_trajectories=4'
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import itertools
import json
import time

import torch

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.core.trainer import train_hypernetwork
from rledit_plugin.core.whitening import record_texts, statistics_pairs, statistics_texts
from rledit_plugin.evaluation import run_stream
from rledit_plugin.hparams import RLEditTrainingHyperParams
from rledit_plugin.models import load_model_and_tokenizer
from rledit_plugin.world import WorldConfig, build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

KEYS = ("efficacy", "generalization", "specificity_vs_unedited", "generation_em", "perplexity")


def parse_overrides(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
        if key == "inner_params" and isinstance(out[key], str):
            out[key] = out[key].split("+")
    return out


def memoise_key_moments() -> None:
    """Measure the key statistics once per process: every configuration loads the same
    pre-trained model afresh, so its moments over the same texts are the same (only the
    damping and the answer weight, applied afterwards, differ between configurations)."""
    from rledit_plugin.core import whitening
    for fn_name in ("key_second_moments", "answer_second_moments"):
        fn, memo = getattr(whitening, fn_name), {}

        def cached(model, tok, modules, data, *a, _fn=fn, _memo=memo, **kw):
            key = (tuple(modules), len(data), hash(tuple(map(str, data))), repr(a), repr(sorted(kw.items())))
            if key not in _memo:
                _memo[key] = _fn(model, tok, modules, data, *a, **kw)
            return _memo[key]
        setattr(whitening, fn_name, cached)


def run_one(base: str, overrides: dict, world, turns_list, batch: int, split: str, model_name=None,
            stats: str = "corpus+records", edit_configs=("",)):
    """Train once (unless n_trajectories=0), then one scored stream per entry of ``turns_list``
    and of ``edit_configs`` (editing-time overrides, e.g. ``edit_memory=3e-4``, applied to the
    same trained hypernetwork; "" scores it as trained)."""
    texts = (statistics_texts(world.train_records, world.corpus) if stats == "corpus+records"
             else record_texts(world.train_records))
    pairs = statistics_pairs(world.train_records, world.fact_pairs if stats == "corpus+records" else ())
    hp = RLEditTrainingHyperParams.from_hparams(base)
    if model_name:
        hp.model_name = model_name
    for key, value in overrides.items():
        setattr(hp, key, value)
    hp.validate(base)
    hp.results_dir = ""
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    start = time.perf_counter()
    net, history = None, []
    if hp.n_trajectories > 0:
        net, history = train_hypernetwork(model, tok, hp, world.train_records, world.val_records,
                                          progress=False, save=False, whitening_texts=texts,
                                          whitening_pairs=pairs)
    train_s = time.perf_counter() - start
    records = world.val_records if split == "val" else world.eval_records
    rows = []
    for edit_text, turns in itertools.product(edit_configs, turns_list):
        edit_hp = hp.editing()
        for key, value in parse_overrides(edit_text).items():
            setattr(edit_hp, key, value)
        edit_hp.validate(f"{base} + {edit_text}")
        editor = RLEditor(model, tok, edit_hp, hypernet=copy.deepcopy(net) if net else None,
                          keep_journal=False, whitening_texts=texts, whitening_pairs=pairs)
        result = run_stream(editor, model, tok, records, turns=turns, batch_size=batch,
                            heldout_texts=world.heldout_corpus[:200], progress=False)
        editor.restore()
        rows.append({"overrides": overrides, "edit_overrides": edit_text, "stats": stats,
                     "turns": turns, "batch": batch,
                     "train_seconds": round(train_s, 1),
                     "seconds_per_edit": result["timing"]["seconds_per_edit"],
                     **{k: result["post"].get(k) for k in KEYS},
                     "pre_perplexity": result["pre"].get("perplexity"),
                     "val_history": [h.get("val", {}).get("score") for h in history]})
    return rows


def exploration_args(argv):
    """``(beta, extra overrides, world)`` of the statistics explorations' ``BETA ['k=v,...']``
    command line, on one torch thread."""
    torch.set_num_threads(1)
    return float(argv[1]), (argv[2] if len(argv) > 2 else ""), build_world(WorldConfig())


@contextlib.contextmanager
def grabbed_inputs(modules):
    """``{name: the last input of modules[name]}``, filled by forward hooks while open."""
    grabbed = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: grabbed.__setitem__(n, inp[0]))
             for n, m in modules.items()]
    try:
        yield grabbed
    finally:
        for h in hooks:
            h.remove()


def run_with_statistics(whitening_fn, extra: str, world, tag: dict, label: str) -> list:
    """An exploration of key whitening's statistics: ``whitening_fn`` replaces
    ``compute_whitening`` (same signature), then train with the default YAML (+ ``extra``
    overrides) and score 200 and 2,000 edits; rows printed, tagged with ``tag``."""
    from rledit_plugin.core import editor as editor_mod
    editor_mod.compute_whitening = whitening_fn
    rows = run_one("hparams/TRAINING/RLEdit/tiny.yaml", parse_overrides(extra), world, [10, 100], 20, "eval")
    for r in rows:
        r.update(tag)
        print(json.dumps(r), flush=True)
        print(f"{label} {extra} edits {r['turns'] * 20}: {r['efficacy']:.3f} / "
              f"{r['generalization']:.3f} / {r['specificity_vs_unedited']:.3f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="hparams/TRAINING/RLEdit/tiny.yaml")
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--edit-config", action="append", default=None,
                    help="editing-time overrides scored on each trained hypernetwork (repeat; "
                         "'' = as trained, the default)")
    ap.add_argument("--turns", default="20", help="stream length(s), comma-separated: one trained "
                    "hypernetwork is scored on each")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--split", choices=("val", "eval"), default="eval")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", help="model name/path overriding the YAML's model_name")
    ap.add_argument("--world", default="", help="WorldConfig overrides, e.g. n_eval_subjects=40")
    ap.add_argument("--stats", choices=("corpus+records", "records"), default="corpus+records",
                    help="key statistics' text: the world's corpus then the train split's prompts "
                         "(what `rledit train` uses on the embedded model), or the prompts only "
                         "(the default before docs/TUNING.md section 10)")
    ap.add_argument("--out", default="bench/results/sweep_rledit.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = build_world(WorldConfig(**parse_overrides(args.world)))
    turns_list = [int(t) for t in str(args.turns).split(",")]
    memoise_key_moments()
    rows = []
    for text in args.config:
        for row in run_one(args.base, parse_overrides(text), world, turns_list, args.batch, args.split,
                           args.model, args.stats, args.edit_config or ("",)):
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"turns": turns_list, "batch": args.batch, "rows": rows}, f, indent=2)
    print("| config | editing | edits | train s | eff | gen | spec_vs_unedited | gen_em | ppl |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for r in rows:
        print(f"| `{r['overrides']}` | `{r['edit_overrides']}` | {r['turns'] * r['batch']} | {r['train_seconds']} | {fmt(r['efficacy'])} | {fmt(r['generalization'])} | "
              f"{fmt(r['specificity_vs_unedited'])} | {fmt(r['generation_em'])} | {fmt(r['perplexity'])} |")


if __name__ == "__main__":
    main()
