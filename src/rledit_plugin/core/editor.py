"""Lifelong editing: capture -> hypernetwork -> ridge solve -> low-rank update.

For every incoming batch of records the editor captures keys ``K`` and
value-gradients ``G`` on the current (already edited) model, lets the
hypernetwork turn them into value changes ``D``, solves the ridge problem in
its dual form ``C = (K K^T + e^lam I)^-1 D`` and adds ``dW = K^T C`` to each
edited weight as an in-place rank-``N`` update.  With ``edit_steps > 1`` this
round repeats on the updated weights: edits that already took give small
gradients and get little more, the others get another push (the normaliser
sees each batch once); with ``settled_prob`` answer tokens that already took are held
where they are.  Edits are never reverted
unless asked: :meth:`rollback` and :meth:`restore` use the pristine copy of the
edited modules (the rest of the model never changes) and the exact journal of
applied factors.  With ``edit_memory`` the ridge also protects the keys of every batch
already applied (core/memory.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data.records import EditRecord, RecordError, edit_batch
from ..hparams import RLEditHyperParams
from ..kernels import apply_low_rank_, make_residual
from ..models import default_edit_modules, get_module, io_dims, model_device, weight_view
from .capture import Capture, capture
from .prefix import ForwardPrefix
from .hypernet import HyperNetwork
from .memory import EditMemory
from .solve import GramFactor, factor_gram, ridge_dual
from .whitening import compute_whitening, read_texts


@dataclass
class Update:
    """One edit batch's low-rank update: ``dW[name] = keys[name]^T @ coeffs[name]``.

    ``keys`` is the right factor: the captured keys ``K``, ``K S^2`` with key
    whitening (core/whitening.py), ``K P`` with the edit memory (core/memory.py); the raw
    keys are in ``capture.keys``.
    """
    keys: Dict[str, torch.Tensor]     # (N, d_in)
    coeffs: Dict[str, torch.Tensor]   # (N, d_out)
    capture: Optional[Capture] = None
    values: Dict[str, torch.Tensor] = field(default_factory=dict)  # D, (N, d_out)
    factors: Dict[str, GramFactor] = field(default_factory=dict)   # reused by the trainer's backward
    solve_keys: Dict[str, torch.Tensor] = field(default_factory=dict)  # K S (whitened), or K
    grams: Dict[str, torch.Tensor] = field(default_factory=dict)   # K P K^T (edit memory)
    rounds: Optional[List[int]] = None   # journal: rows of each edit round, stacked (edit_steps > 1)
    memory_keys: Optional[Dict[str, torch.Tensor]] = None  # journal: keys the edit memory took

    def split_rounds(self) -> List["Update"]:
        """The rounds this journal entry stacks, in the order they were applied."""
        if not self.rounds or len(self.rounds) == 1:
            return [self]
        keys = {n: k.split(self.rounds) for n, k in self.keys.items()}
        coeffs = {n: c.split(self.rounds) for n, c in self.coeffs.items()}
        return [Update({n: keys[n][i] for n in keys}, {n: coeffs[n][i] for n in coeffs})
                for i in range(len(self.rounds))]


def _norm_buffers(net: nn.Module):
    # the running normalisers: the hypernetwork's only state that changes while editing
    return ((k, v) for k, v in net.named_buffers() if ".norms." in k)


def norm_state(net: nn.Module) -> Dict[str, torch.Tensor]:
    """Copy of the running normalisers' buffers."""
    return {k: v.detach().clone() for k, v in _norm_buffers(net)}


def load_norm_state(net: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in _norm_buffers(net):
            v.copy_(state[k])


def edit_module_names(model: nn.Module, hparams: RLEditHyperParams) -> List[str]:
    return list(hparams.inner_params) or default_edit_modules(model)


def check_records(records: Sequence[EditRecord]) -> None:
    """Refuse an empty batch or any record that is not a valid :class:`EditRecord` (the error
    names the record's index in the batch and the field) before anything is computed."""
    if not records:
        raise ValueError("no records to edit")
    asked: Dict[str, int] = {}
    for i, r in enumerate(records):
        if not isinstance(r, EditRecord):
            raise RecordError(f"expected an EditRecord, got {type(r).__name__}", index=i)
        r.validate(index=i)
        j = asked.setdefault(r.prompt.strip(), i)
        if records[j].target_new.strip() != r.target_new.strip():
            warnings.warn(f"records {j} and {i} of this batch give the prompt {r.prompt!r} two "
                          f"answers ({records[j].target_new!r}, {r.target_new!r}): both are written",
                          stacklevel=3)


def build_hypernetwork(model: nn.Module, hparams: RLEditHyperParams) -> HyperNetwork:
    shapes = {name: io_dims(get_module(model, name)) for name in edit_module_names(model, hparams)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hparams.seed)
        net = HyperNetwork(shapes, rank=hparams.rank, n_blocks=hparams.n_blocks,
                           init_lr=hparams.init_lr, init_lam=hparams.init_lam, eps=hparams.norm_eps)
    return net.to(model_device(model))


class RLEditor:
    """Edits ``model`` in place, one batch of records after another."""

    def __init__(self, model: nn.Module, tok, hparams: RLEditHyperParams,
                 hypernet: Optional[HyperNetwork] = None, keep_journal: bool = True,
                 whitening_texts: Optional[Sequence[str]] = None,
                 whitening_pairs: Optional[Sequence[Tuple[str, str]]] = None):
        self.model, self.tok, self.hparams = model, tok, hparams
        config = getattr(model, "config", None)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and hparams.max_length > positions:
            raise ValueError(f"hparams key 'max_length' is {hparams.max_length} but the model has "
                             f"{positions} positions")
        names = edit_module_names(model, hparams)
        self.modules: Dict[str, nn.Module] = {n: get_module(model, n) for n in names}
        if hypernet is None and hparams.archive:
            from .archive import load_archive
            hypernet = load_archive(hparams.archive, model, expect_modules=names,
                                    edit_steps=hparams.edit_steps, hparams=hparams)
        self.hypernet = hypernet if hypernet is not None else build_hypernetwork(model, hparams)
        if sorted(self.hypernet.module_names) != sorted(names):
            raise ValueError(f"hypernetwork edits {sorted(self.hypernet.module_names)} "
                             f"but the hparams ask for {sorted(names)}")
        self.hypernet.to(model_device(model)).requires_grad_(False)
        if hparams.key_whitening and not self.hypernet.whitened:
            self._init_whitening(whitening_texts, whitening_pairs)
        self.keep_journal = keep_journal
        self.journal: List[Update] = []
        self._pristine = {n: m.weight.detach().to("cpu", copy=True) for n, m in self.modules.items()}
        self._pristine_norm = norm_state(self.hypernet)
        self._norm_history: List[dict] = []
        self._residuals = {n: make_residual(weight_view(m), hparams.accumulate) for n, m in self.modules.items()}
        self.memory = None
        if hparams.edit_memory > 0:
            self.memory = EditMemory(hparams.edit_memory, self.hypernet.whitening,
                                     {n: io_dims(m)[0] for n, m in self.modules.items()})
            weight = next(iter(self.modules.values())).weight     # keys come out at >= float32
            self.memory.prepare(torch.promote_types(weight.dtype, torch.float32), weight.device)

    def _init_whitening(self, texts: Optional[Sequence[str]],
                        pairs: Optional[Sequence[Tuple[str, str]]] = None) -> None:
        hp = self.hparams
        if hp.whitening_texts:
            texts = read_texts(hp.whitening_texts)
        if not texts:
            raise ValueError("key_whitening: true needs key statistics: an archive trained with "
                             "it, 'whitening_texts' (a text file), or texts passed by the trainer")
        self.hypernet.set_whitening(compute_whitening(
            self.model, self.tok, self.modules, texts, hp.whitening_damping, hp.max_length,
            answer_pairs=pairs, answer_weight=float(hp.whitening_answer_weight),
            threads=int(hp.statistics_threads)))

    # -- the algorithm -------------------------------------------------
    @property
    def edited_param_names(self) -> List[str]:
        return [f"{n}.weight" for n in self.modules]

    def values(self, name: str, cap: Capture) -> torch.Tensor:
        """The hypernetwork's value changes ``D`` for one module's captured rows; rows whose
        answer token is already settled (``settled_prob``) get none."""
        d = self.hypernet.values(name, cap.keys[name], cap.grads[name])
        tau = self.hparams.settled_prob
        if tau is not None:
            d = d * (cap.target_prob < tau).to(d.dtype)[:, None]
        return d

    def settled(self, cap: Capture) -> bool:
        """Whether every answer token of ``cap`` is settled (``settled_prob``)."""
        tau = self.hparams.settled_prob
        return tau is not None and bool((cap.target_prob >= tau).all())

    def compute_update(self, records: Sequence[EditRecord], update_norm: Optional[bool] = None,
                       batch: Optional[Dict[str, torch.Tensor]] = None,
                       previous: Optional[Update] = None,
                       prefix: Optional[ForwardPrefix] = None) -> Update:
        """Capture on the current model and predict the low-rank update (no weight change).

        ``batch``: ``records`` already tokenised by ``edit_batch`` (later rounds reuse it).
        ``previous``: the last round's update of the same records; a module whose keys came
        back bit-identical (the first edited module in forward order: no edit precedes its
        input) reuses that round's whitened keys instead of two N x d_in x d_in products.
        ``prefix``: shared by the rounds of ``batch``; later rounds skip the part of the
        forward that precedes the first edited module (core/prefix.py).
        """
        hp = self.hparams
        if batch is None:
            check_records(records)
            batch = edit_batch(self.tok, records, hp.max_length, device=model_device(self.model))
        cap = capture(self.model, self.modules, batch, minibatch=hp.edit_minibatch, prefix=prefix)
        update_norm = hp.lifelong_norm if update_norm is None else update_norm
        keys, coeffs, values, factors, solve_keys, grams = {}, {}, {}, {}, {}, {}
        with torch.no_grad():
            for name in self.modules:
                k, g = cap.keys[name], cap.grads[name]
                if update_norm:
                    self.hypernet.update_norm(name, k, g)
                d = self.values(name, cap).to(k.dtype)   # an fp64 model: fp64 solve
                values[name] = d
                same_keys = previous is not None and torch.equal(previous.capture.keys[name], k)
                if self.memory is not None:      # P changes between batches, not between rounds
                    if same_keys:
                        keys[name], grams[name] = previous.keys[name], previous.grams[name]
                    else:
                        keys[name], grams[name] = self.memory.factors(name, k)
                    factors[name] = factor_gram(grams[name], self.hypernet.lam(name))
                    coeffs[name] = factors[name].solve(d)
                    continue
                s = self.hypernet.whitening(name)
                if s is None:
                    solve_keys[name] = keys[name] = k
                elif same_keys:
                    solve_keys[name], keys[name] = previous.solve_keys[name], previous.keys[name]
                else:
                    s = s.to(k.dtype)
                    solve_keys[name] = k @ s                        # whitened keys K S
                    keys[name] = solve_keys[name] @ s               # right factor K S^2
                coeffs[name], factors[name] = ridge_dual(solve_keys[name], d, self.hypernet.lam(name),
                                                         return_factor=True)
        return Update(keys, coeffs, cap, values, factors, solve_keys=solve_keys, grams=grams)

    def apply(self, update: Update, alpha: float = 1.0) -> None:
        """``W += alpha * dW`` for every edited module, in place, low rank."""
        with torch.no_grad():
            for name, module in self.modules.items():
                w = weight_view(module)                    # (d_out, d_in)
                # one layout whether C comes from the solve (column-major) or the journal, so a
                # rollback's replay runs the same GEMM and lands on the same bits
                left = update.coeffs[name].t().contiguous()
                apply_low_rank_(w, left, update.keys[name].contiguous(), alpha,
                                residual=self._residuals[name], path=self.hparams.kernel_path)

    def edit_rounds(self, records: Sequence[EditRecord], update_norm: Optional[bool] = None) -> List[Update]:
        """``edit_steps`` rounds of capture -> predict -> apply on ``records``; the updates, in order.

        Only the first round may update the normaliser: later rounds see the same records.
        If a round fails (a solver error, an interrupt), the rounds already applied are taken
        back and the normaliser restored before the error propagates (:meth:`_take_back`).
        """
        return self._rounds(records, update_norm, exact_undo=False)

    def _rounds(self, records, update_norm: Optional[bool], exact_undo: bool,
                norm_before: Optional[Dict[str, torch.Tensor]] = None) -> List[Update]:
        check_records(records)
        hp = self.hparams
        batch = edit_batch(self.tok, records, hp.max_length, device=model_device(self.model))
        prefix = (ForwardPrefix(self.model, self.modules, low_rank_head=True)
                  if hp.edit_steps > 1 and hp.reuse_prefix else None)
        norm_before = norm_state(self.hypernet) if norm_before is None else norm_before
        rounds = []
        try:
            for step in range(hp.edit_steps):
                update = self.compute_update(records, update_norm=update_norm if step == 0 else False,
                                             batch=batch, previous=rounds[-1] if rounds else None,
                                             prefix=prefix)
                if rounds and self.settled(update.capture):
                    break     # every D row is 0: this round and all after it would change nothing
                self.apply(update)
                rounds.append(update)
                if prefix is not None:
                    for name, module in self.modules.items():
                        prefix.applied(module, update.keys[name], update.coeffs[name])
        except BaseException:
            self._take_back(rounds, norm_before, exact_undo)
            raise
        if self.memory is not None:     # the last round's keys are the ones now written
            last = rounds[-1]
            for name in self.modules:
                self.memory.add(name, last.capture.keys[name], last.keys[name], last.grams[name])
        return rounds

    def _take_back(self, rounds: List[Update], norm: Dict[str, torch.Tensor], exact: bool) -> None:
        """Undo the applied ``rounds`` of a batch that failed part-way: ``exact`` (every earlier
        batch went through :meth:`edit` and its journal) by the pristine weights and the journal
        replayed, otherwise by applying each round negated in reverse order (equal up to rounding)."""
        if rounds and exact:
            self._rewind(list(self.journal), list(self._norm_history), norm)
            return
        for update in reversed(rounds):
            self.apply(update, alpha=-1.0)
        load_norm_state(self.hypernet, norm)

    def edit(self, records: Sequence[EditRecord]) -> dict:
        """Write ``records`` into the model (lifelong: accumulates, never reverts)."""
        norm_before = norm_state(self.hypernet)     # the journal's, and the undo's if a round fails
        rounds = self._rounds(records, None, exact_undo=self.keep_journal, norm_before=norm_before)
        if self.keep_journal:   # one journal entry per batch: the rounds' factors stacked row-wise
            first = next(iter(self.modules))
            self.journal.append(Update(
                {n: torch.cat([u.keys[n] for u in rounds]).cpu() for n in self.modules},
                {n: torch.cat([u.coeffs[n] for u in rounds]).cpu() for n in self.modules},
                rounds=[u.keys[first].shape[0] for u in rounds],
                memory_keys=None if self.memory is None else
                {n: rounds[-1].capture.keys[n].cpu() for n in self.modules}))
            self._norm_history.append(norm_before)
        return {"n_records": len(records), "n_rows": rounds[0].capture.n_rows,
                "loss_before": rounds[0].capture.loss,
                "round_losses": [u.capture.loss for u in rounds], "n_turns": len(self.journal)}

    # -- undo ----------------------------------------------------------
    def original_weights(self) -> Dict[str, torch.Tensor]:
        """Clones of the pristine edited weights, keyed by parameter name."""
        return {f"{n}.weight": w.clone() for n, w in self._pristine.items()}

    def restore(self, normaliser: bool = True) -> None:
        """Back to the pristine weights (and normaliser); the journal is cleared."""
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(self._pristine[name])
                if self._residuals[name] is not None:
                    self._residuals[name].zero_()
        if self.memory is not None:
            self.memory.reset()
        if normaliser:
            load_norm_state(self.hypernet, self._pristine_norm)
        self.journal.clear()
        self._norm_history.clear()

    def edit_state(self) -> dict:
        """Copies of what the edits so far changed: the edited weights, their residuals and the
        edit memory (not the normaliser, nor the journal); :meth:`load_edit_state` puts them back."""
        with torch.no_grad():
            return {"weights": {n: m.weight.detach().clone() for n, m in self.modules.items()},
                    "residuals": {n: r.clone() for n, r in self._residuals.items() if r is not None},
                    "memory": None if self.memory is None else self.memory.state()}

    def load_edit_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(state["weights"][name])
            for name, residual in state["residuals"].items():
                self._residuals[name].copy_(residual)
        if self.memory is not None:
            self.memory.load_state(state["memory"])

    def rollback(self, n: int = 1) -> None:
        """Undo the last ``n`` edit batches exactly: restore, then replay the rest in order."""
        if not self.keep_journal:
            raise RuntimeError("rollback needs keep_journal=True")
        if n < 0 or n > len(self.journal):
            raise ValueError(f"cannot roll back {n} of {len(self.journal)} edit batches")
        if n == 0:
            return
        self._rewind(self.journal[:-n], self._norm_history[:-n], self._norm_history[-n])

    def _rewind(self, keep: List[Update], history: List[dict], norm: Dict[str, torch.Tensor]) -> None:
        """Pristine weights, then the journal entries ``keep`` replayed exactly; normaliser ``norm``."""
        self.restore()
        device = model_device(self.model)
        for entry in keep:
            for update in entry.split_rounds():       # round by round: the same sums, bit for bit
                self.apply(Update({k: v.to(device) for k, v in update.keys.items()},
                                  {k: v.to(device) for k, v in update.coeffs.items()}))
            if self.memory is not None:               # the same Woodbury steps, in order
                for name, k in entry.memory_keys.items():
                    k = k.to(device)
                    self.memory.add(name, k, *self.memory.factors(name, k))
        self.journal, self._norm_history = list(keep), list(history)
        load_norm_state(self.hypernet, norm)

    def delta(self, name: str) -> torch.Tensor:
        """The accumulated ``dW`` (d_in, d_out) of one module, from the journal (fp32)."""
        if not self.keep_journal:
            raise RuntimeError("delta needs keep_journal=True (without a journal the editor does "
                               "not keep the factors it applied)")
        total = None
        for update in self.journal:
            part = update.keys[name].t() @ update.coeffs[name]
            total = part if total is None else total + part
        if total is None:
            d_in, d_out = io_dims(self.modules[name])
            return torch.zeros(d_in, d_out)
        return total
