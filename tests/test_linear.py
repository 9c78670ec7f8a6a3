"""The matrix-free linear solvers of the backward pass (`il.linear`): dense oracles, per-sample
semantics, differentiability, the failure policy and validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
import implicitlayers.linear as L

F64 = torch.float64


def _matvec(A: torch.Tensor):
    return lambda x: torch.bmm(A, x[:, :, None])[:, :, 0]


def _spd(batch: int, dim: int, seed: int, dtype=F64) -> torch.Tensor:
    """Symmetric positive-definite with eigenvalues in about [0.5, 3]."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    Q, _ = torch.linalg.qr(M)
    eig = 0.5 + 2.5 * torch.rand(batch, dim, generator=gen, dtype=F64)
    return (Q * eig[:, None, :] @ Q.transpose(1, 2)).to(dtype)


def _contractive_shift(batch: int, dim: int, seed: int, dtype=F64, norm: float = 0.6) -> torch.Tensor:
    """Nonsymmetric `A = I − N` with ‖N‖₂ = norm, so the Neumann series converges too."""
    gen = torch.Generator().manual_seed(seed)
    N = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    N = norm * N / torch.linalg.matrix_norm(N, 2)[:, None, None]
    return (torch.eye(dim, dtype=F64) - N).to(dtype)


def _rhs(batch: int, dim: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)


NONSYMMETRIC = {
    "gmres": lambda **kw: L.GMRES(**kw),
    "gmres_restart_3": lambda **kw: L.GMRES(restart=3, **kw),
    "neumann": lambda **kw: L.Neumann(**kw),
    "dense": lambda **kw: L.Dense(**kw),
}
ALL = {"cg": lambda **kw: L.CG(**kw), **NONSYMMETRIC}


def _system(name: str, batch: int, dim: int, seed: int, dtype=F64):
    A = _spd(batch, dim, seed, dtype) if name == "cg" else _contractive_shift(batch, dim, seed, dtype)
    return A, _rhs(batch, dim, seed, dtype)


def _tol(dtype):
    return 1e-11 if dtype == F64 else 1e-5


# ------------------------------------------------------------------------------ dense oracles
@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(ALL)),
    batch=st.integers(1, 4),
    dim=st.integers(1, 24),
    dtype=st.sampled_from([torch.float32, F64]),
    seed=st.integers(0, 2**16),
)
def test_matches_a_dense_solve(name, batch, dim, dtype, seed):
    A, b = _system(name, batch, dim, seed, dtype)
    tol = _tol(dtype)
    x, info = ALL[name](tol=tol, max_iter=400).solve_linear(_matvec(A), b)
    assert bool(info.converged.all()) and info.residual.shape == (batch,)
    exact = torch.linalg.solve(A.double(), b.double()).to(dtype)
    # ‖x − x*‖ ≤ ‖A⁻¹‖ · tol · ‖b‖ with ‖A⁻¹‖ ≤ 2.5
    bound = 4 * tol * float(b.norm(dim=1).max()) + (1e-12 if dtype == F64 else 1e-5)
    torch.testing.assert_close(x, exact, rtol=0, atol=bound)


@pytest.mark.parametrize("name", sorted(ALL))
def test_warm_start_and_diagonal_preconditioner(name):
    A, b = _system(name, 3, 10, seed=1)
    exact = torch.linalg.solve(A, b)
    precond = torch.linspace(0.5, 1.0, 10, dtype=F64)
    x, info = ALL[name](tol=1e-11, max_iter=400).solve_linear(_matvec(A), b, exact + 1e-3, precond=precond)
    assert bool(info.converged.all())
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_right_hand_side_gives_zero(name):
    A, b = _system(name, 2, 5, seed=2)
    b[1] = 0
    x, info = ALL[name](tol=1e-10).solve_linear(_matvec(A), b, torch.ones_like(b))
    assert bool(info.converged.all())
    assert bool((x[1] == 0).all())


def test_gmres_handles_a_lucky_breakdown():
    # A = 2I: the Krylov space of b is one-dimensional, so the second Arnoldi vector is zero.
    b = _rhs(3, 6, seed=0)
    x, info = L.GMRES(tol=1e-12).solve_linear(lambda x: 2 * x, b)
    assert bool(info.converged.all()) and int(info.nstep.max()) == 1
    torch.testing.assert_close(x, b / 2, rtol=0, atol=1e-14)


def test_dense_works_with_matvecs_that_vmap_cannot_run():
    A, b = _system("dense", 2, 5, seed=3)
    A_np = A.numpy()

    def outside_torch(v):  # vmap cannot trace through NumPy: Dense falls back to one matvec per column
        return torch.from_numpy(np.einsum("bij,bj->bi", A_np, v.numpy()))

    x, info = L.Dense(tol=1e-12).solve_linear(outside_torch, b)
    assert info.nfe == 5 and bool(info.converged.all())
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=0, atol=1e-12)


def test_dense_materialises_autograd_vjps():
    A, b = _system("dense", 2, 5, seed=3)
    w = torch.zeros(2, 5, dtype=F64, requires_grad=True)
    with torch.enable_grad():
        out = torch.bmm(A, w[:, :, None])[:, :, 0]

    def vjp(v):  # the IFT adjoint's usual matvec
        return torch.autograd.grad(out, w, v, retain_graph=True)[0]

    x, info = L.Dense(tol=1e-12).solve_linear(vjp, b)
    assert bool(info.converged.all())
    torch.testing.assert_close(x, torch.linalg.solve(A.transpose(1, 2), b), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ per-sample semantics
@pytest.mark.parametrize("name", sorted(ALL))
def test_a_batch_solves_like_its_samples_alone(name):
    A, b = _system(name, 5, 12, seed=4)
    solver = ALL[name](tol=1e-10, max_iter=400)
    x, info = solver.solve_linear(_matvec(A), b)
    for i in range(5):
        xi, info_i = solver.solve_linear(_matvec(A[i : i + 1]), b[i : i + 1])
        torch.testing.assert_close(xi[0], x[i], rtol=0, atol=1e-12)
        assert int(info_i.nstep[0]) == int(info.nstep[i])


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_sample_whose_operator_is_nan_fails_alone(name):
    A, b = _system(name, 3, 6, seed=5)
    A[1, 2, 3] = float("nan")
    x, info = ALL[name](tol=1e-10, max_iter=300, on_failure="ignore").solve_linear(_matvec(A), b)
    assert info.converged.tolist() == [True, False, True]
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(x[keep], torch.linalg.solve(A[keep], b[keep]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "gmres", "neumann"])
def test_trace_records_the_residual_per_iteration(name):
    A, b = _system(name, 2, 8, seed=6)
    _, info = ALL[name](tol=1e-8, trace=True, max_iter=300).solve_linear(_matvec(A), b)
    trace = torch.stack(info.trace)
    assert trace.shape[1] == 2 and trace.shape[0] >= int(info.nstep.max())
    assert bool((trace[-1] <= 1e-8).all())


# ------------------------------------------------------------------------------ under autograd
@pytest.mark.parametrize("name", sorted(ALL))
def test_the_solution_is_differentiable_in_the_operator_and_the_rhs(name):
    # With create_graph (an IFT double backward) the solve itself is differentiated:
    # x = A⁻¹ b ⇒ ∂(1ᵀx)/∂b = A⁻ᵀ 1 and ∂(1ᵀx)/∂A = −(A⁻ᵀ 1) xᵀ.
    # CG only makes sense for symmetric A, so there A = (M + Mᵀ)/2 and the derivative is symmetrised.
    M, b = _system(name, 2, 6, seed=7)
    M, b = M.clone().requires_grad_(), b.clone().requires_grad_()
    sym = (lambda G: (G + G.transpose(1, 2)) / 2) if name == "cg" else (lambda G: G)
    with torch.enable_grad():
        A = sym(M)
        x, info = ALL[name](tol=1e-13, max_iter=400).solve_linear(_matvec(A), b)
        grad_M, grad_b = torch.autograd.grad(x.sum(), (M, b))
    lam = torch.linalg.solve(A.detach().transpose(1, 2), torch.ones_like(b))
    torch.testing.assert_close(grad_b, lam, rtol=0, atol=1e-8)
    torch.testing.assert_close(grad_M, sym(-lam[:, :, None] * x.detach()[:, None, :]), rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------ failure policy
def test_an_unconverged_solve_warns_with_the_facts():
    A, b = _system("gmres", 2, 30, seed=8)
    with pytest.warns(il.ConvergenceWarning, match=r"IFT backward of block 'z': 2/2 samples did not converge "
                                                    r"within max_iter=2 \(tol=1e-10\); worst residual [0-9.e-]+ at sample \d"):
        x, info = L.GMRES(tol=1e-10, max_iter=2).solve_linear(_matvec(A), b, name="IFT backward of block 'z'")
    assert not bool(info.converged.any()) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", sorted(ALL))
def test_failure_raises_when_asked(name):
    A, b = _system(name, 2, 12, seed=9)
    A[0] = 0.0  # singular: no solver can reach the tolerance on sample 0
    with pytest.raises(il.ConvergenceError, match=r"1/2 samples did not converge.*at sample 0\. Try: "):
        ALL[name](tol=1e-10, max_iter=80, on_failure="raise").solve_linear(_matvec(A), b)


def test_failure_is_silent_when_ignored():
    A, b = _system("neumann", 2, 12, seed=10)
    _, info = L.Neumann(tol=1e-10, max_iter=2, on_failure="ignore").solve_linear(_matvec(A), b)
    assert not bool(info.converged.any())


def test_cg_reports_an_indefinite_operator():
    A = torch.diag_embed(torch.tensor([[1.0, -1.0, 2.0]], dtype=F64))
    b = torch.ones(1, 3, dtype=F64)
    with pytest.warns(il.ConvergenceWarning, match="symmetric positive-definite"):
        x, info = L.CG(tol=1e-10).solve_linear(_matvec(A), b)
    # The breakdown ends the sample (reported non-finite) with its best iterate, the start x = 0.
    assert not bool(info.converged[0]) and int(info.status[0]) == int(il.Status.NONFINITE)
    assert bool((x == 0).all()) and float(info.residual[0]) == 1.0


def test_neumann_keeps_its_best_iterate_when_the_series_diverges():
    A = torch.diag_embed(torch.tensor([[3.0, 0.5]], dtype=F64))  # I − A has eigenvalue −2: divergent
    b = torch.ones(1, 2, dtype=F64)
    x, info = L.Neumann(tol=1e-10, max_iter=30, on_failure="ignore").solve_linear(_matvec(A), b)
    assert bool(torch.isfinite(x).all()) and not bool(info.converged[0])
    r = torch.bmm(A, x[:, :, None])[:, :, 0] - b
    torch.testing.assert_close(info.residual, r.norm(dim=1) / b.norm(dim=1))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("cls", [L.CG, L.GMRES, L.Neumann, L.Dense])
def test_linear_solvers_share_the_solver_options(cls):
    assert isinstance(cls(), il.solvers.SolverConfig)
    with pytest.raises(TypeError, match="restrt"):
        cls(restrt=5)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        cls(tol=0.0)
    with pytest.raises(ValueError, match="on_failure must be one of"):
        cls(on_failure="panic")


@pytest.mark.parametrize(
    "make, match",
    [(lambda: L.GMRES(restart=0), "restart must be an integer >= 1"), (lambda: L.Dense(max_dim=0), "max_dim")],
)
def test_invalid_options_are_a_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_matvec_of_the_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match=re.escape("matvec returned (2, 4) for an input of shape (2, 3)")):
        L.GMRES().solve_linear(lambda x: torch.zeros(2, 4), torch.ones(2, 3))


@pytest.mark.parametrize("b", [torch.ones(3), torch.ones(2, 3, 4), [[1.0, 2.0]], torch.ones(2, 3, dtype=torch.long)])
def test_rhs_must_be_a_floating_batch_of_vectors(b):
    with pytest.raises(TypeError, match=r"b must be a floating-point tensor of shape \(B, D\)"):
        L.CG().solve_linear(lambda x: x, b)


def test_mismatched_start_and_preconditioner_are_value_errors():
    b = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"x0 has shape \(2, 4\)"):
        L.Neumann().solve_linear(lambda x: x, b, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"precond has shape \(4,\)"):
        L.GMRES().solve_linear(lambda x: x, b, precond=torch.ones(4))


def test_cg_rejects_a_preconditioner_that_breaks_symmetry():
    with pytest.raises(ValueError, match="precond must be positive"):
        L.CG().solve_linear(lambda x: x, torch.ones(2, 3), precond=torch.tensor([1.0, -1.0, 1.0]))


def test_dense_refuses_large_systems():
    with pytest.raises(ValueError, match="D = 5 exceeds max_dim = 4.*GMRES"):
        L.Dense(max_dim=4).solve_linear(lambda x: x, torch.ones(2, 5))


def test_linear_is_reachable_from_the_package():
    assert il.linear.GMRES is L.GMRES
