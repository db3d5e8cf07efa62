"""The lifelong harness: T turns x B records in order, scored by the same code for any editor.

Protocol (the published end-of-stream one): the first ``turns * batch_size``
records are edited turn by turn, never reverted, and every edited record is
scored on the final model.  Optionally a curve: every ``curve_every`` turns the
records edited so far are scored, with perplexity and the weight-change norm.

Result schema (fixed; other tools read it)::

    {"protocol": "end_of_stream", "edits": int,
     "pre":  {metrics of the unedited model on the same records},
     "post": {metrics of the final model},
     "curve": [{"edits": int, **metrics}, ...],
     "timing": {"seconds_total", "seconds_per_edit", "seconds_editing",
                "seconds_scoring", "peak_rss_mb", ["peak_gpu_mb"]},
     "config": {...}}

metrics = efficacy, generalization, specificity, specificity_vs_unedited,
generation_em (fractions 0-1 or None when not measurable), perplexity (None
without held-out text), weight_change_norm (None when the editor does not name
its parameters), plus cf_efficacy, cf_generalization, cf_specificity when the
records carry ``target_true``.
"""
from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.records import EditRecord
from .metrics import (capture_reference, model_device, perplexity, score_records,
                      snapshot_params, weight_change_norm)

PROTOCOL = "end_of_stream"
RESULT_KEYS = ("protocol", "edits", "pre", "post", "curve", "timing", "config")


@runtime_checkable
class Editor(Protocol):
    """What the harness needs from an editor (RLEdit, or an EasyEdit baseline wrapper).

    - ``edit(records)``: write these records into the model the editor holds,
      in place (the harness scores that same ``model`` object).  Return value ignored.
    - optional ``rollback()``: undo edits; the harness never calls it (lifelong
      editing never reverts) but other tools may.
    - optional attribute ``edited_param_names: list[str]``: names of the model
      parameters the editor changes (a module name means its ``.weight``); the
      harness snapshots them before the stream to report the Frobenius norm of
      the change.  Without it ``weight_change_norm`` is ``None``.
    """

    def edit(self, records: List[EditRecord]) -> Any: ...


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy: dataclasses and mappings become dicts, paths and
    dtypes/devices strings, NaN/inf None, anything else unknown its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json_safe(value.item())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            pass
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stream(editor: Editor, model: nn.Module, tok, records: Sequence[EditRecord], *,
               turns: int, batch_size: int, curve_every: Optional[int] = None,
               heldout_texts: Optional[Sequence[str]] = None, config: Optional[Dict] = None,
               progress: bool = True, eval_batch_size: int = 32, max_length: int = 128,
               generation: bool = True) -> Dict[str, Any]:
    """Edit ``turns`` x ``batch_size`` records in order, then score them all on the final model.

    ``config`` is copied (JSON-safe) into the result, with ``turns``, ``batch_size``
    and ``curve_every`` added when absent.  ``eval_batch_size`` / ``max_length``
    control scoring only; ``generation=False`` skips greedy decoding
    (``generation_em`` is then ``None``).
    """
    if not hasattr(editor, "edit") or not callable(editor.edit):
        raise TypeError(f"{type(editor).__name__} has no edit(records) method")
    if turns < 1 or batch_size < 1:
        raise ValueError(f"turns and batch_size must be >= 1, got turns={turns}, "
                         f"batch_size={batch_size}")
    if curve_every is not None and curve_every < 1:
        raise ValueError(f"curve_every must be >= 1 or None, got {curve_every}")
    needed = turns * batch_size
    records = list(records)
    if len(records) < needed:
        raise ValueError(f"the stream needs turns x batch_size = {turns} x {batch_size} = {needed} "
                         f"records but only {len(records)} were given")
    stream = records[:needed]
    for i, record in enumerate(stream):
        record.validate(index=i)

    device = model_device(model)
    start = time.perf_counter()
    seconds_editing = seconds_scoring = 0.0
    names = list(getattr(editor, "edited_param_names", None) or [])
    snapshot = snapshot_params(model, names) if names else None
    score_kw = dict(batch_size=eval_batch_size, max_length=max_length)

    def measure(edited: Sequence[EditRecord]) -> Dict[str, Any]:
        nonlocal seconds_scoring
        t0 = time.perf_counter()
        scores: Dict[str, Any] = score_records(model, tok, edited, reference,
                                               generation=generation, **score_kw)
        scores["perplexity"] = (perplexity(model, tok, heldout_texts, batch_size=eval_batch_size)
                                if heldout_texts else None)
        scores["weight_change_norm"] = (weight_change_norm(model, names, snapshot)
                                        if snapshot is not None else None)
        seconds_scoring += time.perf_counter() - t0
        return scores

    t0 = time.perf_counter()
    reference = capture_reference(model, tok, stream, **score_kw)
    seconds_scoring += time.perf_counter() - t0
    pre = measure(stream)
    curve: List[Dict[str, Any]] = []
    bar = tqdm(range(turns), desc="editing", unit="turn", disable=not progress)
    for turn in bar:
        batch = stream[turn * batch_size:(turn + 1) * batch_size]
        _sync(device)
        t0 = time.perf_counter()
        editor.edit(list(batch))
        _sync(device)
        seconds_editing += time.perf_counter() - t0
        edited = (turn + 1) * batch_size
        # The last curve point is the end-of-stream score itself, taken once below.
        if curve_every and (turn + 1) % curve_every == 0 and turn + 1 < turns:
            point = measure(stream[:edited])
            curve.append({"edits": edited, **point})
            bar.set_postfix(efficacy=point["efficacy"], specificity=point["specificity"])
    post = measure(stream)
    if curve_every and turns % curve_every == 0:
        curve.append({"edits": needed, **post})

    total = time.perf_counter() - start
    timing: Dict[str, Any] = {
        "seconds_total": total,
        "seconds_per_edit": seconds_editing / needed,
        "seconds_editing": seconds_editing,
        "seconds_scoring": seconds_scoring,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if device.type == "cuda":
        timing["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    run_config = json_safe(config or {})
    if not isinstance(run_config, dict):
        run_config = {"value": run_config}
    for key, value in (("turns", turns), ("batch_size", batch_size), ("curve_every", curve_every)):
        run_config.setdefault(key, value)
    return json_safe({"protocol": PROTOCOL, "edits": needed, "pre": pre, "post": post,
                      "curve": curve, "timing": timing, "config": run_config})
