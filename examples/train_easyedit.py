"""Train RLEdit's hypernetwork the EasyEdit way: a training YAML, EasyEdit's ZsreDataset, a trainer.

    python examples/train_easyedit.py [--hparams hparams/TRAINING/RLEdit/tiny.yaml] [--results-dir DIR]

Offline on the embedded default: the synthetic world's ZsRE files are written to
runs/easyedit/world and loaded with EasyEdit's own ``ZsreDataset``; the model named
in the YAML (``embedded-tiny-gpt2``: the cached tiny LM) is trained on.  The
archive lands in the YAML's ``results_dir`` (the ``archive:`` of
hparams/RLEdit/tiny.yaml, which ``edit_with_easyedit.py`` and
``sequential_easyedit.py`` use).  It mirrors EasyEdit's MEND recipe::

    trainer = EditTrainer(config=training_hparams, train_set=train_ds, val_set=eval_ds)
    trainer.run()

with ``RLEditTrainer`` in place of ``EditTrainer`` (RLEdit trains along whole
edit sequences, which EasyEdit's per-batch loop cannot express).
"""
import argparse
import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRAINING = os.path.join(REPO, "hparams", "TRAINING", "RLEdit", "tiny.yaml")


def train(hparams_path: str = DEFAULT_TRAINING, results_dir=None, trajectories=None,
          world_dir: str = "runs/easyedit/world", progress: bool = True) -> dict:
    from rledit_plugin.hosts.easyedit import RLEditTrainer, import_easyeditor
    from rledit_plugin.hparams import RLEditTrainingHyperParams
    from rledit_plugin.world import build_world, write_world_files

    easyeditor = import_easyeditor()             # stand-ins + RLEdit registration
    files = write_world_files(build_world(), world_dir)
    hparams = RLEditTrainingHyperParams.from_hparams(hparams_path)
    if results_dir is not None:
        hparams.results_dir = results_dir
    if trajectories is not None:
        hparams.n_trajectories = trajectories
    train_ds = easyeditor.ZsreDataset(files["zsre_train.json"])
    val_ds = easyeditor.ZsreDataset(files["zsre_val.json"])
    start = time.perf_counter()
    trainer = RLEditTrainer(config=hparams, train_set=train_ds, val_set=val_ds, progress=progress)
    _, history = trainer.run()
    return {"archive": hparams.results_dir, "seconds": round(time.perf_counter() - start, 1),
            "train_records": len(train_ds), "val_records": len(val_ds),
            "final": history[-1] if history else None}


def ensure_archive(archive: str, hparams_path: str = DEFAULT_TRAINING) -> str:
    """``archive``, trained first when missing (used by the other examples)."""
    if not (os.path.isdir(archive) and os.listdir(archive)):
        print(f"[example] no archive at {archive}: training one (examples/train_easyedit.py) ...",
              flush=True)
        train(hparams_path, results_dir=archive)
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hparams", default=DEFAULT_TRAINING, help="training YAML")
    parser.add_argument("--results-dir", help="archive directory (default: the YAML's results_dir)")
    parser.add_argument("--trajectories", type=int, help="override n_trajectories")
    args = parser.parse_args()
    summary = train(args.hparams, args.results_dir, args.trajectories)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
