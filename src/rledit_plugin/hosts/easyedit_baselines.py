"""EasyEdit baselines (MEMIT, MEND, FT, ROME, LoRA) behind the harness's editor protocol.

Used by :mod:`rledit_plugin.compare`; builds on :mod:`.easyedit` (import shim,
CPU shim).  Everything here runs offline:

- **MEMIT / ROME statistics** are computed from local text and written where
  EasyEdit's ``layer_stats`` looks,
  ``{stats_dir}/{model_name}/{ds_name}_stats/{layer}_{dtype}_mom2_{n}.npz``
  (``model_name`` = ``model.config._name_or_path`` with ``/`` -> ``_``, always set
  here, so nothing lands outside ``stats_dir``).  While a baseline edits,
  ``layer_stats``' ``load_dataset`` is replaced by a function that refuses, so a
  missing file is an error and never a hub download.
- **MEND** is trained with EasyEdit's own ``EditTrainer`` on local ZsRE-format
  files; its archives pickle the model config, so they are loaded with that one
  class allow-listed for torch's ``weights_only`` loader.
- **Editing** goes through EasyEdit's apply functions (``apply_memit_to_model``,
  ...), called the way ``BaseEditor`` calls them, with ``keep_original_weight=
  False``, so edits accumulate.  ROME edits one request per call (its apply
  function reads ``requests[0]`` only); LoRA's adapter is merged into the
  weights after every turn, so each turn trains a fresh adapter on the current
  model and the harness scores a plain model.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .easyedit import cpu_shim, host_flavour, import_easyeditor

BASELINES = ("MEMIT", "MEND", "FT", "ROME", "LoRA")
# module holding <ALG>HyperParams, and the class name
_HPARAMS = {"MEMIT": ("easyeditor.models.memit", "MEMITHyperParams"),
            "ROME": ("easyeditor.models.rome", "ROMEHyperParams"),
            "FT": ("easyeditor.models.ft", "FTHyperParams"),
            "LoRA": ("easyeditor.models.lora", "LoRAHyperParams"),
            "MEND": ("easyeditor.models.mend", "MENDHyperParams")}
# the padding side each implementation's code assumes for a batch (FT indexes the
# last prompt token by attention_mask.sum() - 1; MEND and LoRA align labels from the right)
_PADDING_SIDE = {"MEMIT": "right", "ROME": "right", "FT": "right", "MEND": "left", "LoRA": "left"}
_USES_STATS = ("MEMIT", "ROME")


def canonical_name(alg: str) -> str:
    """``memit`` -> ``MEMIT`` (EasyEdit's spelling); unknown names are an error."""
    for name in BASELINES:
        if name.lower() == alg.lower():
            return name
    raise ValueError(f"unknown EasyEdit baseline {alg!r}; expected one of {', '.join(BASELINES)}")


def ensure_easyedit():
    """``import easyeditor`` (multimodal stand-ins in place, RLEdit registered)."""
    return import_easyeditor()


@contextlib.contextmanager
def on_this_device() -> Iterator[None]:
    """The CPU shim around EasyEdit calls when the release runs without CUDA (a no-op otherwise).

    Only around EasyEdit's own code, so other methods (and the scoring) run on
    plain torch.
    """
    import torch
    ensure_easyedit()
    if host_flavour() == "release" and not torch.cuda.is_available():
        with cpu_shim():
            yield
    else:
        yield


def _device_for_host(device):
    """EasyEdit's ``device``: an index for the release (the shim redirects it), ``cpu`` for HEAD."""
    import torch
    if torch.cuda.is_available() or host_flavour() == "release":
        return device if isinstance(device, int) else 0
    return "cpu"


def load_hparams(alg: str, path: str):
    """The EasyEdit hyper-parameter object of ``alg`` from a YAML in EasyEdit's own field names."""
    alg = canonical_name(alg)
    ensure_easyedit()
    module, cls_name = _HPARAMS[alg]
    cls = getattr(importlib.import_module(module), cls_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{alg} hparams file not found: {path}")
    try:
        return cls.from_hparams(str(path))
    except TypeError as e:     # a field this EasyEdit version does not know / lacks
        raise ValueError(f"{path}: does not fit {cls_name} of the installed EasyEdit: {e}") from None


def model_label(model) -> str:
    """The name EasyEdit derives paths from: ``config._name_or_path``, set if empty.

    EasyEdit string-matches the family (``gpt2`` / ``llama``) in it, and MEMIT's
    statistics path starts with it; an empty one would put the file at the root.
    """
    name = getattr(model.config, "_name_or_path", "") or ""
    family = getattr(model.config, "model_type", "model")
    base = os.path.basename(name.rstrip("/")) or f"in-memory-{family}"
    if family.replace("_", "") not in base.lower().replace("-", "").replace("_", ""):
        base = f"{base}-{family}"
    model.config._name_or_path = base
    return base


def plain_inputs(tok) -> None:
    """Only ``input_ids`` and ``attention_mask`` from ``tok(...)``, like GPT-2's own tokenizer.

    EasyEdit calls ``model(**tok(text))``; a generic ``PreTrainedTokenizerFast``
    also returns ``token_type_ids``, which GPT-2 embeds (adding the embedding
    of token 0 everywhere) and Llama refuses.
    """
    names = list(getattr(tok, "model_input_names", []) or [])
    if "token_type_ids" in names:
        tok.model_input_names = [n for n in names if n != "token_type_ids"]


# --------------------------------------------------------------------------- MEMIT/ROME statistics

def stats_path(stats_dir: str, model_name: str, ds_name: str, layer_name: str, dtype: str,
               n_samples: Optional[int]) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for the second moment of ``layer_name``'s input."""
    suffix = "" if n_samples is None else f"_{n_samples}"
    return (Path(stats_dir) / model_name.replace("/", "_") / f"{ds_name}_stats"
            / f"{layer_name}_{dtype}_mom2{suffix}.npz")


def second_moment(model, tok, layer_name: str, texts: Sequence[str], dtype: str = "float32",
                  max_length: Optional[int] = None, batch_size: int = 64):
    """``(sum of k k^T, token count)`` over every non-padding token's input to ``layer_name``."""
    import torch
    from ..models import get_module, model_device

    module = get_module(model, layer_name)
    max_length = max_length or getattr(model.config, "n_positions", None) or \
        getattr(model.config, "max_position_embeddings", 512)
    total, count, captured = None, 0, {}
    handle = module.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    side, tok.padding_side = tok.padding_side, "right"
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length).to(model_device(model))
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                feats = captured["x"][enc["attention_mask"].bool()].to(getattr(torch, dtype))
                total = feats.t() @ feats if total is None else total + feats.t() @ feats
                count += feats.shape[0]
    finally:
        handle.remove()
        tok.padding_side = side
    return total, count


def write_stats(model, tok, hparams, texts: Sequence[str], overwrite: bool = False) -> List[Path]:
    """Write MEMIT/ROME's statistics for every edited layer from ``texts``; returns the files.

    ``hparams.mom2_n_samples`` texts are used (all when fewer); the file stores
    that number as ``sample_size`` because EasyEdit checks it against the YAML.
    The sums are EasyEdit's ``SecondMoment`` state, saved by its own
    ``save_cached_state`` (keys ``mom2.constructor``, ``mom2.count``,
    ``mom2.mom2``, ``sample_size``).
    """
    ensure_easyedit()
    rs = importlib.import_module("easyeditor.util.runningstats")
    if not texts:
        raise ValueError("MEMIT/ROME statistics need local text; none was given")
    name = model_label(model)
    n = hparams.mom2_n_samples
    written = []
    for layer in hparams.layers:
        layer_name = hparams.rewrite_module_tmp.format(layer)
        path = stats_path(hparams.stats_dir, name, hparams.mom2_dataset, layer_name,
                          hparams.mom2_dtype, n)
        if path.exists() and not overwrite:
            written.append(path)
            continue
        total, count = second_moment(model, tok, layer_name, list(texts)[:n], hparams.mom2_dtype)
        stat = rs.CombinedStat(mom2=rs.SecondMoment())
        stat.mom2.mom2, stat.mom2.count = total.cpu(), count
        path.parent.mkdir(parents=True, exist_ok=True)
        rs.save_cached_state(str(path), stat, {"sample_size": n})
        written.append(path)
    _clear_stat_caches()
    return written


@contextlib.contextmanager
def quiet(log: Optional[str] = None) -> Iterator[None]:
    """EasyEdit's prints, progress bars and log records go to ``log`` (a file; None drops them)."""
    import logging
    sink = io.StringIO()
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sink = open(log, "a", encoding="utf-8")
    logger = logging.getLogger("easyeditor")
    handler = logging.StreamHandler(sink)
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved
        sink.close()


def _clear_stat_caches() -> None:
    """EasyEdit caches covariances per (model name, layer) and the context templates per
    process; a new model under the same name must not reuse them."""
    for module, attr in (("easyeditor.models.memit.memit_main", "COV_CACHE"),
                         ("easyeditor.models.memit.memit_main", "CONTEXT_TEMPLATES_CACHE"),
                         ("easyeditor.models.rome.compute_u", "inv_mom2_cache"),
                         ("easyeditor.models.rome.rome_main", "CONTEXT_TEMPLATES_CACHE")):
        try:
            mod = importlib.import_module(module)
        except ImportError:                 # another EasyEdit layout: nothing cached there
            continue
        value = getattr(mod, attr, None)
        if isinstance(value, dict):
            value.clear()
        elif value is not None:
            setattr(mod, attr, None)


def _refuse_download(*args, **kwargs):
    raise RuntimeError("EasyEdit asked for a hub dataset (layer_stats.load_dataset): the MEMIT/ROME "
                       "statistics file is missing; rledit writes it from local text first "
                       "(hosts.easyedit_baselines.write_stats) and never downloads")


@contextlib.contextmanager
def offline_stats() -> Iterator[None]:
    """``layer_stats`` cannot download while this is active."""
    module = importlib.import_module("easyeditor.models.rome.layer_stats")
    saved = module.load_dataset
    module.load_dataset = _refuse_download
    try:
        yield
    finally:
        module.load_dataset = saved


# --------------------------------------------------------------------------- MEND archives

@contextlib.contextmanager
def mend_archive_loading(model) -> Iterator[None]:
    """EasyEdit's MEND archives pickle ``model.config``; torch >= 2.6 loads with
    ``weights_only=True``, so allow-list exactly that config class (nothing else)."""
    import torch
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:                       # torch < 2.4 loads everything anyway
        yield
        return
    with safe([type(model.config)]):
        yield


_MEND_ARCHITECTURE = ("inner_params", "rank", "n_hidden", "hidden_dim", "init", "norm", "combine",
                      "x_only", "delta_only", "act", "mlp_class", "shared", "one_sided")


def check_mend_architecture(hparams, training_yaml: str) -> None:
    """The editing YAML must describe the network the training YAML built (else the archive
    loads into the wrong shapes)."""
    import yaml
    with open(training_yaml, encoding="utf-8") as fh:
        trained = yaml.safe_load(fh)
    differ = [k for k in _MEND_ARCHITECTURE if k in trained and trained[k] != getattr(hparams, k, None)]
    if differ:
        raise ValueError(f"MEND editing hparams differ from {training_yaml} in {', '.join(differ)}: "
                         "the archive would not fit")


def _single_fields(records) -> list:
    import dataclasses
    out = []
    for r in records:
        if not r.paraphrases or not r.locality_prompts:
            raise ValueError(f"MEND training needs a paraphrase and a locality prompt in every "
                             f"record; record {r.uid} lacks one")
        out.append(dataclasses.replace(r, paraphrases=r.paraphrases[:1],
                                       locality_prompts=r.locality_prompts[:1],
                                       locality_answers=r.locality_answers[:1]))
    return out


def train_mend(model_dir: str, training_yaml: str, train_records, val_records, work_dir: str, *,
               overrides: Optional[Dict[str, Any]] = None, log: Optional[str] = None) -> Dict[str, Any]:
    """Train MEND's hypernetwork with EasyEdit's ``EditTrainer`` on local records.

    ``model_dir``: a ``save_pretrained`` directory (the trainer loads the model
    itself); ``training_yaml``: EasyEdit's ``MENDTrainingHparams`` fields;
    ``overrides``: fields to replace (e.g. ``max_iters``).  The records are
    written as ZsRE files under ``work_dir`` and read by EasyEdit's
    ``ZsreDataset``.  Returns ``{"archive", "seconds", "results"}``, ``results``
    being the trainer's final validation (its ``results.json``).
    """
    import json

    from ..data.formats import write_zsre
    easyeditor = ensure_easyedit()
    work = Path(work_dir).resolve()      # the trainer runs with work as its cwd
    work.mkdir(parents=True, exist_ok=True)
    hp = easyeditor.MENDTrainingHparams.from_hparams(str(training_yaml))
    for key, value in (overrides or {}).items():
        if not hasattr(hp, key):
            raise ValueError(f"MEND training has no field {key!r}")
        setattr(hp, key, value)
    hp.model_name = hp.tokenizer_name = str(model_dir)
    hp.results_dir = str(work)
    hp.device = _device_for_host(hp.device)
    # The release runs round(max_iters / (len(train) / batch_size)) epochs: with fewer
    # iterations than half an epoch that is 0 and nothing trains.  Records past
    # max_iters batches are never seen anyway, so keep only those.
    train_records = list(train_records)[:max(1, hp.max_iters) * hp.batch_size]
    # EasyEdit's ZsreDataset reads one string per field (rephrase, loc): keep the first
    train_records, val_records = _single_fields(train_records), _single_fields(val_records)
    train_file, val_file = write_zsre(train_records, work / "zsre_train.json"), \
        write_zsre(val_records, work / "zsre_val.json")
    train_set = easyeditor.ZsreDataset(str(train_file), config=hp)
    val_set = easyeditor.ZsreDataset(str(val_file), config=hp)
    for ds in (train_set, val_set):       # MEND aligns labels from the right
        plain_inputs(ds.tok)
        ds.tok.padding_side = "left"
        if ds.tok.pad_token_id is None:
            ds.tok.pad_token = ds.tok.eos_token
    start = time.perf_counter()
    cwd = os.getcwd()
    try:
        os.chdir(work)                    # the trainer writes ./logs and friends
        with quiet(log), on_this_device():
            trainer = easyeditor.EditTrainer(config=hp, train_set=train_set, val_set=val_set)
            with mend_archive_loading(trainer.model.model):
                trainer.run()
    finally:
        os.chdir(cwd)
    archive = Path(trainer.save_path)
    if not archive.is_file():
        raise RuntimeError(f"MEND training wrote no archive at {archive} (the trainer saves at "
                           f"each val_interval={hp.val_interval}; max_iters={hp.max_iters})")
    results_file = work / "results.json"
    results = json.loads(results_file.read_text())["results"] if results_file.is_file() else None
    return {"archive": str(archive), "seconds": time.perf_counter() - start, "results": results,
            "max_iters": hp.max_iters}


# --------------------------------------------------------------------------- LoRA on new peft

@contextlib.contextmanager
def adalora_total_step(hparams, n_requests: int) -> Iterator[None]:
    """The release builds ``AdaLoraConfig`` without ``total_step``, which peft >= 0.14 refuses;
    supply the number of optimiser steps the release's loop takes (nothing else changes)."""
    module = importlib.import_module("easyeditor.models.lora.lora_main")
    original = module.AdaLoraConfig
    steps = hparams.num_steps * -(-n_requests // hparams.batch_size)

    def config(*args, **kwargs):
        kwargs.setdefault("total_step", max(1, steps))
        return original(*args, **kwargs)

    try:
        original(target_modules=["x"])        # does this peft insist on total_step?
        needed = False
    except ValueError:
        needed = True
    if needed:
        module.AdaLoraConfig = config
    try:
        yield
    finally:
        module.AdaLoraConfig = original


# --------------------------------------------------------------------------- the editor

def _chunks(items: Sequence[Any], size: int) -> Iterator[List[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


class EasyEditBaseline:
    """The harness's editor protocol around one EasyEdit algorithm, editing ``model`` in place.

    ``edit(records)`` converts records to EasyEdit requests and calls the apply
    function (one call per turn; one per record for ROME).  EasyEdit's console
    output goes to ``log`` (a file path) instead of stdout.
    """

    def __init__(self, alg: str, model, tok, hparams, log: Optional[str] = None):
        self.alg = canonical_name(alg)
        ensure_easyedit()
        self.model, self.hparams, self.log = model, hparams, log
        self.tok = copy.deepcopy(tok)          # EasyEdit flips padding sides and pad ids
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if self.tok.unk_token_id is None:       # GPT-2's own tokenizer has unk = eos; FT masks on it
            self.tok.unk_token = self.tok.eos_token
        plain_inputs(self.tok)
        self.tok.padding_side = _PADDING_SIDE[self.alg]
        label = model_label(model)
        hparams.model_name = label              # EasyEdit string-matches the family in it
        hparams.device = _device_for_host(hparams.device)
        self.requests_per_call = 1 if self.alg == "ROME" else None
        if self.alg == "MEND":
            mend_main = importlib.import_module("easyeditor.models.mend.mend_main")
            self._executor = mend_main.MendRewriteExecutor()   # private: the shared one keeps its model
            self._apply = self._executor.apply_to_model
        else:
            self._apply = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT[self.alg]
        if self.alg in _USES_STATS:
            _clear_stat_caches()
        self.n_calls = 0

    @property
    def edited_param_names(self) -> List[str]:
        hp = self.hparams
        if self.alg in ("MEMIT", "ROME"):
            return [f"{hp.rewrite_module_tmp.format(layer)}.weight" for layer in hp.layers]
        if self.alg == "FT":
            # FT's own selection rule: parameters whose name contains the module of a layer
            return [n for n, _ in self.model.named_parameters()
                    if any(hp.rewrite_module_tmp.format(layer) in n for layer in hp.layers)]
        if self.alg == "MEND":
            return list(hp.inner_params)
        return self._lora_targets()

    def _lora_targets(self) -> List[str]:
        hp, names = self.hparams, []
        for n, module in self.model.named_modules():
            if not any(n == t or n.endswith("." + t) for t in hp.target_modules):
                continue
            if hp.layers and not any(f".{layer}." in f".{n}." for layer in hp.layers):
                continue
            if hasattr(module, "weight"):
                names.append(f"{n}.weight")
        return names

    def _requests(self, records) -> List[Dict[str, Any]]:
        from ..data.formats import record_to_request
        out = []
        for i, record in enumerate(records):
            request = record_to_request(record)
            if self.alg in ("MEMIT", "ROME") and not (record.subject and record.subject in record.prompt):
                raise ValueError(f"{self.alg} needs each record's subject inside its prompt; record "
                                 f"{record.uid or i} has subject={record.subject!r}, "
                                 f"prompt={record.prompt!r}")
            out.append(request)
        return out

    def edit(self, records) -> Dict[str, Any]:
        requests = self._requests(records)
        size = self.requests_per_call or len(requests)
        start = time.perf_counter()
        with quiet(self.log), on_this_device(), contextlib.ExitStack() as stack:
            if self.alg in _USES_STATS:
                stack.enter_context(offline_stats())
            if self.alg == "MEND":
                stack.enter_context(mend_archive_loading(self.model))
            if self.alg == "LoRA":
                stack.enter_context(adalora_total_step(self.hparams, len(requests)))
            for chunk in _chunks(requests, size):
                edited, _ = self._apply(self.model, self.tok, chunk, self.hparams, copy=False,
                                        return_orig_weights=False, keep_original_weight=False,
                                        train_ds=None)
                if edited is not self.model:
                    self._absorb(edited)
                self.n_calls += 1
        return {"n_records": len(requests), "seconds": time.perf_counter() - start}

    def _absorb(self, edited) -> None:
        """LoRA returns a PEFT wrapper around ``self.model``: merge its adapter into the weights
        and undo what the apply function switched on for training."""
        if not hasattr(edited, "merge_and_unload"):
            raise RuntimeError(f"{self.alg} returned a new model object ({type(edited).__name__}); "
                               "the harness scores the model it was given")
        base = edited.merge_and_unload()
        if base is not self.model:
            raise RuntimeError("LoRA merge returned a different model object")
        self.model.gradient_checkpointing_disable()
        if hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()
        self.model.config.use_cache = True
        self.model.requires_grad_(False)
        self.model.eval()
