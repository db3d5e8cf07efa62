"""The report of a comparison: ``{method: harness result | failure record}`` as files.

``write_comparison`` writes ``{name}.json`` (every method, failures included),
``{name}.md`` (:func:`comparison_table`) and ``{name}.png`` (the curves of the
methods that ran).  The results come from :func:`rledit_plugin.compare.run_comparison`
(or several runs merged, ``bench/merge_compare.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .compare import is_failure

_COST_COLUMNS = ("s/edit", "set-up s", "peak RSS MB")


def _cell(value: Optional[float], key: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if key in ("perplexity", "weight_change_norm") else f"{value:.3f}"


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: an "unedited" row, then one row per method (its error when it failed)."""
    from .evaluation.report import METRIC_LABELS
    ok = {m: r for m, r in results.items() if not is_failure(r)}
    metrics = [(k, label) for k, label in METRIC_LABELS
               if any((r.get("post") or {}).get(k) is not None for r in ok.values())]
    header = ["Method", "Edits"] + [label for _, label in metrics] + list(_COST_COLUMNS) + ["Status"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---:"] + ["---:"] * (len(metrics) + len(_COST_COLUMNS)) + ["---"]) + "|"]
    if ok:
        pre = next(iter(ok.values())).get("pre") or {}
        lines.append("| " + " | ".join(["(unedited)", "0"] + [_cell(pre.get(k), k) for k, _ in metrics]
                                       + ["-"] * len(_COST_COLUMNS) + [""]) + " |")
    for method, r in results.items():
        timing = r.get("timing") or {}
        cost = [timing.get("seconds_per_edit"), timing.get("seconds_setup"),
                timing.get("peak_rss_mb_method", timing.get("peak_rss_mb"))]
        cost_cells = ["-" if v is None else f"{v:.3g}" for v in cost]
        if is_failure(r):
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:200]
            cells = [method, "-"] + ["-"] * len(metrics) + cost_cells + [f"failed ({r.get('stage')}): {error}"]
        else:
            post = r.get("post") or {}
            cells = [method, str(r.get("edits"))] + [_cell(post.get(k), k) for k, _ in metrics] \
                + cost_cells + [((r.get("config") or {}).get("setup") or {}).get("warning", "ok")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics are scored on every edited record after the whole stream "
              "(end-of-stream protocol); s/edit excludes the one-time set-up (MEMIT/ROME "
              "statistics, MEND training, archive loading), which is in set-up s."]
    return "\n".join(lines) + "\n"


def write_comparison(results: Mapping[str, Mapping[str, Any]], out_dir: str, name: str = "compare",
                     meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """``{name}.json`` (every method, failures included), ``{name}.md``, ``{name}.png``."""
    from .evaluation.report import plot_curves
    from .evaluation.stream import json_safe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    payload = {"meta": json_safe(dict(meta or {})), "results": json_safe(dict(results))}
    paths["json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    title = f"# {name}\n\n"
    if meta:
        title += "`" + " ".join(str(a) for a in meta.get("argv", [])) + "`\n\n" if meta.get("argv") else ""
        for run in meta.get("merged_runs", []):       # bench/merge_compare.py: one line per run
            title += (f"- {', '.join(run.get('methods', []))}: `"
                      + " ".join(str(a) for a in run.get("argv") or []) + "`\n")
        title += "\n" if meta.get("merged_runs") else ""
    paths["markdown"].write_text(title + comparison_table(results))
    ok = {m: r for m, r in results.items() if not is_failure(r)}
    if ok:
        paths["plot"] = plot_curves(ok, out / f"{name}.png", title=name)
    return paths
