"""Peak memory (and time) of hypernetwork training on the embedded default (not a test).

    RLEDIT_CACHE=$HOME/.cache/rledit .venv/bin/python bench/bench_training_memory.py \
        --threads 1 --out-dir bench/results

One ``SequenceTrainer.run_trajectory`` (hparams/TRAINING/RLEdit/tiny.yaml, the
world's train records, no validation) per setting of ``back_depth`` and
``loss_minibatch``, each in a fresh subprocess so that the peaks do not mix:

* baseline = the process after loading the model, the world, the tokenizer and
  building the trainer (current RSS, ``VmRSS``);
* the kernel's peak-RSS counter is then reset (``/proc/self/clear_refs`` <- 5),
  so ``VmHWM`` afterwards is the peak *during* the trajectory; ``ru_maxrss``
  (``resource.getrusage``, which cannot be reset) is recorded before and after too;
* on CUDA also ``torch.cuda.max_memory_allocated`` above the allocation at baseline.

The paraphrase/locality losses are evaluated and back-propagated one minibatch of
``loss_minibatch`` prompts at a time, so the peak should grow with
``loss_minibatch`` and not with the window length ``back_depth`` (which costs time).
Mode ``edit`` runs the same number of plain edit turns (no training) for reference.
Every setting runs ``--repeats`` times (the whole sweep again each time); the table
gives medians and ranges. Seconds are wall and process-CPU time of the trajectory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN_HPARAMS = ROOT / "hparams" / "TRAINING" / "RLEdit" / "tiny.yaml"
# (mode, back_depth, loss_minibatch); None = the YAML's value
DEFAULT_SETTINGS = "edit:-:-,train:1:64,train:5:64,train:10:64,train:10:16,train:10:4,train:1:4"


def _rss_mb() -> float:
    """Current resident set size (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(args) -> dict:
    """One setting, in this (fresh) process; returns the measurements."""
    import torch
    torch.set_num_threads(args.threads)
    try:
        import rledit_plugin  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    from rledit_plugin.compare import _peak_rss_mb, _reset_peak_rss   # VmHWM and its reset
    from rledit_plugin.core.trainer import SequenceTrainer
    from rledit_plugin.core.whitening import record_texts
    from rledit_plugin.hparams import RLEditTrainingHyperParams
    from rledit_plugin.models import load_model_and_tokenizer
    from rledit_plugin.world import build_world

    hp = RLEditTrainingHyperParams.from_hparams(TRAIN_HPARAMS)
    changes = {"device": args.device}
    if args.traj_len:
        changes["traj_len"] = args.traj_len
    if args.back_depth:
        changes["back_depth"] = args.back_depth
    if args.loss_minibatch:
        changes["loss_minibatch"] = args.loss_minibatch
    hp = dataclasses.replace(hp, **changes)
    hp.validate()
    model, tok = load_model_and_tokenizer(hp.model_name, device=args.device)
    world = build_world()
    records = world.train_records
    # key statistics from the training records, as train_hypernetwork gathers them
    texts = record_texts(records) if hp.key_whitening else None
    trainer = SequenceTrainer(model, tok, hp, progress=False, whitening_texts=texts)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        cuda_base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    rss_before = _rss_mb()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.mode == "train":
        stats = trainer.run_trajectory(records)
    else:  # the same number of plain edit turns, no training
        editor, n = trainer.editor, hp.n_edits
        with torch.no_grad():
            for t in range(hp.traj_len):
                editor.edit_rounds(records[t * n:(t + 1) * n])        # edit_steps rounds each
        editor.restore(normaliser=False)
        stats = {}
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = {
        "mode": args.mode, "key_whitening": bool(hp.key_whitening), "back_depth": hp.back_depth, "loss_minibatch": hp.loss_minibatch,
        "traj_len": hp.traj_len, "n_edits": hp.n_edits, "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mb": rss_before,
        "peak_rss_during_mb": _peak_rss_mb() if reset else None,
        "maxrss_before_mb": maxrss_before / 1024,
        "maxrss_after_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_reset_ok": reset,
        "train_stats": {k: float(v) for k, v in stats.items()},
    }
    if reset:
        out["peak_rss_increase_mb"] = out["peak_rss_during_mb"] - out["rss_before_mb"]
    out["maxrss_increase_mb"] = out["maxrss_after_mb"] - out["maxrss_before_mb"]
    if cuda:
        out["cuda_base_mb"] = cuda_base / 2**20
        out["cuda_peak_increase_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    return out


def parse_settings(text: str):
    settings = []
    for item in text.split(","):
        mode, bd, mb = item.split(":")
        if mode not in ("train", "edit"):
            raise ValueError(f"setting {item!r}: mode must be train or edit")
        settings.append((mode, None if bd == "-" else int(bd), None if mb == "-" else int(mb)))
    return settings


def run_child(args, mode, back_depth, loss_minibatch) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--threads", str(args.threads),
           "--device", args.device]
    if args.traj_len:
        cmd += ["--traj-len", str(args.traj_len)]
    if back_depth:
        cmd += ["--back-depth", str(back_depth)]
    if loss_minibatch:
        cmd += ["--loss-minibatch", str(loss_minibatch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(runs) -> list:
    """Per setting: medians (and ranges) over its repeats."""
    groups = {}
    for r in runs:
        groups.setdefault((r["mode"], r["back_depth"], r["loss_minibatch"]), []).append(r)
    out = []
    for (mode, bd, mb), rs in groups.items():
        row = {"mode": mode, "back_depth": bd, "loss_minibatch": mb, "n": len(rs),
               "traj_len": rs[0]["traj_len"], "key_whitening": rs[0]["key_whitening"]}
        for key in ("rss_before_mb", "peak_rss_increase_mb", "maxrss_increase_mb", "seconds",
                    "cpu_seconds", "cuda_peak_increase_mb"):
            values = [r[key] for r in rs if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
                row[key + "_range"] = [min(values), max(values)]
        out.append(row)
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    rows = result["summary"]
    cuda = any("cuda_peak_increase_mb" in r for r in rows)
    n = rows[0]["n"] if rows else 0
    lines = ["# Peak memory of hypernetwork training (embedded default)\n", f"    {result['command']}\n",
             f"torch {m['torch']}, {m['threads']} thread(s), {m['nproc']} CPUs, device {m['device']}; "
             f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}. "
             f"One trajectory of traj_len={rows[0]['traj_len'] if rows else '?'} batches x 20 edits "
             "(or the same number of plain edit turns) per fresh subprocess, no validation; "
             f"median [min-max] of {n} subprocesses per setting; MiB. Peak increase = VmHWM "
             "(reset before the trajectory) - VmRSS at baseline.\n",
             "| mode | back_depth | loss_minibatch | RSS at baseline | **peak RSS increase** "
             "| ru_maxrss increase | s/trajectory (wall) | CPU s/trajectory |"
             + (" CUDA max_memory_allocated increase |" if cuda else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]

    def cell(r, key, fmt):
        if key not in r:
            return "n/a"
        lo, hi = r[key + "_range"]
        return f"{r[key]:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]" if r["n"] > 1 else f"{r[key]:{fmt}}"

    for r in rows:
        train = r["mode"] == "train"
        row = (f"| {r['mode']} | {r['back_depth'] if train else '-'} | {r['loss_minibatch'] if train else '-'} "
               f"| {r['rss_before_mb']:.0f} | **{cell(r, 'peak_rss_increase_mb', '.0f')}** "
               f"| {cell(r, 'maxrss_increase_mb', '.0f')} | {cell(r, 'seconds', '.1f')} "
               f"| {cell(r, 'cpu_seconds', '.1f')} |")
        if cuda:
            row += f" {cell(r, 'cuda_peak_increase_mb', '.1f')} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help="comma list of mode:back_depth:loss_minibatch ('-' = YAML value)")
    parser.add_argument("--traj-len", type=int, default=None, help="override traj_len (YAML: 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per child")
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per setting")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="output file stem (default training_memory_<device>)")
    # child-only
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--back-depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss-minibatch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    import torch
    from bench_edit_turn import command_line   # sibling script (this folder is on sys.path)
    command = command_line(__file__)
    print(command, flush=True)
    result = {"command": command,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "nproc": os.cpu_count(), "threads": args.threads, "device": args.device,
                          "loadavg_start": os.getloadavg()},
              "hparams": str(TRAIN_HPARAMS.relative_to(ROOT)), "runs": []}
    if args.device.startswith("cuda"):
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    for rep in range(args.repeats):        # whole sweep again: load drifts affect all settings alike
        for mode, bd, mb in parse_settings(args.settings):
            r = run_child(args, mode, bd, mb)
            r["repeat"] = rep
            result["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "train_stats"}), flush=True)
    result["summary"] = summarise(result["runs"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    name = args.name or f"training_memory_{torch.device(args.device).type}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out_dir / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
