"""Accumulated RLEdit edits -> a PEFT LoRA adapter over the pristine base model.

Every edit batch ``t`` adds ``dW_t = K_t^T C_t`` (``K_t`` (N_t, d_in), ``C_t``
(N_t, d_out)) to each edited weight, and the editor's journal keeps those
factors.  Stacking them gives the whole change of a module as one low-rank
product, ``dW^T = C_all^T K_all`` (d_out x d_in), which is exactly LoRA's
``lora_B @ lora_A`` with ``lora_B = C_all^T`` (d_out, R) and ``lora_A = K_all``
(R, d_in) at scaling 1.  PEFT stores ``lora_A``/``lora_B`` in that ``nn.Linear``
layout for GPT-2's ``Conv1D`` too (``fan_in_fan_out`` only changes how PEFT
merges), so both layouts take the same factors.

A smaller rank ``r`` gives the best rank-``r`` approximation (Eckart–Young).
When ``R`` is small next to the widths it is found without the dense matrix: thin
QR of ``K_all^T`` and ``C_all^T`` and an SVD of the ``R x R`` core.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .models import is_conv1d

ADAPTER_NAME = "default"
EXPORT_META = "rledit_export.json"
EXPORT_FORMAT_VERSION = 1


class ExportError(ValueError):
    pass


# ---------------------------------------------------------------------------- factors

def _relative_tail(singular: torch.Tensor, rank: int) -> float:
    """``||dW - dW_r||_F / ||dW||_F`` from the singular values (0 for a zero matrix)."""
    total = float((singular ** 2).sum())
    if total == 0.0:
        return 0.0
    return float((singular[rank:] ** 2).sum() / total) ** 0.5


def _split_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int):
    """Balanced factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T`` of a truncated SVD."""
    root = s[:rank].sqrt()
    return vh[:rank] * root[:, None], u[:, :rank] * root[None, :]


def factorise_update(keys: Sequence[torch.Tensor], coeffs: Sequence[torch.Tensor],
                     rank: Optional[int] = None, method: str = "auto",
                     dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """LoRA factors ``(A (r, d_in), B (d_out, r), info)`` with ``B @ A ~= sum_t C_t^T K_t``.

    ``rank=None``: exact, ``r = R`` (the stacked rows), or ``min(d_in, d_out)``
    when ``R`` exceeds it (lossless: one factor is the identity).  ``rank < R``:
    the best rank-``r`` approximation; ``method`` picks ``"qr"`` (thin QR + SVD of
    the small core, never forms ``d_in x d_out``), ``"dense"`` (SVD of the dense
    delta) or ``"auto"`` (QR while ``R <= min(d_in, d_out)``).  ``info`` holds
    ``rank``, ``rows``, ``error`` (relative Frobenius error, 0 when exact) and
    ``method``.  Truncation runs in float64; factors come back as ``dtype``.
    """
    if not keys or len(keys) != len(coeffs):
        raise ExportError("no edit batches to factorise")
    if method not in ("auto", "qr", "dense"):
        raise ExportError(f"method must be auto, qr or dense, got {method!r}")
    if rank is not None and int(rank) < 1:
        raise ExportError(f"rank must be >= 1, got {rank}")
    k_all = torch.cat([k.detach().to("cpu") for k in keys], dim=0)      # (R, d_in)
    c_all = torch.cat([c.detach().to("cpu") for c in coeffs], dim=0)    # (R, d_out)
    rows, d_in = k_all.shape
    d_out = c_all.shape[1]
    if c_all.shape[0] != rows:
        raise ExportError(f"keys have {rows} rows but coefficients {c_all.shape[0]}")
    full = min(d_in, d_out)
    info = {"rows": rows, "d_in": d_in, "d_out": d_out}

    if rank is None or rank >= min(rows, full):
        if rows <= full:      # the journal itself is the factorisation
            info.update(rank=rows, error=0.0, method="exact")
            return k_all.to(dtype), c_all.t().to(dtype).contiguous(), info
        # More rows than the smaller width: rank <= full, keep the dense product in one factor.
        delta_t = c_all.double().t() @ k_all.double()                    # (d_out, d_in)
        eye = torch.eye(full, dtype=torch.float64)
        a, b = (delta_t, eye) if d_out <= d_in else (eye, delta_t)
        info.update(rank=full, error=0.0, method="exact-compressed")
        return a.to(dtype).contiguous(), b.to(dtype).contiguous(), info

    rank = int(rank)
    use_qr = method == "qr" or (method == "auto" and rows <= full)
    if use_qr:
        q_k, r_k = torch.linalg.qr(k_all.double().t())     # (d_in, m), (m, R)
        q_c, r_c = torch.linalg.qr(c_all.double().t())     # (d_out, n), (n, R)
        u, s, vh = torch.linalg.svd(r_c @ r_k.t(), full_matrices=False)   # the small core
        a, b = _split_svd(u, s, vh, rank)
        a, b = a @ q_k.t(), q_c @ b
    else:
        u, s, vh = torch.linalg.svd(c_all.double().t() @ k_all.double(), full_matrices=False)
        a, b = _split_svd(u, s, vh, rank)
    info.update(rank=rank, error=_relative_tail(s, rank), method="qr-svd" if use_qr else "dense-svd")
    return a.to(dtype).contiguous(), b.to(dtype).contiguous(), info


def _require_journal(editor) -> None:
    if not getattr(editor, "keep_journal", False):
        raise ExportError("this editor keeps no journal (keep_journal=False): nothing to export; "
                          "create the RLEditor with keep_journal=True before editing")
    if not editor.journal:
        raise ExportError("the editor has made no edits yet: nothing to export")


def lora_factors(editor, name: str, rank: Optional[int] = None, method: str = "auto"
                 ) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """``(lora_A (r, d_in), lora_B (d_out, r), info)`` of module ``name``'s accumulated edits."""
    _require_journal(editor)
    if name not in editor.modules:
        raise ExportError(f"module '{name}' is not edited by this editor; edited: {list(editor.modules)}")
    keys = [u.keys[name] for u in editor.journal]
    coeffs = [u.coeffs[name] for u in editor.journal]
    return factorise_update(keys, coeffs, rank=rank, method=method)


# ---------------------------------------------------------------------------- adapter

def _pattern(name: str) -> str:
    """A rank_pattern key that matches exactly this module (PEFT treats keys as regexes)."""
    return re.escape(name)


def _lora_config(names: List[str], ranks: Dict[str, int], conv1d: Dict[str, bool]):
    from peft import LoraConfig
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
    odd = {n: r for n, r in ranks.items() if r != common}
    # lora_alpha = r everywhere, so scaling = alpha / r = 1 for every module.
    return LoraConfig(
        r=common, lora_alpha=common, target_modules=list(names), lora_dropout=0.0, bias="none",
        fan_in_fan_out=sum(conv1d.values()) * 2 >= len(conv1d), task_type="CAUSAL_LM",
        rank_pattern={_pattern(n): r for n, r in odd.items()},
        alpha_pattern={_pattern(n): r for n, r in odd.items()},
        init_lora_weights=True, inference_mode=True)


def pristine_copy(editor):
    """A deep copy of the editor's model with the edited weights back to their originals."""
    model = copy.deepcopy(editor.model)
    with torch.no_grad():
        for pname, weight in editor.original_weights().items():
            model.get_parameter(pname).copy_(weight)
    return model


def _base_name(model, given: Optional[str]) -> Optional[str]:
    if given:
        return str(given)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def export_lora(editor, out_dir: str, rank: Optional[int] = None,
                base_model_name_or_path: Optional[str] = None, method: str = "auto",
                return_model: bool = False) -> dict:
    """Write the editor's accumulated edits as a PEFT LoRA adapter to ``out_dir``.

    The adapter targets exactly the edited modules and sits on the pristine base
    model: ``PeftModel.from_pretrained(base, out_dir)`` reproduces the edited model
    (exactly for ``rank=None``; best rank-``rank`` approximation otherwise).  Also
    writes ``rledit_export.json`` (edit batches, rows, per-module rank/error).
    Memory: builds on a deep copy of the model.  ``return_model=True`` adds that
    ``PeftModel`` (pristine base + adapter) to the result under ``"model"``.
    """
    from peft import get_peft_model
    from .core.archive import weights_digest

    _require_journal(editor)
    names = list(editor.modules)
    factors, infos = {}, {}
    for name in names:
        a, b, info = lora_factors(editor, name, rank=rank, method=method)
        info["layout"] = "conv1d" if is_conv1d(editor.modules[name]) else "linear"
        factors[name], infos[name] = (a, b), info
    conv1d = {n: is_conv1d(m) for n, m in editor.modules.items()}
    config = _lora_config(names, {n: i["rank"] for n, i in infos.items()}, conv1d)
    fan_in_fan_out = config.fan_in_fan_out     # PEFT overwrites it per layer while wrapping

    base = pristine_copy(editor)
    base_name = _base_name(base, base_model_name_or_path)
    base_digest = weights_digest(base, names)
    with warnings.catch_warnings():
        # Targets mixing Conv1D and nn.Linear: PEFT sets fan_in_fan_out per layer (checked
        # below) and warns for the minority layout, here and again when loading the adapter.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        peft_model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
    peft_model.peft_config[ADAPTER_NAME].fan_in_fan_out = fan_in_fan_out
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_name
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = inner.get_submodule(name)
            if bool(layer.fan_in_fan_out) != conv1d[name] or layer.scaling[ADAPTER_NAME] != 1.0:
                raise ExportError(f"PEFT wrapped '{name}' unexpectedly (fan_in_fan_out="
                                  f"{layer.fan_in_fan_out}, scaling={layer.scaling[ADAPTER_NAME]})")
            lora_a, lora_b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if tuple(lora_a.shape) != tuple(a.shape) or tuple(lora_b.shape) != tuple(b.shape):
                raise ExportError(f"'{name}': factor shapes {tuple(a.shape)}, {tuple(b.shape)} do not "
                                  f"fit PEFT's {tuple(lora_a.shape)}, {tuple(lora_b.shape)}")
            lora_a.copy_(a)
            lora_b.copy_(b)

    os.makedirs(out_dir, exist_ok=True)
    # The adapter only: never copy an edited lm_head/embedding's base weights into it.
    peft_model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "alg_name": "RLEdit",
        "n_edit_batches": len(editor.journal),
        "n_rows": sum(int(next(iter(u.keys.values())).shape[0]) for u in editor.journal),
        "rank_requested": rank,
        "base_model_name_or_path": base_name,
        "base_weights_sha256": base_digest,
        "modules": infos,
    }
    meta_path = os.path.join(out_dir, EXPORT_META)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    result = {"out_dir": out_dir,
              "adapter_config": os.path.join(out_dir, "adapter_config.json"),
              "adapter_weights": os.path.join(out_dir, "adapter_model.safetensors"),
              "meta": meta_path, **{k: meta[k] for k in ("n_edit_batches", "n_rows", "modules")}}
    if return_model:
        result["model"] = peft_model
    return result


# ---------------------------------------------------------------------------- CLI

def add_export_parser(subparsers):
    """Add ``rledit export-lora`` to the ``rledit`` sub-command parsers."""
    from .data.formats import FORMAT_CHOICES
    p = subparsers.add_parser("export-lora", help="edit a stream, then save the edits as a PEFT LoRA adapter")
    p.add_argument("--hparams", help="editing YAML (default hparams/RLEdit/tiny.yaml)")
    p.add_argument("--archive", help="trained hypernetwork directory")
    p.add_argument("--data", help="records file (default: the embedded eval split)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                   help="format of --data (default: auto, from the first record's keys)")
    p.add_argument("--turns", type=int, default=None, help="edit batches (default: all records)")
    p.add_argument("--batch", type=int, default=20, help="records per edit batch")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: exact)")
    p.add_argument("--base-model", dest="base_model", help="base_model_name_or_path written in the adapter")
    p.add_argument("--out", default="runs/export-lora", help="adapter directory (default runs/export-lora)")
    p.set_defaults(func=cmd_export_lora)
    return p


def cmd_export_lora(args) -> int:
    """Build the editor, edit ``turns x batch`` records, export the adapter, print a summary."""
    import logging
    from .core.editor import RLEditor
    from .data.formats import load_records
    from .hparams import RLEditHyperParams
    from .models import load_model_and_tokenizer

    if args.hparams:
        hp = RLEditHyperParams.from_hparams(args.hparams)
    else:
        from .cli import _default_hparams
        hp = RLEditHyperParams.from_hparams(_default_hparams("RLEdit/tiny.yaml"))
    if args.archive:
        hp.archive = args.archive
    if not hp.archive:
        logging.warning("no archive given: editing with an UNTRAINED hypernetwork")
    if args.batch < 1 or (args.turns is not None and args.turns < 1):
        raise SystemExit("--turns and --batch must be >= 1")
    if args.data:
        records = load_records(args.data, format=args.format)
    else:
        from .world import build_world
        records = build_world().eval_records
    turns = args.turns if args.turns is not None else -(-len(records) // args.batch)
    if turns * args.batch > len(records) and args.turns is not None:
        raise SystemExit(f"{args.data or 'the embedded eval split'} has {len(records)} records; "
                         f"{turns} turns x {args.batch} need {turns * args.batch}")
    model, tok = load_model_and_tokenizer(hp.model_name, hp.device, hp.torch_dtype)
    editor = RLEditor(model, tok, hp, keep_journal=True)
    for t in range(turns):
        editor.edit(records[t * args.batch:(t + 1) * args.batch])
    result = export_lora(editor, args.out, rank=args.rank, base_model_name_or_path=args.base_model)
    print(json.dumps(result, indent=2, default=str))
    return 0
