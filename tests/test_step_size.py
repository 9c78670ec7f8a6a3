"""`Minimize(step_size="auto")` (the default): per-sample steps `α = 1 / λ` from a curvature estimate.

Oracles: quadratics with known Hessians (`α λ_max` close to 1 per sample, from below, since power
iteration approaches `λ_max` from below), least squares and projections in closed form, the KKT block
of a linear cell (reduced Hessian `KᵀK + λI`), and float64 `gradcheck` of the solution.
"""

from __future__ import annotations

import math

import pytest
import torch

import implicitlayers as il
from implicitlayers.system import KKT_POWER_ITERATIONS, POWER_ITERATIONS

F64 = torch.float64


def _layer(objective, inputs, n, *, solver=None, constraint=None, kind=il.Minimize, **kwargs):
    nodes = [il.Input(f"in{i}") for i in range(len(inputs))]
    v = il.Variable("v")
    problem = il.Problem([kind(v, objective, (v, *nodes), constraint, **kwargs)])
    return il.ImplicitLayer(problem, nodes, v, solver=solver, init={"v": torch.zeros(n, dtype=F64)})


def _steps(layer, n, *inputs):
    """The `StepSizes` the layer's block estimates at its start `v = 0` (what a solve uses)."""
    v0 = torch.zeros(inputs[0].shape[0], n, dtype=F64)
    system = layer.block_system(0, {"v": v0})
    return system.step_sizes(v0, {f"in{i}": t for i, t in enumerate(inputs)})


def _hessians(curvatures: torch.Tensor, n: int, spread: float, seed: int = 0) -> torch.Tensor:
    """SPD `(B, n, n)` with largest eigenvalue `curvatures[b]`, the others in `[spread·c, 0.5·c]`."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(curvatures), n, n, generator=gen, dtype=F64))
    eig = torch.cat([torch.linspace(spread, 0.5, n - 1, dtype=F64), torch.ones(1, dtype=F64)])
    return q @ torch.diag_embed(curvatures[:, None] * eig) @ q.mT


def _quadratic(v, H, y):
    d = v - y
    return 0.5 * (d[:, None, :] @ H @ d[:, :, None])[:, 0, 0]


CURVATURES = torch.tensor([1e-2, 1.0, 3e2, 1e4], dtype=F64)


# ------------------------------------------------------------------------------------- the estimate
def test_auto_is_the_default_and_a_number_overrides_it():
    v = il.Variable("v")
    assert il.Minimize(v, lambda v: (v**2).sum(1), (v,)).step_size == "auto"
    fixed = il.Maximize(v, lambda v: (v**2).sum(1), (v,), step_size=0.25)
    assert (fixed.step_size, fixed.auto_step, fixed.fixed_step) == (0.25, False, 0.25)


def test_the_step_is_one_over_the_largest_curvature_per_sample():
    H = _hessians(CURVATURES, 6, 0.1)
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    steps = _steps(_layer(_quadratic, [H, y], 6), 6, H, y)
    assert steps.products == POWER_ITERATIONS
    product = steps.values["v"][:, 0] * CURVATURES
    assert bool((product >= 1 - 1e-12).all()) and bool((product < 1.01).all()), product
    torch.testing.assert_close(steps.curvature["v"], CURVATURES, rtol=0.01, atol=0)


def test_a_sample_step_does_not_depend_on_the_batch():
    H = _hessians(CURVATURES, 6, 0.1)
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    layer = _layer(_quadratic, [H, y], 6)
    whole = _steps(layer, 6, H, y).values["v"]
    alone = _steps(layer, 6, H[2:3], y[2:3]).values["v"]
    torch.testing.assert_close(alone, whole[2:3], rtol=0, atol=0)


def test_a_linear_objective_gets_the_unit_step_and_solves_over_a_box():
    # No curvature: α = 1; over a box the minimiser of cᵀv is the corner −sign(c).
    c = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
    layer = _layer(lambda v, c: (v * c).sum(1), [c], 3, constraint=il.sets.Box(-1.0, 1.0))
    assert float(_steps(layer, 3, c).values["v"]) == 1.0
    torch.testing.assert_close(layer(c), -torch.sign(c))


# ------------------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("solver", [il.Anderson(), il.Broyden(), il.FixedPointIteration(max_iter=200)], ids=type)
def test_curvatures_from_1e_minus_2_to_1e4_in_one_batch_converge_at_defaults(solver):
    H = _hessians(CURVATURES, 6, 0.2)
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    layer = _layer(_quadratic, [H, y], 6, solver=solver)
    solution = layer.solve(H, y)
    assert solution.info["block 0 (v)"].all_converged
    # ‖∇L‖ ≤ 1e-4 at the answer bounds the error by 1e-4 / λ_min
    err = torch.linalg.vector_norm(solution["v"] - y, dim=1)
    assert bool((err <= 1e-4 / (0.2 * CURVATURES)).all()), err


def test_with_the_old_default_step_the_stiff_samples_fail():
    # The reason for "auto": step 0.1 is above 2 / curvature for the two stiff samples.
    H = _hessians(CURVATURES, 6, 0.2)
    y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    layer = _layer(_quadratic, [H, y], 6, solver=il.Anderson(on_failure="ignore"), step_size=0.1)
    assert layer.solve(H, y).info["block 0 (v)"].converged.tolist()[2:] == [False, False]


def _ridge_least_squares():
    """cvxpylayers `test_least_squares`: `argmin ‖Ax − b‖² + ‖x‖²`, 100 × 20 (Hessian eigenvalues ≈ 60 … 420)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(100, 20, generator=gen, dtype=F64)
    b = torch.randn(5, 100, generator=gen, dtype=F64)
    exact = torch.linalg.solve(A.T @ A + torch.eye(20, dtype=F64), (b @ A).T).T
    return A, b, exact


@pytest.mark.parametrize("solver", [il.Anderson(), il.Broyden()], ids=type)
def test_cvxpylayers_least_squares_converges_at_defaults(solver):
    A, b, exact = _ridge_least_squares()
    layer = _layer(lambda x, b: ((x @ A.T - b) ** 2).sum(1) + (x**2).sum(1), [b], 20, solver=solver)
    solution = layer.solve(b)
    assert solution.info["block 0 (v)"].all_converged
    torch.testing.assert_close(solution["v"], exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "constraint, project",
    [
        (il.sets.Box(-0.5, 0.5), lambda y: y.clamp(-0.5, 0.5)),
        (il.sets.L2Ball(1.0), lambda y: y / torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp_min(1.0)),
    ],
    ids=["box", "l2ball"],
)
@pytest.mark.parametrize("kind", [il.Minimize, il.Maximize], ids=["minimize", "maximize"])
def test_constrained_problems_converge_and_differentiate_at_defaults(constraint, project, kind):
    # argmin_{v ∈ C} c_b/2 ‖v − y‖² = Π_C(y) for every curvature c_b; its gradient is Π_C's Jacobian, which
    # the IFT only gets right with the step of the forward solve inside the natural residual.
    sign = 1.0 if kind is il.Minimize else -1.0
    c = CURVATURES[:, None]
    y = 2 * torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    y[0] *= 0.1  # one sample inside the set
    y.requires_grad_()
    layer = _layer(lambda v, y: sign * 0.5 * (c * (v - y) ** 2).sum(1), [y], 3, constraint=constraint, kind=kind,
                   solver=il.Anderson(tol=1e-10, max_iter=100, on_failure="raise"))
    v = layer(y)
    torch.testing.assert_close(v, project(y), rtol=0, atol=1e-8)
    weights = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    (got,) = torch.autograd.grad((v * weights).sum(), y)
    (want,) = torch.autograd.grad((project(y) * weights).sum(), y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_gradcheck_of_a_nonquadratic_solution_in_float64():
    # argmin ‖A x − b‖² + Σ softplus(x) + ½‖x‖²: curvature varies with x and with A.
    gen = torch.Generator().manual_seed(5)
    A = (3 * torch.randn(8, 4, generator=gen, dtype=F64)).requires_grad_()
    b = torch.randn(2, 8, generator=gen, dtype=F64, requires_grad=True)

    def solve(A, b):
        objective = lambda x, b: ((x @ A.T - b) ** 2).sum(1) + torch.nn.functional.softplus(x).sum(1) + 0.5 * (x**2).sum(1)  # noqa: E731
        return _layer(objective, [b], 4, solver=il.Broyden(tol=1e-12, stop="abs", max_iter=200, on_failure="raise"))(b)

    assert torch.autograd.gradcheck(solve, (A, b), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------- the KKT block
def test_a_total_objective_gets_one_over_the_reduced_hessian():
    # z = A z + B u + c, u = argmin ½‖z − t‖² + λ/2‖u‖²: the curvature of the total objective in u is
    # KᵀK + λI (K = (I − A)⁻¹ B), not the partial λ.
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, dtype=F64, generator=gen)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    Bm = 3 * torch.randn(5, 3, dtype=F64, generator=gen)
    K = torch.linalg.solve(torch.eye(5, dtype=F64) - A, Bm)
    lam = 0.5
    c_, t_, z_, u_ = il.Input("c"), il.Input("t"), il.Variable("z"), il.Variable("u")
    objective = lambda z, u, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * lam * (u**2).sum(1)  # noqa: E731
    problem = il.Problem([il.FixedPoint(z_, lambda z, u, c: z @ A.T + u @ Bm.T + c, (z_, u_, c_)),
                          il.Minimize(u_, objective, (z_, u_, t_))])
    layer = il.ImplicitLayer(problem, [c_, t_], [u_, z_], init={"z": torch.zeros(5), "u": torch.zeros(3)},
                             solver=il.Anderson(tol=1e-10, max_iter=200))
    c, t = torch.randn(2, 4, 5, dtype=F64, generator=gen)
    system = layer.block_system(0, {"z": c, "u": c[:, :3]})
    steps = system.step_sizes(torch.zeros(4, system.dim, dtype=F64), {"c": c, "t": t})
    assert steps.products == KKT_POWER_ITERATIONS + 1
    top = float(torch.linalg.eigvalsh(K.T @ K + lam * torch.eye(3, dtype=F64))[-1])
    torch.testing.assert_close(steps.curvature["u"], torch.full((4,), top, dtype=F64), rtol=0.05, atol=0)
    solution = layer.solve(c, t)
    u = torch.linalg.solve(K.T @ K + lam * torch.eye(3, dtype=F64), K.T @ (t - torch.linalg.solve(torch.eye(5, dtype=F64) - A, c.T).T).T).T
    assert solution.info["block 0 (z, u)"].all_converged
    torch.testing.assert_close(solution["u"], u, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------- bad steps
@pytest.mark.parametrize("step", [0, 0.0, -0.1, math.nan, math.inf, "fast", "AUTO", None, True])
@pytest.mark.parametrize("kind", [il.Minimize, il.Maximize], ids=["minimize", "maximize"])
def test_bad_step_sizes_are_rejected_with_the_options(step, kind):
    v = il.Variable("v")
    with pytest.raises(ValueError, match=r"step_size must be positive and finite, or \"auto\", got"):
        kind(v, lambda v: (v**2).sum(1), (v,), step_size=step)


@pytest.mark.parametrize("backward", [il.Unroll(), il.Phantom(k=40, damping=1.0)], ids=["unroll", "phantom"])
def test_unrolled_backward_modes_use_the_per_sample_steps(backward):
    # argmin c_b/2 ‖v − y‖² over a box is clamp(y); with α = 1/c_b per sample one step of the map is exact,
    # so differentiating steps of it gives clamp's Jacobian (with one shared α the stiff samples would diverge).
    c = CURVATURES[:, None]
    y = (2 * torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(7))).requires_grad_()
    layer = il.ImplicitLayer(
        il.Problem([il.Minimize(v := il.Variable("v"), lambda v, y: 0.5 * (c * (v - y) ** 2).sum(1), (v, y_ := il.Input("y")),
                                il.sets.Box(-0.5, 0.5))]),
        [y_], v, solver=il.Anderson(tol=1e-10, max_iter=50), backward=backward, init={"v": torch.zeros(3, dtype=F64)},
    )
    out = layer(y)
    torch.testing.assert_close(out, y.clamp(-0.5, 0.5), rtol=0, atol=1e-8)
    (got,) = torch.autograd.grad(out.sum(), y)
    torch.testing.assert_close(got, (y.abs() < 0.5).to(F64), rtol=0, atol=1e-6)
