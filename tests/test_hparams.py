"""Hyper-parameter files: every shipped YAML loads; bad keys and values name the file and key."""
import glob
import os
import re

import pytest

from rledit_plugin.hparams import HParamsError, RLEditHyperParams, RLEditTrainingHyperParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "hparams", "RLEdit", "*.yaml"))))
def test_shipped_editing_yamls_load(path):
    hp = RLEditHyperParams.from_hparams(path)
    assert hp.alg_name == "RLEdit" and hp.edit_steps >= 1 and isinstance(hp.init_lr, float)


TRAINING_MODELS = ("tiny", "gpt2-xl", "llama3-8b", "mistral-7b")


@pytest.mark.parametrize("model", TRAINING_MODELS)
def test_shipped_training_yaml_loads_and_its_editing_part_matches_the_editing_yaml(model):
    train = RLEditTrainingHyperParams.from_hparams(os.path.join(REPO, "hparams", "TRAINING", "RLEdit", f"{model}.yaml"))
    edit = RLEditHyperParams.from_hparams(os.path.join(REPO, "hparams", "RLEdit", f"{model}.yaml"))
    # the archive path differs (training writes it, editing reads it); the rest must agree,
    # or the hypernetwork would be trained for another editor than the one that uses it
    mine, theirs = train.editing().to_dict(), edit.to_dict()
    mine.pop("archive"), theirs.pop("archive")
    assert mine == theirs
    assert train.archive is None and train.results_dir


def test_every_editing_yaml_has_a_training_yaml():
    editing = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "hparams", "RLEdit", "*.yaml"))}
    assert editing == set(TRAINING_MODELS)


def test_quick_training_yaml_differs_from_the_default_only_where_it_means_to():
    path = os.path.join(REPO, "hparams", "TRAINING", "RLEdit")
    default = RLEditTrainingHyperParams.from_hparams(os.path.join(path, "tiny.yaml")).to_dict()
    quick = RLEditTrainingHyperParams.from_hparams(os.path.join(path, "tiny-quick.yaml")).to_dict()
    changed = {k for k in default if default[k] != quick[k]}
    # the quick demo's model keeps four rounds (docs/TUNING.md section 10) and section 14's answer
    # weight and edit memory: section 17's values were measured on the default's model only
    assert changed == {"model_name", "init_lr", "whitening_damping", "n_trajectories", "results_dir",
                       "edit_steps", "whitening_answer_weight", "edit_memory"}
    assert default["whitening_answer_weight"] > quick["whitening_answer_weight"] > 0
    assert default["edit_memory"] > quick["edit_memory"] > 0
    assert quick["model_name"] == default["model_name"] + "-quick"


def _write(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text("alg_name: RLEdit\n" + text)
    return str(path)


def test_misspelled_key_names_the_file_the_key_and_the_closest_name(tmp_path):
    path = _write(tmp_path, "edit_step: 2\n")
    with pytest.raises(HParamsError, match=r"x\.yaml: unknown key 'edit_step' \(did you mean 'edit_steps'\?\)"):
        RLEditHyperParams.from_hparams(path)


@pytest.mark.parametrize("text, key", [("edit_steps: 0\n", "edit_steps"), ("rank: 0\n", "rank"),
                                       ("init_lr: fast\n", "init_lr"),
                                       ("accumulate: double\n", "accumulate"),
                                       ("settled_prob: 1.5\n", "settled_prob"),
                                       ("inner_params: [a.c_proj, b, a.c_proj.weight]\n", "inner_params")])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(HParamsError, match=rf"x\.yaml: key '{key}'"):
        RLEditHyperParams.from_hparams(_write(tmp_path, text))


@pytest.mark.parametrize("text, key, words", [
    ("key_whitening: 'false'\n", "key_whitening", "true or false"),
    ("inner_params: transformer.h.0.mlp.c_proj\n", "inner_params", "a list of strings"),
    ("rank: big\n", "rank", "an integer"), ("rank:\n", "rank", "set (not null)"),
    ("rank: 2.5\n", "rank", "an integer"), ("max_length: '48'\n", "max_length", "an integer"),
    ("seed: abc\n", "seed", "an integer"), ("device: gpu\n", "device", "cpu, cuda"),
    ("device: [0]\n", "device", "a device index or name"), ("init_lr: -1e-3\n", "init_lr", "> 0"),
    ("init_lr: true\n", "init_lr", "a number"), ("archive: 3\n", "archive", "a string"),
])
def test_wrong_types_name_the_key(tmp_path, text, key, words):
    with pytest.raises(HParamsError, match=rf"x\.yaml: key '{key}' must be {re.escape(words)}"):
        RLEditHyperParams.from_hparams(_write(tmp_path, text))


def test_right_types_load_as_the_fields_types(tmp_path):
    hp = RLEditHyperParams.from_hparams(_write(tmp_path, "rank: 16.0\ndevice: 0\narchive: null\n"
                                                         "whitening_damping: 1\nsettled_prob: null\n"))
    assert hp.rank == 16 and isinstance(hp.rank, int) and hp.device == 0 and hp.archive is None
    assert hp.whitening_damping == 1.0 and isinstance(hp.whitening_damping, float)
    assert RLEditHyperParams.from_hparams(_write(tmp_path, "device: cuda:1\n")).device == "cuda:1"


@pytest.mark.parametrize("text, key", [("loc_reference: start\n", "loc_reference"),
                                       ("reg_mode: l2\n", "reg_mode"), ("traj_len: 0\n", "traj_len")])
def test_bad_training_values_name_the_key(tmp_path, text, key):
    with pytest.raises(HParamsError, match=rf"x\.yaml: key '{key}'"):
        RLEditTrainingHyperParams.from_hparams(_write(tmp_path, text))


def test_yaml_exponent_without_a_dot_is_a_float_and_round_trip(tmp_path):
    # PyYAML reads "1e-2" (no dot) as a string; the loader turns it into the float it means
    hp = RLEditHyperParams.from_hparams(_write(tmp_path, "init_lr: 1e-2\nedit_steps: 2\n"))
    assert hp.init_lr == pytest.approx(0.01) and isinstance(hp.init_lr, float)
    assert RLEditHyperParams.from_dict(hp.to_dict()) == hp


def test_missing_file_and_non_mapping_are_clear_errors(tmp_path):
    with pytest.raises(HParamsError, match="hparams file not found"):
        RLEditHyperParams.from_hparams(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HParamsError, match="expected a mapping"):
        RLEditHyperParams.from_hparams(str(bad))
