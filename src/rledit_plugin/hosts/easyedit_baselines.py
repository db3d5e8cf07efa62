"""EasyEdit baselines (MEMIT, MEND, FT, ROME, LoRA) behind the harness's editor protocol.

Used by :mod:`rledit_plugin.compare`; builds on :mod:`.easyedit` (import shim,
CPU shim).  Everything here runs offline:

- **MEMIT / ROME statistics** are computed from local text and written where
  EasyEdit's ``layer_stats`` looks (:mod:`.easyedit_memit_stats`); while a
  baseline edits, ``layer_stats`` cannot download, so a missing file is an
  error and never a hub download.
- **MEND** is trained with EasyEdit's own ``EditTrainer`` on local ZsRE-format
  files (:mod:`.easyedit_mend`); its archives pickle the model config, so they
  are loaded with that one class allow-listed for torch's ``weights_only`` loader.
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
from .easyedit_compat import patched
from .easyedit_memit_stats import clear_stat_caches, model_label, offline_stats
from .easyedit_memit_stats import write_stats  # noqa: F401  (re-exported: its old home)

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


def device_for_host(device):
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


def plain_inputs(tok) -> None:
    """Only ``input_ids`` and ``attention_mask`` from ``tok(...)``, like GPT-2's own tokenizer.

    EasyEdit calls ``model(**tok(text))``; a generic ``PreTrainedTokenizerFast``
    also returns ``token_type_ids``, which GPT-2 embeds (adding the embedding
    of token 0 everywhere) and Llama refuses.
    """
    names = list(getattr(tok, "model_input_names", []) or [])
    if "token_type_ids" in names:
        tok.model_input_names = [n for n in names if n != "token_type_ids"]


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


# --------------------------------------------------------------------------- MEND archives
# (training them: .easyedit_mend)

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
    with patched(module, **({"AdaLoraConfig": config} if needed else {})):
        yield


# --------------------------------------------------------------------------- MEMIT at the last token

_MEMIT_MODULES = ("easyeditor.models.memit.compute_z", "easyeditor.models.memit.compute_ks",
                  "easyeditor.models.memit.memit_main")


def last_token_index(tok, text: str) -> int:
    """Position of ``text``'s last token in a right-padded batch (its length - 1)."""
    return len(tok(text)["input_ids"]) - 1


@contextlib.contextmanager
def memit_last_token() -> Iterator[None]:
    """MEMIT with ``fact_token: last``: the release raises ("This is definitely bugged") when
    reading keys there, and looks the fact up at index -1, a pad position for the shorter
    prompts of a right-padded batch.  For the duration of the call both are answered at each
    text's own last token; every other ``fact_token`` goes to the release's functions.

    A one-layer model needs this: an MLP edit at the subject's token cannot reach the answer
    position when no layer follows it to move information there.
    """
    compute_z = importlib.import_module(_MEMIT_MODULES[0])
    repr_tools = importlib.import_module("easyeditor.models.rome.repr_tools")
    reprs_at_words = compute_z.get_module_input_output_at_words
    lookup_idx = compute_z.find_fact_lookup_idx

    def reprs(model, tok, layer, context_templates, words, module_template,
              fact_token_strategy, track=None):
        if fact_token_strategy != "last":
            return reprs_at_words(model, tok, layer, context_templates, words, module_template,
                                  fact_token_strategy, track=track)
        if tok.padding_side != "right":
            raise ValueError("MEMIT fact_token 'last' indexes a right-padded batch")
        contexts = [template.format(word) for template, word in zip(context_templates, words)]
        found = repr_tools.get_reprs_at_idxs(
            model=model, tok=tok, contexts=contexts, layer=layer, module_template=module_template,
            idxs=[[last_token_index(tok, c)] for c in contexts],
            track=track if track in ("in", "out") else "both")
        if track in ("in", "out"):
            return found
        return found[0].detach(), found[1].detach()

    def lookup(prompt, subject, tok, fact_token_strategy, verbose=True):
        if fact_token_strategy != "last":
            return lookup_idx(prompt, subject, tok, fact_token_strategy, verbose=verbose)
        return last_token_index(tok, prompt.format(subject))

    replacements = {"get_module_input_output_at_words": reprs, "find_fact_lookup_idx": lookup}
    with contextlib.ExitStack() as stack:
        for module in map(importlib.import_module, _MEMIT_MODULES):   # each holds its own import
            stack.enter_context(patched(module, **{name: fn for name, fn in replacements.items()
                                                   if hasattr(module, name)}))
        yield


@contextlib.contextmanager
def memit_bare_prompts() -> Iterator[None]:
    """MEMIT reads keys and fits values over the bare prompt and five prefixes it generates
    with the model itself (cached in a module global); ROME's equivalent is its
    ``context_template_length_params``, which MEMIT's hparams lack.  With ``fact_token: last``
    on a small model the generated prefixes are off-distribution text that changes the
    last-token key, so only the bare prompt is used (the cache is set for the call and put back).
    """
    with patched(importlib.import_module(_MEMIT_MODULES[2]), CONTEXT_TEMPLATES_CACHE=[["{}"]]):
        yield


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
        hparams.device = device_for_host(hparams.device)
        self.requests_per_call = 1 if self.alg == "ROME" else None
        if self.alg == "MEND":
            mend_main = importlib.import_module("easyeditor.models.mend.mend_main")
            self._executor = mend_main.MendRewriteExecutor()   # private: the shared one keeps its model
            self._apply = self._executor.apply_to_model
        else:
            self._apply = importlib.import_module("easyeditor.util.alg_dict").ALG_DICT[self.alg]
        if self.alg in _USES_STATS:
            clear_stat_caches()
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
        from ..data.writers import record_to_request
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
            if self.alg == "MEMIT" and self.hparams.fact_token == "last":
                stack.enter_context(memit_last_token())
                stack.enter_context(memit_bare_prompts())
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
