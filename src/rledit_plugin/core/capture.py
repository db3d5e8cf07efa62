"""Step 1 of an edit: keys and value-gradients of the edited modules.

One teacher-forced forward + backward of the *current* model on prompt +
answer.  At every position whose output predicts an answer token, each edited
module contributes a key row ``k`` (its input) and a value-gradient row
``g = dLoss/d(module output)``.  The loss is the mean cross-entropy over all
answer tokens of the whole edit batch, so splitting the batch into
minibatches changes nothing but peak memory.

Only the module outputs are differentiated (``torch.autograd.grad``): no
parameter gradient is computed or left behind in ``.grad``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.records import IGNORE_INDEX, answer_positions
from ..models import answer_logits
from .prefix import ForwardPrefix, MaskRejected


@dataclass
class Capture:
    keys: Dict[str, torch.Tensor]    # name -> (N, d_in), fp32 (fp64 for an fp64 model)
    grads: Dict[str, torch.Tensor]   # name -> (N, d_out)
    loss: float                      # mean answer-token cross-entropy before the edit
    n_rows: int
    target_prob: Optional[torch.Tensor] = None   # (N,) probability of each row's answer token


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily stop every parameter from requiring grad (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Deterministic forward passes (no dropout) whatever mode the caller left; after, every
    module is back in its own mode (a caller's mix of train and eval modules included)."""
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:      # the flags only: model.train() would also flip eval children
            m.training = True


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy of the answer tokens (labels are aligned with inputs, HF style)."""
    shift_logits = at_least_fp32(logits[:, :-1])
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                           shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _split(batch: Mapping[str, torch.Tensor], size: int) -> List[Dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _forward(model, mb, rows, edited, prefix: Optional[ForwardPrefix], index: int) -> torch.Tensor:
    """Answer-row logits of one minibatch, through ``prefix`` when given."""
    if prefix is None:
        return answer_logits(model, mb["input_ids"], mb["attention_mask"], rows, edited=edited)
    try:
        with prefix.around(index):
            return answer_logits(model, mb["input_ids"], prefix.attention_mask(index, mb["attention_mask"]),
                                 rows, edited=edited)
    except MaskRejected:          # stopped before any edited module ran: again, with the 2-D mask
        prefix.drop_masks()
        with prefix.around(index):
            return answer_logits(model, mb["input_ids"], mb["attention_mask"], rows, edited=edited)


def capture(model: nn.Module, modules: Mapping[str, nn.Module],
            batch: Mapping[str, torch.Tensor], minibatch: int = 20,
            prefix: Optional[ForwardPrefix] = None) -> Capture:
    """Keys and value-gradients of ``modules`` at the answer positions of ``batch``.

    ``prefix``: shared by the rounds of one batch, it lets a later round skip what runs
    before the first edited module (core/prefix.py).
    """
    n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if n_answer == 0:
        raise ValueError("edit batch has no answer tokens")
    keys = {name: [] for name in modules}
    grads = {name: [] for name in modules}
    probs = []
    total_loss = 0.0
    with eval_mode(model), frozen_parameters(model), torch.enable_grad():
        for index, mb in enumerate(_split(batch, minibatch)):
            # index tensors once per minibatch: each boolean-mask indexing would wait for the GPU
            rows = answer_positions(mb["labels"]).nonzero(as_tuple=True)
            outputs: Dict[str, torch.Tensor] = {}
            handles = []
            for name, module in modules.items():
                def hook(mod, args, out, name=name):
                    keys[name].append(at_least_fp32(args[0][rows].detach()))
                    if not out.requires_grad:   # first edited module: make it a leaf of the graph
                        out.requires_grad_(True)
                    outputs[name] = out
                    return out
                handles.append(module.register_forward_hook(hook))
            try:
                logits = _forward(model, mb, rows, list(modules.values()), prefix, index)
            finally:
                for h in handles:
                    h.remove()
            targets = mb["labels"][rows[0], rows[1] + 1]    # = answer_targets(labels), same order
            row_loss = F.cross_entropy(at_least_fp32(logits), targets, reduction="none")
            loss = row_loss.sum() / n_answer
            probs.append(torch.exp(-row_loss.detach()))   # p(answer token) = exp(-cross-entropy)
            names = list(outputs)
            out_grads = torch.autograd.grad(loss, [outputs[n] for n in names])
            for name, g in zip(names, out_grads):
                grads[name].append(at_least_fp32(g[rows]))
            total_loss = total_loss + loss.detach()
    cat_keys = {n: torch.cat(v) for n, v in keys.items()}
    cat_grads = {n: torch.cat(v) for n, v in grads.items()}
    n_rows = {t.shape[0] for t in list(cat_keys.values()) + list(cat_grads.values())}
    if len(n_rows) != 1:  # the reference's K/G row mismatch: never let it through
        raise RuntimeError(f"captured key/gradient rows disagree: {sorted(n_rows)}")
    return Capture(cat_keys, cat_grads, float(total_loss), n_rows.pop(), torch.cat(probs))
