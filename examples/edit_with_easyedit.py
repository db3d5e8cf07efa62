"""RLEdit through EasyEdit's own BaseEditor: single edits and a batch edit, scored by EasyEdit.

    python examples/edit_with_easyedit.py [--archive DIR] [--n 20]

Offline on the embedded default (the synthetic world and its cached tiny LM).
Without ``--archive`` it uses the YAML's ``archive`` (runs/archive/tiny-gpt2),
training it first when missing (examples/train_easyedit.py).  Works with the PyPI easyeditor release
(the CPU shim is switched on when there is no CUDA) and with a GitHub checkout on
``sys.path``.  The last line printed is one JSON object: the single-edit means
over the requests (``pre_rewrite_acc``, ``post_rewrite_acc``, ``post_rephrase_acc``,
``locality_acc``) plus the batch edit's means under ``batch``.
"""
import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mean(values):
    values = [float(np.mean(v)) for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hparams", default=os.path.join(REPO, "hparams", "RLEdit", "tiny.yaml"))
    parser.add_argument("--archive", help="trained hypernetwork (default: the YAML's archive)")
    parser.add_argument("--n", type=int, default=20, help="requests (held-out world records)")
    args = parser.parse_args()
    logging.disable(logging.INFO)                 # EasyEdit logs every request at INFO

    import torch

    from rledit_plugin.data.writers import record_to_request
    from rledit_plugin.hosts import easyedit as host
    from rledit_plugin.hparams import RLEditHyperParams
    from rledit_plugin.models import load_model_and_tokenizer
    from rledit_plugin.world import build_world
    from train_easyedit import ensure_archive

    hparams = RLEditHyperParams.from_hparams(args.hparams)
    archive = ensure_archive(args.archive or hparams.archive)
    host.import_easyeditor()
    flavour = host.host_flavour()
    if flavour == "release" and not torch.cuda.is_available():
        host.enable_cpu_shim()                    # the release hard-codes cuda:{device}

    hparams.archive = archive
    model, tok = load_model_and_tokenizer(hparams.model_name, hparams.device, hparams.torch_dtype)
    editor = host.make_editor(hparams, model, tok)

    records = build_world().eval_records[: args.n]
    requests = [record_to_request(r) for r in records]
    prompts = [q["prompt"] for q in requests]
    targets = [q["target_new"] for q in requests]
    truths = [q["ground_truth"] for q in requests]
    rephrases = [r.paraphrases[0] for r in records]      # EasyEdit scores one rephrase per request
    locality = {"neighborhood": {"prompt": [r.locality_prompts[0] for r in records],
                                 "ground_truth": [r.locality_answers[0] for r in records]}}
    # Restore after each edit: the release via keep_original_weight, HEAD by default.
    restore = {"keep_original_weight": True} if flavour == "release" else {}

    # 1. single edits: each request alone on the unedited model
    editor.hparams.batch_size = 1
    single, _, _ = editor.edit(prompts=prompts, target_new=targets, ground_truth=truths,
                               rephrase_prompts=rephrases, locality_inputs=locality,
                               verbose=False, **restore)

    # 2. one batch edit of all requests (the release's edit() left batch_size at 1)
    editor.hparams.batch_size = len(requests)
    batch_args = dict(prompts=prompts, target_new=targets, ground_truth=truths,
                      rephrase_prompts=rephrases, verbose=False, **restore)
    if flavour == "head":   # the release passes batch_edit's locality into the wrong parameters
        batch_args["locality_inputs"] = locality
    batch, _, _ = editor.batch_edit(**batch_args)

    summary = {
        "easyedit": flavour, "archive": archive, "requests": len(requests),
        "pre_rewrite_acc": mean(m["pre"]["rewrite_acc"] for m in single),
        "post_rewrite_acc": mean(m["post"]["rewrite_acc"] for m in single),
        "post_rephrase_acc": mean(m["post"]["rephrase_acc"] for m in single),
        "locality_acc": mean(m["post"]["locality"]["neighborhood_acc"] for m in single),
        "batch": {
            "pre_rewrite_acc": mean(m["pre"]["rewrite_acc"] for m in batch),
            "post_rewrite_acc": mean(m["post"]["rewrite_acc"] for m in batch),
            "post_rephrase_acc": mean(m["post"]["rephrase_acc"] for m in batch),
            "locality_acc": mean(m["post"].get("locality", {}).get("neighborhood_acc") for m in batch),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
