"""Edit records, their teacher-forced tokenisation, and every data format in and out."""
from .formats import NQ_PREFIX, READERS, detect_format, load_records, records_from_requests
from .writers import (WRITERS, record_to_request, write_counterfact_easyedit, write_counterfact_memit,
                      write_easyedit_requests, write_fever, write_zsre)
from .records import (IGNORE_INDEX, EditRecord, RecordError, answer_positions, answer_targets,
                      edit_batch, locality_batch, paraphrase_batch, split_prompt_answer,
                      tokenize_teacher_forced)

__all__ = [
    "EditRecord", "RecordError", "IGNORE_INDEX", "tokenize_teacher_forced", "split_prompt_answer",
    "answer_positions", "answer_targets", "edit_batch", "paraphrase_batch", "locality_batch",
    "load_records", "detect_format", "records_from_requests", "record_to_request",
    "write_zsre", "write_easyedit_requests", "write_counterfact_easyedit",
    "write_counterfact_memit", "write_fever", "READERS", "WRITERS", "NQ_PREFIX",
]
