"""bf16 weights over a 2,000-edit lifelong stream: how much of the update survives (not a test).

    RLEDIT_CACHE=$HOME/.cache/rledit .venv/bin/python bench/bench_bf16_accumulation.py

The embedded default (``embedded-tiny-gpt2``) is edited by RLEdit for
``--turns`` x ``--batch`` records of the world's eval split, once per run:

  fp32 weights            the reference (accumulate has no effect on fp32 weights)
  bf16, accumulate none   every update is rounded to bf16 on store
  bf16, accumulate fp32   fp32 residual per edited module (compensated)
  bf16, accumulate kahan  bf16 residual per edited module (compensated)

Each run is compared against its own journal: ``intended`` is the exact sum of
the journal's low-rank factors (``RLEditor.delta``, fp32; also summed in fp64 as
a check). In bf16 runs each capture sees the rounded model, so the intended
updates differ between runs; the table also says by how much they differ from
the fp32 run's.

  surviving fraction = <W_final - W_0, intended> / ||intended||^2
  relative error     = ||(W_final - W_0) - intended|| / ||intended||

plus the same for ``W + residual`` (what the compensated state tracks), a curve
every ``--curve-every`` turns, and efficacy / generalization / specificity /
specificity_vs_unedited of the final model on all edited records (teacher-forced
token accuracy; the reference for specificity_vs_unedited is the unedited model
in the same dtype). Writes ``bf16_accumulation.{json,md}`` under --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    import rledit_plugin  # noqa: F401  installed, or on PYTHONPATH
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from rledit_plugin.core.editor import RLEditor  # noqa: E402
from rledit_plugin.evaluation.metrics import capture_reference, score_records  # noqa: E402
from rledit_plugin.hparams import RLEditHyperParams  # noqa: E402
from rledit_plugin.kernels import update_survival  # noqa: E402
from rledit_plugin.models import load_model_and_tokenizer, weight_view  # noqa: E402
from rledit_plugin.world import build_world  # noqa: E402
from rledit_plugin.cpu_kernels import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

RUNS = (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "fp32"), ("bfloat16", "kahan"))
METRICS = ("efficacy", "generalization", "specificity", "specificity_vs_unedited",
           "cf_efficacy", "cf_generalization", "cf_specificity")
FALLBACK_ARCHIVE = "runs/demo/archive"
BF16_EPS = torch.finfo(torch.bfloat16).eps  # one ulp at 1.0 (2^-7)


def choose_archive(requested):
    """The hparams' archive if it exists, else the demo's trained one, else None (untrained)."""
    if requested and os.path.isdir(requested):
        return requested, "hparams"
    if os.path.isdir(FALLBACK_ARCHIVE):
        return FALLBACK_ARCHIVE, f"fallback ({requested} does not exist)"
    return None, f"none: untrained hypernetwork ({requested} and {FALLBACK_ARCHIVE} do not exist)"


def survival_of(start, weight, residual, intended):
    out = {k: v for k, v in update_survival(start, weight, intended).items()}
    if residual is not None:
        tracked = weight.double() + residual.double()
        out["tracked_rel_error"] = update_survival(start, tracked, intended)["rel_error"]
    return out


def one_run(args, dtype, accumulate, archive, records, ref_intended=None):
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model, "cpu", dtype)
    hp = RLEditHyperParams.from_hparams(args.hparams)
    hp.torch_dtype, hp.accumulate, hp.archive = dtype, accumulate, archive
    editor = RLEditor(model, tok, hp, keep_journal=True)
    names = list(editor.modules)
    start = {n: weight_view(m).detach().double().clone() for n, m in editor.modules.items()}
    stream = records[:args.turns * args.batch]
    reference = capture_reference(model, tok, stream, batch_size=args.eval_batch, max_length=args.max_length)
    pre = score_records(model, tok, stream, reference, batch_size=args.eval_batch,
                        max_length=args.max_length, generation=False) if args.pre else None

    running = {n: torch.zeros_like(start[n]) for n in names}  # fp64 sum of the journal, (d_out, d_in)
    curve, t_edit = [], 0.0
    turn_rel = {n: [] for n in names}      # ||dW_turn|| / ||W before the turn||
    below_half_ulp = {n: [] for n in names}  # share of dW_turn's entries under half a bf16 ulp of W
    for turn in range(args.turns):
        before = {n: weight_view(editor.modules[n]).detach().double().clone() for n in names}
        t0 = time.perf_counter()
        editor.edit(stream[turn * args.batch:(turn + 1) * args.batch])
        t_edit += time.perf_counter() - t0
        last = editor.journal[-1]
        for n in names:
            part = (last.keys[n].double().t() @ last.coeffs[n].double()).t()
            running[n] += part
            turn_rel[n].append(float(part.norm() / before[n].norm()))
            half_ulp = 0.5 * BF16_EPS * before[n].abs()
            below_half_ulp[n].append(float((part.abs() < half_ulp).double().mean()))
        if (turn + 1) % args.curve_every == 0 or turn + 1 == args.turns:
            point = {"edits": (turn + 1) * args.batch}
            for n in names:
                s = survival_of(start[n], weight_view(editor.modules[n]).detach(), editor._residuals[n],
                                running[n])
                point[n] = s
            curve.append(point)

    t0 = time.perf_counter()
    post = score_records(model, tok, stream, reference, batch_size=args.eval_batch,
                         max_length=args.max_length, generation=False)
    t_score = time.perf_counter() - t0
    modules = {}
    for n in names:
        w = weight_view(editor.modules[n]).detach()
        intended = editor.delta(n).t().double()              # journal sum (fp32), (d_out, d_in)
        s = survival_of(start[n], w, editor._residuals[n], intended)
        s["fp32_journal_vs_fp64_rel"] = float((intended - running[n]).norm() / running[n].norm())
        s["intended_rel_to_w0"] = float(intended.norm() / start[n].norm())
        s["applied_rel_to_w0"] = float((w.double() - start[n]).norm() / start[n].norm())
        s["turn_update_rel_median"] = statistics.median(turn_rel[n])
        s["turn_update_rel_min"] = min(turn_rel[n])
        s["turn_entries_below_half_bf16_ulp_median"] = statistics.median(below_half_ulp[n])
        if ref_intended is not None:
            s["intended_vs_fp32_run_rel"] = float((intended - ref_intended[n]).norm() / ref_intended[n].norm())
        modules[n] = s
    row = {"weights": dtype, "accumulate": accumulate, "edits": len(stream),
           "residual_dtype": {n: (None if r is None else str(r.dtype).replace("torch.", ""))
                              for n, r in editor._residuals.items()},
           "modules": modules, "curve": curve,
           "post": {k: post.get(k) for k in METRICS}, "pre": pre and {k: pre.get(k) for k in METRICS},
           "seconds_editing": t_edit, "seconds_scoring_post": t_score}
    intended_now = {n: editor.delta(n).t().double() for n in names}
    return row, intended_now


def markdown(result):
    info = result["machine"]
    lines = [f"Machine: {info['cpu']} ({info['nproc']} cores), torch {info['torch']}, Python {info['python']}, "
             f"{info['torch_threads']} torch thread, load average at start {info['loadavg_start']}.",
             f"Model {result['model']}, hparams {result['hparams']}, archive: {result['archive']} "
             f"({result['archive_source']}); stream {result['turns']} turns x {result['batch']} edits "
             f"of the eval split; {result['seconds_total']:.0f} s in all.", "",
             "| weights | accumulate | survived fraction | rel. error of W | rel. error of W + residual "
             "| ‖intended‖/‖W0‖ | per-turn ‖ΔW‖/‖W‖ (median) | entries < ½ bf16 ulp (median) "
             "| intended vs fp32 run | efficacy | generalization | specificity "
             "| spec. vs unedited | s editing |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        for n, s in r["modules"].items():
            tracked = f"{s['tracked_rel_error']:.2e}" if "tracked_rel_error" in s else "-"
            vs = f"{s['intended_vs_fp32_run_rel']:.3f}" if "intended_vs_fp32_run_rel" in s else "-"
            p = r["post"]
            lines.append(f"| {r['weights']} | {r['accumulate']} | {s['fraction']:.4f} | {s['rel_error']:.4f} | "
                         f"{tracked} | {s['intended_rel_to_w0']:.3f} | {s['turn_update_rel_median']:.4f} | "
                         f"{100 * s['turn_entries_below_half_bf16_ulp_median']:.1f}% | {vs} | {p['efficacy']:.3f} | "
                         f"{p['generalization']:.3f} | {p['specificity']:.3f} | "
                         f"{p['specificity_vs_unedited']:.3f} | {r['seconds_editing']:.1f} |")
    lines += ["", "Surviving fraction along the stream (first edited module):", "",
              "| edits | " + " | ".join(f"{r['weights']}/{r['accumulate']}" for r in result["runs"]) + " |",
              "|---:|" + "---:|" * len(result["runs"])]
    for i, point in enumerate(result["runs"][0]["curve"]):
        cells = []
        for r in result["runs"]:
            p = r["curve"][i]
            s = next(v for k, v in p.items() if k != "edits")
            cells.append(f"{s['fraction']:.4f} ({s['rel_error']:.3f})")
        lines.append(f"| {point['edits']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: surviving fraction (relative error of W)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded-tiny-gpt2")
    p.add_argument("--hparams", default="hparams/RLEdit/tiny.yaml")
    p.add_argument("--archive", default=None,
                   help="hypernetwork archive; default: the hparams' one, else runs/demo/archive, else none")
    p.add_argument("--turns", type=int, default=100)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--curve-every", type=int, default=10)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--no-pre", dest="pre", action="store_false", help="skip scoring the unedited model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    hp = RLEditHyperParams.from_hparams(args.hparams)
    if args.archive is not None:
        archive, source = (None, "none requested") if args.archive.lower() == "none" else (args.archive, "--archive")
    else:
        archive, source = choose_archive(hp.archive)
    print(f"archive: {archive} ({source})", flush=True)
    records = build_world().eval_records
    need = args.turns * args.batch
    if len(records) < need:
        raise SystemExit(f"the eval split has {len(records)} records, the stream needs {need}")

    t0 = time.perf_counter()
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cpu": _cpu_name(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
              "model": args.model, "hparams": args.hparams, "archive": archive, "archive_source": source,
              "turns": args.turns, "batch": args.batch, "runs": []}
    ref_intended = None
    for dtype, accumulate in RUNS:
        row, intended = one_run(args, dtype, accumulate, archive, records, ref_intended)
        if dtype == "float32":
            ref_intended = intended
        result["runs"].append(row)
        s = next(iter(row["modules"].values()))
        print(f"{dtype} {accumulate}: fraction {s['fraction']:.4f}, rel_error {s['rel_error']:.4f}, "
              f"efficacy {row['post']['efficacy']:.3f}, {row['seconds_editing']:.1f} s editing", flush=True)
    result["seconds_total"] = time.perf_counter() - t0
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "bf16_accumulation.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    with open(path[:-5] + ".md", "w") as f:
        f.write(markdown(result) + "\n")
    print(markdown(result))
    print(f"wrote {path}")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


if __name__ == "__main__":
    main()
