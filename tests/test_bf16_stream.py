"""The editor on 16-bit weights: compensated accumulation keeps the journal's cumulative update.

A few small edit batches into a tiny bf16 GPT-2 / Llama. Each run is compared
with its own journal (the exact fp64 sum of the applied low-rank factors): with
``accumulate: none`` part of every update rounds away; with an fp32 residual the
bf16 weight must be the journal's value rounded once (within one bf16 ulp per
element) and weight + residual must carry the journal's sum to fp32 accuracy.
"""
import copy

import pytest
import torch

from rledit_plugin.core.editor import RLEditor
from rledit_plugin.hparams import RLEditHyperParams
from rledit_plugin.kernels import make_residual, update_survival
from rledit_plugin.models import weight_view

MODULES = {"gpt2": ["transformer.h.1.mlp.c_proj"], "llama": ["model.layers.1.mlp.down_proj"]}
# Chosen so the cumulative update is ~3% of ||W|| and each turn's part of it is
# near bf16's resolution, where rounding on store loses a visible share.
INIT_LR = {"gpt2": 1e-3, "llama": 0.3}
N_TURNS, PER_TURN = 12, 2


def _hp(arch, accumulate):
    return RLEditHyperParams(inner_params=MODULES[arch], rank=8, n_blocks=2, init_lr=INIT_LR[arch],
                             max_length=48, edit_minibatch=3, torch_dtype="bfloat16",
                             accumulate=accumulate, kernel_path="torch")


@pytest.fixture(params=["gpt2", "llama"])
def bf16_pair(request, random_gpt2, random_llama):
    model, tok = random_gpt2 if request.param == "gpt2" else random_llama
    return request.param, copy.deepcopy(model).to(torch.bfloat16), tok


def _stream(arch, model, tok, records, accumulate):
    editor = RLEditor(model, tok, _hp(arch, accumulate), keep_journal=True)
    name = MODULES[arch][0]
    start = weight_view(editor.modules[name]).detach().double().clone()
    for turn in range(N_TURNS):
        editor.edit(records[turn * PER_TURN:(turn + 1) * PER_TURN])
    intended = sum((u.keys[name].double().t() @ u.coeffs[name].double()).t() for u in editor.journal)
    final = weight_view(editor.modules[name]).detach()
    return start, final, editor._residuals[name], intended


def test_residual_keeps_the_journal_sum_on_bf16_weights(bf16_pair, world):
    arch, model, tok = bf16_pair
    records = world.train_records[:N_TURNS * PER_TURN]
    start_n, final_n, res_n, want_n = _stream(arch, copy.deepcopy(model), tok, records, "none")
    start_c, final_c, res_c, want_c = _stream(arch, copy.deepcopy(model), tok, records, "fp32")
    assert res_n is None and res_c is not None and res_c.dtype == torch.float32
    assert final_c.dtype == torch.bfloat16

    lost = update_survival(start_n, final_n, want_n)
    kept = update_survival(start_c, final_c, want_c)
    # Without compensation a visible part of the update is lost; the setting must make it so.
    assert lost["rel_error"] > 0.1, lost
    assert kept["rel_error"] < 0.5 * lost["rel_error"], (kept, lost)
    assert abs(kept["fraction"] - 1.0) < 0.02, kept

    # The bf16 weight is the exact running value rounded once: within one ulp per element.
    exact = start_c + want_c
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert ((final_c.double() - exact).abs() <= ulp * 1.0001).all()
    # Weight + residual carries the sum to fp32 accuracy.
    tracked = update_survival(start_c, final_c.double() + res_c.double(), want_c)
    assert tracked["rel_error"] < 1e-4, tracked


def test_editor_builds_residuals_in_the_kernel_layout(bf16_pair):
    """Residuals have the (d_out, d_in) layout the kernel applies to (Conv1D weights are transposed)."""
    arch, model, tok = bf16_pair
    editor = RLEditor(model, tok, _hp(arch, "kahan"))
    for name, module in editor.modules.items():
        res = editor._residuals[name]
        assert res.shape == weight_view(module).shape and res.dtype == torch.bfloat16


# ----------------------------------------- the tiled CPU route at high rank
def _bound_ok(weight, ref, left, right, alpha, accum_tol=1e-5):
    """Within one ulp of the weight dtype plus fp32-accumulation error of the product."""
    fin = torch.finfo(weight.dtype)
    bound = (fin.eps * ref.abs() + accum_tol * abs(alpha) * (left.double().abs() @ right.double().abs())
             + fin.tiny * fin.eps)
    return ((weight.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("layout", ("contiguous", "transposed"))
@pytest.mark.parametrize("dtype,accumulate", [(torch.float32, "none"), (torch.bfloat16, "none"),
                                              (torch.bfloat16, "fp32"), (torch.bfloat16, "kahan")], ids=str)
def test_tiled_high_rank_route_matches_fp64(dtype, accumulate, layout, monkeypatch):
    # Rank >= ONEDNN_MIN_RANK on CPU takes the tiled route; small tiles make a
    # ragged 2-D grid so every tile edge is crossed (the default covers W at once).
    from rledit_plugin.kernels import torch_path
    m, k, rank = 70, 150, torch_path.ONEDNN_MIN_RANK + 8
    gen = torch.Generator().manual_seed(11)
    storage = torch.randn(*((m, k) if layout == "contiguous" else (k, m)), generator=gen).to(dtype)
    weight = storage if layout == "contiguous" else storage.t()
    left = torch.randn(m, rank, generator=gen, dtype=torch.float64) / rank ** 0.5
    right = torch.randn(rank, k, generator=gen, dtype=torch.float64) * 1e-2
    left, right = left.float(), right.float()
    residual = make_residual(weight, accumulate)
    if residual is not None:
        residual.copy_(torch.randn(m, k, generator=gen) * 1e-4)
    ref = weight.double() + 0.7 * (left.double() @ right.double())
    if residual is not None:
        ref += residual.double()
    monkeypatch.setattr(torch_path, "TILE_COLS", 32)
    onednn = torch_path.use_onednn(weight, torch.float32, rank)
    torch_path.apply_low_rank_torch_(weight, left, right, 0.7, residual, chunk_bytes=3 * 4 * 32 * 8)
    if residual is None:
        assert _bound_ok(weight, ref, left, right, 0.7)
    else:  # the weight is the running value rounded once; weight + residual carries it
        assert _bound_ok(weight, ref, left, right, 0.7)
        tracked = weight.double() + residual.double()
        # fp32 residual: fp32 rounding; bf16 residual: its own rounding, half a bf16
        # ulp of a value that is itself at most half a bf16 ulp of the weight.
        rel = 2.0 ** -23 if accumulate == "fp32" else 2.0 ** -16
        bound = rel * ref.abs() + 1e-5 * 0.7 * (left.double().abs() @ right.double().abs()) + 1e-30
        assert ((tracked - ref).abs() <= bound).all(), ((tracked - ref).abs() / bound).max()
    if not onednn:
        pytest.skip("oneDNN fp32 matmul not available here: the BLAS tiles were checked instead")
