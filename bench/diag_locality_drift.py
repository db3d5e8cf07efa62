"""How locality erodes along the embedded default's 2,000-edit stream (docs/TUNING.md section 9).

Edits the eval split in 100 batches of 20 with the demo's archive and reports, after 5, 10,
25, 50 and 100 batches, how many of the stream's unique locality prompts still get the
unedited model's answer token, then lists the prompts that changed at the end.

    .venv/bin/python bench/diag_locality_drift.py [--archive runs/demo/archive]
"""
import argparse
from collections import Counter

import torch

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.evaluation.metrics import predicted_tokens
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import load_model_and_tokenizer
from rledit_plugin.world import WorldConfig, build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hparams", default="hparams/RLEdit/tiny.yaml")
    ap.add_argument("--archive", default="runs/demo/archive")
    ap.add_argument("--show", type=int, default=25)
    ap.add_argument("--every-batch-from", dest="every_from", type=int, default=0,
                    help="also report after every batch from this one on (0: only the fixed points)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hp = RLEditHyperParams.from_hparams(args.hparams)
    hp.archive = args.archive
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    records = build_world(WorldConfig()).eval_records[:2000]
    loc = {p: a for r in records for p, a in zip(r.locality_prompts, r.locality_answers)}
    prompts, answers = list(loc), list(loc.values())
    before = predicted_tokens(model, tok, prompts, answers)
    editor = RLEditor(model, tok, hp, keep_journal=False)
    with torch.no_grad():
        for t in range(100):
            editor.edit(records[t * 20:(t + 1) * 20])
            if t + 1 in (5, 10, 25, 50, 100) or (args.every_from and t + 1 >= args.every_from):
                after = predicted_tokens(model, tok, prompts, answers)
                agree = sum(a == b for a, b in zip(before, after)) / len(prompts)
                print(f"{(t + 1) * 20} edits: {agree:.3f} of {len(prompts)} locality prompts unchanged",
                      flush=True)
    changed = [(p, tok.decode(b), tok.decode(a)) for p, b, a in zip(prompts, before, after) if a != b]
    as_target = Counter(r.target_new for r in records)
    print(f"{len(changed)} changed (prompt, before, after):")
    for row in changed[:args.show]:
        print(row)
    hits = [as_target.get(a.strip(), 0) for _, _, a in changed]
    print(f"times the new answer was an edit target: mean {sum(hits) / max(1, len(hits)):.1f} "
          f"(an average object: {sum(as_target.values()) / len(as_target):.1f})")


if __name__ == "__main__":
    main()
