"""Hypernetwork archives: ``hypernet.safetensors`` + ``rledit.json``.

Tensors (weights, per-module lr/lam, normaliser buffers) go to safetensors —
nothing is unpickled on load.  The JSON records the editing hparams, the
edited module names and shapes and a fingerprint of the base model, so that
loading into a different model or shape fails with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence

from safetensors.torch import load_file, save_file

from ..hparams import RLEditHyperParams
from ..models import get_module, io_dims, model_family
from .hypernet import HyperNetwork

FORMAT_VERSION = 1
TENSORS, META = "hypernet.safetensors", "rledit.json"


class ArchiveError(ValueError):
    pass


def base_fingerprint(model, module_names: Sequence[str]) -> Dict[str, object]:
    """What must match between training and editing: family, widths and edited shapes."""
    cfg = model.config
    return {
        "model_type": model_family(model),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
        "hidden_size": int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)) or 0),
        "modules": {n: list(io_dims(get_module(model, n))) for n in module_names},
    }


def weights_digest(model, module_names: Sequence[str]) -> str:
    """Hash of the edited weights (fp32): tells a different checkpoint of the same shape."""
    h = hashlib.sha256()
    for n in sorted(module_names):
        w = get_module(model, n).weight.detach().float().cpu().contiguous()
        h.update(n.encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def save_archive(path: str, net: HyperNetwork, model, hparams: RLEditHyperParams,
                 history: Optional[List[dict]] = None) -> str:
    """Write the archive directory atomically (tmp dir + rename); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    names = list(net.module_names)
    meta = {
        "format_version": FORMAT_VERSION,
        "alg_name": "RLEdit",
        "hparams": {k: v for k, v in hparams.to_dict().items() if k != "archive"},
        "modules": {n: list(net.shapes[n]) for n in names},
        "base_model": base_fingerprint(model, names),
        "base_weights_sha256": weights_digest(model, names),
        "history": history or [],
    }
    tmp = tempfile.mkdtemp(prefix=".rledit-", dir=os.path.dirname(os.path.abspath(path)) or ".")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(tmp, TENSORS))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    if os.path.isdir(path):
        for name in (TENSORS, META):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        for name in (TENSORS, META):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
    else:
        os.replace(tmp, path)
    return path


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise ArchiveError(f"{path}: not an RLEdit archive (no {META})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"{meta_path}: format_version {meta.get('format_version')} "
                           f"is not supported (expected {FORMAT_VERSION})")
    return meta


def load_archive(path: str, model, expect_modules: Optional[Sequence[str]] = None,
                 strict_weights: bool = False, edit_steps: Optional[int] = None,
                 hparams: Optional[RLEditHyperParams] = None) -> HyperNetwork:
    """Rebuild the hypernetwork for ``model``; refuses a model of another family or shape.

    A different checkpoint of the same architecture is allowed (the usual case:
    train on one copy, edit another) but logged; ``strict_weights=True`` refuses it.
    ``edit_steps``: the rounds the caller will edit with; a hypernetwork trained for another
    number of rounds (archives before ``edit_steps`` existed: 1) works but is off-policy, so
    it is a warning.  ``hparams``: the caller's; see :func:`check_hparams`.
    """
    meta = read_meta(path)
    names = list(meta["modules"])
    if expect_modules is not None and sorted(expect_modules) != sorted(names):
        raise ArchiveError(f"{path}: archive edits {sorted(names)} but the hparams ask for "
                           f"{sorted(expect_modules)}")
    try:
        here = base_fingerprint(model, names)
    except (KeyError, TypeError) as e:
        raise ArchiveError(f"{path}: archive does not fit this model: {e}") from None
    there = meta["base_model"]
    for key in ("model_type", "hidden_size", "modules"):
        if here[key] != there[key]:
            raise ArchiveError(f"{path}: archive was trained for {key}={there[key]!r}, "
                               f"this model has {key}={here[key]!r}")
    if weights_digest(model, names) != meta.get("base_weights_sha256"):
        msg = f"{path}: the edited weights differ from the model the archive was trained on"
        if strict_weights:
            raise ArchiveError(msg)
        import logging
        logging.getLogger(__name__).info(msg)
    hp = meta["hparams"]
    if hparams is not None:
        check_hparams(path, hp, hparams)
    trained_steps = int(hp.get("edit_steps", 1))
    if edit_steps is not None and int(edit_steps) != trained_steps:
        import warnings
        warnings.warn(f"{path}: hypernetwork trained with edit_steps={trained_steps}, editing with "
                      f"edit_steps={edit_steps}; retrain (rledit train) for the rounds you edit with",
                      stacklevel=2)
    net = HyperNetwork({n: tuple(s) for n, s in meta["modules"].items()}, rank=hp["rank"],
                       n_blocks=hp["n_blocks"], init_lr=hp["init_lr"], init_lam=hp["init_lam"],
                       eps=hp["norm_eps"])
    if hp.get("key_whitening"):
        net.enable_whitening()          # buffers exist before the archive's values load into them
    state = load_file(os.path.join(path, TENSORS))
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:     # a tensor's shape disagrees with the hparams in the JSON
        raise ArchiveError(f"{path}: tensors do not match the hypernetwork its {META} "
                           f"describes: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ArchiveError(f"{path}: tensors do not match the hypernetwork "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net


# keys the archive fixes: a different value in the caller's hparams would be silently ignored
_FIXED_BY_ARCHIVE = ("rank", "n_blocks", "norm_eps")


def check_hparams(path: str, stored: dict, hparams: RLEditHyperParams) -> None:
    """Refuse hparams that ask for a hypernetwork other than the archive's (the archive would
    win without a word); warn where the archive's key statistics replace the hparams' damping."""
    for key in _FIXED_BY_ARCHIVE:
        if key in stored and stored[key] != getattr(hparams, key):
            raise ArchiveError(f"{path}: archive was trained with {key}={stored[key]!r}, the hparams "
                               f"say {key}={getattr(hparams, key)!r}: set it to the archive's value "
                               f"or retrain (rledit train)")
    if stored.get("key_whitening") and not hparams.key_whitening:
        raise ArchiveError(f"{path}: archive was trained with key_whitening=true, the hparams say "
                           f"false: set key_whitening: true or retrain without it")
    if stored.get("key_whitening") and stored.get("whitening_damping") != hparams.whitening_damping:
        import warnings
        warnings.warn(f"{path}: the archive's key statistics (whitening_damping="
                      f"{stored.get('whitening_damping')!r}) are used, not whitening_damping="
                      f"{hparams.whitening_damping!r}", stacklevel=3)


def archive_hparams(path: str) -> RLEditHyperParams:
    """The editing hparams stored in an archive (with ``archive`` pointing at it)."""
    hp = dict(read_meta(path)["hparams"])
    hp["archive"] = path
    return RLEditHyperParams.from_dict(hp, source=os.path.join(path, META))
