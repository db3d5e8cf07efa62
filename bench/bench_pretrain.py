"""Pre-training speed of the tiny LM: intra-op threads and fused kernels.

    .venv/bin/python bench/bench_pretrain.py --out bench/results/pretrain_threads.json

Runs the production pre-training (`train_tiny_lm`) for one epoch on the small world
(40 train subjects) with the default model size (d_ff 3072), once per variant and
repeat, variants interleaved so that machine noise hits them alike.  Reports the median
milliseconds per optimiser step and each variant's speed-up over the previous
pre-training (one thread, GPT-2's seven-op `gelu_new`, the for-loop AdamW).  Speed only: which
variant's tiny LM knows its facts best is measured by pre-training it (docs/TUNING.md section 12).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from rledit_plugin.world import WorldConfig, build_world
from rledit_plugin.world.tiny_lm import TinyLMConfig, build_tokenizer, train_tiny_lm
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

VARIANTS = {
    "previous (1 thread, gelu_new, AdamW loop)": dict(threads=1),
    "1 thread, fused GELU + AdamW": dict(threads=1, gpt2_activation="gelu_pytorch_tanh",
                                         fused_optimizer=True),
    "2 threads, gelu_new, AdamW loop (default)": dict(threads=2),
    "2 threads, fused GELU + AdamW": dict(threads=2, gpt2_activation="gelu_pytorch_tanh",
                                          fused_optimizer=True),
}


def machine() -> dict:
    """CPU model and family (rounding, hence the pre-trained model, differs between them)."""
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "cpu family") and key.strip() not in info:
                    info[key.strip()] = value.strip()
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/pretrain_threads.json")
    args = parser.parse_args()
    world = build_world(WorldConfig(n_train_subjects=40, n_val_subjects=8, n_eval_subjects=40))
    tok = build_tokenizer(world)
    ms = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, overrides in VARIANTS.items():
            cfg = replace(TinyLMConfig(), epochs=1, **overrides)
            _, stats = train_tiny_lm(world, tok, config=cfg, progress=False)
            ms[name].append(1e3 * stats["seconds"] / stats["steps"])
    base = statistics.median(ms[next(iter(VARIANTS))])
    rows = [{"variant": name, "ms_per_step": statistics.median(v), "runs": v,
             "speedup": base / statistics.median(v)} for name, v in ms.items()]
    result = {"command": "python bench/bench_pretrain.py --repeats %d" % args.repeats,
              "machine": machine(),
              "steps_per_run": stats["steps"], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = ["| variant | ms / step (median) | speed-up |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
