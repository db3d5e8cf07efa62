"""Training MEND's hypernetwork for the baselines with EasyEdit's own ``EditTrainer``.

The records are written as local ZsRE-format files (one paraphrase and one
locality prompt each, as EasyEdit's ``ZsreDataset`` reads them); the archive it
saves is loaded for editing by :class:`.easyedit_baselines.EasyEditBaseline`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .easyedit_baselines import (device_for_host, ensure_easyedit, mend_archive_loading,
                                 on_this_device, plain_inputs, quiet)

_MEND_ARCHITECTURE = ("inner_params", "rank", "n_hidden", "hidden_dim", "init", "norm", "combine",
                      "x_only", "delta_only", "act", "mlp_class", "shared", "one_sided")


def check_mend_architecture(hparams, training_yaml: str) -> None:
    """The editing YAML must describe the network the training YAML built (else the archive
    loads into the wrong shapes)."""
    import yaml
    with open(training_yaml, encoding="utf-8") as fh:
        trained = yaml.safe_load(fh)
    differ = [k for k in _MEND_ARCHITECTURE if k in trained and trained[k] != getattr(hparams, k, None)]
    if differ:
        raise ValueError(f"MEND editing hparams differ from {training_yaml} in {', '.join(differ)}: "
                         "the archive would not fit")


def _single_fields(records) -> list:
    import dataclasses
    out = []
    for r in records:
        if not r.paraphrases or not r.locality_prompts:
            raise ValueError(f"MEND training needs a paraphrase and a locality prompt in every "
                             f"record; record {r.uid} lacks one")
        out.append(dataclasses.replace(r, paraphrases=r.paraphrases[:1],
                                       locality_prompts=r.locality_prompts[:1],
                                       locality_answers=r.locality_answers[:1]))
    return out


def train_mend(model_dir: str, training_yaml: str, train_records, val_records, work_dir: str, *,
               overrides: Optional[Dict[str, Any]] = None, log: Optional[str] = None) -> Dict[str, Any]:
    """Train MEND's hypernetwork with EasyEdit's ``EditTrainer`` on local records.

    ``model_dir``: a ``save_pretrained`` directory (the trainer loads the model
    itself); ``training_yaml``: EasyEdit's ``MENDTrainingHparams`` fields;
    ``overrides``: fields to replace (e.g. ``max_iters``).  The records are
    written as ZsRE files under ``work_dir`` and read by EasyEdit's
    ``ZsreDataset``.  Returns ``{"archive", "seconds", "results"}``, ``results``
    being the trainer's final validation (its ``results.json``).
    """
    import json

    from ..data.writers import write_zsre
    easyeditor = ensure_easyedit()
    work = Path(work_dir).resolve()      # the trainer runs with work as its cwd
    work.mkdir(parents=True, exist_ok=True)
    hp = easyeditor.MENDTrainingHparams.from_hparams(str(training_yaml))
    for key, value in (overrides or {}).items():
        if not hasattr(hp, key):
            raise ValueError(f"MEND training has no field {key!r}")
        setattr(hp, key, value)
    hp.model_name = hp.tokenizer_name = str(model_dir)
    hp.results_dir = str(work)
    hp.device = device_for_host(hp.device)
    # The release runs round(max_iters / (len(train) / batch_size)) epochs: with fewer
    # iterations than half an epoch that is 0 and nothing trains.  Records past
    # max_iters batches are never seen anyway, so keep only those.
    train_records = list(train_records)[:max(1, hp.max_iters) * hp.batch_size]
    # EasyEdit's ZsreDataset reads one string per field (rephrase, loc): keep the first
    train_records, val_records = _single_fields(train_records), _single_fields(val_records)
    train_file, val_file = write_zsre(train_records, work / "zsre_train.json"), \
        write_zsre(val_records, work / "zsre_val.json")
    train_set = easyeditor.ZsreDataset(str(train_file), config=hp)
    val_set = easyeditor.ZsreDataset(str(val_file), config=hp)
    for ds in (train_set, val_set):       # MEND aligns labels from the right
        plain_inputs(ds.tok)
        ds.tok.padding_side = "left"
        if ds.tok.pad_token_id is None:
            ds.tok.pad_token = ds.tok.eos_token
    start = time.perf_counter()
    cwd = os.getcwd()
    try:
        os.chdir(work)                    # the trainer writes ./logs and friends
        with quiet(log), on_this_device():
            trainer = easyeditor.EditTrainer(config=hp, train_set=train_set, val_set=val_set)
            with mend_archive_loading(trainer.model.model):
                trainer.run()
    finally:
        os.chdir(cwd)
    archive = Path(trainer.save_path)
    if not archive.is_file():
        raise RuntimeError(f"MEND training wrote no archive at {archive} (the trainer saves at "
                           f"each val_interval={hp.val_interval}; max_iters={hp.max_iters})")
    results_file = work / "results.json"
    results = json.loads(results_file.read_text())["results"] if results_file.is_file() else None
    return {"archive": str(archive), "seconds": time.perf_counter() - start, "results": results,
            "max_iters": hp.max_iters}
