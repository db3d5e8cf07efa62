"""RLEdit inside EasyEdit (the installed easyeditor: the PyPI release in CI).

Small random GPT-2s on the world's tokenizer keep these fast (conftest fixtures);
the metric agreement test uses the cached pre-trained tiny LM.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from rledit_plugin.data.formats import records_from_requests
from rledit_plugin.data.writers import record_to_request
from rledit_plugin.hosts import easyedit as host
from rledit_plugin.hparams import RLEditHyperParams

pytestmark = [
    pytest.mark.easyedit,
    pytest.mark.skipif(importlib.util.find_spec("easyeditor") is None,
                       reason="easyeditor is not installed (make setup-full installs it)"),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ee(tmp_path_factory):
    """easyeditor imported; the CPU shim on for the release; cwd in a temp dir (EasyEdit writes ./logs)."""
    module = host.import_easyeditor()
    shim = host.host_flavour() == "release" and not torch.cuda.is_available()
    if shim:
        host.enable_cpu_shim()
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("easyedit_cwd"))
    yield module
    os.chdir(cwd)
    if shim:
        host.disable_cpu_shim()


@pytest.fixture
def small(random_gpt2):
    """A tiny random GPT-2 on the world's tokenizer (conftest), free to edit."""
    model, tok = random_gpt2
    # EasyEdit feeds **tok(...) to the model; GPT-2 adds wte[token_type_ids] when a
    # tokenizer returns them (real GPT-2 tokenizers do not).
    tok.model_input_names = ["input_ids", "attention_mask"]
    return model, tok


def easyedit_request(record):
    """EasyEdit's evaluation takes one rephrase prompt per request (a list would be mis-zipped)."""
    request = record_to_request(record)
    if record.paraphrases:
        request["rephrase_prompt"] = record.paraphrases[0]
    return request


@pytest.fixture(scope="module")
def requests_(world):
    return [easyedit_request(r) for r in world.records("eval")[:6]]


def hparams(**over):
    # A large initial step so that even an untrained hypernetwork moves the weights visibly.
    base = dict(rank=8, n_blocks=1, init_lr=1e-2, batch_size=1, device="cpu", max_length=32)
    base.update(over)
    return RLEditHyperParams(**base)


def edited(model, editor):
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in editor.edited_param_names}


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def edit_kwargs(reqs, locality=True):
    out = dict(prompts=[r["prompt"] for r in reqs], target_new=[r["target_new"] for r in reqs],
               ground_truth=[r["ground_truth"] for r in reqs],
               rephrase_prompts=[r["rephrase_prompt"] for r in reqs], verbose=False)
    if locality:
        out["locality_inputs"] = {"neighborhood": {
            k: [r["locality"]["neighborhood"][k] for r in reqs] for k in ("prompt", "ground_truth")}}
    return out


def accumulate():
    """Editing-call arguments that keep edits: the release's default; HEAD's sequential_edit."""
    return {"sequential_edit": True} if host.host_flavour() == "head" else {}


def restore_after():
    """Editing-call arguments that restore the weights after each edit."""
    return {} if host.host_flavour() == "head" else {"keep_original_weight": True}


def direct_editor(model, tok, hp, batches):
    """An RLEditor driven directly, the reference for what EasyEdit should produce."""
    from rledit_plugin.core.editor import RLEditor
    editor = RLEditor(model, tok, hp)
    for reqs in batches:
        editor.edit(records_from_requests(reqs))
    return editor


# ------------------------------------------------------------------ import and registration

def test_import_does_not_load_easyeditor_and_registration_follows_its_import():
    code = ("import sys, rledit_plugin; assert 'easyeditor' not in sys.modules; "
            "import easyeditor; from easyeditor.util.alg_dict import ALG_DICT; "
            "from easyeditor.util.alg_train_dict import ALG_TRAIN_DICT; "
            "from easyeditor.editors.batch_editor import BatchEditor; "
            "from rledit_plugin.hosts.easyedit import apply_rledit_to_model; "
            "assert ALG_DICT['RLEdit'] is apply_rledit_to_model; assert 'RLEDIT' in ALG_TRAIN_DICT; "
            "assert BatchEditor.is_batchable_method('RLEdit'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_without_easyeditor_nothing_is_registered():
    code = ("import sys; sys.modules['easyeditor'] = None\n"   # makes `import easyeditor` fail
            "import rledit_plugin\nfrom rledit_plugin.hosts import easyedit as h\n"
            "assert h.register() is False and h.host_flavour() is None and not h.is_registered()\n"
            "try:\n    h.import_easyeditor()\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_registration_is_idempotent(ee):
    from easyeditor.editors.batch_editor import BatchEditor
    from easyeditor.util.alg_dict import ALG_DICT
    from easyeditor.util.alg_train_dict import ALG_TRAIN_DICT
    before = BatchEditor.is_batchable_method
    train_cls = ALG_TRAIN_DICT["RLEDIT"]
    assert host.register() and host.register()
    assert BatchEditor.is_batchable_method is before           # not wrapped twice
    assert ALG_DICT["RLEdit"] is host.apply_rledit_to_model and ALG_TRAIN_DICT["RLEDIT"] is train_cls
    assert BatchEditor.is_batchable_method("RLEdit") and BatchEditor.is_batchable_method("MEMIT")
    assert not BatchEditor.is_batchable_method("ROME")          # the original list still decides
    with pytest.raises(NotImplementedError, match="RLEditTrainer"):
        train_cls(None, None, None)


def test_multimodal_standins_say_why(ee):
    standins = [m for m in sys.modules.values() if getattr(m, "__rledit_standin__", False)]
    if not standins:
        pytest.skip("the multimodal dependencies are installed: no stand-ins needed")
    cls = next(getattr(m, n) for m in standins for n in dir(m) if n[0].isupper())
    with pytest.raises(ImportError, match="stand-in"):
        cls()


def test_yaml_names_real_modules():
    """Each hparams/RLEdit/<model>.yaml loads and names modules that exist in that architecture."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, \
        MistralForCausalLM
    from rledit_plugin.models import get_module, io_dims
    configs = {
        "gpt2-xl.yaml": (GPT2LMHeadModel, GPT2Config(n_layer=48, n_embd=1600, n_head=25)),
        "llama3-8b.yaml": (LlamaForCausalLM, LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                                         num_hidden_layers=32, num_attention_heads=32,
                                                         num_key_value_heads=8, vocab_size=128256)),
        "mistral-7b.yaml": (MistralForCausalLM, MistralConfig(hidden_size=4096, intermediate_size=14336,
                                                              num_hidden_layers=32, vocab_size=32768)),
    }
    for name, (cls, cfg) in configs.items():
        hp = RLEditHyperParams.from_hparams(os.path.join(REPO, "hparams", "RLEdit", name))
        with torch.device("meta"):
            model = cls(cfg)
        dims = {io_dims(get_module(model, m)) for m in hp.inner_params}
        assert hp.inner_params and dims, name
        if name == "mistral-7b.yaml":
            assert dims == {(14336, 4096)}


# ------------------------------------------------------------------ the apply contract

def test_apply_contract_weights_copy_and_restore(small, requests_):
    model, tok = small
    hp = hparams()
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, weights_copy = host.apply_rledit_to_model(model, tok, requests_[:2], hp, return_orig_weights=True,
                                                 keep_original_weight=True)
    editor = host.get_editor(model)
    assert sorted(weights_copy) == sorted(editor.edited_param_names)
    assert same(weights_copy, {n: pristine[n] for n in weights_copy})
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, pristine[n])}
    assert changed == set(weights_copy)                        # exactly the edited weights moved
    with torch.no_grad():                                      # what EasyEdit does with it
        for n, p in model.named_parameters():
            if n in weights_copy:
                p[...] = weights_copy[n]
    assert len(host.get_editor(model).journal) == 0            # the editor noticed and rolled back
    _, second = host.apply_rledit_to_model(model, tok, requests_[2:3], hp, return_orig_weights=True,
                                           keep_original_weight=True)
    assert len(host.get_editor(model).journal) == 1 and same(second, weights_copy)


@pytest.mark.parametrize("memory", [0.0, 0.5])
def test_apply_matches_direct_editor_and_copy_leaves_original(small, requests_, memory):
    """Also with the edit memory: it lives with the model's editor across calls."""
    model, tok = small
    reference = copy.deepcopy(model)
    hp = hparams(edit_memory=memory)
    host.apply_rledit_to_model(model, tok, requests_[:2], hp)
    host.apply_rledit_to_model(model, tok, requests_[2:4], hp)
    ref_editor = direct_editor(reference, tok, hparams(edit_memory=memory), [requests_[:2], requests_[2:4]])
    assert same(edited(model, ref_editor), edited(reference, ref_editor))
    before = edited(model, ref_editor)
    new_model, _ = host.apply_rledit_to_model(model, tok, requests_[4:5], hp, copy=True)
    assert new_model is not model and same(edited(model, ref_editor), before)
    assert len(host.get_editor(new_model).journal) == 3 and len(host.get_editor(model).journal) == 2
    assert not same(edited(new_model, ref_editor), before)


def test_head_semantics_return_copies_without_keep_original_weight(small, requests_, monkeypatch):
    """HEAD writes weights_copy back itself: copies come back even with keep_original_weight=False."""
    model, tok = small
    monkeypatch.setattr(host, "host_flavour", lambda: "head")
    _, weights_copy = host.apply_rledit_to_model(model, tok, requests_[:1], hparams(),
                                                 return_orig_weights=True)
    assert weights_copy
    monkeypatch.setattr(host, "host_flavour", lambda: "release")
    _, weights_copy = host.apply_rledit_to_model(model, tok, requests_[:1], hparams(),
                                                 return_orig_weights=True)
    assert weights_copy == {}                                  # release: edits accumulate


def test_changed_structure_starts_a_new_editor(small, requests_):
    model, tok = small
    host.apply_rledit_to_model(model, tok, requests_[:1], hparams())
    first = host.get_editor(model)
    with pytest.warns(UserWarning, match="rank"):
        host.apply_rledit_to_model(model, tok, requests_[1:2], hparams(rank=4))
    assert host.get_editor(model) is not first and len(host.get_editor(model).journal) == 1
    second = host.get_editor(model)
    with pytest.warns(UserWarning, match="edit_memory"):    # the memory's weight is baked into it
        host.apply_rledit_to_model(model, tok, requests_[2:3], hparams(rank=4, edit_memory=0.5))
    assert host.get_editor(model) is not second and host.get_editor(model).memory is not None


# ------------------------------------------------------------------ BaseEditor

def test_base_editor_edit_accumulates_like_direct_editing(ee, small, requests_):
    model, tok = small
    reference = copy.deepcopy(model)
    editor = ee.BaseEditor.from_hparams(hparams(model_name=(model, tok)))   # the raw EasyEdit way
    editor.model_name = editor.hparams.model_name = host.family_name(model)
    metrics, edited_model, _ = editor.edit(**edit_kwargs(requests_[:3]), **accumulate())
    assert edited_model is model and len(metrics) == 3
    assert {"rewrite_acc", "rephrase_acc", "locality"} <= set(metrics[0]["post"])
    assert 0.0 <= metrics[0]["post"]["locality"]["neighborhood_acc"][0] <= 1.0
    ref = direct_editor(reference, tok, hparams(), [[r] for r in requests_[:3]])
    assert len(host.get_editor(model).journal) == 3
    assert same(edited(model, ref), edited(reference, ref))
    assert not same(edited(model, ref), ref.original_weights())


def test_base_editor_keep_original_weight_restores(ee, small, requests_):
    model, tok = small
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = host.make_editor(hparams(), model, tok)
    metrics, _, _ = editor.edit(**edit_kwargs(requests_[:2]), **restore_after())
    assert all(torch.equal(p, pristine[n]) for n, p in model.named_parameters())
    assert len(host.get_editor(model).journal) == 0


def test_batch_edit_chunks(ee, small, requests_):
    model, tok = small
    reference = copy.deepcopy(model)
    hp = hparams(batch_size=2)
    editor = host.make_editor(hp, model, tok)
    # the release passes batch_edit's locality arguments into the wrong parameters: none there
    metrics, _, _ = editor.batch_edit(**edit_kwargs(requests_[:4], locality=host.host_flavour() == "head"),
                                      **accumulate())
    assert metrics and "rewrite_acc" in metrics[0]["post"]
    ref = direct_editor(reference, tok, hparams(batch_size=2), [requests_[:2], requests_[2:4]])
    assert len(host.get_editor(model).journal) == 2
    assert same(edited(model, ref), edited(reference, ref))


def test_make_editor_drops_token_type_ids(ee, random_gpt2):
    model, tok = random_gpt2
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    with pytest.warns(UserWarning, match="token_type_ids"):
        editor = host.make_editor(hparams(), model, tok)
    assert "token_type_ids" not in editor.tok("a question?")


def test_make_editor_refuses_release_on_cpu_without_shim(ee, small):
    if host.host_flavour() != "release" or torch.cuda.is_available():
        pytest.skip("only the release on a CPU-only machine needs the shim")
    host.disable_cpu_shim()
    try:
        with pytest.raises(RuntimeError, match="cpu_shim"):
            host.make_editor(hparams(), *small)
    finally:
        host.enable_cpu_shim()


def test_local_model_directory(ee, small, requests_, tmp_path):
    model, tok = small
    path = tmp_path / "tiny-gpt2-local"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    editor = host.make_editor(hparams(model_name=str(path)))
    assert (path / "vocab.json").exists()                       # written for GPT2Tokenizer
    assert type(editor.tok).__name__ == "GPT2Tokenizer"
    prompt = requests_[0]["prompt"] + " " + requests_[0]["target_new"]
    assert editor.tok(prompt)["input_ids"] == tok(prompt)["input_ids"]
    metrics, _, _ = editor.edit(**edit_kwargs(requests_[:1]), **accumulate())
    assert len(host.get_editor(editor.model).journal) == 1 and "rewrite_acc" in metrics[0]["post"]
    unnamed = tmp_path / "mymodel"
    model.save_pretrained(unnamed)
    with pytest.raises(ValueError, match="gpt"):
        host.prepare_model_dir(str(unnamed))


def test_a_bad_request_is_refused_before_any_is_edited(ee, small, requests_):
    """BaseEditor edits request after request: a bad fifth one must be found before the first
    four are written, and named by its index in the caller's list."""
    from rledit_plugin.data.records import RecordError
    model, tok = small
    editor = host.make_editor(hparams(batch_size=2), model, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = edit_kwargs(requests_)
    kwargs["target_new"][4] = "  "
    for call in (editor.edit, editor.batch_edit):
        with pytest.raises(RecordError, match=r"<prompts/target_new>, record 4, field 'target_new'"):
            call(**kwargs, **accumulate())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert host.get_editor(model) is None or not host.get_editor(model).journal


# ------------------------------------------------------------------ datasets and metrics

def test_easyedit_datasets_load_the_world_files(ee, world, small, tmp_path):
    from rledit_plugin.data.formats import load_records
    from rledit_plugin.data.writers import write_counterfact_easyedit
    from rledit_plugin.world.facts import write_world_files
    files = write_world_files(world, str(tmp_path))
    zsre = ee.ZsreDataset(files["zsre_eval.json"])
    ours = load_records(files["zsre_eval.json"])
    assert len(zsre) == len(ours)
    from_ds = records_from_requests([zsre[i] for i in range(len(zsre))])
    assert [(r.prompt, r.target_new, r.paraphrases, r.locality_answers) for r in from_ds] == \
        [(r.prompt, r.target_new, r.paraphrases, r.locality_answers) for r in ours]
    cf_path = write_counterfact_easyedit(world.records("eval")[:8], tmp_path / "cf_easyedit.json")
    cf = ee.CounterFactDataset(str(cf_path))
    assert len(cf) == 8 and cf[0]["target_new"] == world.records("eval")[0].target_new
    model, tok = small
    hp = hparams(batch_size=4)
    editor = host.make_editor(hp, model, tok)
    if host.host_flavour() == "head":       # HEAD edits datasets through edit_requests
        metrics, _, _ = editor.batch_edit(prompts=[cf[i]["prompt"] for i in range(8)],
                                          target_new=[cf[i]["target_new"] for i in range(8)],
                                          verbose=False, **accumulate())
    else:
        metrics, _, _ = editor.edit_dataset(cf, keep_original_weight=False, verbose=False)
    assert len(host.get_editor(model).journal) == 2 and metrics


def known_answer(model, tok, prompt):
    """The model's own greedy next word after ``prompt`` when it is one whole token, else None."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = int(model(ids).logits[0, -1].argmax())
    text = tok.decode([nxt]).strip()
    ok = text.isalpha() and tok(" " + text, add_special_tokens=False)["input_ids"] == [nxt]
    return text if ok else None


def test_easyedit_metrics_agree_with_ours(ee, world, small):
    """compute_edit_quality and rledit_plugin's metrics give the same numbers, request by request."""
    from rledit_plugin.evaluation.metrics import answer_stats, capture_reference, score_records
    model, tok = small
    requests, n_known = [], 0
    for record in world.records("eval")[:40]:
        request = easyedit_request(record)
        known = known_answer(model, tok, record.prompt)
        if known is not None and n_known < 4:        # a target the model already predicts
            request["target_new"], n_known = known, n_known + 1
        requests.append(request)
        if len(requests) >= 8 and n_known >= 2:
            break
    hp = hparams(init_lr=1e-1)
    name, device = host.family_name(model), hp.device

    def compare(model_state):
        seen = set()
        for q in requests:
            theirs = ee.compute_edit_quality(model, name, hp, tok, q, device)
            rec = records_from_requests([q])[0]
            ours = answer_stats(model, tok, [rec.prompt] + rec.paraphrases, [rec.target_new] * 2)
            assert theirs["rewrite_acc"][0] == pytest.approx(ours[0].accuracy), (model_state, q)
            assert theirs["rephrase_acc"][0] == pytest.approx(ours[1].accuracy), (model_state, q)
            loc = answer_stats(model, tok, rec.locality_prompts, rec.locality_answers)
            assert theirs["locality"]["neighborhood_output"] == [s.predicted for s in loc], (model_state, q)
            seen.add(theirs["rewrite_acc"][0])
        return seen

    assert compare("unedited") == {0.0, 1.0}                   # both outcomes are compared
    pre_loc = [ee.compute_edit_quality(model, name, hp, tok, q, device)["locality"] for q in requests]
    reference = capture_reference(model, tok, records_from_requests(requests))
    host.apply_rledit_to_model(model, tok, requests[:4], hp)
    compare("edited")
    agreement = []
    for q, pre in zip(requests, pre_loc):
        post = ee.compute_edit_quality(model, name, hp, tok, q, device)["locality"]
        pre_tokens, post_tokens = pre["neighborhood_output"][0], post["neighborhood_output"][0]
        theirs = sum(a == b for a, b in zip(post_tokens, pre_tokens)) / len(pre_tokens)
        ours = score_records(model, tok, records_from_requests([q]), reference, generation=False)
        assert theirs == pytest.approx(ours["specificity_vs_unedited"])
        agreement.append(theirs)
    assert agreement


# ------------------------------------------------------------------ training and the CPU shim

def test_trainer_from_easyedit_style_yaml(ee, world, small, tmp_path):
    from rledit_plugin.hparams import RLEditTrainingHyperParams
    from rledit_plugin.world.facts import write_world_files
    write_world_files(world, str(tmp_path))
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text("alg_name: RLEdit\nmodel_name: embedded-tiny-gpt2\ndevice: cpu\n"
                         "rank: 8\nn_blocks: 1\nn_edits: 2\ntraj_len: 2\nn_trajectories: 1\n"
                         f"max_length: 32\nn_val: 4\nresults_dir: {tmp_path / 'archive'}\n")
    model, tok = small
    trainer = host.RLEditTrainer(config=str(yaml_path),
                                 train_set=ee.ZsreDataset(str(tmp_path / "zsre_train.json"), size=8),
                                 val_set=ee.ZsreDataset(str(tmp_path / "zsre_eval.json"), size=4),
                                 model=model, tok=tok, progress=False)
    assert isinstance(trainer.config, RLEditTrainingHyperParams) and len(trainer.train_records) == 8
    net, history = trainer.run()
    assert history and os.listdir(tmp_path / "archive")
    editing = hparams(archive=str(tmp_path / "archive"), rank=8, n_blocks=1)
    host.apply_rledit_to_model(model, tok, [record_to_request(world.records("eval")[0])], editing)
    assert len(host.get_editor(model).journal) == 1


def test_cpu_shim_redirects_and_undoes():
    active_before = host.cpu_shim_active()       # the module fixture may hold it already
    with host.cpu_shim():
        with host.cpu_shim():                                   # nested: counted
            assert torch.zeros(2, device="cuda:0").device.type == "cpu"
        assert torch.ones(2).to("cuda:cpu").device.type == "cpu"
        assert torch.ones(2).to(0).device.type == "cpu"
        assert torch.nn.Linear(2, 2).cuda().weight.device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 1)).device.type == "cpu"
        assert torch.ones(2).to(torch.float64).dtype == torch.float64   # non-device calls untouched
        with torch.device("meta"):                              # device contexts still apply
            assert torch.empty(3).device.type == "meta"
    assert host.cpu_shim_active() == active_before
    code = ("import torch\nfrom rledit_plugin.hosts.easyedit_compat import cpu_shim\n"
            "zeros, own_to = torch.zeros, 'to' in vars(torch.Tensor)\n"
            "with cpu_shim():\n    assert torch.zeros is not zeros\n"
            "assert torch.zeros is zeros and ('to' in vars(torch.Tensor)) == own_to\n"
            "with torch.device('meta'):\n    assert torch.empty(1).device.type == 'meta'\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
