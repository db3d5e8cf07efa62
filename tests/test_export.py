"""Accumulated edits -> PEFT LoRA adapter: exact reload, Eckart–Young truncation, clear errors."""
from __future__ import annotations

import argparse
import copy
import json
import os

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from conftest import bpe_tokenizer, tiny_gpt2, tiny_llama
from rledit_plugin.core.editor import RLEditor
from rledit_plugin.data.writers import write_easyedit_requests
from rledit_plugin.data.records import EditRecord
from rledit_plugin.export import (EXPORT_META, ExportError, add_export_parser, export_lora,
                                  factorise_update, lora_factors)
from rledit_plugin.hparams import RLEditHyperParams

SUBJECTS = ["Alvor", "Brenn", "Cadra", "Dovik", "Ennis", "Farro", "Gesta", "Holm", "Ivo"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Delhi", "Perth", "Porto"]
GPT2_MODULES = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
LLAMA_MODULES = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster
PROBES = ["Where does Alvor live?", "The home of Gesta is", "Holm works as a"]


def _tokenizer(with_bos: bool):
    lines = [f"{s} lives in {c}. The home of {s} is {c}. Where does {s} live? {c}."
             for s, c in zip(SUBJECTS, CITIES)] * 3
    return bpe_tokenizer(lines, vocab_size=300, with_bos=with_bos)


def _gpt2(tok, tie=True):
    return tiny_gpt2(tok, d_model=64, d_ff=128, tie_word_embeddings=tie,
                     eos_token_id=0, bos_token_id=1, pad_token_id=0)


def _llama(tok, kv_heads=2):
    return tiny_llama(tok, d_model=64, d_ff=128, num_key_value_heads=kv_heads)


def _records():
    # Counterfactual targets: every subject moves to the next city.
    return [EditRecord(prompt=f"Where does {s} live?", target_new=CITIES[(i + 1) % len(CITIES)],
                       paraphrases=[f"The home of {s} is"]) for i, s in enumerate(SUBJECTS)]


def _hp(modules, **kw):
    base = dict(inner_params=modules, rank=8, n_blocks=1, init_lr=1e-2, max_length=32,
                edit_minibatch=4, seed=0)
    base.update(kw)
    return RLEditHyperParams(**base)


@pytest.fixture(scope="module")
def toks():
    return {"gpt2": _tokenizer(with_bos=False), "llama": _tokenizer(with_bos=True)}


def _edited(arch, toks, modules=None, tie=True, batches=3, keep_journal=True, kv_heads=2,
            edit_steps=1):
    """(pristine copy taken before editing, editor whose model carries ``batches`` edits)."""
    tok = toks[arch]
    model = _gpt2(tok, tie) if arch == "gpt2" else _llama(tok, kv_heads)
    modules = modules or (GPT2_MODULES if arch == "gpt2" else LLAMA_MODULES)
    pristine = copy.deepcopy(model)
    editor = RLEditor(model, tok, _hp(modules, edit_steps=edit_steps), keep_journal=keep_journal)
    records = _records()
    for t in range(batches):
        editor.edit(records[3 * t:3 * t + 3])
    return pristine, editor


def _logits(model, tok):
    batch = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def edited(request, toks):
    return request.param, *_edited(request.param, toks)


# ---------------------------------------------------------------------------- factorisation

def test_exact_factors_are_the_stacked_journal(edited):
    arch, _, editor = edited
    for name in editor.modules:
        a, b, info = lora_factors(editor, name)
        rows = sum(u.keys[name].shape[0] for u in editor.journal)
        assert info["rank"] == info["rows"] == rows and info["error"] == 0.0
        assert a.shape == (rows, info["d_in"]) and b.shape == (info["d_out"], rows)
        # float64 sum of the journal's products, and the editor's own fp32 delta
        reference = sum(u.keys[name].double().t() @ u.coeffs[name].double() for u in editor.journal)
        product = (b.double() @ a.double()).t()                        # (d_in, d_out)
        torch.testing.assert_close(product, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(product.float(), editor.delta(name), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["qr", "dense"])
def test_truncation_is_the_best_rank_r_approximation(edited, method):
    _, _, editor = edited
    for name in editor.modules:
        delta = editor.delta(name).double()
        s = torch.linalg.svdvals(delta)
        for r in (1, 3):
            a, b, info = lora_factors(editor, name, rank=r, method=method)
            assert a.shape[0] == b.shape[1] == info["rank"] == r
            eckart_young = float((s[r:] ** 2).sum().sqrt() / s.norm())
            achieved = float(((b.double() @ a.double()).t() - delta).norm() / delta.norm())
            assert eckart_young > 1e-3                       # the truncation really loses something
            assert info["error"] == pytest.approx(eckart_young, rel=1e-4, abs=1e-7)
            assert achieved == pytest.approx(eckart_young, rel=1e-4, abs=1e-7)


def test_factorise_compresses_losslessly_and_auto_picks_the_path():
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(n, 12, generator=gen) for n in (15, 25)]       # R = 40 > min(12, 20)
    coeffs = [torch.randn(n, 20, generator=gen) for n in (15, 25)]
    reference = sum(k.double().t() @ c.double() for k, c in zip(keys, coeffs))   # (12, 20)
    a, b, info = factorise_update(keys, coeffs)
    assert info["method"] == "exact-compressed" and info["rank"] == 12 and info["error"] == 0.0
    torch.testing.assert_close((b.double() @ a.double()).t(), reference, rtol=1e-5, atol=1e-5)
    # the transposed shape compresses the other factor
    a, b, info = factorise_update([c for c in coeffs], [k for k in keys])
    assert info["rank"] == 12 and a.shape == (12, 20) and b.shape == (12, 12)
    torch.testing.assert_close((b.double() @ a.double()), reference, rtol=1e-5, atol=1e-5)
    # R > min width: truncation goes dense; R small: QR; both agree with the SVD
    s = torch.linalg.svdvals(reference)
    assert factorise_update(keys, coeffs, rank=4)[2]["method"] == "dense-svd"
    small = factorise_update([keys[0][:5]], [coeffs[0][:5]], rank=2)
    assert small[2]["method"] == "qr-svd"
    assert factorise_update(keys, coeffs, rank=4)[2]["error"] == pytest.approx(
        float((s[4:] ** 2).sum().sqrt() / s.norm()), rel=1e-6)
    with pytest.raises(ExportError, match="rank must be >= 1"):
        factorise_update(keys, coeffs, rank=0)


# ---------------------------------------------------------------------------- adapter

def test_exact_adapter_reproduces_the_edited_model(edited, toks, tmp_path):
    arch, pristine, editor = edited
    tok = toks[arch]
    result = export_lora(editor, str(tmp_path / "adapter"))
    assert os.path.isfile(result["adapter_weights"]) and os.path.isfile(result["adapter_config"])
    config = json.load(open(result["adapter_config"]))
    assert sorted(config["target_modules"]) == sorted(editor.modules)
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    tensors = load_file(result["adapter_weights"])
    assert len(tensors) == 2 * len(editor.modules)
    meta = json.load(open(tmp_path / "adapter" / EXPORT_META))
    assert meta["n_edit_batches"] == 3 and all(m["error"] == 0.0 for m in meta["modules"].values())

    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter")).eval()
    edited_logits, loaded_logits = _logits(editor.model, tok), _logits(loaded, tok)
    torch.testing.assert_close(loaded_logits, edited_logits, rtol=1e-4, atol=1e-5)
    assert (_logits(pristine, tok) - edited_logits).abs().max() > 1e-3
    # the export left the live editor and its model alone
    assert not any("lora" in n for n, _ in editor.model.named_modules())


def test_two_round_batches_export_exactly(toks, tmp_path):
    """With edit_steps 2 each journal entry stacks both rounds' factors; the adapter still
    reproduces the edited model and counts edit batches, not rounds."""
    pristine, editor = _edited("gpt2", toks, edit_steps=2)
    assert all(entry.rounds and len(entry.rounds) == 2 for entry in editor.journal)
    export_lora(editor, str(tmp_path / "adapter"))
    meta = json.load(open(tmp_path / "adapter" / EXPORT_META))
    assert meta["n_edit_batches"] == 3
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(loaded, toks["gpt2"]), _logits(editor.model, toks["gpt2"]),
                               rtol=1e-4, atol=1e-5)


def test_truncated_adapter_carries_the_truncated_factors(edited, toks, tmp_path):
    arch, pristine, editor = edited
    result = export_lora(editor, str(tmp_path / "r2"), rank=2)
    assert all(info["rank"] == 2 and info["error"] > 0 for info in result["modules"].values())
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "r2"))
    inner = loaded.base_model.model
    for name in editor.modules:
        a, b, _ = lora_factors(editor, name, rank=2)
        layer = inner.get_submodule(name)
        torch.testing.assert_close(layer.lora_A["default"].weight, a)
        torch.testing.assert_close(layer.lora_B["default"].weight, b)
        assert layer.scaling["default"] == 1.0


def test_mixed_layouts_export_exactly(toks, tmp_path):
    """GPT-2 Conv1D c_fc together with the (untied) nn.Linear lm_head."""
    pristine, editor = _edited("gpt2", toks, modules=["transformer.h.1.mlp.c_fc", "lm_head"],
                               tie=False, batches=2)
    export_lora(editor, str(tmp_path / "mixed"))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):   # PEFT fixes the minority layout
        loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "mixed"))
    inner = loaded.base_model.model
    assert inner.get_submodule("transformer.h.1.mlp.c_fc").fan_in_fan_out is True
    assert inner.get_submodule("lm_head").fan_in_fan_out is False
    torch.testing.assert_close(_logits(loaded, toks["gpt2"]), _logits(editor.model, toks["gpt2"]),
                               rtol=1e-4, atol=1e-5)


def test_modules_of_different_ranks_use_rank_pattern(toks, tmp_path):
    """GQA k_proj (64 -> 32) compresses to rank 32 while up_proj keeps all R > 32 rows."""
    modules = ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    pristine, editor = _edited("llama", toks, modules=modules, kv_heads=1)
    rows = sum(u.keys[modules[0]].shape[0] for u in editor.journal)
    assert 32 < rows <= 64
    result = export_lora(editor, str(tmp_path / "ranks"))
    assert result["modules"][modules[0]]["rank"] == 32
    assert result["modules"][modules[0]]["method"] == "exact-compressed"
    assert result["modules"][modules[1]]["rank"] == rows
    config = json.load(open(result["adapter_config"]))
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path / "ranks"))
    torch.testing.assert_close(_logits(loaded, toks["llama"]), _logits(editor.model, toks["llama"]),
                               rtol=1e-4, atol=1e-5)


def test_no_journal_or_no_edits_is_a_clear_error(toks, tmp_path):
    _, editor = _edited("gpt2", toks, batches=1, keep_journal=False)
    with pytest.raises(ExportError, match="keep_journal=False"):
        export_lora(editor, str(tmp_path / "x"))
    fresh = RLEditor(_gpt2(toks["gpt2"]), toks["gpt2"], _hp(GPT2_MODULES))
    with pytest.raises(ExportError, match="no edits"):
        export_lora(fresh, str(tmp_path / "x"))
    _, edited_one = _edited("gpt2", toks, batches=1)
    with pytest.raises(ExportError, match="not edited"):
        lora_factors(edited_one, "transformer.h.0.mlp.c_fc")
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------------------- CLI

def test_cli_export_matches_an_in_process_stream(toks, tmp_path):
    tok = toks["gpt2"]
    model_dir = tmp_path / "base"
    _gpt2(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    hp = dict(_hp(GPT2_MODULES).to_dict(), model_name=str(model_dir))
    hp_path = tmp_path / "hp.yaml"
    hp_path.write_text(yaml.safe_dump(hp))
    data = write_easyedit_requests(_records()[:6], tmp_path / "requests.json")

    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli-adapter"
    args = parser.parse_args(["export-lora", "--hparams", str(hp_path), "--data", str(data),
                              "--turns", "2", "--batch", "3", "--out", str(out)])
    assert args.func(args) == 0
    assert json.load(open(out / EXPORT_META))["n_edit_batches"] == 2

    # the same stream in process gives the same edited model
    base = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    editor = RLEditor(copy.deepcopy(base), tok, RLEditHyperParams(**hp), keep_journal=True)
    records = _records()
    editor.edit(records[:3])
    editor.edit(records[3:6])
    loaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(_logits(loaded, tok), _logits(editor.model, tok), rtol=1e-4, atol=1e-5)

    too_many = parser.parse_args(["export-lora", "--hparams", str(hp_path), "--data", str(data),
                                  "--turns", "3", "--batch", "3", "--out", str(out)])
    with pytest.raises(SystemExit, match="has 6 records"):
        too_many.func(too_many)
