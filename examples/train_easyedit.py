"""Train RLEdit's hypernetwork the EasyEdit way: a training YAML, EasyEdit's ZsreDataset, a trainer.

    python examples/train_easyedit.py [--hparams hparams/TRAINING/RLEdit/tiny.yaml] [--out runs/easyedit]

Offline on the embedded default: the synthetic world's ZsRE files are written to
OUT/world and loaded with EasyEdit's own ``ZsreDataset``; the model named in the
YAML (``embedded-tiny-gpt2``: the cached tiny LM) is trained on.  The archive
lands in OUT/archive; ``edit_with_easyedit.py`` and ``sequential_easyedit.py``
use it.  It mirrors EasyEdit's MEND recipe::

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


def train(hparams_path: str = DEFAULT_TRAINING, out: str = "runs/easyedit", trajectories=None,
          progress: bool = True) -> dict:
    from rledit_plugin.hosts.easyedit import RLEditTrainer, import_easyeditor
    from rledit_plugin.hparams import RLEditTrainingHyperParams
    from rledit_plugin.world import build_world, write_world_files

    easyeditor = import_easyeditor()             # stand-ins + RLEdit registration
    files = write_world_files(build_world(), os.path.join(out, "world"))
    hparams = RLEditTrainingHyperParams.from_hparams(hparams_path)
    hparams.results_dir = os.path.join(out, "archive")
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


def ensure_archive(out: str = "runs/easyedit", hparams_path: str = DEFAULT_TRAINING) -> str:
    """The archive under OUT, trained first when missing (used by the other examples)."""
    archive = os.path.join(out, "archive")
    if not (os.path.isdir(archive) and os.listdir(archive)):
        print(f"[example] no archive at {archive}: training one (examples/train_easyedit.py) ...",
              flush=True)
        train(hparams_path, out)
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hparams", default=DEFAULT_TRAINING, help="training YAML")
    parser.add_argument("--out", default="runs/easyedit", help="world files and archive go here")
    parser.add_argument("--trajectories", type=int, help="override n_trajectories")
    args = parser.parse_args()
    summary = train(args.hparams, args.out, args.trajectories)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
