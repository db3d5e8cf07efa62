"""Edit memory: later batches leave the keys of earlier edits alone (optional).

The ridge penalises the weight change through a Tikhonov matrix ``A``: the identity in
the paper, the key second moment with key whitening (core/whitening.py).  Neither knows
which keys were already edited, so a later batch whose keys overlap an earlier one's
moves its outputs too; over a long stream the earlier edits drift, and that drift is
most of what end-of-stream efficacy loses.  With ``edit_memory: c > 0`` every applied
batch's keys join the penalty,

    A_t = A_0 + c * sum_{s < t} K_s^T K_s,

so changing what an edited key reads out costs as much as ``c`` times that key's share
of the statistics (the ridge counterpart of keeping past edits' keys in MEMIT's
covariance).  The dual solve only needs ``P = A^-1``:

    R = K P,   C = (R K^T + e^lam I)^-1 D,   dW = R^T C       (rank <= N, as before)

and after each batch ``P`` takes the batch's keys by the Woodbury identity, using the
``R`` the last round already computed (``P`` is symmetric, so ``P K^T = R^T``):

    P <- P - R^T (I / c + R K^T)^-1 R                          (O(N d_in^2))

``c`` is relative to ``A_0``: to one average token of the key statistics with
whitening, to the identity without.  ``P`` costs one d_in x d_in matrix per edited
module, in the keys' dtype, plus its starting value for :meth:`EditMemory.reset`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor


class EditMemory:
    """``P_t = A_t^-1`` per edited module, grown by each applied batch's keys."""

    def __init__(self, weight: float, whitening: Callable[[str], Optional[Tensor]], dims: Dict[str, int]):
        """``whitening(name)``: the module's ``S`` or None; ``dims``: each module's ``d_in``."""
        if weight <= 0:
            raise ValueError(f"edit memory weight must be > 0, got {weight}")
        self.weight = float(weight)
        self._whitening, self._dims = whitening, dims
        self._start: Dict[str, Tensor] = {}
        self._now: Dict[str, Tensor] = {}

    def prepare(self, dtype: torch.dtype, device) -> None:
        """Build every module's ``P_0`` now (one d_in^3 product each with whitening: 1.1 s for
        d_in 3072 on one CPU thread), so that the first edit does not pay for it."""
        like = torch.empty(0, dtype=dtype, device=device)
        for name in self._dims:
            self._start_inverse(name, like)

    def _start_inverse(self, name: str, like: Tensor) -> Tensor:
        """``P_0``: ``S^2`` with whitening (``S = A_0^(-1/2)``), else the identity."""
        if name not in self._start:
            s = self._whitening(name)
            if s is None:
                p = torch.eye(self._dims[name], dtype=like.dtype, device=like.device)
            else:
                s = s.to(device=like.device, dtype=torch.float64)
                p = (s @ s).to(like.dtype)
            self._start[name] = p
        return self._start[name]

    def inverse(self, name: str, like: Tensor) -> Tensor:
        """``P_t`` of module ``name`` in ``like``'s dtype and device."""
        now = self._now.get(name)
        if now is None:
            now = self._now[name] = self._start_inverse(name, like).clone()
        elif now.dtype != like.dtype or now.device != like.device:   # keep what it holds
            now = self._now[name] = now.to(device=like.device, dtype=like.dtype)
        return now

    def factors(self, name: str, keys: Tensor) -> Tuple[Tensor, Tensor]:
        """``R = K P_t`` (the update's right factor) and the Gram matrix ``R K^T`` (no ridge)."""
        right = keys @ self.inverse(name, keys)
        return right, right @ keys.T

    def add(self, name: str, keys: Tensor, right: Tensor, gram: Tensor) -> None:
        """Woodbury: ``P <- P - R^T (I/c + K P K^T)^-1 R`` for ``R = K P``, ``gram = K P K^T``."""
        p = self.inverse(name, keys)
        x = (gram + gram.T) / 2
        x.diagonal().add_(1.0 / self.weight)
        chol, info = torch.linalg.cholesky_ex(x)
        if int(info) != 0:   # I/c + K P K^T is positive definite; failing means a broken P
            raise RuntimeError(f"edit memory of {name!r} lost positive definiteness")
        z = torch.linalg.solve_triangular(chol, right, upper=False)     # L^-1 R
        p.addmm_(z.T, z, alpha=-1.0)                                    # symmetric rank-N downdate

    def reset(self) -> None:
        """Back to ``P_0`` (the pristine weights' memory), in place: no new d_in x d_in buffers."""
        for name, now in self._now.items():
            now.copy_(self._start[name])          # copy_ converts dtype and device if they differ

    def state(self) -> Dict[str, Tensor]:
        """Copies of every module's current ``P_t``."""
        return {name: now.clone() for name, now in self._now.items()}

    def load_state(self, state: Dict[str, Tensor]) -> None:
        for name, p in state.items():
            self._now[name] = p.clone()
