"""A lifelong stream of RLEdit edits driven through EasyEdit's BaseEditor.

    python examples/sequential_easyedit.py [--archive DIR] [--turns 10] [--batch 10]

TURNS x BATCH held-out facts of the embedded world are written in, batch after
batch, with ``batch_edit``: edits accumulate (the PyPI release keeps them when
``keep_original_weight=False``; GitHub HEAD with ``sequential_edit=True``), and
the one RLEditor behind the model keeps its lifelong normaliser state between
calls.  After the whole stream every edited fact is scored on the final model
(the published protocol), by EasyEdit's ``compute_edit_quality`` and by
rledit_plugin's metrics, which agree.  The last line is a JSON summary.
"""
import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hparams", default=os.path.join(REPO, "hparams", "RLEdit", "tiny.yaml"))
    parser.add_argument("--archive", help="trained hypernetwork (default: the YAML's archive)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    import torch
    from tqdm import tqdm

    from rledit_plugin.data.writers import record_to_request
    from rledit_plugin.evaluation.metrics import capture_reference, score_records
    from rledit_plugin.hosts import easyedit as host
    from rledit_plugin.hparams import RLEditHyperParams
    from rledit_plugin.models import load_model_and_tokenizer
    from rledit_plugin.world import build_world
    from train_easyedit import ensure_archive

    hparams = RLEditHyperParams.from_hparams(args.hparams)
    archive = ensure_archive(args.archive or hparams.archive)
    easyeditor = host.import_easyeditor()
    flavour = host.host_flavour()
    if flavour == "release" and not torch.cuda.is_available():
        host.enable_cpu_shim()
    keep_edits = {"sequential_edit": True} if flavour == "head" else {"keep_original_weight": False}

    hparams.archive, hparams.batch_size = archive, args.batch
    model, tok = load_model_and_tokenizer(hparams.model_name, hparams.device, hparams.torch_dtype)
    editor = host.make_editor(hparams, model, tok)

    records = build_world().eval_records[: args.turns * args.batch]
    requests = [record_to_request(r) for r in records]
    for request, record in zip(requests, records):
        request["rephrase_prompt"] = record.paraphrases[0]   # EasyEdit scores one rephrase
    reference = capture_reference(model, tok, records)     # the unedited model, for locality

    start = time.perf_counter()
    for turn in tqdm(range(args.turns), desc="stream"):
        chunk = requests[turn * args.batch:(turn + 1) * args.batch]
        editor.batch_edit(prompts=[q["prompt"] for q in chunk],
                          target_new=[q["target_new"] for q in chunk],
                          ground_truth=[q["ground_truth"] for q in chunk],
                          verbose=False, **keep_edits)
    seconds = time.perf_counter() - start

    rledit = host.get_editor(model)
    theirs = [easyeditor.compute_edit_quality(model, editor.model_name, editor.hparams, tok, q,
                                              hparams.device) for q in requests]
    ours = score_records(model, tok, records, reference, generation=True)
    summary = {
        "easyedit": flavour, "archive": archive, "edits": len(requests),
        "batches_in_journal": len(rledit.journal), "stream_seconds": round(seconds, 1),
        "easyedit_metrics": {
            "rewrite_acc": round(float(np.mean([t["rewrite_acc"] for t in theirs])), 4),
            "rephrase_acc": round(float(np.mean([t["rephrase_acc"] for t in theirs])), 4)},
        "rledit_metrics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ours.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
