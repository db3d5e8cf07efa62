"""Delta application: ``weight += alpha * left @ right`` in place, never materialising the product.

Public API (the editor calls it for every weight update; every caller speaks
(d_out, d_in), so GPT-2 Conv1D weights arrive as ``module.weight.t()`` views):

* ``apply_low_rank_(weight, left, right, alpha=1.0, *, residual=None, path="auto")``
* ``apply_low_rank_grouped_(weights, lefts, rights, alphas=None, *, residuals=None, path="auto")``
* ``make_residual(weight, mode)`` with ``mode`` in ``ACCUMULATE_MODES``
* ``triton_available()``

``path``: ``"torch"`` (exact chunked ``addmm_``, any device), ``"triton"`` (fused
kernel; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton
for CUDA tensors when Triton imports, else torch).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .accumulate import ACCUMULATE_MODES, make_residual, update_survival
from .torch_path import apply_low_rank_torch_

__all__ = ["apply_low_rank_", "apply_low_rank_grouped_", "make_residual", "update_survival",
           "ACCUMULATE_MODES", "PATHS", "triton_available", "resolve_path"]

PATHS = ("auto", "torch", "triton")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Triton indexes W with 32-bit offsets.
_TRITON_MAX_ELEMENTS = 2**31 - 1


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def resolve_path(weight: torch.Tensor, path: str = "auto", residual: Optional[torch.Tensor] = None) -> str:
    """The concrete path ("torch" or "triton") a call with ``path`` takes for ``weight``.

    "auto": Triton for CUDA tensors when it imports (fp16/bf16/fp32 weights up
    to 2^31 elements); torch everywhere else. ``residual`` is accepted so that
    the rule may depend on it; today it does not.
    """
    if path not in PATHS:
        raise ValueError(f"apply_low_rank_: path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "auto":
        fits = weight.numel() <= _TRITON_MAX_ELEMENTS and weight.dtype != torch.float64
        return "triton" if weight.is_cuda and fits and triton_available() else "torch"
    if path == "triton":
        if not triton_available():
            raise RuntimeError("apply_low_rank_(path='triton'): triton is not importable; "
                               "install the 'triton' extra or use path='torch'")
        if weight.dtype == torch.float64:
            raise ValueError("apply_low_rank_(path='triton'): float64 weights are not supported; "
                             "use path='torch'")
        if weight.numel() > _TRITON_MAX_ELEMENTS:
            raise ValueError(f"apply_low_rank_(path='triton'): weight has {weight.numel()} elements, "
                             "more than 32-bit indexing allows; use path='torch'")
    return path


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate(weight, left, right, residual, where: str = "apply_low_rank_") -> None:
    for name, t in (("weight", weight), ("left", left), ("right", right)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D, got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{where}: {name} is on {t.device} but weight is on {weight.device}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{where}: weight dtype {weight.dtype} not supported "
                        "(float32, bfloat16, float16, float64)")
    m, k = weight.shape
    if left.shape[0] != m or right.shape[1] != k or left.shape[1] != right.shape[0]:
        raise ValueError(f"{where}: shapes do not chain: weight {_shape(weight)}, left {_shape(left)}, "
                         f"right {_shape(right)}; expected left (M, N) and right (N, K) for weight (M, K)")
    if any(st == 0 and sz > 1 for st, sz in zip(weight.stride(), weight.shape)):
        raise ValueError(f"{where}: weight has a zero stride (an expanded view); "
                         "an in-place update would write one element many times")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != weight.shape:
            got = _shape(residual) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"{where}: residual must have the weight's shape {_shape(weight)}, got {got}")
        if residual.dtype not in (torch.float32, weight.dtype):
            raise TypeError(f"{where}: residual dtype must be float32 or the weight's {weight.dtype}, "
                            f"got {residual.dtype}")
        if residual.device != weight.device:
            raise ValueError(f"{where}: residual is on {residual.device} but weight is on {weight.device}")


def apply_low_rank_(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    alpha: float = 1.0,
    *,
    residual: Optional[torch.Tensor] = None,
    path: str = "auto",
) -> torch.Tensor:
    """``weight += alpha * left @ right`` in place; returns ``weight``.

    weight (M, K) may be a non-contiguous view (e.g. ``conv1d.weight.t()``);
    left (M, N), right (N, K) of any float dtype, computed in fp32 at least.
    With ``residual`` (from ``make_residual``) the update is compensated and the
    residual updated, so small updates to 16-bit weights do not round away.
    """
    _validate(weight, left, right, residual)
    alpha = float(alpha)
    if left.shape[1] == 0 or weight.numel() == 0:
        return weight
    if resolve_path(weight, path, residual) == "triton":
        from .triton_path import apply_low_rank_triton_
        return apply_low_rank_triton_(weight, left, right, alpha, residual)
    return apply_low_rank_torch_(weight, left, right, alpha, residual)


def apply_low_rank_grouped_(
    weights: Sequence[torch.Tensor],
    lefts: Sequence[torch.Tensor],
    rights: Sequence[torch.Tensor],
    alphas: Union[None, float, Sequence[float]] = None,
    *,
    residuals: Optional[Sequence[Optional[torch.Tensor]]] = None,
    path: str = "auto",
) -> Sequence[torch.Tensor]:
    """``apply_low_rank_`` for many modules in one call (one launch per module).

    ``alphas``: None (all 1.0), one number for all, or one per weight.
    ``residuals``: None, or one entry (a buffer or None) per weight.
    Everything is validated before any weight is touched.
    """
    n = len(weights)
    if len(lefts) != n or len(rights) != n:
        raise ValueError(f"apply_low_rank_grouped_: got {n} weights, {len(lefts)} lefts and "
                         f"{len(rights)} rights; they must match")
    if alphas is None:
        alphas = [1.0] * n
    elif isinstance(alphas, (int, float)):
        alphas = [float(alphas)] * n
    elif len(alphas) != n:
        raise ValueError(f"apply_low_rank_grouped_: got {len(alphas)} alphas for {n} weights")
    if residuals is None:
        residuals = [None] * n
    elif len(residuals) != n:
        raise ValueError(f"apply_low_rank_grouped_: got {len(residuals)} residuals for {n} weights")
    if path not in PATHS:
        raise ValueError(f"apply_low_rank_grouped_: path must be one of {', '.join(PATHS)}, got {path!r}")
    for i, (w, l, r, res) in enumerate(zip(weights, lefts, rights, residuals)):
        _validate(w, l, r, res, where=f"apply_low_rank_grouped_[{i}]")
    for w, l, r, a, res in zip(weights, lefts, rights, alphas, residuals):
        apply_low_rank_(w, l, r, a, residual=res, path=path)
    return weights
