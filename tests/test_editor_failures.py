"""What the editor does with input it cannot use and with a batch that fails part-way: a clear
error, and the model, the normaliser and the journal as they were before the call."""
import copy

import pytest
import torch

from rledit_plugin.core.editor import RLEditor, norm_state
from rledit_plugin.data.records import EditRecord, RecordError
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import get_module

MODULES = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def _editor(model, tok, keep_journal=True, **kw):
    kw = {"inner_params": MODULES, **kw}
    hp = RLEditHyperParams(rank=8, n_blocks=2, init_lr=1e-2, max_length=48, edit_minibatch=3,
                           edit_steps=3, **kw)
    return RLEditor(model, tok, hp, keep_journal=keep_journal)


def _weights(model):
    return {n: get_module(model, n).weight.detach().clone() for n in MODULES}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _fail_on_call(editor, n, error):
    """Make the editor's n-th compute_update from now on raise ``error``."""
    original, calls = editor.compute_update, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return original(*args, **kwargs)
    editor.compute_update = failing
    return calls


@pytest.mark.parametrize("keep_journal,memory,error", [
    (True, 0.0, RuntimeError("solver failed")), (True, 1e-2, KeyboardInterrupt()),
    (False, 0.0, RuntimeError("solver failed")), (False, 1e-2, KeyboardInterrupt())])
def test_a_batch_that_fails_part_way_is_taken_back(random_gpt2, world, keep_journal, memory, error):
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    records = world.train_records
    editor = _editor(model, tok, keep_journal, edit_memory=memory)
    editor.edit(records[:4])
    weights, norm = _weights(model), norm_state(editor.hypernet)
    calls = _fail_on_call(editor, 3, error)          # rounds 1 and 2 applied, round 3 fails
    with pytest.raises(type(error)):
        editor.edit(records[4:8])
    assert len(calls) == 3
    after = _weights(model)
    assert not _same(after, _weights(copy.deepcopy(random_gpt2[0])))   # the first batch stays
    if keep_journal:        # exact: pristine weights and the journal replayed
        assert _same(after, weights) and len(editor.journal) == 1
    else:                   # the two rounds applied negated
        for n in MODULES:
            torch.testing.assert_close(after[n], weights[n], rtol=0, atol=1e-6)
    assert all(torch.equal(v, norm_state(editor.hypernet)[k]) for k, v in norm.items())
    # editing the same batch again now lands where an editor that never failed lands
    reference_model = copy.deepcopy(random_gpt2[0])
    reference = _editor(reference_model, tok, keep_journal, edit_memory=memory)
    reference.edit(records[:4])
    reference.edit(records[4:8])
    editor.compute_update = RLEditor.compute_update.__get__(editor)
    editor.edit(records[4:8])
    for n in MODULES:
        if keep_journal:
            assert torch.equal(get_module(model, n).weight, get_module(reference_model, n).weight)
        else:
            torch.testing.assert_close(get_module(model, n).weight, get_module(reference_model, n).weight,
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad,index,field", [
    ({"prompt": "a dict is not a record", "target_new": "x"}, 1, None),
    (EditRecord("", "Lyon"), 1, "prompt"),
    (EditRecord("The capital of Freedonia is", None), 1, "target_new"),
    (EditRecord("The capital of Freedonia is", "Lyon " * 60), 1, "target_new"),
])
def test_bad_records_are_refused_before_anything_changes(random_gpt2, world, bad, index, field):
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    editor = _editor(model, tok)
    weights, norm = _weights(model), norm_state(editor.hypernet)
    with pytest.raises(RecordError) as err:
        editor.edit([world.train_records[0], bad, world.train_records[1]])
    assert err.value.index == index and err.value.field == field
    assert f"record {index}" in str(err.value)
    assert _same(_weights(model), weights) and not editor.journal
    assert all(torch.equal(v, norm_state(editor.hypernet)[k]) for k, v in norm.items())


def test_delta_needs_the_journal(random_gpt2, world):
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    editor = _editor(model, tok, keep_journal=False)
    editor.edit(world.train_records[:3])
    with pytest.raises(RuntimeError, match="keep_journal"):
        editor.delta(MODULES[0])


def test_setup_mistakes_are_named(random_gpt2, tmp_path):
    import json

    from rledit_plugin.core.archive import META, ArchiveError, load_archive, save_archive
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    with pytest.raises(TypeError, match=r"GPT2MLP: it has no weight of its own.*'c_fc'"):
        _editor(model, tok, inner_params=["transformer.h.1.mlp"])
    with pytest.raises(ValueError, match="'max_length' is 65 but the model has 64 positions"):
        RLEditor(model, tok, RLEditHyperParams(inner_params=MODULES, rank=8, max_length=65))
    editor = _editor(model, tok)
    save_archive(str(tmp_path), editor.hypernet, model, editor.hparams)
    meta = json.loads((tmp_path / META).read_text())
    meta["hparams"]["rank"] = 16          # the JSON and the tensors now disagree
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(ArchiveError, match="tensors do not match the hypernetwork"):
        load_archive(str(tmp_path), model)


@pytest.mark.parametrize("change,match", [({"rank": 16}, "rank=8, the hparams say rank=16"),
                                          ({"n_blocks": 3}, "n_blocks=2"),
                                          ({"key_whitening": False}, "key_whitening=true")])
def test_hparams_that_disagree_with_the_archive_are_refused(random_gpt2, world, tmp_path, change, match):
    from rledit_plugin.core.archive import ArchiveError, save_archive
    from rledit_plugin.core.whitening import record_texts
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    trained = RLEditor(model, tok, RLEditHyperParams(inner_params=MODULES, rank=8, n_blocks=2, max_length=48,
                                                     key_whitening=True),
                       whitening_texts=record_texts(world.train_records[:20]))
    save_archive(str(tmp_path), trained.hypernet, model, trained.hparams)
    ok = dict(inner_params=MODULES, rank=8, n_blocks=2, max_length=48, key_whitening=True, archive=str(tmp_path))
    RLEditor(model, tok, RLEditHyperParams(**ok))                       # the archive's own values: fine
    with pytest.warns(UserWarning, match="whitening_damping"):
        RLEditor(model, tok, RLEditHyperParams(**ok, whitening_damping=0.5))
    with pytest.raises(ArchiveError, match=match):
        RLEditor(model, tok, RLEditHyperParams(**{**ok, **change}))


def test_two_answers_for_one_prompt_in_a_batch_are_flagged(random_gpt2, world):
    model, tok = copy.deepcopy(random_gpt2[0]), random_gpt2[1]
    first = world.train_records[0]
    other = EditRecord(first.prompt + " ", first.target_new + " Lyon")
    with pytest.warns(UserWarning, match=r"records 0 and 2 of this batch give the prompt .* two answers"):
        _editor(model, tok).edit([first, world.train_records[1], other])
