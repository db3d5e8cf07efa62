"""Exploration behind the edit memory (docs/TUNING.md section 8): a trained archive, its
editor's ridge given the memory from outside, one 100 x 20 stream scored end of stream.

This is how the idea was tried before ``edit_memory`` existed, on the archive of the
previous default (trained with ``edit_memory: 0``, ``init_lr`` 2.5e-3): each batch is solved
with ``P = (A_0 + c sum K^T K)^-1`` (``A_0`` rebuilt from the key statistics with
``--damping``), held in float64 or ``--fp32``, and its coefficients scaled by ``--scale``
(a stand-in for a smaller learned step).  One JSON row per run is appended to ``--rows``.

    python bench/explore_edit_memory.py --archive <dir> --c 1e-4 --scale 0.85
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rledit_plugin.core.capture import capture
from rledit_plugin.core.editor import RLEditor, Update
from rledit_plugin.core.whitening import key_second_moments, record_texts
from rledit_plugin.data.records import edit_batch
from rledit_plugin.evaluation import run_stream
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import load_model_and_tokenizer
from rledit_plugin.world import WorldConfig, build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archive", required=True)
    ap.add_argument("--c", type=float, default=0.0, help="weight of each earlier edit key (0 = off)")
    ap.add_argument("--scale", type=float, default=1.0, help="factor on every batch's update")
    ap.add_argument("--damping", type=float, default=None, help="default: the YAML's")
    ap.add_argument("--fp32", action="store_true", help="hold P in float32 (default float64)")
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--rows", default="bench/results/explore_edit_memory.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hp = RLEditHyperParams.from_hparams("hparams/RLEdit/tiny.yaml")
    hp.archive, hp.edit_memory = args.archive, 0.0
    world = build_world(WorldConfig())
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    texts = record_texts(world.train_records)
    editor = RLEditor(model, tok, hp, keep_journal=False, whitening_texts=texts)
    damping = hp.whitening_damping if args.damping is None else args.damping
    dtype = torch.float32 if args.fp32 else torch.float64
    inverse = {}
    for name, m in key_second_moments(model, tok, editor.modules, texts, max_length=hp.max_length).items():
        a = m + damping * float(m.trace()) / m.shape[0] * torch.eye(m.shape[0], dtype=m.dtype)
        inverse[name] = torch.linalg.inv(a).to(dtype)

    def compute_update(records, update_norm=None, batch=None, previous=None, prefix=None):
        if batch is None:
            batch = edit_batch(tok, records, hp.max_length)
        cap = capture(model, editor.modules, batch, minibatch=hp.edit_minibatch, prefix=prefix)
        keys, coeffs = {}, {}
        with torch.no_grad():
            for name in editor.modules:
                k, g = cap.keys[name], cap.grads[name]
                if hp.lifelong_norm if update_norm is None else update_norm:
                    editor.hypernet.update_norm(name, k, g)
                d = editor.hypernet.values(name, k, g).to(dtype)
                right = k.to(dtype) @ inverse[name]
                gram = right @ k.to(dtype).T
                gram.diagonal().add_(editor.hypernet.lam(name).to(dtype).exp())
                keys[name] = right.float()
                coeffs[name] = (torch.linalg.solve(gram, d) * args.scale).float()
        return Update(keys, coeffs, cap)

    def edit(records):
        out = RLEditor.edit(editor, records)
        if args.c > 0:       # Woodbury: P <- P - P K^T (I/c + K P K^T)^-1 K P
            cap = capture(model, editor.modules, edit_batch(tok, records, hp.max_length),
                          minibatch=hp.edit_minibatch)
            for name in editor.modules:
                k = cap.keys[name].to(dtype)
                pk = inverse[name] @ k.T
                x = torch.eye(k.shape[0], dtype=dtype) / args.c + k @ pk
                inverse[name] -= pk @ torch.linalg.solve(x, pk.T)
                inverse[name] = (inverse[name] + inverse[name].T) / 2
        return out

    editor.compute_update, editor.edit = compute_update, edit
    start = time.time()
    post = run_stream(editor, model, tok, world.eval_records, turns=args.turns, batch_size=20,
                      heldout_texts=world.heldout_corpus[:200], progress=False)["post"]
    row = {"fp32": args.fp32, "c": args.c, "scale": args.scale, "turns": args.turns, "damping": damping,
           "seconds": round(time.time() - start, 1),
           **{k: post.get(k) for k in ("efficacy", "generalization", "specificity_vs_unedited",
                                       "generation_em")}}
    print(json.dumps(row), flush=True)
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
