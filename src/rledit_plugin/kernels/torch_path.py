"""Exact in-place low-rank update with plain torch ops (any device).

``weight += alpha * left @ right`` without ever holding the full (M, K) product:

* fp32/fp64 weight, no residual, low rank: a single ``addmm_`` into the weight
  itself (BLAS reads and writes W once; no temporaries of W's size).
* 16-bit weight or a compensation residual: rows are processed in chunks whose
  fp32 temporaries stay under ``chunk_bytes``; each chunk is upcast, updated by
  ``addmm_`` in fp32 and cast back on store.
* CPU, fp32 compute, rank >= ``ONEDNN_MIN_RANK``: the update is arithmetic-bound,
  so the product is formed tile by tile (``chunk_bytes`` again) by oneDNN's fp32
  matrix multiply and added to the W tile in one pass (cast on store for 16-bit
  weights). Measured on this project's AMD EPYC (Zen 5) CPU, MKL's fp32 GEMM
  runs at about half of oneDNN's rate there (docs/BENCHMARKS.md). oneDNN is used
  only with fp32 ("ieee") math, so the result stays exact to fp32; where the op
  is missing or fails its start-up check, the BLAS route is taken.

Compensated form (``residual`` given), per element, all in the compute dtype::

    s     = residual + alpha * (left @ right)   # what should be added now
    w_new = round_to_weight_dtype(w + s)
    residual = s - (w_new - w)                  # what did not make it into w

so ``weight + residual`` tracks the exact running sum even when every single
update is smaller than half a bf16 ulp. The same formula is a Kahan sum for
fp32 weights (where the loss happens in the addition, not in the store).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .checks import has_work

# Upper bound on the extra memory one chunk may use (3 fp32 chunk temporaries).
# Larger on GPUs, where every chunk costs several kernel launches.
DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_CHUNK_BYTES_CUDA = 64 << 20
# From this rank on, CPU fp32 products go through oneDNN in (rows, TILE_COLS)
# tiles (below it the update is memory-bound and one addmm_ / row chunk is faster).
ONEDNN_MIN_RANK = 32
TILE_COLS = 1024


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


def tile_shape(n_rows: int, n_cols: int, itemsize: int, chunk_bytes: int, max_cols: int):
    """(rows, cols) of a tile whose temporaries (three at most) fit in ``chunk_bytes``.

    Rows are a power of two: oneDNN ran 682-row tiles ~10% slower than 512-row ones.
    """
    per_temp = max(1, chunk_bytes // 3 // itemsize)
    cols = max(1, min(n_cols, max_cols, per_temp))
    rows = 1 << ((per_temp // cols).bit_length() - 1) if per_temp >= cols else 1
    return max(1, min(n_rows, rows)), cols


@functools.lru_cache(maxsize=1)
def onednn_matmul_available() -> bool:
    """oneDNN's fp32 linear op exists here and agrees with torch.mm on a small case."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(5, 33, generator=gen), torch.randn(7, 33, generator=gen)
        got = _onednn_product(a, b)
        return got.shape == (5, 7) and torch.allclose(got, a @ b.t(), rtol=1e-5, atol=1e-5)
    except Exception:  # noqa: BLE001 - op missing or broken in this build: use BLAS
        return False


def _fp32_math_is_ieee() -> bool:
    # A user may let oneDNN compute fp32 products in bf16/tf32 (set_float32_matmul_precision
    # or the backends' fp32_precision); the API promises fp32 at least, so the oneDNN
    # route is only taken when every one of those settings asks for full fp32.
    mkldnn = torch.backends.mkldnn
    settings = (getattr(torch.backends, "fp32_precision", "none"), getattr(mkldnn, "fp32_precision", "none"),
                getattr(getattr(mkldnn, "matmul", None), "fp32_precision", "none"))
    if not all(str(v) in ("none", "ieee") for v in settings):
        return False
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # legacy and new settings mixed: the new ones, checked above, decide
        return True


def use_onednn(weight: torch.Tensor, compute_dtype: torch.dtype, n_rank: int) -> bool:
    return (weight.device.type == "cpu" and compute_dtype == torch.float32 and n_rank >= ONEDNN_MIN_RANK
            and _fp32_math_is_ieee() and onednn_matmul_available())


def _onednn_product(left_rows: torch.Tensor, right_t_cols: torch.Tensor) -> torch.Tensor:
    """(r, N) @ (c, N)^T -> (r, c) in fp32 by oneDNN; both operands contiguous."""
    return torch.ops.mkldnn._linear_pointwise(left_rows, right_t_cols, None, "none", [], "")


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
    if not has_work(weight, left):
        return out
    cdt = compute_dtype_for(weight, left, right)
    with torch.no_grad():
        weight, left, right, residual = normalise_layout(weight, left, right, residual)
        onednn = use_onednn(weight, cdt, left.shape[1])
        left_c = left.to(cdt)
        right_c = right.to(cdt)
        if residual is None and weight.dtype == cdt and not onednn:
            # No rounding on store: BLAS accumulates straight into W.
            weight.addmm_(left_c, right_c, alpha=alpha)
            return out
        if chunk_bytes is None:
            chunk_bytes = DEFAULT_CHUNK_BYTES_CUDA if weight.is_cuda else DEFAULT_CHUNK_BYTES
        n_rows, n_cols = weight.shape
        itemsize = torch.finfo(cdt).bits // 8
        if onednn:
            left_c, right_t = left_c.contiguous(), right_c.t().contiguous()  # oneDNN wants (K, N) rows
            step, width = tile_shape(n_rows, n_cols, itemsize, chunk_bytes, TILE_COLS)
        else:
            step, width = chunk_rows(n_rows, n_cols, itemsize, chunk_bytes), n_cols
        for start in range(0, n_rows, step):
            rows = slice(start, start + step)
            for col in range(0, n_cols, width):
                cols = slice(col, col + width)
                w = weight[rows, cols]
                if residual is None and not onednn:  # 16-bit W, low rank: upcast, BLAS, cast
                    acc = w.to(cdt, copy=True)
                    acc.addmm_(left_c[rows], right_c[:, cols], alpha=alpha)
                    w.copy_(acc)  # cast on store (round to nearest)
                    continue
                product = (_onednn_product(left_c[rows], right_t[cols]) if onednn
                           else torch.mm(left_c[rows], right_c[:, cols]))
                if residual is None:
                    w.add_(product, alpha=alpha)  # in cdt, rounded once on store
                else:
                    _compensated_chunk_(w, residual[rows, cols], product, alpha, cdt)
    return out


def _compensated_chunk_(w, res, product, alpha, cdt):
    # s = residual + alpha * (L @ R); the product is formed first so the sum with
    # the residual is one elementwise rounding whatever order BLAS sums in.
    s = product
    s.mul_(alpha).add_(res)
    w_old = w.to(cdt, copy=True)
    total = w_old + s
    w.copy_(total)                              # round once to the weight dtype
    total.copy_(w)                              # value actually stored, upcast
    total.sub_(w_old)                           # part of s that made it into w
    s.sub_(total)                               # part that did not
    res.copy_(s)
