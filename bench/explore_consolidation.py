"""Exploration: re-solve the whole stream's edit as one minimum-norm update (docs/TUNING.md section 14).

Every batch's update is the smallest (in the key-statistics metric ``A_0``) that writes that
batch, but their sum over 100 batches is not the smallest update that writes all 2,000 edits:
it grows like a random walk (||dW|| 671 at 2,000 edits against ||W|| 266).  Because no edit
precedes the edited module's input, every edit key is fixed, so the stream's edits can be
re-written at any point as

    dW* = argmin ||dW A_0^(1/2)||^2   s.t.   dW K^T = (W_now - W_0) K^T  (+ a small ridge)

over the keys K of every edit so far (the edit memory's rows): the same outputs at every edit
key, the least change elsewhere.  This runs the demo's stream with the demo's archive and, every
``--every`` batches, replaces the accumulated change by dW* (``--every 0``: once, at the end),
then scores the stream with the harness (end of stream).

    .venv/bin/python bench/explore_consolidation.py --every 0 --every 10

Result (bench/results/explore_consolidation.json): a no-op.  dW* has the same norm as the
accumulated change at every point (670.9 at 2,000 edits) and the scores are identical to the
digit.  With the edit memory every batch's update lies in span(A_0^-1 K) of all keys so far, so
their sum already IS the least change in the A_0 metric that gives its outputs at the edit keys:
what is left to choose is those outputs (the value changes D) and the metric A_0 itself.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.evaluation.metrics import capture_reference, score_records
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import load_model_and_tokenizer
from rledit_plugin.world import WorldConfig, build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

KEYS = ("efficacy", "generalization", "specificity_vs_unedited", "generation_em")


def consolidate(editor: RLEditor, keys: torch.Tensor, ridge: float) -> dict:
    """Replace the edited module's accumulated change by the minimum-A_0-norm one that gives the
    same outputs at ``keys`` (float64 solve)."""
    (name, module), = editor.modules.items()
    w = module.weight                                   # GPT-2 Conv1D: (d_in, d_out)
    w0 = editor._pristine[name].to(w.dtype)
    s = editor.hypernet.whitening(name).double()
    p = s @ s                                           # A_0^-1
    k = keys.double()
    delta = (w.detach() - w0).double()                  # (d_in, d_out)
    r = k @ delta                                       # (N, d_out): the change at each edit key
    right = k @ p                                       # K A_0^-1
    gram = right @ k.T
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
    coeff = torch.linalg.solve(gram, r)
    new = right.T @ coeff                               # A_0^-1 K^T (K A_0^-1 K^T)^-1 R
    before = float(delta.norm())
    with torch.no_grad():
        w.copy_((w0.double() + new).to(w.dtype))
    return {"rows": k.shape[0], "norm_before": round(before, 1), "norm_after": round(float(new.norm()), 1),
            "fit_error": float((k @ new - r).norm() / r.norm())}


def run(args, every: int) -> dict:
    hp = RLEditHyperParams.from_hparams(args.hparams)
    hp.archive = args.archive
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    records = build_world(WorldConfig()).eval_records[:args.turns * args.batch]
    reference = capture_reference(model, tok, records)
    editor = RLEditor(model, tok, hp, keep_journal=True)
    start, log = time.perf_counter(), []
    for t in tqdm(range(args.turns), desc=f"every {every}"):
        editor.edit(records[t * args.batch:(t + 1) * args.batch])
        last = t + 1 == args.turns
        if (every and (t + 1) % every == 0) or (every == 0 and last):
            keys = torch.cat([next(iter(u.memory_keys.values())) for u in editor.journal])
            log.append({"turn": t + 1, **consolidate(editor, keys, args.ridge)})
    seconds = time.perf_counter() - start
    with torch.no_grad():
        scores = score_records(model, tok, records, reference=reference)
    return {"every": every, "ridge": args.ridge, "edits": len(records), "seconds": round(seconds, 1),
            "consolidations": log, **{k: scores[k] for k in KEYS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hparams", default="hparams/RLEdit/tiny.yaml")
    ap.add_argument("--archive", default="runs/demo/archive")
    ap.add_argument("--every", type=int, action="append", default=None)
    ap.add_argument("--ridge", type=float, default=1e-6, help="relative to the Gram's mean diagonal")
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/explore_consolidation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for every in args.every or [0]:
        rows.append(run(args, every))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "consolidations"}), flush=True)
        print("  last consolidation:", rows[-1]["consolidations"][-1], flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
