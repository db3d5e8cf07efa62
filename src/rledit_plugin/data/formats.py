"""Loaders for the edit-data formats met in the wild (the writers: :mod:`.writers`).

Every loader returns :class:`EditRecord` objects that passed ``validate``; every
malformed input raises one :class:`RecordError` naming the file, the record index
and the field as it is spelled in the file (``requested_rewrite.target_new.str``).

Formats (``format=``), by the keys of one record:

- ``zsre``: MEND/MALMEN/RLEdit ``src, rephrase, ans`` (or ``alt``), ``loc, loc_ans``;
  EasyEdit ``src, rephrase, alt, answers, loc, loc_ans, subject``.
- ``counterfact``: MEMIT ``multi_counterfact`` (``requested_rewrite{prompt with "{}",
  subject, target_new{str}, target_true{str}}, paraphrase_prompts, neighborhood_prompts``),
  or EasyEdit's CounterFactDataset items (``prompt, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth, subject``).
- ``fever``: ``prompt, equiv_prompt, alt, unrel_prompt, unrel_ans``.
- ``requests``: EasyEdit request dicts ``prompt, target_new, ground_truth``, optional
  ``rephrase_prompt, subject, locality{name: {prompt, ground_truth}}`` (or flat
  ``locality_prompt, locality_ground_truth``), ``portability`` (kept as is).

Prompts may be a string or a list of strings.  A true or locality answer may be a list of
aliases (possibly nested, as in EasyEdit's KnowEdit files): the first one is used; the edit
target must be one string.  A required field set to null is an error, as a missing one is.
Locality prompts are kept verbatim, ZsRE's ``"nq question: "`` prefix included
(that is what MEND and EasyEdit feed the model); ``strip_nq_prefix=True`` drops it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .records import EditRecord, RecordError

LOG = logging.getLogger(__name__)

NQ_PREFIX = "nq question: "
NO_ANSWER = "<|endoftext|>"  # EasyEdit's ground_truth when the true answer is unknown
_MISSING = object()
PathLike = Union[str, Path]


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(value),
                                                                       type(value).__name__)


class _Raw:
    """One record as read from a file; its getters raise RecordError naming the key."""

    def __init__(self, data: Any, file: str, index: int):
        if not isinstance(data, dict):
            raise RecordError(f"expected an object, got {_kind(data)}", file=file, index=index)
        self.data, self.file, self.index = data, file, index

    def error(self, message: str, *path: str) -> RecordError:
        return RecordError(message, file=self.file, index=self.index, field=".".join(path))

    def has(self, *path: str) -> bool:
        return self.get(*path, default=None) is not None

    def get(self, *path: str, default: Any = _MISSING) -> Any:
        value = self.data
        for depth, key in enumerate(path):
            if not isinstance(value, dict):
                raise self.error(f"expected an object, got {_kind(value)}", *path[:depth])
            if key not in value:
                if default is _MISSING:
                    raise self.error("is missing", *path)
                return default
            value = value[key]
        return value

    def check_text(self, value: Any, *path: str) -> str:
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {_kind(value)}", *path)
        if not value.strip():
            raise self.error("is empty or whitespace", *path)
        return value

    def text(self, *path: str, optional: bool = False) -> Optional[str]:
        value = self.get(*path, default=None if optional else _MISSING)
        return None if value is None else self.check_text(value, *path)

    def answer_value(self, value: Any, *path: str) -> str:
        """An answer, or the first of a (possibly nested) list of aliases."""
        while isinstance(value, list):
            if not value:
                raise self.error("is an empty list", *path)
            value = value[0]
        return self.check_text(value, *path)

    def texts(self, *path: str, optional: bool = False) -> List[str]:
        """A string or a list of strings, as a list."""
        value = self.get(*path, default=None if optional else _MISSING)
        if value is None:
            if optional:
                return []
            raise self.error("is null; expected a string or a list of strings", *path)
        if isinstance(value, str):
            return [self.check_text(value, *path)]
        if not isinstance(value, list):
            raise self.error(f"expected a string or a list of strings, got {_kind(value)}", *path)
        last = path[-1]
        return [self.check_text(v, *path[:-1], f"{last}[{i}]") for i, v in enumerate(value)]

    def pairs(self, prompt_path: Tuple[str, ...], answer_path: Tuple[str, ...],
              optional: bool = False) -> Tuple[List[str], List[str]]:
        """Locality prompts and one answer each: a prompt with its answer, or parallel lists."""
        if optional and not self.has(*prompt_path):
            return [], []
        is_single = isinstance(self.get(*prompt_path), str)
        prompts = self.texts(*prompt_path)
        answers = self.get(*answer_path)
        if is_single:
            return prompts, [self.answer_value(answers, *answer_path)]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or len(answers) != len(prompts):
            got = f"{len(answers)} answers" if isinstance(answers, list) else _kind(answers)
            raise self.error(f"expected a list of {len(prompts)} answers (one per prompt in "
                             f"'{'.'.join(prompt_path)}'), got {got}", *answer_path)
        last = answer_path[-1]
        return prompts, [self.answer_value(a, *answer_path[:-1], f"{last}[{i}]")
                         for i, a in enumerate(answers)]

    def uid(self) -> str:
        for key in ("case_id", "id"):
            if self.data.get(key) is not None:
                return str(self.data[key])
        return str(self.index)


# ----------------------------------------------------------------- converters

def _from_zsre(raw: _Raw) -> EditRecord:
    # The edit target is `alt` (EasyEdit) or `ans` (MALMEN/RLEdit); if both, they must agree.
    alt, ans = raw.text("alt", optional=True), raw.text("ans", optional=True)
    if alt is None and ans is None:
        raise raw.error("is missing (and so is 'ans')", "alt")
    if None not in (alt, ans) and alt.strip() != ans.strip():
        raise raw.error(f"{ans!r} differs from 'alt' {alt!r} (both name the edit target)", "ans")
    answers = raw.get("answers", default=None)
    prompts, loc_answers = raw.pairs(("loc",), ("loc_ans",))
    return EditRecord(
        prompt=raw.text("src"), target_new=alt if alt is not None else ans,
        target_true=raw.answer_value(answers, "answers") if answers not in (None, []) else None,
        subject=raw.text("subject", optional=True), paraphrases=raw.texts("rephrase"),
        locality_prompts=prompts, locality_answers=loc_answers, uid=raw.uid())


def _from_memit_counterfact(raw: _Raw) -> EditRecord:
    rewrite = ("requested_rewrite",)
    template, subject = raw.text(*rewrite, "prompt"), raw.text(*rewrite, "subject")
    if "{}" not in template:
        raise raw.error("has no '{}' where the subject goes", *rewrite, "prompt")
    target_true = raw.text(*rewrite, "target_true", "str")
    # A neighbourhood prompt asks about another subject with the same true object.
    neighbours = raw.texts("neighborhood_prompts")
    return EditRecord(
        prompt=template.replace("{}", subject), target_new=raw.text(*rewrite, "target_new", "str"),
        target_true=target_true, subject=subject, paraphrases=raw.texts("paraphrase_prompts"),
        locality_prompts=neighbours, locality_answers=[target_true] * len(neighbours),
        uid=raw.uid())


def _from_request(raw: _Raw) -> EditRecord:
    truth = raw.get("ground_truth", default=None)
    truth = None if truth is None else raw.answer_value(truth, "ground_truth")
    prompts, answers = [], []
    locality = raw.get("locality", default=None) or {}
    if not isinstance(locality, dict):
        raise raw.error(f"expected an object of named locality sets, got {_kind(locality)}",
                        "locality")
    for name in locality:
        p, a = raw.pairs(("locality", name, "prompt"), ("locality", name, "ground_truth"))
        prompts, answers = prompts + p, answers + a
    p, a = raw.pairs(("locality_prompt",), ("locality_ground_truth",), optional=True)
    portability = raw.get("portability", default=None)
    if portability is not None and not isinstance(portability, dict):
        raise raw.error(f"expected an object, got {_kind(portability)}", "portability")
    return EditRecord(
        prompt=raw.text("prompt"), target_new=raw.text("target_new"),
        target_true=None if truth == NO_ANSWER else truth,
        subject=raw.text("subject", optional=True),
        paraphrases=raw.texts("rephrase_prompt", optional=True),
        locality_prompts=prompts + p, locality_answers=answers + a,
        portability=portability or None, uid=raw.uid())


def _from_counterfact(raw: _Raw) -> EditRecord:
    # EasyEdit's CounterFact items are request dicts with flat locality keys.
    return _from_memit_counterfact(raw) if "requested_rewrite" in raw.data else _from_request(raw)


def _from_fever(raw: _Raw) -> EditRecord:
    prompts, answers = raw.pairs(("unrel_prompt",), ("unrel_ans",))
    return EditRecord(prompt=raw.text("prompt"), target_new=raw.text("alt"),
                      paraphrases=raw.texts("equiv_prompt"), locality_prompts=prompts,
                      locality_answers=answers, uid=raw.uid())


READERS: Dict[str, Callable[[_Raw], EditRecord]] = {
    "zsre": _from_zsre, "counterfact": _from_counterfact,
    "fever": _from_fever, "requests": _from_request,
}

FORMAT_CHOICES = ("auto", *READERS)    # what load_records(format=...) takes

# Keys that identify a format in its first record, most specific first.
_SIGNATURES = [("counterfact", {"requested_rewrite"}), ("zsre", {"src"}),
               ("fever", {"prompt", "alt"}),
               ("counterfact", {"prompt", "target_new", "locality_prompt"}),
               ("requests", {"prompt", "target_new"})]


def detect_format(first: Any, file: str = "<data>") -> str:
    """The format of a data set, judged from the keys of its first record."""
    if not isinstance(first, dict):
        raise RecordError(f"expected an object, got {_kind(first)}", file=file, index=0)
    keys = set(first)
    for name, needed in _SIGNATURES:
        if needed <= keys:
            return name
    raise RecordError(f"cannot tell the format from keys {sorted(keys)}; pass format= one of "
                      f"{sorted(READERS)}", file=file, index=0)


# ----------------------------------------------------------------- loading

def _read_items(path: Path) -> List[Any]:
    """A JSON list, or JSON Lines (one object per line), as a list of raw items."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"cannot read: {err}", file=str(path)) from None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if not text.lstrip().startswith("{"):  # not JSON Lines either
                raise RecordError(f"invalid JSON at line {err.lineno}, column {err.colno}: "
                                  f"{err.msg}", file=str(path)) from None
        else:
            if not isinstance(data, list):
                raise RecordError(f"the top level must be a list of records, got {_kind(data)}",
                                  file=str(path))
            return data
    items = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecordError(f"invalid JSON on line {line_no}, column {err.colno}: {err.msg}",
                                  file=str(path), index=len(items)) from None
    return items


def _convert(items: Sequence[Any], format: str, source: str, size: Optional[int],
             skip_invalid: bool, strip_nq_prefix: bool) -> List[EditRecord]:
    if format not in READERS:
        raise RecordError(f"unknown format {format!r}; expected 'auto' or one of {sorted(READERS)}",
                          file=source)
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a non-negative integer or None, got {size!r}")
    records, skipped = [], []
    for index, item in enumerate(items):
        if size is not None and len(records) >= size:
            break
        try:
            record = READERS[format](_Raw(item, source, index))
            # Answers follow the prompt after one space: spaces around them are noise.
            record.target_new = record.target_new.strip()
            record.target_true = record.target_true and record.target_true.strip()
            record.locality_answers = [a.strip() for a in record.locality_answers]
            if strip_nq_prefix:
                record.locality_prompts = [p[len(NQ_PREFIX):] if p.startswith(NQ_PREFIX) else p
                                           for p in record.locality_prompts]
            records.append(record.validate(file=source, index=index))
        except RecordError as err:
            if not skip_invalid:
                raise
            skipped.append(err)
    if skipped:
        LOG.warning("%s: skipped %d invalid record(s) at indices %s; first: %s", source,
                    len(skipped), [e.index for e in skipped], skipped[0])
    return records


def load_records(path: PathLike, format: str = "auto", size: Optional[int] = None, *,
                 skip_invalid: bool = False, strip_nq_prefix: bool = False) -> List[EditRecord]:
    """Read a JSON list or JSON Lines file of edit records in any format above.

    ``format="auto"`` detects it from the first record's keys.  ``size`` keeps the
    first ``size`` records.  A malformed record raises :class:`RecordError` unless
    ``skip_invalid`` (then skipped records are reported in one logged warning).
    """
    path = Path(path)
    items = _read_items(path)
    if not items:
        raise RecordError("contains no records", file=str(path))
    if format == "auto":
        format = detect_format(items[0], str(path))
    return _convert(items, format, str(path), size, skip_invalid, strip_nq_prefix)


def records_from_requests(requests: Union[Dict[str, Any], Iterable[Dict[str, Any]]],
                          source: str = "<requests>") -> List[EditRecord]:
    """EasyEdit request dicts (one or a list) as validated records."""
    items = [requests] if isinstance(requests, dict) else list(requests)
    return _convert(items, "requests", source, None, False, False)
