"""Edit-turn cost relative to one forward + backward of the same batch (not a test).

    RLEDIT_CACHE=$HOME/.cache/rledit .venv/bin/python bench/bench_edit_turn.py \
        --threads 1 --repeats 15 --out-dir bench/results

Issue 3's bar: time of one RLEdit edit turn divided by one plain forward +
backward of the same teacher-forced batch, goal <= 1.3.

(a) edit turn  = ``RLEditor.compute_update(records)`` + ``RLEditor.apply(update)``,
    ``edit_steps`` times (``RLEditor.edit_rounds``; the YAML's value), on 20 held-out records of the synthetic world (tokenisation included, as the
    editor does it); the editor is restored (weights and normaliser) between
    repeats, untimed, so every repeat is the same first turn.
(b) fwd+bwd    = one forward of the pre-tokenised ``edit_batch`` of the same
    records, answer-token cross-entropy, ``loss.backward()``. Two variants:
    ``edited`` (only the edited weights require grad: what fine-tuning those
    modules costs, the natural baseline) and ``all`` (every weight requires grad).

Both run in eval mode (no dropout), one pass over the 20 records (the editor's
``edit_minibatch`` is 20). After a warm-up the three measurements are interleaved
(rotating order each repeat) so machine load affects them alike; medians are
reported. A separate, instrumented replica of the edit turn gives the breakdown
(tokenise, capture, hypernetwork, solve, apply); it is checked once to produce
the same update as ``compute_update``.

Setups: ``embedded`` (the cached tiny GPT-2 of the world, hparams/RLEdit/tiny.yaml
with archive=None: an untrained hypernetwork costs the same as a trained one) and
``gpt2-small-shape`` (random-init GPT-2, 12 layers, d_model 768, d_ff 3072, the
world tokenizer's vocabulary, editing the c_proj of layers 5 and 6).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

import torch

try:
    import rledit_plugin  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from rledit_plugin.core.capture import answer_token_loss, capture  # noqa: E402
from rledit_plugin.core.editor import RLEditor  # noqa: E402
from rledit_plugin.core.solve import factor_gram, ridge_dual  # noqa: E402
from rledit_plugin.core.whitening import record_answer_pairs, record_texts  # noqa: E402
from rledit_plugin.data.records import edit_batch  # noqa: E402
from rledit_plugin.hparams import RLEditHyperParams  # noqa: E402
from rledit_plugin.kernels import apply_low_rank_  # noqa: E402
from rledit_plugin.models import load_model_and_tokenizer, model_device, weight_view  # noqa: E402
from rledit_plugin.world import build_world  # noqa: E402
from rledit_plugin.world.tiny_lm import random_tiny_lm  # noqa: E402
from rledit_plugin.cpu_kernels import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the CPU kernels `rledit` uses: the demo's numbers on any CPU

ROOT = Path(__file__).resolve().parent.parent
TINY_HPARAMS = ROOT / "hparams" / "RLEdit" / "tiny.yaml"
PARTS = ("tokenise", "capture", "hypernet", "whiten", "solve", "apply", "memory")
CLOCKS = ("cpu", "wall")


def _now() -> Dict[str, float]:
    """Process CPU time (immune to waiting for a core on a shared machine) and wall time."""
    return {"cpu": time.process_time(), "wall": time.perf_counter()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_freed_memory() -> None:
    """Return freed heap to the OS now (glibc ``malloc_trim``), outside the timed region.

    Otherwise glibc trims lazily: the hundreds of MB of gradients a previous measurement
    freed were handed back by a ``brk`` inside the *next* measurement (measured: ~20 ms
    of system time charged to the first tokenisation after a gpt2-small backward).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def build_setup(name: str, device: str, whitening: bool = True):
    """(model, tok, hparams) of one benchmark setup; ``whitening=False`` turns key whitening off."""
    hp = RLEditHyperParams.from_hparams(TINY_HPARAMS)
    hp = dataclasses.replace(hp, archive=None, device=device,
                             key_whitening=hp.key_whitening and whitening)
    model, tok = load_model_and_tokenizer("embedded-tiny-gpt2", device=device)
    if name == "gpt2-small-shape":
        # same tokenizer, a gpt2-small-shaped random model (untied head, 64 positions)
        model, tok = random_tiny_lm(tok=tok, arch="gpt2", d_model=768, n_layer=12, n_head=12,
                                    d_ff=3072)
        model = model.to(device)
        hp = dataclasses.replace(hp, inner_params=["transformer.h.5.mlp.c_proj",
                                                   "transformer.h.6.mlp.c_proj"])
    elif name != "embedded":
        raise ValueError(f"unknown setup {name!r}")
    hp.validate()
    return model, tok, hp


def edit_turn(editor: RLEditor, records) -> None:
    editor.edit_rounds(records)      # edit_steps rounds of compute_update + apply


def edit_turn_without_prefix_reuse(editor: RLEditor, records) -> None:
    """The same turn with every round running the whole forward (``reuse_prefix: false``)."""
    editor.hparams.reuse_prefix = False
    try:
        editor.edit_rounds(records)
    finally:
        editor.hparams.reuse_prefix = True


def edit_turn_parts(editor: RLEditor, records, times: Dict[str, Dict[str, float]]):
    """The steps of compute_update + apply, timed one by one (same calls, same order).

    ``times[clock][part]`` accumulates seconds (a part met twice, e.g. per module, adds up).
    """
    hp, dev = editor.hparams, model_device(editor.model)
    last = [_now()]

    def lap(part):
        _sync(dev)
        now = _now()
        for c in CLOCKS:
            times.setdefault(c, {})
            times[c][part] = times[c].get(part, 0.0) + now[c] - last[0][c]
        last[0] = now

    batch = edit_batch(editor.tok, records, hp.max_length, device=dev)
    lap("tokenise")
    cap = capture(editor.model, editor.modules, batch, minibatch=hp.edit_minibatch)
    lap("capture")
    coeffs, right, grams = {}, {}, {}
    with torch.no_grad():
        for name in editor.modules:
            k, g = cap.keys[name], cap.grads[name]
            if hp.lifelong_norm:
                editor.hypernet.update_norm(name, k, g)
            d = editor.hypernet.values(name, k, g)
            lap("hypernet")
            if editor.memory is not None:       # K P and its Gram matrix, then the dual solve
                right[name], grams[name] = editor.memory.factors(name, k)
                lap("whiten")
                coeffs[name] = factor_gram(grams[name], editor.hypernet.lam(name)).solve(d)
                lap("solve")
                continue
            s = editor.hypernet.whitening(name)
            k_solve = k if s is None else k @ s.to(k.dtype)
            lap("whiten")
            coeffs[name] = ridge_dual(k_solve, d, editor.hypernet.lam(name), return_factor=True)[0]
            lap("solve")
            right[name] = k if s is None else k_solve @ s.to(k.dtype)
            lap("whiten")
        for name, module in editor.modules.items():
            apply_low_rank_(weight_view(module), coeffs[name].t().contiguous(), right[name], 1.0,
                            residual=editor._residuals[name], path=hp.kernel_path)
        lap("apply")
        if editor.memory is not None:           # once per batch, after its last round
            for name in editor.modules:
                editor.memory.add(name, cap.keys[name], right[name], grams[name])
            lap("memory")
    return coeffs, cap.n_rows


def make_fwd_bwd(model, modules, batch, edited_only: bool):
    """(prepare, run): prepare (untimed) sets which weights require grad; run is fwd + bwd."""
    params = list(model.parameters())
    wanted = ({id(m.weight) for m in modules.values()} if edited_only else {id(p) for p in params})

    def prepare():
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in wanted)

    def run():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        answer_token_loss(logits, batch["labels"]).backward()
    return prepare, run


def check_replica(editor: RLEditor, records) -> float:
    """Max abs difference between the replica's coefficients and compute_update's."""
    editor.restore()
    reference = editor.compute_update(records).coeffs
    editor.restore()
    replica, _ = edit_turn_parts(editor, records, {})
    editor.restore()
    return max(float((reference[n] - replica[n]).abs().max()) for n in reference)


def bench_setup(name: str, device: str, n_records: int, repeats: int, warmup: int,
                whitening: bool = True, whitening_records: int = 200) -> dict:
    model, tok, hp = build_setup(name, device, whitening)
    model.eval()
    world = build_world()
    records = world.eval_records[:n_records]
    # key statistics as `rledit train` gathers them (record_texts of training records); a
    # subset: the statistics' quality does not change the cost of a turn
    texts = record_texts(world.train_records[:whitening_records]) if hp.key_whitening else None
    pairs = record_answer_pairs(world.train_records[:whitening_records]) if hp.key_whitening else None
    editor = RLEditor(model, tok, hp, keep_journal=False, whitening_texts=texts, whitening_pairs=pairs)
    dev = model_device(model)
    batch = edit_batch(tok, records, hp.max_length, device=dev)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    replica_err = check_replica(editor, records)

    timers: Dict[str, tuple] = {
        "edit_turn": (lambda: None, lambda: edit_turn(editor, records)),
        "fwd_bwd_edited": make_fwd_bwd(model, editor.modules, batch, edited_only=True),
        "fwd_bwd_all": make_fwd_bwd(model, editor.modules, batch, edited_only=False),
    }
    if hp.edit_steps > 1 and hp.reuse_prefix:   # what later rounds' prefix reuse saves, same run
        timers["edit_turn_no_reuse"] = (lambda: None, lambda: edit_turn_without_prefix_reuse(editor, records))
    samples = {c: {k: [] for k in timers} for c in CLOCKS}
    parts = {c: {p: [] for p in PARTS} for c in CLOCKS}
    n_rows = 0
    order = list(timers) + ["parts"]
    for r in range(warmup + repeats):
        rot = order[r % len(order):] + order[:r % len(order)]   # rotate so no one always goes first
        for key in rot:
            editor.restore()                                    # untimed: same first turn each time
            for p in model.parameters():
                p.grad = None
            _release_freed_memory()
            _sync(dev)
            if key == "parts":
                t: Dict[str, Dict[str, float]] = {}
                _, n_rows = edit_turn_parts(editor, records, t)
                if r >= warmup:
                    for c in CLOCKS:
                        for p in PARTS:
                            parts[c][p].append(t[c].get(p, 0.0))
                continue
            prepare, run = timers[key]
            prepare()
            _release_freed_memory()
            _sync(dev)
            start = _now()
            run()
            _sync(dev)
            end = _now()
            if r >= warmup:
                for c in CLOCKS:
                    samples[c][key].append(end[c] - start[c])
    editor.restore()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(flags[id(p)])

    out = {
        "setup": name,
        "model": {"n_layer": model.config.n_layer, "d_model": model.config.n_embd,
                  "d_ff": model.config.n_inner, "vocab": model.config.vocab_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "edited_modules": list(editor.modules),
        "hypernet": {"rank": hp.rank, "n_blocks": hp.n_blocks},
        "key_whitening": bool(hp.key_whitening),
        "edit_steps": int(hp.edit_steps),
        "whitening_texts": len(texts) if texts else 0,
        "n_records": len(records), "answer_rows": n_rows,
        "batch_shape": list(batch["input_ids"].shape),
        "repeats": repeats, "warmup": warmup,
        "replica_max_abs_diff": replica_err,
    }
    for c in CLOCKS:
        med = {k: statistics.median(v) * 1e3 for k, v in samples[c].items()}
        part_med = {p: statistics.median(v) * 1e3 for p, v in parts[c].items()}
        out[c] = {
            "median_ms": med,
            "breakdown_median_ms": part_med,
            "breakdown_sum_ms": sum(part_med.values()),
            "ratio_edited": med["edit_turn"] / med["fwd_bwd_edited"],
            "ratio_all": med["edit_turn"] / med["fwd_bwd_all"],
            "ratio_edited_no_reuse": med.get("edit_turn_no_reuse", float("nan")) / med["fwd_bwd_edited"],
            "ratio_edited_without_tokenise": (med["edit_turn"] - hp.edit_steps * part_med["tokenise"])
                                             / med["fwd_bwd_edited"],
            "samples_ms": {k: [round(x * 1e3, 3) for x in v] for k, v in samples[c].items()},
        }
    return out


def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor() or "?"
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _onoff(setup: dict) -> str:
    return "on" if setup["key_whitening"] else "off"


def markdown(result: dict, command: str) -> str:
    m = result["machine"]
    lines = ["# Edit turn vs forward+backward\n", f"    {command}\n",
             f"torch {m['torch']}, {m['torch_threads']} thread(s), {m['nproc']} CPUs ({m.get('cpu', '?')}), "
             f"device {m['device']}; load average at start {m.get('loadavg_start')}, at end "
             f"{m.get('loadavg_end')}. Milliseconds, medians of "
             + ", ".join(f"{s['repeats']} ({s['setup']})" for s in result["setups"])
             + " interleaved repeats; `cpu` = process CPU time (what a shared machine cannot inflate), "
             "`wall` = wall clock. Ratios: edit turn / fwd+bwd.\n",
             "| setup | key whitening | clock | edited | rows | edit turn | fwd+bwd (edited W) | fwd+bwd (all W) "
             "| **ratio (edited W)** | ratio (all W) | ratio w/o tokenise (edited W) "
             "| edit turn, no prefix reuse | ratio, no prefix reuse |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["setups"]:
        for c in CLOCKS:
            r, med = s[c], s[c]["median_ms"]
            lines.append(f"| {s['setup']} | {_onoff(s)} | {c} | {len(s['edited_modules'])} x c_proj | {s['answer_rows']} "
                         f"| {med['edit_turn']:.2f} | {med['fwd_bwd_edited']:.2f} | {med['fwd_bwd_all']:.2f} "
                         f"| **{r['ratio_edited']:.2f}** | {r['ratio_all']:.2f} "
                         f"| {r['ratio_edited_without_tokenise']:.2f} "
                         f"| {med.get('edit_turn_no_reuse', float('nan')):.2f} | {r['ratio_edited_no_reuse']:.2f} |")
    lines += ["", "Breakdown of the edit turn (instrumented replica, medians, ms):", "",
              "| setup | key whitening | clock | " + " | ".join(PARTS) + " | sum |",
              "|---|---|---|" + "---:|" * (len(PARTS) + 1)]
    for s in result["setups"]:
        for c in CLOCKS:
            b = s[c]["breakdown_median_ms"]
            lines.append(f"| {s['setup']} | {_onoff(s)} | {c} | " + " | ".join(f"{b[p]:.2f}" for p in PARTS)
                         + f" | {s[c]['breakdown_sum_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def command_line(script: str = __file__) -> str:
    """How this run was started (interpreter relative to the repo when it is the .venv's)."""
    cache = os.environ.get("RLEDIT_CACHE")
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "rledit")
    env = "" if cache is None else (
        "RLEDIT_CACHE=$HOME/.cache/rledit " if os.path.abspath(cache) == home_cache else f"RLEDIT_CACHE={cache} ")
    python = sys.executable
    if python.startswith(str(ROOT)):
        python = os.path.relpath(python, ROOT)
    return env + " ".join([python, os.path.relpath(script, ROOT)] + sys.argv[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="embedded,gpt2-small-shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--whitening", choices=["on", "off", "both"], default="both",
                        help="key whitening (the YAML default is on); both = one run each")
    parser.add_argument("--whitening-records", type=int, default=200,
                        help="training records whose texts give the key statistics")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--repeats-embedded", type=int, default=101,
                        help="repeats for the (fast) embedded setup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="edit_turn", help="output file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = command_line()
    print(command, flush=True)
    result = {"command": command, "machine": machine_info(args.device), "setups": []}
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.whitening]
    for name in args.setups.split(","):
        for whitening in variants:
            start = time.perf_counter()
            repeats = args.repeats_embedded if name == "embedded" else args.repeats
            s = bench_setup(name, args.device, args.records, repeats, args.warmup,
                            whitening, args.whitening_records)
            s["wall_s"] = time.perf_counter() - start
            result["setups"].append(s)
            summary = {c: {k: v for k, v in s[c].items() if k != "samples_ms"} for c in CLOCKS}
            print(f"{name} whitening={s['key_whitening']} ({s['wall_s']:.0f} s, replica diff "
                  f"{s['replica_max_abs_diff']:.2e}): {json.dumps(summary)}", flush=True)
    try:
        result["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result, command)
    (args.out_dir / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
