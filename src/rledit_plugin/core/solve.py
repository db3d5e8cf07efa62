"""Ridge least squares from value changes to a weight change, in dual (N x N) form.

The hypernetwork predicts value changes D (N x d_out) for N key rows K (N x d_in).
The weight change is the ridge solution

    dW = (K^T K + e^lam I)^-1 K^T D                    (primal, d_in x d_in solve)
       = K^T (K K^T + e^lam I)^-1 D = K^T C            (dual,   N x N solve)

The two are identical (push-through identity), but the dual one costs O(N^2 d)
instead of O(d_in^3 + d_in^2 d_out) and never materialises dW: the update applied
to an nn.Linear weight W (d_out x d_in) is the rank <= N product `W += C^T K`.

Backward. Let M = K K^T + e^lam I and Gw = dLoss/d(dW) (d_in x d_out). Since
dW = K^T M^-1 D,
    dLoss/dD   = M^-1 K Gw                             (M is symmetric)
    dLoss/dlam = -e^lam <M^-1 K Gw, C>                 (d M^-1 / d lam = -e^lam M^-2)
so everything needed is KG = K @ Gw (N x d_out) and one more N x N solve with
the factorisation kept from the forward.

All functions are pure, work on any device, and in float32 or float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _ridge(lam: Tensor | float, like: Tensor) -> Tensor:
    """e^lam as a 0-d tensor of `like`'s dtype and device."""
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam.dim() != 0:
        raise ValueError(f"lam must be a scalar (0-d tensor or float), got shape {tuple(lam.shape)}")
    return lam.exp()


def _check_rows(K: Tensor, other: Tensor, what: str) -> None:
    if K.dim() != 2 or other.dim() != 2:
        raise ValueError(f"K and {what} must be 2-d, got {tuple(K.shape)} and {tuple(other.shape)}")
    if K.shape[0] != other.shape[0]:
        raise ValueError(f"K has {K.shape[0]} rows but {what} has {other.shape[0]}")


@dataclass(frozen=True)
class GramFactor:
    """M = K K^T + e^lam I, factorised once, reused by the backward solve.

    `cholesky` is the lower-triangular L with M = L L^T. When that factorisation fails
    numerically (e^lam far below the round-off of a rank-deficient K K^T, e.g. the same
    key twice in one batch), `pinv` holds M's pseudo-inverse instead: the minimum-norm
    solution, which for repeated keys with equal targets is the exact one.
    """

    matrix: Tensor
    cholesky: Tensor | None
    pinv: Tensor | None = None

    def solve(self, rhs: Tensor) -> Tensor:
        """M^-1 rhs."""
        if self.cholesky is not None:
            return torch.cholesky_solve(rhs, self.cholesky)
        return self.pinv @ rhs


def gram_factor(K: Tensor, lam: Tensor | float) -> GramFactor:
    """Build and factorise M = K K^T + e^lam I (N x N)."""
    if K.dim() != 2:
        raise ValueError(f"K must be 2-d (N, d_in), got shape {tuple(K.shape)}")
    return factor_gram(K @ K.T, lam)


def factor_gram(gram: Tensor, lam: Tensor | float) -> GramFactor:
    """Factorise M = gram + e^lam I for a given N x N Gram matrix (not modified)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the Gram matrix must be square, got shape {tuple(gram.shape)}")
    M = gram.clone()
    M.diagonal().add_(_ridge(lam, M))
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return GramFactor(matrix=M, cholesky=L)
    # not numerically positive definite: an LU solve can fail outright on an exactly
    # singular M, the symmetric pseudo-inverse (eigh) cannot
    return GramFactor(matrix=M, cholesky=None, pinv=torch.linalg.pinv(M, hermitian=True))


def ridge_dual(K: Tensor, D: Tensor, lam: Tensor | float, return_factor: bool = False):
    """C = (K K^T + e^lam I)^-1 D, so that dW = K^T C (d_in x d_out).

    K: (N, d_in) keys, D: (N, d_out) value changes, lam: scalar log-ridge.
    Returns C (N, d_out), or (C, GramFactor) with `return_factor=True` (the backward
    reuses the factor). Differentiable by autograd as well, but the trainer uses
    the explicit `ridge_dual_backward` below.
    """
    _check_rows(K, D, "D")
    factor = gram_factor(K, lam)
    C = factor.solve(D)
    return (C, factor) if return_factor else C


def ridge_dual_backward(
    K: Tensor,
    C: Tensor,
    KG: Tensor,
    lam: Tensor | float,
    factor: GramFactor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of the loss wrt D and lam, given KG = K @ dLoss/d(dW).

    K: (N, d_in), C: (N, d_out) from `ridge_dual`, KG: (N, d_out) (see
    `project_weight_grad` and `l2_term_kg`), lam: the same scalar as the forward,
    factor: the GramFactor from the forward (rebuilt when omitted).
    Returns dD (N, d_out) = M^-1 KG and dlam (0-d) = -e^lam <dD, C>.
    """
    _check_rows(K, C, "C")
    _check_rows(K, KG, "KG")
    if factor is None:
        factor = gram_factor(K, lam)
    dD = factor.solve(KG)
    dlam = -_ridge(lam, K) * (dD * C).sum()
    return dD, dlam


def project_weight_grad(K: Tensor, weight_grad_out_in: Tensor) -> Tensor:
    """KG = K @ Gw from a weight gradient stored as nn.Linear stores it.

    weight_grad_out_in: (d_out, d_in) = Gw^T, the `.grad` of an nn.Linear weight
    (for a GPT-2 Conv1D weight, whose grad is (d_in, d_out), pass its transpose).
    Returns K @ weight_grad_out_in.T (N, d_out) without forming Gw.
    """
    if weight_grad_out_in.dim() != 2 or weight_grad_out_in.shape[1] != K.shape[1]:
        raise ValueError(
            f"weight gradient must be (d_out, d_in={K.shape[1]}), got {tuple(weight_grad_out_in.shape)}"
        )
    return K @ weight_grad_out_in.to(K.dtype).T


def l2_term_kg(K: Tensor, C: Tensor, reg_coef: float) -> tuple[Tensor, Tensor]:
    """The L2 penalty reg_coef * ||dW||_F^2 with dW = K^T C, and its KG contribution.

    value = reg_coef * trace(C^T (K K^T) C)               (0-d)
    KG    = K @ (2 reg_coef dW) = 2 reg_coef (K K^T) C    (N, d_out)
    Add KG to the projected weight gradient before `ridge_dual_backward`. The Gram
    matrix is recomputed rather than taken from the factor: subtracting e^lam from
    M's diagonal would cancel catastrophically when e^lam dominates.
    """
    _check_rows(K, C, "C")
    gram_C = (K @ K.T) @ C
    value = reg_coef * (C * gram_C).sum()
    return value, (2.0 * reg_coef) * gram_C


def ridge_primal(K: Tensor, D: Tensor, lam: Tensor | float) -> Tensor:
    """dW = (K^T K + e^lam I)^-1 K^T D (d_in, d_out). VERIFICATION ONLY.

    The d_in x d_in form of the reference implementation: used by the tests and the
    benchmark to check `ridge_dual`; never call it on the editing path.
    """
    _check_rows(K, D, "D")
    A = K.T @ K
    A = A + _ridge(lam, K) * torch.eye(A.shape[0], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(A, K.T @ D)
