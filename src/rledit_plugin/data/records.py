"""One record type for every dataset format, and teacher-forced tokenisation.

An :class:`EditRecord` is one fact to write into the model: the edit prompt and
its new answer, the old (true) answer when known, paraphrases that should now
give the new answer, and unrelated (locality) prompts whose answers must not
change.  Every loader in :mod:`rledit_plugin.data.formats` produces these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100


class RecordError(ValueError):
    """Malformed input: names the file, the record index and the field."""

    def __init__(self, message: str, *, file: Optional[str] = None,
                 index: Optional[int] = None, field: Optional[str] = None):
        where = []
        if file is not None:
            where.append(f"file {file!s}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.message, self.file, self.index, self.field = message, file, index, field


@dataclass
class EditRecord:
    prompt: str
    target_new: str
    target_true: Optional[str] = None
    subject: Optional[str] = None
    paraphrases: List[str] = field(default_factory=list)
    locality_prompts: List[str] = field(default_factory=list)
    locality_answers: List[str] = field(default_factory=list)
    portability: Optional[Dict[str, Any]] = None
    uid: Optional[str] = None

    def validate(self, *, file: Optional[str] = None, index: Optional[int] = None) -> "EditRecord":
        """Raise :class:`RecordError` unless every field has a usable value."""
        for name in ("prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RecordError(f"expected a string, got {type(value).__name__}",
                                  file=file, index=index, field=name)
            if not value.strip():
                raise RecordError("is empty or whitespace", file=file, index=index, field=name)
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RecordError(f"expected a string, got {type(self.target_true).__name__}",
                              file=file, index=index, field="target_true")
        if self.target_true is not None and not self.target_true.strip():
            raise RecordError("is empty or whitespace", file=file, index=index, field="target_true")
        if self.subject is not None and not isinstance(self.subject, str):
            raise RecordError(f"expected a string, got {type(self.subject).__name__}",
                              file=file, index=index, field="subject")
        for name in ("paraphrases", "locality_prompts", "locality_answers"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecordError("expected a list of strings", file=file, index=index, field=name)
            if any(not v.strip() for v in value):
                raise RecordError("holds an empty or whitespace string", file=file, index=index,
                                  field=name)
        if len(self.locality_prompts) != len(self.locality_answers):
            raise RecordError(
                f"{len(self.locality_prompts)} locality prompts but {len(self.locality_answers)} answers",
                file=file, index=index, field="locality_answers")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EditRecord":
        return cls(**d)


def _answer_ids(tok, answer: str) -> List[int]:
    """Token ids of ``" " + answer`` tokenised on its own (no special tokens)."""
    return tok(" " + answer.strip(), add_special_tokens=False)["input_ids"]


def batch_ids(tok, texts: List[str]) -> List[List[int]]:
    """Ids with special tokens for each text: one batched call (every Hugging Face tokenizer
    takes a list); text by text for a tokenizer that only takes strings."""
    try:
        ids = tok(texts, add_special_tokens=True)["input_ids"]
        if len(ids) == len(texts) and all(isinstance(x, list) for x in ids):
            return ids
    except (TypeError, ValueError, AttributeError):
        pass
    return [tok(t, add_special_tokens=True)["input_ids"] for t in texts]


def appended_special_ids(tok) -> List[int]:
    """The ids the tokenizer appends after a text's own (``add_eos_token``-style EOS), if any."""
    probe = "The capital of"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[start + len(plain):])
    return []


def split_prompt_answers(tok, prompts: Sequence[str],
                         answers: Sequence[str]) -> List[Tuple[List[int], List[int]]]:
    """(prompt ids with special tokens, answer ids) for each text ``prompt + " " + answer``.

    The answer ids are taken from the tokenisation of the whole text whenever the
    prompt's own ids are a prefix of it: that is the segmentation the model meets
    in running text.  (Tokenising ``" " + answer`` alone is not: SentencePiece-style
    tokenizers such as Llama's turn the leading space into an extra lone "▁" token.)
    Only when a merge crosses the prompt/answer boundary is the answer tokenised
    separately, which keeps the label boundary exact.  Prompts and full texts are
    tokenised in two batched calls.  Tokens a tokenizer appends to every text (an EOS)
    are dropped: they would otherwise stand between the prompt and its answer.
    """
    prompts = [p.rstrip() for p in prompts]
    answers = [a.strip() for a in answers]
    if not prompts:
        return []
    tail = appended_special_ids(tok)

    def drop_tail(ids):
        return ids[:len(ids) - len(tail)] if tail and ids[len(ids) - len(tail):] == tail else ids
    p_ids = [drop_tail(ids) for ids in batch_ids(tok, prompts)]
    full_ids = [drop_tail(ids) for ids in batch_ids(tok, [p + " " + a for p, a in zip(prompts, answers)])]
    out = []
    for p, full, answer in zip(p_ids, full_ids, answers):
        if len(full) > len(p) and full[:len(p)] == p:
            out.append((p, full[len(p):]))
        else:
            out.append((p, _answer_ids(tok, answer)))
    return out


def split_prompt_answer(tok, prompt: str, answer: str) -> Tuple[List[int], List[int]]:
    """One pair of :func:`split_prompt_answers`."""
    return split_prompt_answers(tok, [prompt], [answer])[0]


def tokenize_teacher_forced(tok, prompts: Sequence[str], answers: Sequence[str],
                            max_length: int = 128, device=None) -> Dict[str, torch.Tensor]:
    """Batch ``prompt + " " + answer`` with labels only on the answer tokens.

    Prompt and answer ids come from :func:`split_prompt_answer`, so the label
    boundary is exact whatever the tokenizer merges.  Right padding; when a
    sequence is longer than ``max_length`` the prompt is cut from the left
    (keeping a leading BOS and at least one prompt token).  An answer that does not
    fit next to that is a :class:`RecordError` naming the pair's index: cutting the
    answer would write or score only part of it.  ``labels`` are aligned with
    ``input_ids`` (Hugging Face convention: the model shifts them).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    rows, labels = [], []
    bos = getattr(tok, "bos_token_id", None)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not answer.strip():
            raise RecordError(f"answer {answer!r} is empty or whitespace (prompt {prompt!r})",
                              index=i, field="answer")
        if not prompt.strip():
            raise RecordError(f"prompt {prompt!r} is empty or whitespace (answer {answer!r})",
                              index=i, field="prompt")
    pairs = split_prompt_answers(tok, prompts, answers)
    for i, ((prompt, answer), (p, a)) in enumerate(zip(zip(prompts, answers), pairs)):
        if not a:
            raise RecordError(f"answer {answer!r} tokenises to nothing", index=i, field="answer")
        head = p[:1] if bos is not None and p and p[0] == bos and len(p) > 1 else []
        if len(head) + 1 + len(a) > max_length:
            raise RecordError(f"answer {answer!r} is {len(a)} tokens: with the prompt's last token"
                              f"{' and its BOS' if head else ''} it needs max_length >= "
                              f"{len(head) + 1 + len(a)}, got {max_length}", index=i, field="answer")
        room = max_length - len(a)
        if len(p) > room:     # cut the prompt from the left; a model trained with BOS needs it
            p = head + p[len(p) - (room - len(head)):]
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    input_ids, attention = pad_right(rows, pad_id)
    label_t, _ = pad_right(labels, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def pad_right(rows: Sequence[Sequence[int]], value: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rows`` right-padded with ``value`` into one long tensor, and its attention mask (long)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return out, mask


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, L) of the positions whose *output* predicts an answer token.

    Position ``j`` predicts token ``j + 1``, so the mask is the labels mask
    shifted left by one.  Keys and value-gradients are read at these positions.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def answer_targets(labels: torch.Tensor) -> torch.Tensor:
    """The answer tokens, in the row order of ``logits[answer_positions(labels)]``."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def _record_batch(tok, records: Sequence[EditRecord], prompt_field: str, answer_field: str,
                  max_length: int, device):
    """Teacher-forced batch of one (prompt, answer) field pair of ``records`` (a field holds one
    string or a list); an error names the record (its index in ``records`` and its uid) and the field."""
    prompts, answers, owners = [], [], []
    for i, r in enumerate(records):
        ps, ans = getattr(r, prompt_field), getattr(r, answer_field)
        ps = [ps] if isinstance(ps, str) else list(ps)
        prompts += ps
        answers += [ans] * len(ps) if isinstance(ans, str) else list(ans)
        owners += [i] * len(ps)
    if not prompts:
        return None
    try:
        return tokenize_teacher_forced(tok, prompts, answers, max_length, device)
    except RecordError as e:
        r = records[owners[e.index]]
        uid = f" (uid {r.uid})" if r.uid is not None else ""
        which = prompt_field if e.field == "prompt" else answer_field
        raise RecordError(e.message + uid, index=owners[e.index], field=which) from None


def edit_batch(tok, records: Sequence[EditRecord], max_length: int = 128, device=None):
    """Teacher-forced batch of the edit prompts with their new targets."""
    return _record_batch(tok, records, "prompt", "target_new", max_length, device)


def paraphrase_batch(tok, records: Sequence[EditRecord], max_length: int = 128, device=None):
    """Every paraphrase of every record, answered with the new target (None if there are none)."""
    return _record_batch(tok, records, "paraphrases", "target_new", max_length, device)


def locality_batch(tok, records: Sequence[EditRecord], max_length: int = 128, device=None):
    """Every locality prompt with its gold answer (None if there are none)."""
    return _record_batch(tok, records, "locality_prompts", "locality_answers", max_length, device)
