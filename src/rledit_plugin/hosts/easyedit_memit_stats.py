"""Offline MEMIT / ROME statistics for the EasyEdit baselines.

The second moment of each edited layer's input is computed from local text and
written where EasyEdit's ``layer_stats`` looks,
``{stats_dir}/{model_name}/{ds_name}_stats/{layer}_{dtype}_mom2_{n}.npz``
(``model_name`` = :func:`model_label`, always set here, so nothing lands outside
``stats_dir``).  While a baseline edits, :func:`offline_stats` replaces
``layer_stats``' ``load_dataset`` by a function that refuses, so a missing file
is an error and never a hub download.

A unit whose input is exactly zero on every token of the text (a dead GELU
unit: the wsd tiny LM has four in its 3,072) makes that second moment
singular, and EasyEdit's unregularised ``torch.inverse`` (ROME) and
``linalg.solve`` (MEMIT) then fail.  :func:`floor_dead_units` puts a typical
diagonal value on those rows only; their keys are zero too, so the solution on
every live unit is unchanged and the dead rows get no update (the minimum-norm
answer).  A model without dead units gets exactly EasyEdit's statistics.

Units that are *almost* never active are the other half of the same problem: a
diagonal entry of 1e-16 of the mean makes ``C^-1 k`` point along that unit, and
the edit goes where no key reads it.  ``damping > 0`` adds ``damping * tr(C)/d``
to the whole diagonal (the form RLEdit's key whitening uses); the file then
lands under ``{mom2_dataset}_damp{damping}``, so statistics of different
damping never stand in for each other.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from .easyedit import import_easyeditor
from .easyedit_compat import patched


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


def stats_path(stats_dir: str, model_name: str, ds_name: str, layer_name: str, dtype: str,
               n_samples: Optional[int]) -> Path:
    """Where EasyEdit's ``layer_stats`` looks for the second moment of ``layer_name``'s input."""
    suffix = "" if n_samples is None else f"_{n_samples}"
    return (Path(stats_dir) / model_name.replace("/", "_") / f"{ds_name}_stats"
            / f"{layer_name}_{dtype}_mom2{suffix}.npz")


# file -> number of never-active units floored when it was last written (compare reports it)
LAST_DEAD_UNITS: Dict[str, int] = {}


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


def floor_dead_units(total):
    """``(total, dead)``: ``total`` with the median positive diagonal entry on every all-zero
    row/column (units never active on the text), and the indices of those units."""
    import torch
    diag = total.diagonal()
    dead = torch.nonzero(diag == 0).flatten()
    if dead.numel() == 0 or dead.numel() == diag.numel():
        return total, dead.tolist()
    if bool(total[dead].any()):       # a zero diagonal with a non-zero row cannot be a moment
        raise ValueError("second moment has a zero diagonal entry on a non-zero row")
    total = total.clone()
    total[dead, dead] = diag[diag > 0].median()
    return total, dead.tolist()


def damp_moment(total, damping: float):
    """``total + damping * tr(total)/d * I``: the moment ``total / count`` gets ``damping``
    times its own mean diagonal."""
    if damping < 0:
        raise ValueError(f"statistics damping must be >= 0, got {damping}")
    if damping == 0:
        return total
    total = total.clone()
    total.diagonal().add_(damping * float(total.diagonal().sum()) / total.shape[0])
    return total


def damped_dataset_name(ds_name: str, damping: float) -> str:
    """The ``mom2_dataset`` under which statistics of this damping are stored."""
    suffix = f"_damp{damping:g}"
    return ds_name if not damping or ds_name.endswith(suffix) else ds_name + suffix


def write_stats(model, tok, hparams, texts: Sequence[str], overwrite: bool = False,
                damping: float = 0.0) -> List[Path]:
    """Write MEMIT/ROME's statistics for every edited layer from ``texts``; returns the files.

    ``hparams.mom2_n_samples`` texts are used (all when fewer); the file stores
    that number as ``sample_size`` because EasyEdit checks it against the YAML.
    The sums are EasyEdit's ``SecondMoment`` state, saved by its own
    ``save_cached_state`` (keys ``mom2.constructor``, ``mom2.count``,
    ``mom2.mom2``, ``sample_size``), with never-active units floored
    (:func:`floor_dead_units`; counted in :data:`LAST_DEAD_UNITS` per file) and
    ``damping`` added (:func:`damp_moment`; ``hparams.mom2_dataset`` is renamed to
    :func:`damped_dataset_name`, where EasyEdit then reads it).
    """
    import_easyeditor()
    rs = importlib.import_module("easyeditor.util.runningstats")
    if not texts:
        raise ValueError("MEMIT/ROME statistics need local text; none was given")
    name = model_label(model)
    n = hparams.mom2_n_samples
    hparams.mom2_dataset = damped_dataset_name(hparams.mom2_dataset, damping)
    written = []
    for layer in hparams.layers:
        layer_name = hparams.rewrite_module_tmp.format(layer)
        path = stats_path(hparams.stats_dir, name, hparams.mom2_dataset, layer_name,
                          hparams.mom2_dtype, n)
        if path.exists() and not overwrite:
            written.append(path)
            continue
        total, count = second_moment(model, tok, layer_name, list(texts)[:n], hparams.mom2_dtype)
        total, dead = floor_dead_units(total)
        total = damp_moment(total, damping)
        LAST_DEAD_UNITS[str(path)] = len(dead)
        stat = rs.CombinedStat(mom2=rs.SecondMoment())
        stat.mom2.mom2, stat.mom2.count = total.cpu(), count
        path.parent.mkdir(parents=True, exist_ok=True)
        rs.save_cached_state(str(path), stat, {"sample_size": n})
        written.append(path)
    clear_stat_caches()
    return written


def clear_stat_caches() -> None:
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
    with patched(module, load_dataset=_refuse_download):
        yield
