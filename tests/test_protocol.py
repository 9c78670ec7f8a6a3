"""The public solver protocols (`il.solvers.Solver`, `LinearSolver`, `IterativeMethod`), `WritesInto`, and
the linear solvers on the shared loop: what a user-written solver may rely on."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
import implicitlayers.linear as L
from implicitlayers.solvers import IterativeMethod, IterativeSolver, LinearSolver, Solver, Status, WritesInto

F64 = torch.float64


def _contractive(batch: int, dim: int, seed: int, norm: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """`A = I − N` with ‖N‖₂ = norm (nonsymmetric) and a right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    N = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    N = norm * N / torch.linalg.matrix_norm(N, 2)[:, None, None]
    return torch.eye(dim, dtype=F64) - N, torch.randn(batch, dim, generator=gen, dtype=F64)


def _matvec(A: torch.Tensor):
    return lambda x: torch.bmm(A, x[:, :, None])[:, :, 0]


# ------------------------------------------------------------------------------ who satisfies what
@pytest.mark.parametrize("solver", [il.Anderson(), il.Broyden(), il.FixedPointIteration(), il.ScipyRoot()],
                         ids=lambda s: type(s).__name__)
def test_the_nonlinear_solvers_satisfy_the_solver_protocol(solver):
    assert isinstance(solver, Solver)


@pytest.mark.parametrize("solver", [L.CG(), L.GMRES(), L.Neumann(), L.Dense(), il.Anderson(), il.Broyden()],
                         ids=lambda s: type(s).__name__)
def test_the_linear_solvers_satisfy_the_linear_protocol(solver):
    assert isinstance(solver, LinearSolver)


def test_krylov_and_direct_solvers_are_not_nonlinear_solvers():
    # CG, GMRES and Dense need a matvec: offering them as a forward solver is a clear TypeError.
    for solver in (L.CG(), L.GMRES(), L.Dense()):
        assert not isinstance(solver, Solver)
        with pytest.raises(TypeError, match="solver must be an implicitlayers solver"):
            il.fixed_point(lambda z: 0.5 * z, torch.ones(2, 3), solver=solver)


def test_the_iterative_solvers_are_iterative_methods():
    assert isinstance(il.Anderson(), IterativeMethod) and isinstance(il.Broyden(), IterativeMethod)
    assert not isinstance(il.ScipyRoot(), IterativeMethod)


# ------------------------------------------------------------------------------ a user's solver
class HalvingPicard:
    """A solver written against the protocol only (no base class): Picard with step 1/2, a fixed count."""

    def solve(self, residual_fn, w0, *, precond=None, name="solve", hints=None, scale_rows=None):
        w = w0
        for _ in range(60):
            w = w - 0.5 * residual_fn(w)
        r = torch.linalg.vector_norm(residual_fn(w), dim=1)
        info = il.SolveInfo(nstep=torch.full_like(r, 60, dtype=torch.long), residual=r, converged=r <= 1e-6, nfe=61)
        return w, info


def test_a_solver_that_only_follows_the_protocol_runs_fixed_point_and_root():
    assert isinstance(HalvingPicard(), Solver)
    b = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    fp = il.fixed_point(lambda z: 0.5 * z + b, torch.zeros(2, 2, dtype=F64), solver=HalvingPicard())
    torch.testing.assert_close(fp.value, 2 * b)  # z = z/2 + b ⇒ z = 2b
    rt = il.root(lambda z: z - b, torch.zeros(2, 2, dtype=F64), solver=HalvingPicard())
    torch.testing.assert_close(rt.value, b)
    assert bool(fp.info.converged.all()) and bool(rt.info.converged.all())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Richardson(IterativeSolver):
    """A user's `IterativeMethod` by subclassing: `w ← w − ω ⊙ R(w)` with a per-sample step `ω`."""

    omega: float = 0.5

    def init(self, fn, w, r, precond):
        return SimpleNamespace(w=w, r=r)

    def step(self, fn, state, frozen):
        size = torch.full_like(state.w[:, :1], self.omega)
        if frozen is not None:
            size = torch.where(frozen[:, None], 0.0, size)
        w = state.w - size * state.r
        return SimpleNamespace(w=w, r=fn(w))


def test_a_subclass_of_iterative_solver_gets_the_loop_and_a_linear_solve():
    A, b = _contractive(3, 6, seed=1)
    solver = Richardson(omega=1.0, tol=1e-12, max_iter=400)
    x, info = solver.solve_linear(_matvec(A), b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    assert bool(info.converged.all()) and info.status.tolist() == [int(Status.CONVERGED)] * 3
    # Every solve of the package measures a linear solve relative to ‖b‖.
    torch.testing.assert_close(info.residual, (torch.bmm(A, x[:, :, None])[:, :, 0] - b).norm(dim=1) / b.norm(dim=1))


def test_the_loop_freezes_a_users_samples_one_by_one():
    # Sample 0 starts at its solution: its iterate must never change while sample 1 iterates.
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    calls = []

    def residual(w):
        calls.append(w.clone())
        return w - b

    w, info = Richardson(omega=0.5, tol=1e-10, max_iter=200, stop="abs").solve(residual, torch.zeros(2, 2, dtype=F64))
    assert int(info.nstep[0]) == 0 and int(info.nstep[1]) > 10
    assert all(bool((c[0] == 0).all()) for c in calls)
    torch.testing.assert_close(w, b, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------ WritesInto
def test_writes_into_is_called_with_out_only_where_declared():
    # Anderson offers its history slot: a plain function never receives it (it would fail here) ...
    def plain(w):
        return 0.5 * w - 1.0

    z = il.fixed_point(plain, torch.zeros(2, 3, dtype=F64), solver=il.Anderson(tol=1e-12, max_iter=60))
    torch.testing.assert_close(z.value, torch.full((2, 3), -2.0, dtype=F64))
    # ... while a WritesInto wrapper is called with out= and its writes give the same answer.
    seen = []

    def into(w, out=None):
        seen.append(out is not None)
        return torch.sub(w, 0.5 * w - 1.0, out=out)

    with torch.no_grad():
        w, info = il.Anderson(tol=1e-12, max_iter=60).solve(WritesInto(into), torch.zeros(2, 3, dtype=F64))
    assert any(seen) and bool(info.converged.all())
    torch.testing.assert_close(w, torch.full((2, 3), -2.0, dtype=F64))


def test_writes_into_needs_a_callable():
    with pytest.raises(TypeError, match="WritesInto: fn must be callable"):
        WritesInto(3)


# ------------------------------------------------------------------------------ linear solvers on the loop
LOOPED = {
    "cg": lambda **kw: L.CG(**kw),
    "gmres": lambda **kw: L.GMRES(**kw),
    "gmres_restart_2": lambda **kw: L.GMRES(restart=2, **kw),
    "neumann": lambda **kw: L.Neumann(**kw),
    "anderson": lambda **kw: il.Anderson(**kw),
}


def _system_for(name: str, seed: int):
    A, b = _contractive(3, 7, seed)
    return ((A + A.transpose(1, 2)) / 2 if name == "cg" else A), b  # (I − sym N is SPD for ‖N‖ < 1)


@pytest.mark.parametrize("name", sorted(LOOPED))
@pytest.mark.parametrize("warm", [False, True], ids=["zero start", "warm start"])
def test_nfe_counts_every_matvec(name, warm):
    A, b = _system_for(name, seed=2)
    calls = []

    def matvec(x):
        calls.append(1)
        return _matvec(A)(x)

    x0 = torch.full_like(b, 0.1) if warm else None
    _, info = LOOPED[name](tol=1e-10, max_iter=300).solve_linear(matvec, b, x0)
    assert bool(info.converged.all()) and info.nfe == len(calls)


@pytest.mark.parametrize("name", sorted(LOOPED))
def test_the_status_of_a_linear_solve_comes_from_the_loop(name):
    A, b = _system_for(name, seed=3)
    _, info = LOOPED[name](tol=1e-12, max_iter=2, on_failure="ignore").solve_linear(_matvec(A), b)
    assert info.status.tolist() == [int(Status.MAX_ITER)] * 3 and info.nstep.tolist() == [2, 2, 2]


def test_a_divergent_neumann_series_is_reported_diverged():
    A = torch.diag_embed(torch.tensor([[3.0, 0.5], [0.5, 0.5]], dtype=F64))  # sample 0: I − A has eigenvalue −2
    b = torch.ones(2, 2, dtype=F64)
    with pytest.warns(il.ConvergenceWarning, match="1/2 samples did not converge.*spectral radius"):
        x, info = L.Neumann(tol=1e-10, max_iter=100).solve_linear(_matvec(A), b)
    assert info.status.tolist() == [int(Status.DIVERGED), int(Status.CONVERGED)]
    torch.testing.assert_close(x[1], torch.full((2,), 2.0, dtype=F64))


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(LOOPED)), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**16))
def test_rel_measures_against_b_so_scaling_b_changes_no_step(name, scale, seed):
    # ‖A x − b‖ / ‖b‖ is invariant to b ↦ c b (and x ↦ c x): the same steps, the same measure.
    A, b = _system_for(name, seed)
    solver = LOOPED[name](tol=1e-9, max_iter=300)
    x, info = solver.solve_linear(_matvec(A), b)
    xs, info_s = solver.solve_linear(_matvec(A), scale * b)
    assert info.nstep.tolist() == info_s.nstep.tolist()
    torch.testing.assert_close(info_s.residual, info.residual, rtol=1e-5, atol=1e-14)
    torch.testing.assert_close(xs / scale, x, rtol=1e-7, atol=1e-12)
