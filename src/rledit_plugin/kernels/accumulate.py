"""Compensation buffers for lossless accumulation of many small updates.

A bf16 weight keeps 8 significant bits: an update smaller than half an ulp
(~0.2% of the weight) rounds away entirely, and thousands of small edits can
vanish. A residual buffer holds what the last store could not represent
(``weight + residual`` is the exact running value); the kernels fold it into
the next update.

Modes (the editor's hparam ``accumulate``):

* ``"none"``  -- no buffer; updates are rounded to the weight dtype.
* ``"fp32"``  -- fp32 residual (4 bytes per weight element): exact to fp32.
* ``"kahan"`` -- residual in the weight's own dtype (2 bytes per element for
  bf16/fp16): the residual itself is rounded to 8 (bf16) or 11 (fp16)
  significant bits, which still gives ~16 significant bits in total.

fp32 (and fp64) weights get no buffer in any mode: their per-update rounding
error is ~6e-8 relative, far below anything an edit cares about.
"""
from __future__ import annotations

from typing import Optional

import torch

ACCUMULATE_MODES = ("none", "fp32", "kahan")
__all__ = ["ACCUMULATE_MODES", "make_residual", "update_survival"]


def make_residual(weight: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """Zero residual buffer for ``weight`` under ``mode``, or None when not needed.

    The buffer has the weight's shape and, where the weight's memory is dense,
    its strides too (a transposed Conv1D view gets a transposed buffer), so both
    are walked in the same order.
    """
    if mode not in ACCUMULATE_MODES:
        raise ValueError(f"make_residual: unknown accumulate mode {mode!r}; "
                         f"expected one of {', '.join(ACCUMULATE_MODES)}")
    if mode == "none" or weight.dtype in (torch.float32, torch.float64):
        return None
    dtype = torch.float32 if mode == "fp32" else weight.dtype
    return torch.zeros_like(weight, dtype=dtype, memory_format=torch.preserve_format)


def update_survival(start: torch.Tensor, final: torch.Tensor, intended: torch.Tensor) -> dict:
    """How much of an intended cumulative update made it into a weight.

    ``fraction``: projection of the applied change ``final - start`` on the
    intended one (1.0 = all of it, 0.0 = nothing); ``rel_error``:
    ``||(final - start) - intended|| / ||intended||``. Computed in float64.
    """
    applied = final.double() - start.double()
    intended = intended.double().to(applied.device)
    denom = float((intended * intended).sum())
    if denom == 0.0:
        raise ValueError("update_survival: the intended update is zero")
    return {
        "fraction": float((applied * intended).sum()) / denom,
        "rel_error": float((applied - intended).norm()) / denom ** 0.5,
    }
