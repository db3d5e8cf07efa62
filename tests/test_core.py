"""Capture, editor, trainer and archive: behaviour checked against independent references."""
import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from rledit_plugin.core.archive import ArchiveError, load_archive, save_archive
from rledit_plugin.core.capture import answer_token_loss, capture
from rledit_plugin.core.editor import RLEditor, norm_state
from rledit_plugin.core.solve import ridge_primal
from rledit_plugin.core.trainer import SequenceTrainer, train_hypernetwork
from rledit_plugin.core.whitening import record_texts
from rledit_plugin.data.records import (answer_positions, edit_batch, locality_batch,
                                        paraphrase_batch)
from rledit_plugin.hparams import HParamsError, RLEditHyperParams, RLEditTrainingHyperParams
from rledit_plugin.models import get_module, is_conv1d, weight_view

GPT2_MODULES = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
LLAMA_MODULES = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def _hp(modules, **kw):
    base = dict(inner_params=modules, rank=8, n_blocks=2, init_lr=1e-2, max_length=48,
                edit_minibatch=3)
    base.update(kw)
    return RLEditHyperParams(**base)


def _train_hp(modules, tmp_path, **kw):
    base = dict(inner_params=modules, rank=8, n_blocks=2, init_lr=1e-2, max_length=48,
                edit_minibatch=3, n_edits=3, traj_len=2, n_trajectories=2, back_depth=2,
                loss_minibatch=4, meta_lr=1e-3, n_val=6, results_dir=str(tmp_path / "arch"))
    base.update(kw)
    return RLEditTrainingHyperParams(**base)


@pytest.fixture(params=["gpt2", "llama"])
def pair(request, random_gpt2, random_llama):
    model, tok = random_gpt2 if request.param == "gpt2" else random_llama
    modules = GPT2_MODULES if request.param == "gpt2" else LLAMA_MODULES
    return copy.deepcopy(model), tok, modules


def test_capture_runs_in_eval_mode_and_gives_each_module_its_own_mode_back(random_gpt2, world):
    model = copy.deepcopy(random_gpt2[0])
    model.train()
    model.transformer.h[0].eval()                   # a caller's mix of train and eval modules
    before = {n: m.training for n, m in model.named_modules()}
    seen = []
    model.transformer.h[1].register_forward_pre_hook(
        lambda *_: seen.append(any(m.training for m in model.modules())))
    name = GPT2_MODULES[1]
    capture(model, {name: get_module(model, name)}, edit_batch(random_gpt2[1], world.train_records[:3], 48))
    assert seen and not any(seen)                   # no dropout while capturing
    assert {n: m.training for n, m in model.named_modules()} == before


def test_capture_rows_are_exactly_the_answer_positions(pair, world):
    model, tok, modules = pair
    records = world.train_records[:5]
    batch = edit_batch(tok, records, 48)
    mods = {n: get_module(model, n) for n in modules}
    cap = capture(model, mods, batch, minibatch=2)          # minibatched, autograd.grad path

    # Brute force: one full-batch forward, retain every output, plain backward.
    inputs, outputs = {}, {}
    def make_hook(name):
        def hook(mod, args, out):
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out
        return hook
    for p in model.parameters():
        p.requires_grad_(True)
    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    answer_token_loss(logits, batch["labels"]).backward()
    for h in handles:
        h.remove()
    mask = answer_positions(batch["labels"])
    n_answer = int((batch["labels"] != -100).sum())
    assert cap.n_rows == n_answer == int(mask.sum())
    for n in modules:
        torch.testing.assert_close(cap.keys[n], inputs[n][mask].float())
        torch.testing.assert_close(cap.grads[n], outputs[n].grad[mask].float(), rtol=1e-4, atol=1e-7)
    targets = batch["labels"][:, 1:][mask[:, :-1]]
    p_target = logits.detach()[mask].double().softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(cap.target_prob.double(), p_target, rtol=1e-5, atol=1e-7)
    # capture itself leaves no parameter gradient behind
    model.zero_grad(set_to_none=True)
    capture(model, mods, batch)
    assert all(p.grad is None for p in model.parameters())


def test_edit_lowers_edit_loss_and_touches_only_edited_modules(pair, world):
    model, tok, modules = pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = RLEditor(model, tok, _hp(modules, init_lr=1e-3))
    records = world.train_records[:4]
    batch = edit_batch(tok, records, 48)
    with torch.no_grad():
        loss0 = float(answer_token_loss(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]))
    stats = editor.edit(records)
    with torch.no_grad():
        loss1 = float(answer_token_loss(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]))
    assert loss1 < loss0, (loss0, loss1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(editor.edited_param_names)
    for n in modules:   # the change is K^T C, rank <= N, in the module's own layout
        dw = editor.delta(n)                                  # (d_in, d_out)
        assert torch.linalg.matrix_rank(dw) <= stats["n_rows"]
        now = weight_view(get_module(model, n))
        was = before[f"{n}.weight"].t() if is_conv1d(get_module(model, n)) else before[f"{n}.weight"]
        torch.testing.assert_close(now - was, dw.t(), rtol=1e-4, atol=1e-6)


def _threshold_between(probs: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring probabilities near the median, so that
    rounding differences between captures (other minibatches) cannot move a row across it."""
    ranked = probs.double().sort().values
    middle = len(ranked) // 2
    assert ranked[middle - 1] < ranked[middle]
    return float(ranked[middle - 1] + ranked[middle]) / 2


def test_settled_rows_get_no_value_change_and_the_rest_are_untouched(pair, world):
    model, tok, modules = pair
    records = world.train_records[:5]
    batch = edit_batch(tok, records, 48)
    mods = {n: get_module(model, n) for n in modules}
    probs = capture(model, mods, batch).target_prob
    tau = _threshold_between(probs)                  # about half the rows settle
    free = RLEditor(model, tok, _hp(modules)).compute_update(records, update_norm=False, batch=batch)
    settled = RLEditor(model, tok, _hp(modules, settled_prob=tau)).compute_update(
        records, update_norm=False, batch=batch)
    done = probs >= tau
    assert 0 < int(done.sum()) < len(done)
    for n in modules:
        assert torch.all(settled.values[n][done] == 0)
        torch.testing.assert_close(settled.values[n][~done], free.values[n][~done], rtol=0, atol=0)
        assert free.values[n][done].abs().sum() > 0      # the hypernetwork alone would move them


def test_edit_rounds_stop_once_every_row_is_settled(pair, world):
    model, tok, modules = pair
    records = world.train_records[:4]
    before = {n: get_module(model, n).weight.detach().clone() for n in modules}
    # every answer token of a random model has probability >= 1e-9: nothing to push
    editor = RLEditor(model, tok, _hp(modules, edit_steps=3, settled_prob=1e-9))
    assert len(editor.edit_rounds(records)) == 1      # rounds 2 and 3 were skipped
    for n in modules:
        assert torch.equal(get_module(model, n).weight, before[n])
    editor.settled = lambda cap: False                # all three rounds: the same weights
    assert len(editor.edit_rounds(records)) == 3
    for n in modules:
        assert torch.equal(get_module(model, n).weight, before[n])


@pytest.mark.parametrize("edit_steps", [1, 2])
def test_rollback_and_restore_are_exact(pair, world, edit_steps):
    model, tok, modules = pair
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    editor = RLEditor(model, tok, _hp(modules, edit_steps=edit_steps))
    recs = world.train_records
    editor.edit(recs[0:3])
    editor.edit(recs[3:6])
    after_two = {k: v.clone() for k, v in model.state_dict().items()}
    norm_two = norm_state(editor.hypernet)
    editor.edit(recs[6:9])
    editor.rollback(1)
    assert all(torch.equal(v, after_two[k]) for k, v in model.state_dict().items())
    for k, v in norm_state(editor.hypernet).items():
        assert torch.equal(v, norm_two[k])
    editor.restore()
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        editor.rollback(1)


@pytest.mark.parametrize("whitening, edit_steps, memory, settled",
                         [(False, 1, False, False), (True, 1, False, False), (False, 2, False, False),
                          (True, 2, False, False), (True, 2, True, False), (False, 1, True, False),
                          (True, 2, True, True)])
def test_meta_gradient_matches_autograd_through_primal_solve(random_gpt2, world, tmp_path, whitening,
                                                             edit_steps, memory, settled):
    """One training step: the trainer's hypernetwork gradient equals end-to-end autograd (float64).

    With key whitening the reference is the generalised-Tikhonov primal solve
    (K^T K + e^lam S^-2)^-1 K^T D, so the whitened dual form is checked too.  With
    ``edit_steps`` 2 the batch is edited in two rounds, the second captured (as a constant)
    on the weights the first changed; the losses and the L2 term see their sum.  With the
    edit memory holding earlier keys K_0 the Tikhonov matrix is A_0 + c K_0^T K_0.  With
    ``settled`` the rows whose answer token is already likely enough get D = 0."""
    model, tok = random_gpt2
    model = copy.deepcopy(model).double()
    hp = _train_hp(GPT2_MODULES, tmp_path, traj_len=1, n_trajectories=1, max_grad_norm=1e12,
                   reg_coef=0.5, reg_mode="paper", loc_coef=0.6, loss_minibatch=2,
                   key_whitening=whitening, whitening_damping=0.1, edit_steps=edit_steps,
                   edit_memory=0.7 if memory else 0.0)
    trainer = SequenceTrainer(model, tok, hp, progress=False,
                              whitening_texts=record_texts(world.train_records[:10]))
    assert trainer.net.whitened == whitening
    net = trainer.net.double()
    with torch.no_grad():   # move off the identity init so every parameter matters
        for name, p in net.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    recorded = {}
    def record_step():
        recorded.update({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        net.zero_grad(set_to_none=True)
        return 0.0
    trainer._opt_step = record_step
    earlier = {}
    if memory:      # keys of an earlier batch, kept across the trajectory's restore
        gen = torch.Generator().manual_seed(3)
        for n in GPT2_MODULES:
            d_in = get_module(model, n).weight.shape[0]                  # Conv1D: (d_in, d_out)
            earlier[n] = torch.randn(6, d_in, generator=gen, dtype=torch.float64)
            trainer.editor.memory.add(n, earlier[n], *trainer.editor.memory.factors(n, earlier[n]))
        trainer.editor.memory.reset = lambda: None
    pristine = {n: get_module(model, n).weight.detach().clone() for n in GPT2_MODULES}
    batch_records = trainer._trajectory(world.train_records)[0]
    tau = None
    if settled:                          # about half the first round's rows settle
        mods = {n: get_module(model, n) for n in GPT2_MODULES}
        tau = _threshold_between(capture(model, mods, edit_batch(tok, batch_records, hp.max_length)).target_prob)
        trainer.editor.hparams.settled_prob = tau
    trainer.rng.seed(hp.seed)            # replay the same sampling inside run_trajectory
    trainer.run_trajectory(world.train_records)

    # Independent reference: primal solve, functional weights, autograd to phi.
    mods = {n: get_module(model, n) for n in GPT2_MODULES}
    eb = edit_batch(tok, batch_records, hp.max_length)
    para = paraphrase_batch(tok, batch_records, hp.max_length)
    loc = locality_batch(tok, batch_records, hp.max_length)
    with torch.no_grad():                                         # model is pristine again
        p_old = torch.log_softmax(model(input_ids=loc["input_ids"], attention_mask=loc["attention_mask"]).logits[:, :-1], -1)
    net.zero_grad(set_to_none=True)
    total_dw = {n: 0.0 for n in GPT2_MODULES}
    for _ in range(edit_steps):
        with torch.no_grad():                                     # capture on W_0 + earlier rounds
            for n in GPT2_MODULES:
                mods[n].weight.copy_(pristine[n] + (total_dw[n].detach() if torch.is_tensor(total_dw[n]) else 0.0))
        cap = capture(model, mods, eb, minibatch=hp.edit_minibatch)
        for n in GPT2_MODULES:
            d = net.values(n, cap.keys[n].double(), cap.grads[n].double())
            if tau is not None:
                d = d * (cap.target_prob < tau).double()[:, None]
            k = cap.keys[n].double()
            if whitening or memory:
                s_mat = net.whitening(n) if whitening else None
                tikhonov = torch.linalg.inv(s_mat @ s_mat) if whitening else torch.eye(k.shape[1], dtype=k.dtype)
                if memory:
                    tikhonov = tikhonov + hp.edit_memory * earlier[n].T @ earlier[n]
                dw = torch.linalg.solve(k.T @ k + net.lam(n).exp() * tikhonov, k.T @ d)
            else:
                dw = ridge_primal(k, d, net.lam(n))                  # (d_in, d_out) = Conv1D layout
            total_dw[n] = total_dw[n] + dw
    with torch.no_grad():
        for n in GPT2_MODULES:
            mods[n].weight.copy_(pristine[n])
    new_weights, reg = {}, 0.0
    for n in GPT2_MODULES:
        new_weights[f"{n}.weight"] = pristine[n] + total_dw[n]
        reg = reg + hp.reg_coef * (total_dw[n] ** 2).sum()
    out = functional_call(model, new_weights, args=(), kwargs=dict(input_ids=para["input_ids"], attention_mask=para["attention_mask"]))
    gen = answer_token_loss(out.logits, para["labels"])
    out_loc = functional_call(model, new_weights, args=(), kwargs=dict(input_ids=loc["input_ids"], attention_mask=loc["attention_mask"]))
    mask = loc["labels"][:, 1:] != -100
    logq = torch.log_softmax(out_loc.logits[:, :-1], -1)[mask]
    kl = (p_old[mask].exp() * (p_old[mask] - logq)).sum() / mask.sum()
    total = gen + hp.loc_coef * kl + reg
    total.backward()
    assert recorded, "trainer produced no gradient"
    for name, p in net.named_parameters():
        if p.grad is None:
            assert name not in recorded or recorded[name].abs().max() == 0
            continue
        torch.testing.assert_close(recorded[name], p.grad, rtol=1e-6, atol=1e-10, msg=name)


@pytest.mark.parametrize("whitening, memory", [(False, False), (True, False), (True, True)])
def test_train_archive_load_edit_round_trip_and_determinism(random_gpt2, world, tmp_path, whitening,
                                                            memory):
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    pristine = copy.deepcopy(model)
    hp = _train_hp(GPT2_MODULES, tmp_path, key_whitening=whitening, edit_memory=0.5 if memory else 0.0)
    net, history = train_hypernetwork(model, tok, hp, world.train_records[:30], world.val_records[:6], progress=False)
    assert len(history) == hp.n_trajectories + 1 and "val" in history[-1]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pristine.state_dict().values()))

    edit_recs = world.eval_records[:6]
    m1, m2 = copy.deepcopy(pristine), copy.deepcopy(pristine)
    loaded_hp = hp.editing()
    loaded_hp.archive = hp.results_dir
    for editor in (RLEditor(m1, tok, hp.editing(), hypernet=copy.deepcopy(net)), RLEditor(m2, tok, loaded_hp)):
        editor.edit(edit_recs[:3])           # two batches: the second one sees the memory, if on
        editor.edit(edit_recs[3:])
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    # editing with another number of rounds than the archive was trained with: allowed, but said
    other_rounds = copy.deepcopy(loaded_hp)
    other_rounds.edit_steps = loaded_hp.edit_steps + 1
    with pytest.warns(UserWarning, match="trained with edit_steps=1, editing with edit_steps=2"):
        RLEditor(copy.deepcopy(pristine), tok, other_rounds)

    # a second seeded run writes the identical archive
    hp2 = _train_hp(GPT2_MODULES, tmp_path / "second", key_whitening=whitening,
                    edit_memory=0.5 if memory else 0.0)
    train_hypernetwork(copy.deepcopy(pristine), tok, hp2, world.train_records[:30], world.val_records[:6], progress=False)
    a = load_file(os.path.join(hp.results_dir, "hypernet.safetensors"))
    b = load_file(os.path.join(hp2.results_dir, "hypernet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".whiten") for k in a) == whitening


def test_archive_refuses_a_different_shape(random_gpt2, random_llama, tmp_path):
    gpt2, tok = random_gpt2
    editor = RLEditor(copy.deepcopy(gpt2), tok, _hp(GPT2_MODULES))
    save_archive(str(tmp_path / "a"), editor.hypernet, gpt2, editor.hparams)
    llama, _ = random_llama
    with pytest.raises(ArchiveError, match="archive"):
        load_archive(str(tmp_path / "a"), llama)
    with pytest.raises(ArchiveError, match="not an RLEdit archive"):
        load_archive(str(tmp_path), gpt2)


def test_capture_head_on_answer_rows_equals_full_logits_path(random_gpt2, world):
    """The answer-rows-only head and the full-logits fallback (post-processed logits, or an
    edited head) capture the same keys, gradients and loss."""
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    batch = edit_batch(tok, world.train_records[:4], 48)
    mods = {n: get_module(model, n) for n in GPT2_MODULES}
    fast = capture(model, mods, batch, minibatch=3)
    model.config.logit_scale = 1.0          # forces the full-logits path (value unused by GPT-2)
    full = capture(model, mods, batch, minibatch=3)
    del model.config.logit_scale
    assert abs(fast.loss - full.loss) < 1e-6
    for n in GPT2_MODULES:
        torch.testing.assert_close(fast.keys[n], full.keys[n])
        torch.testing.assert_close(fast.grads[n], full.grads[n], rtol=1e-4, atol=1e-6)   # fp32 summation order
    with_head = capture(model, {**mods, "lm_head": model.lm_head}, batch, minibatch=3)   # edited head
    assert with_head.keys["lm_head"].shape[0] == fast.n_rows
    torch.testing.assert_close(with_head.grads[GPT2_MODULES[0]], fast.grads[GPT2_MODULES[0]],
                               rtol=1e-4, atol=1e-6)   # fp32 summation order


def test_validation_edits_the_way_the_editor_does(random_gpt2, world, tmp_path, monkeypatch):
    """The trainer's validation stream (which picks the kept hypernetwork) runs every edit round,
    exactly as RLEditor.edit does, and leaves weights and normaliser as it found them."""
    from rledit_plugin.evaluation import metrics
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    hp = _train_hp(GPT2_MODULES, tmp_path, edit_steps=2, init_lr=5e-2)
    trainer = SequenceTrainer(model, tok, hp, progress=False)
    records = world.val_records[:6]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm = norm_state(trainer.net)
    scored = {}
    real_score = metrics.score_records

    def spy(m, *args, **kwargs):          # the weights validation scores
        scored.update({k: v.clone() for k, v in m.state_dict().items()})
        return real_score(m, *args, **kwargs)
    monkeypatch.setattr(metrics, "score_records", spy)
    trainer.validate(records)
    assert scored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, norm[k]) for k, v in norm_state(trainer.net).items())

    editor = RLEditor(model, tok, hp.editing(), hypernet=copy.deepcopy(trainer.net), keep_journal=False)
    with torch.no_grad():
        for i in range(0, len(records), hp.n_edits):
            editor.edit(records[i:i + hp.n_edits])
    for name in GPT2_MODULES:
        assert not torch.equal(scored[f"{name}.weight"], before[f"{name}.weight"])
        torch.testing.assert_close(scored[f"{name}.weight"], model.state_dict()[f"{name}.weight"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("loc_reference", ["step", "initial"])
def test_locality_reference_is_the_pre_step_or_the_initial_model(random_gpt2, world, tmp_path,
                                                                 loc_reference):
    """``loc_reference: step`` scores KL against W_{t-1}; ``initial`` against W_0 for every
    window entry, so at the second step the two references differ (the first edit moved them)."""
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    hp = _train_hp(GPT2_MODULES, tmp_path, traj_len=2, n_trajectories=1, back_depth=2,
                   init_lr=5e-2, loc_reference=loc_reference)
    trainer = SequenceTrainer(model, tok, hp, progress=False)
    batches = trainer._trajectory(world.train_records)
    trainer.rng.seed(hp.seed)                     # run_trajectory replays the same batches
    with torch.no_grad():                         # log p_{W_0} on each batch's locality prompts
        pristine = []
        for b in batches:
            loc = locality_batch(tok, b, hp.max_length)
            logits = model(input_ids=loc["input_ids"], attention_mask=loc["attention_mask"]).logits
            pristine.append(torch.log_softmax(logits[:, :-1], -1)[loc["labels"][:, 1:] != -100])
    seen = []
    real = trainer._edited_loss_backward
    def spy(window, ref):
        seen.append([torch.cat(r) for r in ref])
        return real(window, ref)
    trainer._edited_loss_backward = spy
    trainer.run_trajectory(world.train_records)
    assert [len(refs) for refs in seen] == [1, 2]           # window: batch t, then t-1
    torch.testing.assert_close(seen[0][0], pristine[0])     # t = 0: W_{t-1} is W_0 either way
    for ref, t in zip(seen[1], (1, 0)):
        if loc_reference == "initial":
            torch.testing.assert_close(ref, pristine[t])
        else:
            assert (ref - pristine[t]).abs().max() > 1e-4


def test_continued_trajectories_start_where_the_last_one_ended(random_gpt2, world, tmp_path):
    """``trajectory_start: continue``: trajectory 2 begins on the weights and edit memory that
    trajectory 1 left (not W_0), draws records trajectory 1 did not edit, and the model
    handed back after training is the pristine one."""
    model, tok = random_gpt2
    model = copy.deepcopy(model)
    pristine = copy.deepcopy(model)
    hp = _train_hp(GPT2_MODULES, tmp_path, trajectory_start="continue", key_whitening=True,
                   edit_memory=0.5, n_val=0)
    trainer = SequenceTrainer(model, tok, hp, progress=False,
                              whitening_texts=record_texts(world.train_records[:30]))
    drawn, starts, ends = [], [], []
    real_trajectory, real_edit = trainer._trajectory, trainer.editor.edit_rounds

    def trajectory(records):
        drawn.append(real_trajectory(records))
        return drawn[-1]

    def edit_rounds(records, update_norm=None):
        if records is drawn[-1][0]:
            starts.append(trainer.editor.edit_state())
        out = real_edit(records, update_norm)
        if records is drawn[-1][-1]:
            ends.append(trainer.editor.edit_state())
        return out
    trainer._trajectory, trainer.editor.edit_rounds = trajectory, edit_rounds
    for _ in range(2):
        trainer.run_trajectory(world.train_records[:30])
    prompts = [{r.prompt for batch in trajectory for r in batch} for trajectory in drawn]
    assert len(prompts[0]) == len(prompts[1]) == 6 and not prompts[0] & prompts[1]   # no repeats
    name = GPT2_MODULES[0]
    w0 = dict(pristine.named_parameters())[f"{name}.weight"]
    assert torch.equal(starts[0]["weights"][name], w0)
    assert not torch.equal(ends[0]["weights"][name], w0)
    assert torch.equal(starts[1]["weights"][name], ends[0]["weights"][name])
    torch.testing.assert_close(starts[1]["memory"][name], ends[0]["memory"][name], rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pristine.state_dict().values()))
    with pytest.raises(HParamsError, match="trajectory_start"):
        _train_hp(GPT2_MODULES, tmp_path, trajectory_start="resume").validate()
