"""Adversarial and oracle probes of what sits on the core: the built-in models, `il.nn`, the federated
fusion maths, `il.robust`'s attacks and `il.testing`'s checks.

Each case is a closed form (a linear DEQ / JIIO / iMAML, an exact Frobenius norm, torch's own
parametrizations, a hand-computed weighted average) or an exact error message. Complements
`test_adversarial_inputs.py`, `test_adversarial_regressions.py` and `test_peer_oracles.py` (not repeated
here): gradients of the linear models against their normal equations, weight/spectral normalisation
against `torch.nn.utils.parametrizations` and torchdeq's definition, train/eval switches, `state_dict`
and `deepcopy` round trips, `.double()`, batches of one, and misuse at the models' own boundaries.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import implicitlayers as il
import implicitlayers.robust as robust
from implicitlayers.federated import quality_weights, weighted_average
from implicitlayers.models.lyadeq import project_dynamics
from implicitlayers.testing import check_batch_independence, check_gradients, check_solution
from implicitlayers.testing import strategies as ils

F64 = torch.float64


def _tight(**kw) -> il.Anderson:
    return il.Anderson(**({"tol": 1e-12, "stop": "abs", "max_iter": 300} | kw))


class _Cell(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.lin(z) + x)


def _unrolled(cell, x: torch.Tensor, steps: int = 200) -> torch.Tensor:
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return z


# ============================================================================ DEQ


def test_linear_deq_value_and_every_gradient_match_the_closed_form():
    # z = W z + U x + b: z* = (I − W)⁻¹ (U x + b); autograd through the closed form is the oracle.
    g = torch.Generator().manual_seed(0)
    W = (0.3 * torch.randn(5, 5, dtype=F64, generator=g) / 5**0.5).requires_grad_()
    U = torch.randn(5, 5, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(3, 5, dtype=F64, generator=g, requires_grad=True)
    z = il.DEQ(lambda z, x: z @ W.T + x @ U.T + b, solver=_tight())(x)
    exact = torch.linalg.solve(torch.eye(5, dtype=F64) - W, (x @ U.T + b).T).T
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-11)
    cot = torch.randn(3, 5, dtype=F64, generator=g)
    got = torch.autograd.grad((z * cot).sum(), [W, U, b, x])
    expected = torch.autograd.grad((exact * cot).sum(), [W, U, b, x])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_phantom_gradient_of_a_linear_cell_is_the_damped_neumann_sum():
    # Phantom(k, τ) from z*: dz/dx = τ Σ_{j<k} M^j with M = (1 − τ) I + τ W.
    W = 0.3 * torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: z @ W.T + x, solver=_tight(), backward=il.Phantom(k=3, damping=0.5))
    (grad,) = torch.autograd.grad(deq(x).sum(), x)
    M = 0.5 * torch.eye(3, dtype=F64) + 0.5 * W
    J = 0.5 * sum(torch.linalg.matrix_power(M, j) for j in range(3))
    torch.testing.assert_close(grad, torch.ones(2, 3, dtype=F64) @ J, rtol=0, atol=1e-13)


def test_deq_state_dict_deepcopy_and_pickle_round_trips():
    torch.manual_seed(0)
    deq = il.DEQ(_Cell(4), solver=_tight(), z_init=torch.zeros(4))
    x = torch.randn(3, 4)
    z = deq(x)
    assert list(deq.state_dict()) == ["z_init", "cell.lin.weight", "cell.lin.bias"]
    other = il.DEQ(_Cell(4), solver=_tight(), z_init=torch.ones(4))
    other.load_state_dict(deq.state_dict())
    torch.testing.assert_close(other(x), z, rtol=0, atol=0)
    twin = copy.deepcopy(deq)
    torch.testing.assert_close(twin(x), z, rtol=0, atol=0)
    with torch.no_grad():  # the copy owns its parameters: zeroing them gives z = tanh(x), the original is unchanged
        twin.cell.lin.weight.zero_()
        twin.cell.lin.bias.zero_()
    torch.testing.assert_close(twin(x), torch.tanh(x), rtol=0, atol=0)
    torch.testing.assert_close(deq(x), z, rtol=0, atol=0)


def test_deq_double_gradchecks_and_a_batch_of_one_is_its_row():
    torch.manual_seed(0)
    deq = il.DEQ(_Cell(4), solver=_tight(), z_init=torch.zeros(4)).double()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert deq(x).dtype == F64 and deq.z_init.dtype == F64
    assert torch.autograd.gradcheck(deq, (x[:2],))
    torch.testing.assert_close(deq(x[1:2]), deq(x)[1:2], rtol=0, atol=1e-12)


def test_deq_eval_mode_reaches_the_cell_and_is_deterministic():
    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.drop(self.lin(z)) + x)

    torch.manual_seed(0)
    deq = il.DEQ(Dropped(), solver=_tight()).double().eval()
    x = torch.randn(2, 4, dtype=F64)
    assert not deq.cell.training and not deq.cell.drop.training
    torch.testing.assert_close(deq(x), deq(x), rtol=0, atol=0)
    torch.testing.assert_close(deq(x), _unrolled(deq.cell, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_deq_gradients_through_normalised_weights_equal_unrolled_backprop(norm):
    torch.manual_seed(0)
    cell = _Cell(3).double()
    if norm == "weight":
        il.nn.weight_norm(cell.lin)
    else:
        il.nn.spectral_norm(cell.lin, clip=False)
    deq = il.DEQ(cell, solver=_tight())
    x = torch.randn(2, 3, dtype=F64)
    deq(x).pow(2).sum().backward()
    implicit = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    _unrolled(cell, x).pow(2).sum().backward()
    for a, e in zip(implicit, [p.grad for p in cell.parameters()]):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


@settings(max_examples=10)
@given(ils.contractive_cells(dtype=F64, linear=True))
def test_deq_and_weight_tied_on_drawn_linear_contractions(c):
    # DEQ: the exact fixed point. WeightTied from z₀ = 0: ‖z_k − z*‖ ≤ ρ^k ‖z*‖ per sample (ρ the contraction).
    z_star = c.solution()
    start = lambda x: x.new_zeros(x.shape[0], *c.z0.shape[1:])  # noqa: E731  (a callable: a (C, H, W) tensor could read as batched)
    torch.testing.assert_close(il.DEQ(c.cell, solver=_tight(), z_init=start)(c.x), z_star, rtol=0, atol=1e-9)
    z_k = il.WeightTied(c.cell, 5, z_init=start)(c.x)
    err = (z_k - z_star).flatten(1).norm(dim=1)
    assert bool((err <= c.contraction**5 * z_star.flatten(1).norm(dim=1) * (1 + 1e-9) + 1e-12).all())


def test_deq_misuse_is_named():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(TypeError, match=r"DEQ: solver must be an implicitlayers solver \(e.g. il.Anderson\(\)\), got 'x'"):
        deq.solver = "x"
    with pytest.raises(RuntimeError, match=r"FixedPoint\(z\).*z has per-sample shape \(5,\) \(taken from its start"):
        il.DEQ(lambda z, x: 0.5 * z + x, z_init=torch.zeros(5))(torch.randn(2, 3))
    with pytest.raises(TypeError, match="DEQ: z_init must be None .* got str"):
        il.DEQ(lambda z, x: z, z_init="zeros")
    with pytest.raises(TypeError, match="DEQ: a z_init tensor must be floating point, got torch.int64"):
        il.DEQ(lambda z, x: z, z_init=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="DEQ: x must be a torch.Tensor"):
        deq([1.0, 2.0])


# ============================================================================ JIIO


def _linear_jiio(A, B, r, **kw) -> il.JIIO:
    return il.JIIO(cell=lambda z, x: z @ A.T + x @ B.T, head=lambda z: z,
                   objective=lambda out, y, x: ((out - y) ** 2).sum(1) + r * (x**2).sum(1),
                   input_shape=B.shape[1], state_shape=A.shape[0], step_size=0.05, solver=_tight(max_iter=500), **kw)


def test_jiio_linear_cell_quadratic_objective_value_and_gradients_are_the_ridge_solution():
    # z = A z + B x = M x with M = (I − A)⁻¹ B; min ‖M x − y‖² + r‖x‖²: (MᵀM + rI) x = Mᵀ y.
    g = torch.Generator().manual_seed(0)
    A = (0.3 * torch.randn(3, 3, dtype=F64, generator=g)).requires_grad_()
    B = torch.randn(3, 2, dtype=F64, generator=g, requires_grad=True)
    y = torch.randn(2, 3, dtype=F64, generator=g, requires_grad=True)
    x_star, z_star = _linear_jiio(A, B, 0.5)(y)
    M = torch.linalg.solve(torch.eye(3, dtype=F64) - A, B)
    x_exact = torch.linalg.solve(M.T @ M + 0.5 * torch.eye(2, dtype=F64), (y @ M).T).T
    z_exact = x_exact @ M.T
    torch.testing.assert_close(x_star, x_exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(z_star, z_exact, rtol=0, atol=1e-10)
    gx, gz = torch.randn(2, 2, dtype=F64, generator=g), torch.randn(2, 3, dtype=F64, generator=g)
    got = torch.autograd.grad((x_star * gx).sum() + (z_star * gz).sum(), [y, A, B])
    expected = torch.autograd.grad((x_exact * gx).sum() + (z_exact * gz).sum(), [y, A, B])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_jiio_first_order_backward_holds_x_star_constant():
    g = torch.Generator().manual_seed(0)
    A = (0.3 * torch.randn(3, 3, dtype=F64, generator=g)).requires_grad_()
    y = torch.randn(2, 3, dtype=F64, generator=g, requires_grad=True)
    x_star, z_star = _linear_jiio(A, torch.eye(3, dtype=F64), 0.5, backward=il.IFT(first_order=True))(y)
    (grad_A,) = torch.autograd.grad(z_star.sum(), A)
    exact = torch.linalg.solve(torch.eye(3, dtype=F64) - A, x_star.detach().T).T
    torch.testing.assert_close(grad_A, torch.autograd.grad(exact.sum(), A)[0], rtol=0, atol=1e-10)
    assert torch.autograd.grad(x_star.sum(), y, allow_unused=True)[0] is None


def test_jiio_maximize_of_the_negated_objective_is_the_same_point_and_x0_is_only_a_start():
    y = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.5, 3.0]], dtype=F64)
    # z = 0.5 z + x (z = 2x), L = ‖z − y‖² + 0.5‖x‖²: x* = 2y / 4.5.
    jiio = il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                   objective=lambda out, t, x: -((out - t) ** 2).sum(1) - 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1, maximize=True, solver=_tight(max_iter=500))
    for x0 in (None, torch.ones(3, dtype=F64), torch.ones(2, 3, dtype=F64)):
        torch.testing.assert_close(jiio(y, x0=x0)[0], 2 * y / 4.5, rtol=0, atol=1e-10)
    torch.testing.assert_close(copy.deepcopy(jiio)(y)[0], 2 * y / 4.5, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"JIIO: x0 has shape \(2, 2\); it must be \(2, \*input_shape\) = \(2, 3\)"):
        jiio(y, x0=torch.ones(2, 2, dtype=F64))


@pytest.mark.parametrize("constraint", [il.sets.L2Ball(0.5), il.sets.LInfBall(0.3)], ids=["l2", "linf"])
def test_jiio_in_a_ball_is_the_projection_of_the_isotropic_optimum(constraint):
    # ‖2x − y‖² + 0.5‖x‖² is isotropic around 2y/4.5, so the constrained optimum is its projection.
    y = torch.tensor([[1.0, 2.0, -1.0], [0.1, 0.0, 0.2]], dtype=F64)
    jiio = il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                   objective=lambda out, t, x: ((out - t) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1, constraint=constraint, solver=_tight(max_iter=500))
    x_star, z_star = jiio(y)
    free = 2 * y / 4.5
    if isinstance(constraint, il.sets.L2Ball):
        expected = free * (0.5 / free.norm(dim=1, keepdim=True)).clamp(max=1.0)
    else:
        expected = free.clamp(-0.3, 0.3)
    torch.testing.assert_close(x_star, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(z_star, 2 * x_star, rtol=0, atol=1e-10)


def test_jiio_context_reaches_cell_and_head_and_its_gradient_is_exact():
    # z = 0.5 z + x + c, i.e. z = 2(x + c): x* = 2(y − 2c)/4.5, so ∂x*/∂c = −4/4.5.
    y = torch.tensor([[1.0, 2.0, -1.0], [0.1, 0.0, 0.2]], dtype=F64)
    c = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    jiio = il.JIIO(cell=lambda z, x, c: 0.5 * z + x + c, head=lambda z, c: z,
                   objective=lambda out, t, x: ((out - t) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1, solver=_tight(max_iter=500))
    x_star, _ = jiio(y, c)
    torch.testing.assert_close(x_star, 2 * (y - 2 * c) / 4.5, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(x_star.sum(), c)[0], torch.full((2, 3), -4 / 4.5, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"step_size": 0}, ValueError, r'Minimize\(x\): step_size must be positive and finite, or "auto", got 0'),
        ({"step_size": float("nan")}, ValueError, r"Minimize\(x\): step_size must be positive and finite"),
        ({"damping": 1.5}, ValueError, r"FixedPoint\(z\): damping must be positive and at most 1.0, got 1.5"),
        ({"adjoint_damping": -1}, ValueError, r"Minimize\(x\): adjoint_damping must be positive and at most 1.0"),
        ({"constraint": "box"}, TypeError, r"Minimize\(x\): constraint must be an il.sets set"),
        ({"z_init": torch.zeros(3)}, ValueError, "JIIO: give exactly one of state_shape="),
    ],
)
def test_jiio_options_out_of_range_are_named(options, error, match):
    base = {"cell": lambda z, x: 0.5 * z + x, "head": lambda z: z, "objective": lambda o, t, x: ((o - t) ** 2).sum(1),
            "input_shape": 3, "state_shape": 3}
    with pytest.raises(error, match=match):
        il.JIIO(**(base | options))


def test_jiio_objective_that_reduces_over_the_batch_is_named():
    jiio = il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z, objective=lambda o, t, x: ((o - t) ** 2).sum(),
                   input_shape=3, state_shape=3)
    with pytest.raises(ValueError, match=r"the objective returned \(\); it must return one value per sample, shape \(2,\)"):
        jiio(torch.ones(2, 3, dtype=F64))


# ============================================================================ iMAML


def _regression(T: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, 5, *s, dtype=F64, generator=g) for s in ((2,), (1,), (2,), (1,))]


def _exact_meta_gradient(theta, X, Y, Qx, Qy, lam, bias):
    # φ_t = argmin mean((A φ − y)²) + λ/2 ‖φ − θ‖²: (2AᵀA/N + λI) φ = 2Aᵀy/N + λθ; loss = mean over T·N.
    theta = theta.clone().requires_grad_()
    total = 0.0
    for t in range(X.shape[0]):
        A = torch.cat([X[t], torch.ones(5, 1, dtype=F64)], 1) if bias else X[t]
        Aq = torch.cat([Qx[t], torch.ones(5, 1, dtype=F64)], 1) if bias else Qx[t]
        phi = torch.linalg.solve(2 * A.T @ A / 5 + lam * torch.eye(A.shape[1], dtype=F64), 2 * A.T @ Y[t, :, 0] / 5 + lam * theta)
        total = total + ((Aq @ phi - Qy[t, :, 0]) ** 2).mean() / X.shape[0]
    return torch.autograd.grad(total, theta)[0]


@pytest.mark.parametrize(
    "lam, bias, options",
    [
        (1.0, False, {}),
        (5.0, True, {}),
        (1.0, False, {"step_size": 0.1}),
        (1.0, False, {"solver": il.Broyden(tol=1e-12, stop="abs", max_iter=300)}),
        (1.0, False, {"step_size": 0.1, "backward": il.Unroll()}),
    ],
    ids=["auto", "bias-lam5", "float-step", "broyden", "unroll"],
)
def test_imaml_meta_gradient_on_linear_regression_is_the_normal_equation_gradient(lam, bias, options):
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=bias).double()
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=lam, **({"solver": _tight(max_iter=500)} | options))
    X, Y, Qx, Qy = _regression()
    out = imaml.functional(imaml(X, Y), Qx)
    ((out - Qy) ** 2).mean().backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, _exact_meta_gradient(theta, X, Y, Qx, Qy, lam, bias), rtol=0, atol=1e-11)


def test_imaml_phantom_meta_gradient_is_the_damped_neumann_sum_of_the_gradient_step_map():
    # φ ← φ − α(∇L + λ(φ − θ)): k damped steps give dφ/dθ = τ α λ Σ_{j<k} M^j, M = I − τ α (H + λI).
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).double()
    alpha, lam, tau, k = 0.1, 1.0, 0.5, 3
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=lam, step_size=alpha,
                     backward=il.Phantom(k=k, damping=tau), solver=_tight(max_iter=500))
    X, Y, _, _ = _regression(T=2)
    cot = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad((imaml(X, Y)["weight"][:, 0, :] * cot).sum(), model.weight)
    expected = torch.zeros(2, dtype=F64)
    for t in range(2):
        M = torch.eye(2, dtype=F64) - tau * alpha * (2 * X[t].T @ X[t] / 5 + lam * torch.eye(2, dtype=F64))
        expected += cot[t] @ (tau * alpha * lam * sum(torch.linalg.matrix_power(M, j) for j in range(k)))
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-14)


def test_imaml_gradchecks_in_support_data_and_copies_are_independent():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=1.0, solver=_tight(max_iter=500))
    X, Y, _, _ = _regression(T=2)
    assert torch.autograd.gradcheck(lambda X, Y: imaml(X, Y)["weight"], (X.requires_grad_(), Y.requires_grad_()))
    before = imaml(X, Y)["weight"].detach()
    twin = copy.deepcopy(imaml)
    with torch.no_grad():
        twin.model.weight.add_(1.0)
    assert (twin(X, Y)["weight"] - before).abs().max() > 1e-3
    torch.testing.assert_close(imaml(X, Y)["weight"].detach(), before, rtol=0, atol=1e-14)
    assert list(imaml.state_dict()) == ["model.weight", "model.bias"]


def test_imaml_adapts_only_trainable_parameters():
    model = nn.Linear(2, 1).double()
    model.bias.requires_grad_(False)
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=1.0, solver=_tight(max_iter=500))
    X, Y, _, _ = _regression()
    assert sorted(imaml(X, Y)) == ["weight"]


@pytest.mark.parametrize(
    "layer, match",
    [
        (nn.BatchNorm1d(4), "Batch norm got a batched tensor as input while the running_mean"),
        (nn.Dropout(0.5), "vmap: called random operation while in randomness error mode"),
    ],
    ids=["batchnorm", "dropout"],
)
def test_imaml_train_mode_layers_that_cannot_be_vectorised_are_named_and_eval_mode_works(layer, match):
    model = nn.Sequential(nn.Linear(2, 4), layer, nn.Tanh(), nn.Linear(4, 1))
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=1.0)
    X, Y = torch.randn(3, 5, 2), torch.randn(3, 5, 1)
    with pytest.raises(ValueError, match=r"IMAML: evaluating inner_loss\(model\(support_x\[t\]\), support_y\[t\]\) failed .*" + match):
        imaml(X, Y)
    model.eval()
    assert imaml(X, Y)["0.weight"].shape == (3, 4, 2)


def test_imaml_misuse_is_named():
    imaml = il.IMAML(nn.Linear(2, 1), lambda p, t: ((p - t) ** 2).mean(), lam=1.0)
    with pytest.raises(TypeError, match="input 'support_y' is torch.float64 but 'theta' is torch.float32"):
        imaml(torch.randn(3, 5, 2), torch.randn(3, 5, 1, dtype=F64))
    X = torch.randn(3, 5, 2)
    X[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"IMAML: the curvature estimate of L_train at θ is not finite \(nan\)"):
        imaml(X, torch.randn(3, 5, 1))
    with pytest.raises(ValueError, match="input 'support_x' contains NaN or Inf"):
        il.IMAML(nn.Linear(2, 1), lambda p, t: ((p - t) ** 2).mean(), lam=1.0, step_size=0.1)(X, torch.randn(3, 5, 1))
    elementwise = il.IMAML(nn.Linear(2, 1), lambda p, t: (p - t) ** 2, lam=1.0)
    with pytest.raises(ValueError, match=r"IMAML: inner_loss must return a scalar per task, got shape \(5, 1\)"):
        elementwise(torch.randn(3, 5, 2), torch.randn(3, 5, 1))
    with pytest.raises(ValueError, match="IMAML: power_iters must be a positive int"):
        il.IMAML(nn.Linear(2, 1), lambda p, t: p.sum(), lam=1.0, power_iters=0)
    with pytest.raises(ValueError, match="IMAML: step_size must be 'auto' or a positive finite number"):
        il.IMAML(nn.Linear(2, 1), lambda p, t: p.sum(), lam=1.0, step_size=float("nan"))


# ============================================================================ LyaDEQ


def test_lyadeq_fixed_point_centre_is_the_deq_and_q_is_orthogonal():
    torch.manual_seed(0)
    cell = _Cell(3).double()
    lyadeq = il.LyaDEQ(cell, 3, solver=_tight()).double()
    x = torch.randn(4, 3, dtype=F64)
    z = lyadeq.equilibrium(x)
    torch.testing.assert_close(z, il.DEQ(cell, solver=_tight())(x), rtol=0, atol=1e-10)
    Q = lyadeq.orthogonal.weight
    torch.testing.assert_close(lyadeq(x), z @ Q.T + lyadeq.orthogonal.bias, rtol=0, atol=1e-14)
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=F64), rtol=0, atol=1e-6)  # built in float32, then .double()
    torch.testing.assert_close(lyadeq(x[1:2]), lyadeq(x)[1:2], rtol=0, atol=1e-12)
    a = lyadeq(x)
    torch.testing.assert_close(lyadeq.eval()(x), a, rtol=0, atol=0)


def test_lyadeq_pull_equilibrium_satisfies_its_balance_and_round_trips():
    torch.manual_seed(0)
    lyadeq = il.LyaDEQ(_Cell(3), 3, centre="learned", pull=0.5, solver=_tight()).double()
    x = torch.randn(4, 3, dtype=F64)
    z = lyadeq.equilibrium(x)
    _, grad_v = lyadeq.lyapunov_value_and_grad(z, x)
    torch.testing.assert_close(lyadeq.cell(z, x) - z, 0.5 * grad_v, rtol=0, atol=1e-10)  # f(z) − z = β ∇V(z)
    other = il.LyaDEQ(_Cell(3), 3, centre="learned", pull=0.5, solver=_tight()).double()
    other.load_state_dict(lyadeq.state_dict())
    torch.testing.assert_close(other(x), lyadeq(x), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(lyadeq)(x), lyadeq(x), rtol=0, atol=0)


def test_lyadeq_budget_is_exactly_k_euler_steps_and_gradchecks():
    torch.manual_seed(0)
    lyadeq = il.LyaDEQ(_Cell(3), 3, centre="origin", budget=4, step_size=0.3, orthogonal=False).double()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z = torch.zeros(2, 3, dtype=F64)
    for _ in range(4):
        z = z + 0.3 * lyadeq.dynamics(z, x)
    torch.testing.assert_close(lyadeq(x), z, rtol=0, atol=1e-14)
    assert lyadeq.nfe == 4 and lyadeq.last_info is None
    assert torch.autograd.gradcheck(lyadeq, (x,), atol=1e-6)


def test_projected_dynamics_decay_rate_identity():
    # After the projection ∇Vᵀ F̃ = min(∇Vᵀ F, −α V), per sample; ∇V = 0 leaves F unchanged (no NaN).
    g = torch.Generator().manual_seed(0)
    Fz, V, G = torch.randn(5, 3, dtype=F64, generator=g), torch.rand(5, dtype=F64, generator=g), torch.randn(5, 3, dtype=F64, generator=g)
    G[2] = 0.0
    out = project_dynamics(Fz, V, G, 0.3)
    keep = torch.arange(5) != 2
    torch.testing.assert_close((G * out).sum(1)[keep], torch.minimum((G * Fz).sum(1), -0.3 * V)[keep], rtol=0, atol=1e-14)
    torch.testing.assert_close(out[2], Fz[2], rtol=0, atol=0)


def test_lyadeq_misuse_is_named():
    with pytest.raises(ValueError, match=r"LyaDEQ: z_init gave shape \(4,\); expected \(2, 3\) or \(3,\)"):
        il.LyaDEQ(_Cell(3), 3, z_init=torch.zeros(4))(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"LyaDEQ: the cell fails on z of shape \(B, dim\) = \(2, 3\) and x of shape \(2, 4\)"):
        il.LyaDEQ(_Cell(3), 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"LyaDEQ: x must have a non-empty leading batch dimension, got shape \(0, 3\)"):
        il.LyaDEQ(_Cell(3), 3)(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="LyaDEQ: budget must be None or a positive number of Euler steps, got 3.0"):
        il.LyaDEQ(_Cell(3), 3, centre="origin", budget=3.0)
    with pytest.raises(ValueError, match="LyaDEQ: pull must be None or a positive .*got nan"):
        il.LyaDEQ(_Cell(3), 3, centre="origin", pull=float("nan"))


# ============================================================================ WeightTied


def test_weight_tied_masked_steps_equal_the_hand_loop_and_round_trip():
    torch.manual_seed(0)
    cell = _Cell(4).double()
    wt = il.WeightTied(cell, 3, masks="random", density=0.5, seed=1)
    x = torch.randn(3, 4, dtype=F64)
    z = torch.zeros(3, 4, dtype=F64)
    for step in range(3):
        mask = wt.mask(step)["lin"].to(F64)
        z = torch.tanh(0.5 * F.linear(z, cell.lin.weight * mask, cell.lin.bias) + x)
    torch.testing.assert_close(wt(x), z, rtol=0, atol=0)
    assert [wt.mask(s)["lin"].sum().item() for s in range(3)] == [8, 8, 8]
    assert len({wt.mask(s)["lin"].numpy().tobytes() for s in range(3)}) == 3
    assert "forward" not in vars(cell.lin)  # the cell is left untouched
    assert list(wt.state_dict()) == ["mask_lin", "cell.lin.weight", "cell.lin.bias"]
    other = il.WeightTied(_Cell(4).double(), 3, masks="random", seed=4)
    other.load_state_dict(wt.state_dict())
    torch.testing.assert_close(other(x), z, rtol=0, atol=0)
    assert torch.autograd.gradcheck(wt, (x[:2].clone().requires_grad_(),))


def test_weight_tied_restores_the_cell_after_an_error_and_tends_to_the_deq():
    torch.manual_seed(0)
    cell = _Cell(4).double()
    wt = il.WeightTied(cell, 3, masks="random")
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(2x5 and 4x4\)"):
        wt(torch.randn(2, 5, dtype=F64))
    assert "forward" not in vars(cell.lin)
    x = torch.randn(2, 4, dtype=F64)
    torch.testing.assert_close(il.WeightTied(cell, 200)(x), il.DEQ(cell, solver=_tight())(x), rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"masks": "random", "density": 0}, r"WeightTied: density must be a number in \(0, 1\], got 0"),
        ({"masks": "random", "density": float("nan")}, r"WeightTied: density must be a number in \(0, 1\], got nan"),
        ({"masks": [torch.ones(4, 4)] * 2}, "WeightTied: masks must be a list of depth=3 masks .* got 2 entries"),
        ({"masks": [torch.full((4, 4), 0.5)] * 3}, r"WeightTied: masks\[0\]\['lin'\] must hold only 0 and 1"),
        ({"masks": [torch.ones(4, 3)] * 3}, r"WeightTied: masks\[0\]\['lin'\] has shape \(4, 3\), the weight \(4, 4\)"),
        ({"density": 0.5}, "WeightTied: density and seed apply to masks='random' only"),
    ],
)
def test_weight_tied_bad_masks_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        il.WeightTied(_Cell(4), 3, **options)


# ============================================================================ il.nn norms


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_equals_torch_parametrization_after_moving_g_and_v(dim):
    torch.manual_seed(0)
    ours = nn.Linear(4, 3).double()
    theirs = copy.deepcopy(ours)
    il.nn.weight_norm(ours, dim=dim)
    torch.nn.utils.parametrizations.weight_norm(theirs, dim=dim)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-15)
    with torch.no_grad():
        for m in (ours, theirs):
            m.parametrizations.weight.original0.mul_(2.0)
            m.parametrizations.weight.original1.add_(0.3)
    assert ours.parametrizations.weight.original0.shape == theirs.parametrizations.weight.original0.shape
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-15)


def test_weight_norm_of_a_convolution_equals_torch_and_torchdeq_definition():
    torch.manual_seed(0)
    ours = nn.Conv2d(2, 3, 3).double()
    theirs = copy.deepcopy(ours)
    il.nn.weight_norm(ours)
    torch.nn.utils.parametrizations.weight_norm(theirs)
    with torch.no_grad():
        for m in (ours, theirs):
            m.parametrizations.weight.original1.mul_(3.0).add_(0.1)
    v, g = ours.parametrizations.weight.original1, ours.parametrizations.weight.original0
    torchdeq = v * (g / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))  # torchdeq's WeightNorm, dim=0
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours.weight, torchdeq, rtol=0, atol=1e-15)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(3, 4, 3), lambda: nn.ConvTranspose2d(3, 4, 3)], ids=["conv", "deconv"])
def test_spectral_norm_scale_mode_equals_torch_parametrization(make):
    # clip=False is torch's (and torchdeq's learn_scale=False, target_norm=1) W / σ.
    torch.manual_seed(0)
    ours = make().double()
    theirs = copy.deepcopy(ours)
    il.nn.spectral_norm(ours, clip=False)
    torch.nn.utils.parametrizations.spectral_norm(theirs, n_power_iterations=100)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=1e-6)


def test_spectral_norm_clip_and_scale_against_the_exact_sigma():
    torch.manual_seed(0)
    big = nn.Linear(6, 4).double()
    with torch.no_grad():
        big.weight.mul_(10.0)
    raw = big.weight.detach().clone()
    il.nn.spectral_norm(big, bound=0.9)  # σ > bound: torchdeq's clip, min(1, bound/σ) · W
    torch.testing.assert_close(big.weight, raw * 0.9 / torch.linalg.matrix_norm(raw, 2), rtol=1e-9, atol=0)
    small = nn.Linear(6, 4).double()
    with torch.no_grad():
        small.weight.mul_(0.01)
    raw = small.weight.detach().clone()
    il.nn.spectral_norm(small)
    torch.testing.assert_close(small.weight, raw, rtol=0, atol=0)  # within the bound: unchanged


def test_spectral_norm_state_dict_deepcopy_double_and_eval():
    torch.manual_seed(0)
    a = il.nn.spectral_norm(nn.Linear(5, 5), clip=False)
    assert list(a.state_dict()) == ["bias", "parametrizations.weight.original", "parametrizations.weight.0._u",
                                    "parametrizations.weight.0._v"]
    b = il.nn.spectral_norm(nn.Linear(5, 5), clip=False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 5)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(a)(x), a(x), rtol=0, atol=0)
    a.double()
    assert a(x.double()).dtype == F64 and a.parametrizations.weight[0]._u.dtype == F64
    u = a.parametrizations.weight[0]._u.clone()
    with torch.no_grad():
        a.parametrizations.weight.original.add_(1.0)
    a(x.double())  # eval: the power iteration does not move
    torch.testing.assert_close(a.parametrizations.weight[0]._u, u, rtol=0, atol=0)


def test_norms_misuse_is_named():
    with pytest.raises(ValueError, match=r"weight_norm: dim=2 is out of range for weight of shape \(3, 4\)"):
        il.nn.weight_norm(nn.Linear(4, 3), dim=2)
    with pytest.raises(ValueError, match="spectral_norm: bound must be (a )?positive.* got nan"):
        il.nn.spectral_norm(nn.Linear(3, 3), bound=float("nan"))
    with pytest.raises(ValueError, match="weight_norm: Linear has no tensor attribute 'kernel'"):
        il.nn.weight_norm(nn.Linear(3, 3), name="kernel")
    with pytest.raises(TypeError, match="spectral_norm: expected a torch.nn.Module, got Tensor"):
        il.nn.spectral_norm(torch.ones(3, 3))


# ============================================================================ regulariser, spectral radius


def test_jacobian_regularizer_is_the_exact_frobenius_norm_in_expectation():
    # Per-sample linear maps: ‖J_b‖_F² exactly. Hutchinson's relative spread is at most √(2/probes) (2.2 % for
    # 4000 probes); the seed is fixed, and 5 % is more than twice that.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 4, dtype=F64, generator=g)
    f = lambda z: torch.einsum("bij,bj->bi", A, z)  # noqa: E731
    z = torch.randn(3, 4, dtype=F64, generator=g)
    exact = (A**2).sum((1, 2))
    est = il.nn.jacobian_regularizer(f, z, probes=4000, reduction="none", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)
    normalized = il.nn.jacobian_regularizer(f, z, probes=4000, normalize=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(normalized, (est / 4).mean(), rtol=1e-12, atol=0)
    W = torch.randn(3, 5, dtype=F64, generator=g)  # non-square: (B, 5) -> (B, 3)
    rect = il.nn.jacobian_regularizer(lambda z: z @ W.T, torch.randn(2, 5, dtype=F64), probes=4000,
                                      generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rect, (W**2).sum(), rtol=0.05, atol=0)


def test_jacobian_regularizer_graph_follows_grad_mode_and_nan_stays_in_its_sample():
    W = torch.randn(4, 4, dtype=F64, requires_grad=True)
    z = torch.randn(3, 4, dtype=F64)
    assert il.nn.jacobian_regularizer(lambda z: torch.tanh(z @ W.T), z).requires_grad
    assert not il.nn.jacobian_regularizer(lambda z: z @ W.T, z, create_graph=False).requires_grad
    with torch.no_grad():
        assert not il.nn.jacobian_regularizer(lambda z: z @ W.T, z).requires_grad
    z[1, 0] = float("nan")
    per_sample = il.nn.jacobian_regularizer(torch.tanh, z, reduction="none")
    assert per_sample.isnan().tolist() == [False, True, False]


def test_spectral_radius_of_per_sample_linear_maps_is_the_largest_eigenvalue_modulus():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 5, 5, dtype=F64, generator=g)
    rho = il.nn.spectral_radius(lambda z: torch.einsum("bij,bj->bi", A, z), torch.randn(3, 5, dtype=F64), n_iter=400,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, torch.linalg.eigvals(A).abs().max(1).values, rtol=1e-3, atol=0)
    nilpotent = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)
    assert il.nn.spectral_radius(lambda z: z @ nilpotent.T, torch.randn(2, 2, dtype=F64)).max() < 1e-300


def test_regularizers_misuse_is_named():
    with pytest.raises(ValueError, match="jacobian_regularizer: probes must be an integer >= 1, got 2.0"):
        il.nn.jacobian_regularizer(lambda z: z, torch.randn(2, 3), probes=2.0)
    with pytest.raises(ValueError, match="jacobian_regularizer: reduction must be 'mean' or 'none', got 'sum'"):
        il.nn.jacobian_regularizer(lambda z: z, torch.randn(2, 3), reduction="sum")
    with pytest.raises(ValueError, match=r"jacobian_regularizer: f returned \(\) for z of shape \(2, 3\)"):
        il.nn.jacobian_regularizer(lambda z: z.sum(), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"jacobian_regularizer: z must be a floating-point tensor .* got shape \(2, 3\), dtype torch.int64"):
        il.nn.jacobian_regularizer(lambda z: z, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="spectral_radius: n_iter must be an integer >= 1, got 0"):
        il.nn.spectral_radius(lambda z: z, torch.randn(2, 3), n_iter=0)


# ============================================================================ ICNN, Lyapunov, orthogonal


def test_icnn_and_picnn_are_convex_for_any_raw_weights():
    torch.manual_seed(0)
    icnn, picnn = il.nn.ICNN(3, (8, 8)).double(), il.nn.PICNN(3, 2, (8, 8)).double()
    with torch.no_grad():
        for p in [*icnn.parameters(), *picnn.parameters()]:
            p.copy_(2 * torch.randn_like(p))
    a, b = (3 * torch.randn(200, 3, dtype=F64) for _ in range(2))
    t, ctx = torch.rand(200, dtype=F64), torch.randn(200, 2, dtype=F64)
    mid = t[:, None] * a + (1 - t[:, None]) * b
    assert bool((icnn(mid) <= t * icnn(a) + (1 - t) * icnn(b) + 1e-9).all())
    assert bool((picnn(mid, ctx) <= t * picnn(a, ctx) + (1 - t) * picnn(b, ctx) + 1e-9).all())


def test_lyapunov_function_is_zero_at_its_centre_bounded_below_and_its_gradient_is_autograd():
    torch.manual_seed(0)
    V = il.nn.LyapunovFunction(3, (8,)).double()
    ref = torch.randn(3, dtype=F64)
    z = 2 * torch.randn(50, 3, dtype=F64)
    value, grad = V.value_and_grad(z, ref)
    assert bool((value >= V.eps * ((z - ref) ** 2).sum(1) - 1e-12).all())
    assert V(ref.expand(2, 3), ref).abs().max().item() == 0.0
    expected = torch.func.vmap(torch.func.grad(lambda zz: V(zz[None], ref)[0]))(z)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(value, V(z, ref), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"LyapunovFunction: expected z of shape \(B, 3\), got \(2, 4\)"):
        V(torch.randn(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="LyapunovFunction: eps must be positive"):
        il.nn.LyapunovFunction(3, eps=0)


def test_orthogonal_linear_is_an_isometry_either_way():
    tall, wide = il.nn.OrthogonalLinear(4, 6, dtype=F64), il.nn.OrthogonalLinear(6, 4, dtype=F64)
    torch.testing.assert_close(tall.weight.T @ tall.weight, torch.eye(4, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(wide.weight @ wide.weight.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-14)


# ============================================================================ federated fusion


def test_quality_weights_against_hand_computations():
    assert quality_weights([100, 100, 200], [0.9, 0.6, 0.75]) == pytest.approx([0.3, 0.2, 0.5], abs=1e-15)
    assert quality_weights([1, 3], [0.7, 0.7]) == pytest.approx([0.25, 0.75], abs=1e-15)  # equal q: FedAvg
    assert quality_weights([1, 3], [0.0, 0.0]) == pytest.approx([0.25, 0.75], abs=1e-15)  # no information: FedAvg
    assert quality_weights([0, 5], [0.5, 0.5]) == pytest.approx([0.0, 1.0], abs=1e-15)  # an empty client
    # lower is better: w ∝ n / (q + ε)
    expected = [1 / 1e-8, 1 / (1 + 1e-8)]
    assert quality_weights([1, 1], [0.0, 1.0], lower_is_better=True) == pytest.approx(
        [expected[0] / sum(expected), expected[1] / sum(expected)], rel=1e-12)
    assert quality_weights([1, 1], [1e-320, 0.0]) == pytest.approx([1.0, 0.0], abs=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([], []), {}, "need one quality per client and at least one client, got 0"),
        (([1], [1, 2]), {}, "got 1 example counts and 2 qualities"),
        (([-1, 2], [1, 1]), {}, r"num_examples\[0\] = -1; every value must be finite and non-negative"),
        (([1, 1], [float("inf"), 1]), {}, r"quality\[0\] = inf"),
        (([0, 0], [1, 1]), {}, "every client reported 0 examples"),
        (([1, 1], [1, 2]), {"lower_is_better": True, "eps": 0}, "quality_weights: eps must be positive.*got 0"),
    ],
)
def test_quality_weights_misuse_is_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quality_weights(*args, **kwargs)


def test_weighted_average_against_a_hand_computation_keeps_dtypes():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3), "mask": torch.tensor([True, False]),
         "half": torch.tensor([1.0], dtype=torch.float16), "c": torch.tensor([1 + 1j])}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5), "mask": torch.tensor([False, True]),
         "half": torch.tensor([3.0], dtype=torch.float16), "c": torch.tensor([3 - 1j])}
    fused = weighted_average([a, b], [0.25, 0.75])
    torch.testing.assert_close(fused["w"], torch.tensor([2.5, 5.0]), rtol=0, atol=0)
    torch.testing.assert_close(fused["half"], torch.tensor([2.5], dtype=torch.float16), rtol=0, atol=0)
    torch.testing.assert_close(fused["c"], torch.tensor([2.5 - 0.5j]), rtol=0, atol=1e-7)
    assert fused["steps"].item() == 5 and fused["mask"].tolist() == [False, True]  # the heaviest client's
    assert weighted_average([a, b], [0.5, 0.5])["steps"].item() == 3  # a tie: the first client
    leaf = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    assert not weighted_average([leaf, leaf], [0.5, 0.5])["w"].requires_grad


@pytest.mark.parametrize(
    "states, weights, match",
    [
        ([], [], "need one weight per state dict and at least one state dict, got 0"),
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [0.5, 0.5], r"state dict 1 has different keys .*missing \['w'\], extra \['v'\]"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5], r"entry 'w' of state dict 1 is \(3,\) torch.float32"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=F64)}], [0.5, 0.5], "torch.float64, but"),
        ([{"w": torch.zeros(2)}] * 2, [float("nan"), 1.0], r"weights must be finite, got \[nan, 1.0\]"),
    ],
)
def test_weighted_average_misuse_is_named(states, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


# ============================================================================ robust


def test_fgsm_on_a_linear_classifier_is_the_signed_cross_entropy_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).double()
    x, y = 0.2 + 0.6 * torch.rand(4, 6, dtype=F64), torch.tensor([0, 1, 2, 0])
    grad = (torch.softmax(lin(x), 1) - F.one_hot(y, 3).double()) @ lin.weight  # ∂CE/∂x, per sample
    torch.testing.assert_close(robust.fgsm(lin, x, y, eps=0.1), (x + 0.1 * grad.sign()).clamp(0, 1), rtol=0, atol=0)
    l2 = (x + 0.1 * grad / grad.norm(dim=1, keepdim=True)).clamp(0, 1)
    torch.testing.assert_close(robust.fgsm(lin, x, y, eps=0.1, norm="l2"), l2, rtol=0, atol=1e-15)
    assert lin.weight.grad is None


def test_fgsm_through_a_deq_equals_the_unrolled_gradient_sign():
    W = 0.3 * torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    head = nn.Linear(4, 3).double()
    deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver=_tight())
    x, y = torch.rand(3, 4, dtype=F64), torch.tensor([0, 1, 2])
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(head(_unrolled(lambda z, x: torch.tanh(z @ W.T + x), xr)), y, reduction="sum"), xr)
    torch.testing.assert_close(robust.fgsm(nn.Sequential(deq, head), x, y, eps=0.05), (x + 0.05 * grad.sign()).clamp(0, 1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box_restores_modes_and_best_dominates(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    x, y = torch.rand(5, 6, dtype=F64), torch.randint(0, 3, (5,))
    x_adv = robust.pgd(model, x, y, eps=0.2, norm=norm, steps=10, generator=torch.Generator().manual_seed(0))
    d = x_adv - x
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((size <= 0.2 + 1e-12).all()) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and model[2].training and all(p.grad is None for p in model.parameters())
    model.eval()
    ce = lambda x_: F.cross_entropy(model(x_), y, reduction="none")  # noqa: E731
    best = robust.pgd(model, x, y, eps=0.3, norm=norm, steps=5, select="best", random_start=False)
    last = robust.pgd(model, x, y, eps=0.3, norm=norm, steps=5, select="last", random_start=False)
    assert bool((ce(best) >= ce(last) - 1e-12).all()) and bool((ce(best) >= ce(x) - 1e-12).all())


def test_trades_and_accuracy_against_hand_computations():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x, y = torch.rand(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0])
    natural = F.cross_entropy(lin(x), y)
    torch.testing.assert_close(robust.trades_loss(lin, x, y, eps=0.1, beta=0.0), natural, rtol=0, atol=0)
    torch.testing.assert_close(robust.trades_loss(lin, x, y, eps=0.0), natural, rtol=0, atol=0)
    eye = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        eye.weight.copy_(torch.eye(2))
    X, Y = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0.2, 0.9]], dtype=F64), torch.tensor([0, 1, 1, 1])
    assert robust.accuracy(eye, X, Y, batch_size=3) == 0.75
    assert robust.robust_accuracy(eye, (X, Y), eps_list=[0.6], batch_size=3, clamp=None) == {0.0: 0.75, 0.6: 0.0}
    with pytest.raises(ValueError, match="accuracy: data has no samples; accuracy is undefined"):
        robust.accuracy(eye, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"accuracy: x has 4 samples \(shape \(4, 2\)\) but y has 3 samples"):
        robust.accuracy(eye, torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))


def test_deq_classifier_states_are_the_solver_iterates():
    W = 0.3 * torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    encoder, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    deq = il.DEQ(lambda z, u: torch.tanh(z @ W.T + u), solver=il.FixedPointIteration(tol=1e-12, stop="abs", max_iter=100))
    x = torch.rand(2, 3, dtype=F64)
    states = robust.DEQClassifier(encoder, deq, head).states(x, 5)
    u, z = encoder(x).detach(), torch.zeros(2, 4, dtype=F64)
    expected = [z]
    for _ in range(5):
        z = torch.tanh(z @ W.T + u)
        expected.append(z)
    assert len(states) == 6
    for a, e in zip(states, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-15)


@pytest.mark.parametrize("on_input_change", ["lift", "continue", "restart"])
def test_entropy_defence_with_a_zero_radius_is_the_plain_solve_and_its_bpda_gradient_is_the_classifiers(on_input_change):
    W = 0.3 * torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    encoder, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    deq = il.DEQ(lambda z, u: torch.tanh(z @ W.T + u), solver=il.FixedPointIteration(tol=1e-12, stop="abs", max_iter=300))
    model = robust.DEQClassifier(encoder, deq, head)
    x = torch.rand(2, 3, dtype=F64)
    trace = robust.EntropyDefence(model, eps=0.0, steps=6, every=2, input_steps=3, on_input_change=on_input_change).defend(x)
    u, z = encoder(x).detach(), torch.zeros(2, 4, dtype=F64)
    for _ in range(6):
        z = torch.tanh(z @ W.T + u)
    torch.testing.assert_close(trace.logits, head(z), rtol=0, atol=1e-15)
    assert torch.equal(trace.x, x) and len(trace.states) == 7
    defence = robust.EntropyDefence(model, eps=0.1, steps=6, every=2, input_steps=3, on_input_change=on_input_change)
    xr = x.clone().requires_grad_()
    logits = defence(xr)
    purified = defence.defend(x).x
    assert (purified - x).abs().max() <= 0.1 + 1e-15
    torch.testing.assert_close(logits, defence.defend(x).logits, rtol=0, atol=0)
    p = purified.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(logits.sum(), xr)[0], torch.autograd.grad(model(p).sum(), p)[0], rtol=0, atol=1e-12)


def test_random_intermediate_states_is_a_phantom_from_the_drawn_budget_and_ends_cleanly():
    # Linear cell, Picard: z_T = T Picard steps, then k = 2 damped steps (value and gradient).
    W = 0.3 * torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    deq = il.DEQ(lambda z, u: z @ W.T + u, solver=il.FixedPointIteration(tol=1e-12, stop="abs", max_iter=100))
    model = nn.Sequential(deq).train()
    u = torch.randn(2, 3, dtype=F64, requires_grad=True)
    with robust.random_intermediate_states(model, max_steps=6, k=2, damping=0.5, generator=torch.Generator().manual_seed(1)) as mode:
        out = model(u)
    z = torch.zeros(2, 3, dtype=F64)
    for _ in range(mode.budgets[-1]):
        z = z @ W.T + u.detach()
    for _ in range(2):
        z = 0.5 * z + 0.5 * (z @ W.T + u.detach())
    torch.testing.assert_close(out, z, rtol=0, atol=1e-14)
    M = 0.5 * torch.eye(3, dtype=F64) + 0.5 * W
    expected = torch.ones(2, 3, dtype=F64) @ (0.5 * (torch.eye(3, dtype=F64) + M))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), u)[0], expected, rtol=0, atol=1e-14)
    exact = torch.linalg.solve(torch.eye(3, dtype=F64) - W, u.detach().T).T  # the mode has ended
    torch.testing.assert_close(model(u), exact, rtol=0, atol=1e-10)
    assert deq.solver.max_iter == 100 and isinstance(deq.backward_mode, il.IFT)
    with pytest.raises(ValueError, match=r"random_intermediate_states: damping must lie in \(0, 1\], got 1.5"):
        robust.random_intermediate_states(model, damping=1.5)
    with pytest.raises(ValueError, match="random_intermediate_states: Linear contains no il.ImplicitLayer"):
        robust.random_intermediate_states(nn.Linear(2, 2))


def test_set_fixed_point_budget_caps_every_deq_and_names_bad_budgets():
    pytest.importorskip("flwr")
    from implicitlayers.federated import set_fixed_point_budget

    model = nn.Sequential(nn.Linear(3, 4), il.DEQ(lambda z, u: torch.tanh(0.5 * z + u), solver=il.Anderson(tol=1e-6, max_iter=50)))
    original = model[1].solver
    assert set_fixed_point_budget(model, 3) == 1
    assert model[1].solver.max_iter == 3 and model[1].solver.on_failure == "ignore" and original.max_iter == 50
    assert set_fixed_point_budget(nn.Linear(2, 2), 3) == 0
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"set_fixed_point_budget: the budget must be an integer >= 1, got {bad}"):
            set_fixed_point_budget(model, bad)


# ============================================================================ il.testing on the models


def test_checks_accept_the_built_in_models():
    torch.manual_seed(0)
    x = torch.randn(3, 3)
    lyadeq = il.LyaDEQ(_Cell(3), 3, centre="learned", pull=0.5, solver=il.Anderson(tol=1e-8, max_iter=100))
    jiio = il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                   objective=lambda o, t, x: ((o - t) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1, solver=il.Anderson(tol=1e-9, max_iter=300))
    imaml = il.IMAML(nn.Linear(2, 1), lambda p, t: ((p - t) ** 2).mean(), lam=1.0, solver=il.Anderson(tol=1e-9, max_iter=300))
    for model, inputs in ((lyadeq, (x,)), (jiio, (x[:2],)), (imaml, (torch.randn(2, 5, 2), torch.randn(2, 5, 1)))):
        check_solution(model, *inputs)
        check_gradients(model, *inputs)
        check_batch_independence(model, *inputs)


def test_checks_catch_an_unconverged_solve_a_short_phantom_and_a_batch_mixing_cell():
    z, x_ = il.Variable("z"), il.Input("x")

    def layer(solver, backward=None):
        problem = il.Problem([il.FixedPoint(z, lambda z, x: torch.tanh(0.9 * z + x), (z, x_))])
        return il.ImplicitLayer(problem, [x_], [z], solver=solver, backward=backward, init={"z": torch.zeros(3)})

    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match=r"check_solution: 1 condition\(s\) do not hold at the returned solution"):
        check_solution(layer(il.Anderson(tol=1e-6, max_iter=2, on_failure="ignore")), x)
    with pytest.raises(AssertionError, match="check_gradients: the layer's gradients are wrong"):
        check_gradients(layer(il.Anderson(tol=1e-8, max_iter=100), il.Phantom(k=1, damping=1.0)), x)
    mixing = il.DEQ(lambda z, x: 0.5 * z + x.mean(0, keepdim=True).expand_as(x), solver=il.Anderson(tol=1e-10, max_iter=100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        with pytest.raises(AssertionError, match=r"check_batch_independence: 4 \(output, sample\) pair\(s\) depend on the rest"):
            check_batch_independence(mixing, x)


class _WrongTanh(torch.autograd.Function):
    """tanh with the identity as its backward: a wrong custom gradient inside a cell."""

    @staticmethod
    def forward(ctx, a):
        return torch.tanh(a)

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize(
    "check, make, inputs, match",
    [
        (check_solution, lambda: il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                                         objective=lambda o, t, x: ((o - t) ** 2).sum(1) + 0.5 * (x**2).sum(1), input_shape=3,
                                         state_shape=3, step_size=0.1, solver=il.Anderson(tol=1e-9, max_iter=2, on_failure="ignore")),
         lambda: (torch.randn(2, 3),), r"(?s)check_solution: 2 condition\(s\) do not hold .*Minimize\(x\) in block 0 \(z, x\): 2/2 samples"),
        (check_solution, lambda: il.IMAML(nn.Linear(2, 1), lambda p, t: ((p - t) ** 2).mean(), lam=1.0, step_size=0.01,
                                          solver=il.FixedPointIteration(tol=1e-9, max_iter=2, on_failure="ignore")),
         lambda: (torch.randn(2, 5, 2), torch.randn(2, 5, 1)), r"Minimize\(phi\) in block 0 \(phi\): 2/2 samples violate it"),
        (check_solution, lambda: il.LyaDEQ(lambda z, x: torch.tanh(0.5 * z + x), 3, centre="origin", budget=3),
         lambda: (torch.randn(2, 3),), "check_solution: running LyaDEQ called no ImplicitLayer.solve; nothing to check"),
        (check_gradients, lambda: il.DEQ(lambda z, x: _WrongTanh.apply(0.5 * z + x), solver=il.Anderson(tol=1e-8, max_iter=100)),
         lambda: (torch.randn(2, 3),), "check_gradients: the layer's gradients are wrong"),
        (check_batch_independence, lambda: il.WeightTied(lambda z, x: 0.5 * z + x.mean(0, keepdim=True), 3),
         lambda: (torch.randn(4, 3),), r"check_batch_independence: 4 \(output, sample\) pair\(s\) depend on the rest"),
    ],
    ids=["jiio-unconverged", "imaml-unconverged", "lyadeq-budget-has-no-solve", "wrong-custom-backward", "weight-tied-mixing"],
)
def test_checks_catch_what_is_wrong_with_a_model(check, make, inputs, match):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        with pytest.raises(AssertionError, match=match):
            check(make(), *inputs())
