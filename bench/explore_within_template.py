"""Exploration (not a feature): penalise the directions in which a fact's keys differ between
its templates, to push updates into what the prompt and its paraphrases share.

The key statistics of key whitening become M + beta * (tr M / tr W) * W, W the within-record
covariance of the answer-position keys over each train record's prompt and paraphrases
(docs/TUNING.md section 9).  Trains with the default training YAML and scores 200 and 2,000
edits like bench/sweep_rledit.py.

    .venv/bin/python bench/explore_within_template.py BETA ['key=value,...']
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_rledit as sw  # noqa: E402
from rledit_plugin.core import whitening as wh
from rledit_plugin.data.records import batch_ids, pad_right


@torch.no_grad()
def within_record_covariance(model, tok, modules, records):
    """W: mean over keys of (k - mean of its record's keys)(...)^T, answer positions only."""
    sums, count = {n: 0 for n in modules}, 0
    model.eval()
    with sw.grabbed_inputs(modules) as grabbed:
        for i in range(0, len(records), 32):
            chunk = records[i:i + 32]
            texts = [t for r in chunk for t in [r.prompt] + list(r.paraphrases)]
            input_ids, mask = pad_right(batch_ids(tok, texts), 0)
            model(input_ids=input_ids, attention_mask=mask)
            last = mask.sum(1) - 1                      # the position that predicts the answer
            sizes = [1 + len(r.paraphrases) for r in chunk]
            for n in modules:
                keys = grabbed[n][torch.arange(len(texts)), last].double()
                for group in keys.split(sizes):
                    centred = group - group.mean(0, keepdim=True)
                    sums[n] = sums[n] + centred.T @ centred
            count += len(texts)
    return {n: s / count for n, s in sums.items()}


def main():
    beta, extra, world = sw.exploration_args(sys.argv)

    def whitening_with_template_penalty(model, tok, modules, texts, damping, max_length=128,
                                        progress=False):
        moments = wh.key_second_moments(model, tok, modules, texts, max_length=max_length)
        within = within_record_covariance(model, tok, modules, world.train_records)
        return {n: wh.whitening_matrix(m + beta * within[n] * (float(m.trace()) / float(within[n].trace())),
                                       damping)
                for n, m in moments.items()}

    sw.run_with_statistics(whitening_with_template_penalty, extra, world, {"beta": beta}, f"beta {beta}")


if __name__ == "__main__":
    main()
