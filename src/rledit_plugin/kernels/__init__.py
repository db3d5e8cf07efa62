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
from .checks import PATHS, WEIGHT_DTYPES, check_path, check_update, has_work  # noqa: F401  (re-exported)
from .torch_path import apply_low_rank_torch_

__all__ = ["apply_low_rank_", "apply_low_rank_grouped_", "make_residual", "update_survival",
           "ACCUMULATE_MODES", "PATHS", "triton_available", "resolve_path"]

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
    check_path(path, "apply_low_rank_")
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
    check_update(weight, left, right, residual, "apply_low_rank_")
    alpha = float(alpha)
    if not has_work(weight, left):
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
    check_path(path, "apply_low_rank_grouped_")
    for i, (w, l, r, res) in enumerate(zip(weights, lefts, rights, residuals)):
        check_update(w, l, r, res, f"apply_low_rank_grouped_[{i}]")
    for w, l, r, a, res in zip(weights, lefts, rights, alphas, residuals):
        apply_low_rank_(w, l, r, a, residual=res, path=path)
    return weights
