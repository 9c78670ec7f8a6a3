"""Specifications of `il.LyaDEQ` and its readings: dynamics, Lyapunov decrease, equilibria, gradients.

Closed-form oracles first (the projection formula, the balanced equilibrium of a linear cell with a
quadratic `V`), then each reading's stability claim from random starts, its equilibrium, gradients
against finite differences in float64, orthogonality through training, two-stage training,
`functional_call`, errors, the example.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers.models.lyadeq import project_dynamics, pull_dynamics
from implicitlayers.nn.icnn import PICNN
from implicitlayers.nn.lyapunov import ConditionalLyapunovFunction

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = settings(max_examples=20, deadline=None)
TIGHT = il.Anderson(memory=5, tol=1e-11, max_iter=200)


class TanhCell(torch.nn.Module):
    """`f(z, x) = tanh(W z + U x + b)` with `‖W‖₂ = gain`, a contraction for `gain < 1`."""

    def __init__(self, dim: int, in_features: int, gain: float = 0.8, seed: int = 0, dtype=torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g, dtype=dtype)
        self.weight = torch.nn.Parameter(gain * w / torch.linalg.matrix_norm(w, 2))
        self.inject = torch.nn.Parameter(torch.randn(dim, in_features, generator=g, dtype=dtype) / in_features**0.5)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(dim, generator=g, dtype=dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight.T + x @ self.inject.T + self.bias)


class LinearCell(torch.nn.Module):
    """`f(z, x) = A z + x`, `‖A‖₂ = 0.5`: the balanced equilibrium has a closed form."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        self.a = torch.nn.Parameter(0.5 * a / torch.linalg.matrix_norm(a, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T + x


class QuadraticLyapunov(torch.nn.Module):
    """`V(z) = k/2 ‖z − ref‖²` (`ref` = 0 when `None`): the closed-form case."""

    def __init__(self, dim: int, k: float) -> None:
        super().__init__()
        self.dim, self.k = dim, k

    def value_and_grad(self, z: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        offset = z if ref is None else z - ref
        return 0.5 * self.k * offset.pow(2).sum(1), self.k * offset


def make_lyadeq(dim: int = 6, in_features: int = 5, *, seed: int = 0, gain: float = 0.8, **kwargs) -> il.LyaDEQ:
    torch.manual_seed(seed)
    if kwargs.get("centre") == "conditioned":
        lyapunov = ConditionalLyapunovFunction(dim, in_features, (16, 16), dtype=torch.float64)
    else:
        lyapunov = il.nn.LyapunovFunction(dim, (16, 16), dtype=torch.float64)
    if kwargs.get("budget") is None:
        kwargs.setdefault("solver", TIGHT)
    return il.LyaDEQ(TanhCell(dim, in_features, gain, seed), dim, lyapunov=lyapunov, **kwargs).double()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def euler_trajectory(
    model: il.LyaDEQ, z: torch.Tensor, x: torch.Tensor, steps: int, anchor=None, step: float | None = None
) -> list[torch.Tensor]:
    """`z_{k+1} = z_k + h ż(z_k)`; with the model's `h` (default), the map the layer's solver iterates."""
    h = model.step_size if step is None else step
    states = [z]
    with torch.no_grad():
        for _ in range(steps):
            z = z + h * model.dynamics(z, x, anchor)
            states.append(z)
    return states


# Built once: Hypothesis draws states, inputs and anchors, not models (building and solving per example
# would dominate the test time).
MODELS = [make_lyadeq(seed=seed, alpha=0.5) for seed in range(3)]
ANCHORS = [m.solve(randn(8, 5, seed=seed)).values["anchor"] for seed, m in enumerate(MODELS)]
# The readings whose state depends on V, with the step small enough for Euler to follow the flow.
READINGS = {
    "learned, budget": {"centre": "learned", "budget": 40, "step_size": 0.01},
    "origin, budget": {"centre": "origin", "budget": 40, "step_size": 0.01},
    "conditioned, budget": {"centre": "conditioned", "budget": 40, "step_size": 0.01},
}


# ---------------------------------------------------------------------------------- closed forms
def test_projection_matches_the_closed_form_for_a_quadratic_lyapunov_function():
    # V(z) = ‖z‖²: ∇V = 2z. With z = (1, 0), F = (1, 1), α = 1: ∇VᵀF + αV = 2 + 1 = 3 > 0, so
    # F̃ = F − 2z · 3 / 4 = (1 − 1.5, 1) = (−0.5, 1), and ∇VᵀF̃ = −1 = −αV exactly.
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = project_dynamics(torch.tensor([[1.0, 1.0]], dtype=torch.float64), (z * z).sum(1), 2 * z, alpha=1.0)
    torch.testing.assert_close(out, torch.tensor([[-0.5, 1.0]], dtype=torch.float64))


def test_projection_leaves_dynamics_that_already_decay_fast_enough_unchanged():
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    dynamics = torch.tensor([[-2.0, 3.0]], dtype=torch.float64)  # ∇VᵀF + αV = −4 + 1 < 0
    torch.testing.assert_close(project_dynamics(dynamics, (z * z).sum(1), 2 * z, alpha=1.0), dynamics)


def test_projection_is_zero_and_finite_at_the_minimiser_of_v():
    dynamics = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    value = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    out = project_dynamics(dynamics, value, grad, alpha=0.5)
    assert torch.equal(out, torch.zeros(2, 3, dtype=torch.float64))
    grads = torch.autograd.grad(out.sum(), (dynamics, value, grad))
    assert all(torch.isfinite(g).all() for g in grads)


def test_pull_subtracts_beta_times_the_gradient_of_v():
    dynamics, grad = randn(3, 4, seed=0), randn(3, 4, seed=1)
    torch.testing.assert_close(pull_dynamics(dynamics, grad, 0.25), dynamics - 0.25 * grad)


@pytest.mark.parametrize("centre", ["origin", "learned"])
def test_balanced_equilibrium_of_a_linear_cell_with_a_quadratic_v_is_the_closed_form(centre):
    # f(z, x) = A z + x, V = k/2 ‖z − c‖²: A z + x − z = β k (z − c)  ⇔  z* = ((1 + βk) I − A)⁻¹ (x + βk c).
    dim, beta, k = 4, 0.5, 2.0
    model = il.LyaDEQ(LinearCell(dim), dim, lyapunov=QuadraticLyapunov(dim, k), centre=centre, pull=beta, solver=TIGHT).double()
    if centre == "learned":
        with torch.no_grad():
            model.learned_centre.copy_(randn(dim, seed=5))
    x = randn(3, dim, seed=6)
    c = model.centre(x)
    expected = torch.linalg.solve((1 + beta * k) * torch.eye(dim, dtype=x.dtype) - model.cell.a.detach(), (x + beta * k * c).T).T
    torch.testing.assert_close(model.equilibrium(x).detach(), expected, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------- stability: projected readings
@FAST
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 5.0), alpha=st.floats(0.01, 2.0))
def test_v_decays_at_rate_alpha_along_the_projected_dynamics_everywhere(seed, scale, alpha):
    # dV/dt = ∇V(z)ᵀ F̃(z) ≤ −α V(z) at every state, whatever the cell, input and anchor.
    model = make_lyadeq(seed=seed % 7, alpha=alpha, gain=1.5)
    z, anchor, x = randn(16, 6, seed=seed, scale=scale), randn(16, 6, seed=seed + 1), randn(16, 5, seed=seed + 2)
    value, grad = model.lyapunov_value_and_grad(z, x, anchor)
    rate = (grad * model.dynamics(z, x, anchor)).sum(1)
    assert (rate <= -alpha * value + 1e-9 * (1 + value)).all()


@settings(max_examples=5, deadline=None)
@given(which=st.integers(0, 2), seed=st.integers(0, 10_000), scale=st.floats(0.5, 4.0))
def test_v_decreases_along_trajectories_of_the_fixed_point_reading_from_random_starts(which, seed, scale):
    # Integrate ż = F̃(z) with small Euler steps from a random start, with the anchor the layer computes:
    # V decreases monotonically and at least at the guaranteed exponential rate (up to the Euler error).
    model, anchor = MODELS[which], ANCHORS[which]
    x = randn(8, 5, seed=which)
    h, steps = 0.02, 100  # small Euler steps: the guarantee is for the continuous-time flow
    trajectory = euler_trajectory(model, randn(8, 6, seed=seed, scale=scale), x, steps, anchor, step=h)
    values = torch.stack([model.lyapunov_value(z, x, anchor) for z in trajectory])
    assert (values[1:] < values[:-1]).all()
    assert (values[-1] <= values[0] * torch.exp(torch.tensor(-0.5 * h * steps, dtype=values.dtype)) * 1.05).all()


@pytest.mark.parametrize("reading", list(READINGS))
def test_budget_readings_return_k_euler_steps_along_which_v_decreases(reading):
    # The state of a budget reading is exactly `budget` steps of z ↦ z + h F̃(z) from z_init; with a step
    # this small, V decreases at every step and from every start: perturbed initial states are pulled back.
    options = READINGS[reading]
    x = randn(6, 5, seed=1)
    for seed, scale in [(2, 0.5), (3, 3.0)]:
        start = randn(6, 6, seed=seed, scale=scale)
        model = make_lyadeq(alpha=0.5, z_init=lambda x, start=start: start, **options)
        trajectory = euler_trajectory(model, start, x, options["budget"])
        torch.testing.assert_close(model.equilibrium(x).detach(), trajectory[-1], atol=1e-12, rtol=0)
        values = torch.stack([model.lyapunov_value(z, x).detach() for z in trajectory])
        assert (values[1:] < values[:-1]).all()


def test_budget_reading_collapses_towards_the_centre_as_the_budget_grows():
    # The projected flow's only equilibrium is the centre of V, the same point for every input: as the
    # budget grows, V(z_K) -> 0 (down to the Euler error of the step), i.e. z_K -> 0 for every input.
    x, start = randn(6, 5, seed=4), randn(6, 6, seed=9, scale=3.0)
    values = []
    for budget in (10, 50, 250):
        model = make_lyadeq(alpha=0.5, centre="origin", budget=budget, step_size=0.05, z_init=start)
        with torch.no_grad():
            values.append(model.lyapunov_value(model.equilibrium(x), x))
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    assert values[2].max() < 0.05 * model.lyapunov_value(start, x).detach().max()


def test_conditioned_reading_solved_to_tolerance_stalls():
    # Measured with the solvers as they are: the centre c(x) is not a fixed point of f, so F̃ is
    # discontinuous at its only zero and neither Anderson nor Broyden get within 100x the tolerance.
    x = randn(4, 5, seed=10)
    for solver in (il.Anderson(memory=5, tol=1e-6, max_iter=200, on_failure="ignore"), il.Broyden(tol=1e-6, max_iter=200, on_failure="ignore")):
        model = make_lyadeq(alpha=0.5, centre="conditioned", solver=solver)
        with torch.no_grad():
            model.equilibrium(x)
        assert (model.last_info["block 0 (z)"].residual > 1e-4).all()


# ---------------------------------------------------------------------------------- stability: balanced readings
@pytest.mark.parametrize("centre", ["origin", "learned", "conditioned"])
def test_balanced_readings_have_one_equilibrium_that_perturbed_starts_return_to(centre):
    # F(z) − β∇V(z) with a contractive cell and a convex V is a contracting field: every start reaches
    # the same z*, the distance to it falls along the Euler map, and it satisfies f(z*) − z* = β∇V(z*).
    x = randn(5, 5, seed=0)
    reference = make_lyadeq(centre=centre, pull=0.5)
    z_star = reference.equilibrium(x).detach()
    _, grad = reference.lyapunov_value_and_grad(z_star, x)
    torch.testing.assert_close(reference.cell(z_star, x) - z_star, 0.5 * grad, atol=1e-9, rtol=0)
    for seed, scale in [(1, 0.1), (2, 3.0), (3, 20.0)]:
        start = randn(5, 6, seed=seed, scale=scale)
        moved = make_lyadeq(centre=centre, pull=0.5, z_init=lambda x, start=start: start)
        torch.testing.assert_close(moved.equilibrium(x).detach(), z_star, atol=1e-8, rtol=0)
        gaps = torch.stack([(z - z_star).norm(dim=1) for z in euler_trajectory(moved, start, x, 30)])
        assert (gaps[1:] < gaps[:-1]).all()


def test_the_balanced_state_depends_on_v_and_differs_from_the_plain_deq():
    x = randn(5, 5, seed=0)
    deq = make_lyadeq()
    plain = deq.equilibrium(x).detach()
    pulled = make_lyadeq(centre="learned", pull=0.5)
    first = pulled.equilibrium(x).detach()
    with torch.no_grad():
        pulled.learned_centre.add_(1.0)
    second = pulled.equilibrium(x).detach()
    assert (first - plain).norm(dim=1).min() > 1e-3 and (second - first).norm(dim=1).min() > 1e-3


# ---------------------------------------------------------------------------------- the fixed-point reading
def test_perturbing_the_initial_state_does_not_move_the_fixed_point():
    x = randn(5, 5, seed=0)
    reference = make_lyadeq().equilibrium(x).detach()
    for seed, scale in [(1, 0.1), (2, 3.0), (3, 20.0)]:
        start = randn(5, 6, seed=seed, scale=scale)
        moved = make_lyadeq(z_init=lambda x, start=start: start).equilibrium(x).detach()
        torch.testing.assert_close(moved, reference, atol=1e-8, rtol=0)


def test_the_equilibrium_is_the_plain_deq_fixed_point_with_the_same_cell():
    # The projection makes the DEQ's fixed point stable; it does not move it (see the concepts page).
    model = make_lyadeq()
    x = randn(5, 5, seed=0)
    deq = il.DEQ(model.cell, solver=TIGHT, z_init=lambda x: x.new_zeros(x.shape[0], 6))
    torch.testing.assert_close(model.equilibrium(x).detach(), deq(x).detach(), atol=1e-9, rtol=0)
    info = model.last_info
    assert list(info) == ["block 0 (anchor)", "block 1 (z)"] and all(bool(i.converged.all()) for i in info.values())


def test_distinct_inputs_give_distinct_fixed_points():
    model = make_lyadeq()
    x = randn(12, 5, seed=4)
    z = model.equilibrium(x).detach()
    distances = torch.cdist(z, z) + torch.eye(12, dtype=z.dtype)
    assert distances.min() > 1e-2
    path = torch.stack([(1 - s) * x[0] + s * x[1] for s in torch.linspace(0, 1, 5, dtype=x.dtype)])
    along = model.equilibrium(path).detach()
    assert ((along[1:] - along[:-1]).norm(dim=1) > 1e-3).all()


@FAST
@given(which=st.integers(0, 2), seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0), scale=st.floats(0.1, 5.0))
def test_the_layer_lyapunov_function_is_convex_along_random_segments_around_its_anchor(which, seed, t, scale):
    model, anchor = MODELS[which], ANCHORS[which]
    x = randn(8, 5, seed=which)
    a = anchor + randn(8, 6, seed=seed, scale=scale)
    b = anchor + randn(8, 6, seed=seed + 1, scale=scale)
    v = model.lyapunov_value
    mid = v(t * a + (1 - t) * b, x, anchor)
    assert (mid <= t * v(a, x, anchor) + (1 - t) * v(b, x, anchor) + 1e-10).all()
    assert (v(anchor, x, anchor).abs() < 1e-12).all() and (v(a, x, anchor) > 0).all()


# ---------------------------------------------------------------------------------- the conditioned V
@FAST
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0), scale=st.floats(0.1, 5.0))
def test_the_conditioned_lyapunov_function_is_convex_in_z_and_minimal_at_its_centre(seed, t, scale):
    torch.manual_seed(seed % 5)
    v = ConditionalLyapunovFunction(4, 3, (8, 8), dtype=torch.float64)
    with torch.no_grad():  # a context path and gates far from their zero initialisation
        for gate in v.picnn.gates:
            gate.weight.normal_()
    x = randn(8, 3, seed=seed, scale=scale)
    a, b = randn(8, 4, seed=seed + 1, scale=scale), randn(8, 4, seed=seed + 2, scale=scale)
    mid = v(t * a + (1 - t) * b, x)
    assert (mid <= t * v(a, x) + (1 - t) * v(b, x) + 1e-10).all()
    centre = v.centre(x)
    assert (v(centre, x).abs() < 1e-12).all() and (v(a, x) >= v.eps * (a - centre).pow(2).sum(1) - 1e-12).all()


def test_picnn_rejects_mismatched_shapes():
    g = PICNN(3, 2, (4,))
    with pytest.raises(ValueError, match=r"expected x of shape \(5, 2\)"):
        g(torch.randn(5, 3), torch.randn(5, 3))


# ---------------------------------------------------------------------------------- gradients
def test_projected_dynamics_gradcheck_in_float64():
    # The IFT of the projected block differentiates F̃, which contains ∇V: this checks V's second
    # derivatives too. Points are chosen so that the projection is active for some samples.
    model = make_lyadeq(gain=1.5)
    anchor, x = randn(6, 6, seed=2), randn(6, 5, seed=3)
    z = anchor + randn(6, 6, seed=1, scale=0.5)
    value, grad = model.lyapunov_value_and_grad(z, x, anchor)
    nominal = model.cell(z, x) - z
    active = (grad * nominal).sum(1) + model.alpha * value > 0
    assert active.any() and not active.all()
    inputs = tuple(t.clone().requires_grad_() for t in (z, x, anchor))
    assert torch.autograd.gradcheck(model.dynamics, inputs)
    assert torch.autograd.gradgradcheck(model.dynamics, inputs)


@pytest.mark.parametrize(
    "options",
    [{}, {"centre": "learned", "pull": 0.5}, {"centre": "conditioned", "pull": 0.5}, {"centre": "learned", "budget": 5}],
    ids=["fixed point (IFT)", "learned, pull (IFT)", "conditioned, pull (IFT)", "learned, budget (unrolled)"],
)
def test_layer_gradients_match_finite_differences_in_float64(options):
    if options.get("budget") is None:
        options = {**options, "solver": il.Anderson(memory=5, tol=1e-12, max_iter=100)}
    model = make_lyadeq(dim=4, in_features=2, **options)
    if model.learned_centre is not None:
        # Away from the start z_init = 0: F̃ is discontinuous at the centre of V (the concepts page).
        with torch.no_grad():
            model.learned_centre.copy_(randn(4, seed=4))
    x = randn(2, 2, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(model, (x,), atol=1e-6)
    name = "learned_centre" if "learned" in options.values() else "cell.bias"
    parameter = dict(model.named_parameters())[name]

    def loss(value: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {name: value}, (x.detach(),)).pow(2).sum()

    assert torch.autograd.gradcheck(loss, (parameter.detach().clone().requires_grad_(),), atol=1e-6)


def test_ift_gradients_of_the_fixed_point_reading_equal_the_plain_deq_gradients():
    model = make_lyadeq(orthogonal=False)
    x = randn(4, 5, seed=6).requires_grad_()
    deq = il.DEQ(model.cell, solver=TIGHT, z_init=lambda x: x.new_zeros(x.shape[0], 6))
    (g_lya,) = torch.autograd.grad(model(x).pow(2).sum(), x)
    (g_deq,) = torch.autograd.grad(deq(x).pow(2).sum(), x)
    torch.testing.assert_close(g_lya, g_deq, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------- training
def test_the_orthogonal_layer_stays_orthogonal_after_optimiser_steps():
    model = make_lyadeq(centre="learned", pull=0.5, solver=il.Anderson(memory=5, tol=1e-6, max_iter=100))
    x, y = randn(16, 5, seed=7), randn(16, 6, seed=8)
    before = model.orthogonal.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
    q = model.orthogonal.weight.detach()
    assert (q - before).abs().max() > 1e-3  # it trained
    # `.double()` converts a weight built orthogonal to float32 precision (torch's trivialisation base).
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=q.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, v_learns", [({}, False), ({"centre": "learned", "pull": 0.5}, True)])
def test_two_stage_training_trains_only_the_stability_module_with_the_cell_frozen(options, v_learns):
    # Stage two: the cell frozen, V (and its centre) and Q trained. With V centred at the DEQ's fixed
    # point the task loss gives V no gradient (it cannot move the state); with the balanced reading it does.
    model = make_lyadeq(**options)
    model.cell.requires_grad_(False)
    cell_before = [p.detach().clone() for p in model.cell.parameters()]
    optimizer = torch.optim.SGD(list(model.stability_parameters()), lr=0.1)
    x, target = randn(8, 5, seed=1), randn(8, 6, seed=2)
    optimizer.zero_grad()
    (model(x) - target).pow(2).sum().backward()
    grads = [p.grad for p in model.lyapunov.parameters()]
    learns = any(g is not None and g.abs().max() > 1e-10 for g in grads)
    assert learns == v_learns
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(cell_before, model.cell.parameters()))
    assert all(p.grad is None for p in model.cell.parameters())


# ---------------------------------------------------------------------------------- functional use
@pytest.mark.parametrize(
    "options", [{}, {"centre": "learned", "pull": 0.5}, {"centre": "conditioned", "budget": 3}], ids=["fixed point", "pull", "budget"]
)
def test_functional_call_leaves_the_parameters_untouched_and_state_dict_keys_are_unique(options):
    model = make_lyadeq(**options)
    state = model.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)  # every tensor under one name
    assert not any(k.startswith("layer.") for k in state)
    before = {k: v.clone() for k, v in state.items()}
    x = randn(3, 5, seed=0)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    out.pow(2).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the same values and gradients as calling the module itself
    reference = model(x)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=0)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(params[name].grad, p.grad, atol=1e-9, rtol=1e-7)


def test_vmap_over_parameters_of_a_budget_reading_matches_calls_one_by_one():
    # The budget readings are explicit networks, so `vmap` over stacked parameters works; the solved
    # readings cannot (the solver's loop stops on data), which `torch.func.vmap` does not allow.
    model = make_lyadeq(centre="conditioned", budget=3)
    x = randn(3, 5, seed=0)
    stacked = {k: torch.stack([v.detach(), v.detach() + 0.1]) for k, v in model.named_parameters()}
    with torch.no_grad():
        out = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(stacked)
        first = model(x)
        for p in model.parameters():
            p.add_(0.1)
        torch.testing.assert_close(out, torch.stack([first, model(x)]), atol=1e-12, rtol=0)


def test_functional_call_computes_with_the_given_parameters():
    model = make_lyadeq(centre="conditioned", budget=3)
    x = randn(3, 5, seed=0)
    params = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (x,))
        for p in model.parameters():
            p.add_(0.1)
        torch.testing.assert_close(out, model(x), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": 0.0}, ValueError, "alpha must be a positive"),
        ({"step_size": -1.0}, ValueError, "step_size must be a positive"),
        ({"dim": 0}, ValueError, "dim must be a positive integer"),
        ({"lyapunov": torch.nn.Linear(6, 1)}, TypeError, "value_and_grad"),
        ({"lyapunov": il.nn.LyapunovFunction(3)}, ValueError, "dimension 3, but dim=6"),
        ({"cell": 3}, TypeError, "cell must be a callable"),
        ({"z_init": "zeros"}, TypeError, "z_init must be None"),
        ({"centre": "input"}, ValueError, "centre must be one of"),
        ({"centre": "origin"}, ValueError, "every input would converge to the same point"),
        ({"centre": "learned", "budget": 3, "pull": 0.5}, ValueError, "not both"),
        ({"budget": 3}, ValueError, "budget= and pull= apply to"),
        ({"centre": "origin", "budget": 0}, ValueError, "budget must be None or a positive"),
        ({"centre": "origin", "pull": -1.0}, ValueError, "pull must be None or a positive"),
        ({"centre": "origin", "budget": 3, "solver": il.Anderson()}, ValueError, "budget=K fixes the computation"),
        ({"centre": "conditioned", "lyapunov": il.nn.LyapunovFunction(6)}, TypeError, "centre='conditioned' needs"),
        ({"lyapunov": ConditionalLyapunovFunction(6, 5)}, TypeError, "needs centre='conditioned'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    arguments = {"cell": TanhCell(6, 5), "dim": 6, **kwargs}
    with pytest.raises(error, match=message):
        il.LyaDEQ(arguments.pop("cell"), arguments.pop("dim"), **arguments)


def test_a_dim_that_does_not_fit_the_cell_raises_a_clear_error_naming_the_shapes():
    model = il.LyaDEQ(TanhCell(6, 5), 4).double()
    with pytest.raises(ValueError, match=r"LyaDEQ: the cell fails on z of shape \(B, dim\) = \(2, 4\) and x of shape \(2, 5\)") as caught:
        model(randn(2, 5, seed=0))
    assert isinstance(caught.value.__cause__, RuntimeError) and "pass the dim your cell expects" in str(caught.value)

    def widening(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # returns 6 features whatever z is
        return torch.tanh(x @ torch.ones(5, 6, dtype=x.dtype))

    with pytest.raises(ValueError, match=r"the cell returned \(2, 6\) for z of shape \(B, dim\) = \(2, 4\)"):
        il.LyaDEQ(widening, 4, centre="learned", pull=0.5).double()(randn(2, 5, seed=0))


def test_bad_calls_raise_clear_errors():
    model = make_lyadeq(z_init=lambda x: x.new_zeros(x.shape[0], 3))
    with pytest.raises(ValueError, match=r"z_init gave shape \(2, 3\); expected \(2, 6\)"):
        model(randn(2, 5, seed=0))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        make_lyadeq()([[0.0] * 5])
    with pytest.raises(ValueError, match="pass anchor="):
        make_lyadeq().dynamics(randn(2, 6, seed=0), randn(2, 5, seed=1))


# ---------------------------------------------------------------------------------- the example
def test_the_robustness_example_runs_in_fast_mode(tmp_path):
    path = ROOT / "examples" / "lyadeq_robustness.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    kinds = ["DEQ", "learned, K=10"]
    results = module.main(["--fast", "--out", str(tmp_path), "--no-progress", "--training", "two-stage", "--kinds", *kinds])
    assert torch.get_num_threads() == threads
    assert set(results) == {k + s for s in ("", " + TRADES") for k in kinds}
    for row in results.values():
        assert 0.0 <= row["PGD-3 0.2"][0] <= row["clean"][0] <= 1.0
    # Q is an isometry: it cannot move class means apart
    assert abs(results["learned, K=10"]["gap z*"][0] - results["learned, K=10"]["gap Qz*"][0]) < 1e-4
    assert {p.name for p in tmp_path.iterdir()} >= {"lyadeq_robustness.md", "lyadeq_robustness.csv", "lyadeq_robustness.png"}


def test_step_is_a_deprecated_spelling_of_step_size():
    with pytest.warns(DeprecationWarning, match="use `step_size`"):
        model = il.LyaDEQ(lambda z, x: torch.tanh(z + x), 3, step=0.25)
    assert model.step_size == 0.25
    with pytest.raises(ValueError, match="step_size must be a positive number"):
        il.LyaDEQ(lambda z, x: torch.tanh(z + x), 3, step_size=0.0)
