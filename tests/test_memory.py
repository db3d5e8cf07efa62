"""Edit memory: Woodbury inverse vs direct inverse, the editor's update vs the primal ridge,
exact rollback, and the bookkeeping around it."""
import copy

import pytest
import torch

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.core.memory import EditMemory
from rledit_plugin.core.whitening import record_texts, whitening_matrix
from rledit_plugin.hparams import HParamsError, RLEditHyperParams

MODULE = "transformer.h.1.mlp.c_proj"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("whitened", [False, True])
def test_woodbury_inverse_equals_the_direct_inverse(whitened, device):
    torch.manual_seed(0)
    d, c = 9, 0.3
    x = torch.randn(60, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    s = whitening_matrix(x.T @ x / 60, 0.05).double().to(device) if whitened else None
    memory = EditMemory(c, {"m": s}.get, {"m": d})
    a = torch.linalg.inv(s @ s) if whitened else torch.eye(d, dtype=torch.float64, device=device)
    for n in (3, 1, 5, 4):                                 # overlapping batches: more rows than d
        k = torch.randn(n, d, dtype=torch.float64).to(device)
        right, gram = memory.factors("m", k)
        p = memory.inverse("m", k)
        torch.testing.assert_close(right, k @ p)
        torch.testing.assert_close(gram, k @ p @ k.T)
        memory.add("m", k, right, gram)
        a = a + c * k.T @ k
        torch.testing.assert_close(memory.inverse("m", k), torch.linalg.inv(a), rtol=1e-9, atol=1e-10)
    memory.reset()
    start = s @ s if whitened else torch.eye(d, dtype=torch.float64, device=device)
    torch.testing.assert_close(memory.inverse("m", k), start, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="> 0"):
        EditMemory(0.0, {"m": None}.get, {"m": d})


def _editor(random_gpt2, world, whitened, **kw):
    model, tok = random_gpt2
    model = copy.deepcopy(model).double()
    hp = RLEditHyperParams(inner_params=[MODULE], rank=8, n_blocks=1, init_lr=1e-2, max_length=48,
                           key_whitening=whitened, whitening_damping=0.05, edit_memory=0.5, **kw)
    editor = RLEditor(model, tok, hp, whitening_texts=record_texts(world.train_records[:8]))
    editor.hypernet.double()
    return editor


@pytest.mark.parametrize("whitened", [False, True])
def test_each_batch_solves_the_ridge_with_earlier_keys_in_the_penalty(random_gpt2, world, whitened):
    """Batch t's update is (K^T K + e^lam A_t)^-1 K^T D with A_t = A_0 + c sum_{s<t} K_s^T K_s."""
    editor = _editor(random_gpt2, world, whitened)
    module = editor.modules[MODULE]
    if whitened:
        s = editor.hypernet.whitening(MODULE).double()
        tikhonov = torch.linalg.inv(s @ s)
    else:
        tikhonov = torch.eye(module.weight.shape[0], dtype=torch.float64)   # Conv1D: (d_in, d_out)
    recs = world.eval_records
    for t in range(3):
        before = module.weight.detach().clone()
        update = editor.edit_rounds(recs[4 * t:4 * t + 4])[0]
        k = update.capture.keys[MODULE].double()
        d = update.values[MODULE].double()
        lam = editor.hypernet.lam(MODULE).double()
        primal = torch.linalg.solve(k.T @ k + lam.exp() * tikhonov, k.T @ d)
        torch.testing.assert_close(module.weight.detach() - before, primal, rtol=1e-7, atol=1e-10)
        tikhonov = tikhonov + editor.hparams.edit_memory * k.T @ k


def test_memory_changes_later_updates_and_rollback_restores_it_exactly(random_gpt2, world):
    editor = _editor(random_gpt2, world, True, edit_steps=2)
    plain = _editor(random_gpt2, world, True, edit_steps=2)
    plain.memory = None
    recs = world.eval_records
    for ed in (editor, plain):
        ed.edit(recs[0:4])
    w = {ed: ed.modules[MODULE].weight.detach() for ed in (editor, plain)}
    torch.testing.assert_close(w[editor], w[plain], rtol=1e-9, atol=1e-12)   # batch 1 sees only A_0
    editor.edit(recs[4:8])
    plain.edit(recs[4:8])
    assert not torch.allclose(w[editor], w[plain])         # the second one does not
    after_two = w[editor].clone()
    p_two = editor.memory.inverse(MODULE, w[editor]).clone()
    editor.edit(recs[8:12])
    editor.rollback(1)
    assert torch.equal(editor.modules[MODULE].weight.detach(), after_two)
    assert torch.equal(editor.memory.inverse(MODULE, after_two), p_two)
    editor.restore()
    first = _editor(random_gpt2, world, True, edit_steps=2)
    assert torch.equal(editor.memory.inverse(MODULE, after_two), first.memory.inverse(MODULE, after_two))


def test_edit_memory_must_not_be_negative():
    with pytest.raises(HParamsError, match="edit_memory"):
        RLEditHyperParams(edit_memory=-1.0).validate("x.yaml")
