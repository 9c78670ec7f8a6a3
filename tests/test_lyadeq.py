"""Specifications of `il.LyaDEQ`: the projected dynamics, its Lyapunov decrease, its equilibrium, gradients.

Closed-form oracles first (the projection formula), then the Lyapunov property from random starts, the
equilibrium (input-dependent, independent of the initial state, equal to the plain DEQ's fixed point),
gradients against finite differences in float64, orthogonality through training, errors, the example.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers.models.lyadeq import project_dynamics

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = settings(max_examples=20, deadline=None)
TIGHT = il.Anderson(m=5, tol=1e-11, max_iter=200)


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


def make_lyadeq(dim: int = 6, in_features: int = 5, *, seed: int = 0, gain: float = 0.8, **kwargs) -> il.LyaDEQ:
    torch.manual_seed(seed)
    lyapunov = il.nn.LyapunovFunction(dim, (16, 16), dtype=torch.float64)
    kwargs.setdefault("solver", TIGHT)
    return il.LyaDEQ(TanhCell(dim, in_features, gain, seed), dim, lyapunov=lyapunov, **kwargs).double()


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Built once: Hypothesis draws states, inputs and anchors, not models (building and solving per example
# would dominate the test time).
MODELS = [make_lyadeq(seed=seed, alpha=0.5) for seed in range(3)]
ANCHORS = [m.solve(randn(8, 5, seed=seed)).values["anchor"] for seed, m in enumerate(MODELS)]


# ---------------------------------------------------------------------------------- the projection
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


@FAST
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 5.0), alpha=st.floats(0.01, 2.0))
def test_v_decays_at_rate_alpha_along_the_projected_dynamics_everywhere(seed, scale, alpha):
    # dV/dt = ∇V(z)ᵀ F̃(z) ≤ −α V(z) at every state, whatever the cell, input and anchor.
    model = make_lyadeq(seed=seed % 7, alpha=alpha, gain=1.5)
    z, anchor, x = randn(16, 6, seed=seed, scale=scale), randn(16, 6, seed=seed + 1), randn(16, 5, seed=seed + 2)
    value, grad = model.lyapunov.value_and_grad(z, anchor)
    rate = (grad * model.projected_dynamics(z, anchor, x)).sum(1)
    assert (rate <= -alpha * value + 1e-9 * (1 + value)).all()


@settings(max_examples=10, deadline=None)
@given(which=st.integers(0, 2), seed=st.integers(0, 10_000), scale=st.floats(0.5, 4.0))
def test_v_decreases_along_trajectories_of_the_layer_dynamics_from_random_starts(which, seed, scale):
    # Integrate ż = F̃(z) with small Euler steps from a random start, with the anchor the layer computes:
    # V decreases monotonically and at least at the guaranteed exponential rate (up to the Euler error).
    model, anchor = MODELS[which], ANCHORS[which]
    x = randn(8, 5, seed=which)
    z = randn(8, 6, seed=seed, scale=scale)
    h, steps = 0.01, 300  # small Euler steps: the guarantee is for the continuous-time flow
    values = [model.lyapunov_value(z, anchor)]
    with torch.no_grad():
        for _ in range(steps):
            z = z + h * model.projected_dynamics(z, anchor, x)
            values.append(model.lyapunov_value(z, anchor))
    values = torch.stack(values)
    assert (values[1:] < values[:-1]).all()
    assert (values[-1] <= values[0] * torch.exp(torch.tensor(-0.5 * h * steps, dtype=values.dtype)) * 1.05).all()


@FAST
@given(which=st.integers(0, 2), seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0), scale=st.floats(0.1, 5.0))
def test_the_layer_lyapunov_function_is_convex_along_random_segments_around_its_anchor(which, seed, t, scale):
    model, anchor = MODELS[which], ANCHORS[which]
    a = anchor + randn(8, 6, seed=seed, scale=scale)
    b = anchor + randn(8, 6, seed=seed + 1, scale=scale)
    v = model.lyapunov_value
    mid = v(t * a + (1 - t) * b, anchor)
    assert (mid <= t * v(a, anchor) + (1 - t) * v(b, anchor) + 1e-10).all()
    assert (v(anchor, anchor).abs() < 1e-12).all() and (v(a, anchor) > 0).all()


def test_projected_dynamics_gradcheck_in_float64():
    # The IFT of the projected block differentiates F̃, which contains ∇V: this checks V's second
    # derivatives too. Points are chosen so that the projection is active for some samples.
    model = make_lyadeq(gain=1.5)
    anchor, x = randn(6, 6, seed=2), randn(6, 5, seed=3)
    z = anchor + randn(6, 6, seed=1, scale=0.5)
    value, grad = model.lyapunov.value_and_grad(z, anchor)
    nominal = model.cell(z, x) - z
    active = (grad * nominal).sum(1) + model.alpha * value > 0
    assert active.any() and not active.all()
    inputs = tuple(t.clone().requires_grad_() for t in (z, anchor, x))
    assert torch.autograd.gradcheck(model.projected_dynamics, inputs)
    assert torch.autograd.gradgradcheck(model.projected_dynamics, inputs)


# ---------------------------------------------------------------------------------- the equilibrium
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


def test_centring_v_off_the_fixed_points_of_the_cell_leaves_no_solvable_equilibrium():
    # The documented reason for the anchor: with V centred at a point c that f does not fix (here the
    # injection-like random c), the only zero of F̃ is c, where F̃ is discontinuous; the solver stalls.
    model = make_lyadeq()
    x, centre = randn(4, 5, seed=10), randn(4, 6, seed=11)
    solver = il.Anderson(m=5, tol=1e-6, max_iter=200, on_failure="ignore")
    stalled = il.fixed_point(lambda z: z + 0.5 * model.projected_dynamics(z, centre, x), torch.zeros_like(centre), solver=solver)
    assert not bool(stalled.info.converged.any())
    anchor = model.solve(x).values["anchor"]
    solved = il.fixed_point(lambda z: z + 0.5 * model.projected_dynamics(z, anchor, x), torch.zeros_like(centre), solver=solver)
    assert bool(solved.info.converged.all())


def test_distinct_inputs_give_distinct_fixed_points():
    model = make_lyadeq()
    x = randn(12, 5, seed=4)
    z = model.equilibrium(x).detach()
    distances = torch.cdist(z, z) + torch.eye(12, dtype=z.dtype)
    assert distances.min() > 1e-2
    # and the map is not constant along a path between two inputs
    path = torch.stack([(1 - s) * x[0] + s * x[1] for s in torch.linspace(0, 1, 5, dtype=x.dtype)])
    along = model.equilibrium(path).detach()
    assert ((along[1:] - along[:-1]).norm(dim=1) > 1e-3).all()


def test_layer_gradients_match_finite_differences_in_float64():
    model = make_lyadeq(dim=4, in_features=2, solver=il.Anderson(m=5, tol=1e-10, max_iter=100))
    x = randn(2, 2, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(model, (x,), atol=1e-6)

    def loss(bias: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {"cell.bias": bias}, (x.detach(),)).pow(2).sum()

    assert torch.autograd.gradcheck(loss, (model.cell.bias.detach().clone().requires_grad_(),), atol=1e-6)


def test_ift_gradients_equal_the_plain_deq_gradients_and_reach_every_trained_part():
    model = make_lyadeq(orthogonal=False)
    x = randn(4, 5, seed=6).requires_grad_()
    deq = il.DEQ(model.cell, solver=TIGHT, z_init=lambda x: x.new_zeros(x.shape[0], 6))
    (g_lya,) = torch.autograd.grad(model(x).pow(2).sum(), x)
    (g_deq,) = torch.autograd.grad(deq(x).pow(2).sum(), x)
    torch.testing.assert_close(g_lya, g_deq, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------- orthogonal layer
def test_the_orthogonal_layer_stays_orthogonal_after_optimiser_steps():
    model = make_lyadeq(solver=il.Anderson(m=5, tol=1e-6, max_iter=100))
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


def test_orthogonal_false_returns_the_equilibrium_itself():
    model = make_lyadeq(orthogonal=False)
    x = randn(3, 5, seed=9)
    assert model.orthogonal is None
    torch.testing.assert_close(model(x), model.equilibrium(x))


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"alpha": 0.0}, ValueError, "alpha must be a positive"),
        ({"step": -1.0}, ValueError, "step must be a positive"),
        ({"dim": 0}, ValueError, "dim must be a positive integer"),
        ({"lyapunov": torch.nn.Linear(6, 1)}, TypeError, "value_and_grad"),
        ({"lyapunov": il.nn.LyapunovFunction(3)}, ValueError, "dimension 3, but dim=6"),
        ({"cell": 3}, TypeError, "cell must be a callable"),
        ({"z_init": "zeros"}, TypeError, "z_init must be None"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    arguments = {"cell": TanhCell(6, 5), "dim": 6, **kwargs}
    with pytest.raises(error, match=message):
        il.LyaDEQ(arguments.pop("cell"), arguments.pop("dim"), **arguments)


def test_bad_calls_raise_clear_errors():
    model = make_lyadeq(z_init=lambda x: x.new_zeros(x.shape[0], 3))
    with pytest.raises(ValueError, match=r"z_init gave shape \(2, 3\); expected \(2, 6\)"):
        model(randn(2, 5, seed=0))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        make_lyadeq()([[0.0] * 5])


# ---------------------------------------------------------------------------------- the example
def test_the_robustness_example_runs_in_fast_mode(tmp_path):
    path = ROOT / "examples" / "lyadeq_robustness.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    results = module.main(["--fast", "--out", str(tmp_path), "--no-progress"])
    assert torch.get_num_threads() == threads
    assert set(results) == {k + s for s in ("", " + AT") for k in ("DEQ", "LyaDEQ", "LyaDEQ w/o orth")}
    for row in results.values():
        assert 0.0 <= row["PGD-3 0.2"] <= row["clean"] <= 1.0
    assert {p.name for p in tmp_path.iterdir()} >= {"lyadeq_robustness.md", "lyadeq_robustness.csv", "lyadeq_robustness.png"}
