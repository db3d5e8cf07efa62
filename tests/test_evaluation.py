"""The lifelong evaluation harness: metrics against brute force and oracles, the stream, the report."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import bpe_tokenizer, tiny_gpt2, tiny_llama
from rledit_plugin.data.records import EditRecord
from rledit_plugin.evaluation import (RESULT_KEYS, answer_logprob, capture_reference,
                                      generation_exact_match, greedy_generate, markdown_table,
                                      perplexity, predicted_tokens, run_stream, score_records,
                                      snapshot_params, token_accuracy, weight_change_norm,
                                      write_report)

SUBJECTS = ["Alvor", "Brenn", "Cadra", "Dovik", "Ennis", "Farro", "Gesta", "Holm"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Delhi", "Perth"]
JOBS = ["doctor", "baker", "pilot", "farmer"]
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster
METRICS = ("efficacy", "generalization", "specificity", "specificity_vs_unedited",
           "generation_em", "perplexity", "weight_change_norm")


def _corpus():
    lines = []
    for i, s in enumerate(SUBJECTS):
        lines += [f"{s} lives in {CITIES[i]}.", f"The home of {s} is {CITIES[i]}.",
                  f"{s} works as a {JOBS[i % len(JOBS)]}.", f"Where does {s} live? {CITIES[i]}."]
    return lines * 3


def _tokenizer(with_bos: bool):
    return bpe_tokenizer(_corpus(), vocab_size=400, with_bos=with_bos)


@pytest.fixture(scope="module")
def gpt2_tok():
    return _tokenizer(with_bos=False)


@pytest.fixture(scope="module")
def llama_tok():
    return _tokenizer(with_bos=True)


def _gpt2(tok, seed=0):
    return tiny_gpt2(tok, seed=seed, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)


def _llama(tok, seed=0):
    return tiny_llama(tok, seed=seed)


@pytest.fixture(params=["gpt2", "llama"])
def lm(request, gpt2_tok, llama_tok):
    if request.param == "gpt2":
        return _gpt2(gpt2_tok), gpt2_tok
    return _llama(llama_tok), llama_tok


def _records(n, with_true=True):
    out = []
    for i in range(n):
        s, other = SUBJECTS[i % len(SUBJECTS)], SUBJECTS[(i + 3) % len(SUBJECTS)]
        out.append(EditRecord(
            prompt=f"{s} lives in", target_new=CITIES[(i + 1) % len(CITIES)],
            target_true=CITIES[i % len(CITIES)] if with_true else None, subject=s,
            paraphrases=[f"The home of {s} is", f"Where does {s} live?"][: 1 + i % 2],
            locality_prompts=[f"{other} works as a"], locality_answers=[JOBS[(i + 3) % 4]],
            uid=str(i)))
    return out


PROMPTS = ["Alvor lives in", "The home of Brenn is", "Where does Cadra live?", "Dovik works as a",
           "Ennis", "The home of Gesta is"]
ANSWERS = ["Paris", "Rome Oslo", "Lima.", "doctor and a pilot", "Quito", "a farmer"]


def _brute_force(model, model64, tok, prompt, answer):
    """Unpadded, one answer token at a time: argmax in fp32, log-prob in float64."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    preds, logprob = [], 0.0
    with torch.no_grad():
        for j in range(len(a)):
            x = torch.tensor([p + a[:j]])
            preds.append(int(model(x).logits[0, -1].argmax()))
            logprob += float(model64(x).logits[0, -1].log_softmax(-1)[a[j]])
    return preds, a, logprob


def test_token_metrics_match_brute_force(lm):
    model, tok = lm
    preds = predicted_tokens(model, tok, PROMPTS, ANSWERS, batch_size=4)
    accs = token_accuracy(model, tok, PROMPTS, ANSWERS, batch_size=4)
    logps = answer_logprob(model, tok, PROMPTS, ANSWERS, batch_size=4)
    model64 = copy.deepcopy(model).double()
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        ref_pred, gold, ref_logp = _brute_force(model, model64, tok, p, a)
        assert preds[i] == ref_pred, p
        assert accs[i] == pytest.approx(sum(x == y for x, y in zip(ref_pred, gold)) / len(gold))
        assert logps[i] == pytest.approx(ref_logp, rel=1e-4, abs=1e-4)
    # Batch size changes padding, not the answers.
    assert predicted_tokens(model, tok, PROMPTS, ANSWERS, batch_size=1) == preds
    assert not model.training


def test_scoring_batches_carry_no_padding(lm, monkeypatch):
    """Pairs are batched by token length: every forward gets an all-ones mask (no 4-D padding
    mask to build), and each pair's numbers are those of scoring it alone, bit for bit."""
    from rledit_plugin.evaluation import metrics
    model, tok = lm
    masks, real = [], metrics.answer_logits
    monkeypatch.setattr(metrics, "answer_logits",
                        lambda m, ids, mask, rows, *a: masks.append(mask) or real(m, ids, mask, rows, *a))
    batched = metrics.answer_stats(model, tok, PROMPTS, ANSWERS, batch_size=4)
    assert masks and all(bool(m.all()) for m in masks)
    assert sum(m.shape[0] for m in masks) == len(PROMPTS)
    alone = [metrics.answer_stats(model, tok, [p], [a])[0] for p, a in zip(PROMPTS, ANSWERS)]
    assert batched == alone


def test_greedy_generate_matches_hf_generate(lm):
    model, tok = lm
    prompts = PROMPTS[:4]
    ours = greedy_generate(model, tok, prompts, [3, 4, 2, 3], batch_size=8)
    for prompt, gen in zip(prompts, ours):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(gen),
                            min_new_tokens=len(gen), do_sample=False, pad_token_id=tok.eos_token_id)
        assert hf[0, ids.shape[1]:].tolist() == gen


def test_perplexity_and_weight_norm_match_reference(gpt2_tok):
    model, tok = _gpt2(gpt2_tok), gpt2_tok
    texts = ["Alvor lives in Paris.", "The home of Dovik is Lima and a long tail of words.", "x"]
    model64 = copy.deepcopy(model).double()
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            logp = model64(ids).logits[0, :-1].log_softmax(-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, tok, []) is None

    names = ["transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_attn.bias"]  # module name -> .weight
    snap = snapshot_params(model, names)
    assert set(snap) == {"transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.bias"}
    assert weight_change_norm(model, names, snap) == 0.0
    torch.manual_seed(1)
    d1, d2 = torch.randn(32, 128), torch.randn(96)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight += d1
        model.transformer.h[0].attn.c_attn.bias += d2
    expected = math.sqrt(float(d1.double().pow(2).sum() + d2.double().pow(2).sum()))
    assert weight_change_norm(model, names, snap) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KeyError, match="no parameter or module"):
        snapshot_params(model, ["transformer.h.9.mlp.c_fc"])


class LookupLM(nn.Module):
    """Oracle: knows the next token after exactly the prefixes it was taught; else favours token 0."""

    def __init__(self, vocab_size):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.vocab_size, self.table = vocab_size, {}

    def teach(self, tok, prompt, answer):
        seq = tok(prompt)["input_ids"]
        start = len(seq)
        seq = seq + tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for j in range(start - 1, len(seq) - 1):
            self.table[tuple(seq[:j + 1])] = seq[j + 1]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., 0] = 1.0
        for b, row in enumerate(input_ids.tolist()):
            for j in range(len(row)):
                nxt = self.table.get(tuple(row[:j + 1]))
                if nxt is not None:
                    logits[b, j, nxt] = 20.0
        return logits


def test_oracle_scores_are_exact(gpt2_tok):
    tok = gpt2_tok
    a = EditRecord("Alvor lives in", "Rome", target_true="Paris", paraphrases=["The home of Alvor is"],
                   locality_prompts=["Cadra works as a"], locality_answers=["doctor"])
    b = EditRecord("Brenn lives in", "Oslo", target_true="Lima",
                   paraphrases=["The home of Brenn is", "Where does Brenn live?", "Brenn resides in"],
                   locality_prompts=["Dovik works as a"], locality_answers=["pilot"])
    c = EditRecord("Ennis lives in", "Cairo")  # no target_true, no paraphrase, no locality
    assert len(tok(" Oslo")["input_ids"]) == len(tok(" Lima")["input_ids"])  # ties below are exact
    oracle = LookupLM(len(tok))
    for r in (a, c):  # fully edited
        oracle.teach(tok, r.prompt, r.target_new)
        for p in r.paraphrases:
            oracle.teach(tok, p, r.target_new)
    oracle.teach(tok, b.prompt, b.target_true)  # b: edit failed, one paraphrase of three took
    oracle.teach(tok, b.paraphrases[0], b.target_new)
    for r in (a, b):
        for p, ans in zip(r.locality_prompts, r.locality_answers):
            oracle.teach(tok, p, ans)

    reference = capture_reference(oracle, tok, [a, b, c])
    scores = score_records(oracle, tok, [a, b, c], reference, batch_size=2)
    # Mean over prompts per record, then over records that have such prompts.
    assert scores == pytest.approx({
        "efficacy": 2 / 3, "generalization": (1 + 1 / 3) / 2, "specificity": 1.0,
        "specificity_vs_unedited": 1.0, "generation_em": 2 / 3,
        "cf_efficacy": 0.5, "cf_generalization": (1 + 1 / 3) / 2, "cf_specificity": 1.0})
    assert generation_exact_match(oracle, tok, [a.prompt, b.prompt], ["Rome", "Oslo"]) == [True, False]
    # A half-known two-token answer: half its tokens right.
    oracle.teach(tok, "Gesta works as a", "doctor")
    assert token_accuracy(oracle, tok, ["Gesta works as a"], ["doctor pilot"]) == [0.5]
    assert score_records(oracle, tok, [c], generation=False)["generation_em"] is None


class RecordingEditor:
    def __init__(self):
        self.batches = []

    def edit(self, records):
        self.batches.append(list(records))


class NoOpEditor(RecordingEditor):
    edited_param_names = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


class RandomisingEditor(RecordingEditor):
    """Adds large noise to the (tied) embeddings: argmax predictions must change."""
    edited_param_names = ["transformer.wte.weight"]

    def __init__(self, model):
        super().__init__()
        self.model, self.noise = model, torch.zeros_like(model.transformer.wte.weight)

    def edit(self, records):
        super().edit(records)
        delta = torch.randn_like(self.noise) * 3.0
        self.noise += delta
        with torch.no_grad():
            self.model.transformer.wte.weight += delta


class MemorisingEditor:
    """A perfect editor for tests: Adam on every record edited so far (prompt and paraphrases
    -> target_new, then EOS) until each answer token is the argmax."""
    edited_param_names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]

    def __init__(self, model, tok):
        self.model, self.tok, self.seen = model, tok, []
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def _batch(self):
        rows, labels = [], []
        for r in self.seen:
            for prompt in [r.prompt] + r.paraphrases:
                p = self.tok(prompt)["input_ids"]
                a = self.tok(" " + r.target_new, add_special_tokens=False)["input_ids"] + [0]
                rows.append(p + a)
                labels.append([-100] * len(p) + a)
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        mask = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
        return ids, mask, lab

    def edit(self, records):
        self.seen += records
        ids, mask, labels = self._batch()
        self.model.train()
        for self.steps in range(300):
            out = self.model(input_ids=ids, attention_mask=mask.long(), labels=labels)
            pred = out.logits[:, :-1].argmax(-1)
            gold = labels[:, 1:]
            if bool(((pred == gold) | (gold == -100)).all()):
                break
            self.opt.zero_grad()
            out.loss.backward()
            self.opt.step()
        self.model.eval()


def test_memorising_editor_reaches_full_efficacy(gpt2_tok):
    model, tok = _gpt2(gpt2_tok), gpt2_tok
    records = _records(4)
    assert all(len(tok(" " + r.target_new)["input_ids"]) == 1 for r in records)
    result = run_stream(MemorisingEditor(model, tok), model, tok, records, turns=2, batch_size=2,
                        progress=False)
    post = result["post"]
    assert post["efficacy"] == 1.0 and post["generalization"] == 1.0
    assert post["cf_efficacy"] == 1.0
    assert result["pre"]["efficacy"] < 1.0
    assert post["weight_change_norm"] > 0.0 and result["pre"]["weight_change_norm"] == 0.0
    # Single-token targets: greedy decoding and teacher forcing agree record by record.
    prompts, targets = [r.prompt for r in records], [r.target_new for r in records]
    accs = token_accuracy(model, tok, prompts, targets)
    assert generation_exact_match(model, tok, prompts, targets) == [acc == 1.0 for acc in accs]
    assert post["generation_em"] == post["efficacy"]


def test_specificity_vs_unedited(gpt2_tok):
    tok, records = gpt2_tok, _records(6, with_true=False)
    model = _gpt2(tok)
    result = run_stream(NoOpEditor(), model, tok, records, turns=3, batch_size=2, progress=False,
                        generation=False)
    assert result["post"]["specificity_vs_unedited"] == 1.0
    assert result["post"]["weight_change_norm"] == 0.0
    assert result["post"] == result["pre"]

    torch.manual_seed(3)
    editor = RandomisingEditor(model)
    result = run_stream(editor, model, tok, records, turns=3, batch_size=2, progress=False,
                        generation=False)
    assert result["post"]["specificity_vs_unedited"] < 0.5
    assert result["post"]["weight_change_norm"] == pytest.approx(float(editor.noise.norm()), rel=1e-5)


def test_stream_order_curve_and_schema(gpt2_tok):
    tok, records = gpt2_tok, _records(7)
    model = _gpt2(tok)
    editor = NoOpEditor()
    result = run_stream(editor, model, tok, records, turns=3, batch_size=2, curve_every=1,
                        heldout_texts=_corpus()[:5], config={"method": "noop", "path": tok},
                        progress=False)
    # Turns x batch records, in order, the seventh never edited.
    assert [[r.uid for r in b] for b in editor.batches] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert set(result) == set(RESULT_KEYS) == {"protocol", "edits", "pre", "post", "curve",
                                               "timing", "config"}
    assert result["protocol"] == "end_of_stream" and result["edits"] == 6
    for block in (result["pre"], result["post"]):
        assert set(block) == set(METRICS) | {"cf_efficacy", "cf_generalization", "cf_specificity"}
        assert all(0.0 <= block[k] <= 1.0 for k in METRICS[:5])
        assert block["perplexity"] > 1.0
    assert [p["edits"] for p in result["curve"]] == [2, 4, 6]
    assert all(set(METRICS) <= set(p) for p in result["curve"])
    assert result["curve"][-1] == {"edits": 6, **result["post"]}
    assert {"seconds_total", "seconds_per_edit", "seconds_scoring", "peak_rss_mb"} <= set(result["timing"])
    assert result["timing"]["peak_rss_mb"] > 0
    assert result["config"]["method"] == "noop" and result["config"]["turns"] == 3
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # JSON-safe as is

    # The curve scores only the records edited so far.
    result = run_stream(NoOpEditor(), model, tok, records, turns=3, batch_size=2, curve_every=2,
                        progress=False, generation=False)
    first = score_records(model, tok, records[:4], capture_reference(model, tok, records[:4]),
                          generation=False)
    assert [p["edits"] for p in result["curve"]] == [4]
    assert {k: result["curve"][0][k] for k in first} == pytest.approx(first)


def test_too_few_records_is_a_clear_error(gpt2_tok):
    model = _gpt2(gpt2_tok)
    with pytest.raises(ValueError, match=r"2 x 3 = 6 records but only 5"):
        run_stream(RecordingEditor(), model, gpt2_tok, _records(5), turns=2, batch_size=3,
                   progress=False)
    bad = _records(2)
    bad[1].target_new = "  "
    with pytest.raises(ValueError, match=r"record 1.*target_new"):
        run_stream(RecordingEditor(), model, gpt2_tok, bad, turns=1, batch_size=2, progress=False)


def test_report_writes_json_markdown_png(gpt2_tok, tmp_path):
    tok, records = gpt2_tok, _records(4)
    model = _gpt2(tok)
    first = run_stream(NoOpEditor(), model, tok, records, turns=2, batch_size=2, curve_every=1,
                       config={"method": "noop"}, progress=False, generation=False)
    second = copy.deepcopy(first)
    second["config"]["method"] = "other"
    second["post"]["efficacy"] = 0.75
    paths = write_report([first, second], tmp_path / "out", "compare")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text()) == {"noop": first, "other": second}
    table = paths["markdown"].read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| noop") and rows[2].startswith("| other")
    assert "→ 0.750" in rows[2]
    assert markdown_table({"noop": first}).splitlines()[:3] == table.splitlines()[2:5]
    # One result: the JSON is that result, schema intact.
    single = write_report(first, tmp_path, "single")
    assert json.loads(single["json"].read_text()) == first
    assert single["plot"].stat().st_size > 1000
