"""Markdown report of bench/bench_kernels.py results (grid, sweep winners, accuracy, survival)."""


def markdown(result):
    lines = []
    info = result["machine"]
    lines.append(f"Device: {result['device']} ({info.get('gpu', info.get('cpu'))}); "
                 f"torch {info['torch']}, triton {info.get('triton', '-')}, nproc {info['nproc']}, "
                 f"torch threads {info['torch_threads']}, load average at start {info.get('loadavg_start')}.")
    ceil = {k: round(v, 1) for k, v in info.items() if k.startswith("matmul_")}
    if ceil:
        lines.append(f"Matrix-product ceilings (TFLOP/s, random data): {ceil}.")
    lines.append("")
    lines.append("GB/s and % of copy count W read + written once; '% own floor' adds the residual's bytes.")
    lines.append("")
    lines.append("| shape | dtype | rank | method | median ms | GB/s | % of copy | % own floor | x naive |")
    lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in result["grid"]:
        xn = "" if r["vs_naive"] is None else f"{r['vs_naive']:.2f}"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['rank'] or '-'} | {r['method']} | {r['ms']:.3f} | "
                     f"{r['gbs']:.1f} | {r['pct_copy']:.0f} | {r.get('pct_own_floor', 100.0):.0f} | {xn} |")
    if result.get("tuned"):
        lines += ["", "Tile shape used per dot mode and rank (best of the sweep):", "",
                  "| mode | rank | BLOCK_M | BLOCK_K | BLOCK_N | warps | stages | W early | ms | % of copy |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in result["sweep"]:
            c = r["config"]
            if c in [cfg for rank, cfg in result["tuned"].get(r["mode"], []) if rank == r["rank"]]:
                lines.append(f"| {r['mode']} | {r['rank']} | {c['block_m']} | {c['block_k']} | {c['block_n']} | "
                             f"{c['num_warps']} | {c['num_stages']} | {c['early_w']} | {r['ms']:.3f} | "
                             f"{r['pct_copy']:.0f} |")
    if result.get("accuracy"):
        lines += ["", "Accuracy of the applied delta (fp32 W from 0, 1024x2048), against fp64:", "",
                  "| method | rank | rel. error | max err / (abs(L) @ abs(R)) |", "|---|---:|---:|---:|"]
        for r in result["accuracy"]:
            lines.append(f"| {r['method']} | {r['rank']} | {r['rel_error']:.2e} | "
                         f"{r['max_err_over_abs_product']:.2e} |")
    if result.get("survival"):
        lines += ["", "| weights | accumulate | updates | shape | intended ‖ΔW‖/‖W‖ | survived fraction | "
                  "rel. error of W | rel. error of W + residual | ms/update |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in result["survival"]:
            lines.append(f"| {r['dtype']} | {r['accumulate']} | {r['updates']} | {r['shape']} | "
                         f"{r['intended_rel']:.4f} | {r['fraction']:.4f} | {r['rel_error']:.4f} | "
                         f"{r['tracked_rel_error']:.2e} | {r['ms_per_update']:.2f} |")
    return "\n".join(lines)
