"""Sequence-level ("reinforced") training of the hypernetwork.

A trajectory edits ``T`` batches of training facts into the pristine model, one
after another, with the hypernetwork being trained (on-policy: step ``t`` sees
the model that steps ``1..t-1`` produced).  At each step the edited model
``W_{t-1} + dW_t`` is scored on

* paraphrases of the current batch and of up to ``back_depth - 1`` earlier
  ones, batch ``t-i`` weighted ``time_decay**i`` (memory backtracking),
* ``loc_coef`` x KL(p_{W_{t-1}} || p_{W_{t-1}+dW_t}) on the same window's
  unrelated prompts (``loc_reference: initial``: KL(p_{W_0} || ...), the drift
  since the trajectory began; the per-step KL's gradient is only as large as
  ``dW_t`` itself),
* ``reg_coef`` x ||dW_t||_F^2 (a real gradient in ``reg_mode: paper``; logged
  only, as in the reference code, in ``reg_mode: reference``),

and the loss gradient reaches the hypernetwork through the exact dual-form
backward of the ridge solve (``solve.ridge_dual_backward``).  An Adam step
follows every ``T / steps_per_trajectory`` batches; after each trajectory the
hypernetwork is validated by a lifelong stream on held-out records and the
best one is kept.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.records import (EditRecord, IGNORE_INDEX, answer_positions, answer_targets,
                            locality_batch, paraphrase_batch)
from ..hparams import RLEditTrainingHyperParams
from ..models import answer_logits, is_conv1d, model_device
from .capture import at_least_fp32, eval_mode, frozen_parameters
from .editor import RLEditor, Update, load_norm_state, norm_state
from .hypernet import HyperNetwork
from .solve import l2_term_kg, project_weight_grad, ridge_dual_backward
from .whitening import record_answer_pairs, record_texts

log = logging.getLogger(__name__)


@dataclass
class _LossBatch:
    """Tokenised paraphrase/locality prompts of one edit batch (tokenised once, reused)."""
    para: Optional[Dict[str, torch.Tensor]]
    loc: Optional[Dict[str, torch.Tensor]]


def _chunks(batch: Dict[str, torch.Tensor], size: int):
    n = batch["input_ids"].shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


def _n_answer(batch: Dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _answer_rows(model, mb, edited) -> torch.Tensor:
    """Logits at the answer-predicting positions (rows = answer tokens, in label order)."""
    return at_least_fp32(answer_logits(model, mb["input_ids"], mb["attention_mask"],
                                       answer_positions(mb["labels"]), edited))


class SequenceTrainer:
    """Owns the model, an :class:`RLEditor` whose hypernetwork it trains, and Adam."""

    def __init__(self, model, tok, hparams: RLEditTrainingHyperParams,
                 hypernet: Optional[HyperNetwork] = None, progress: bool = True,
                 whitening_texts: Optional[Sequence[str]] = None,
                 whitening_pairs: Optional[Sequence[Tuple[str, str]]] = None):
        self.hp, self.model, self.tok, self.progress = hparams, model, tok, progress
        torch.manual_seed(hparams.seed)
        self.editor = RLEditor(model, tok, hparams.editing(), hypernet=hypernet, keep_journal=False,
                               whitening_texts=whitening_texts, whitening_pairs=whitening_pairs)
        self.net = self.editor.hypernet
        self.net.requires_grad_(True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=hparams.meta_lr)
        self.rng = random.Random(hparams.seed)
        self._cache: Dict[int, _LossBatch] = {}
        self._carried: Optional[dict] = None   # trajectory_start "continue": where the last one ended
        self._unused: List[int] = []           # ... and the records it has not edited yet

    # -- data ----------------------------------------------------------
    def _trajectory(self, records: Sequence[EditRecord]) -> List[List[EditRecord]]:
        hp = self.hp
        need = hp.traj_len * hp.n_edits
        carry = hp.trajectory_start == "continue"
        order: List[int] = self._unused if carry else []
        while len(order) < need:  # reshuffle and wrap when the train set is smaller than T x n
            idx = list(range(len(records)))
            self.rng.shuffle(idx)
            order += idx
        order, self._unused = order[:need], (order[need:] if carry else [])
        return [[records[i] for i in order[t * hp.n_edits:(t + 1) * hp.n_edits]]
                for t in range(hp.traj_len)]

    def _tokenised(self, t: int, batch: Sequence[EditRecord]) -> _LossBatch:
        if t not in self._cache:
            dev, L = model_device(self.model), self.hp.max_length
            self._cache[t] = _LossBatch(paraphrase_batch(self.tok, batch, L, dev),
                                        locality_batch(self.tok, batch, L, dev))
        return self._cache[t]

    # -- one step of the trajectory -------------------------------------
    def _window(self, t: int, batches) -> List[Tuple[float, _LossBatch]]:
        hp = self.hp
        return [(hp.time_decay ** i, self._tokenised(t - i, batches[t - i]))
                for i in range(min(hp.back_depth, t + 1))]

    def _reference_logprobs(self, loss_batches) -> List[Optional[List[torch.Tensor]]]:
        """Log-probabilities of the current model on each batch's locality prompts."""
        out, edited = [], list(self.editor.modules.values())
        with torch.no_grad(), eval_mode(self.model):
            for lb in loss_batches:
                out.append(None if lb.loc is None else
                           [F.log_softmax(_answer_rows(self.model, mb, edited), dim=-1)
                            for mb in _chunks(lb.loc, self.hp.loss_minibatch)])
        return out

    def _edited_loss_backward(self, window, ref) -> Dict[str, float]:
        """Generalisation + locality losses at W_{t-1} + dW_t; grads land on the edited weights."""
        hp, model, edited = self.hp, self.model, list(self.editor.modules.values())
        stats = {"gen": 0.0, "loc": 0.0}
        with eval_mode(model), frozen_parameters(model):
            for m in self.editor.modules.values():
                m.weight.requires_grad_(True)
            for (w, lb), ref_lb in zip(window, ref):
                if lb.para is not None:
                    n = _n_answer(lb.para)
                    for mb in _chunks(lb.para, hp.loss_minibatch):
                        ce = F.cross_entropy(_answer_rows(model, mb, edited),
                                             answer_targets(mb["labels"]), reduction="sum")
                        loss = w * ce / n
                        loss.backward()
                        stats["gen"] += float(loss.detach())
                if lb.loc is not None and hp.loc_coef > 0:
                    n = _n_answer(lb.loc)
                    for mb, p_old in zip(_chunks(lb.loc, hp.loss_minibatch), ref_lb):
                        logq = F.log_softmax(_answer_rows(model, mb, edited), dim=-1)
                        kl = F.kl_div(logq, p_old, log_target=True, reduction="sum")
                        loss = w * hp.loc_coef * kl / n
                        loss.backward()
                        stats["loc"] += float(loss.detach())
        return stats

    def _meta_backward(self, rounds: Sequence[Update], scale: float) -> float:
        """Push dLoss/d(dW) through the ridge solve(s) into the hypernetwork's gradients.

        ``rounds``: the batch's updates (``edit_steps`` of them); dW is their sum, so every
        round sees the same dLoss/dW, and the L2 term is on the sum (its cross terms included).
        Captures are constants, as in the single-round case.
        """
        hp, reg_total = self.hp, 0.0
        for name, module in self.editor.modules.items():
            grad = module.weight.grad
            if grad is None:      # the losses did not reach this module
                grad = torch.zeros_like(module.weight)
            grad = grad.t() if is_conv1d(module) else grad
            rows = [u.keys[name].shape[0] for u in rounds]
            reg_value, reg_kg = l2_term_kg(torch.cat([u.keys[name] for u in rounds]),
                                           torch.cat([u.coeffs[name] for u in rounds]), hp.reg_coef)
            reg_total += float(reg_value)
            lam = self.net.lam(name)
            surrogate = 0.0
            for update, reg_part in zip(rounds, reg_kg.split(rows)):
                k, c = update.keys[name], update.coeffs[name]
                kg = project_weight_grad(k, grad)
                if hp.reg_mode == "paper":
                    kg = kg + reg_part
                d_coeff, d_lam = ridge_dual_backward(k, c, kg, lam.detach(), update.factors.get(name))
                values = self.editor.values(name, update.capture)  # with graph
                surrogate = surrogate + (d_coeff * values).sum() + (d_lam * lam).sum()
            (surrogate * scale).backward()
            module.weight.grad = None
        return reg_total

    def _opt_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.hp.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def run_trajectory(self, records: Sequence[EditRecord]) -> Dict[str, float]:
        hp = self.hp
        batches = self._trajectory(records)
        self._cache.clear()
        self.editor.restore(normaliser=False)           # W_0; the normaliser keeps its history
        if self._carried is not None:                   # trajectory_start "continue"
            self.editor.load_edit_state(self._carried)
        seg = max(1, math.ceil(hp.traj_len / hp.steps_per_trajectory))
        totals = {"gen": 0.0, "loc": 0.0, "reg": 0.0, "edit_loss": 0.0, "grad_norm": 0.0, "steps": 0}
        initial = None
        if hp.loc_reference == "initial" and hp.loc_coef > 0:   # p_{W_0}, before any edit
            initial = self._reference_logprobs([self._tokenised(t, b) for t, b in enumerate(batches)])
        bar = tqdm(range(hp.traj_len), desc="trajectory", disable=not self.progress, leave=False)
        for t in bar:
            window = self._window(t, batches)
            if initial is None:           # p_{W_{t-1}}: before dW_t is applied
                ref = self._reference_logprobs([lb for _, lb in window])
            else:
                ref = [initial[t - i] for i in range(len(window))]
            rounds = self.editor.edit_rounds(batches[t], update_norm=True)   # W_t = W_{t-1} + dW_t, kept (on-policy)
            stats = self._edited_loss_backward(window, ref)
            totals["reg"] += self._meta_backward(rounds, 1.0 / seg) * hp.reg_coef
            totals["gen"] += stats["gen"]
            totals["loc"] += stats["loc"]
            totals["edit_loss"] += rounds[0].capture.loss
            if (t + 1) % seg == 0 or t + 1 == hp.traj_len:
                totals["grad_norm"] += self._opt_step()
                totals["steps"] += 1
            bar.set_postfix(gen=f"{stats['gen']:.3f}", loc=f"{stats['loc']:.3f}")
        for key in ("gen", "loc", "reg", "edit_loss"):
            totals[key] /= hp.traj_len
        totals["grad_norm"] /= max(1, totals["steps"])
        if hp.trajectory_start == "continue":
            self._carried = self.editor.edit_state()
        self.editor.restore(normaliser=False)
        return totals

    # -- validation ------------------------------------------------------
    def validate(self, records: Sequence[EditRecord]) -> Dict[str, float]:
        """Lifelong stream over held-out records, scored at the end; weights and normaliser restored."""
        from ..evaluation.metrics import capture_reference, score_records
        norm = norm_state(self.net)
        reference = capture_reference(self.model, self.tok, records)
        n = self.hp.n_edits
        with torch.no_grad():
            for i in range(0, len(records), n):
                self.editor.edit_rounds(records[i:i + n])     # as the editor edits: every round
        scores = score_records(self.model, self.tok, records, reference=reference)
        self.editor.restore(normaliser=False)
        load_norm_state(self.net, norm)
        keys = ("efficacy", "generalization", "specificity_vs_unedited")
        scores["score"] = sum(float(scores[k]) for k in keys) / len(keys)
        return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


def train_hypernetwork(model, tok, hparams: RLEditTrainingHyperParams,
                       train_records: Sequence[EditRecord],
                       val_records: Optional[Sequence[EditRecord]] = None,
                       progress: bool = True, save: bool = True,
                       whitening_texts: Optional[Sequence[str]] = None,
                       whitening_pairs: Optional[Sequence[Tuple[str, str]]] = None):
    """Train a hypernetwork for ``model``; returns ``(hypernet, history)``.

    ``history`` is a list of per-trajectory dicts (train losses, validation
    scores, seconds).  With ``keep_best`` the best validated hypernetwork is
    returned; with ``save`` it is archived under ``hparams.results_dir``.
    ``whitening_texts``: the key statistics' text (default: the training records'
    prompts; a ``whitening_texts`` file in the hparams takes precedence over both).
    ``whitening_pairs``: the answer-position statistics' (prompt, answer) pairs when
    ``whitening_answer_weight > 0`` (default: the training records' prompts).
    """
    if not train_records:
        raise ValueError("no training records")
    texts = None
    if hparams.key_whitening:
        texts = list(whitening_texts) if whitening_texts else record_texts(train_records)
    pairs = None
    if hparams.key_whitening and float(hparams.whitening_answer_weight) > 0:
        pairs = list(whitening_pairs) if whitening_pairs else record_answer_pairs(train_records)
    trainer = SequenceTrainer(model, tok, hparams, progress=progress, whitening_texts=texts,
                              whitening_pairs=pairs)
    val = list(val_records or [])[: hparams.n_val]
    history: List[dict] = []
    best_state, best_score = None, -math.inf
    if val:
        first = trainer.validate(val)
        history.append({"trajectory": 0, "val": first, "seconds": 0.0})
        best_state, best_score = copy.deepcopy(trainer.net.state_dict()), first["score"]
    for i in tqdm(range(hparams.n_trajectories), desc="training", disable=not progress):
        start = time.perf_counter()
        entry = {"trajectory": i + 1, "train": trainer.run_trajectory(train_records)}
        if val:
            entry["val"] = trainer.validate(val)
            if entry["val"]["score"] > best_score:
                best_state, best_score = copy.deepcopy(trainer.net.state_dict()), entry["val"]["score"]
        entry["seconds"] = time.perf_counter() - start
        history.append(entry)
        log.info("trajectory %d: %s", i + 1, entry)
    if hparams.keep_best and best_state is not None:
        trainer.net.load_state_dict(best_state)
    net = trainer.net.requires_grad_(False)
    if save and hparams.results_dir:
        from .archive import save_archive
        save_archive(hparams.results_dir, net, model, hparams.editing(), history=history)
    return net, history
