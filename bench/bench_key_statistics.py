"""Key statistics of the embedded default on 1 and on N torch threads: seconds and bits.

Measures what `rledit train` / `rledit demo` measure before training (core/whitening.py:
the all-token moment over the pre-training sentences and training prompts, and the
answer-position moment over the statements and the training prompts), once per thread
count, alternating, and says whether the moments are bit-identical across thread counts.

    RLEDIT_CACHE=<cache> .venv/bin/python bench/bench_key_statistics.py --threads 1,2 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from rledit_plugin.cpu_kernels import cpu_kernels, fixed_threads, pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses

import torch  # noqa: E402

from rledit_plugin.cli import _key_statistics  # noqa: E402
from rledit_plugin.core import whitening  # noqa: E402
from rledit_plugin.hparams import RLEditTrainingHyperParams  # noqa: E402
from rledit_plugin.models import embedded_world, get_module, load_model_and_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hparams", default="hparams/TRAINING/RLEdit/tiny.yaml")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    hp = RLEditTrainingHyperParams.from_hparams(args.hparams)
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    world = embedded_world(hp.model_name)
    src = _key_statistics(hp.model_name, world.train_records, world)
    modules = {n: get_module(model, n) for n in hp.inner_params}
    counts = [int(t) for t in args.threads.split(",")]
    seconds = {n: {"all_tokens": [], "answers": []} for n in counts}
    moments = {}
    for _ in range(args.repeats):
        for n in counts:
            with fixed_threads(n):
                t0 = time.perf_counter()
                m = whitening.key_second_moments(model, tok, modules, src["whitening_texts"],
                                                 max_length=hp.max_length)
                t1 = time.perf_counter()
                a = whitening.answer_second_moments(model, tok, modules, src["whitening_pairs"],
                                                    max_length=hp.max_length)
                t2 = time.perf_counter()
            seconds[n]["all_tokens"].append(t1 - t0)
            seconds[n]["answers"].append(t2 - t1)
            moments[n] = (m, a)
    first = counts[0]
    identical = {n: all(torch.equal(x[k], y[k]) for x, y in zip(moments[n], moments[first]) for k in x)
                 for n in counts}
    result = {"machine": platform.processor() or platform.machine(), "cpu_kernels": cpu_kernels(),
              "texts": len(src["whitening_texts"]), "pairs": len(src["whitening_pairs"]),
              "median_seconds": {n: {k: statistics.median(v) for k, v in s.items()}
                                 for n, s in seconds.items()},
              "seconds": seconds, f"bit_identical_to_{first}_thread": identical}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
