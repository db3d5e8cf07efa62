"""Forward-prefix reuse between edit rounds: same weights (bit for bit without the low-rank
head shortcut, to rounding with it), less forward."""
import copy
from unittest import mock

import pytest
import torch
from torch import nn

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.core.prefix import ForwardPrefix
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.models import get_module
from rledit_plugin.world.tiny_lm import random_tiny_lm


def _edit_both_ways(model, tok, records, low_rank_head=True, **kw):
    """Weights after a 3-round edit with and without prefix reuse, and the reusing editor."""
    base = dict(rank=8, n_blocks=1, init_lr=5e-2, max_length=48, edit_minibatch=2, edit_steps=3)
    base.update(kw)
    out, heads = [], []

    class Recording(ForwardPrefix):
        def __init__(self, model, edited, **_):
            super().__init__(model, edited, low_rank_head=low_rank_head)
            heads.append(self)
    for reuse in (True, False):
        editor = RLEditor(copy.deepcopy(model), tok, RLEditHyperParams(reuse_prefix=reuse, **base))
        with mock.patch("rledit_plugin.core.editor.ForwardPrefix", Recording):
            editor.edit(records)
        out.append(editor)
    return out + [heads[0]]


CASES = [("gpt2", ["transformer.h.1.mlp.c_proj"]),
         ("gpt2", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]),
         ("llama", ["model.layers.1.mlp.down_proj"])]


@pytest.mark.parametrize("arch, modules", CASES)
def test_rounds_reusing_the_prefix_give_bit_identical_weights(arch, modules, world, _world_tokenizer):
    model, tok = random_tiny_lm(arch=arch, tok=copy.deepcopy(_world_tokenizer),
                                d_model=32, n_layer=2, n_head=2, d_ff=64)
    records = world.eval_records[:5]                    # 3 minibatches of 2, 2, 1 records
    reusing, plain, prefix = _edit_both_ways(model, tok, records, low_rank_head=False, inner_params=modules)
    assert prefix.head is None
    assert any(not torch.equal(plain.modules[n].weight, get_module(model, n).weight) for n in modules)
    for name in modules:
        assert torch.equal(reusing.modules[name].weight, plain.modules[name].weight), name


@pytest.mark.parametrize("memory", [0.0, 1e-2])   # with the memory the rounds share one K P
@pytest.mark.parametrize("arch, modules", CASES)
def test_the_low_rank_head_shortcut_matches_recomputing_the_head(arch, modules, memory, world,
                                                                 _world_tokenizer):
    """The editor's default: the first edited module's output = recorded + x K^T C per round."""
    model, tok = random_tiny_lm(arch=arch, tok=copy.deepcopy(_world_tokenizer),
                                d_model=32, n_layer=2, n_head=2, d_ff=64)
    model.double()                     # float64: what is left is the order of the sums
    records = world.eval_records[:5]
    reusing, plain, prefix = _edit_both_ways(model, tok, records, inner_params=modules, edit_memory=memory)
    assert prefix.head is get_module(reusing.model, modules[0])      # the shortcut ran
    # one x K^T per distinct right factor: the memory's K P is shared by the 3 rounds
    assert len(prefix._head_updates) == (1 if memory else 3)
    # and computed once per minibatch (5 records in minibatches of 2, 2, 1): with the memory
    # rounds 2 and 3 share one product, without it round 3 reuses round 2's x K_1^T
    assert len(prefix._head_products) == 3 * (1 if memory else 2)
    for name in modules:
        before = get_module(model, name).weight
        change = (plain.modules[name].weight - before).abs().max()
        gap = (reusing.modules[name].weight - plain.modules[name].weight).abs().max()
        assert change > 1e-4 and gap < 1e-12 * change.clamp(min=1), (name, change, gap)


def test_later_rounds_skip_everything_before_the_first_edited_module(random_gpt2, world):
    model, tok = random_gpt2
    hp = RLEditHyperParams(inner_params=["transformer.h.1.mlp.c_proj"], rank=8, n_blocks=1,
                           init_lr=5e-2, max_length=48, edit_minibatch=2, edit_steps=3)
    editor = RLEditor(model, tok, hp)
    conv1d = type(model.transformer.h[1].mlp.c_proj)
    calls = []
    real = conv1d.forward
    with mock.patch.object(conv1d, "forward", autospec=True,
                           side_effect=lambda mod, x: calls.append(mod) or real(mod, x)):
        editor.edit(world.eval_records[:4])           # 2 minibatches x 3 rounds
    # round 1: all 8 Conv1D of both layers; rounds 2-3: none, the edited one included (its
    # recorded output plus the rounds' low-rank corrections)
    assert len(calls) == 2 * 8
    assert calls[-1] is model.transformer.h[1].mlp.c_proj

    prefix = ForwardPrefix(model, editor.modules)
    with prefix.around(0):
        editor.compute_update(world.eval_records[:2])
    names = {m: n for n, m in model.named_modules()}
    assert [names[m] for m in prefix.skip] == [
        "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0",
        "transformer.h.1.ln_1", "transformer.h.1.attn", "transformer.h.1.ln_2",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.act"]
    assert all("forward" not in m.__dict__ for m in prefix.skip)   # nothing left patched


def test_modules_with_hooks_of_their_own_keep_running(random_gpt2, world):
    model, tok = random_gpt2
    seen = []
    model.transformer.h[0].attn.register_forward_hook(lambda mod, args, out: seen.append(out[0].sum()))
    records = world.eval_records[:4]
    reusing, plain, _ = _edit_both_ways(model, tok, records, low_rank_head=False,
                                        inner_params=["transformer.h.1.mlp.c_proj"])
    assert len(seen) == 2 * 2 * 3      # both editors: 2 minibatches x 3 rounds each
    w = "transformer.h.1.mlp.c_proj"
    assert torch.equal(reusing.modules[w].weight, plain.modules[w].weight)
    prefix = ForwardPrefix(reusing.model, reusing.modules)
    with prefix.around(0):
        reusing.compute_update(records[:2])
    assert reusing.model.transformer.h[0] not in prefix.skip            # holds the hooked module
    assert reusing.model.transformer.h[0].ln_1 in prefix.skip           # its siblings still skip


def test_a_hook_rewriting_the_first_edited_modules_output_runs_once_per_round(random_gpt2, world):
    """The shortcut replays the module's own output; somebody else's hook still rewrites it."""
    model, tok = random_gpt2
    model.double()
    name = "transformer.h.1.mlp.c_proj"
    calls = []
    get_module(model, name).register_forward_hook(lambda mod, args, out: calls.append(1) or out * 1.5)
    reusing, plain, prefix = _edit_both_ways(model, tok, world.eval_records[:4], inner_params=[name])
    assert prefix.head is get_module(reusing.model, name)
    assert len(calls) == 2 * 2 * 3      # both editors: 2 minibatches x 3 rounds each
    change = (plain.modules[name].weight - get_module(model, name).weight).abs().max()
    gap = (reusing.modules[name].weight - plain.modules[name].weight).abs().max()
    assert change > 1e-4 and gap < 1e-12, (float(change), float(gap))


def test_a_tied_embedding_of_an_edited_head_is_recomputed(world, _world_tokenizer):
    model, tok = random_tiny_lm(arch="gpt2", tok=copy.deepcopy(_world_tokenizer),
                                d_model=32, n_layer=2, n_head=2, d_ff=64)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    records = world.eval_records[:3]
    reusing, plain, prefix = _edit_both_ways(model, tok, records, inner_params=["lm_head"], init_lr=1e-1)
    assert prefix.head is None                # the edited weight is first read by the embedding
    assert torch.equal(reusing.model.lm_head.weight, plain.model.lm_head.weight)
    prefix = ForwardPrefix(reusing.model, reusing.modules)
    with prefix.around(0):
        reusing.compute_update(records)
    # the forward touches the edited weight first through the embedding: nothing to skip
    assert prefix.skip == []


class _Toy(nn.Module):
    """embed -> mid -> edited, where the forward may change ``mid``'s output in place later."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.embed, self.mid, self.edited = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.in_place = in_place

    def forward(self, x):
        h = self.mid(self.embed(x))
        out = self.edited(h)
        if self.in_place:
            h.mul_(2.0)            # changes the recorded output after its consumer ran
        return out + h.sum(-1, keepdim=True)


@pytest.mark.parametrize("in_place", [False, True])
def test_replay_matches_the_full_forward_and_in_place_changes_switch_it_off(in_place):
    torch.manual_seed(0)
    model, x = _Toy(in_place), torch.randn(5, 3)
    wrapper = lambda *a, **k: type(model.mid).forward(model.mid, *a, **k)   # like accelerate's
    model.mid.forward = wrapper
    prefix = ForwardPrefix(model, {"edited": model.edited})
    outs = []
    for _ in range(3):
        with torch.no_grad():
            with prefix.around(0):
                got = model(x)
            outs.append((got, model(x)))              # the latter: a plain full forward
            model.edited.weight.add_(0.1)             # what an edit round does between captures
    for got, full in outs:
        assert torch.equal(got, full)
    assert prefix.enabled is (not in_place)
    assert model.mid.forward is wrapper               # an instance-level forward is put back
    if not in_place:
        assert prefix.skip == [model.embed, model.mid]


def _spy_masks(monkeypatch):
    """Dimensions of every ``attention_mask`` the capture hands the model, in call order."""
    from rledit_plugin.core import capture as capture_module
    seen, real = [], capture_module.answer_logits

    def spy(model, input_ids, attention_mask, *args, **kwargs):
        seen.append(attention_mask.dim())
        return real(model, input_ids, attention_mask, *args, **kwargs)
    monkeypatch.setattr(capture_module, "answer_logits", spy)
    return seen


@pytest.mark.parametrize("arch, modules", CASES)
def test_later_rounds_pass_the_first_rounds_4d_attention_mask(arch, modules, world, _world_tokenizer,
                                                             monkeypatch):
    """Later rounds hand the model the 4-D mask it built in the first round (no rebuilding);
    the weights stay bit-identical to editing without any reuse."""
    model, tok = random_tiny_lm(arch=arch, tok=copy.deepcopy(_world_tokenizer),
                                d_model=32, n_layer=2, n_head=2, d_ff=64)
    seen = _spy_masks(monkeypatch)
    reusing, plain, _ = _edit_both_ways(model, tok, world.eval_records[:4], low_rank_head=False,
                                        inner_params=modules)
    reusing_calls = seen[:len(seen) // 2]              # 3 rounds x 2 minibatches, then the plain run
    assert reusing_calls[:2] == [2, 2] and 4 in reusing_calls[2:], reusing_calls
    assert set(seen[len(seen) // 2:]) == {2}
    for name in modules:
        assert torch.equal(reusing.modules[name].weight, plain.modules[name].weight), name


def test_a_model_that_rewrites_a_given_4d_mask_gets_the_2d_mask_again(world, _world_tokenizer):
    """If the first live reader of the mask does not receive the recorded tensor, the forward
    stops before any edited module ran and runs again with the 2-D mask, in every later round."""
    model, tok = random_tiny_lm(arch="gpt2", tok=copy.deepcopy(_world_tokenizer),
                                d_model=32, n_layer=2, n_head=2, d_ff=64)
    records = world.eval_records[:4]
    hp = dict(rank=8, n_blocks=1, init_lr=5e-2, max_length=48, edit_minibatch=2, edit_steps=3,
              inner_params=["transformer.h.1.mlp.c_proj"])
    rejected = []

    class Recording(ForwardPrefix):            # bit for bit: without the low-rank head shortcut
        def __init__(self, model, edited, **_):
            super().__init__(model, edited, low_rank_head=False)

        def drop_masks(self):
            rejected.append(bool(self._masks))
            super().drop_masks()
    editors = []
    for reuse in (True, False):
        editor = RLEditor(copy.deepcopy(model), tok, RLEditHyperParams(reuse_prefix=reuse, **hp))
        base = editor.model.transformer
        forward = base.forward

        def rewriting(*args, attention_mask=None, __forward=forward, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 4:   # attend to self only
                attention_mask = attention_mask & torch.eye(attention_mask.shape[-1], dtype=torch.bool)
            return __forward(*args, attention_mask=attention_mask, **kwargs)
        base.forward = rewriting
        with mock.patch("rledit_plugin.core.editor.ForwardPrefix", Recording):
            editor.edit(records)
        editors.append(editor)
    reusing, plain = editors
    name = hp["inner_params"][0]
    assert rejected == [True]                     # once; later rounds pass the 2-D mask
    assert not torch.equal(plain.modules[name].weight, get_module(model, name).weight)
    assert torch.equal(reusing.modules[name].weight, plain.modules[name].weight)
