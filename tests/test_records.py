"""EditRecord validation and teacher-forced tokenisation on locally built tokenizers."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rledit_plugin.data import (IGNORE_INDEX, EditRecord, RecordError, answer_positions,
                                answer_targets, edit_batch, locality_batch, paraphrase_batch,
                                split_prompt_answer, tokenize_teacher_forced)

CORPUS = ["The capital of Freedonia is Lyon.", "The mother tongue of Danielle Darrieux is French.",
          "Alice Zorn was born in 1990 in Berlin.", "Who wrote Hamlet? Shakespeare wrote it.",
          "nq question: who sang thriller? Michael Jackson."] * 10


def gpt2_style():
    """Byte-level BPE, no BOS (GPT-2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def llama_style():
    """SentencePiece-like BPE with BOS, built like Llama-2's fast tokenizer: spaces become
    "▁" and one is prepended, so " Paris" alone tokenises with a lone leading "▁"."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TOKENIZERS = {"gpt2": gpt2_style(), "llama": llama_style()}
PAIRS = [("The capital of Freedonia is", "Lyon"),
         ("The mother tongue of Danielle Darrieux is", "French"),
         ("Alice Zorn was born in", "1990 in Berlin"),
         ("nq question: who sang thriller", "Michael Jackson")]


def labelled_span(labels_row):
    idx = (labels_row != IGNORE_INDEX).nonzero().flatten().tolist()
    assert idx == list(range(idx[0], idx[-1] + 1)), "answer tokens must be contiguous"
    return idx[0], idx[-1] + 1


def decoded_answer(tok, ids, start, end):
    """The text the labelled tokens add after the prompt, as the tokenizer decodes it."""
    before = tok.decode(ids[:start], skip_special_tokens=True)
    whole = tok.decode(ids[:end], skip_special_tokens=True)
    assert whole.startswith(before)
    return whole[len(before):]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_labels_sit_exactly_on_the_answer_tokens(name):
    tok = TOKENIZERS[name]
    prompts, answers = zip(*PAIRS)
    batch = tokenize_teacher_forced(tok, prompts, answers, max_length=64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, (prompt, answer) in enumerate(PAIRS):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        length = int(batch["attention_mask"][i].sum())
        start, end = labelled_span(labels)
        assert end == length  # the answer ends the sequence, padding follows
        assert torch.equal(labels[start:end], ids[start:end])
        assert decoded_answer(tok, ids.tolist(), start, end) == " " + answer
        # The segmentation is the one the model meets in running text.
        assert ids[:end].tolist() == tok(prompt + " " + answer)["input_ids"]
        if name == "llama":
            assert ids[0].item() == tok.bos_token_id
            assert tok.convert_ids_to_tokens(ids[start].item()) != "▁"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_right_padding(name):
    tok = TOKENIZERS[name]
    batch = tokenize_teacher_forced(tok, ["Who wrote Hamlet?", PAIRS[1][0]], ["Shakespeare", "French"])
    short, long_ = (int(n) for n in batch["attention_mask"].sum(1))
    assert short < long_ == batch["input_ids"].shape[1]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert (batch["input_ids"][0, short:] == pad).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and (batch["attention_mask"][0, :short] == 1).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", TOKENIZERS)
def test_truncation_keeps_the_whole_answer(name):
    tok = TOKENIZERS[name]
    prompt = "Who wrote Hamlet? " * 6 + "The capital of Freedonia is"
    answer = "Lyon"
    n_answer = len(split_prompt_answer(tok, prompt, answer)[1])
    max_length = n_answer + 4
    batch = tokenize_teacher_forced(tok, [prompt, "Who"], [answer, "Lyon"], max_length=max_length)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == max_length
    start, end = labelled_span(batch["labels"][0])
    assert (start, end) == (max_length - n_answer, max_length)
    assert decoded_answer(tok, ids, start, end) == " " + answer
    if name == "llama":  # the prompt is cut from the left but keeps its BOS
        assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[:start], skip_special_tokens=True).strip().endswith("Freedonia is")
    # An answer that does not fit next to one prompt token (and the BOS) is refused, never cut.
    need = len(split_prompt_answer(tok, "Who", "Michael Jackson sang thriller")[1]) + 1 + (name == "llama")
    with pytest.raises(RecordError, match=f"record 1, field 'answer'.*max_length >= {need}, got {need - 1}"):
        tokenize_teacher_forced(tok, ["Who wrote Hamlet?", "Who"], ["Lyon", "Michael Jackson sang thriller"],
                                max_length=need - 1)
    fits = tokenize_teacher_forced(tok, ["Who wrote Hamlet?"], ["Michael Jackson sang thriller"],
                                   max_length=need)
    ids = fits["input_ids"][0].tolist()
    assert len(ids) == need and (fits["labels"][0] != IGNORE_INDEX).sum() == need - 1 - (name == "llama")
    if name == "llama":
        assert ids[0] == tok.bos_token_id


def test_a_tokenizer_that_appends_eos_keeps_it_out_of_the_edit_text():
    """Llama tokenizers with add_eos_token append EOS to every text: it must not end up between
    the prompt and its answer (nor after the answer as an answer token)."""
    plain, tok = llama_style(), llama_style()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    assert tok("The capital of")["input_ids"][-1] == eos
    prompts, answers = zip(*PAIRS)
    ours = tokenize_teacher_forced(tok, prompts, answers, max_length=64)
    reference = tokenize_teacher_forced(plain, prompts, answers, max_length=64)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert eos not in ours["input_ids"][ours["attention_mask"].bool()].tolist()


def test_split_falls_back_when_a_merge_crosses_the_boundary():
    class MergingTokenizer:
        """Characters, except that "s " is one token: 'is Lyon' merges across the boundary."""
        vocab = {}

        def __call__(self, text, add_special_tokens=True):
            pieces, i = [], 0
            while i < len(text):
                step = 2 if text[i:i + 2] == "s " else 1
                pieces.append(self.vocab.setdefault(text[i:i + step], len(self.vocab)))
                i += step
            return {"input_ids": pieces}

    tok = MergingTokenizer()
    p, a = split_prompt_answer(tok, "is", "Lyon")
    assert p == tok("is")["input_ids"] and a == tok(" Lyon")["input_ids"]


def test_answer_positions_is_the_labels_mask_shifted_by_one():
    tok = TOKENIZERS["gpt2"]
    batch = tokenize_teacher_forced(tok, *zip(*PAIRS))
    labels = batch["labels"]
    mask = answer_positions(labels)
    expected = torch.zeros_like(mask)
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1] - 1):
            expected[b, j] = labels[b, j + 1] != IGNORE_INDEX
    assert torch.equal(mask, expected)
    assert mask.sum() == (labels != IGNORE_INDEX).sum()  # no answer starts at position 0
    # The output at a masked position is scored against the next input token.
    assert torch.equal(batch["input_ids"][:, 1:][mask[:, :-1]], labels[:, 1:][mask[:, :-1]])


def test_answer_targets_follow_the_answer_positions_row_order():
    tok = TOKENIZERS["gpt2"]
    labels = tokenize_teacher_forced(tok, *zip(*PAIRS))["labels"]
    mask = answer_positions(labels)
    expected = [int(labels[b, j + 1]) for b in range(labels.shape[0])
                for j in range(labels.shape[1] - 1) if mask[b, j]]   # row-major, as logits[mask]
    assert answer_targets(labels).tolist() == expected
    assert (answer_targets(labels) != IGNORE_INDEX).all()


def test_record_batches():
    tok = TOKENIZERS["gpt2"]
    recs = [EditRecord("The capital of Freedonia is", "Lyon", paraphrases=["Who wrote Hamlet?"] * 2,
                       locality_prompts=["Alice Zorn was born in"], locality_answers=["1990"]),
            EditRecord("Who wrote Hamlet?", "Marlowe")]
    assert edit_batch(tok, recs)["input_ids"].shape[0] == 2
    assert paraphrase_batch(tok, recs)["input_ids"].shape[0] == 2
    assert locality_batch(tok, recs)["input_ids"].shape[0] == 1
    assert paraphrase_batch(tok, recs[1:]) is None and locality_batch(tok, recs[1:]) is None


def test_record_batches_name_the_record_its_uid_and_the_field():
    tok = TOKENIZERS["gpt2"]
    long_answer = "Michael Jackson sang thriller in Berlin " * 3
    recs = [EditRecord("Who wrote Hamlet?", "Marlowe", paraphrases=["Hamlet's author?"], uid="a"),
            EditRecord("The capital of Freedonia is", "Lyon", paraphrases=["Freedonia's capital:"] * 2,
                       locality_prompts=["Who sang thriller?"], locality_answers=[long_answer], uid="b"),
            EditRecord("Alice Zorn was born in", long_answer, uid="c")]
    with pytest.raises(RecordError, match=r"^record 2, field 'target_new': .*\(uid c\)$"):
        edit_batch(tok, recs, max_length=12)
    with pytest.raises(RecordError, match=r"^record 1, field 'locality_answers': .*\(uid b\)$"):
        locality_batch(tok, recs, max_length=12)
    assert paraphrase_batch(tok, recs, max_length=12)["input_ids"].shape[0] == 3
    with pytest.raises(RecordError, match=r"^record 0, field 'paraphrases': .*empty"):
        paraphrase_batch(tok, [EditRecord("p", "t", paraphrases=[" "])])


def test_mismatched_lengths_and_empty_answers_raise():
    tok = TOKENIZERS["gpt2"]
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        tokenize_teacher_forced(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="empty or whitespace"):
        tokenize_teacher_forced(tok, ["Who wrote Hamlet?"], [" "])


@pytest.mark.parametrize("changes,field,words", [
    ({"prompt": 3}, "prompt", "expected a string"),
    ({"target_new": " \t"}, "target_new", "empty or whitespace"),
    ({"target_true": ""}, "target_true", "empty or whitespace"),
    ({"target_true": 1}, "target_true", "expected a string"),
    ({"subject": ["x"]}, "subject", "expected a string"),
    ({"paraphrases": "one"}, "paraphrases", "list of strings"),
    ({"paraphrases": ["ok", " "]}, "paraphrases", "empty or whitespace"),
    ({"locality_prompts": ["a", "b"], "locality_answers": ["x"]}, "locality_answers",
     "2 locality prompts but 1 answers"),
    ({"locality_prompts": ["a"], "locality_answers": [""]}, "locality_answers", "empty"),
])
def test_validate_names_file_index_field(changes, field, words):
    rec = EditRecord(**{"prompt": "p", "target_new": "t", **changes})
    with pytest.raises(RecordError) as err:
        rec.validate(file="data.json", index=3)
    assert str(err.value).startswith(f"file data.json, record 3, field '{field}': ")
    assert words in str(err.value)


def test_dict_round_trip():
    rec = EditRecord("p", "t", "o", "s", ["q"], ["l"], ["a"], {"hop": {"prompt": "x"}}, "7")
    assert EditRecord.from_dict(rec.to_dict()) == rec.validate()
