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

from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..cpu_kernels import fixed_threads
from ..data.records import EditRecord, batch_ids, pad_right, tokenize_teacher_forced


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


def record_answer_pairs(records: Iterable[EditRecord]) -> list:
    """The (prompt, answer) pairs of what the model knows, for :func:`answer_second_moments`:
    each record's prompt with its true answer (when it has one) and its locality prompts with
    theirs.  New targets and paraphrases are left out: they are what edits write, not what
    the ridge should protect (with them in, locality at 2,000 edits was 0.022 lower on the
    embedded default; docs/TUNING.md section 16)."""
    pairs = []
    for r in records:
        if r.target_true:
            pairs.append((r.prompt, r.target_true))
        pairs += list(zip(r.locality_prompts, r.locality_answers))
    return list(dict.fromkeys(pairs))


def statistics_pairs(records: Iterable[EditRecord],
                     facts: Sequence[Tuple[str, str]] = ()) -> list:
    """The answer-position statistics' pairs: ``facts`` (statements of the pre-training text
    split before their object, when known), then every prompt of ``records``."""
    return list(dict.fromkeys([*facts, *record_answer_pairs(records)]))


@torch.no_grad()
def _moments_at(model: nn.Module, modules: Mapping[str, nn.Module],
                batches: Iterable[Tuple[Tensor, Tensor, Tensor]]) -> Dict[str, Tensor]:
    """``E[k k^T]`` (float64) of each module's input over the selected positions of
    ``(input_ids, attention_mask, selected)`` batches, with the model in eval mode."""
    sums: Dict[str, Tensor] = {}
    grabbed: Dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: grabbed.__setitem__(n, inp[0]))
               for n, m in modules.items()]
    device = next(model.parameters()).device
    was_training, count = model.training, 0
    model.eval()
    try:
        for input_ids, mask, selected in batches:
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            selected = selected.to(device)
            count += int(selected.sum())
            for n in modules:
                # the batch's products in the keys' precision (at least float32; float64 ones
                # took 2.5x as long), summed over batches in float64
                x = grabbed[n][selected]
                x = x.to(torch.promote_types(x.dtype, torch.float32))
                part = (x.T @ x).double()
                sums[n] = sums[n].add_(part) if n in sums else part
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:      # dividing by it would turn every whitening matrix into NaN, silently
        raise ValueError("key statistics: the batches select no token position, so there is "
                         "nothing to estimate the key moments from")
    return {n: (v / count).cpu() for n, v in sums.items()}


def answer_second_moments(model: nn.Module, tok, modules: Mapping[str, nn.Module],
                          pairs: Sequence[Tuple[str, str]], batch_size: int = 64,
                          max_length: int = 128) -> Dict[str, Tensor]:
    """``E[k k^T]`` (float64) of each module's input over the positions that predict an
    answer token of ``pairs`` (teacher-forced ``prompt + " " + answer``)."""
    if not pairs:
        raise ValueError("answer-position key statistics need at least one (prompt, answer) pair")

    def batches():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            enc = tokenize_teacher_forced(tok, [p for p, _ in chunk], [a for _, a in chunk], max_length)
            predicts = torch.zeros_like(enc["labels"], dtype=torch.bool)
            predicts[:, :-1] = enc["labels"][:, 1:] != -100     # position t predicts token t+1
            yield enc["input_ids"], enc["attention_mask"], predicts
    return _moments_at(model, modules, batches())


def key_second_moments(model: nn.Module, tok, modules: Mapping[str, nn.Module],
                       texts: Sequence[str], batch_size: int = 32, max_length: int = 128,
                       progress: bool = False) -> Dict[str, Tensor]:
    """``E[k k^T]`` (float64, d_in x d_in) of each module's input over every non-pad token."""
    if not texts:
        raise ValueError("key statistics need at least one text")

    def batches():
        for i in tqdm(range(0, len(texts), batch_size), desc="key statistics", disable=not progress):
            ids = [x[:max_length] for x in batch_ids(tok, list(texts[i:i + batch_size]))]
            input_ids, mask = pad_right(ids, 0)            # padding is masked out of the sums
            yield input_ids, mask, mask.bool()
    return _moments_at(model, modules, batches())


def whitening_matrix(second_moment: Tensor, damping: float) -> Tensor:
    """``S = (M + damping * tr(M)/d * I)^(-1/2)``, symmetric, float32 (damping > 0 keeps it finite)."""
    if damping <= 0:
        raise ValueError(f"whitening damping must be > 0, got {damping}")
    m = second_moment.double()
    d = m.shape[0]
    a = (m + m.T) / 2 + damping * float(m.trace()) / d * torch.eye(d, dtype=m.dtype)
    evals, evecs = torch.linalg.eigh(a)
    return ((evecs * evals.clamp_min(1e-30).rsqrt()) @ evecs.T).float()


def mix_answer_moment(moment: Tensor, answers: Tensor, weight: float) -> Tensor:
    """``M + weight * (tr M / tr M_ans) * M_ans``: the answer positions' moment added at
    ``weight`` times the trace of the all-token one (docs/TUNING.md section 14)."""
    answer_trace = float(answers.trace())
    if not answer_trace > 0:
        raise ValueError(f"answer-position key moment has trace {answer_trace}: every answer "
                         "key is zero, so it cannot be scaled to the all-token moment")
    return moment + weight * (float(moment.trace()) / answer_trace) * answers


def compute_whitening(model: nn.Module, tok, modules: Mapping[str, nn.Module],
                      texts: Sequence[str], damping: float, max_length: int = 128,
                      progress: bool = False, answer_pairs: Optional[Sequence[Tuple[str, str]]] = None,
                      answer_weight: float = 0.0, threads: int = 0) -> Dict[str, Tensor]:
    """Whitening matrix per edited module from ``texts`` (every token) and, with
    ``answer_weight > 0``, the positions of ``answer_pairs`` that predict an answer.
    ``threads > 0``: the moments are measured on exactly that many torch threads."""
    if answer_weight > 0 and not answer_pairs:
        raise ValueError("whitening_answer_weight > 0 needs (prompt, answer) pairs: train with "
                         "records (rledit train) or set whitening_answer_weight: 0")
    with fixed_threads(threads):
        moments = key_second_moments(model, tok, modules, texts, max_length=max_length, progress=progress)
        answers = (answer_second_moments(model, tok, modules, answer_pairs, max_length=max_length)
                   if answer_weight > 0 else None)
    if answers is not None:
        moments = {n: mix_answer_moment(m, answers[n], answer_weight) for n, m in moments.items()}
    return {n: whitening_matrix(m, damping) for n, m in moments.items()}


def read_texts(path: str) -> list:
    """One text per non-empty line."""
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no text lines for the key statistics")
    return texts
