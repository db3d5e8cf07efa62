"""Exploration (not a feature): key statistics from the positions that predict a fact.

Key whitening's moment ``M`` averages ``k k^T`` over every token of its texts (as MEMIT's does);
most of those tokens are names, function words and punctuation, while locality is scored on
the keys that *predict an answer*.  Here ``M_ans`` is measured only at the positions that
predict an object: each corpus fact's sentence prefix ("Vardrous lives in" -> " Lima") and
every train record's prompt/answer pair, teacher-forced.  The statistics become

    M + beta * (tr M / tr M_ans) * M_ans          (beta = -1: M_ans alone)

Trains with the default training YAML and scores 200 and 2,000 edits like
bench/sweep_rledit.py (docs/TUNING.md section 14).

    .venv/bin/python bench/explore_answer_statistics.py BETA ['key=value,...']
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_rledit as sw  # noqa: E402
from rledit_plugin.core import whitening as wh  # noqa: E402
from rledit_plugin.data.records import tokenize_teacher_forced  # noqa: E402
from rledit_plugin.world.facts import RELATION_BY_NAME  # noqa: E402


def answer_pairs(world):
    """(prefix, answer) for every corpus fact and every prompt of the train records."""
    pairs = []
    for f in world.all_facts():
        head = RELATION_BY_NAME[f.relation].sentence.split("{o}")[0].format(s=f.subject).rstrip()
        pairs.append((head, f.object))
    for r in world.train_records:
        pairs += [(r.prompt, a) for a in (r.target_true, r.target_new) if a]
        pairs += [(p, r.target_new) for p in r.paraphrases]
        pairs += list(zip(r.locality_prompts, r.locality_answers))
    return list(dict.fromkeys(pairs))


@torch.no_grad()
def answer_moments(model, tok, modules, pairs, max_length=48, batch=64):
    """``E[k k^T]`` over the positions that predict an answer token (float64)."""
    sums, count = {n: 0 for n in modules}, 0
    with sw.grabbed_inputs(modules) as grabbed:
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            enc = tokenize_teacher_forced(tok, [p for p, _ in chunk], [a for _, a in chunk], max_length)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            predicts = torch.zeros_like(enc["labels"], dtype=torch.bool)
            predicts[:, :-1] = enc["labels"][:, 1:] != -100
            for n in modules:
                keys = grabbed[n][predicts].double()
                sums[n] = sums[n] + keys.T @ keys
            count += int(predicts.sum())
    return {n: s / count for n, s in sums.items()}


def main():
    beta, extra, world = sw.exploration_args(sys.argv)
    pairs = answer_pairs(world)

    def whitening_with_answer_positions(model, tok, modules, texts, damping, max_length=128,
                                        progress=False):
        answers = answer_moments(model, tok, modules, pairs)
        if beta < 0:
            return {n: wh.whitening_matrix(m, damping) for n, m in answers.items()}
        moments = wh.key_second_moments(model, tok, modules, texts, max_length=max_length)
        return {n: wh.whitening_matrix(m + beta * answers[n] * (float(m.trace()) / float(answers[n].trace())),
                                       damping)
                for n, m in moments.items()}

    sw.run_with_statistics(whitening_with_answer_positions, extra, world,
                           {"beta": beta, "answer_pairs": len(pairs)}, f"beta {beta}")

if __name__ == "__main__":
    main()
