"""Specifications of `implicitlayers.nn`: normalised weights, regularisers, ICNN, Lyapunov, orthogonal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
import implicitlayers.nn as inn
from implicitlayers.nn.lyapunov import smooth_relu

FAST = settings(max_examples=25, deadline=None)


def sigma_max(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().flatten(1), 2).item()


def matrix_with_singular_values(values: list[float], seed: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    s[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return u @ s @ v.T


def count_computations(module: nn.Module) -> list[int]:
    """Wrap the parametrization's `compute` so the test can count weight computations."""
    parametrization = module.parametrizations.weight[0]
    calls = [0]
    compute = parametrization.compute

    def counting(*originals):
        calls[0] += 1
        return compute(*originals)

    parametrization.compute = counting
    return calls


def bump_version(module: nn.Module) -> None:
    """Simulate an optimizer step that leaves the values unchanged (bumps the version counters)."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.0)


# --- weight norm -------------------------------------------------------------------------------


def test_weight_norm_leaves_the_function_unchanged_at_registration():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x = torch.randn(3, 5)
    before = lin(x)
    inn.weight_norm(lin)
    torch.testing.assert_close(lin(x), before)


def test_weight_norm_rows_have_norm_g_and_bound_the_spectral_norm():
    torch.manual_seed(0)
    lin = inn.weight_norm(nn.Linear(6, 4))
    g = lin.parametrizations.weight.original0
    with torch.no_grad():
        g.copy_(torch.tensor([[0.5], [-0.2], [0.3], [0.1]]))
    torch.testing.assert_close(lin.weight.norm(dim=1), g.abs().squeeze(1))
    assert sigma_max(lin.weight) <= g.norm().item() + 1e-6


def test_weight_norm_with_dim_none_normalises_the_whole_tensor():
    lin = inn.weight_norm(nn.Linear(6, 4), dim=None)
    assert lin.parametrizations.weight.original0.dim() == 0
    torch.testing.assert_close(lin.weight.norm(), lin.parametrizations.weight.original0.abs())


def test_weight_norm_is_differentiable_in_float64_through_functional_call():
    torch.manual_seed(0)
    lin = inn.weight_norm(nn.Linear(3, 2).double(), dim=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    names = [n for n, _ in lin.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in lin.parameters())

    def fn(*ps):
        return torch.func.functional_call(lin, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, params)


# --- spectral norm -----------------------------------------------------------------------------


@FAST
@given(
    rows=st.integers(2, 8),
    cols=st.integers(2, 8),
    bound=st.floats(0.1, 2.0),
    top=st.floats(0.05, 5.0),
    clip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spectral_norm_bounds_the_spectral_norm(rows, cols, bound, top, clip, seed):
    weight = matrix_with_singular_values([top, top / 3], seed, rows, cols)
    lin = nn.Linear(cols, rows, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(weight)
    inn.spectral_norm(lin, bound=bound, clip=clip)
    expected = min(top, bound) if clip else bound
    assert sigma_max(lin.weight) == pytest.approx(expected, rel=1e-6)


def test_spectral_norm_of_a_gaussian_weight_converges_to_the_bound_as_training_proceeds():
    # A 32×32 Gaussian matrix has σ₁/σ₂ ≈ 1.08, the slow case for power iteration: the estimate
    # approaches σ from below, so the effective norm starts slightly above the bound.
    torch.manual_seed(0)
    lin = inn.spectral_norm(nn.Linear(32, 32), bound=0.9)
    for step in range(1, 41):
        bump_version(lin)
        lin(torch.zeros(1, 32))
        if step == 5:
            assert sigma_max(lin.weight) <= 0.9 * (1 + 1e-2)
    assert sigma_max(lin.weight) <= 0.9 * (1 + 1e-4)


def test_spectral_norm_clip_leaves_small_weights_unchanged():
    weight = matrix_with_singular_values([0.5, 0.1], 0, 4, 4).float()
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(weight)
    inn.spectral_norm(lin, bound=1.0)
    torch.testing.assert_close(lin.weight, weight)


def test_spectral_norm_of_convolution_bounds_the_flattened_kernel():
    torch.manual_seed(0)
    conv = inn.spectral_norm(nn.Conv2d(3, 8, 3), bound=0.5)
    assert sigma_max(conv.weight) <= 0.5 * (1 + 1e-3)
    deconv = inn.spectral_norm(nn.ConvTranspose2d(3, 8, 3), bound=0.5)
    assert deconv.parametrizations.weight[0].dim == 1
    assert sigma_max(deconv.weight.transpose(0, 1)) <= 0.5 * (1 + 1e-3)


def test_power_iteration_advances_once_per_parameter_update_in_training_mode_only():
    torch.manual_seed(0)
    lin = inn.spectral_norm(nn.Linear(6, 6))
    u = lin.parametrizations.weight[0]._u
    x = torch.randn(2, 6)
    lin(x)
    first = u.clone()
    for _ in range(5):  # many evaluations, no parameter change: u stays
        lin(x)
    torch.testing.assert_close(u, first, rtol=0, atol=0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).sum().backward()
    opt.step()
    lin(x)
    assert not torch.equal(u, first)
    lin.eval()
    after_step = u.clone()
    bump_version(lin)
    lin(x)
    torch.testing.assert_close(u, after_step, rtol=0, atol=0)


def test_spectral_norm_is_differentiable_in_float64_through_functional_call():
    torch.manual_seed(0)
    lin = inn.spectral_norm(nn.Linear(3, 3).double(), bound=0.1).eval()  # σ > bound: smooth branch
    x = torch.randn(4, 3, dtype=torch.float64)
    names = [n for n, _ in lin.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in lin.parameters())

    def fn(*ps):
        return torch.func.functional_call(lin, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, params)


def test_spectral_norm_state_round_trips_through_state_dict():
    torch.manual_seed(0)
    a = inn.spectral_norm(nn.Linear(4, 4))
    b = inn.spectral_norm(nn.Linear(4, 4))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.eval().weight, a.eval().weight)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: inn.spectral_norm(nn.Linear(3, 3), bound=0.0), "bound must be positive"),
        (lambda: inn.spectral_norm(nn.Linear(3, 3), n_power_iterations=0), "n_power_iterations"),
        (lambda: inn.spectral_norm(nn.Linear(3, 3), name="bias"), "at least 2 dimensions"),
        (lambda: inn.weight_norm(nn.ReLU()), "no tensor attribute 'weight'"),
        (lambda: inn.weight_norm(nn.Linear(3, 3), dim=2), "out of range"),
    ],
)
def test_normalisation_helpers_reject_bad_arguments_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- cached_weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [inn.weight_norm, inn.spectral_norm])
def test_weight_is_computed_once_per_solve_inside_cached_weights(norm):
    torch.manual_seed(0)
    lin = norm(nn.Linear(8, 8))
    calls = count_computations(lin)
    x = torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(10):
            lin(x)
    assert calls[0] == 10  # outside the block: every access recomputes
    calls[0] = 0
    with inn.cached_weights(lin):
        z = il.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(4, 8)).value
        torch.tanh(0.5 * lin(z) + x)
    assert calls[0] == 1


def test_cached_weight_built_under_no_grad_still_carries_gradients():
    torch.manual_seed(0)
    lin = inn.spectral_norm(inn.weight_norm(nn.Linear(5, 5)), bound=0.5)
    x = torch.randn(3, 5)
    lin(x).square().sum().backward()
    expected = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    with inn.cached_weights(lin):
        with torch.no_grad():
            lin(x)  # first access, as inside a solver loop
        lin(x).square().sum().backward()
    for p, g in zip(lin.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_functional_call_inside_cached_weights_uses_the_substituted_parameters():
    torch.manual_seed(0)
    lin = inn.weight_norm(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    doubled = {k: 2 * v.detach() for k, v in lin.named_parameters()}
    expected = torch.func.functional_call(lin, doubled, (x,))
    with inn.cached_weights(lin):
        lin(x)
        torch.testing.assert_close(torch.func.functional_call(lin, doubled, (x,)), expected)


def test_in_place_parameter_change_invalidates_the_cache():
    torch.manual_seed(0)
    lin = inn.weight_norm(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with inn.cached_weights(lin):
        before = lin(x)
        with torch.no_grad():
            lin.parametrizations.weight.original0.mul_(2.0)
        torch.testing.assert_close(lin(x) - lin.bias, 2 * (before - lin.bias))


def test_torch_func_vjp_inside_cached_weights_matches_autograd_and_leaks_nothing():
    torch.manual_seed(0)
    lin = inn.spectral_norm(nn.Linear(4, 4), bound=0.5)
    x = torch.randn(3, 4)
    params = dict(lin.named_parameters())
    cotangent = torch.randn(3, 4)
    lin(x).mul(cotangent).sum().backward()
    with inn.cached_weights(lin):
        _, vjp_fn = torch.func.vjp(lambda p: torch.func.functional_call(lin, p, (x,)), params)
        (grads,) = vjp_fn(cotangent)
        cached = lin.parametrizations.weight[0]._cached
        assert cached is None or not torch._C._functorch.is_functorch_wrapped_tensor(cached[-1])
        lin(x)  # the cache is usable afterwards
    for name, p in lin.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_cache_is_dropped_on_exit_and_blocks_nest():
    lin = inn.weight_norm(nn.Linear(3, 3))
    parametrization = lin.parametrizations.weight[0]
    calls = count_computations(lin)
    with inn.cached_weights(lin):
        with inn.cached_weights(lin, lin):
            lin.weight
        assert parametrization.caching and parametrization._cached is not None
        lin.weight
    assert not parametrization.caching and parametrization._cached is None
    assert calls[0] == 1


def test_cached_weights_without_arguments_covers_every_module():
    lin = inn.weight_norm(nn.Linear(3, 3))
    calls = count_computations(lin)
    with inn.cached_weights():
        for _ in range(3):
            lin.weight
    assert calls[0] == 1 and lin.parametrizations.weight[0]._cached is None


def test_a_copy_made_inside_cached_weights_does_not_keep_caching():
    import copy

    lin = inn.weight_norm(nn.Linear(3, 3))
    with inn.cached_weights(lin):
        lin.weight
        clone = copy.deepcopy(lin)
    parametrization = clone.parametrizations.weight[0]
    assert not parametrization.caching and parametrization._cached is None
    calls = count_computations(clone)
    clone.weight, clone.weight
    assert calls[0] == 2


def test_cached_weights_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with inn.cached_weights(lambda z: z):
            pass


# --- Jacobian regulariser and spectral radius ---------------------------------------------------


def small_cell(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g, dtype=dtype)
    x = torch.randn(3, 4, generator=g, dtype=dtype)
    z = torch.randn(3, 4, generator=g, dtype=dtype)
    return weight, x, z


def exact_jacobians(f, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians `(B, D, D)`: the diagonal blocks of the batch Jacobian."""
    full = torch.autograd.functional.jacobian(f, z)  # (B, D, B, D)
    return torch.stack([full[b, :, b, :] for b in range(z.shape[0])])


def test_jacobian_regularizer_is_unbiased():
    weight, x, z = small_cell()
    f = lambda z: torch.tanh(z @ weight.T + x)  # noqa: E731
    jac = exact_jacobians(f, z)
    exact = jac.square().sum(dim=(1, 2))
    n = 4000
    gen = torch.Generator().manual_seed(1)
    estimate = inn.jacobian_regularizer(f, z, probes=n, reduction="none", create_graph=False, generator=gen)
    # Var ‖εᵀJ‖² = 2‖JJᵀ‖_F² for Gaussian ε; allow five standard errors.
    std = (2 * (jac @ jac.mT).square().sum(dim=(1, 2)) / n).sqrt()
    assert ((estimate - exact).abs() <= 5 * std).all(), (estimate, exact, std)


def test_jacobian_regularizer_normalisation_and_reduction():
    weight, x, z = small_cell()
    f = lambda z: torch.tanh(z @ weight.T + x)  # noqa: E731
    per_sample = inn.jacobian_regularizer(f, z, reduction="none", generator=torch.Generator().manual_seed(0))
    mean = inn.jacobian_regularizer(f, z, generator=torch.Generator().manual_seed(0))
    normalised = inn.jacobian_regularizer(f, z, normalize=True, generator=torch.Generator().manual_seed(0))
    assert per_sample.shape == (3,)
    torch.testing.assert_close(mean, per_sample.mean())
    torch.testing.assert_close(normalised, mean / 4)


def test_jacobian_regularizer_is_differentiable_in_the_parameters():
    weight, x, z = small_cell()

    def regulariser(w):
        gen = torch.Generator().manual_seed(0)  # the same probes at every gradcheck evaluation
        return inn.jacobian_regularizer(lambda z: torch.tanh(z @ w.T + x), z, probes=2, generator=gen)

    assert torch.autograd.gradcheck(regulariser, (weight.clone().requires_grad_(),))


def test_jacobian_regularizer_works_as_a_monitor_under_no_grad():
    weight, x, z = small_cell()
    with torch.no_grad():
        value = inn.jacobian_regularizer(lambda z: torch.tanh(z @ weight.T + x), z)
    assert value.ndim == 0 and not value.requires_grad


def test_jacobian_regularizer_of_a_constant_map_is_zero():
    _, x, z = small_cell()
    torch.testing.assert_close(inn.jacobian_regularizer(lambda z: x, z), torch.zeros((), dtype=z.dtype))


def test_spectral_radius_matches_eigenvalues_of_a_symmetric_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a + a.T
    exact = torch.linalg.eigvalsh(a).abs().max()
    estimate = inn.spectral_radius(lambda z: z @ a.T, torch.zeros(2, 6, dtype=torch.float64), n_iter=200, generator=g)
    torch.testing.assert_close(estimate, exact.expand(2), rtol=1e-3, atol=0)


def test_spectral_radius_handles_a_complex_dominant_pair_per_sample():
    angle = torch.tensor(0.7, dtype=torch.float64)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    a = torch.block_diag(0.8 * rotation, torch.tensor([[0.3]], dtype=torch.float64))
    scale = torch.tensor([[1.0], [0.5]], dtype=torch.float64)  # sample 1 is the map scaled by 0.5
    estimate = inn.spectral_radius(lambda z: scale * (z @ a.T), torch.zeros(2, 3, dtype=torch.float64), n_iter=100)
    torch.testing.assert_close(estimate, torch.tensor([0.8, 0.4], dtype=torch.float64), rtol=1e-3, atol=0)


def test_regularisers_reject_bad_arguments():
    _, _, z = small_cell()
    with pytest.raises(ValueError, match="probes"):
        inn.jacobian_regularizer(lambda z: z, z, probes=0)
    with pytest.raises(ValueError, match="its own shape"):
        inn.spectral_radius(lambda z: z[:, :2], z)


# --- ICNN and Lyapunov function ------------------------------------------------------------------


@FAST
@given(
    dim=st.integers(1, 4),
    depth=st.integers(1, 3),
    t=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 10.0),
)
def test_icnn_is_convex_along_random_segments(dim, depth, t, seed, scale):
    torch.manual_seed(seed)
    g = inn.ICNN(dim, hidden=(8,) * depth, dtype=torch.float64)
    x, y = scale * torch.randn(2, 5, dim, dtype=torch.float64)
    with torch.no_grad():
        lhs = g(t * x + (1 - t) * y)
        rhs = t * g(x) + (1 - t) * g(y)
    assert (lhs <= rhs + 1e-9 * (1 + rhs.abs())).all()


def test_icnn_stays_convex_after_training_pushes_its_weights_negative():
    torch.manual_seed(0)
    g = inn.ICNN(3, hidden=(16, 16), dtype=torch.float64)
    opt = torch.optim.Adam(g.parameters(), lr=0.5)
    x = torch.randn(32, 3, dtype=torch.float64)
    for _ in range(10):
        opt.zero_grad()
        g(x).sum().backward()  # minimising g pushes the U_k towards negative values
        opt.step()
    assert all((u >= 0).all() for u in g.hidden_weights)
    hessian = torch.autograd.functional.hessian(lambda p: g(p[None])[0], x[0])
    assert torch.linalg.eigvalsh(hessian).min() >= -1e-10


def test_icnn_rejects_inputs_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        inn.ICNN(3)(torch.zeros(2, 4))


def test_smooth_relu_is_convex_twice_differentiable_and_zero_on_negatives():
    d = 0.1
    x = torch.linspace(-0.2, 0.3, 2001, dtype=torch.float64, requires_grad=True)
    y = smooth_relu(x, d)
    (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2y,) = torch.autograd.grad(dy.sum(), x)
    assert (y[x <= 0] == 0).all() and torch.allclose(y[x >= d], (x - d / 2)[x >= d])
    assert (dy.diff() >= -1e-12).all() and (d2y >= 0).all()
    # Continuity of the first and second derivative across the knots 0, d/2, d: no jumps.
    step = x[1] - x[0]
    assert dy.diff().abs().max() <= 2.5 * step * d2y.max()
    assert d2y.diff().abs().max() <= 2.5 * step * 4 / d**2


@FAST
@given(dim=st.integers(1, 4), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 10.0))
def test_lyapunov_function_is_positive_definite_and_zero_at_the_reference(dim, seed, scale):
    torch.manual_seed(seed)
    lyapunov = inn.LyapunovFunction(dim, hidden=(8, 8), eps=1e-2, dtype=torch.float64)
    z_ref = torch.randn(4, dim, dtype=torch.float64)
    z = z_ref + scale * torch.randn(4, dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lyapunov(z_ref, z_ref), torch.zeros(4, dtype=torch.float64))
        values = lyapunov(z, z_ref)
    assert (values >= 1e-2 * (z - z_ref).square().sum(dim=1) * (1 - 1e-9)).all()
    assert (values > 0).all()


def test_lyapunov_function_defaults_to_the_origin_and_is_convex():
    torch.manual_seed(0)
    lyapunov = inn.LyapunovFunction(3, hidden=(16, 16), dtype=torch.float64)
    assert lyapunov(torch.zeros(2, 3, dtype=torch.float64)).abs().max() == 0
    point = torch.randn(3, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda p: lyapunov(p[None])[0], point)
    assert torch.linalg.eigvalsh(hessian).min() >= 2 * 1e-2 - 1e-9  # the eps‖z‖² term's curvature


def test_lyapunov_value_and_grad_matches_autograd_and_supports_double_backward():
    torch.manual_seed(0)
    lyapunov = inn.LyapunovFunction(3, hidden=(8, 8), dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z_ref = torch.randn(4, 3, dtype=torch.float64)
    values, grad = lyapunov.value_and_grad(z, z_ref)
    (expected,) = torch.autograd.grad(lyapunov(z, z_ref).sum(), z, create_graph=True)
    torch.testing.assert_close(values, lyapunov(z, z_ref))
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():  # inside a solver loop
        torch.testing.assert_close(lyapunov.value_and_grad(z, z_ref)[1], expected.detach())
    assert torch.autograd.gradgradcheck(
        lambda z: lyapunov.value_and_grad(z, z_ref)[1], (z.detach().clone().requires_grad_(),)
    )
    param = lyapunov.icnn.raw_hidden_weights[0]
    (by_func,) = torch.autograd.grad(grad.square().sum(), param)
    (by_autograd,) = torch.autograd.grad(expected.square().sum(), param)
    torch.testing.assert_close(by_func, by_autograd)


# --- orthogonal linear ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_features, out_features", [(6, 6), (4, 7), (7, 4)])
def test_orthogonal_linear_stays_orthogonal_through_adam_steps(in_features, out_features):
    torch.manual_seed(0)
    layer = inn.OrthogonalLinear(in_features, out_features)
    initial = layer.weight.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(16, in_features), torch.randn(16, out_features)
    for _ in range(20):
        opt.zero_grad()
        (layer(x) - y).square().mean().backward()
        opt.step()
    w = layer.weight.detach()
    gram = w.T @ w if out_features >= in_features else w @ w.T
    torch.testing.assert_close(gram, torch.eye(min(in_features, out_features)), atol=1e-5, rtol=0)
    assert not torch.allclose(w, initial)
    assert isinstance(layer, nn.Linear)
