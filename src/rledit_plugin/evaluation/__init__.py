"""Lifelong evaluation harness: the same scoring code for every editor.

``run_stream(editor, model, tok, records, turns=T, batch_size=B)`` edits T x B
records in order and scores all of them on the final model; ``write_report``
turns one or several results into JSON, a markdown table and a PNG curve.
"""
from .metrics import (AnswerStats, answer_logprob, answer_stats, capture_reference,
                      generation_exact_match, greedy_generate, perplexity, predicted_tokens,
                      score_records, snapshot_params, token_accuracy, weight_change_norm)
from .report import markdown_table, plot_curves, write_report
from .stream import PROTOCOL, RESULT_KEYS, Editor, json_safe, run_stream

__all__ = [
    "AnswerStats", "answer_logprob", "answer_stats", "capture_reference",
    "generation_exact_match", "greedy_generate", "perplexity", "predicted_tokens",
    "score_records", "snapshot_params", "token_accuracy", "weight_change_norm",
    "markdown_table", "plot_curves", "write_report",
    "PROTOCOL", "RESULT_KEYS", "Editor", "json_safe", "run_stream",
]
