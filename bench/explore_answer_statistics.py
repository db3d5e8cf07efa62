"""Exploration: key statistics from the positions that predict a fact (docs/TUNING.md section 14).

Key whitening's moment ``M`` averages ``k k^T`` over every token of its texts (as MEMIT's does);
most of those tokens are names, function words and punctuation, while locality is scored on
the keys that *predict an answer*.  ``M_ans`` (``core.whitening.answer_second_moments``) is
measured only at the positions that predict an object: each corpus fact's sentence prefix
("Vardrous lives in" -> " Lima") and every train record's prompt/answer pair, teacher-forced.
The statistics become

    M + beta * (tr M / tr M_ans) * M_ans          (beta = -1: M_ans alone)

``beta >= 0`` is the ``whitening_answer_weight`` hyperparameter (adopted at 0.3); this script
also covers what the hyperparameter does not: ``M_ans`` alone and the corpus facts alone.
Trains with the default training YAML and scores 200 and 2,000 edits like
bench/sweep_rledit.py.

    [ANSWER_PAIRS=corpus] .venv/bin/python bench/explore_answer_statistics.py BETA ['key=value,...']
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_rledit as sw  # noqa: E402
from rledit_plugin.core import whitening as wh  # noqa: E402


def main():
    beta, extra, world = sw.exploration_args(sys.argv)
    facts_only = os.environ.get("ANSWER_PAIRS") == "corpus"     # the corpus facts alone
    pairs = world.fact_pairs if facts_only else wh.statistics_pairs(world.train_records, world.fact_pairs)

    def whitening_with_answer_positions(model, tok, modules, texts, damping, max_length=128,
                                        progress=False, **_yaml_answer_statistics):
        answers = wh.answer_second_moments(model, tok, modules, pairs, max_length=max_length)
        if beta < 0:
            return {n: wh.whitening_matrix(m, damping) for n, m in answers.items()}
        moments = wh.key_second_moments(model, tok, modules, texts, max_length=max_length)
        return {n: wh.whitening_matrix(wh.mix_answer_moment(m, answers[n], beta), damping)
                for n, m in moments.items()}

    sw.run_with_statistics(whitening_with_answer_positions, extra, world,
                           {"beta": beta, "answer_pairs": len(pairs),
                            "pairs": "corpus" if facts_only else "corpus+records"}, f"beta {beta}")


if __name__ == "__main__":
    main()
