"""How much can editing these weights hold at all?  A joint-fit ceiling for a lifelong stream.

Instead of editing batch after batch, fit the edited modules to ALL of the stream's edits at
once with Adam (cross-entropy on every edit prompt's new answer), while keeping held-apart
facts (train-split prompts with their true answers) fixed by the same loss.  No single-pass
editor can be expected to beat what this optimisation reaches on the same weights; if the
ceiling itself is far below a quality bar, the bar is a property of the model, not of the
editor.  Scored with the project's harness (end of stream).

    python bench/ceiling_joint_fit.py --modules transformer.h.0.mlp.c_proj --steps 1500
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm.auto import tqdm

from rledit_plugin.core.capture import answer_token_loss
from rledit_plugin.data.records import edit_batch, tokenize_teacher_forced
from rledit_plugin.evaluation.metrics import capture_reference, score_records
from rledit_plugin.models import get_module, load_model_and_tokenizer
from rledit_plugin.world import build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

KEYS = ("efficacy", "generalization", "specificity_vs_unedited", "generation_em")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="embedded-tiny-gpt2")
    ap.add_argument("--modules", default="transformer.h.0.mlp.c_proj", help="'+'-separated")
    ap.add_argument("--edits", type=int, default=2000)
    ap.add_argument("--keep", type=int, default=1000, help="held-apart facts kept by the loss")
    ap.add_argument("--keep-locality", action="store_true",
                    help="also keep the train split's locality prompts (other subjects, 'nq question:' "
                         "form) at their true answers, as a ridge penalty over such keys would")
    ap.add_argument("--oracle", action="store_true",
                    help="also keep the edited records' OWN locality prompts (the ones specificity is "
                         "scored on) at their true answers: no editor can know them; this bounds what "
                         "these weights can hold at all")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/ceiling_joint_fit.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = build_world()
    model, tok = load_model_and_tokenizer(args.model)
    records = world.eval_records[:args.edits]
    keep = world.train_records[:args.keep]
    reference = capture_reference(model, tok, records)
    edits = edit_batch(tok, records, 48)
    prompts, answers = [r.prompt for r in keep], [r.target_true for r in keep]
    if args.keep_locality:
        pairs = dict.fromkeys((p, a) for r in keep for p, a in zip(r.locality_prompts, r.locality_answers))
        prompts += [p for p, _ in pairs]
        answers += [a for _, a in pairs]
    if args.oracle:
        known = set(zip(prompts, answers))
        pairs = dict.fromkeys((p, a) for r in records for p, a in zip(r.locality_prompts, r.locality_answers)
                              if (p, a) not in known)
        prompts += [p for p, _ in pairs]
        answers += [a for _, a in pairs]
    kept = tokenize_teacher_forced(tok, prompts, answers, 48)
    model.requires_grad_(False)
    params = [get_module(model, m).weight for m in args.modules.split("+")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=args.lr)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="joint fit"):
        loss = 0.0
        for batch, n in ((edits, len(records)), (kept, len(prompts))):
            idx = torch.randperm(n)[:args.batch]
            logits = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx]).logits
            loss = loss + answer_token_loss(logits, batch["labels"][idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        scores = score_records(model, tok, records, reference=reference)
    row = {"modules": args.modules, "edits": len(records), "keep": len(prompts),
           "keep_locality": args.keep_locality, "oracle": args.oracle, "steps": args.steps,
           "lr": args.lr, "seconds": round(time.perf_counter() - start, 1),
           **{k: scores[k] for k in KEYS}}
    print(json.dumps(row))
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
