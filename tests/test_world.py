"""The synthetic world, its dataset files, the tokenizer and the pre-trained tiny LM."""
import json
import os
from dataclasses import replace

import pytest
import torch

from rledit_plugin.data.records import tokenize_teacher_forced
from rledit_plugin.world import tiny_lm
from rledit_plugin.world.facts import (NQ_PREFIX, RELATION_BY_NAME, SPLITS, WorldConfig,
                                       build_world, write_world_files)
from rledit_plugin.world.tiny_lm import (TinyLMConfig, build_tokenizer, cache_key, fact_accuracy,
                                         load_or_train_tiny_lm, train_tiny_lm)

from conftest import test_cache_dir

SMALL = WorldConfig(seed=3, n_train_subjects=3, n_val_subjects=2, n_eval_subjects=3,
                    n_locality_subjects=24)


def _true_answers(world):
    """(subject, relation) -> true object, over every fact of the world."""
    return {(f.subject, f.relation): f.object for f in world.all_facts()}


def _question_index(world):
    """question text -> true answer, for every template of every fact."""
    out = {}
    for f in world.all_facts():
        for t in range(len(RELATION_BY_NAME[f.relation].templates)):
            out[f.question(t)] = f.object
        out[f.nq_question()] = f.object
    return out


# ---------------------------------------------------------------------------- world

def test_same_seed_same_world_and_different_seed_different_world(world):
    again = build_world()
    assert again.fingerprint() == world.fingerprint()
    assert [r.to_dict() for r in again.eval_records] == [r.to_dict() for r in world.eval_records]
    assert again.corpus == world.corpus
    other = build_world(WorldConfig(seed=1))
    assert other.fingerprint() != world.fingerprint()
    assert set(other.subjects["eval"]) != set(world.subjects["eval"])


def test_split_sizes_and_distinct_subject_relation_pairs(world):
    sizes = {"train": 2000, "val": 200, "eval": 2000}
    for split, minimum in sizes.items():
        records = world.records(split)
        assert len(records) >= minimum
        assert len({r.prompt for r in records}) == len({r.uid for r in records}) == len(records)
    # (subject, relation) pairs are distinct: one record per fact.
    facts = world.facts["eval"]
    assert len({(f.subject, f.relation) for f in facts}) == len(facts) == len(world.eval_records)


def test_subject_groups_are_disjoint_including_locality_pools(world):
    groups = list(world.subjects.values())
    everyone = [s for g in groups for s in g]
    assert len(everyone) == len(set(everyone))
    record_subjects = {s: {r.subject for r in world.records(s)} for s in SPLITS}
    assert not record_subjects["train"] & record_subjects["eval"]
    assert not record_subjects["train"] & record_subjects["val"]
    assert not record_subjects["val"] & record_subjects["eval"]


def test_records_are_valid_and_consistent_with_the_world(world):
    truth = _true_answers(world)
    questions = _question_index(world)
    for split in SPLITS:
        edited = {r.subject for r in world.records(split)}
        for i, r in enumerate(world.records(split)):
            r.validate(file=f"<world:{split}>", index=i)
            assert r.target_new != r.target_true
            assert len(r.paraphrases) >= 2 and r.prompt not in r.paraphrases
            assert len(set(r.paraphrases)) == len(r.paraphrases)
            assert r.subject in r.prompt and all(r.subject in p for p in r.paraphrases)
            assert questions[r.prompt] == r.target_true
            assert all(questions[p] == r.target_true for p in r.paraphrases)
            # target_new is another object of the same relation
            relation = next(rel for rel in RELATION_BY_NAME.values() if r.prompt in
                            [t.format(s=r.subject) for t in rel.templates])
            assert r.target_new in relation.objects
            assert truth[(r.subject, relation.name)] == r.target_true
            # locality: a true fact of a never-edited subject
            (loc,), (loc_ans,) = r.locality_prompts, r.locality_answers
            assert loc.startswith(NQ_PREFIX) and questions[loc] == loc_ans
            loc_words = set(loc.rstrip("?").split())
            assert r.subject not in loc_words and not loc_words & edited


def test_corpus_states_every_true_fact_and_heldout_wording_differs(world):
    assert len(world.corpus) == len(world.all_facts())
    assert set(world.corpus).isdisjoint(world.heldout_corpus)
    for f, sentence in zip(world.all_facts(), world.corpus):
        assert f.subject in sentence and f.object in sentence


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="n_locality_subjects"):
        build_world(WorldConfig(n_locality_subjects=5))


# ---------------------------------------------------------------------------- files

def test_world_files_have_every_required_key(world, tmp_path):
    paths = write_world_files(world, str(tmp_path))
    assert set(paths) == {"zsre_train.json", "zsre_val.json", "zsre_eval.json",
                          "counterfact_eval.json", "fever_eval.json", "corpus.txt"}
    questions = _question_index(world)
    zsre_keys = {"src", "rephrase", "ans", "alt", "answers", "loc", "loc_ans", "subject"}
    for split in SPLITS:
        rows = json.load(open(paths[f"zsre_{split}.json"]))
        assert len(rows) == len(world.records(split))
        for row, rec in zip(rows, world.records(split)):
            assert zsre_keys <= set(row)
            assert row["src"] == rec.prompt and row["ans"] == row["alt"] == rec.target_new
            assert row["answers"] == [rec.target_true] and row["rephrase"] in rec.paraphrases
            assert row["loc"].startswith("nq question: ") and questions[row["loc"]] == row["loc_ans"]

    cf = json.load(open(paths["counterfact_eval.json"]))
    assert len(cf) == len(world.eval_records)
    for row, rec in zip(cf, world.eval_records):
        rw = row["requested_rewrite"]
        assert rw["prompt"].count("{}") == 1
        assert rw["prompt"].format(rw["subject"]) == rec.prompt
        assert rw["target_new"]["str"] == rec.target_new
        assert rw["target_true"]["str"] == rec.target_true
        assert row["paraphrase_prompts"] == rec.paraphrases
        assert row["neighborhood_prompts"]
        for prompt in row["neighborhood_prompts"]:   # other subjects, same true answer
            assert rec.subject not in prompt and questions[prompt] == rec.target_true

    fever = json.load(open(paths["fever_eval.json"]))
    for row, rec in zip(fever, world.eval_records):
        assert {"prompt", "equiv_prompt", "alt", "unrel_prompt", "unrel_ans"} <= set(row)
        assert isinstance(row["equiv_prompt"], list) and row["alt"] == rec.target_new
        assert questions[row["unrel_prompt"]] == row["unrel_ans"]

    lines = open(paths["corpus.txt"], encoding="utf-8").read().splitlines()
    assert lines == world.corpus
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ---------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trips_and_answers_are_single_tokens(world_tokenizer, world):
    tok = world_tokenizer
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    for text in (world.eval_records[0].prompt, world.corpus[0], "Naïve café, 42 ü ✓!",
                 world.eval_records[0].locality_prompts[0]):
        assert tok.decode(tok(text)["input_ids"]) == text
    for rel in RELATION_BY_NAME.values():
        for obj in rel.objects:
            ids = tok(" " + obj, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and tok.decode(ids) == obj
    # the subject is one token after a space (GPT-2 convention, no prefix space: EasyEdit's
    # slow GPT2Tokenizer must split exactly like this fast tokenizer)
    r = world.eval_records[0]
    subject_ids = tok(" " + r.subject, add_special_tokens=False)["input_ids"]
    assert len(subject_ids) == 1
    for p in [r.prompt] + r.paraphrases:
        if " " + r.subject in p:
            assert subject_ids[0] in tok(p)["input_ids"]
    batch = tokenize_teacher_forced(tok, [r.prompt], [r.target_true])
    assert tok.decode(batch["input_ids"][0][batch["labels"][0] != -100]) == r.target_true


def test_tokenizer_is_deterministic(world, _world_tokenizer):
    assert build_tokenizer(world).get_vocab() == _world_tokenizer.get_vocab()


def test_random_fixtures_share_the_world_tokenizer(random_gpt2, random_llama, world):
    batch = None
    for model, tok in (random_gpt2, random_llama):
        assert model.config.vocab_size == len(tok)
        batch = tokenize_teacher_forced(tok, [world.eval_records[0].prompt], ["Paris"])
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        assert torch.isfinite(out.loss)
    assert random_gpt2[1].get_vocab() == random_llama[1].get_vocab()


# ---------------------------------------------------------------------------- tiny LM

@pytest.mark.slow
def test_pretrained_tiny_lm_knows_its_facts(tiny_lm_pretrained, world):
    model, tok, info = tiny_lm_pretrained
    for split in SPLITS:
        acc = fact_accuracy(model, tok, world.records(split))
        assert acc >= 0.97, (split, acc)     # 97.5-99.0% in the two wsd draws measured
        assert abs(acc - info["accuracy"][split]) < 1e-6   # what the cache entry claims
    assert model.config._name_or_path == info["path"]
    assert os.path.basename(info["path"]).startswith("tiny-gpt2-")


@pytest.mark.slow
def test_second_load_hits_the_cache_without_training(tiny_lm_pretrained, world, monkeypatch):
    model, tok, info = tiny_lm_pretrained

    def no_training(*args, **kwargs):
        raise AssertionError("a cached tiny LM was retrained")

    monkeypatch.setattr(tiny_lm, "train_tiny_lm", no_training)
    again, tok2, info2 = load_or_train_tiny_lm(world, cache_dir=test_cache_dir(), progress=False)
    assert info2["cached"] and info2["path"] == info["path"]
    assert tok2.get_vocab() == tok.get_vocab()
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_cache_is_written_atomically_and_keyed(tmp_path, monkeypatch):
    world = build_world(SMALL)
    cfg = TinyLMConfig(d_model=16, n_layer=1, n_head=2, d_ff=32, epochs=1)

    def broken_save(self, *args, **kwargs):
        raise RuntimeError("disk full")

    # An interrupted save leaves no entry behind (nor a temporary directory).
    from transformers import PreTrainedModel
    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", broken_save)
        with pytest.raises(RuntimeError, match="disk full"):
            load_or_train_tiny_lm(world, cache_dir=str(tmp_path), progress=False, config=cfg)
    assert os.listdir(tmp_path) == []

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok, info = load_or_train_tiny_lm(world, cache_dir=str(tmp_path), progress=False,
                                                 config=cfg)
        assert torch.get_num_threads() == 1      # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert info["threads"] == cfg.threads == 2   # the config's count, whatever the caller set
    assert not info["cached"] and os.listdir(tmp_path) == [os.path.basename(info["path"])]
    assert set(info["accuracy"]) == set(SPLITS) and info["params"] > 0
    again, tok2, info2 = load_or_train_tiny_lm(world, cache_dir=str(tmp_path), progress=False,
                                               config=cfg)
    assert info2["cached"] and info2["accuracy"] == info["accuracy"]
    # The first (training) call returns exactly what later calls load.
    batch = tokenize_teacher_forced(tok, [world.eval_records[0].prompt], ["Paris"])
    assert batch["input_ids"].tolist() == tokenize_teacher_forced(
        tok2, [world.eval_records[0].prompt], ["Paris"])["input_ids"].tolist()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    assert not model.training and type(model) is type(again)
    # a different model config or world is a different entry
    _, _, info3 = load_or_train_tiny_lm(world, cache_dir=str(tmp_path), progress=False,
                                        config=TinyLMConfig(d_model=16, n_layer=1, n_head=2,
                                                            d_ff=32, epochs=1, seed=1))
    assert info3["path"] != info["path"]


def test_pretraining_on_two_threads_is_deterministic_and_threads_are_part_of_the_model():
    world = build_world(SMALL)
    tok = build_tokenizer(world)
    cfg = TinyLMConfig(d_model=32, n_layer=1, n_head=2, d_ff=512, epochs=1)
    assert cfg.threads == 2 and not cfg.fused_optimizer
    first, stats = train_tiny_lm(world, tok, config=cfg, progress=False)
    second, _ = train_tiny_lm(world, tok, config=cfg, progress=False)
    assert stats["threads"] == 2 and first.config.activation_function == "gelu_new"
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
    # the fused activation the benchmark compares with computes the same function
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    from transformers.activations import ACT2FN
    assert torch.allclose(ACT2FN["gelu_new"](x), ACT2FN["gelu_pytorch_tanh"](x), atol=1e-12)
    # every setting that changes the arithmetic is a different cache entry
    keys = {cache_key(world, "gpt2", replace(cfg, **change))
            for change in ({}, {"threads": 1}, {"gpt2_activation": "gelu_pytorch_tanh"},
                           {"fused_optimizer": True})}
    assert len(keys) == 4


def test_llama_option_trains_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM
    world = build_world(SMALL)
    cfg = TinyLMConfig(d_model=16, n_layer=1, n_head=2, d_ff=32, epochs=1)
    model, tok, info = load_or_train_tiny_lm(world, arch="llama", cache_dir=str(tmp_path),
                                             progress=False, config=cfg)
    assert model.config.model_type == "llama" and "llama" in os.path.basename(info["path"])
    loaded = AutoModelForCausalLM.from_pretrained(info["path"])
    batch = tokenize_teacher_forced(tok, [world.eval_records[0].prompt], ["Paris"])
    with torch.no_grad():
        assert torch.allclose(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                              loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits)


def test_quick_model_name_stands_for_the_small_world(world, monkeypatch, tmp_path):
    from rledit_plugin import models
    quick = models.embedded_world("embedded-tiny-gpt2-quick")
    assert {s: len(quick.records(s)) for s in SPLITS} == {"train": 400, "val": 200, "eval": 400}
    assert models.embedded_world("embedded-tiny-gpt2").fingerprint() == world.fingerprint()
    assert quick.fingerprint() != world.fingerprint()
    seen = []

    def fake_load(w, arch="gpt2", cache_dir=None, config=None, **_):   # which world and width
        seen.append((w.fingerprint(), arch, config.d_ff))
        raise RuntimeError("stop here")
    monkeypatch.setattr(tiny_lm, "load_or_train_tiny_lm", fake_load)
    import rledit_plugin.world as world_pkg
    monkeypatch.setattr(world_pkg, "load_or_train_tiny_lm", fake_load)
    for name in ("embedded-tiny-llama-quick", "embedded-tiny-gpt2", "embedded-tiny-gpt2-quick"):
        with pytest.raises(RuntimeError, match="stop here"):
            models.load_model_and_tokenizer(name)
    # the quick GPT-2 keeps the narrower MLP (pre-trains in about half the time); llama its own
    assert seen == [(quick.fingerprint(), "llama", 384), (world.fingerprint(), "gpt2", 3072),
                    (quick.fingerprint(), "gpt2", 1536)]


def test_demo_refuses_a_model_that_is_not_the_embedded_one(tmp_path):
    from rledit_plugin import cli
    src = open(os.path.join(os.path.dirname(__file__), "..", "hparams", "TRAINING", "RLEdit", "tiny.yaml")).read()
    bad = tmp_path / "other.yaml"
    bad.write_text(src.replace("embedded-tiny-gpt2", str(tmp_path / "my-model")))
    with pytest.raises(SystemExit, match="embedded tiny LM"):
        cli.main(["demo", "--hparams", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()   # refused before writing anything


def test_a_local_model_directory_loads_in_the_asked_dtype_with_the_current_keyword(
        random_gpt2, tmp_path, monkeypatch):
    import transformers
    from packaging.version import Version

    from rledit_plugin import models
    model, tok = random_gpt2
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):   # transformers >= 4.56 logs a deprecation for torch_dtype=
        seen.append(sorted(kwargs))
        return original(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, loaded_tok = models.load_model_and_tokenizer(str(tmp_path), torch_dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded_tok.pad_token_id is not None
    new_keyword = Version(transformers.__version__) >= Version("4.56")
    assert seen == [["dtype"] if new_keyword else ["torch_dtype"]]
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())


def test_lr_schedule_cosine_and_warmup_stable_decay():
    import math
    from rledit_plugin.world.pretrain import LRSchedule
    cos = LRSchedule("cosine", warmup_steps=10, total_steps=100)
    assert [cos(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    for s in (10, 37, 50, 99, 100, 150):
        assert cos(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * min(1.0, s / 100))))
    wsd = LRSchedule("wsd", warmup_steps=10, total_steps=100)
    assert wsd(5) == 0.6 and wsd(10) == wsd(500) == 1.0        # stable until told to decay
    wsd.decay(start=300, steps=40)
    assert wsd(300) == 1.0 and wsd(320) == pytest.approx(0.5) and wsd(340) == pytest.approx(0.0)
    assert wsd(310) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule("linear", 10, 100)


@pytest.mark.parametrize("decay_accuracy, epochs, decay_epochs, decay_after, run", [
    (0.0, 6, 2, 1, 3),     # reached after the first epoch: two decay epochs follow, then stop
    (1.01, 5, 2, 3, 5),    # never reached: the decay takes the last two of the five epochs
    (1.01, 2, 3, 1, 2),    # fewer epochs than the decay asks for: it gets what is left
])
def test_wsd_pretraining_decays_once_the_facts_take(decay_accuracy, epochs, decay_epochs,
                                                    decay_after, run):
    world = build_world(SMALL)
    tok = build_tokenizer(world)
    cfg = TinyLMConfig(d_model=16, n_layer=1, n_head=2, d_ff=32, epochs=epochs, schedule="wsd",
                       decay_accuracy=decay_accuracy, decay_epochs=decay_epochs, warmup_steps=2)
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):   # the step size each optimiser step actually used
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        _, stats = train_tiny_lm(world, tok, config=cfg, progress=False)
    history = stats["history"]
    assert stats["epochs"] == len(history) == run
    assert [h["epoch"] for h in history if h.get("decay_from_here")] == [decay_after]
    per_epoch = stats["steps"] // run
    stable = seen[cfg.warmup_steps:decay_after * per_epoch]
    assert stable and all(lr == cfg.lr for lr in stable)
    decay = seen[decay_after * per_epoch:]
    assert decay[0] == pytest.approx(cfg.lr) and all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] < 0.05 * cfg.lr
