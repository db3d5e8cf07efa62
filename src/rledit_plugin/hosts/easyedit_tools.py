"""EasyEdit host, part 2: building a ``BaseEditor`` for RLEdit, local model directories, training.

``BaseEditor`` string-matches ``model_name`` everywhere: to pick model/tokenizer
classes when it is a path (``'gpt'`` -> the slow ``GPT2Tokenizer``, ``'llama'`` ->
``LlamaTokenizer`` in the release / ``AutoTokenizer`` in HEAD, ...), and in
evaluation (``model_name.lower()``), which breaks when it is a ``(model, tokenizer)``
pair.  :func:`make_editor` handles both forms.

Training: EasyEdit's ``EditTrainer`` runs one batch per step (MEND style); RLEdit
trains along whole edit sequences on the model it keeps editing, so
:class:`RLEditTrainer` takes ``EditTrainer``'s arguments (config, train_set,
val_set; EasyEdit datasets welcome) and runs our sequence-level trainer.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Optional

from .easyedit import ALG_NAME, _as_hparams, cpu_shim_active, host_flavour, import_easyeditor

# Words BaseEditor looks for in a model path, in its order, and the model types
# each may load.  (T5, ChatGLM, InternLM, Baichuan, Qwen are not RLEdit targets.)
_PATH_WORDS = (("gpt-3.5", ()), ("gpt", ("gpt2", "gptj", "gpt_neo", "gpt_neox")),
               ("llama", ("llama",)), ("mistral", ("mistral",)))
_PROBES = ("The capital of France is Paris.", "nq question: who wrote it? Someone",
           " leading space and  double  spaces", "Numbers 1234 and symbols -> {x}!")


def family_name(model) -> str:
    """A string naming ``model``'s family, for ``BaseEditor.model_name`` (e.g. ``in-memory-gpt2``)."""
    return f"in-memory-{getattr(getattr(model, 'config', None), 'model_type', 'model')}"


def _drop_token_type_ids(model, tok) -> None:
    """EasyEdit calls ``model(**tok(...))``: token_type_ids from a generic fast tokenizer
    would be added as embeddings by GPT-2 (and rejected by Llama).  Causal LMs without a
    token-type vocabulary never want them."""
    if "token_type_ids" in getattr(tok, "model_input_names", ()) and \
            not getattr(getattr(model, "config", None), "type_vocab_size", None):
        warnings.warn("the tokenizer returns token_type_ids, which EasyEdit would pass to the "
                      "model; dropping them from tok.model_input_names")
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]


def _require_device_support(hparams) -> None:
    import torch
    if host_flavour() == "release" and not torch.cuda.is_available() and not cpu_shim_active():
        raise RuntimeError("the PyPI easyeditor release hard-codes cuda:{device}; on this machine "
                           "(no CUDA) enable rledit_plugin.hosts.easyedit.enable_cpu_shim() first "
                           "(or use `with cpu_shim():`)")


def _check_requests(prompts, target_new) -> None:
    """Every (prompt, target) pair valid before BaseEditor's loop applies the first one: an
    error names the pair's index in the caller's lists (EasyEdit edits them one chunk after
    another, so a bad pair found there would leave the earlier ones written)."""
    from ..data.records import EditRecord, RecordError
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    targets = [target_new] if isinstance(target_new, str) else list(target_new)
    if len(prompts) != len(targets):
        raise RecordError(f"{len(prompts)} prompts but {len(targets)} targets", field="target_new")
    for i, (p, t) in enumerate(zip(prompts, targets)):
        EditRecord(p, t).validate(file="<prompts/target_new>", index=i)


def _validate_before_editing(editor):
    """``editor.edit`` / ``editor.batch_edit`` check every request before anything is edited."""
    for name in ("edit", "batch_edit"):
        original = getattr(editor, name, None)
        if original is None:
            continue

        def checked(*args, _original=original, **kwargs):
            prompts = kwargs["prompts"] if "prompts" in kwargs else (args[0] if args else None)
            targets = kwargs["target_new"] if "target_new" in kwargs else (args[1] if len(args) > 1 else None)
            if prompts is not None and targets is not None:
                _check_requests(prompts, targets)
            return _original(*args, **kwargs)
        setattr(editor, name, checked)
    return editor


def make_editor(hparams, model=None, tok=None, *, model_dir: Optional[str] = None):
    """An EasyEdit ``BaseEditor`` running RLEdit.

    ``hparams``: RLEditHyperParams or a YAML path.  Either ``model`` and ``tok``
    (then ``editor.model_name`` and ``hparams.model_name`` become
    :func:`family_name` after construction, so EasyEdit's evaluation can call
    ``.lower()`` on them), or a local model directory (``model_dir``, else
    ``hparams.model_name``) checked and completed by :func:`prepare_model_dir`;
    ``embedded-tiny-gpt2`` / ``embedded-tiny-llama`` load the offline tiny LM.
    A tokenizer that returns ``token_type_ids`` to a causal LM loses them (warning).
    On the PyPI release without CUDA the CPU shim must be on.  Its ``edit`` and ``batch_edit``
    check every prompt and target before the first is edited.
    """
    from ..models import EMBEDDED_PREFIX, load_model_and_tokenizer

    easyeditor = import_easyeditor()
    hparams = _as_hparams(hparams)
    if hparams.alg_name != ALG_NAME:
        hparams.alg_name = ALG_NAME       # ALG_DICT is keyed by the exact spelling
    _require_device_support(hparams)
    if model is not None:
        if tok is None:
            raise ValueError("make_editor: pass the tokenizer together with the model")
        _drop_token_type_ids(model, tok)
        hparams.model_name = (model, tok)
        editor = easyeditor.BaseEditor.from_hparams(hparams)
        editor.model_name = hparams.model_name = family_name(model)
        return _validate_before_editing(editor)
    path = model_dir if model_dir is not None else hparams.model_name
    if not isinstance(path, str) or not path:
        raise ValueError("make_editor: give model and tok, or a local model directory")
    if path.startswith(EMBEDDED_PREFIX):      # the offline default: rledit loads it
        model, tok = load_model_and_tokenizer(path, hparams.device, hparams.torch_dtype)
        return make_editor(hparams, model, tok)
    hparams.model_name = prepare_model_dir(path)
    editor = easyeditor.BaseEditor.from_hparams(hparams)
    _drop_token_type_ids(editor.model, editor.tok)
    return _validate_before_editing(editor)


def _path_word(path: str) -> Optional[str]:
    lowered = path.lower()
    return next((word for word, _ in _PATH_WORDS if word in lowered), None)


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_gpt2_vocab(path: str) -> None:
    """vocab.json + merges.txt from a byte-level BPE tokenizer.json (what GPT2Tokenizer reads)."""
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as fh:
        model = json.load(fh)["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer.json holds a {model.get('type')} model; EasyEdit "
                         "loads 'gpt' paths with GPT2Tokenizer, which needs a byte-level BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write_atomic(os.path.join(path, "vocab.json"), json.dumps(model["vocab"], ensure_ascii=False))
    _write_atomic(os.path.join(path, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")


def prepare_model_dir(path: str) -> str:
    """Check (and complete) a local model directory for ``BaseEditor``; returns its absolute path.

    The path must contain the word EasyEdit dispatches on (``gpt``, ``llama``,
    ``mistral``), matching the model type in ``config.json``.  For ``gpt`` paths
    EasyEdit loads the slow ``GPT2Tokenizer``: ``vocab.json``/``merges.txt`` are
    written from ``tokenizer.json`` when missing, and the directory is refused
    unless that tokenizer splits text exactly like the fast one.  The release
    loads ``llama`` paths with the sentencepiece ``LlamaTokenizer``: without a
    ``tokenizer.model`` pass ``(model, tok)`` to :func:`make_editor` instead.
    """
    path = os.path.abspath(os.path.expanduser(path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: not a local model directory (no config.json)")
    with open(config_file, encoding="utf-8") as fh:
        model_type = json.load(fh).get("model_type", "?")
    word = _path_word(path)
    allowed = dict(_PATH_WORDS).get(word, ())
    if model_type not in allowed:
        hint = next((w for w, types in _PATH_WORDS if model_type in types), None)
        raise ValueError(f"{path}: EasyEdit chooses model classes from words in the path and "
                         f"finds {word!r}, but the model is '{model_type}'; use a directory whose "
                         + (f"name contains '{hint}'" if hint else "family EasyEdit knows")
                         + " (a symlink will do)")
    if word == "gpt":
        from transformers import AutoTokenizer, GPT2Tokenizer
        if not all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
            _write_gpt2_vocab(path)
        fast, slow = AutoTokenizer.from_pretrained(path), GPT2Tokenizer.from_pretrained(path)
        for text in _PROBES:
            if fast(text)["input_ids"] != slow(text)["input_ids"]:
                raise ValueError(f"{path}: GPT2Tokenizer (what EasyEdit loads) splits {text!r} "
                                 "differently from the directory's tokenizer.json; pass "
                                 "(model, tok) to make_editor instead")
    elif word == "llama" and host_flavour() == "release":
        if not os.path.isfile(os.path.join(path, "tokenizer.model")):
            raise ValueError(f"{path}: the easyeditor release loads 'llama' directories with the "
                             "sentencepiece LlamaTokenizer, which needs tokenizer.model; pass "
                             "(model, tok) to make_editor instead")
    return path


# --------------------------------------------------------------------------- training

def _records(data, what: str):
    """EditRecords from EasyEdit datasets (request dicts), records, or a data file."""
    from ..data.formats import load_records, records_from_requests
    from ..data.records import EditRecord
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_records(data)
    items = [data[i] for i in range(len(data))]
    if all(isinstance(item, EditRecord) for item in items):
        return items
    return records_from_requests(items, source=f"<{what}: {type(data).__name__}>")


class RLEditTrainer:
    """``EditTrainer``'s interface around RLEdit's sequence-level trainer.

    ``RLEditTrainer(config=RLEditTrainingHyperParams.from_hparams(yaml),
    train_set=ZsreDataset(...), val_set=ZsreDataset(...)).run()`` trains on the
    model at ``config.model_name`` (or ``model``/``tok`` when given) and writes the
    archive to ``config.results_dir``; set ``archive:`` in the editing YAML to it.
    """

    def __init__(self, config, train_set, val_set=None, model=None, tok=None,
                 progress: bool = True):
        from ..hparams import RLEditTrainingHyperParams
        if isinstance(config, (str, os.PathLike)):
            config = RLEditTrainingHyperParams.from_hparams(config)
        if not isinstance(config, RLEditTrainingHyperParams):
            raise TypeError(f"RLEditTrainer needs RLEditTrainingHyperParams, got {type(config).__name__}")
        self.config, self.progress = config, progress
        self.train_records = _records(train_set, "train_set")
        self.val_records = _records(val_set, "val_set")
        if model is None:
            from ..models import load_model_and_tokenizer
            model, tok = load_model_and_tokenizer(config.model_name, config.device, config.torch_dtype)
        self.model, self.tok = model, tok
        self.hypernet, self.history = None, []

    def run(self):
        from ..core.trainer import train_hypernetwork
        self.hypernet, self.history = train_hypernetwork(
            self.model, self.tok, self.config, self.train_records, self.val_records,
            progress=self.progress)
        return self.hypernet, self.history
