"""Writers for the edit-data formats of :mod:`.formats`, and EasyEdit request dicts.

Each writer validates every record first; a record a format cannot express raises one
:class:`RecordError` naming the file being written, the record index and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence, Union

from .formats import NO_ANSWER, NQ_PREFIX, PathLike
from .records import EditRecord, RecordError

def _one_or_many(values: Sequence[str]) -> Union[str, List[str]]:
    """One value as a string (what MEND and EasyEdit's loaders read), several as a list."""
    return values[0] if len(values) == 1 else list(values)


def _with_uid(item: Dict[str, Any], record: EditRecord) -> Dict[str, Any]:
    if record.uid is not None:
        item["case_id"] = record.uid
    return item


def record_to_request(record: EditRecord) -> Dict[str, Any]:
    """An EasyEdit request dict; the locality pairs go under the name "neighborhood"."""
    request: Dict[str, Any] = {"prompt": record.prompt, "target_new": record.target_new,
                               "ground_truth": record.target_true or NO_ANSWER}
    if record.paraphrases:
        request["rephrase_prompt"] = _one_or_many(record.paraphrases)
    if record.subject is not None:
        request["subject"] = record.subject
    if record.locality_prompts:
        request["locality"] = {"neighborhood": {"prompt": _one_or_many(record.locality_prompts),
                                                "ground_truth": _one_or_many(record.locality_answers)}}
    if record.portability is not None:
        request["portability"] = record.portability
    return _with_uid(request, record)


def _zsre_item(record: EditRecord) -> Dict[str, Any]:
    # Keys of both conventions: `alt` + `answers` (EasyEdit) and `ans` (MALMEN/RLEdit).
    item = {"src": record.prompt, "rephrase": _one_or_many(record.paraphrases),
            "alt": record.target_new, "ans": record.target_new,
            "answers": [record.target_true] if record.target_true else [],
            "loc": _one_or_many([p if p.startswith(NQ_PREFIX) else NQ_PREFIX + p
                                 for p in record.locality_prompts]),
            "loc_ans": _one_or_many(record.locality_answers)}
    if record.subject is not None:
        item["subject"] = record.subject
    return _with_uid(item, record)


def _counterfact_easyedit_item(record: EditRecord) -> Dict[str, Any]:
    item = {"prompt": record.prompt, "target_new": record.target_new,
            "ground_truth": record.target_true or NO_ANSWER,
            "rephrase_prompt": _one_or_many(record.paraphrases),
            "locality_prompt": _one_or_many(record.locality_prompts),
            "locality_ground_truth": _one_or_many(record.locality_answers)}
    if record.subject is not None:
        item["subject"] = record.subject
    return _with_uid(item, record)


def _counterfact_memit_item(record: EditRecord) -> Dict[str, Any]:
    if not record.subject or record.subject not in record.prompt:
        raise RecordError("MEMIT CounterFact needs a subject that occurs in the prompt",
                          field="subject")
    if not record.target_true:
        raise RecordError("MEMIT CounterFact needs the true answer", field="target_true")
    if any(a != record.target_true for a in record.locality_answers):
        raise RecordError("MEMIT CounterFact neighbourhood prompts must all be answered by "
                          "target_true", field="locality_answers")
    rewrite = {"prompt": record.prompt.replace(record.subject, "{}", 1), "subject": record.subject,
               "target_new": {"str": record.target_new}, "target_true": {"str": record.target_true}}
    return _with_uid({"requested_rewrite": rewrite, "paraphrase_prompts": list(record.paraphrases),
                      "neighborhood_prompts": list(record.locality_prompts)}, record)


def _fever_item(record: EditRecord) -> Dict[str, Any]:
    return _with_uid({"prompt": record.prompt, "equiv_prompt": list(record.paraphrases),
                      "alt": record.target_new,
                      "unrel_prompt": _one_or_many(record.locality_prompts),
                      "unrel_ans": _one_or_many(record.locality_answers)}, record)


def _write(records: Iterable[EditRecord], path: PathLike,
           to_item: Callable[[EditRecord], Dict[str, Any]]) -> Path:
    items = []
    for index, record in enumerate(records):
        try:
            items.append(to_item(record.validate()))
        except RecordError as err:  # name the file and record being written
            raise RecordError(err.message, file=str(path), index=index, field=err.field) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_zsre(records: Iterable[EditRecord], path: PathLike) -> Path:
    """ZsRE JSON list with the keys of both conventions (MEND/MALMEN/RLEdit and EasyEdit)."""
    return _write(records, path, _zsre_item)


def write_easyedit_requests(records: Iterable[EditRecord], path: PathLike) -> Path:
    """JSON list of EasyEdit request dicts (see :func:`record_to_request`)."""
    return _write(records, path, record_to_request)


def write_counterfact_easyedit(records: Iterable[EditRecord], path: PathLike) -> Path:
    """JSON list in the item shape of EasyEdit's CounterFactDataset."""
    return _write(records, path, _counterfact_easyedit_item)


def write_counterfact_memit(records: Iterable[EditRecord], path: PathLike) -> Path:
    """MEMIT ``multi_counterfact`` JSON; each subject must occur in its prompt and every
    neighbourhood prompt be answered by the record's true answer."""
    return _write(records, path, _counterfact_memit_item)


def write_fever(records: Iterable[EditRecord], path: PathLike) -> Path:
    """FEVER-style JSON list (``prompt, equiv_prompt, alt, unrel_prompt, unrel_ans``)."""
    return _write(records, path, _fever_item)


WRITERS = {"zsre": write_zsre, "requests": write_easyedit_requests,
           "counterfact": write_counterfact_easyedit, "counterfact_memit": write_counterfact_memit,
           "fever": write_fever}
