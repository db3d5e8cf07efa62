"""A/B: fp32 factors of rank N (not a multiple of 16) through the `ieee` dot, as they are vs
zero-padded to the next multiple of 16 (padding inside the timed call, and pre-padded)."""
import json

import torch
import torch.nn.functional as F
import triton.testing
from rledit_plugin.kernels.triton_path import apply_low_rank_triton_

def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")

rows = []
for shape in ((4096, 14336), (14336, 4096)):
    W = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(W)
    copy = bench(lambda: dst.copy_(W))
    for n in (8, 16, 20, 24):
        L = torch.randn(shape[0], n, device="cuda") * 1e-3
        R = torch.randn(n, shape[1], device="cuda") * 1e-3
        p = (-n) % 16
        Lp, Rp = F.pad(L, (0, p)), F.pad(R, (0, 0, 0, p))
        Lc, Rc = L.t().contiguous().t(), R.t().contiguous().t()
        t = {"plain": bench(lambda: apply_low_rank_triton_(W, L, R, 1.0, precision="ieee")),
             "pad_inside": bench(lambda: apply_low_rank_triton_(W, F.pad(L, (0, p)), F.pad(R, (0, 0, 0, p)), 1.0, precision="ieee")),
             "prepadded": bench(lambda: apply_low_rank_triton_(W, Lp, Rp, 1.0, precision="ieee")),
             "L_colmajor": bench(lambda: apply_low_rank_triton_(W, Lc, R, 1.0, precision="ieee")),
             "L_colmajor_R_colmajor": bench(lambda: apply_low_rank_triton_(W, Lc, Rc, 1.0, precision="ieee"))}
        # correctness of padding: same result as plain
        W1, W2 = W.clone(), W.clone()
        apply_low_rank_triton_(W1, L, R, 1.0, precision="ieee")
        apply_low_rank_triton_(W2, Lp, Rp, 1.0, precision="ieee")
        row = {"shape": shape, "rank": n, "copy_ms": copy, **{k + "_ms": v for k, v in t.items()},
               **{k + "_pct": round(100 * copy / v, 1) for k, v in t.items()},
               "equal": bool(torch.equal(W1, W2))}
        rows.append(row)
        print(json.dumps(row), flush=True)
