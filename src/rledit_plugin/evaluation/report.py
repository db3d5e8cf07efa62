"""Results JSON, a markdown table and a PNG plot of the curve, for one or several methods.

A "result" is what :func:`rledit_plugin.evaluation.stream.run_stream` returns.
Every function here accepts one result, a list of results (named by
``config["method"]`` when present) or a mapping ``{method: result}``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import COUNTERFACT_METRICS, FRACTION_METRICS

Result = Dict[str, Any]
Results = Union[Result, Sequence[Result], Mapping[str, Result]]

# (key, column / panel title)
METRIC_LABELS: Tuple[Tuple[str, str], ...] = (
    ("efficacy", "Efficacy"),
    ("generalization", "Generalization"),
    ("specificity", "Specificity"),
    ("specificity_vs_unedited", "Spec. vs unedited"),
    ("generation_em", "Generation EM"),
    ("cf_efficacy", "CF efficacy"),
    ("cf_generalization", "CF generalization"),
    ("cf_specificity", "CF specificity"),
    ("perplexity", "Perplexity"),
    ("weight_change_norm", "ΔW Frobenius norm"),
)


def _is_result(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "protocol" in obj and "post" in obj


def by_method(results: Results, default_name: str = "method") -> Dict[str, Result]:
    """``{method: result}`` from any accepted form (names made unique)."""
    if _is_result(results):
        items = [((results.get("config") or {}).get("method") or default_name, results)]
    elif isinstance(results, Mapping):
        items = list(results.items())
    else:
        items = [((r.get("config") or {}).get("method") or f"{default_name}{i}", r)
                 for i, r in enumerate(results)]
    named: Dict[str, Result] = {}
    for name, result in items:
        if not _is_result(result):
            raise ValueError(f"'{name}' is not a harness result (no 'protocol'/'post' keys)")
        unique, n = str(name), 2
        while unique in named:
            unique, n = f"{name}#{n}", n + 1
        named[unique] = result
    if not named:
        raise ValueError("no results to report")
    return named


def _present(named: Mapping[str, Result]) -> List[Tuple[str, str]]:
    """Metrics with a value somewhere (pre, post or curve) in any result."""
    def has(key: str) -> bool:
        for r in named.values():
            rows = [r.get("pre") or {}, r.get("post") or {}] + list(r.get("curve") or [])
            if any(row.get(key) is not None for row in rows):
                return True
        return False
    return [(k, label) for k, label in METRIC_LABELS if has(k)]


def _fmt(value: Optional[float], key: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key in ("perplexity", "weight_change_norm"):
        return f"{value:.3g}"
    return f"{value:.3f}"


def markdown_table(results: Results) -> str:
    """One row per method; each metric cell is ``pre -> post``; then seconds per edit."""
    named = by_method(results)
    metrics = _present(named)
    header = ["Method", "Edits"] + [label for _, label in metrics] + ["s/edit"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for name, r in named.items():
        pre, post = r.get("pre") or {}, r.get("post") or {}
        cells = [name, str(r.get("edits", "-"))]
        cells += [f"{_fmt(pre.get(k), k)} → {_fmt(post.get(k), k)}" for k, _ in metrics]
        per_edit = (r.get("timing") or {}).get("seconds_per_edit")
        cells.append("-" if per_edit is None else f"{per_edit:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells are unedited (pre) → after the whole stream (post), scored on all "
                 "edited records (end-of-stream protocol).")
    return "\n".join(lines) + "\n"


def _curve_points(result: Result, key: str) -> Tuple[List[int], List[float]]:
    """(edits, value) with the unedited model at 0 edits; the post point when no curve."""
    points = [(0, (result.get("pre") or {}).get(key))]
    curve = list(result.get("curve") or [])
    if curve:
        points += [(row["edits"], row.get(key)) for row in curve]
    else:
        points.append((result.get("edits", 0), (result.get("post") or {}).get(key)))
    kept = [(e, v) for e, v in points if v is not None]
    return [e for e, _ in kept], [v for _, v in kept]


def plot_curves(results: Results, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """PNG: one panel per metric, value vs number of edits, one line per method."""
    named = by_method(results)
    metrics = _present(named) or [("efficacy", "Efficacy")]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global backend, no GUI
    for i, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for name, result in named.items():
            xs, ys = _curve_points(result, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel("edits")
        if key in FRACTION_METRICS or key in COUNTERFACT_METRICS:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")
    fig.suptitle(title or "Lifelong editing (0 edits = unedited model)")
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def write_report(results: Results, out_dir: Union[str, Path], name: str = "results") -> Dict[str, Path]:
    """Write ``{name}.json``, ``{name}.md`` and ``{name}.png`` into ``out_dir``.

    The JSON is the result itself for one result, else ``{method: result}``.
    Returns ``{"json": path, "markdown": path, "plot": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    named = by_method(results, default_name=name)
    payload = next(iter(named.values())) if _is_result(results) else named
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(f"# {name}\n\n" + markdown_table(named))
    plot_curves(named, paths["plot"], title=name)
    return paths
