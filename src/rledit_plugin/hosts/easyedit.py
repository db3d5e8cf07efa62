"""EasyEdit host: ``alg_name: RLEdit`` in EasyEdit's ``BaseEditor``, without editing EasyEdit.

This module (with :mod:`.easyedit_compat`: multimodal stand-ins and the CPU shim)
is the only part of rledit_plugin that knows EasyEdit.  Importing it is cheap: it
imports neither torch nor easyeditor.  :func:`install_import_hook` (run when
``rledit_plugin`` is imported) makes every later ``import easyeditor`` -- the
PyPI release or a GitHub checkout on ``sys.path`` -- install the stand-ins first
and register RLEdit right after: ``ALG_DICT["RLEdit"]``,
``ALG_TRAIN_DICT["RLEDIT"]`` and ``BatchEditor.is_batchable_method``.
Registration is idempotent and feature-detected.

``weights_copy`` (the tensors of every changed parameter before the call):

- GitHub HEAD writes ``weights_copy`` back itself unless ``sequential_edit=True``,
  so the copies are returned whenever ``return_orig_weights`` asks for them;
- the PyPI release always writes ``weights_copy`` back and leaves the choice to
  ``keep_original_weight`` (its ROME/MEMIT/FT return ``{}`` unless it is True);
  RLEdit does the same, so there edits accumulate unless it is True.

One :class:`~rledit_plugin.core.editor.RLEditor` lives with each model object (in
the model's ``__dict__``, so it dies with the model and ``deepcopy`` copies it),
so successive calls accumulate and the lifelong normaliser keeps its state.  When
EasyEdit writes ``weights_copy`` back, the next call notices (parameter version
counters, then content fingerprints) and rolls that editor back too, so its
journal always describes the weights.
"""
from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

from .easyedit_compat import (cpu_shim, cpu_shim_active, disable_cpu_shim,  # noqa: F401
                              enable_cpu_shim, install_standins)

ALG_NAME = "RLEdit"          # BaseEditor looks up ALG_DICT[hparams.alg_name]
TRAIN_ALG_NAME = "RLEDIT"    # BaseTrainer looks up ALG_TRAIN_DICT[config.alg.upper()]
_STATE_ATTR = "_rledit_easyedit_state"


# --------------------------------------------------------------------------- import

class _RegisteringLoader(importlib.abc.Loader):
    """Wraps easyeditor's loader: stand-ins before its ``__init__`` runs, registration after."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        install_standins()
        self._inner.exec_module(module)
        register(module)

    def __getattr__(self, name):     # resource readers etc. come from the real loader
        return getattr(self._inner, name)


class _EasyEditFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "easyeditor":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Register RLEdit with easyeditor now if it is imported, else as soon as it is."""
    if not any(isinstance(f, _EasyEditFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _EasyEditFinder())
    module = sys.modules.get("easyeditor")
    if module is not None and hasattr(module, "BaseEditor"):   # fully imported already
        register(module)


def import_easyeditor():
    """``import easyeditor`` with the stand-ins in place and RLEdit registered."""
    install_import_hook()
    install_standins()
    module = importlib.import_module("easyeditor")
    register(module)
    return module


def host_flavour() -> Optional[str]:
    """``"head"`` (GitHub layout), ``"release"`` (PyPI 0.0.1.dev0) or None (not imported)."""
    if sys.modules.get("easyeditor") is None:
        return None
    utils = sys.modules.get("easyeditor.editors.utils")
    return "head" if utils is not None and hasattr(utils, "restore_after_edit") else "release"


# --------------------------------------------------------------------------- registration

TRAIN_MESSAGE = (
    "RLEdit trains its hypernetwork along whole sequences of edits on the model it keeps "
    "editing; EasyEdit's EditTrainer optimises one batch at a time and cannot express that. "
    "Use rledit_plugin.hosts.easyedit.RLEditTrainer(config=hparams, train_set=..., "
    "val_set=...).run() (EditTrainer's arguments; YAML like hparams/TRAINING/RLEdit/*.yaml) "
    "or `rledit train`.")
_editable_classes: Dict[int, type] = {}


def _editable_model_class() -> type:
    """``ALG_TRAIN_DICT["RLEDIT"]``: an EditableModel that says where RLEdit training lives."""
    try:
        base = importlib.import_module("easyeditor.trainer.algs.editable_model").EditableModel
    except (ImportError, AttributeError):
        import torch
        base = torch.nn.Module
    if id(base) not in _editable_classes:
        def __init__(self, model, config, model_constructor):
            raise NotImplementedError(TRAIN_MESSAGE)
        _editable_classes[id(base)] = type("RLEditEditableModel", (base,),
                                           {"__init__": __init__, "__doc__": TRAIN_MESSAGE})
    return _editable_classes[id(base)]


def register(easyeditor=None) -> bool:
    """Make RLEdit selectable in the imported easyeditor (idempotent); False if none is."""
    alg_dict = sys.modules.get("easyeditor.util.alg_dict")
    if alg_dict is None or not hasattr(alg_dict, "ALG_DICT"):
        return False                       # not imported (or still initialising)
    alg_dict.ALG_DICT[ALG_NAME] = apply_rledit_to_model      # the editor holds this same dict
    train_dict = sys.modules.get("easyeditor.util.alg_train_dict")
    if hasattr(train_dict, "ALG_TRAIN_DICT"):
        train_dict.ALG_TRAIN_DICT[TRAIN_ALG_NAME] = _editable_model_class()
    batch_editor = getattr(sys.modules.get("easyeditor.editors.batch_editor"), "BatchEditor", None)
    if batch_editor is not None and not getattr(batch_editor.is_batchable_method, "_rledit", False):
        def is_batchable_method(alg_name: str, _original=batch_editor.is_batchable_method) -> bool:
            return alg_name == ALG_NAME or _original(alg_name)
        is_batchable_method._rledit = True
        batch_editor.is_batchable_method = staticmethod(is_batchable_method)
    # HEAD picks the restore after a non-sequential edit from module-level sets;
    # RLEdit takes the default path (write weights_copy back).
    utils = sys.modules.get("easyeditor.editors.utils")
    for set_name in ("CALLABLE_RESTORE_ALGS", "PEFT_RESTORE_ALGS", "KEEP_EDITED_MODEL_ALGS"):
        algs = getattr(utils, set_name, None)
        if isinstance(algs, set):
            algs.discard(ALG_NAME)
    return True


def is_registered() -> bool:
    alg_dict = sys.modules.get("easyeditor.util.alg_dict")
    return getattr(alg_dict, "ALG_DICT", {}).get(ALG_NAME) is apply_rledit_to_model


# --------------------------------------------------------------------------- one editor per model

# Fields that shape the hypernetwork, the edited modules or the edit memory: a change needs a
# new editor.
_STRUCTURAL = ("archive", "inner_params", "rank", "n_blocks", "init_lr", "init_lam", "norm_eps",
               "seed", "accumulate", "torch_dtype", "edit_memory")


class _HostState:
    """The model's RLEditor plus what it left behind, to notice writes from outside."""

    def __init__(self, editor):
        self.editor = editor
        self.marks: Dict[str, tuple] = {}
        self.before: Optional[Dict[str, Any]] = None   # the weights_copy handed out last
        self.after_edit(None)

    def params(self):
        return {f"{n}.weight": m.weight for n, m in self.editor.modules.items()}

    @staticmethod
    def _fingerprint(p) -> tuple:
        import torch
        with torch.no_grad():
            return (float(p.sum(dtype=torch.float64)),
                    float(torch.linalg.vector_norm(p, dtype=torch.float64)))

    def after_edit(self, before: Optional[Dict[str, Any]]) -> None:
        # (storage, version counter, content fingerprint) of every edited weight
        self.marks = {n: (p.data_ptr(), p._version, self._fingerprint(p))
                      for n, p in self.params().items()}
        self.before = before

    def _unwritten(self) -> bool:
        """Cheap check: same storage, same version counter -- nobody wrote to them."""
        return all((p.data_ptr(), p._version) == self.marks[n][:2] for n, p in self.params().items())

    def _same_content(self) -> bool:
        return all(self._fingerprint(p) == self.marks[n][2] for n, p in self.params().items())

    def _equal(self, reference: Dict[str, Any]) -> bool:
        import torch
        return all(torch.equal(p.detach(), reference[n].to(p.device)) for n, p in self.params().items())

    def sync(self) -> str:
        """Bring the editor in line with weights written since its last edit."""
        if self._unwritten():
            outcome = "in-sync"
        elif self.before is not None and self._equal(self.before):
            self.editor.rollback(1)           # EasyEdit wrote weights_copy back
            outcome = "rolled-back"
        elif self._same_content():            # moved, copied, or rewritten with the same values
            outcome = "in-sync"
        elif self._equal(self.editor.original_weights()):
            self.editor.restore()
            outcome = "restored"
        else:
            from ..core.editor import RLEditor
            warnings.warn("the edited weights were changed outside RLEdit; its edit journal now "
                          "starts from the current weights (the normaliser state is kept)")
            ed = self.editor
            self.editor = RLEditor(ed.model, ed.tok, ed.hparams, hypernet=ed.hypernet)
            outcome = "rebased"
        self.after_edit(self.before if outcome == "in-sync" else None)
        return outcome


def _structure(hparams) -> tuple:
    return tuple(repr(getattr(hparams, key, None)) for key in _STRUCTURAL)


def editor_for(model, tok, hparams):
    """The RLEditor that lives with ``model`` (created on first use, synced on every use)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None and _structure(state.editor.hparams) != _structure(hparams):
        changed = [k for k, a, b in zip(_STRUCTURAL, _structure(state.editor.hparams),
                                        _structure(hparams)) if a != b]
        warnings.warn(f"RLEdit hparams changed ({', '.join(changed)}): a new editor starts from "
                      "the current weights; earlier edits stay in them")
        state = None
    if state is None:
        from ..core.editor import RLEditor
        state = _HostState(RLEditor(model, tok, hparams))
        model.__dict__[_STATE_ATTR] = state   # not a submodule: bypass nn.Module.__setattr__
    else:
        state.sync()
        state.editor.hparams, state.editor.tok = hparams, tok
    return state.editor


def get_editor(model):
    """The RLEditor EasyEdit has been driving for ``model`` (synced), or None."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return None
    state.sync()
    return state.editor


def forget_editor(model, restore: bool = False) -> None:
    """Drop ``model``'s RLEditor (after restoring the pristine weights if ``restore``)."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None and restore:
        state.editor.restore()


# --------------------------------------------------------------------------- apply

def _as_hparams(hparams):
    from ..hparams import RLEditHyperParams
    if isinstance(hparams, RLEditHyperParams):
        return hparams
    if isinstance(hparams, dict):
        return RLEditHyperParams.from_dict(hparams)
    if isinstance(hparams, (str, os.PathLike)):
        return RLEditHyperParams.from_hparams(hparams)
    raise TypeError(f"RLEdit needs RLEditHyperParams, got {type(hparams).__name__}")


def apply_rledit_to_model(model, tok, requests, hparams, copy: bool = False,
                          return_orig_weights: bool = False, keep_original_weight: bool = False,
                          **kwargs) -> Tuple[Any, Dict[str, Any]]:
    """EasyEdit's apply contract for RLEdit: edit ``model`` in place with ``requests``.

    ``requests``: EasyEdit request dicts (one or a list), edited as one batch.
    Returns ``(model, weights_copy)``; ``weights_copy`` maps every changed
    parameter's name to its tensor before this call (the module docstring says
    when it is empty).  ``copy=True`` edits a deep copy, whose editor is a copy of
    this model's.  Other keyword arguments EasyEdit passes (``train_ds``) are ignored.
    """
    import copy as copy_module

    from ..data.formats import records_from_requests

    hparams = _as_hparams(hparams)
    records = records_from_requests(requests)
    if copy:
        model = copy_module.deepcopy(model)
    editor = editor_for(model, tok, hparams)
    weights_copy: Dict[str, Any] = {}
    if return_orig_weights and (keep_original_weight or host_flavour() != "release"):
        weights_copy = {n: p.detach().clone() for n, p in model.__dict__[_STATE_ATTR].params().items()}
    editor.edit(records)
    model.__dict__[_STATE_ATTR].after_edit(weights_copy or None)
    return model, weights_copy


from .easyedit_tools import RLEditTrainer, family_name, make_editor, prepare_model_dir  # noqa: E402,F401

install_import_hook()   # importing this module is what makes `import easyeditor` know RLEdit
