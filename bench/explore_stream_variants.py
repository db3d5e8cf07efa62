"""Probes behind docs/TUNING.md section 5: where the 2,000-edit stream loses locality, and two
variants of the key statistics that did not help.  Untrained hypernetwork (the whitened
normalised-gradient rule), embedded default, eval split, 20 edits per turn.

    python bench/explore_stream_variants.py decay --init-lr 0.01
        efficacy / specificity vs unedited after 1, 5, 10, 25, 50, 100 turns
    python bench/explore_stream_variants.py edit-memory --mu 0.01
        past edits' keys join the ridge penalty: A <- A + mu K^T K after every turn
        (Woodbury update of A^-1; the update stays rank <= N)
    python bench/explore_stream_variants.py answer-stats
        whitening statistics from answer-position keys only (not every token)

Prints one JSON line per measurement.  Not part of the package: prototypes, kept so the
numbers in the docs can be reproduced.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rledit_plugin.core.capture import capture
from rledit_plugin.core.editor import RLEditor, Update
from rledit_plugin.core.whitening import record_texts, whitening_matrix
from rledit_plugin.data.records import answer_positions, edit_batch, tokenize_teacher_forced
from rledit_plugin.evaluation import run_stream
from rledit_plugin.evaluation.metrics import capture_reference, score_records
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import load_model_and_tokenizer, model_device
from rledit_plugin.world import build_world
from rledit_plugin.cpu_kernels import pin_cpu_kernels

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU


class EditMemoryEditor(RLEditor):
    """RLEditor whose ridge penalty also holds every past edit's keys: A_t = A + mu sum k k^T."""

    mu = 0.0

    def compute_update(self, records, update_norm=None, batch=None, previous=None):
        if not hasattr(self, "inverse"):
            self.inverse = {n: self.hypernet.whitening(n).double() @ self.hypernet.whitening(n).double()
                            for n in self.modules}                       # A^-1 = S^2
        if batch is None:
            batch = edit_batch(self.tok, records, self.hparams.max_length, device=model_device(self.model))
        cap = capture(self.model, self.modules, batch, minibatch=self.hparams.edit_minibatch)
        keys, coeffs = {}, {}
        with torch.no_grad():
            for name in self.modules:
                k, g = cap.keys[name], cap.grads[name]
                self.hypernet.update_norm(name, k, g)
                d = self.hypernet.values(name, k, g).double()
                right = k.double() @ self.inverse[name]                  # K A^-1
                gram = right @ k.double().T
                gram.diagonal().add_(float(self.hypernet.lam(name).exp()))
                keys[name], coeffs[name] = right.float(), torch.linalg.solve(gram, d).float()
                if self.mu > 0:                                          # Woodbury
                    inner = right @ k.double().T
                    inner.diagonal().add_(1.0 / self.mu)
                    self.inverse[name] = self.inverse[name] - right.T @ torch.linalg.solve(inner, right)
        return Update(keys, coeffs, cap)


def answer_position_whitening(editor, model, tok, records, damping):
    """Whitening matrices from the keys at answer positions of every prompt the records hold."""
    prompts, answers = [], []
    for r in records:
        for p in [r.prompt, *r.paraphrases]:
            prompts += [p, p]
            answers += [r.target_true, r.target_new]
        prompts += list(r.locality_prompts)
        answers += list(r.locality_answers)
    rows = {n: [] for n in editor.modules}
    where = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: rows[n].append(inp[0][where["mask"]].double()))
             for n, m in editor.modules.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                b = tokenize_teacher_forced(tok, prompts[i:i + 64], answers[i:i + 64], 48)
                where["mask"] = answer_positions(b["labels"])
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    keys = {n: torch.cat(r) for n, r in rows.items()}
    return {n: whitening_matrix(k.T @ k / len(k), damping) for n, k in keys.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=("decay", "edit-memory", "answer-stats"))
    ap.add_argument("--model", default="embedded-tiny-gpt2")
    ap.add_argument("--init-lr", type=float, default=1e-2)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--mu", type=float, default=0.01)
    ap.add_argument("--turns", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = build_world()
    hp = RLEditHyperParams.from_hparams("hparams/RLEdit/tiny.yaml")
    hp.archive, hp.init_lr, hp.whitening_damping = "", args.init_lr, args.damping
    model, tok = load_model_and_tokenizer(args.model)
    cls = EditMemoryEditor if args.probe == "edit-memory" else RLEditor
    cls.mu = args.mu
    editor = cls(model, tok, hp, keep_journal=False, whitening_texts=record_texts(world.train_records))
    if args.probe == "answer-stats":
        editor.hypernet.set_whitening(answer_position_whitening(editor, model, tok, world.train_records,
                                                                args.damping))
    head = {"probe": args.probe, "init_lr": args.init_lr, "damping": args.damping}
    if args.probe == "edit-memory":
        head["mu"] = args.mu
    records = world.eval_records[:20 * args.turns]
    if args.probe == "decay":
        reference = capture_reference(model, tok, records)
        done = 0
        for turns in (1, 5, 10, 25, 50, 100):
            if turns > args.turns:
                break
            for t in range(done, turns):
                editor.edit(records[20 * t:20 * (t + 1)])
            done = turns
            s = score_records(model, tok, records[:20 * turns], reference=reference, generation=False)
            print(json.dumps({**head, "turns": turns, "efficacy": s["efficacy"],
                              "specificity_vs_unedited": s["specificity_vs_unedited"]}), flush=True)
        return
    start = time.perf_counter()
    post = run_stream(editor, model, tok, records, turns=args.turns, batch_size=20,
                      heldout_texts=world.heldout_corpus[:200], progress=False)["post"]
    print(json.dumps({**head, "turns": args.turns, "efficacy": post["efficacy"],
                      "generalization": round(post["generalization"], 4),
                      "specificity_vs_unedited": post["specificity_vs_unedited"],
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
