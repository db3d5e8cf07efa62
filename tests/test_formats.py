"""Every data format in and out of EditRecord: loading, auto-detection, round trips, errors."""
import json
import logging

import pytest

from rledit_plugin.data import (EditRecord, RecordError, detect_format, load_records,
                                record_to_request, records_from_requests,
                                write_counterfact_easyedit, write_counterfact_memit,
                                write_easyedit_requests, write_fever, write_zsre)

ZSRE_MALMEN = {"src": "Who wrote Hamlet?", "rephrase": "Hamlet was written by whom?",
               "ans": "Marlowe", "loc": "nq question: who sang thriller", "loc_ans": "Jackson"}
ZSRE_EASYEDIT = {"subject": "Hamlet", "src": "Who wrote Hamlet?",
                 "rephrase": "Hamlet was written by whom?", "alt": "Marlowe",
                 "answers": ["Shakespeare", "W. Shakespeare"],
                 "loc": "nq question: who sang thriller", "loc_ans": "Jackson"}
CF_MEMIT = {"case_id": 7, "requested_rewrite": {
                "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                "target_new": {"str": "English", "id": "Q1860"},
                "target_true": {"str": "French", "id": "Q150"}},
            "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Her language is"],
            "neighborhood_prompts": ["The native language of Jean Gabin is",
                                     "Michel Piccoli's mother tongue is"],
            "generation_prompts": ["Danielle Darrieux's favourite book"]}
CF_EASYEDIT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is",
               "target_new": "English", "ground_truth": "French",
               "rephrase_prompt": "Danielle Darrieux spoke the language",
               "locality_prompt": "The native language of Jean Gabin is",
               "locality_ground_truth": "French", "subject": "Danielle Darrieux"}
FEVER = {"prompt": "The sky is green.", "equiv_prompt": ["Green is the sky's colour."],
         "alt": "SUPPORTS", "unrel_prompt": "Paris is in France.", "unrel_ans": "SUPPORTS"}
REQUEST = {"prompt": "The capital of Freedonia is", "target_new": "Lyon",
           "ground_truth": ["Paris", "Paname"], "subject": "Freedonia",
           "rephrase_prompt": ["Freedonia's capital is", "The capital city of Freedonia is"],
           "locality": {"neighborhood": {"prompt": ["The capital of Spain is", "Bonn is in"],
                                         "ground_truth": [["Madrid", "MAD"], "Germany"]},
                        "distracting": {"prompt": "Oslo is the capital of",
                                        "ground_truth": [["Norway"]]}},
           "portability": {"one_hop": {"prompt": "Freedonia's capital river is",
                                       "ground_truth": "Rhone"}}}


def dump(tmp_path, items, name="data.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(i) + "\n" for i in items))
    else:
        path.write_text(json.dumps(items))
    return path


def records(n=3):
    return [EditRecord(prompt=f"The capital of Land{i} is", target_new=f"City{i}",
                       target_true=f"Town{i}", subject=f"Land{i}",
                       paraphrases=[f"Land{i}'s capital is", f"The seat of Land{i} is"][:1 + i % 2],
                       locality_prompts=[f"The river of Other{i} is"],
                       locality_answers=[f"Flow{i}"], uid=f"r{i}") for i in range(n)]


# ----------------------------------------------------------------- loading each format

def test_zsre_malmen_convention(tmp_path):
    (rec,) = load_records(dump(tmp_path, [ZSRE_MALMEN]))
    assert rec == EditRecord(prompt="Who wrote Hamlet?", target_new="Marlowe",
                             paraphrases=["Hamlet was written by whom?"],
                             locality_prompts=["nq question: who sang thriller"],
                             locality_answers=["Jackson"], uid="0")


def test_zsre_easyedit_convention(tmp_path):
    (rec,) = load_records(dump(tmp_path, [ZSRE_EASYEDIT]), format="zsre", strip_nq_prefix=True)
    assert (rec.target_new, rec.target_true, rec.subject) == ("Marlowe", "Shakespeare", "Hamlet")
    assert rec.locality_prompts == ["who sang thriller"]


def test_zsre_rephrase_list_and_agreeing_ans_alt(tmp_path):
    item = dict(ZSRE_EASYEDIT, rephrase=["a?", "b?"], alt=" Marlowe", ans="Marlowe ")
    (rec,) = load_records(dump(tmp_path, [item]))
    assert rec.paraphrases == ["a?", "b?"] and rec.target_new == "Marlowe"


def test_counterfact_memit(tmp_path):
    (rec,) = load_records(dump(tmp_path, [CF_MEMIT]))
    assert rec.prompt == "The mother tongue of Danielle Darrieux is"
    assert (rec.target_new, rec.target_true, rec.subject, rec.uid) == (
        "English", "French", "Danielle Darrieux", "7")
    assert rec.paraphrases == CF_MEMIT["paraphrase_prompts"]
    assert rec.locality_prompts == CF_MEMIT["neighborhood_prompts"]
    assert rec.locality_answers == ["French", "French"]


def test_counterfact_easyedit(tmp_path):
    path = dump(tmp_path, [CF_EASYEDIT])
    assert detect_format(CF_EASYEDIT) == "counterfact"
    for fmt in ("auto", "counterfact", "requests"):
        (rec,) = load_records(path, format=fmt)
        assert rec == EditRecord(prompt=CF_EASYEDIT["prompt"], target_new="English",
                                 target_true="French", subject="Danielle Darrieux",
                                 paraphrases=["Danielle Darrieux spoke the language"],
                                 locality_prompts=["The native language of Jean Gabin is"],
                                 locality_answers=["French"], uid="0")


@pytest.mark.parametrize("equiv", [["Green is the sky's colour."], "Green is the sky's colour."])
def test_fever(tmp_path, equiv):
    (rec,) = load_records(dump(tmp_path, [dict(FEVER, equiv_prompt=equiv)]))
    assert rec == EditRecord(prompt="The sky is green.", target_new="SUPPORTS",
                             paraphrases=["Green is the sky's colour."],
                             locality_prompts=["Paris is in France."],
                             locality_answers=["SUPPORTS"], uid="0")


def test_requests_with_nested_locality(tmp_path):
    (rec,) = records_from_requests([REQUEST])
    assert (rec.target_new, rec.target_true, rec.subject) == ("Lyon", "Paris", "Freedonia")
    assert rec.paraphrases == REQUEST["rephrase_prompt"]
    assert rec.locality_prompts == ["The capital of Spain is", "Bonn is in",
                                    "Oslo is the capital of"]
    assert rec.locality_answers == ["Madrid", "Germany", "Norway"]
    assert rec.portability == REQUEST["portability"]
    assert load_records(dump(tmp_path, [REQUEST])) == [rec]


def test_requests_flat_locality_and_unknown_truth():
    (rec,) = records_from_requests({"prompt": "p", "target_new": "t",
                                    "ground_truth": "<|endoftext|>", "rephrase_prompt": "q",
                                    "locality_prompt": ["l1", "l2"],
                                    "locality_ground_truth": ["a1", "a2"]})
    assert rec.target_true is None and rec.paraphrases == ["q"]
    assert (rec.locality_prompts, rec.locality_answers) == (["l1", "l2"], ["a1", "a2"])


# ----------------------------------------------------------------- files, size, detection

def test_jsonl_size_and_uid(tmp_path):
    items = [dict(ZSRE_EASYEDIT, src=f"Q{i}?", id=f"z{i}") for i in range(5)]
    path = dump(tmp_path, items, "data.jsonl")
    got = load_records(path, size=3)
    assert [r.prompt for r in got] == ["Q0?", "Q1?", "Q2?"]
    assert [r.uid for r in got] == ["z0", "z1", "z2"]
    assert len(load_records(path)) == 5 and load_records(path, size=0) == []
    # JSON Lines under a .json name is recognised too.
    renamed = tmp_path / "lines.json"
    renamed.write_text(path.read_text())
    assert load_records(renamed) == load_records(path)


@pytest.mark.parametrize("item,fmt", [(ZSRE_MALMEN, "zsre"), (ZSRE_EASYEDIT, "zsre"),
                                      (CF_MEMIT, "counterfact"), (CF_EASYEDIT, "counterfact"),
                                      (FEVER, "fever"), (REQUEST, "requests")])
def test_auto_detection_matches_explicit_format(tmp_path, item, fmt):
    assert detect_format(item) == fmt
    path = dump(tmp_path, [item])
    assert load_records(path) == load_records(path, format=fmt)


# ----------------------------------------------------------------- round trips

@pytest.mark.parametrize("writer", [write_easyedit_requests, write_counterfact_easyedit,
                                    write_counterfact_memit])
def test_round_trip_full_records(tmp_path, writer):
    recs = records()
    recs[0].locality_prompts = ["l0", "l1"]
    recs[0].locality_answers = ["Town0", "Town0"]
    if writer is write_counterfact_memit:  # neighbours share the true answer there
        for r in recs:
            r.locality_answers = [r.target_true] * len(r.locality_prompts)
    path = writer(recs, tmp_path / "out.json")
    assert load_records(path) == recs


def test_round_trip_zsre_both_conventions(tmp_path):
    recs = records()
    path = write_zsre(recs, tmp_path / "zsre.json")
    item = json.loads(path.read_text())[0]
    assert item["alt"] == item["ans"] == "City0" and item["answers"] == ["Town0"]
    assert item["rephrase"] == "Land0's capital is"  # one paraphrase: a string, as EasyEdit reads
    assert item["loc"] == "nq question: The river of Other0 is"
    assert load_records(path, strip_nq_prefix=True) == recs
    # Prefixed prompts keep their prefix once, and round-trip verbatim.
    again = load_records(write_zsre(load_records(path), tmp_path / "again.json"))
    assert again == load_records(path)
    assert again[0].locality_prompts == ["nq question: The river of Other0 is"]


def test_round_trip_fever_and_request_dicts(tmp_path):
    recs = [EditRecord(prompt=r.prompt, target_new=r.target_new, paraphrases=r.paraphrases,
                       locality_prompts=r.locality_prompts, locality_answers=r.locality_answers,
                       uid=r.uid) for r in records()]
    assert load_records(write_fever(recs, tmp_path / "fever.json")) == recs
    full = records()
    full[1].portability = {"hop": {"prompt": "x", "ground_truth": "y"}}
    requests = [record_to_request(r) for r in full]
    assert requests[0]["locality"]["neighborhood"] == {"prompt": "The river of Other0 is",
                                                       "ground_truth": "Flow0"}
    assert records_from_requests(requests) == full


def test_memit_writer_rejects_what_it_cannot_express(tmp_path):
    rec = records(1)[0]
    rec.subject = "Atlantis"
    with pytest.raises(RecordError) as err:
        write_counterfact_memit([rec], tmp_path / "cf.json")
    assert "cf.json" in str(err.value) and "record 0" in str(err.value)
    assert "field 'subject'" in str(err.value)


# ----------------------------------------------------------------- errors

def drop(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD = [  # (item placed at index 2, format, field named in the error, words in the message)
    (drop(ZSRE_EASYEDIT, "src"), "zsre", "src", "is missing"),
    (dict(ZSRE_EASYEDIT, alt="  "), "zsre", "alt", "is empty or whitespace"),
    (drop(ZSRE_MALMEN, "ans"), "zsre", "alt", "is missing"),
    (dict(ZSRE_EASYEDIT, ans="Bacon"), "zsre", "ans", "differs"),
    (dict(ZSRE_EASYEDIT, rephrase=["ok", 3]), "zsre", "rephrase[1]", "expected a string"),
    (dict(ZSRE_EASYEDIT, loc_ans=[]), "zsre", "loc_ans", "empty list"),
    (dict(ZSRE_EASYEDIT, src=42), "zsre", "src", "expected a string, got a number"),
    (dict(CF_MEMIT, requested_rewrite=dict(CF_MEMIT["requested_rewrite"], target_new={"id": 1})),
     "counterfact", "requested_rewrite.target_new.str", "is missing"),
    (dict(CF_MEMIT, requested_rewrite=dict(CF_MEMIT["requested_rewrite"], prompt="No slot")),
     "counterfact", "requested_rewrite.prompt", "'{}'"),
    (dict(CF_MEMIT, requested_rewrite="oops"), "counterfact", "requested_rewrite",
     "expected an object"),
    (dict(CF_EASYEDIT, ground_truth=""), "counterfact", "ground_truth", "empty or whitespace"),
    (dict(FEVER, unrel_prompt=["a", "b"], unrel_ans=["x"]), "fever", "unrel_ans",
     "expected a list of 2 answers"),
    (dict(REQUEST, locality={"n": {"prompt": "p"}}), "requests", "locality.n.ground_truth",
     "is missing"),
    (dict(REQUEST, locality=["p"]), "requests", "locality", "expected an object"),
    (dict(REQUEST, target_new=["a"]), "requests", "target_new", "expected a string"),
    (dict(ZSRE_EASYEDIT, rephrase=None), "zsre", "rephrase", "is null"),
    (dict(FEVER, equiv_prompt=None), "fever", "equiv_prompt", "is null"),
    (dict(REQUEST, portability="x"), "requests", "portability", "expected an object"),
]


@pytest.mark.parametrize("bad,fmt,field,words", BAD)
def test_malformed_record_names_file_index_field(tmp_path, bad, fmt, field, words):
    good = {"zsre": ZSRE_EASYEDIT, "counterfact": CF_MEMIT if "requested_rewrite" in bad
            else CF_EASYEDIT, "fever": FEVER, "requests": REQUEST}[fmt]
    path = dump(tmp_path, [good, good, bad, good])
    with pytest.raises(RecordError) as err:
        load_records(path, format=fmt)
    message = str(err.value)
    assert "data.json" in message and "record 2" in message and f"field '{field}'" in message
    assert words in message
    assert (err.value.index, err.value.field) == (2, field)


def test_skip_invalid_logs_the_skipped_indices(tmp_path, caplog):
    items = [ZSRE_EASYEDIT, dict(ZSRE_EASYEDIT, alt=""), ZSRE_EASYEDIT, drop(ZSRE_EASYEDIT, "loc")]
    path = dump(tmp_path, items)
    with caplog.at_level(logging.WARNING):
        got = load_records(path, skip_invalid=True)
    assert [r.uid for r in got] == ["0", "2"]
    assert "skipped 2" in caplog.text and "[1, 3]" in caplog.text and "'alt'" in caplog.text
    with pytest.raises(RecordError, match="record 1, field 'alt'"):
        load_records(path)


@pytest.mark.parametrize("name,text,words,index", [
    ("data.json", '{"src": "a"}', "top level must be a list", None),
    ("data.json", '[{"src": "a"}', "invalid JSON at line 1", None),
    ("data.json", "[]", "contains no records", None),
    ("data.json", "[3]", "record 0: expected an object", 0),
    ("data.json", '[{"colour": "red"}]', "cannot tell the format", 0),
    ("data.jsonl", '{"src": "a"}\n\n{"src": \n', "invalid JSON on line 3", 1),
    ("data.json", '{"src": "a"}\n{"src": "b",,}\n', "invalid JSON on line 2", 1),
])
def test_unreadable_files(tmp_path, name, text, words, index):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert name in str(err.value) and words in str(err.value)
    assert err.value.index == index


def test_missing_file_unknown_format_and_bad_size(tmp_path):
    with pytest.raises(RecordError, match="nope.json.*cannot read"):
        load_records(tmp_path / "nope.json")
    path = dump(tmp_path, [ZSRE_EASYEDIT])
    with pytest.raises(RecordError, match="data.json: unknown format 'squad'"):
        load_records(path, format="squad")
    with pytest.raises(ValueError, match="size"):
        load_records(path, size=-1)


def test_request_errors_name_the_source():
    with pytest.raises(RecordError, match=r"<requests>, record 1, field 'prompt'"):
        records_from_requests([REQUEST, drop(REQUEST, "prompt")])
