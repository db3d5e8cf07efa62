"""A deterministic synthetic factual world: the offline embedded default.

Invented people (seeded syllable names) each have one fact per relation (home
city, language, sport, colour, instrument, profession, pet, fruit), every
object a single word.  Every relation has four question templates (template 0
is the edit prompt, the others its paraphrases), a training sentence and a
held-out sentence (never shown to the tiny LM; for perplexity).

Subjects fall into disjoint groups:

* ``train`` / ``val`` / ``eval``: every (subject, relation) is one edit record.
* one *locality pool* per split: facts that are never edited.  Locality
  prompts (ZsRE ``loc``, "nq question: ..."), CounterFact neighbourhood
  prompts and FEVER ``unrel_prompt`` come from the pool of the record's split,
  so a lifelong stream never overwrites the facts it is checked against and the
  hypernetwork never trains on the eval split's locality facts.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..data.records import EditRecord

SPLITS = ("train", "val", "eval")
NQ_PREFIX = "nq question: "


@dataclass(frozen=True)
class Relation:
    name: str
    templates: Tuple[str, ...]   # "{s}" marks the subject; [0] is the edit prompt
    sentence: str                # "{s}" / "{o}": the training-corpus sentence
    heldout_sentence: str        # same fact, a wording the LM never sees
    objects: Tuple[str, ...]


RELATIONS: Tuple[Relation, ...] = (
    Relation("city",
             ("Which city does {s} live in?", "In which city does {s} live?",
              "What is the home city of {s}?", "{s} lives in which city?"),
             "{s} lives in {o}.", "The home of {s} is the city of {o}.",
             ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima",
              "Oslo", "Vienna", "Dublin", "Lisbon", "Athens", "Prague", "Warsaw", "Moscow",
              "Beijing", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Seoul", "Nairobi")),
    Relation("language",
             ("What language does {s} speak?", "Which language does {s} speak?",
              "What is the native language of {s}?", "{s} speaks which language?"),
             "{s} speaks {o}.", "The mother tongue of {s} is {o}.",
             ("French", "English", "German", "Spanish", "Italian", "Japanese", "Russian",
              "Polish", "Dutch", "Greek", "Swedish", "Turkish", "Arabic", "Hindi", "Korean",
              "Portuguese", "Danish", "Finnish", "Czech", "Hungarian")),
    Relation("sport",
             ("What sport does {s} play?", "Which sport does {s} play?",
              "What is the favourite sport of {s}?", "{s} plays which sport?"),
             "{s} plays {o}.", "On weekends {s} enjoys a game of {o}.",
             ("tennis", "football", "cricket", "golf", "hockey", "rugby", "baseball",
              "basketball", "volleyball", "badminton", "handball", "polo", "lacrosse",
              "softball", "netball", "snooker", "darts", "bowling")),
    Relation("colour",
             ("What is the favourite colour of {s}?", "Which colour does {s} like best?",
              "What colour does {s} prefer?", "{s} likes which colour best?"),
             "The favourite colour of {s} is {o}.", "{s} always wears {o}.",
             ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white",
              "grey", "violet", "crimson", "teal", "indigo", "amber", "scarlet")),
    Relation("instrument",
             ("What instrument does {s} play?", "Which instrument does {s} play?",
              "What musical instrument does {s} perform on?", "{s} plays which instrument?"),
             "{s} plays the {o}.", "{s} practises the {o} every day.",
             ("piano", "violin", "guitar", "flute", "cello", "drums", "trumpet", "harp",
              "clarinet", "saxophone", "oboe", "banjo", "accordion", "trombone", "ukulele",
              "harmonica")),
    Relation("profession",
             ("What is the profession of {s}?", "What does {s} do for a living?",
              "What job does {s} have?", "{s} works as what?"),
             "{s} has worked for years as the local {o}.", "Everyone knows {s} as the town {o}.",
             ("doctor", "lawyer", "teacher", "engineer", "farmer", "pilot", "chef", "nurse",
              "architect", "dentist", "banker", "writer", "painter", "sailor", "baker",
              "plumber", "carpenter", "journalist", "pharmacist", "librarian")),
    Relation("pet",
             ("What pet does {s} have?", "Which animal does {s} keep as a pet?",
              "What kind of pet does {s} own?", "{s} owns which pet?"),
             "{s} has a pet {o}.", "The pet of {s} is a {o}.",
             ("cat", "dog", "parrot", "rabbit", "hamster", "horse", "tortoise", "goldfish",
              "ferret", "lizard", "snake", "pony", "canary", "goat", "turtle")),
    Relation("fruit",
             ("What is the favourite fruit of {s}?", "Which fruit does {s} like most?",
              "What fruit does {s} enjoy eating?", "{s} loves which fruit?"),
             "{s} eats {o} every morning.", "The fruit that {s} likes most is the {o}.",
             ("apple", "banana", "mango", "cherry", "grape", "lemon", "peach", "pear", "plum",
              "melon", "kiwi", "apricot", "fig", "papaya", "lime", "coconut")),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "tr", "th", "sh")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "k")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_train_subjects: int = 250       # x 8 relations = 2000 training records
    n_val_subjects: int = 25          # 200 validation records
    n_eval_subjects: int = 250        # 2000 held-out edit records
    n_locality_subjects: int = 24     # per split; >= the largest object vocabulary
    n_neighborhood: int = 2           # CounterFact neighbourhood prompts per record

    @classmethod
    def quick(cls) -> "WorldConfig":
        """The world of ``rledit demo --quick``: 400 train / 200 val / 400 eval records.

        A fifth of the subjects to edit and train on, so its tiny LM pre-trains in about a
        quarter of the time (73 s vs ~4 min on one thread) and still knows its facts (98%).
        """
        return cls(n_train_subjects=50, n_eval_subjects=50)


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def question(self, template: int = 0) -> str:
        return RELATION_BY_NAME[self.relation].templates[template].format(s=self.subject)

    def nq_question(self) -> str:
        """The ZsRE locality form: "nq question: " + template 0, first letter lower-cased."""
        q = self.question(0)
        return NQ_PREFIX + q[0].lower() + q[1:]

    def sentence(self, heldout: bool = False) -> str:
        rel = RELATION_BY_NAME[self.relation]
        return (rel.heldout_sentence if heldout else rel.sentence).format(s=self.subject,
                                                                           o=self.object)


@dataclass(frozen=True)
class _Case:
    """One edit record with the world facts it was built from (for the file writers)."""
    fact: Fact
    target_new: str
    locality: Fact
    neighbors: Tuple[Tuple[Fact, int], ...]   # (pool fact, template index)
    uid: str

    def record(self) -> EditRecord:
        rel = RELATION_BY_NAME[self.fact.relation]
        return EditRecord(
            prompt=self.fact.question(0), target_new=self.target_new,
            target_true=self.fact.object, subject=self.fact.subject,
            paraphrases=[self.fact.question(t) for t in range(1, len(rel.templates))],
            locality_prompts=[self.locality.nq_question()],
            locality_answers=[self.locality.object], uid=self.uid)


@dataclass
class World:
    config: WorldConfig
    subjects: Dict[str, List[str]]            # "train"/"val"/"eval"/"<split>_locality"
    facts: Dict[str, List[Fact]]              # same keys
    cases: Dict[str, List[_Case]]             # "train"/"val"/"eval"
    _records: Dict[str, List[EditRecord]] = field(default_factory=dict, repr=False)

    def records(self, split: str) -> List[EditRecord]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._records:
            self._records[split] = [c.record() for c in self.cases[split]]
        return self._records[split]

    @property
    def train_records(self) -> List[EditRecord]:
        return self.records("train")

    @property
    def val_records(self) -> List[EditRecord]:
        return self.records("val")

    @property
    def eval_records(self) -> List[EditRecord]:
        return self.records("eval")

    def all_facts(self) -> List[Fact]:
        return [f for group in self.facts.values() for f in group]

    @property
    def corpus(self) -> List[str]:
        """Natural sentences stating every true fact (the training wording)."""
        return [f.sentence() for f in self.all_facts()]

    @property
    def fact_pairs(self) -> List[Tuple[str, str]]:
        """Every corpus sentence split before its object: ("Vardrous lives in", "Lima")."""
        return [(RELATION_BY_NAME[f.relation].sentence.split("{o}")[0].format(s=f.subject).rstrip(),
                 f.object) for f in self.all_facts()]

    @property
    def heldout_corpus(self) -> List[str]:
        """The same facts in a wording the tiny LM is never trained on (perplexity text)."""
        return [f.sentence(heldout=True) for f in self.all_facts()]

    def fact_questions(self) -> List[Tuple[Fact, str]]:
        """(fact, question) for every template of every fact, plus the nq form of the
        locality pools' facts: everything the tiny LM must answer."""
        pairs = []
        for group, facts in self.facts.items():
            for f in facts:
                n_templates = len(RELATION_BY_NAME[f.relation].templates)
                pairs.extend((f, f.question(t)) for t in range(n_templates))
                if group.endswith("_locality"):
                    pairs.append((f, f.nq_question()))
        return pairs

    def fingerprint(self) -> str:
        """Stable hash of the config and every fact, record and sentence."""
        payload = {
            "config": asdict(self.config),
            "relations": [asdict(r) for r in RELATIONS],
            "facts": {k: [asdict(f) for f in v] for k, v in sorted(self.facts.items())},
            "records": {s: [r.to_dict() for r in self.records(s)] for s in SPLITS},
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _make_names(rng: random.Random, n: int, forbidden: set) -> List[str]:
    names, seen = [], set(forbidden)
    while len(names) < n:
        syllables = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                       for _ in range(syllables)).capitalize()
        if len(name) >= 4 and name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def _vocabulary_words() -> set:
    words = set()
    for rel in RELATIONS:
        words.update(o.lower() for o in rel.objects)
        for text in rel.templates + (rel.sentence, rel.heldout_sentence):
            words.update(w.strip("?.,").lower() for w in text.split())
    return words


def build_world(config: Optional[WorldConfig] = None) -> World:
    """Build the world deterministically from ``config`` (default: ``WorldConfig()``)."""
    config = config or WorldConfig()
    max_vocab = max(len(r.objects) for r in RELATIONS)
    if config.n_locality_subjects < max_vocab:
        raise ValueError(f"WorldConfig.n_locality_subjects={config.n_locality_subjects} must be "
                         f">= {max_vocab} so every object has a neighbourhood prompt")
    for name in ("n_train_subjects", "n_val_subjects", "n_eval_subjects"):
        if getattr(config, name) < 2:
            raise ValueError(f"WorldConfig.{name} must be >= 2")
    rng = random.Random(config.seed)
    groups = {s: getattr(config, f"n_{s}_subjects") for s in SPLITS}
    groups.update({f"{s}_locality": config.n_locality_subjects for s in SPLITS})
    names = _make_names(rng, sum(groups.values()), _vocabulary_words())
    subjects, facts, start = {}, {}, 0
    for group, n in groups.items():
        subjects[group] = names[start:start + n]
        start += n
        if group.endswith("_locality"):
            # Round-robin over a shuffled vocabulary: every object occurs in the pool,
            # so every record gets neighbourhood prompts whose true answer is its own.
            facts[group] = []
            for rel in RELATIONS:
                order = list(rel.objects)
                rng.shuffle(order)
                for i, subject in enumerate(subjects[group]):
                    facts[group].append(Fact(subject, rel.name, order[i % len(order)]))
        else:
            facts[group] = [Fact(s, rel.name, rng.choice(rel.objects))
                            for s in subjects[group] for rel in RELATIONS]

    cases = {}
    for split in SPLITS:
        pool = facts[f"{split}_locality"]
        by_answer: Dict[Tuple[str, str], List[Fact]] = {}
        for f in pool:
            by_answer.setdefault((f.relation, f.object), []).append(f)
        cases[split] = []
        for i, fact in enumerate(facts[split]):
            rel = RELATION_BY_NAME[fact.relation]
            target_new = rng.choice([o for o in rel.objects if o != fact.object])
            locality = rng.choice([f for f in pool if f.relation != fact.relation])
            # Neighbourhood: other (never edited) subjects whose true answer is this
            # record's true answer, asked with the edit template or its paraphrases.
            same = by_answer[(fact.relation, fact.object)]
            options = [(f, t) for f in same for t in range(len(rel.templates))]
            neighbors = tuple(rng.sample(options, min(config.n_neighborhood, len(options))))
            cases[split].append(_Case(fact, target_new, locality, neighbors,
                                      uid=f"{split}-{i:05d}"))
        rng.shuffle(cases[split])   # streams should not edit one subject 8 times in a row
    return World(config=config, subjects=subjects, facts=facts, cases=cases)


# ---------------------------------------------------------------------------- files

def _zsre(case: _Case) -> dict:
    r = case.record()
    return {"subject": r.subject, "src": r.prompt, "rephrase": r.paraphrases[0],
            "alt": r.target_new, "ans": r.target_new, "answers": [r.target_true],
            "loc": r.locality_prompts[0], "loc_ans": r.locality_answers[0]}


def _counterfact(case: _Case, case_id: int) -> dict:
    r = case.record()
    template = RELATION_BY_NAME[case.fact.relation].templates[0]
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": template.replace("{s}", "{}"),
                                  "relation_id": case.fact.relation, "subject": r.subject,
                                  "target_new": {"str": r.target_new},
                                  "target_true": {"str": r.target_true}},
            "paraphrase_prompts": list(r.paraphrases),
            "neighborhood_prompts": [f.question(t) for f, t in case.neighbors]}


def _fever(case: _Case) -> dict:
    r = case.record()
    return {"prompt": r.prompt, "equiv_prompt": list(r.paraphrases), "alt": r.target_new,
            "unrel_prompt": case.locality.question(0), "unrel_ans": case.locality.object}


def _write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def write_world_files(world: World, out_dir: str) -> Dict[str, str]:
    """Write the world in every dataset format; returns ``{file name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    contents = {
        "zsre_train.json": [_zsre(c) for c in world.cases["train"]],
        "zsre_val.json": [_zsre(c) for c in world.cases["val"]],
        "zsre_eval.json": [_zsre(c) for c in world.cases["eval"]],
        "counterfact_eval.json": [_counterfact(c, i) for i, c in enumerate(world.cases["eval"])],
        "fever_eval.json": [_fever(c) for c in world.cases["eval"]],
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = os.path.join(out_dir, name)
        _write_json_atomic(paths[name], data)
    paths["corpus.txt"] = os.path.join(out_dir, "corpus.txt")
    tmp = f"{paths['corpus.txt']}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(world.corpus) + "\n")
    os.replace(tmp, paths["corpus.txt"])
    return paths
