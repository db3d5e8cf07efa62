"""Scores of an edited model, the same for every editor.

Everything here is teacher forced on ``prompt + " " + answer`` exactly as
:func:`rledit_plugin.data.records.tokenize_teacher_forced` builds it, except
:func:`generation_exact_match`, which decodes greedily with no teacher forcing.
All functions run batched under ``torch.no_grad()`` with the model in eval mode
(its previous train/eval mode is restored afterwards).  The model only needs
``model(input_ids=..., attention_mask=...)`` returning logits, so GPT-2, Llama
and any Hugging Face causal LM work.

Aggregation in :func:`score_records`: a mean over the prompts of one record,
then a mean over the records that have such prompts (fractions in 0-1); a
metric no record can be scored on is ``None``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.records import (EditRecord, answer_positions, answer_targets, pad_right,
                            split_prompt_answer, tokenize_teacher_forced)
from ..models import answer_logits, model_device, output_logits

FRACTION_METRICS = ("efficacy", "generalization", "specificity", "specificity_vs_unedited",
                    "generation_em")
COUNTERFACT_METRICS = ("cf_efficacy", "cf_generalization", "cf_specificity")

# (locality prompt, gold answer) -> argmax tokens of the unedited model at the answer positions.
Reference = Dict[Tuple[str, str], List[int]]


@contextmanager
def _scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; the caller's train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _forward_logits(model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    return output_logits(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Index batches of similar length (less padding); every index appears once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _same_length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Index batches whose members all have the same length (no padding), shortest first;
    every index appears once, in its original order within its length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: Dict[int, List[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return [members[i:i + batch_size] for _, members in sorted(groups.items())
            for i in range(0, len(members), batch_size)]


def _prompt_ids(tok, prompt: str) -> List[int]:
    return tok(prompt.rstrip(), add_special_tokens=True)["input_ids"]


@dataclass
class AnswerStats:
    """Teacher-forced view of one (prompt, answer) pair."""
    predicted: List[int]  # argmax token at each answer position
    gold: List[int]       # the answer tokens
    logprob: float        # sum over answer tokens of log P(gold token | prefix)

    @property
    def accuracy(self) -> float:
        return sum(p == g for p, g in zip(self.predicted, self.gold)) / len(self.gold)


def answer_stats(model: nn.Module, tok, prompts: Sequence[str], answers: Sequence[str],
                 batch_size: int = 32, max_length: int = 128) -> List[AnswerStats]:
    """Argmax tokens, gold tokens and whole-answer log-probability for each pair.

    Pairs are batched only with pairs of the same token length, so no batch has padding:
    the model gets an all-ones mask, which Hugging Face models turn into their plain causal
    attention instead of building a 4-D padding mask per forward (a fifth of the scoring
    time of the embedded default); exact for any causal LM (no position-id bookkeeping).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    results: List[Optional[AnswerStats]] = [None] * len(prompts)
    if not prompts:
        return []
    device = model_device(model)
    encoded = tokenize_teacher_forced(tok, prompts, answers, max_length)
    lengths = encoded["attention_mask"].sum(1).tolist()
    with _scoring(model):
        for idx in _same_length_batches(lengths, batch_size):
            length = lengths[idx[0]]
            input_ids = encoded["input_ids"][idx, :length].to(device)
            labels = encoded["labels"][idx, :length].to(device)
            rows = answer_positions(labels)  # position j predicts token j + 1
            picked = answer_logits(model, input_ids, torch.ones_like(input_ids),
                                   rows).float()          # (answer tokens, vocab)
            gold = answer_targets(labels)
            logp = picked.log_softmax(-1).gather(1, gold[:, None]).squeeze(1)
            pred = picked.argmax(-1)
            counts = rows.sum(1).tolist()
            for i, p, g, lp in zip(idx, pred.cpu().split(counts), gold.cpu().split(counts),
                                   logp.double().cpu().split(counts)):
                results[i] = AnswerStats(p.tolist(), g.tolist(), float(lp.sum()))
    return results  # type: ignore[return-value]


def token_accuracy(model: nn.Module, tok, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32, max_length: int = 128) -> List[float]:
    """Per prompt: fraction of answer tokens the argmax predicts (teacher forced)."""
    return [s.accuracy for s in answer_stats(model, tok, prompts, answers, batch_size, max_length)]


def predicted_tokens(model: nn.Module, tok, prompts: Sequence[str], answers: Sequence[str],
                     batch_size: int = 32, max_length: int = 128) -> List[List[int]]:
    """Per prompt: argmax tokens at the answer positions (teacher forced)."""
    return [s.predicted for s in answer_stats(model, tok, prompts, answers, batch_size, max_length)]


def answer_logprob(model: nn.Module, tok, prompts: Sequence[str], answers: Sequence[str],
                   batch_size: int = 32, max_length: int = 128) -> List[float]:
    """Per prompt: log P(answer | prompt), summed over the answer tokens."""
    return [s.logprob for s in answer_stats(model, tok, prompts, answers, batch_size, max_length)]


def greedy_generate(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: Sequence[int],
                    batch_size: int = 32, max_length: int = 128) -> List[List[int]]:
    """Greedy continuation token ids of each prompt (no teacher forcing, no early stop).

    Prompts are batched only with prompts of the same token length, so there is
    no padding and no position-id bookkeeping: exact for any causal LM.  No KV
    cache: the continuations here are a few tokens long.
    """
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} lengths")
    device = model_device(model)
    encoded = [_prompt_ids(tok, p)[-max_length:] for p in prompts]
    out: List[List[int]] = [[] for _ in prompts]
    with _scoring(model):
        for idx in _same_length_batches([len(ids) for ids in encoded], batch_size):
            steps = max(max_new_tokens[i] for i in idx)
            ids = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=device)
            for _ in range(steps):
                logits = _forward_logits(model, ids, torch.ones_like(ids))
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            new = ids[:, ids.shape[1] - steps:].cpu().tolist()
            for i, row in zip(idx, new):
                out[i] = row[:max_new_tokens[i]]
    return out


def generation_exact_match(model: nn.Module, tok, prompts: Sequence[str],
                           targets: Sequence[str], batch_size: int = 32,
                           max_length: int = 128) -> List[bool]:
    """Greedy decoding from each prompt matches its target exactly.

    ``len(target tokens) + 1`` new tokens are decoded (one token of slack for a
    different segmentation), cut at the first EOS, decoded and stripped.  A match
    is the target text itself, or the target text followed by a non-alphanumeric
    character (so "Paris." matches "Paris" but "Parisian" does not).  The target
    is compared in its decoded form, so tokenizer normalisation cannot cause a miss.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    # the answer's tokens as they follow the prompt (records' convention, no stray '▁')
    target_ids = [split_prompt_answer(tok, p, t)[1] for p, t in zip(prompts, targets)]
    generated = greedy_generate(model, tok, prompts, [len(t) + 1 for t in target_ids],
                                batch_size, max_length)
    eos = tok.eos_token_id
    matches = []
    for gen, want_ids, target in zip(generated, target_ids, targets):
        if eos is not None and eos in gen:
            gen = gen[:gen.index(eos)]
        text = tok.decode(gen, skip_special_tokens=True).strip()
        want = tok.decode(want_ids, skip_special_tokens=True).strip() or target.strip()
        matches.append(text == want or (text.startswith(want) and not text[len(want)].isalnum()))
    return matches


def capture_reference(model: nn.Module, tok, records: Sequence[EditRecord],
                      batch_size: int = 32, max_length: int = 128) -> Reference:
    """The unedited model's argmax tokens on every locality prompt's gold-answer positions."""
    pairs = list(dict.fromkeys((p, a) for r in records
                               for p, a in zip(r.locality_prompts, r.locality_answers)))
    stats = answer_stats(model, tok, [p for p, _ in pairs], [a for _, a in pairs],
                         batch_size, max_length)
    return {pair: s.predicted for pair, s in zip(pairs, stats)}


def _mean_of_means(per_record: Sequence[Sequence[float]]) -> Optional[float]:
    """Mean over prompts within a record, then over the records that have any."""
    means = [sum(v) / len(v) for v in per_record if len(v)]
    return sum(means) / len(means) if means else None


def score_records(model: nn.Module, tok, records: Sequence[EditRecord],
                  reference: Optional[Reference] = None, *, batch_size: int = 32,
                  max_length: int = 128, generation: bool = True) -> Dict[str, Optional[float]]:
    """Efficacy, generalization, specificity (gold and vs the unedited model), generation
    exact match and, when any record has ``target_true``, the CounterFact comparisons.

    ``cf_efficacy`` / ``cf_generalization``: fraction of edit / paraphrase prompts with
    log P(target_new) > log P(target_true); ``cf_specificity``: fraction of locality
    prompts with log P(gold answer) > log P(target_new) (whole-answer log-probs).
    ``specificity_vs_unedited`` is ``None`` without a ``reference``.
    """
    records = list(records)
    # Every teacher-forced pair needed, deduplicated, scored in one batched pass.
    wanted: Dict[Tuple[str, str], int] = {}

    def need(prompt: str, answer: str) -> Tuple[str, str]:
        wanted.setdefault((prompt, answer), len(wanted))
        return prompt, answer

    for r in records:
        need(r.prompt, r.target_new)
        for p in r.paraphrases:
            need(p, r.target_new)
        for p, a in zip(r.locality_prompts, r.locality_answers):
            need(p, a)
        if r.target_true is not None:
            need(r.prompt, r.target_true)
            for p in r.paraphrases:
                need(p, r.target_true)
            for p in r.locality_prompts:
                need(p, r.target_new)
    pairs = list(wanted)
    stats = answer_stats(model, tok, [p for p, _ in pairs], [a for _, a in pairs],
                         batch_size, max_length)
    by_pair = dict(zip(pairs, stats))

    efficacy, generalization, specificity, agreement = [], [], [], []
    cf_eff, cf_gen, cf_spec = [], [], []
    for i, r in enumerate(records):
        efficacy.append([by_pair[r.prompt, r.target_new].accuracy])
        generalization.append([by_pair[p, r.target_new].accuracy for p in r.paraphrases])
        loc = list(zip(r.locality_prompts, r.locality_answers))
        specificity.append([by_pair[pair].accuracy for pair in loc])
        if reference is not None:
            row = []
            for pair in loc:
                if pair not in reference:
                    raise KeyError(f"record {i}: locality prompt {pair[0]!r} is not in the reference; "
                                   "capture_reference must be run on the same records")
                pred, ref = by_pair[pair].predicted, reference[pair]
                row.append(sum(a == b for a, b in zip(pred, ref)) / len(ref))
            agreement.append(row)
        if r.target_true is not None:
            def beats(prompt: str, a: str, b: str) -> float:
                return float(by_pair[prompt, a].logprob > by_pair[prompt, b].logprob)
            cf_eff.append([beats(r.prompt, r.target_new, r.target_true)])
            cf_gen.append([beats(p, r.target_new, r.target_true) for p in r.paraphrases])
            cf_spec.append([beats(p, a, r.target_new) for p, a in loc])

    scores: Dict[str, Optional[float]] = {
        "efficacy": _mean_of_means(efficacy),
        "generalization": _mean_of_means(generalization),
        "specificity": _mean_of_means(specificity),
        "specificity_vs_unedited": _mean_of_means(agreement) if reference is not None else None,
        "generation_em": None,
    }
    if generation and records:
        hits = generation_exact_match(model, tok, [r.prompt for r in records],
                                      [r.target_new for r in records], batch_size, max_length)
        scores["generation_em"] = sum(hits) / len(hits)
    if cf_eff:
        scores.update(cf_efficacy=_mean_of_means(cf_eff), cf_generalization=_mean_of_means(cf_gen),
                      cf_specificity=_mean_of_means(cf_spec))
    return scores


def perplexity(model: nn.Module, tok, texts: Sequence[str], batch_size: int = 16,
               max_length: int = 256) -> Optional[float]:
    """exp(mean next-token NLL) over every predicted token of every text (None if none)."""
    device = model_device(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    encoded = [tok(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]  # a 1-token text predicts nothing
    total_nll, total_tokens = 0.0, 0
    with _scoring(model):
        for idx in _batches_by_length([len(e) for e in encoded], batch_size):
            ids, attention = pad_right([encoded[i] for i in idx], pad_id)
            ids, attention = ids.to(device), attention.to(device)
            logits = _forward_logits(model, ids, attention)
            mask = attention[:, 1:].bool()
            picked = logits[:, :-1][mask].float()
            nll = -picked.log_softmax(-1).gather(1, ids[:, 1:][mask][:, None])
            total_nll += float(nll.double().sum())
            total_tokens += int(mask.sum())
    return math.exp(total_nll / total_tokens) if total_tokens else None


def resolve_param_names(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Parameter names for ``names``; a module name stands for its ``.weight``."""
    params = dict(model.named_parameters())
    resolved = []
    for name in names:
        if name in params:
            resolved.append(name)
        elif f"{name}.weight" in params:
            resolved.append(f"{name}.weight")
        else:
            tail = name.split(".")[-1]
            near = [n for n in params if tail in n][:6]
            raise KeyError(f"model has no parameter or module '{name}'"
                           + (f"; similar parameters: {near}" if near else ""))
    return list(dict.fromkeys(resolved))


def snapshot_params(model: nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Copies of the named parameters (module names mean their weight), on their device."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in resolve_param_names(model, names)}


def weight_change_norm(model: nn.Module, names: Sequence[str],
                       snapshot: Dict[str, torch.Tensor]) -> float:
    """Frobenius norm (fp32) of the change of the named parameters since ``snapshot``."""
    params = dict(model.named_parameters())
    total = 0.0
    for name in resolve_param_names(model, names):
        if name not in snapshot:
            raise KeyError(f"parameter '{name}' was not snapshotted")
        now = params[name].detach()
        diff = now.float() - snapshot[name].to(now.device).float()
        total += float(diff.pow(2).sum())
    return math.sqrt(total)
