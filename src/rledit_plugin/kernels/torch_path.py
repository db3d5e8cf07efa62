"""Exact in-place low-rank update with plain torch ops (any device).

``weight += alpha * left @ right`` without ever holding the full (M, K) product:

* fp32/fp64 weight, no residual: a single ``addmm_`` into the weight itself
  (BLAS reads and writes W once; no temporaries of W's size).
* 16-bit weight or a compensation residual: rows are processed in chunks whose
  fp32 temporaries stay under ``chunk_bytes``; each chunk is upcast, updated by
  ``addmm_`` in fp32 and cast back on store.

Compensated form (``residual`` given), per element, all in the compute dtype::

    s     = residual + alpha * (left @ right)   # what should be added now
    w_new = round_to_weight_dtype(w + s)
    residual = s - (w_new - w)                  # what did not make it into w

so ``weight + residual`` tracks the exact running sum even when every single
update is smaller than half a bf16 ulp. The same formula is a Kahan sum for
fp32 weights (where the loss happens in the addition, not in the store).
"""
from __future__ import annotations

from typing import Optional

import torch

# Upper bound on the extra memory one chunk may use (3 fp32 chunk temporaries).
# Larger on GPUs, where every chunk costs several kernel launches.
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_CHUNK_BYTES_CUDA = 64 << 20


def compute_dtype_for(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.dtype:
    """At least fp32; fp64 when any operand is fp64."""
    if torch.float64 in (weight.dtype, left.dtype, right.dtype):
        return torch.float64
    return torch.float32


def normalise_layout(weight, left, right, residual):
    """Transpose the whole problem when W's contiguous axis is its first one.

    ``W += L @ R`` is the same update as ``W.T += R.T @ L.T``; after this the
    fast axis of W is its last one, so row chunks are contiguous blocks of memory
    (the GPT-2 Conv1D weight passed as ``module.weight.t()`` lands here).
    """
    if weight.dim() == 2 and weight.stride(0) < weight.stride(1) and weight.shape[0] > 1:
        weight, left, right = weight.t(), right.t(), left.t()
        if residual is not None:
            residual = residual.t()
    return weight, left, right, residual


def chunk_rows(n_rows: int, n_cols: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one (rows, n_cols) temporary fits in chunk_bytes / 3."""
    per_temp = max(1, chunk_bytes // 3)
    return max(1, min(n_rows, per_temp // max(1, n_cols * itemsize)))


def apply_low_rank_torch_(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    alpha: float = 1.0,
    residual: Optional[torch.Tensor] = None,
    chunk_bytes: Optional[int] = None,
) -> torch.Tensor:
    """``weight += alpha * left @ right`` in place (inputs already validated)."""
    out = weight
    cdt = compute_dtype_for(weight, left, right)
    with torch.no_grad():
        weight, left, right, residual = normalise_layout(weight, left, right, residual)
        left_c = left.to(cdt)
        right_c = right.to(cdt)
        if residual is None and weight.dtype == cdt:
            # No rounding on store: BLAS accumulates straight into W.
            weight.addmm_(left_c, right_c, alpha=alpha)
            return out
        if chunk_bytes is None:
            chunk_bytes = DEFAULT_CHUNK_BYTES_CUDA if weight.is_cuda else DEFAULT_CHUNK_BYTES
        n_rows, n_cols = weight.shape
        step = chunk_rows(n_rows, n_cols, torch.finfo(cdt).bits // 8, chunk_bytes)
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            w = weight[rows]
            if residual is None:
                acc = w.to(cdt, copy=True)
                acc.addmm_(left_c[rows], right_c, alpha=alpha)
                w.copy_(acc)  # cast on store (round to nearest)
            else:
                _compensated_chunk_(w, residual[rows], left_c[rows], right_c, alpha, cdt)
    return out


def _compensated_chunk_(w, res, left_c, right_c, alpha, cdt):
    # s = residual + alpha * (L @ R); the product is formed first so the sum with
    # the residual is one elementwise rounding whatever order BLAS sums in.
    s = torch.mm(left_c, right_c)
    s.mul_(alpha).add_(res)
    w_old = w.to(cdt, copy=True)
    total = w_old + s
    w.copy_(total)                              # round once to the weight dtype
    total.copy_(w)                              # value actually stored, upcast
    total.sub_(w_old)                           # part of s that made it into w
    s.sub_(total)                               # part that did not
    res.copy_(s)
