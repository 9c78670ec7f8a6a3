"""Specification of `implicitlayers.testing`: the checks catch planted defects and pass on correct
layers, the strategies draw valid objects with true oracles, and the pytest plugin's fixtures work."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from implicitlayers.layer import ImplicitLayer
from implicitlayers.testing import (
    check_batch_independence,
    check_convergence,
    check_gradients,
    check_solution,
)
from implicitlayers.testing import strategies as ils

FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- layers with and without planted defects


class Cell(nn.Module):
    """`tanh(W z + U x)` with `‖W‖₂ = contraction`: strongly contractive, but nonlinear."""

    def __init__(self, d: int = 4, contraction: float = 0.5, mix: bool = False, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=gen)
        self.W = nn.Parameter(W * contraction / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, d, generator=gen))
        self.mix = mix

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(z @ self.W.T + x @ self.U.T)
        # The planted defect: every sample reads the batch mean.
        return out + 0.5 * z.mean(0) if self.mix else out


def deq_layer(*, solver=None, backward=None, mix: bool = False) -> ImplicitLayer:
    z, x = il.Variable("z"), il.Input("x")
    return ImplicitLayer(
        il.Problem([il.FixedPoint(z, Cell(mix=mix), (z, x))]), [x], [z],
        solver=solver if solver is not None else il.Anderson(tol=1e-6, max_iter=100),
        backward=backward, init={"z": torch.zeros(4)},
    )


def total_objective_layer(solver=None, u_start: float = 0.0) -> ImplicitLayer:
    """z = cell(z, u), u = argmin ½‖z − y‖² + ½‖u‖² through z's equation (a KKT block with adjoints)."""
    z, u, y = il.Variable("z"), il.Variable("u"), il.Input("y")
    cell = Cell(contraction=0.4)
    problem = il.Problem([
        il.FixedPoint(z, cell, (z, u)),
        il.Minimize(u, lambda z_, y_, u_: 0.5 * ((z_ - y_) ** 2).sum(1) + 0.5 * (u_**2).sum(1), (z, y, u), step_size=0.3),
    ])
    return ImplicitLayer(problem, [y], [u, z], solver=solver or il.Anderson(tol=1e-7, max_iter=300),
                         init={"z": torch.zeros(4), "u": torch.full((4,), u_start)})


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- check_solution


def test_check_solution_passes_on_a_converged_layer(x):
    worst = check_solution(deq_layer(), x)
    assert set(worst) == {"FixedPoint(z) in block 0 (z)"}
    assert worst["FixedPoint(z) in block 0 (z)"] < 1e-4


def test_check_solution_catches_a_solver_stopped_too_early(x):
    layer = deq_layer(solver=il.Anderson(max_iter=2, on_failure="ignore"))
    with pytest.raises(AssertionError, match=r"FixedPoint\(z\) in block 0 \(z\): 4/4 samples violate it; worst sample \d"):
        check_solution(layer, x)


def test_check_solution_reads_a_constrained_objective_by_its_gradient_mapping():
    v, y = il.Variable("v"), il.Input("y")
    box = il.sets.Box(-0.5, 0.5)
    problem = il.Problem([il.Minimize(v, lambda v_, y_: 0.5 * ((v_ - y_) ** 2).sum(1), (v, y), box, step_size=0.5)])
    targets = torch.tensor([[2.0, 0.1], [-3.0, 0.2]])
    good = ImplicitLayer(problem, [y], [v], solver=il.Anderson(tol=1e-8, max_iter=100), init={"v": torch.zeros(2)})
    check_solution(good, targets)  # the minimiser sits on the boundary, where ∇L ≠ 0
    bad = ImplicitLayer(problem, [y], [v], solver=il.FixedPointIteration(max_iter=1, on_failure="ignore"), init={"v": torch.zeros(2)})
    with pytest.raises(AssertionError, match="gradient mapping"):
        check_solution(bad, targets)


def test_check_solution_checks_total_objectives_and_their_adjoints():
    y = 0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    worst = check_solution(total_objective_layer(), y)
    assert {"FixedPoint(z) in block 0 (z, u)", "Minimize(u) in block 0 (z, u)", "adjoint mu[u|z] in block 0 (z, u)"} == set(worst)
    with pytest.raises(AssertionError, match=r"Minimize\(u\) in block 0 \(z, u\).*total derivative"):
        # From u = 1 (μ = 0), a solve stopped after three steps is still far from stationary.
        check_solution(total_objective_layer(il.Anderson(max_iter=3, on_failure="ignore"), u_start=1.0), y)


# ---------------------------------------------------------------- check_gradients


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll(), il.Phantom(k=60, damping=1.0)], ids=lambda m: type(m).__name__)
def test_check_gradients_passes_on_exact_backward_modes(x, backward):
    result = check_gradients(deq_layer(backward=backward), x[:2])
    assert result["finite_differences"] < 1e-5


def test_check_gradients_compares_with_unrolled_autograd(x):
    result = check_gradients(deq_layer(), x[:2], wrt_parameters=False)
    assert result["unroll"] is not None and result["unroll"] < 1e-6


def test_check_gradients_catches_a_one_step_phantom_gradient(x):
    layer = deq_layer(backward=il.Phantom(k=1))
    with pytest.raises(AssertionError) as err:
        check_gradients(layer, x[:2])
    report = str(err.value)
    assert "input 0 (x), direction 0, sample" in report
    assert "parameter 'functions.0.W'" in report  # localised after the joint parameter probe failed
    assert "against unrolled autograd" in report and "Phantom(k=1" in report


def test_check_gradients_leaves_the_layer_untouched(x):
    layer = deq_layer(backward=il.Phantom(k=1))
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    original_solve = ImplicitLayer.solve
    with pytest.raises(AssertionError):
        check_gradients(layer, x[:2])
    assert layer.solver == il.Anderson(tol=1e-6, max_iter=100) and layer.backward_mode == il.Phantom(k=1)
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in layer.named_parameters())
    assert ImplicitLayer.solve is original_solve  # the checks use the public hook, never a patched class


def test_check_gradients_explains_tensors_captured_in_closures(x):
    W = 0.3 * torch.eye(4)
    z, xi = il.Variable("z"), il.Input("x")
    layer = ImplicitLayer(il.Problem([il.FixedPoint(z, lambda z_, x_: torch.tanh(z_ @ W + x_), (z, xi))]), [xi], [z],
                          init={"z": torch.zeros(4)})
    with pytest.raises(TypeError, match="captured in closures"):
        check_gradients(layer, x)
    # The advertised way out: check in the layer's own float32, with a step and tolerances to match.
    check_gradients(layer, x, dtype=None, eps=1e-3, atol=1e-2, rtol=1e-2)


def test_check_gradients_follows_closures_over_the_modules_own_submodules(x):
    class Wrapper(nn.Module):  # the problem's condition is a closure over a registered submodule
        def __init__(self) -> None:
            super().__init__()
            self.cell = Cell()
            z, xi = il.Variable("z"), il.Input("x")
            cell = self.cell
            self.layer = ImplicitLayer(il.Problem([il.FixedPoint(z, lambda z_, x_: cell(z_, x_), (z, xi))]), [xi], [z],
                                       solver=il.Anderson(tol=1e-6), init={"z": torch.zeros(4)})

        def forward(self, inp):
            return self.layer(inp)[0]

    result = check_gradients(Wrapper(), x[:2])
    assert result["finite_differences"] < 1e-5


def test_check_gradients_follows_functions_held_inside_a_model(x):
    # il.JIIO keeps the user's functions inside its own condition objects: the float64 copy must call
    # the copied module through them, not the float32 original.
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = Cell(contraction=0.3)
            self.jiio = il.JIIO(lambda z, u: self.cell(z, u), lambda z: z,
                                lambda out, y, u: ((out - y) ** 2).sum(1) + 0.1 * (u**2).sum(1), 4, state_shape=4,
                                solver=il.Anderson(tol=1e-8, max_iter=300))

        def forward(self, y):
            return self.jiio(y)

    result = check_gradients(Model(), x[:2], against_unroll=False)
    assert result["finite_differences"] < 1e-4


# ---------------------------------------------------------------- batch independence and convergence


def test_check_batch_independence_passes_on_per_sample_solves(x):
    check_batch_independence(deq_layer(), x)


def test_check_batch_independence_catches_a_cell_that_mixes_samples(x):
    with pytest.raises(AssertionError, match=r"output 0, sample 0: batched and one-by-one results differ by"):
        check_batch_independence(deq_layer(mix=True), x)


def test_check_batch_independence_needs_two_samples(x):
    with pytest.raises(ValueError, match="at least 2 samples"):
        check_batch_independence(deq_layer(), x[:1])


def test_check_batch_independence_needs_a_per_sample_output(x):
    class Total(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = deq_layer()

        def forward(self, inp):
            return self.layer(inp)[0].sum()

    with pytest.raises(ValueError, match="no output of Total has the batch dimension"):
        check_batch_independence(Total(), x)


def test_check_convergence_reports_statistics_and_enforces_bounds(x):
    stats = check_convergence(deq_layer(), x, max_nfe=100, max_residual=1e-6)
    block = stats["block 0 (z)"]
    assert block["converged"] == 1.0 and block["max_residual"] <= 1e-6 and 1 <= block["nfe"] <= 100
    with pytest.raises(AssertionError, match=r"block 0 \(z\): nfe \d+ > max_nfe 2"):
        check_convergence(deq_layer(), x, max_nfe=2)
    with pytest.raises(AssertionError, match=r"samples \[0, 1, 2, 3\] did not converge"):
        check_convergence(deq_layer(solver=il.Anderson(max_iter=2, on_failure="ignore")), x)


# ---------------------------------------------------------------- what the checks accept


def test_checks_accept_modules_that_wrap_a_layer(x):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deq = il.DEQ(Cell(), solver=il.Anderson(tol=1e-6, max_iter=100))
            self.head = nn.Linear(4, 2)

        def forward(self, inp):
            z = self.deq(inp)
            return self.head(z), z

    model = Model()
    check_solution(model, x)
    check_batch_independence(model, x)
    check_convergence(model, x)
    check_gradients(model, x[:2])


def test_checks_reject_what_is_not_an_implicit_model(x):
    with pytest.raises(TypeError, match="nn.Module"):
        check_solution(lambda t: t, x)
    with pytest.raises(AssertionError, match="called no ImplicitLayer.solve"):
        check_solution(nn.Linear(4, 4), x)


# ---------------------------------------------------------------- strategies


@FAST
@given(ils.contractive_cells())
def test_contractive_cells_contract_by_their_factor(c):
    z1, z2 = torch.randn_like(c.z0), torch.randn_like(c.z0)
    with torch.no_grad():
        gap = (c.cell(z1, c.x) - c.cell(z2, c.x)).flatten(1).norm(dim=1)
    assert bool((gap <= c.contraction * (z1 - z2).flatten(1).norm(dim=1) * (1 + 1e-5) + 1e-6).all())
    assert 0 < c.contraction < 1 and c.x.dtype == c.z0.dtype == c.dtype


@FAST
@given(ils.contractive_cells(linear=True))
def test_linear_cells_layers_reach_the_closed_form_fixed_point(c):
    (z,) = c.layer()(c.x)
    tol = 1e-4 if c.dtype == torch.float32 else 1e-7
    torch.testing.assert_close(z, c.solution(), atol=tol, rtol=tol)


@FAST
@given(ils.convex_objectives(), st.data())
def test_convex_objectives_have_their_constants(o, data):
    a, b = torch.randn_like(o.y), torch.randn_like(o.y)

    def grad(v):
        v = v.detach().requires_grad_()
        return torch.autograd.grad(o.objective(v, o.y).sum(), v)[0]

    ga, gb = grad(a), grad(b)
    slack = 1e-3 if o.y.dtype == torch.float32 else 1e-8
    assert bool((((ga - gb) * (a - b)).sum(1) >= o.strong_convexity * ((a - b) ** 2).sum(1) * (1 - slack) - slack).all())
    assert bool(((ga - gb).norm(dim=1) <= o.smoothness * (a - b).norm(dim=1) * (1 + slack) + slack).all())


@FAST
@given(ils.convex_objectives(), st.one_of(st.none(), ils.constraint_sets()))
def test_objective_layers_find_the_oracle_minimiser(o, constraint):
    (v,) = o.layer(constraint)(o.y)
    torch.testing.assert_close(v, o.minimize(constraint), atol=1e-3, rtol=1e-3)
    if constraint is None and o.kind == "quadratic":
        torch.testing.assert_close(o.minimizer(), o.minimize(), atol=1e-4, rtol=1e-4)
    check_solution(o.layer(constraint), o.y)


@FAST
@given(ils.constraint_sets(), ils.batch_sizes(), ils.dtypes())
def test_constraint_sets_project_into_themselves(constraint, batch, dtype):
    v = 3 * torch.randn(batch, 3, dtype=dtype)
    p = constraint.project(v)
    assert bool(constraint.contains(p, atol=1e-5).all())
    torch.testing.assert_close(constraint.project(p), p)


@FAST
@given(ils.problem_graphs())
def test_problem_graphs_solve_to_their_dense_oracle(g):
    layer = g.layer()
    outs = layer(*g.tensors)
    exact = g.solution()
    tol = 1e-4 if g.tensors[0].dtype == torch.float32 else 1e-7
    for variable, out in zip(g.variables, outs):
        torch.testing.assert_close(out, exact[variable.name], atol=tol, rtol=tol)
    assert len(g.problem.blocks) >= 1 and set(g.kinds.values()) <= {"fixed_point", "root", "minimize"}
    check_solution(layer, *g.tensors)
    check_convergence(layer, *g.tensors)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ils.problem_graphs(batch_size=2, max_blocks=2))
def test_problem_graphs_have_correct_gradients(g):
    check_gradients(g.layer(), *g.tensors)


def test_strategies_reject_unknown_kinds():
    with pytest.raises(ValueError, match="kind"):
        ils.contractive_cells("recurrent")
    with pytest.raises(ValueError, match="kind"):
        ils.convex_objectives("cubic")
    with pytest.raises(ValueError, match="kinds"):
        ils.problem_graphs(kinds=["maximize"])
