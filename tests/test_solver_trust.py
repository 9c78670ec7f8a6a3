"""No silent wrong answer from the solvers (issue 12: items 6, 7, 8, 9; issue 13: mixed precision,
option validation, warnings that name the user's line).

Each test states the property; the ones marked "main:" failed on the code before this change.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers.solvers import Status, apply_failure_policy

F64 = torch.float64
SOLVERS = {
    "picard": il.FixedPointIteration,
    "anderson": il.Anderson,
    "broyden": il.Broyden,
}


def _linear_map(batch: int, dim: int, dtype: torch.dtype, seed: int, norm: float = 0.7):
    """`f(z) = A z + b` per sample with ‖A‖₂ = norm, and its fixed point `(I − A)⁻¹ b` (in float64)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    A = norm * A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    b = torch.randn(batch, dim, generator=gen, dtype=F64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=F64) - A, b)
    A, b = A.to(dtype), b.to(dtype)
    return (lambda z: torch.baddbmm(b[:, :, None], A, z[:, :, None])[:, :, 0]), exact


def _residual_norm(R, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return R(w).norm(dim=1)


# ------------------------------------------------------------------------------ item 6: the best iterate
def test_a_diverging_map_hands_back_its_start_and_says_it_diverged():
    # main: z ← 2z + 1 from 0 returned |z| ≈ 1e15 as "best" (‖R‖/‖w‖ → 1/2 rewards growth).
    z0 = torch.zeros(2, 3, dtype=F64)
    sol = il.fixed_point(lambda z: 2 * z + 1, z0, solver=il.FixedPointIteration(on_failure="ignore"))
    torch.testing.assert_close(sol.value, z0, rtol=0, atol=0)
    assert sol.info.causes == ["diverged", "diverged"]
    assert int(sol.info.nstep.max()) < 50  # stopped by the guard, not by the cap


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(SOLVERS)),
    stop=st.sampled_from(["rel", "abs"]),
    norm=st.floats(1.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_a_failed_sample_never_ends_above_its_start(name, stop, norm, seed):
    # Property: whatever the map (here expanding, often without a reachable fixed point), a sample that
    # did not converge is returned at a residual norm no higher than its start's.
    f, _ = _linear_map(3, 4, F64, seed, norm=norm)
    z0 = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    sol = il.fixed_point(f, z0, solver=SOLVERS[name](stop=stop, tol=1e-12, max_iter=30, on_failure="ignore"))
    R = lambda z: z - f(z)  # noqa: E731
    failed = ~sol.info.converged
    assert bool((_residual_norm(R, sol.value)[failed] <= _residual_norm(R, z0)[failed] * (1 + 1e-12)).all())


# ------------------------------------------------------------------------------ item 7 and issue 13: low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_half_precision_from_a_zero_start_iterates_to_the_solution(name, dtype):
    # main: float16 did not iterate at all (the 1e-8 guard of ‖R‖/(‖w‖ + 1e-8) rounded to 0 → inf);
    # Anderson raised "lu_cpu" not implemented for 'BFloat16'.
    f, exact = _linear_map(4, 8, dtype, seed=3, norm=0.5)
    sol = il.fixed_point(f, torch.zeros(4, 8, dtype=dtype), solver=SOLVERS[name](tol=2e-2))
    assert sol.info.causes == ["converged"] * 4 and bool((sol.info.nstep > 0).all())
    assert sol.value.dtype == dtype
    # rel tol 2e-2 on a map with ‖(I − A)⁻¹‖ ≤ 2, plus the dtype's rounding
    error = (sol.value.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(error.max()) < 0.1


_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5, torch.float64: 1e-10}


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(SOLVERS)),
    dtype=st.sampled_from(sorted(_TOL, key=str)),
    batch=st.integers(1, 4),
    dim=st.integers(1, 10),
    norm=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**16),
)
def test_every_solver_and_dtype_reaches_the_fixed_point_of_a_contraction(name, dtype, batch, dim, norm, seed):
    # Property: on z = A z + b with ‖A‖ ≤ 0.6 every solver converges, in every floating dtype, to
    # (I − A)⁻¹ b within what the tolerance and the dtype allow (‖(I − A)⁻¹‖ ≤ 2.5).
    f, exact = _linear_map(batch, dim, dtype, seed, norm=norm)
    tol = _TOL[dtype]
    sol = il.fixed_point(f, torch.zeros(batch, dim, dtype=dtype), solver=SOLVERS[name](tol=tol, max_iter=200))
    assert sol.info.causes == ["converged"] * batch and sol.value.dtype == dtype
    error = (sol.value.double() - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-3)
    assert float(error.max()) <= 2.5 * tol + 20 * torch.finfo(dtype).eps


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "unrolled"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_run_under_autocast(name, grad):
    # main: Anderson under CPU autocast raised ("lu_cpu" not implemented for 'BFloat16') when solving
    # under autograd (Unroll). The solver's own arithmetic stays in float32; the map runs in bfloat16.
    gen = torch.Generator().manual_seed(4)
    W = (0.5 * torch.randn(8, 8, generator=gen) / 8**0.5).requires_grad_(grad)
    x = torch.randn(4, 8, generator=gen)
    seen = []

    def residual(z):
        out = torch.nn.functional.linear(z, W)  # a matmul: autocast runs it in bfloat16
        seen.append(out.dtype)
        return z - torch.tanh(out + x)

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        w, info = SOLVERS[name](tol=1e-2).solve(residual, torch.zeros(4, 8))
    assert info.all_converged and torch.bfloat16 in seen and w.dtype == torch.float32
    assert w.requires_grad == grad
    exact = il.fixed_point(lambda z: torch.tanh(z @ W.detach().T + x), torch.zeros(4, 8), solver=il.Anderson(tol=1e-6)).value
    assert float(((w.detach() - exact).norm(dim=1) / exact.norm(dim=1)).max()) < 0.05


@pytest.mark.parametrize("entry", ["fixed_point", "root"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_map_returning_another_dtype_is_solved_in_the_start_dtype(name, entry):
    # main: Picard returned float64 for a float32 start, Broyden raised a bare torch dtype error.
    if entry == "fixed_point":
        sol = il.fixed_point(lambda z: (0.5 * z + 1).double(), torch.zeros(2, 3), solver=SOLVERS[name](tol=1e-6))
    else:
        sol = il.root(lambda z: (0.5 * z - 1).double(), torch.zeros(2, 3), solver=SOLVERS[name](tol=1e-6))
    assert sol.value.dtype == torch.float32
    torch.testing.assert_close(sol.value, torch.full((2, 3), 2.0))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_float16_residual_norms_beyond_its_range_still_converge(name):
    # ‖R(0)‖ = 3e4 · 8 = 2.4e5 overflows float16 (max 65504): norms are taken in float32.
    b = torch.full((2, 64), 3e4, dtype=torch.float16)
    sol = il.root(lambda z: z - b, torch.zeros(2, 64, dtype=torch.float16), solver=SOLVERS[name](tol=1e-2))
    assert sol.info.all_converged
    torch.testing.assert_close(sol.value.float(), b.float(), rtol=1e-3, atol=0)


def test_the_stopping_measure_of_a_zero_start_is_finite_in_float16():
    from implicitlayers.solvers._loop import stopping_measure

    r, w = torch.ones(2, 3, dtype=torch.float16), torch.zeros(2, 3, dtype=torch.float16)
    assert bool(torch.isfinite(stopping_measure(r, w, "rel")).all())
    assert bool(torch.isfinite(stopping_measure(300 * r, w, "abs")).all())  # 300² overflows float16


# ------------------------------------------------------------------------------ item 8: Broyden at its defaults
def _kkt_layer(solver):
    """The linear-quadratic KKT block of docs/concepts/kkt.md: z ∈ ℝ⁶ = A z + B x, x ∈ ℝ³ minimises
    ½‖z − y‖² + ½ρ‖x‖² through z (15 unknowns a sample), and its closed-form x*."""
    gen = torch.Generator().manual_seed(0)
    n, k, rho = 6, 3, 0.1
    A = 0.4 * torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
    B = torch.randn(n, k, generator=gen, dtype=F64)
    y = torch.randn(4, n, generator=gen, dtype=F64)
    z, x, target = il.Variable("z"), il.Variable("x"), il.Input("y")
    problem = il.Problem([
        il.FixedPoint(z, lambda z, x: z @ A.T + x @ B.T, (z, x)),
        il.Minimize(x, lambda z, y, x: 0.5 * ((z - y) ** 2).sum(1) + 0.5 * rho * (x**2).sum(1), (z, target, x),
                    step_size=0.2),
    ])
    layer = il.ImplicitLayer(problem, [target], [x, z], solver=solver, init={"z": torch.zeros(n), "x": torch.zeros(k)})
    G = torch.linalg.solve(torch.eye(n, dtype=F64) - A, B)
    return layer, y, torch.linalg.solve(G.T @ G + rho * torch.eye(k, dtype=F64), G.T @ y.T).T


def test_broyden_solves_the_kkt_block_at_its_default_memory():
    # main: 0/4 samples reached tol 1e-11 with memory=20 (the wrapped memory broke the secant pairs).
    layer, y, x_true = _kkt_layer(il.Broyden(tol=1e-11))
    sol = layer.solve(y)
    (info,) = sol.info.values()
    assert info.all_converged and int(info.nstep.max()) <= 30  # ≤ 2n for a linear problem, n = 15
    torch.testing.assert_close(sol["x"], x_true, rtol=0, atol=1e-9)


def test_broyden_solves_the_kkt_block_when_its_memory_wraps():
    # memory=20 < 30 steps: dropping the oldest pair must keep the method working.
    layer, y, x_true = _kkt_layer(il.Broyden(memory=20, tol=1e-11))
    sol = layer.solve(y)
    assert all(info.all_converged for info in sol.info.values())
    torch.testing.assert_close(sol["x"], x_true, rtol=0, atol=1e-9)


def _gradient_problem(kind: str, seed: int):
    """A `Minimize` block at the solver level: the residual is ∇L, the preconditioner the step size."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "least_squares":  # 20 unknowns, 30 observations, Minimize(step_size=0.1)
        A = torch.randn(4, 30, 20, generator=gen, dtype=F64) / 30**0.5
        b = torch.randn(4, 30, generator=gen, dtype=F64)
        exact = torch.linalg.lstsq(A, b[:, :, None]).solution[:, :, 0]
        R = lambda x: torch.bmm(A.mT, (torch.bmm(A, x[:, :, None])[:, :, 0] - b)[:, :, None])[:, :, 0]  # noqa: E731
        return R, torch.zeros(4, 20, dtype=F64), torch.full((20,), 0.1, dtype=F64), exact
    # a convex bowl ½xᵀQx − bᵀx, 20 variables, eigenvalues 1 … 1e3, step size 1e-3
    Q, _ = torch.linalg.qr(torch.randn(4, 20, 20, generator=gen, dtype=F64))
    Q = Q @ torch.diag_embed(torch.logspace(0, 3, 20, dtype=F64).expand(4, 20)) @ Q.mT
    b = torch.randn(4, 20, generator=gen, dtype=F64)
    exact = torch.linalg.solve(Q, b)
    return (lambda x: torch.bmm(Q, x[:, :, None])[:, :, 0] - b), torch.zeros(4, 20, dtype=F64), \
        torch.full((20,), 1e-3, dtype=F64), exact


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["least_squares", "bowl"])
def test_broyden_defaults_solve_small_gradient_systems(kind, seed):
    # main: 0/4 (least squares with step 0.1; a bowl of condition number 1e3) at the defaults.
    R, x0, step, exact = _gradient_problem(kind, seed)
    with torch.no_grad():
        x, info = il.Broyden().solve(R, x0, precond=step)
    assert info.all_converged
    # rel tol 1e-4 on ‖∇L‖/‖x‖; the Hessian's smallest eigenvalue bounds the error
    torch.testing.assert_close(x, exact, rtol=0, atol=0.05 * float(exact.norm(dim=1).max()))


def _rosenbrock_gradient(x: torch.Tensor) -> torch.Tensor:
    t = x[:, 1:] - x[:, :-1] ** 2
    g = torch.zeros_like(x)
    g[:, :-1] += -400 * x[:, :-1] * t - 2 * (1 - x[:, :-1])
    g[:, 1:] += 200 * t
    return g


def test_broyden_defaults_find_the_rosenbrock_minimum_from_nearby():
    # 20 variables, 24 starts within 0.1 of the minimum (1, …, 1); step size 1e-3. main: 8/24 at the defaults.
    x0 = 1 + 0.1 * torch.randn(24, 20, dtype=F64, generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        x, info = il.Broyden().solve(_rosenbrock_gradient, x0, precond=torch.full((20,), 1e-3, dtype=F64))
    assert info.all_converged
    torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-3)


def test_broyden_far_from_the_rosenbrock_minimum_is_flagged_not_silent():
    # From the classic start (−1.2, 1, …) no default solve reaches the minimum in 50 steps (main: it
    # turned non-finite at step 33); it must say so, and hand back a finite iterate.
    x0 = torch.tensor([-1.2, 1.0], dtype=F64).repeat(10)[None].repeat(2, 1)
    with pytest.warns(il.ConvergenceWarning, match="stalled|iteration cap"):
        with torch.no_grad():
            x, info = il.Broyden().solve(_rosenbrock_gradient, x0, precond=torch.full((20,), 1e-3, dtype=F64))
    assert not info.all_converged and bool(torch.isfinite(x).all())


def test_broyden_defaults_find_double_roots():
    # g(z) = (z − a)², a root of multiplicity two (Newton is only linear there), 24 samples in ℝ³.
    # main: 7/24, one of them reached inf.
    a = 1 + torch.rand(24, 3, dtype=F64, generator=torch.Generator().manual_seed(20))
    sol = il.root(lambda z: (z - a) ** 2, torch.zeros_like(a))
    assert sol.info.all_converged
    # rel tol 1e-4 on ‖(z − a)²‖ / ‖z‖ leaves |z − a| up to about 0.02
    torch.testing.assert_close(sol.value, a, rtol=0, atol=0.05)


def test_broyden_rejects_a_step_that_blows_up_and_recovers():
    # z³ − a from 1 overshoots to ~6 on its first step (residual ×40): the step is rejected, its secant
    # pair kept, and the retried step from the old point converges. main (good Broyden): 1/4 at defaults.
    a = torch.linspace(0.3, 6.0, 12, dtype=F64).reshape(4, 3)
    sol = il.root(lambda z: z**3 - a, torch.ones_like(a), solver=il.Broyden(tol=1e-12, stop="abs"))
    assert sol.info.all_converged
    torch.testing.assert_close(sol.value, a ** (1 / 3), rtol=1e-10, atol=0)


def test_broyden_solves_a_badly_scaled_diagonal_linear_root():
    # diag(1, 1e2, 1e4) z = 1 from 0: the first steps grow the residual ~6000-fold and are rejected;
    # each rejection in a row loosens the limit, so the secant steps get through (9 steps; main: 8).
    d = torch.tensor([1.0, 1e2, 1e4], dtype=F64)
    sol = il.root(lambda z: d * z - 1, torch.zeros(1, 3, dtype=F64), solver=il.Broyden(tol=1e-10, stop="abs"))
    torch.testing.assert_close(sol.value, 1 / d[None], rtol=1e-8, atol=0)


def test_broyden_survives_a_map_that_returns_nan_off_its_domain():
    # sqrt is NaN below 0: a step that lands there is rejected and retried shorter, not failed.
    c = torch.tensor([[4.0, 9.0], [0.25, 1.0]], dtype=F64)
    sol = il.root(lambda z: torch.sqrt(z) - 1 + 0 * c, 3 * torch.ones_like(c), solver=il.Broyden(tol=1e-10))
    assert sol.info.all_converged
    torch.testing.assert_close(sol.value, torch.ones_like(c), rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------ item 9: causes and advice
def _nan_after(calls_before_nan: int, rows: slice):
    f, _ = _linear_map(3, 4, F64, seed=2)
    calls = []

    def poisoned(z):
        calls.append(None)
        out = f(z)
        if len(calls) > calls_before_nan:
            out = out.clone()
            out[rows] = float("nan")
        return out

    return poisoned


def test_a_nonfinite_sample_is_reported_with_its_step():
    # main: "did not converge within max_iter=300 … Try: increase max_iter".
    solver = il.FixedPointIteration(tol=1e-10, max_iter=300, on_failure="raise")
    with pytest.raises(il.ConvergenceError, match=r"1/3 samples did not converge \(tol=1e-10, max_iter=300\): "
                                                  r"1 turned non-finite \(sample 1 at step 4\).*Try: the map returned NaN/inf") as caught:
        il.fixed_point(_nan_after(4, slice(1, 2)), torch.zeros(3, 4, dtype=F64), solver=solver)
    assert "increase max_iter" not in str(caught.value)


def test_causes_are_reported_per_sample():
    sol = il.fixed_point(_nan_after(3, slice(1, 2)), torch.zeros(3, 4, dtype=F64),
                         solver=il.FixedPointIteration(tol=1e-10, max_iter=300, on_failure="ignore"))
    assert sol.info.causes == ["converged", "nonfinite", "converged"]
    assert int(sol.info.nstep[1]) == 3 and sol.info.status.dtype == torch.long
    assert int(sol.info.status[1]) == Status.NONFINITE


def test_a_diverged_sample_is_reported_with_damping_advice():
    with pytest.warns(il.ConvergenceWarning, match=r"2/2 samples did not converge .*2 diverged \(sample 0 at step \d+\).*"
                                                   r"Try: the map expands here: damp it") as caught:
        il.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 3, dtype=F64), solver=il.FixedPointIteration())
    assert "increase max_iter" not in str(caught[0].message)


def test_a_tolerance_below_the_dtype_stalls_and_says_so():
    # float32 cannot resolve a relative residual of 1e-12: more iterations will not help.
    f, _ = _linear_map(2, 6, torch.float32, seed=5)
    with pytest.warns(il.ConvergenceWarning, match=r"stalled.*more iterations will not help: loosen tol"):
        sol = il.fixed_point(f, torch.zeros(2, 6), solver=il.Anderson(tol=1e-12, max_iter=60))
    assert sol.info.causes == ["stalled", "stalled"]


def test_a_slow_solve_hits_the_cap_and_is_told_to_iterate_longer():
    f, _ = _linear_map(2, 6, F64, seed=6, norm=0.99)
    with pytest.warns(il.ConvergenceWarning, match=r"did not converge within max_iter=8 .*Try: increase max_iter"):
        sol = il.fixed_point(f, torch.zeros(2, 6, dtype=F64), solver=il.FixedPointIteration(tol=1e-10, max_iter=8))
    assert sol.info.causes == ["max_iter", "max_iter"]


def test_hints_by_cause_replace_the_generic_advice():
    # How a layer advises the step size of a Minimize block on divergence.
    info = il.SolveInfo(nstep=torch.tensor([3, 50]), residual=torch.tensor([1e9, 1.0]), converged=torch.tensor([False, False]),
                        nfe=51, status=torch.tensor([int(Status.DIVERGED), int(Status.MAX_ITER)]))
    with pytest.raises(il.ConvergenceError, match=r"1 diverged \(sample 0 at step 3\), 1 hit the iteration cap .*"
                                                  r"Try: lower step_size of Minimize 'u'; increase max_iter"):
        apply_failure_policy(info, name="block 0", tol=1e-4, max_iter=50, on_failure="raise",
                             hints={"diverged": "lower step_size of Minimize 'u'"})


def test_a_solveinfo_without_status_derives_one():
    info = il.SolveInfo(nstep=torch.tensor([1, 2, 3]), residual=torch.tensor([0.0, float("inf"), 1.0]),
                        converged=torch.tensor([True, False, False]), nfe=4)
    assert info.causes == ["converged", "nonfinite", "max_iter"]


# ------------------------------------------------------------------------------ issue 13: validation
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: il.Anderson(lam=float("nan")), "lam must be a finite number >= 0, got nan"),
        (lambda: il.Anderson(lam=math.inf), "lam must be a finite number >= 0, got inf"),
        (lambda: il.Anderson(damping=float("nan")), r"damping must be a number in \(0, 1\], got nan"),
        (lambda: il.FixedPointIteration(damping=float("nan")), r"damping must be a number in \(0, 1\], got nan"),
        (lambda: il.FixedPointIteration(damping=True), r"damping must be a number in \(0, 1\], got True"),
        (lambda: il.Broyden(max_iter=True), "max_iter must be an integer >= 1, got True"),
        (lambda: il.Anderson(tol=True), r"tol must be a positive number \(finite\), got True"),
        (lambda: il.Anderson(tol=float("nan")), r"tol must be a positive number \(finite\), got nan"),
        (lambda: il.Anderson(tol=math.inf), r"tol must be a positive number \(finite\), got inf"),
        (lambda: il.Broyden(check_every=True), "check_every must be None or an integer >= 1, got True"),
        (lambda: il.Broyden(memory=True), "memory must be an integer >= 1, got True"),
        (lambda: il.Anderson(memory=True), "memory must be an integer >= 1, got True"),
        (lambda: il.Anderson(trace="yes"), "trace must be a bool, got 'yes'"),
    ],
)
def test_options_outside_their_range_are_rejected_by_name(make, match):
    # main: every one of these was accepted (NaN/inf, and True as 1).
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------ issue 13: the warning's line
def _diverging_map(z):
    return z + 1.0


def test_the_warning_of_a_functional_solve_names_the_callers_line():
    # main: the warning pointed at implicitlayers/solvers/_base.py.
    with pytest.warns(il.ConvergenceWarning) as caught:
        il.fixed_point(_diverging_map, torch.zeros(2, 3), solver=il.Anderson(max_iter=3))
    assert caught[0].filename == __file__


def test_the_warning_of_a_layer_call_names_the_callers_line():
    z, x = il.Variable("z"), il.Input("x")
    layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z, lambda z, x: z + x + 1, (z, x))]), [x], [z],
                             solver=il.Anderson(max_iter=3), init={"z": torch.zeros(3)})
    with pytest.warns(il.ConvergenceWarning) as caught:
        layer(torch.zeros(2, 3))
    assert caught[0].filename == __file__


def test_the_warning_of_a_deq_call_names_the_callers_line():
    deq = il.DEQ(lambda z, x: z + x + 1, solver=il.Anderson(max_iter=3))
    with pytest.warns(il.ConvergenceWarning) as caught:
        deq(torch.zeros(2, 3))
    assert caught[0].filename == __file__


def test_warnings_are_still_errors_here():
    # The suite runs with warnings as errors: a failed solve must fail a test that does not expect it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(il.ConvergenceWarning):
            il.fixed_point(_diverging_map, torch.zeros(1, 2), solver=il.Anderson(max_iter=2))
