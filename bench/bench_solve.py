"""Dual (N x N) vs primal (d_in x d_in) ridge solve, forward and backward.

    .venv/bin/python bench/bench_solve.py --out bench/results/solve.json

Defaults: d_in=4096, d_out=14336, N=500 (Llama-3-8B gate/up_proj, 20 edits of ~25
answer tokens), fp32, CPU. Reports the median of --repeats timed runs after one
warm-up, prints a markdown table row and writes the numbers as JSON.

What is timed:
- primal fwd:   dW = (K^T K + e^lam I)^-1 K^T D        (the reference's solve)
- dual fwd:     C = (K K^T + e^lam I)^-1 D             (what the editor needs: W += C^T K)
- dual fwd+dW:  the same plus materialising dW = K^T C (like-for-like output)
- primal bwd:   dD, dlam from Gw via a d_in x d_in factorisation and solve
- dual bwd:     KG = K Gw, then dD = M^-1 KG, dlam     (factor reused from the forward)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rledit_plugin.core.solve import project_weight_grad, ridge_dual, ridge_dual_backward, ridge_primal


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _primal_backward(K, D, Gw, lam):
    """dD = K A^-1 Gw, dlam = -e^lam <A^-1 Gw, dW>, A = K^T K + e^lam I (d_in x d_in)."""
    A = K.T @ K
    A.diagonal().add_(torch.exp(lam))
    L = torch.linalg.cholesky(A)
    X = torch.cholesky_solve(Gw, L)
    dW = torch.cholesky_solve(K.T @ D, L)
    return K @ X, -torch.exp(lam) * (X * dW).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=14336)
    parser.add_argument("--n", type=int, default=500, help="rows (answer tokens) in one edit batch")
    parser.add_argument("--lam", type=float, default=0.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true", help="time the forward solves only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    K = torch.randn(args.n, args.d_in, dtype=dtype, device=device)
    D = torch.randn(args.n, args.d_out, dtype=dtype, device=device)
    Gw_t = torch.randn(args.d_out, args.d_in, dtype=dtype, device=device)  # nn.Linear .grad layout
    lam = torch.tensor(args.lam, dtype=dtype, device=device)

    # accuracy of both fp32 paths against a float64 reference (the dual form, which the
    # tests prove equal to the primal in float64)
    dW_primal = ridge_primal(K, D, lam)
    C, factor = ridge_dual(K, D, lam, return_factor=True)
    dW_ref = K.double().T @ ridge_dual(K.double(), D.double(), lam.double())
    rel_err = lambda x, ref: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    rel_err_primal, rel_err_dual = rel_err(dW_primal, dW_ref), rel_err(K.T @ C, dW_ref)
    del dW_primal, dW_ref

    res = {
        "d_in": args.d_in, "d_out": args.d_out, "n": args.n, "lam": args.lam,
        "dtype": args.dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "repeats": args.repeats,
        "rel_err_dW_primal_vs_f64": rel_err_primal, "rel_err_dW_dual_vs_f64": rel_err_dual,
    }
    res["primal_fwd_ms"] = _median_ms(lambda: ridge_primal(K, D, lam), device, args.repeats)
    res["dual_fwd_ms"] = _median_ms(lambda: ridge_dual(K, D, lam), device, args.repeats)
    res["dual_fwd_dW_ms"] = _median_ms(lambda: K.T @ ridge_dual(K, D, lam), device, args.repeats)
    res["speedup_fwd"] = res["primal_fwd_ms"] / res["dual_fwd_ms"]
    res["speedup_fwd_dW"] = res["primal_fwd_ms"] / res["dual_fwd_dW_ms"]

    if not args.no_backward:
        Gw = Gw_t.T.contiguous()
        dD_p, dlam_p = _primal_backward(K, D, Gw, lam)
        dD_d, dlam_d = ridge_dual_backward(K, C, project_weight_grad(K, Gw_t), lam, factor=factor)
        res["rel_err_dD_dual_vs_primal"] = ((dD_d - dD_p).norm() / dD_p.norm()).item()
        del dD_p, dD_d
        res["primal_bwd_ms"] = _median_ms(lambda: _primal_backward(K, D, Gw, lam), device, args.repeats)
        res["dual_bwd_ms"] = _median_ms(
            lambda: ridge_dual_backward(K, C, project_weight_grad(K, Gw_t), lam, factor=factor),
            device, args.repeats)
        res["speedup_bwd"] = res["primal_bwd_ms"] / res["dual_bwd_ms"]

    cols = ["d_in", "d_out", "n", "dtype", "device", "torch_threads", "primal_fwd_ms", "dual_fwd_ms",
            "speedup_fwd", "dual_fwd_dW_ms", "speedup_fwd_dW", "primal_bwd_ms", "dual_bwd_ms",
            "speedup_bwd", "rel_err_dW_primal_vs_f64", "rel_err_dW_dual_vs_f64"]
    cols = [c for c in cols if c in res]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(fmt(res[c]) for c in cols) + " |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
