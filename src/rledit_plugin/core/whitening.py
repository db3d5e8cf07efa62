"""Key whitening: a ridge penalty shaped by the keys' second moment (optional).

The paper's ridge, ``min ||K dW - D||^2 + e^lam ||dW||^2``, penalises every input
direction equally.  Keys of related prompts share large common components (the
relation, the template), so an update fitted to one batch also moves every prompt
that shares them: in a long stream that leak accumulates and locality erodes.
Penalising instead ``e^lam ||A^(1/2) dW||^2`` with ``A = E[k k^T] + damping I``
(the key second moment, the same Tikhonov matrix MEMIT uses) makes common
directions expensive and subject-specific ones cheap.  With ``S = A^(-1/2)`` and
whitened keys ``K~ = K S`` it is the same dual solve on ``K~``:

    dW = S K~^T (K~ K~^T + e^lam I)^-1 D = (K S^2)^T C,

so the update stays rank <= N with right factor ``R = K S^2`` instead of ``K``,
and the dual backward is unchanged (``dLoss/dC = R Gw``).  The statistics come from
text the model reads (by default the training records' prompts, after the pre-training
corpus when the caller knows it); ``S`` is stored in the hypernetwork archive so training
and editing use the same one.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.records import EditRecord, batch_ids, pad_right


def record_texts(records: Iterable[EditRecord]) -> list:
    """Every prompt a record holds, answered (edit prompt with both answers, paraphrases,
    locality prompts): the text the keys are measured on by default."""
    texts = []
    for r in records:
        answers = [a for a in (r.target_true, r.target_new) if a]
        texts += [f"{r.prompt} {a}" for a in answers]
        texts += [f"{p} {r.target_new}" for p in r.paraphrases]
        texts += [f"{p} {a}" for p, a in zip(r.locality_prompts, r.locality_answers)]
    return list(dict.fromkeys(texts))


def statistics_texts(records: Iterable[EditRecord], corpus: Sequence[str] = ()) -> list:
    """The key statistics' text: ``corpus`` (text the model was pre-trained on, when known:
    MEMIT measures its second moment on such text too), then every prompt of ``records``.

    The corpus adds the keys of facts that no training record asks about, which the ridge
    then also protects (docs/TUNING.md section 10)."""
    return list(dict.fromkeys([*corpus, *record_texts(records)]))


@torch.no_grad()
def key_second_moments(model: nn.Module, tok, modules: Mapping[str, nn.Module],
                       texts: Sequence[str], batch_size: int = 32, max_length: int = 128,
                       progress: bool = False) -> Dict[str, Tensor]:
    """``E[k k^T]`` (float64, d_in x d_in) of each module's input over every non-pad token."""
    if not texts:
        raise ValueError("key statistics need at least one text")
    sums: Dict[str, Tensor] = {}
    count = 0
    mask_now: Dict[str, Tensor] = {}

    def hook_for(name):
        def hook(_module, inputs, _output):
            x = inputs[0][mask_now["mask"]].double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="key statistics", disable=not progress):
            ids = [x[:max_length] for x in batch_ids(tok, list(texts[i:i + batch_size]))]
            input_ids, mask = pad_right(ids, 0)            # padding is masked out of the sums
            mask_now["mask"] = mask.bool().to(device)
            count += int(mask.sum())
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (s / count).cpu() for n, s in sums.items()}


def whitening_matrix(second_moment: Tensor, damping: float) -> Tensor:
    """``S = (M + damping * tr(M)/d * I)^(-1/2)``, symmetric, float32 (damping > 0 keeps it finite)."""
    if damping <= 0:
        raise ValueError(f"whitening damping must be > 0, got {damping}")
    m = second_moment.double()
    d = m.shape[0]
    a = (m + m.T) / 2 + damping * float(m.trace()) / d * torch.eye(d, dtype=m.dtype)
    evals, evecs = torch.linalg.eigh(a)
    return ((evecs * evals.clamp_min(1e-30).rsqrt()) @ evecs.T).float()


def compute_whitening(model: nn.Module, tok, modules: Mapping[str, nn.Module],
                      texts: Sequence[str], damping: float, max_length: int = 128,
                      progress: bool = False) -> Dict[str, Tensor]:
    """Whitening matrix per edited module from ``texts``."""
    moments = key_second_moments(model, tok, modules, texts, max_length=max_length, progress=progress)
    return {n: whitening_matrix(m, damping) for n, m in moments.items()}


def read_texts(path: str) -> list:
    """One text per non-empty line."""
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no text lines for the key statistics")
    return texts
