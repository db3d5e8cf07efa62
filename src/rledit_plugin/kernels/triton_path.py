"""Fused Triton kernel for ``weight += alpha * left @ right`` (in place).

One program owns a (BLOCK_M, BLOCK_K) tile of W: it accumulates the tile of
``left @ right`` in fp32 registers (rank loop in BLOCK_N steps), then reads the
W tile once, adds, rounds to W's dtype and writes it once. With a residual the
epilogue is the compensated update documented in ``torch_path``.

This module needs triton; ``kernels.__init__`` imports it only when
``triton_available()``. The kernel is decorated on first use, once per value of
``TRITON_INTERPRET``: Triton decides between compiling and interpreting when a
function is decorated, so deciding late lets CPU tests switch the interpreter
on. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (needs numpy).
"""
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .checks import has_work
from .torch_path import normalise_layout

_KERNELS: Dict[bool, object] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Plain function, decorated in get_kernel(); module-level so that Triton resolves
# `tl` through globals on every version (no closures).
def _lowrank_update_kernel(
    w_ptr, l_ptr, r_ptr, res_ptr,
    M, K, N,
    s_wm, s_wk, s_lm, s_ln, s_rn, s_rk, s_resm, s_resk,
    alpha,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_RES: tl.constexpr, FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr, SOFT_BF16_W: tl.constexpr, SOFT_BF16_RES: tl.constexpr,
    EARLY_W: tl.constexpr, OUTER: tl.constexpr,
):
    # Grouped tile order: neighbouring programs share rows of L and columns
    # of R, so the factor re-reads mostly hit L2.
    # Only core builtins here (no tl.cdiv, tl.minimum, tl.zeros): triton's library
    # functions are decorated when triton is imported, so they would not follow
    # a TRITON_INTERPRET switched on later.
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_k = (K + BLOCK_K - 1) // BLOCK_K
    per_group = GROUP_M * tiles_k
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tiles_m - first_m
    group_rows = tl.where(group_rows < GROUP_M, group_rows, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_k = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K

    mask = in_m[:, None] & in_k[None, :]
    w_ptrs = w_ptr + offs_m[:, None] * s_wm + offs_k[None, :] * s_wk
    res_ptrs = res_ptr + offs_m[:, None] * s_resm + offs_k[None, :] * s_resk
    if EARLY_W:
        # Issue the W (and residual) tile loads before the rank loop so their
        # latency overlaps the factor loads and the dot products.
        # Kept in their storage dtype until the epilogue (fewer live registers).
        w_raw = tl.load(w_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        if HAS_RES:
            r_raw = tl.load(res_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")

    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    if OUTER:
        # Small ranks: one fp32 outer product per rank, no padding of the rank to
        # a dot's minimum width (16), so rank 1 costs one FMA per element.
        for n in range(0, N):
            a = tl.load(l_ptr + offs_m * s_lm + n * s_ln, mask=in_m, other=0.0)
            b = tl.load(r_ptr + n * s_rn + offs_k * s_rk, mask=in_k, other=0.0)
            acc += a.to(tl.float32)[:, None] * b.to(tl.float32)[None, :]
    else:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_n = offs_n < N
            a = tl.load(l_ptr + offs_m[:, None] * s_lm + offs_n[None, :] * s_ln,
                        mask=in_m[:, None] & in_n[None, :], other=0.0)
            b = tl.load(r_ptr + offs_n[:, None] * s_rn + offs_k[None, :] * s_rk,
                        mask=in_n[:, None] & in_k[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
            else:
                # 16-bit factors: products are exact in fp32, accumulation is fp32.
                acc = tl.dot(a, b, acc)

    if not EARLY_W:
        w_raw = tl.load(w_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        if HAS_RES:
            r_raw = tl.load(res_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    w_old = w_raw.to(tl.float32)
    if HAS_RES:
        s = r_raw.to(tl.float32) + alpha * acc
        total = w_old + s
    else:
        total = w_old + alpha * acc
    if SOFT_BF16_W:  # interpreter only: its plain bf16 cast truncates (triton 3.9)
        bits = total.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even
        w_new = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        w_new = total.to(w_ptr.dtype.element_ty)  # round to nearest even
    tl.store(w_ptrs, w_new, mask=mask)
    if HAS_RES:
        lost = s - (w_new.to(tl.float32) - w_old)
        if SOFT_BF16_RES:
            bits = lost.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(res_ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(res_ptrs, lost.to(res_ptr.dtype.element_ty), mask=mask)


def get_kernel():
    """The kernel, decorated now: Triton picks compile vs interpret at decoration."""
    key = interpreting()
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_lowrank_update_kernel)
    return _KERNELS[key]


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 128
    block_k: int = 128
    block_n: int = 32
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    early_w: bool = True  # load the W tile before the rank loop


# Dot modes: "native16" (16-bit factors straight to the tensor cores), "outer"
# (fp32 factors, one exact outer product per rank on the CUDA cores: no
# padding of the rank to tl.dot's minimum of 16), or fp32
# factors through tl.dot at input precision "ieee" (exact fp32 FMA), "tf32x3"
# (three tf32 products, ~fp32 accuracy) or "tf32" (~2^-11, opt-in only), or
# "bf16x3" (fp32 factors split on the host into bf16 hi + lo parts, run as a
# native16 update of rank 3N: hi*hi + hi*lo + lo*hi, ~5e-6 relative error,
# accumulated in fp32; opt-in). Default for fp32 factors: "outer" up to rank
# OUTER_MAX_RANK on 16-bit W, "ieee" up to IEEE_MAX_RANK (exact and the fastest there),
# "tf32x3" above (ieee is compute-bound there). See docs/BENCHMARKS.md.
FP32_PRECISIONS = ("outer", "ieee", "tf32x3", "tf32", "bf16x3")
OUTER_MAX_RANK = 4
IEEE_MAX_RANK = 64


def _cfg(bm, bk, bn, warps, stages, early):
    return KernelConfig(block_m=bm, block_k=bk, block_n=bn, group_m=8, num_warps=warps,
                        num_stages=stages, early_w=early)


# GPU tile shapes per dot mode: (rank, config) points; a call uses the point
# whose rank is nearest in log scale (ties: the lower rank). Each is the fastest
# of the swept shapes on a bf16 4096x14336 weight (triton 3.6; bench/bench_kernels.py
# --sweep): NVIDIA H200, except where marked H100.
GPU_CONFIGS = {
    "native16": [(1, _cfg(64, 128, 16, 4, 3, True)), (3, _cfg(64, 128, 16, 4, 3, False)),
                 (16, _cfg(64, 64, 16, 4, 4, True)), (48, _cfg(64, 128, 64, 4, 3, True)),
                 (64, _cfg(64, 128, 64, 4, 3, True)), (192, _cfg(64, 128, 64, 4, 3, True)),
                 (256, _cfg(64, 128, 64, 4, 3, True)), (768, _cfg(128, 128, 64, 8, 3, False)),
                 (1024, _cfg(128, 128, 64, 8, 3, False))],
    "tf32x3": [(1, _cfg(128, 64, 16, 8, 3, False)), (16, _cfg(128, 64, 16, 4, 4, True)),
               (64, _cfg(128, 64, 32, 4, 4, False)), (256, _cfg(256, 64, 32, 8, 4, False)),
               (1024, _cfg(256, 64, 32, 8, 4, False))],
    "ieee": [(1, _cfg(64, 64, 16, 4, 4, False)), (16, _cfg(32, 128, 16, 4, 4, True)),   # 16: H100
             (64, _cfg(64, 128, 16, 4, 3, False))],
    # H100 (bench/device_check.sh); block_n is unused here
    "outer": [(1, _cfg(64, 128, 16, 4, 3, True)), (2, _cfg(128, 64, 16, 4, 4, False)),
              (4, _cfg(128, 64, 16, 4, 4, False)), (8, _cfg(64, 64, 16, 2, 4, False))],
}


def nearest_config(points, n_rank: int) -> KernelConfig:
    target = math.log2(max(1, n_rank))
    return min(points, key=lambda p: abs(math.log2(p[0]) - target))[1]


def default_config(n_rank: int, mode: str, on_cpu: bool) -> KernelConfig:
    """Tile shapes for a dot mode and (effective) rank."""
    if on_cpu:  # interpreter: fewer, larger numpy programs are faster
        return KernelConfig(block_m=32, block_k=64, block_n=16 if n_rank <= 16 else 32,
                            early_w=n_rank <= 128)
    return nearest_config(GPU_CONFIGS.get(mode, GPU_CONFIGS["tf32x3"]), n_rank)


def split_bf16x3(left: torch.Tensor, right: torch.Tensor):
    """fp32 factors -> bf16 factors of rank 3N with L3 @ R3 = Lh Rh + Lh Rl + Ll Rh."""
    lf, rf = left.float(), right.float()
    lh, rh = lf.to(torch.bfloat16), rf.to(torch.bfloat16)
    ll, rl = (lf - lh.float()).to(torch.bfloat16), (rf - rh.float()).to(torch.bfloat16)
    return torch.cat([lh, lh, ll], dim=1), torch.cat([rh, rl, rh], dim=0)


def dot_mode(left: torch.Tensor, right: torch.Tensor, precision: Optional[str],
             weight_dtype: torch.dtype = torch.float32) -> str:
    """The dot mode of a launch; the default rule follows the H100 measurements (BENCHMARKS)."""
    if left.dtype == right.dtype and left.dtype in (torch.float16, torch.bfloat16):
        return "native16"
    rank, w16 = left.shape[1], weight_dtype in (torch.float16, torch.bfloat16)
    # outer wins only on 16-bit W, whose half-size tiles leave the arithmetic exposed;
    # on fp32 W ieee matches it at rank 1 and beats it at 2-16 (H100)
    prec = precision or ("outer" if w16 and rank <= OUTER_MAX_RANK
                         else "ieee" if rank <= IEEE_MAX_RANK else "tf32x3")
    if prec not in FP32_PRECISIONS:
        raise ValueError(f"apply_low_rank_triton_: precision must be one of {FP32_PRECISIONS}, got {prec!r}")
    return prec


def apply_low_rank_triton_(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    alpha: float = 1.0,
    residual: Optional[torch.Tensor] = None,
    *,
    config: Optional[KernelConfig] = None,
    precision: Optional[str] = None,
) -> torch.Tensor:
    """Launch the fused kernel (inputs already validated by ``kernels.__init__``).

    ``precision`` applies to non-16-bit factors (see FP32_PRECISIONS).
    """
    on_cpu = weight.device.type == "cpu"
    if on_cpu and not interpreting():
        raise RuntimeError(
            "apply_low_rank_(path='triton'): CPU tensors need TRITON_INTERPRET=1 "
            "(Triton's interpreter); use path='torch' or move the tensors to CUDA")
    out = weight
    soft = interpreting()
    if not has_work(weight, left):
        return out
    weight, left, right, residual = normalise_layout(weight, left, right, residual)
    n_rows, n_cols = weight.shape
    mode = dot_mode(left, right, precision, weight.dtype)
    if mode == "bf16x3":
        left, right = split_bf16x3(left, right)
        mode = "native16"
    n_rank = left.shape[1]
    cfg = config or default_config(n_rank, mode, on_cpu)
    outer = mode == "outer"
    fp32_dot = mode != "native16"
    prec = mode if fp32_dot and not outer else "ieee"
    if soft and not fp32_dot and left.dtype == torch.bfloat16:
        # The interpreter's bf16 dot reads the raw bits as integers (triton
        # 3.9); upcasting bf16 to fp32 is exact, so the result is unchanged.
        fp32_dot, prec = True, "ieee"
    res = residual if residual is not None else weight  # dummy pointer when unused
    grid = (triton.cdiv(n_rows, cfg.block_m) * triton.cdiv(n_cols, cfg.block_k),)
    with torch.no_grad():
        get_kernel()[grid](
            weight, left, right, res,
            n_rows, n_cols, n_rank,
            weight.stride(0), weight.stride(1), left.stride(0), left.stride(1),
            right.stride(0), right.stride(1), res.stride(0), res.stride(1),
            float(alpha),
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            GROUP_M=cfg.group_m, HAS_RES=residual is not None, FP32_DOT=fp32_dot,
            PRECISION=prec,
            SOFT_BF16_W=soft and weight.dtype == torch.bfloat16,
            SOFT_BF16_RES=soft and residual is not None and residual.dtype == torch.bfloat16,
            EARLY_W=cfg.early_w, OUTER=outer, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
