"""Argument checks shared by every entry point of the delta-application kernels.

``apply_low_rank_`` / ``apply_low_rank_grouped_`` validate here before they
dispatch; the per-path functions (``apply_low_rank_torch_``,
``apply_low_rank_triton_``) trust their inputs and use ``has_work`` for the
empty cases. ``where`` names the caller in every message.
"""
from __future__ import annotations

from typing import Optional

import torch

PATHS = ("auto", "torch", "triton")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_path(path: str, where: str) -> None:
    if path not in PATHS:
        raise ValueError(f"{where}: path must be one of {', '.join(PATHS)}, got {path!r}")


def check_update(weight, left, right, residual: Optional[torch.Tensor], where: str) -> None:
    """``weight += alpha * left @ right`` (with ``residual``) is well formed, or a clear error."""
    for name, t in (("weight", weight), ("left", left), ("right", right)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {shape_str(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{where}: {name} is on {t.device} but weight is on {weight.device}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{where}: weight dtype {weight.dtype} not supported "
                        "(float32, bfloat16, float16, float64)")
    m, k = weight.shape
    if left.shape[0] != m or right.shape[1] != k or left.shape[1] != right.shape[0]:
        raise ValueError(f"{where}: shapes do not chain: weight {shape_str(weight)}, left {shape_str(left)}, "
                         f"right {shape_str(right)}; expected left (M, N) and right (N, K) for weight (M, K)")
    if any(st == 0 and sz > 1 for st, sz in zip(weight.stride(), weight.shape)):
        raise ValueError(f"{where}: weight has a zero stride (an expanded view); "
                         "an in-place update would write one element many times")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != weight.shape:
            got = shape_str(residual) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"{where}: residual must have the weight's shape {shape_str(weight)}, got {got}")
        if residual.dtype not in (torch.float32, weight.dtype):
            raise TypeError(f"{where}: residual dtype must be float32 or the weight's {weight.dtype}, "
                            f"got {residual.dtype}")
        if residual.device != weight.device:
            raise ValueError(f"{where}: residual is on {residual.device} but weight is on {weight.device}")


def has_work(weight: torch.Tensor, left: torch.Tensor) -> bool:
    """False when the update changes nothing (rank 0 or an empty weight)."""
    return left.shape[1] > 0 and weight.numel() > 0
