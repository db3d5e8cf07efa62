"""Same-stream comparison: RLEdit and EasyEdit baselines through the one harness.

A tiny random GPT-2 (4 layers: the tiny YAMLs name layers 1-3) on the world's
tokenizer keeps this fast; MEND trains for a few iterations only.  What is
checked is the plumbing (same stream, same start, accumulation, set-up timed
apart, failures isolated, MEMIT statistics offline), not the methods' quality.
"""
import copy
import importlib.util
import json
import os

import pytest
import torch
import yaml

from rledit_plugin import compare, compare_cli, compare_report
from rledit_plugin.evaluation import RESULT_KEYS
from rledit_plugin.world.tiny_lm import random_tiny_lm

pytestmark = [
    pytest.mark.easyedit,
    pytest.mark.skipif(importlib.util.find_spec("easyeditor") is None,
                       reason="easyeditor is not installed (make setup-full installs it)"),
]
TURNS, BATCH = 3, 4
ALGS = ["RLEdit", "MEMIT", "FT", "MEND", "ROME", "LoRA"]


@pytest.fixture(scope="module")
def pristine(_world_tokenizer):
    return random_tiny_lm(arch="gpt2", tok=copy.deepcopy(_world_tokenizer),
                          d_model=32, n_layer=4, n_head=2, d_ff=64)


def fresh(pristine):
    model, tok = pristine
    return lambda: (copy.deepcopy(model), copy.deepcopy(tok))


@pytest.fixture(scope="module")
def run(pristine, world, tmp_path_factory):
    """One comparison of every method; LoRA is broken on purpose (a module that does not exist)."""
    tmp = tmp_path_factory.mktemp("compare")
    rledit_yaml = tmp / "rledit.yaml"
    rledit_yaml.write_text("alg_name: RLEdit\nrank: 8\nn_blocks: 1\ninit_lr: 1e-2\n"
                           "batch_size: 4\nmax_length: 32\n")
    lora_yaml = tmp / "lora.yaml"
    lora = yaml.safe_load(compare.default_hparams_path("LoRA").read_text())
    lora["target_modules"] = ["no_such_module"]
    lora_yaml.write_text(yaml.safe_dump(lora))
    cwd = os.getcwd()
    os.chdir(tmp)          # a relative work directory (EasyEdit's trainer changes directory)
    try:
        comparison = compare.Comparison(
            work_dir="work", hparams={"RLEdit": str(rledit_yaml), "LoRA": str(lora_yaml)},
            corpus=world.corpus[:400], train_records=world.train_records,
            val_records=world.val_records[:5], mend_overrides={"max_iters": 12, "val_interval": 6})
        torch.set_num_threads(1)
        results = compare.run_comparison(ALGS, fresh(pristine), world.eval_records, turns=TURNS,
                                         batch_size=BATCH, comparison=comparison, progress=False,
                                         generation=False, heldout_texts=world.heldout_corpus[:16])
    finally:
        os.chdir(cwd)
    paths = compare_report.write_comparison(results, str(tmp / "out"), meta={"argv": ["test"]})
    return results, paths, comparison


def test_one_harness_result_per_method(run):
    results, _, _ = run
    assert list(results) == ALGS
    for alg in ALGS[:-1]:
        r = results[alg]
        assert r["status"] == "ok", r.get("traceback")
        assert set(RESULT_KEYS) <= set(r)
        assert r["protocol"] == "end_of_stream" and r["edits"] == TURNS * BATCH
        assert r["config"]["method"] == alg
        for key in ("efficacy", "generalization", "specificity", "specificity_vs_unedited",
                    "perplexity", "weight_change_norm"):
            assert key in r["post"]
        timing = r["timing"]
        assert timing["seconds_setup"] >= 0 and timing["seconds_per_edit"] > 0
        assert timing["peak_rss_mb_method"] is None or timing["peak_rss_mb_method"] > 0
        # edits landed in the parameters each method names
        assert r["post"]["weight_change_norm"] > 0, alg


def test_same_start_same_stream(run, pristine):
    results, _, _ = run
    ok = [r for r in results.values() if r["status"] == "ok"]
    assert {r["config"]["start_weights"] for r in ok} == {compare.weights_fingerprint(pristine[0])}
    # the unedited scores are computed on the same records from the same weights
    assert all(r["pre"] == ok[0]["pre"] for r in ok)


def test_failure_is_reported_and_others_complete(run):
    results, paths, _ = run
    lora = results["LoRA"]
    assert compare.is_failure(lora) and lora["stage"] == "edit"
    assert "no_such_module" in lora["error"]
    table = paths["markdown"].read_text()
    row = next(line for line in table.splitlines() if line.startswith("| LoRA "))
    assert "failed (edit)" in row and "no_such_module" in row
    for alg in ALGS[:-1]:
        assert any(line.startswith(f"| {alg} ") and "failed" not in line for line in table.splitlines())
    saved = json.loads(paths["json"].read_text())["results"]
    assert list(saved) == ALGS and saved["LoRA"]["status"] == "failed"
    assert paths["plot"].stat().st_size > 0


def test_setup_recorded_apart(run):
    results, _, _ = run
    memit = results["MEMIT"]["config"]["setup"]
    assert memit["stats_files"] and memit["stats_seconds"] > 0
    mend = results["MEND"]["config"]["setup"]
    assert mend["training"]["max_iters"] == 12 and mend["training"]["seconds"] > 0
    assert results["MEND"]["timing"]["seconds_setup"] >= mend["training"]["seconds"]


def test_mend_archive_needs_the_allow_list(run, pristine):
    """The archive pickles the model config: torch's default weights_only load refuses it,
    the allow-list of exactly that class loads it."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    results, _, _ = run
    archive = results["MEND"]["config"]["setup"]["archive"]
    with pytest.raises(Exception):
        torch.load(archive, map_location="cpu", weights_only=True)
    with eb.mend_archive_loading(pristine[0]):
        state = torch.load(archive, map_location="cpu", weights_only=True)
    assert any(k.startswith("mend.") for k in state["model"])


def test_edits_accumulate(pristine, world, tmp_path):
    """The second turn edits the model the first turn left (EasyEdit's restore is off)."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    hp_path = str(compare.default_hparams_path("FT"))
    first, second = world.eval_records[:4], world.eval_records[4:8]
    hp = eb.load_hparams("FT", hp_path)
    name = hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight"

    def ft(model, tok):
        return eb.EasyEditBaseline("FT", model, tok, eb.load_hparams("FT", hp_path),
                                   log=str(tmp_path / "ft.log"))

    m1, t1 = fresh(pristine)()
    editor = ft(m1, t1)
    editor.edit(first)
    after_first = m1.get_parameter(name).detach().clone()
    editor.edit(second)
    both = m1.get_parameter(name).detach().clone()
    m2, t2 = fresh(pristine)()
    ft(m2, t2).edit(second)
    only_second = m2.get_parameter(name).detach()
    start = pristine[0].get_parameter(name).detach()
    assert not torch.equal(after_first, start)
    assert not torch.equal(both, after_first)
    assert not torch.allclose(both, only_second)


def test_memit_statistics_offline(pristine, world, tmp_path):
    """The npz lands under stats_dir where EasyEdit looks; its layer_stats reads it back without
    touching a dataset, and the second moment matches a float64 reference."""
    import importlib

    from rledit_plugin.hosts import easyedit_baselines as eb
    model, tok = fresh(pristine)()
    model.config._name_or_path = ""                 # an in-memory model: must not write at the root
    hp = eb.load_hparams("MEMIT", str(compare.default_hparams_path("MEMIT")))
    hp.stats_dir, hp.mom2_n_samples = str(tmp_path / "stats"), 50
    texts = world.corpus[:80]
    files = eb.write_stats(model, tok, hp, texts)
    assert len(files) == len(hp.layers)
    for f in files:
        assert f.is_file() and str(f).startswith(hp.stats_dir)
    assert model.config._name_or_path and "gpt2" in model.config._name_or_path

    layer = hp.rewrite_module_tmp.format(hp.layers[0])
    act = model.get_submodule(f"transformer.h.{hp.layers[0]}.mlp.act")
    rows = []
    handle = act.register_forward_hook(lambda m, i, o: rows.append(o[0].double()))
    with torch.no_grad():
        for text in texts[:50]:                      # one text at a time: no padding at all
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    handle.remove()
    feats = torch.cat(rows)
    reference = feats.t() @ feats / feats.shape[0]

    layer_stats = importlib.import_module("easyeditor.models.rome.layer_stats")
    with eb.offline_stats():
        stat = layer_stats.layer_stats(model, tok, layer, hp.stats_dir, hp.mom2_dataset,
                                       to_collect=["mom2"], sample_size=50,
                                       precision=hp.mom2_dtype, hparams=hp)
    assert stat.mom2.count == feats.shape[0]
    torch.testing.assert_close(stat.mom2.moment().double(), reference, rtol=1e-4, atol=1e-6)
    # a missing file is an error, never a download
    with eb.offline_stats(), pytest.raises(RuntimeError, match="never downloads"):
        layer_stats.layer_stats(model, tok, layer, hp.stats_dir, "wikipedia", to_collect=["mom2"],
                                sample_size=7, precision=hp.mom2_dtype, hparams=hp)


def test_parse_algs_and_overrides():
    assert compare.parse_algs("rledit, memit,MEND") == ["RLEdit", "MEMIT", "MEND"]
    with pytest.raises(ValueError, match="unknown algorithm"):
        compare.parse_algs("RLEdit,SERAC")
    with pytest.raises(ValueError, match="twice"):
        compare.parse_algs("FT,ft")
    assert compare_cli._hparams_overrides(["memit=a.yaml", "training/mend=b.yaml"]) == \
        {"MEMIT": "a.yaml", "TRAINING/MEND": "b.yaml"}
    with pytest.raises(SystemExit):
        compare_cli._hparams_overrides(["MEMIT"])


def test_cli_end_to_end(pristine, world, tmp_path, monkeypatch):
    """`rledit compare` on a local model directory and a data file (RLEdit + FT, 2 x 2)."""
    import argparse

    from rledit_plugin.data.writers import write_zsre
    model, tok = pristine
    model_dir = tmp_path / "tiny-gpt2"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    data = write_zsre(world.eval_records[:8], tmp_path / "edits.json")
    rledit_yaml = tmp_path / "rledit.yaml"
    rledit_yaml.write_text("alg_name: RLEdit\nrank: 8\nn_blocks: 1\ninit_lr: 1e-2\n")
    parser = argparse.ArgumentParser()
    compare_cli.add_compare_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["compare", "--algs", "RLEdit,FT", "--data", str(data),
                              "--turns", "2", "--batch", "2", "--out", str(out),
                              "--model", str(model_dir), "--hparams", f"RLEdit={rledit_yaml}",
                              "--hparams", f"FT={compare.default_hparams_path('FT')}",
                              "--no-generation", "--threads", "1"])
    monkeypatch.setattr("sys.argv", ["rledit", "compare"])
    assert args.func(args) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved["results"]) == ["RLEdit", "FT"]
    assert all(r["edits"] == 4 for r in saved["results"].values())
    assert (out / "compare.png").is_file()


def test_memit_last_token_reads_each_prompts_own_last_token(pristine):
    """The release raises on MEMIT's fact_token 'last' and looks the fact up at index -1 (a pad
    of the shorter prompts in a right-padded batch).  Under memit_last_token both answer at each
    text's own last token: checked against each text run alone (no padding at all)."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    eb.ensure_easyedit()
    compute_z = importlib.import_module("easyeditor.models.memit.compute_z")
    release = (compute_z.get_module_input_output_at_words, compute_z.find_fact_lookup_idx)
    model, tok = fresh(pristine)()
    tok.padding_side, tok.pad_token = "right", tok.eos_token
    eb.plain_inputs(tok)
    templates = ["What pet does {} have?", "{} is a", "In which city does {} live today?"]
    words = ["Mousbo", "Luthsheler", "Druroul"]
    module = "transformer.h.{}.mlp.c_proj"
    with pytest.raises(Exception, match="bugged"):
        compute_z.get_module_input_output_at_words(model, tok, 1, templates, words, module, "last")

    with eb.memit_last_token():
        k_in, k_out = compute_z.get_module_input_output_at_words(model, tok, 1, templates, words,
                                                                 module, "last")
        only_in = compute_z.get_module_input_output_at_words(model, tok, 1, templates, words,
                                                             module, "last", track="in")
        lookup = [compute_z.find_fact_lookup_idx(t, w, tok, "last") for t, w in zip(templates, words)]
    assert (compute_z.get_module_input_output_at_words, compute_z.find_fact_lookup_idx) == release

    seen = {}
    hook = model.get_submodule(module.format(1)).register_forward_hook(
        lambda m, i, o: seen.update(inp=i[0][0, -1], out=o[0, -1]))
    with torch.no_grad():
        for row, (t, w) in enumerate(zip(templates, words)):
            ids = tok(t.format(w), return_tensors="pt")["input_ids"]
            model(input_ids=ids)
            assert lookup[row] == ids.shape[1] - 1
            torch.testing.assert_close(k_in[row], seen["inp"])
            torch.testing.assert_close(only_in[row], seen["inp"])
            torch.testing.assert_close(k_out[row], seen["out"])
    hook.remove()
    assert len({len(tok(t.format(w))["input_ids"]) for t, w in zip(templates, words)}) == 3


def test_baseline_yamls_name_the_models_output_head(pristine):
    """MEMIT fits its target value through ``lm_head_module``; the embedded LM's head is not tied
    to the input embedding, so naming ``transformer.wte`` there fits a value through the wrong
    matrix (MEMIT then edits nothing)."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    model, _ = pristine
    for alg in ("MEMIT", "ROME", "FT"):
        hp = eb.load_hparams(alg, str(compare.default_hparams_path(alg)))
        assert model.get_submodule(hp.lm_head_module) is model.get_output_embeddings(), alg
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


@pytest.mark.parametrize("alg", ["MEMIT", "ROME"])
def test_never_active_units_do_not_make_memit_or_rome_singular(pristine, world, tmp_path,
                                                                 monkeypatch, alg):
    """Dead GELU units (zero on every token) make the key second moment singular: EasyEdit's
    solve/inverse fail on it as written; with the floor the edit runs, the live block of the
    statistics is the plain sum, and the dead rows of the weight get no update."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    from rledit_plugin.hosts import easyedit_memit_stats as ms
    model, tok = fresh(pristine)()
    hp = eb.load_hparams(alg, str(compare.default_hparams_path(alg)))
    hp.mom2_n_samples = 50
    mlp = model.transformer.h[hp.layers[0]].mlp
    dead = [3, 17]
    with torch.no_grad():                   # GPT-2 Conv1D: c_fc.weight is [d_model, d_ff]
        mlp.c_fc.weight[:, dead] = 0
        mlp.c_fc.bias[dead] = -100.0        # gelu_new(-100) is exactly 0
    layer = hp.rewrite_module_tmp.format(hp.layers[0])
    weight = model.get_submodule(layer).weight
    texts = world.corpus[:80]
    records = world.eval_records[:2]

    def edit(stats_dir):
        hp.stats_dir = str(stats_dir)
        files = eb.write_stats(model, tok, hp, texts)
        before = weight.detach().clone()
        eb.EasyEditBaseline(alg, model, tok, hp, log=str(tmp_path / f"{alg}.log")).edit(records)
        return files, weight.detach() - before

    with monkeypatch.context() as m:        # EasyEdit's own statistics: the solve fails
        m.setattr(ms, "floor_dead_units", lambda total: (total, []))
        with pytest.raises(Exception, match="singular"):
            edit(tmp_path / "plain")
    files, delta = edit(tmp_path / "floored")
    assert ms.LAST_DEAD_UNITS[str(files[0])] == len(dead)
    saved = torch.tensor(__import__("numpy").load(files[0])["mom2.mom2"]).double()
    plain, _ = ms.second_moment(model, tok, layer, texts[:hp.mom2_n_samples], "float64")
    live = [i for i in range(saved.shape[0]) if i not in dead]
    assert bool((saved.diagonal() > 0).all())
    torch.testing.assert_close(saved[live][:, live], plain[live][:, live], rtol=1e-5, atol=1e-4)
    assert saved[dead][:, live].abs().max() == 0
    assert delta.abs().sum() > 0 and delta[dead].abs().max() == 0


def test_statistics_damping_is_stored_apart_and_read_back(pristine, world, tmp_path):
    """``damping`` adds that share of the mean diagonal to EasyEdit's moment, under its own
    dataset name (so an undamped file never stands in for it), and layer_stats reads it back."""
    from rledit_plugin.hosts import easyedit_baselines as eb
    from rledit_plugin.hosts import easyedit_memit_stats as ms
    model, tok = fresh(pristine)()
    hp = eb.load_hparams("MEMIT", str(compare.default_hparams_path("MEMIT")))
    hp.stats_dir, hp.mom2_n_samples = str(tmp_path), 40
    texts = world.corpus[:40]
    plain_file, = eb.write_stats(model, tok, hp, texts)
    base = hp.mom2_dataset
    damped_file, = eb.write_stats(model, tok, hp, texts, damping=1e-3)
    assert hp.mom2_dataset == f"{base}_damp0.001" and damped_file != plain_file
    eb.write_stats(model, tok, hp, texts, damping=1e-3)          # idempotent name
    assert hp.mom2_dataset == f"{base}_damp0.001"
    layer = hp.rewrite_module_tmp.format(hp.layers[0])
    total, count = ms.second_moment(model, tok, layer, texts, "float64")
    moment = total / count
    expected = moment + 1e-3 * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)
    layer_stats = importlib.import_module("easyeditor.models.rome.layer_stats")
    with eb.offline_stats():
        stat = layer_stats.layer_stats(model, tok, layer, hp.stats_dir, hp.mom2_dataset,
                                       to_collect=["mom2"], sample_size=40,
                                       precision=hp.mom2_dtype, hparams=hp)
    torch.testing.assert_close(stat.mom2.moment().double(), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="damping"):
        ms.damp_moment(total, -1.0)


def test_rledit_without_statistics_measures_them_on_the_corpus_statements_too(pristine, world, tmp_path):
    """An archive-less RLEdit measures its answer-position statistics on the training prompts
    and, when the comparison knows them, the corpus's statements split before their object
    (what `rledit train` does on the embedded world)."""
    from rledit_plugin.core.whitening import compute_whitening, statistics_pairs, statistics_texts
    from rledit_plugin.models import get_module
    module = "transformer.h.1.mlp.c_proj"
    yaml_path = tmp_path / "rledit.yaml"
    yaml_path.write_text(f"alg_name: RLEdit\nrank: 8\nn_blocks: 1\nmax_length: 32\ninner_params: [{module}]\n"
                         "key_whitening: true\nwhitening_damping: 0.05\nwhitening_answer_weight: 0.3\n")
    model, tok = pristine
    corpus, facts, train = world.corpus[:40], world.fact_pairs[:40], world.train_records[:4]
    got = {}
    for with_facts in (True, False):
        comparison = compare.Comparison(work_dir=str(tmp_path / "w"), hparams={"RLEdit": str(yaml_path)},
                                        corpus=corpus, train_records=train,
                                        fact_pairs=facts if with_facts else None)
        editor, _ = comparison.setup("RLEdit", model, tok)
        got[with_facts] = editor.hypernet.whitening(module)
    want = compute_whitening(model, tok, {module: get_module(model, module)}, statistics_texts(train, corpus),
                             0.05, 32, answer_pairs=statistics_pairs(train, facts), answer_weight=0.3)[module]
    torch.testing.assert_close(got[True], want)
    assert (got[True] - got[False]).abs().max() > 1e-3 * want.abs().max()


def test_cli_takes_the_world_of_the_model_name(pristine, world, tmp_path, monkeypatch):
    """`--model embedded-tiny-gpt2-quick` compares on the quick world (its records, corpus and
    statements), not the default one; `--corpus FILE` drops the world's statements."""
    import argparse

    from rledit_plugin import models

    class Stop(Exception):
        pass
    seen = {}

    def comparison(**kwargs):
        seen.update(kwargs)
        raise Stop
    monkeypatch.setattr(models, "embedded_world", lambda name: seen.setdefault("world", name) and world)
    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pristine)
    monkeypatch.setattr(compare_cli, "Comparison", comparison)
    parser = argparse.ArgumentParser()
    compare_cli.add_compare_parser(parser.add_subparsers(dest="command"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one text\n")
    for extra, facts in (([], world.fact_pairs), (["--corpus", str(corpus)], None)):
        seen.clear()
        args = parser.parse_args(["compare", "--model", "embedded-tiny-gpt2-quick", "--out",
                                  str(tmp_path / "out"), *extra])
        with pytest.raises(Stop):
            args.func(args)
        assert seen["world"] == "embedded-tiny-gpt2-quick"
        assert seen["train_records"] == world.train_records and seen["fact_pairs"] == facts
