"""Benchmark of the delta-application path (not a test).

    python bench/bench_kernels.py                      # CPU, full grid
    python bench/bench_kernels.py --device cuda --sweep --out-dir $OUT

For each shape (M x K), weight dtype and rank N, times ``W += alpha * L @ R``:
  copy      plain copy of W into another buffer (read + write: the floor's traffic)
  naive     dense fp32 dW = L @ R, scale, cast, add (what the reference does)
  addmm_    W.addmm_(L, R) with the factors cast to W's dtype (one BLAS call)
  torch     apply_low_rank_(path="torch"), fp32 factors (on CPU from rank 32: oneDNN tiles)
  torch+res same with an fp32 compensation residual (16-bit weights only)
  triton*   apply_low_rank_(path="triton") variants (CUDA only)
Achieved bandwidth counts W read once and written once (2 * W bytes) for every
method, so "% of copy" is the fraction of the copy bandwidth the method reaches.
Then the bf16 survival measurement: 2,000 random low-rank updates sized
1e-4..1e-3 of ||W|| with and without compensation, against an fp64 sum.
Prints markdown tables and writes JSON (+ markdown) under --out-dir.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

try:
    import rledit_plugin.kernels  # noqa: F401  installed, or on PYTHONPATH
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from rledit_plugin.kernels import (  # noqa: E402
    apply_low_rank_, make_residual, triton_available, update_survival)
from kernel_report import markdown  # noqa: E402  (bench/ is sys.path[0] when run as a script)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA = 1e-4  # keeps W from drifting over hundreds of in-place repeats


def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor() or "?"
    if triton_available():
        import triton
        info["triton"] = triton.__version__
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_sms"] = props.multi_processor_count
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001 - informational only
            pass
    return info


def timer(device, min_reps=3, max_reps=20, min_total_s=1.0, rep_ms=100):
    """median seconds of fn() (after warm-up)."""
    if device == "cuda":
        import triton.testing

        def run(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") / 1e3
        return run

    def run(fn):
        fn()
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < min_total_s and len(times) < max_reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def gpu_ceilings(run):
    """Matrix-product rates on random data (the arithmetic ceilings)."""
    out = {}
    for name, dtype, n in (("bf16", torch.bfloat16, 8192), ("fp32_ieee", torch.float32, 4096)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        out[f"matmul_{name}_tflops"] = 2 * n ** 3 / run(lambda: a @ b) / 1e12
    return out


def methods_for(device, dtype, rank, W, L, R, tuned=None):
    """name -> (zero-argument callable applying one update in place, extra bytes it must move)."""
    Lw, Rw = L.to(dtype), R.to(dtype)
    out = {
        "naive": (lambda: W.add_((ALPHA * (L @ R)).to(dtype)), 0),
        "addmm_": (lambda: W.addmm_(Lw, Rw, alpha=ALPHA), 0),
        "torch": (lambda: apply_low_rank_(W, L, R, ALPHA, path="torch"), 0),
    }
    res_bytes = 2 * W.numel() * 4  # fp32 residual read + written
    if dtype != torch.float32:
        res = make_residual(W, "fp32")
        out["torch+res"] = (lambda: apply_low_rank_(W, L, R, ALPHA, residual=res, path="torch"), res_bytes)
    if device == "cuda" and triton_available():
        from rledit_plugin.kernels.triton_path import apply_low_rank_triton_, nearest_config

        def cfg(mode, n):  # tile shape measured best by the sweep of this run, if any
            return nearest_config(tuned[mode], n) if tuned and tuned.get(mode) else None

        def kernel(left, right, prec, residual=None):
            mode = "native16" if left.dtype != torch.float32 or prec == "bf16x3" else prec
            n = left.shape[1] * (3 if prec == "bf16x3" and left.dtype == torch.float32 else 1)
            c = cfg(mode, n)
            return lambda: apply_low_rank_triton_(W, left, right, ALPHA, residual, config=c, precision=prec)

        if tuned is None:  # the library's defaults, as the editor gets them
            out["auto"] = (lambda: apply_low_rank_(W, L, R, ALPHA), 0)
            if rank <= 16:  # the small-rank fp32 modes side by side (sets OUTER_MAX_RANK)
                out["triton outer"] = (kernel(L, R, "outer"), 0)
                out["triton ieee"] = (kernel(L, R, "ieee"), 0)
            if 16 <= rank <= 256:  # where ieee hands over to tf32x3 (sets IEEE_MAX_RANK)
                out["triton ieee"] = (kernel(L, R, "ieee"), 0)
                out["triton tf32x3"] = (kernel(L, R, "tf32x3"), 0)
            out["triton bf16x3"] = (kernel(L, R, "bf16x3"), 0)
            if dtype != torch.float32:
                out["auto, 16-bit factors"] = (lambda: apply_low_rank_(W, Lw, Rw, ALPHA), 0)
                r32, r16 = make_residual(W, "fp32"), make_residual(W, "kahan")
                out["auto+res fp32"] = (lambda: apply_low_rank_(W, L, R, ALPHA, residual=r32), res_bytes)
                out["auto+res kahan"] = (lambda: apply_low_rank_(W, L, R, ALPHA, residual=r16),
                                         2 * W.numel() * W.element_size())
            return out
        out["triton tf32x3"] = (kernel(L, R, "tf32x3"), 0)
        out["triton bf16x3"] = (kernel(L, R, "bf16x3"), 0)
        if rank <= 64:
            out["triton ieee"] = (kernel(L, R, "ieee"), 0)
        if dtype != torch.float32:
            out["triton 16-bit factors"] = (kernel(Lw, Rw, None), 0)
            for prec in ("tf32x3", "bf16x3"):
                r = make_residual(W, "fp32")
                out[f"triton+res {prec}"] = (kernel(L, R, prec, r), res_bytes)
            r16 = make_residual(W, "kahan")
            out["triton+kahan bf16x3"] = (kernel(L, R, "bf16x3", r16), 2 * W.numel() * W.element_size())
    return out


def bench_grid(args, device, run, rows, deadline, tuned=None):
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        m, k = shape
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            W = (torch.randn(m, k, generator=gen) * 0.02).to(device, dtype)
            dst = torch.empty_like(W)
            t_copy = run(lambda: dst.copy_(W))
            nbytes = 2 * W.numel() * W.element_size()
            copy_gbs = nbytes / t_copy / 1e9
            rows.append(dict(shape=f"{m}x{k}", dtype=dname, rank=0, method="copy", ms=t_copy * 1e3,
                             gbs=copy_gbs, pct_copy=100.0, vs_naive=None))
            for rank in args.ranks:
                if time.time() > deadline:
                    print(f"[budget] stopping before {m}x{k} {dname} rank {rank}", flush=True)
                    return
                L = (torch.randn(m, rank, generator=gen) / math.sqrt(rank)).to(device)
                R = torch.randn(rank, k, generator=gen).to(device)
                timings, extra = {}, {}
                for name, (fn, extra_bytes) in methods_for(device, dtype, rank, W, L, R, tuned).items():
                    try:
                        timings[name] = run(fn)
                        extra[name] = extra_bytes
                    except Exception as exc:  # noqa: BLE001 - record and go on
                        print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
                for name, t in timings.items():
                    gbs = nbytes / t / 1e9
                    rows.append(dict(shape=f"{m}x{k}", dtype=dname, rank=rank, method=name, ms=t * 1e3,
                                     gbs=gbs, pct_copy=100.0 * gbs / copy_gbs,
                                     pct_own_floor=100.0 * (nbytes + extra[name]) / t / 1e9 / copy_gbs,
                                     vs_naive=timings["naive"] / t if "naive" in timings else None,
                                     tflops=2 * m * k * rank / t / 1e12))
                print(f"{m}x{k} {dname} r={rank}: " + ", ".join(
                    f"{n} {t * 1e3:.2f}ms" for n, t in timings.items()), flush=True)
            W = dst = None  # free before the next dtype
            if device == "cuda":
                torch.cuda.empty_cache()


SWEEP_SHAPES = [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4),
                (256, 64, 8, 4), (128, 64, 8, 3)]
SWEEP_RANKS = {"native16": (1, 3, 16, 48, 64, 192, 256, 768, 1024), "tf32x3": (1, 16, 64, 256, 1024),
               "ieee": (1, 16), "outer": (1, 4, 8, 16)}


def sweep_configs(device, run, rows, deadline, shape=(4096, 14336), modes=None, ranks=None,
                  tiles=None):
    """Time tile shapes per dot mode and rank on a bf16 W; returns {mode: [(rank, best config)]}.

    ``modes`` / ``ranks`` restrict SWEEP_RANKS; ``tiles`` replaces SWEEP_SHAPES."""
    from rledit_plugin.kernels.triton_path import KernelConfig, apply_low_rank_triton_
    gen = torch.Generator().manual_seed(1)
    m, k = shape
    W = (torch.randn(m, k, generator=gen) * 0.02).to(device, torch.bfloat16)
    dst = torch.empty_like(W)
    t_copy = run(lambda: dst.copy_(W))
    best = {}
    only_ranks = ranks
    for mode, mode_ranks in SWEEP_RANKS.items():
        if modes and mode not in modes:
            continue
        for rank in mode_ranks:
            if only_ranks and rank not in only_ranks:
                continue
            L = (torch.randn(m, rank, generator=gen) / math.sqrt(rank)).to(device)
            R = torch.randn(rank, k, generator=gen).to(device)
            if mode == "native16":
                L, R = L.bfloat16(), R.bfloat16()
            block_n = 16 if rank <= 16 else (64 if mode == "native16" else 32)
            for bm, bk, warps, stages in (tiles or SWEEP_SHAPES):
                for early in (True, False):
                    if time.time() > deadline:
                        print("[budget] sweep stopped", flush=True)
                        return {md: sorted(v.items()) for md, v in _winners(best).items()}
                    cfg = KernelConfig(bm, bk, block_n, 8, warps, stages, early)
                    prec = None if mode == "native16" else mode
                    try:
                        t = run(lambda: apply_low_rank_triton_(W, L, R, ALPHA, config=cfg, precision=prec))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        print(f"  sweep {mode} {cfg} failed: {type(exc).__name__}", flush=True)
                        continue
                    rows.append(dict(mode=mode, rank=rank, config=cfg.__dict__, ms=t * 1e3,
                                     pct_copy=100.0 * t_copy / t))
                    best.setdefault(mode, {}).setdefault(rank, []).append((t, cfg))
            if rank not in best.get(mode, {}):
                continue
            t_best, c_best = min(best[mode][rank], key=lambda x: x[0])
            print(f"sweep {mode} r={rank}: best {c_best} {t_best * 1e3:.3f} ms "
                  f"({100.0 * t_copy / t_best:.0f}% of copy)", flush=True)
    return {md: sorted(v.items()) for md, v in _winners(best).items()}


def _winners(best):
    return {mode: {rank: min(ts, key=lambda x: x[0])[1] for rank, ts in per_rank.items()}
            for mode, per_rank in best.items()}


def accuracy(device, rows, m=1024, k=2048, ranks=(64, 1024)):
    """Relative error of the applied delta against fp64, per dot mode (W starts at 0, fp32)."""
    gen = torch.Generator().manual_seed(3)
    for rank in ranks:
        L = (torch.randn(m, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank))
        R = torch.randn(rank, k, generator=gen, dtype=torch.float64)
        ref = L @ R
        bound = L.abs() @ R.abs()
        cases = {"torch path (fp32)": dict(path="torch")}
        if triton_available() and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            for prec in ("outer", "ieee", "tf32x3", "bf16x3", "tf32"):
                cases[f"triton {prec}"] = dict(precision=prec)
            cases["triton 16-bit factors (bf16-rounded)"] = dict(precision=None, bf16=True)
        for name, kw in cases.items():
            W = torch.zeros(m, k, device=device)
            l, r = L.float().to(device), R.float().to(device)
            if kw.get("bf16"):
                l, r = l.bfloat16(), r.bfloat16()
            if kw.get("path") == "torch":
                apply_low_rank_(W, l, r, 1.0, path="torch")
            else:
                from rledit_plugin.kernels.triton_path import apply_low_rank_triton_
                apply_low_rank_triton_(W, l, r, 1.0, precision=kw.get("precision"))
            err = W.double().cpu() - ref
            rows.append(dict(method=name, rank=rank, rel_error=float(err.norm() / ref.norm()),
                             max_err_over_abs_product=float((err.abs() / bound).max())))
            print(f"accuracy r={rank} {name}: rel {rows[-1]['rel_error']:.2e}", flush=True)


def survival(args, device, rows):
    """2,000 random updates of relative size 1e-4..1e-3 to one weight matrix."""
    m, k = args.survival_shape
    for dname, mode in (("bf16", "none"), ("bf16", "kahan"), ("bf16", "fp32"),
                        ("fp16", "none"), ("fp16", "fp32"), ("fp32", "none")):
        gen = torch.Generator().manual_seed(2)
        w = (torch.randn(m, k, generator=gen, dtype=torch.float64) * 0.02).to(device, DTYPES[dname])
        start = w.double()
        ref = start.clone()
        res = make_residual(w, mode)
        wnorm = float(start.norm())
        t0 = time.perf_counter()
        for _ in range(args.survival_updates):
            rank = int(torch.randint(1, 9, (1,), generator=gen))
            rel = 10 ** float(torch.empty(1).uniform_(-4, -3, generator=gen))
            L = torch.randn(m, rank, generator=gen, dtype=torch.float64).to(device)
            R = torch.randn(rank, k, generator=gen, dtype=torch.float64).to(device)
            L *= rel * wnorm / float((L @ R).norm())
            ref += L @ R
            apply_low_rank_(w, L.float(), R.float(), 1.0, residual=res)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        s = update_survival(start, w, ref - start)
        tracked = w.double() + (res.double() if res is not None else 0.0)
        rows.append(dict(dtype=dname, accumulate=mode, updates=args.survival_updates, shape=f"{m}x{k}",
                         fraction=s["fraction"], rel_error=s["rel_error"],
                         tracked_rel_error=update_survival(start, tracked, ref - start)["rel_error"],
                         intended_rel=float((ref - start).norm()) / wnorm,
                         ms_per_update=elapsed / args.survival_updates * 1e3))
        print(f"survival {dname} {mode}: fraction {s['fraction']:.4f}, rel_error {s['rel_error']:.4f}",
              flush=True)


def parse_shapes(text):
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("4096x14336,14336x4096"))
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256, 1024])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--sweep", action="store_true",
                   help="GPU: first time Triton tile shapes, then run the grid with the best ones")
    p.add_argument("--survival-updates", type=int, default=2000)
    p.add_argument("--survival-shape", type=lambda s: parse_shapes(s)[0], default=(1024, 2048))
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--budget-s", type=float, default=3600.0,
                   help="grid: start no new point after this many seconds")
    p.add_argument("--sweep-budget-s", type=float, default=90.0)
    p.add_argument("--sweep-modes", type=lambda s: s.split(","), default=None,
                   help=f"sweep only these dot modes (of {','.join(SWEEP_RANKS)})")
    p.add_argument("--sweep-ranks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="sweep only these ranks (of each mode's SWEEP_RANKS)")
    p.add_argument("--sweep-tiles", default=None,
                   help="tile shapes BMxBKxWARPSxSTAGES,... instead of SWEEP_SHAPES")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"device": device, "machine": machine_info(device), "command": " ".join(sys.argv),
              "alpha": ALPHA, "grid": [], "sweep": [], "survival": []}
    result["machine"]["loadavg_start"] = os.getloadavg()
    print(json.dumps(result["machine"]), flush=True)
    run = timer(device)
    if device == "cuda":
        result["machine"].update(gpu_ceilings(run))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"bench_kernels_{device}.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        with open(path[:-5] + ".md", "w") as f:
            f.write(markdown(result) + "\n")

    result["accuracy"] = []
    accuracy(device, result["accuracy"])
    if args.survival_updates > 0:
        survival(args, device, result["survival"])
    save()
    tuned = None
    if args.sweep and device == "cuda" and triton_available():
        tuned = sweep_configs(device, timer(device, rep_ms=40), result["sweep"],
                              time.time() + args.sweep_budget_s, modes=args.sweep_modes,
                              ranks=args.sweep_ranks,
                              tiles=[tuple(int(x) for x in t.split("x")) for t in args.sweep_tiles.split(",")]
                              if args.sweep_tiles else None)
        result["tuned"] = {mode: [(rank, c.__dict__) for rank, c in pts] for mode, pts in tuned.items()}
        save()
    if not args.skip_grid:
        bench_grid(args, device, run, result["grid"], time.time() + args.budget_s, tuned)
    result["machine"]["loadavg_end"] = os.getloadavg()
    save()
    print(markdown(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
