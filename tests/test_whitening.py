"""Key whitening: statistics, the whitening matrix and the whitened dual solve vs references."""
import copy

import pytest
import torch

from rledit_plugin.core.editor import RLEditor, norm_state
from rledit_plugin.core.solve import ridge_dual
from rledit_plugin.core.trainer import train_hypernetwork
from rledit_plugin.core.whitening import (compute_whitening, key_second_moments, read_texts,
                                          record_answer_pairs, record_texts, statistics_texts,
                                          whitening_matrix)
from rledit_plugin.hparams import HParamsError, RLEditHyperParams, RLEditTrainingHyperParams
from rledit_plugin.models import get_module

MODULES = ["transformer.h.1.mlp.c_proj"]


def test_second_moment_equals_brute_force_over_unpadded_tokens(random_gpt2, world):
    model, tok = random_gpt2
    texts = record_texts(world.train_records[:4])
    got = key_second_moments(model, tok, {"lm_head": model.lm_head}, texts, batch_size=3)["lm_head"]
    rows = []
    with torch.no_grad():       # lm_head's input is the last hidden state; one text at a time: no padding
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double())
    x = torch.cat(rows)
    torch.testing.assert_close(got, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)   # fp32 model


def test_a_float64_model_keeps_float64_products_in_its_moments(random_gpt2, world):
    model, tok = random_gpt2
    model = model.double()
    texts = record_texts(world.train_records[:3])
    got = key_second_moments(model, tok, {"lm_head": model.lm_head}, texts, batch_size=2)["lm_head"]
    with torch.no_grad():
        x = torch.cat([model(input_ids=torch.tensor([tok(t)["input_ids"]]), output_hidden_states=True)
                       .hidden_states[-1][0] for t in texts])
    assert x.dtype == torch.float64
    # float32 products would be off by ~1e-7 relative; float64 ones agree to rounding
    torch.testing.assert_close(got, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-14)


def test_whitening_matrix_inverts_the_damped_moment():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    m = x.T @ x / 50
    s = whitening_matrix(m, damping=0.1).double()
    a = m + 0.1 * m.trace() / 6 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(s, s.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(s @ a @ s, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="damping"):
        whitening_matrix(m, damping=0.0)


def test_whitened_dual_solve_is_the_generalised_ridge():
    """dW = (K S^2)^T C with C from the dual solve on K S equals (K^T K + e^lam S^-2)^-1 K^T D."""
    torch.manual_seed(1)
    k = torch.randn(7, 12, dtype=torch.float64)
    d = torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(40, 12, dtype=torch.float64)
    s = whitening_matrix(x.T @ x / 40, 0.05).double()
    lam = torch.tensor(0.3, dtype=torch.float64)
    c = ridge_dual(k @ s, d, lam)
    dual = (k @ s @ s).T @ c
    primal = torch.linalg.solve(k.T @ k + lam.exp() * torch.linalg.inv(s @ s), k.T @ d)
    torch.testing.assert_close(dual, primal, rtol=1e-8, atol=1e-10)


def test_editor_applies_the_whitened_update_and_keeps_normaliser_state_small(random_gpt2, world):
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    hp = RLEditHyperParams(inner_params=MODULES, rank=8, n_blocks=1, init_lr=1e-2, max_length=48,
                           key_whitening=True, whitening_damping=0.05)
    editor = RLEditor(model, tok, hp, whitening_texts=record_texts(world.train_records[:8]))
    assert editor.hypernet.whitened
    assert not any("whiten" in k for k in norm_state(editor.hypernet))   # journal copies stay small
    w0 = editor.modules[MODULES[0]].weight.detach().clone()
    update = editor.compute_update(world.eval_records[:3])
    s = editor.hypernet.whitening(MODULES[0])
    k = update.capture.keys[MODULES[0]]
    torch.testing.assert_close(update.keys[MODULES[0]], k @ s @ s, rtol=1e-5, atol=1e-6)
    editor.apply(update)
    dw = update.keys[MODULES[0]].T @ update.coeffs[MODULES[0]]            # Conv1D layout (d_in, d_out)
    torch.testing.assert_close(editor.modules[MODULES[0]].weight - w0, dw, rtol=1e-4, atol=1e-6)


def test_whitening_needs_statistics_and_reads_text_files(random_gpt2, tmp_path):
    model, tok = random_gpt2
    hp = RLEditHyperParams(inner_params=MODULES, rank=8, n_blocks=1, key_whitening=True)
    with pytest.raises(ValueError, match="whitening_texts"):
        RLEditor(copy.deepcopy(model), tok, hp)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_texts(str(empty))
    text = tmp_path / "texts.txt"
    text.write_text("Alice lives in Paris.\nBob plays golf.\n")
    hp.whitening_texts = str(text)
    assert RLEditor(copy.deepcopy(model), tok, hp).hypernet.whitened
    with pytest.raises(HParamsError, match="whitening_damping"):
        RLEditHyperParams.from_dict({"whitening_damping": 0}, source="x.yaml")


def test_later_rounds_reuse_the_whitened_keys_only_where_the_keys_are_unchanged(random_gpt2, world):
    model, tok = random_gpt2
    names = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    hp = RLEditHyperParams(inner_params=names, rank=8, n_blocks=1, init_lr=1e-2, max_length=48,
                           key_whitening=True, whitening_damping=0.05, edit_steps=2)
    texts = record_texts(world.train_records[:8])
    records = world.eval_records[:3]
    reusing = RLEditor(copy.deepcopy(model), tok, hp, whitening_texts=texts)
    first, second = reusing.edit_rounds(records)
    # h.0 comes first in the forward: no edit reaches its input, so its keys repeat exactly
    assert torch.equal(first.capture.keys[names[0]], second.capture.keys[names[0]])
    assert second.solve_keys[names[0]] is first.solve_keys[names[0]]
    # h.1's input passes through the edited h.0: new keys, whitened afresh
    assert not torch.equal(first.capture.keys[names[1]], second.capture.keys[names[1]])
    s = reusing.hypernet.whitening(names[1])
    torch.testing.assert_close(second.keys[names[1]], second.capture.keys[names[1]] @ s @ s,
                               rtol=1e-5, atol=1e-6)
    # and the weights are those of rounds computed without any reuse (to rounding: a later
    # round's h.0 output is its recorded output plus the low-rank correction, core/prefix.py)
    plain = RLEditor(copy.deepcopy(model), tok, hp, whitening_texts=texts)
    for step in range(2):
        plain.apply(plain.compute_update(records, update_norm=None if step == 0 else False))
    for name in names:
        change = (plain.modules[name].weight - get_module(model, name).weight).abs().max()
        gap = (reusing.modules[name].weight - plain.modules[name].weight).abs().max()
        assert change > 1e-4 and gap < 1e-4 * change, (name, float(change), float(gap))


def test_statistics_texts_and_the_trainer_measures_the_keys_on_the_texts_it_is_given(random_gpt2, world,
                                                                                     tmp_path):
    from rledit_plugin.cli import _key_statistics
    records, corpus = world.train_records[:6], world.corpus[:5]
    texts = statistics_texts(records, corpus + corpus[:2])       # corpus first, duplicates once
    assert texts == corpus + record_texts(records)
    assert _key_statistics("embedded-tiny-gpt2", records, world)["whitening_texts"] == statistics_texts(records, world.corpus)
    assert _key_statistics("gpt2", records, world)["whitening_texts"] is None     # no known pre-training text

    model, tok = random_gpt2
    hp = RLEditTrainingHyperParams(inner_params=MODULES, rank=8, n_blocks=1, init_lr=1e-2, max_length=48,
                                   key_whitening=True, whitening_damping=0.05, edit_minibatch=3,
                                   n_edits=3, traj_len=1, n_trajectories=1, loss_minibatch=4, n_val=0,
                                   results_dir=str(tmp_path / "arch"))
    modules = {MODULES[0]: get_module(model, MODULES[0])}
    want = compute_whitening(model, tok, modules, texts, 0.05, 48)[MODULES[0]]
    plain = compute_whitening(model, tok, modules, record_texts(records), 0.05, 48)[MODULES[0]]
    assert (want - plain).abs().max() > 1e-3 * want.abs().max()   # the corpus changes S
    net, _ = train_hypernetwork(copy.deepcopy(model), tok, hp, records, progress=False, save=False,
                                whitening_texts=texts)
    torch.testing.assert_close(net.whitening(MODULES[0]), want, rtol=0, atol=0)
    net, _ = train_hypernetwork(copy.deepcopy(model), tok, hp, records, progress=False, save=False)
    torch.testing.assert_close(net.whitening(MODULES[0]), plain, rtol=0, atol=0)


def test_answer_moment_equals_brute_force_at_the_positions_that_predict_the_answer(random_gpt2, world):
    """Each pair run alone (no padding): the key at every position whose next token is an
    answer token, and nowhere else."""
    from rledit_plugin.core.whitening import answer_second_moments, record_answer_pairs
    from rledit_plugin.data.records import split_prompt_answers
    model, tok = random_gpt2
    pairs = record_answer_pairs(world.train_records[:3]) + [("Vardrous lives in", "Buenos Aires")]
    module = get_module(model, MODULES[0])
    got = answer_second_moments(model, tok, {MODULES[0]: module}, pairs, batch_size=4)[MODULES[0]]
    rows, seen = [], {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0][0].double()))
    with torch.no_grad():
        for (p, a), (p_ids, a_ids) in zip(pairs, split_prompt_answers(tok, [p for p, _ in pairs],
                                                                     [a for _, a in pairs])):
            model(input_ids=torch.tensor([p_ids + a_ids]))
            rows.append(seen["x"][len(p_ids) - 1:len(p_ids) + len(a_ids) - 1])
    handle.remove()
    x = torch.cat(rows)
    assert x.shape[0] > len(pairs)                     # a multi-token answer counts every token
    torch.testing.assert_close(got, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_answer_pairs_are_what_the_model_knows_not_what_edits_write(world):
    """Each prompt with its true answer and the locality prompts with theirs; never a new
    target or a paraphrase (those are the edits), and a record without a true answer gives
    its locality pairs only."""
    from dataclasses import replace

    from rledit_plugin.core.whitening import record_answer_pairs
    records = world.train_records[:5]
    assert all(r.target_true and r.paraphrases and r.locality_prompts for r in records)
    no_true = replace(records[0], prompt="Quellor lives in", target_true=None, uid="no-true",
                      locality_prompts=["Quellor works as a"], locality_answers=["baker"])
    pairs = record_answer_pairs(records + [no_true])
    want = list(dict.fromkeys(p for r in records for p in
                              [(r.prompt, r.target_true), *zip(r.locality_prompts, r.locality_answers)]))
    assert pairs == want + [("Quellor works as a", "baker")]
    assert not {(r.prompt, r.target_new) for r in records} & set(pairs)
    assert not {(p, r.target_new) for r in records for p in r.paraphrases} & set(pairs)


def test_answer_weight_mixes_the_moments_and_reaches_the_trainer(random_gpt2, world, tmp_path):
    from rledit_plugin.cli import _key_statistics
    from rledit_plugin.core.whitening import (answer_second_moments, mix_answer_moment,
                                              record_answer_pairs, statistics_pairs)
    records = world.train_records[:6]
    pairs = statistics_pairs(records, world.fact_pairs[:5])
    assert pairs[:5] == world.fact_pairs[:5] and pairs[5:] == record_answer_pairs(records)
    assert world.fact_pairs[0][0] + " " + world.fact_pairs[0][1] + "." == world.corpus[0]
    assert _key_statistics("embedded-tiny-gpt2", records, world)["whitening_pairs"] == statistics_pairs(records, world.fact_pairs)
    assert _key_statistics("gpt2", records, world)["whitening_pairs"] is None
    m, a = torch.eye(3, dtype=torch.float64) * 2, torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(mix_answer_moment(m, a, 0.5), m + 0.5 * 6.0 * a)   # 0.5 x tr(M) more
    with pytest.raises(ValueError, match="trace"):          # all-zero answer keys: no NaN moment
        mix_answer_moment(m, torch.zeros_like(a), 0.5)

    model, tok = random_gpt2
    modules = {MODULES[0]: get_module(model, MODULES[0])}
    texts = record_texts(records)
    moment = key_second_moments(model, tok, modules, texts, max_length=48)[MODULES[0]]
    answers = answer_second_moments(model, tok, modules, record_answer_pairs(records), max_length=48)[MODULES[0]]
    want = whitening_matrix(mix_answer_moment(moment, answers, 0.3), 0.05)
    hp = RLEditTrainingHyperParams(inner_params=MODULES, rank=8, n_blocks=1, init_lr=1e-2, max_length=48,
                                   key_whitening=True, whitening_damping=0.05, whitening_answer_weight=0.3,
                                   edit_minibatch=3, n_edits=3, traj_len=1, n_trajectories=1,
                                   loss_minibatch=4, n_val=0, results_dir=str(tmp_path / "arch"))
    net, _ = train_hypernetwork(copy.deepcopy(model), tok, hp, records, progress=False, save=False)
    torch.testing.assert_close(net.whitening(MODULES[0]), want, rtol=1e-5, atol=1e-5)
    assert (want - whitening_matrix(moment, 0.05)).abs().max() > 1e-3 * want.abs().max()
    with pytest.raises(ValueError, match="pairs"):
        compute_whitening(model, tok, modules, texts, 0.05, 48, answer_weight=0.3)
    with pytest.raises(HParamsError, match="whitening_answer_weight"):
        RLEditHyperParams(whitening_answer_weight=-1.0).validate()


def test_moments_with_no_selected_position_fail_instead_of_nan(random_gpt2):
    from rledit_plugin.core.whitening import _moments_at
    model, tok = random_gpt2
    modules = {MODULES[0]: get_module(model, MODULES[0])}
    ids = torch.tensor([tok.encode("a short text")])
    mask = torch.ones_like(ids)
    got = _moments_at(model, modules, [(ids, mask, mask.bool())])[MODULES[0]]
    assert torch.isfinite(got).all() and got.trace() > 0
    with pytest.raises(ValueError, match="no token position"):
        _moments_at(model, modules, [(ids, mask, torch.zeros_like(mask, dtype=torch.bool))])


def test_statistics_threads_measure_the_moments_on_that_many_threads(random_gpt2, world):
    model, tok = random_gpt2
    records = world.train_records[:6]
    seen = []
    hook = get_module(model, MODULES[0]).register_forward_hook(
        lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hp = RLEditHyperParams(inner_params=MODULES, rank=8, n_blocks=1, max_length=48,
                               key_whitening=True, whitening_damping=0.05, whitening_answer_weight=0.3,
                               statistics_threads=2)
        two = RLEditor(model, tok, hp, whitening_texts=record_texts(records),
                       whitening_pairs=record_answer_pairs(records)).hypernet.whitening(MODULES[0])
        assert seen and set(seen) == {2}          # every statistics forward, both kinds
        assert torch.get_num_threads() == 1       # the caller's count is back
        seen.clear()
        hp.statistics_threads = 0
        one = RLEditor(model, tok, hp, whitening_texts=record_texts(records),
                       whitening_pairs=record_answer_pairs(records)).hypernet.whitening(MODULES[0])
        assert seen and set(seen) == {1}
    finally:
        hook.remove()
        torch.set_num_threads(before)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    with pytest.raises(HParamsError, match="statistics_threads"):
        RLEditHyperParams(statistics_threads=-1).validate()
