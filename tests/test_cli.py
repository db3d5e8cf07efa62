"""The path a user with their own model takes: `rledit train` then `rledit edit` on a local
model directory and ZsRE-format files, driven by a shipped real-model YAML with only the
model-specific keys changed (the model is a tiny random Llama, saved the way a downloaded
checkpoint is)."""
import json
import os
import re

import pytest
import yaml

from rledit_plugin import cli
from rledit_plugin.core.archive import archive_hparams, load_archive, read_meta
from rledit_plugin.data.writers import write_zsre
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import load_model_and_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def _derived_yaml(shipped: str, out, **changes):
    data = yaml.safe_load(open(os.path.join(REPO, "hparams", shipped)))
    assert set(changes) - {"archive"} <= set(data) | {"train_data", "val_data", "results_dir"}
    data.update(changes)
    out.write_text(yaml.safe_dump(data))
    return str(out)


@pytest.fixture
def user_setup(random_llama, world, tmp_path):
    model, tok = random_llama
    model_dir = tmp_path / "my-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    files = {split: str(write_zsre(world.records(split)[:n], tmp_path / f"zsre_{split}.json"))
             for split, n in (("train", 8), ("val", 4), ("eval", 6))}
    mine = dict(model_name=str(model_dir), device="cpu", inner_params=MODULES, rank=16)
    return tmp_path, mine, files


def test_train_then_edit_a_local_model_with_the_real_model_yamls(user_setup, capsys):
    tmp_path, mine, files = user_setup
    archive = tmp_path / "results" / "RLEdit" / "my-llama"
    train_yaml = _derived_yaml("TRAINING/RLEdit/llama3-8b.yaml", tmp_path / "train.yaml", **mine,
                               train_data=files["train"], val_data=files["val"],
                               results_dir=str(archive), traj_len=2, n_edits=2, n_val=4)
    assert cli.main(["train", "--hparams", train_yaml]) == 0
    meta = read_meta(str(archive))
    assert sorted(meta["modules"]) == sorted(MODULES)
    # the archive records the editing hparams of the shipped editing YAML (bf16, fp32 accumulation)
    edit_yaml = _derived_yaml("RLEdit/llama3-8b.yaml", tmp_path / "edit.yaml", **mine, archive=str(archive))
    expected = RLEditHyperParams.from_hparams(edit_yaml).to_dict()
    assert archive_hparams(str(archive)).to_dict() == expected
    model, _ = load_model_and_tokenizer(mine["model_name"], torch_dtype="bfloat16")
    load_archive(str(archive), model, expect_modules=MODULES, strict_weights=True)

    out = tmp_path / "edit"
    capsys.readouterr()
    assert cli.main(["edit", "--hparams", edit_yaml, "--data", files["eval"], "--turns", "3",
                     "--batch", "2", "--out", str(out), "--curve-every", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "edit.json").read_text())["RLEdit"]
    assert report["edits"] == 6 and printed["post"] == report["post"]
    assert report["post"]["weight_change_norm"] > 0        # the edits were written
    assert report["config"]["hparams"]["archive"] == str(archive)
    assert [p["edits"] for p in report["curve"]] == [2, 4, 6]
    # --curve-every 0: the end of the stream only; fewer turns than records: said, not silent
    assert cli.main(["edit", "--hparams", edit_yaml, "--data", files["eval"], "--turns", "2",
                     "--batch", "2", "--out", str(out), "--curve-every", "0"]) == 0
    assert "editing the first 4 of 6 records" in capsys.readouterr().err
    assert json.loads((out / "edit.json").read_text())["RLEdit"]["curve"] == []
    assert all((out / f"edit.{ext}").stat().st_size > 0 for ext in ("json", "md", "png"))


def test_edit_refuses_an_archive_trained_for_other_modules(user_setup, capsys):
    tmp_path, mine, files = user_setup
    archive = tmp_path / "archive"
    train_yaml = _derived_yaml("TRAINING/RLEdit/llama3-8b.yaml", tmp_path / "train.yaml", **mine,
                               train_data=files["train"], val_data=files["val"],
                               results_dir=str(archive), traj_len=1, n_edits=2, n_val=2,
                               n_trajectories=0)
    assert cli.main(["train", "--hparams", train_yaml]) == 0
    other = dict(mine, inner_params=["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])
    edit_yaml = _derived_yaml("RLEdit/llama3-8b.yaml", tmp_path / "edit.yaml", **other, archive=str(archive))
    assert cli.main(["edit", "--hparams", edit_yaml, "--data", files["eval"], "--turns", "1",
                     "--batch", "2", "--out", str(tmp_path / "edit")]) == 2
    assert "archive edits" in capsys.readouterr().err
    assert not (tmp_path / "edit").exists()   # refused before any edit or any file written


@pytest.mark.parametrize("bad,words", [
    ('[{"src": "Who wrote Hamlet?", "alt": "Marlowe", "rephrase": "Hamlet was written by",'
     ' "loc": "nq question: who sang thriller", "loc_ans": "Michael Jackson"}, {"src": "x"}]',
     "record 1, field 'alt'"),
    ("[{", "invalid JSON at line 1"),
])
def test_a_bad_data_file_is_one_line_naming_file_record_and_field(user_setup, capsys, bad, words):
    tmp_path, mine, _ = user_setup
    data = tmp_path / "bad.json"
    data.write_text(bad)
    edit_yaml = _derived_yaml("RLEdit/llama3-8b.yaml", tmp_path / "edit.yaml", **mine)
    assert cli.main(["edit", "--hparams", edit_yaml, "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rledit edit: error: file {data}") and words in err[0]
    with pytest.raises(Exception, match=re.escape(words)):      # --verbose: the traceback
        cli.main(["-v", "edit", "--hparams", edit_yaml, "--data", str(data), "--out", str(tmp_path / "o")])
