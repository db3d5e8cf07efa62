"""Dual-form ridge solve and its explicit backward, checked against the primal
(d_in x d_in) solve differentiated by autograd, all in float64."""
import pytest
import torch

from rledit_plugin.core.solve import (
    GramFactor,
    gram_factor,
    l2_term_kg,
    project_weight_grad,
    ridge_dual,
    ridge_dual_backward,
    ridge_primal,
)

F64 = torch.float64
# (N, d_in, d_out): fewer rows than features, more rows than features, one row
SHAPES = [(5, 12, 7), (20, 6, 4), (1, 9, 3)]
LAMS = [0.0, -4.0, 3.0]


def _problem(N, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(N, d_in, generator=g, dtype=F64)
    D = torch.randn(N, d_out, generator=g, dtype=F64)
    Gw = torch.randn(d_in, d_out, generator=g, dtype=F64)  # dLoss/d(dW) of a linear loss
    return K, D, Gw


def _primal_grads(K, D, Gw, lam, reg_coef=0.0):
    """Autograd through the primal solve of loss = <Gw, dW> + reg ||dW||^2."""
    D = D.clone().requires_grad_(True)
    lam_t = torch.tensor(lam, dtype=F64, requires_grad=True)
    dW = ridge_primal(K, D, lam_t)
    loss = (Gw * dW).sum() + reg_coef * dW.pow(2).sum()
    loss.backward()
    return dW.detach(), D.grad, lam_t.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", LAMS)
def test_dual_equals_primal(shape, lam):
    K, D, _ = _problem(*shape)
    C = ridge_dual(K, D, torch.tensor(lam, dtype=F64))
    assert C.shape == (shape[0], shape[2])
    torch.testing.assert_close(K.T @ C, ridge_primal(K, D, lam), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", LAMS)
def test_backward_equals_autograd_through_primal(shape, lam):
    K, D, Gw = _problem(*shape, seed=1)
    _, dD_ref, dlam_ref = _primal_grads(K, D, Gw, lam)

    C, factor = ridge_dual(K, D, lam, return_factor=True)
    dD, dlam = ridge_dual_backward(K, C, K @ Gw, lam, factor=factor)
    torch.testing.assert_close(dD, dD_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dlam, dlam_ref, rtol=1e-9, atol=1e-11)
    assert dlam.dim() == 0

    # without a factor it is rebuilt and gives the same answer
    dD2, dlam2 = ridge_dual_backward(K, C, K @ Gw, lam)
    torch.testing.assert_close(dD2, dD, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dlam2, dlam, rtol=1e-12, atol=1e-14)


def test_project_weight_grad_uses_linear_layout():
    K, _, Gw = _problem(6, 10, 4, seed=2)
    weight_grad = Gw.T.contiguous()  # nn.Linear stores (d_out, d_in)
    torch.testing.assert_close(project_weight_grad(K, weight_grad), K @ Gw)
    # ...and it is the right gradient: an nn.Linear edited as W += dW^T
    lin = torch.nn.Linear(10, 4, bias=False, dtype=F64)
    x = torch.randn(3, 10, dtype=F64)
    lin(x).pow(2).sum().backward()
    dW = torch.zeros(10, 4, dtype=F64, requires_grad=True)  # (d_in, d_out)
    (x @ (lin.weight.detach().T + dW)).pow(2).sum().backward()
    torch.testing.assert_close(project_weight_grad(K, lin.weight.grad), K @ dW.grad)
    with pytest.raises(ValueError, match="d_in=10"):
        project_weight_grad(K, Gw)  # (d_in, d_out) passed by mistake


@pytest.mark.parametrize("shape", SHAPES)
def test_l2_term_value_and_gradient(shape):
    K, D, Gw = _problem(*shape, seed=3)
    lam, reg = 0.5, 0.3
    dW_ref, dD_ref, dlam_ref = _primal_grads(K, D, Gw, lam, reg_coef=reg)

    C, factor = ridge_dual(K, D, lam, return_factor=True)
    value, kg_l2 = l2_term_kg(K, C, reg)
    torch.testing.assert_close(value, reg * dW_ref.pow(2).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kg_l2, K @ (2 * reg * dW_ref), rtol=1e-10, atol=1e-12)

    dD, dlam = ridge_dual_backward(K, C, K @ Gw + kg_l2, lam, factor=factor)
    torch.testing.assert_close(dD, dD_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dlam, dlam_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("lam", [0.0, -3.0])
def test_rank_deficient_keys(lam):
    """Duplicate rows make K K^T singular; the ridge keeps M invertible."""
    K, D, Gw = _problem(4, 8, 5, seed=4)
    K = torch.cat([K, K[:2], K[:1]])  # 7 rows, rank 4
    D = torch.cat([D, torch.randn(3, 5, dtype=F64)])
    dW_ref, dD_ref, dlam_ref = _primal_grads(K, D, Gw, lam)

    C, factor = ridge_dual(K, D, lam, return_factor=True)
    assert factor.cholesky is not None
    torch.testing.assert_close(K.T @ C, dW_ref, rtol=1e-9, atol=1e-11)
    dD, dlam = ridge_dual_backward(K, C, K @ Gw, lam, factor=factor)
    torch.testing.assert_close(dD, dD_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dlam, dlam_ref, rtol=1e-8, atol=1e-10)


def test_large_lambda_shrinks_to_scaled_gradient_step():
    """For e^lam >> ||K||^2, dW -> e^-lam K^T D; still exact against the primal."""
    K, D, Gw = _problem(6, 10, 3, seed=5)
    lam = 25.0
    C = ridge_dual(K, D, lam)
    torch.testing.assert_close(K.T @ C, ridge_primal(K, D, lam), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(K.T @ C, torch.exp(torch.tensor(-lam, dtype=F64)) * (K.T @ D),
                               rtol=1e-6, atol=0.0)
    _, dD_ref, dlam_ref = _primal_grads(K, D, Gw, lam)
    dD, dlam = ridge_dual_backward(K, C, K @ Gw, lam)
    torch.testing.assert_close(dD, dD_ref, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(dlam, dlam_ref, rtol=1e-8, atol=0.0)


def test_small_lambda_interpolates_on_full_row_rank():
    """N < d_in and e^lam -> 0: dW solves K dW = D (minimum-norm interpolation)."""
    K, D, _ = _problem(4, 10, 3, seed=6)
    C = ridge_dual(K, D, -20.0)
    torch.testing.assert_close(K @ (K.T @ C), D, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(K.T @ C, torch.linalg.pinv(K) @ D, rtol=1e-6, atol=1e-8)


def test_cholesky_failure_falls_back_to_the_pseudo_inverse():
    K = torch.ones(3, 4, dtype=F64)  # rank 1; lam = -inf removes the ridge entirely
    singular = gram_factor(K, float("-inf"))
    assert singular.cholesky is None and singular.pinv is not None
    # a factor without Cholesky still solves a well-posed system exactly
    K, D, Gw = _problem(5, 8, 2, seed=7)
    good = gram_factor(K, 0.0)
    fallback = GramFactor(matrix=good.matrix, cholesky=None, pinv=torch.linalg.pinv(good.matrix, hermitian=True))
    torch.testing.assert_close(fallback.solve(D), good.solve(D), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_repeated_keys_with_a_vanishing_ridge_give_the_minimum_norm_update(dtype):
    """The same record twice in one batch: K K^T + e^lam I is singular to working precision
    once e^lam is tiny (an LU solve raised here). The update is still the minimum-norm
    interpolation, computed independently in float64 from K's pseudo-inverse."""
    K, D, _ = _problem(4, 10, 3, seed=9)
    K, D = torch.cat([K, K[:2]]), torch.cat([D, D[:2]])     # rows 4, 5 repeat rows 0, 1
    C, factor = ridge_dual(K.to(dtype), D.to(dtype), -60.0, return_factor=True)
    assert factor.cholesky is None and torch.isfinite(C).all()
    reference = torch.linalg.pinv(K) @ D
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    torch.testing.assert_close((K.to(dtype).T @ C).double(), reference, **tol)


def test_float32_matches_float64_and_autograd_through_dual():
    K, D, Gw = _problem(30, 40, 16, seed=8)
    C64 = ridge_dual(K, D, 0.0)
    C32 = ridge_dual(K.float(), D.float(), torch.tensor(0.0))
    assert C32.dtype == torch.float32
    torch.testing.assert_close(C32.double(), C64, rtol=1e-3, atol=1e-4)
    # the dual forward is also autograd-transparent (lam as a parameter)
    lam = torch.tensor(0.2, dtype=F64, requires_grad=True)
    Dg = D.clone().requires_grad_(True)
    C = ridge_dual(K, Dg, lam)
    (Gw * (K.T @ C)).sum().backward()
    dD, dlam = ridge_dual_backward(K, C.detach(), K @ Gw, lam.detach())
    torch.testing.assert_close(Dg.grad, dD)
    torch.testing.assert_close(lam.grad, dlam)


def test_shape_errors_are_clear():
    K = torch.randn(4, 6, dtype=F64)
    with pytest.raises(ValueError, match="K has 4 rows but D has 3"):
        ridge_dual(K, torch.randn(3, 2, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        ridge_dual(K, torch.randn(4, 2, dtype=F64), torch.zeros(2))
