"""Regressions for adversarial cases that once broke "correct or reported, never silently wrong".

Each test is one case found by probing the public API, fixed in the core; before the fix each of them
failed as its docstring says.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import implicitlayers as il

F64 = torch.float64


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, il.ConvergenceWarning)]


@pytest.mark.parametrize("solver", [il.Anderson, il.Broyden])
@pytest.mark.parametrize("dim", [2, 8, 20])
def test_a_saddle_with_one_direction_of_descent_is_never_reported_a_minimum(solver, dim):
    """`‖v − y‖² − 2 (v₀ − y₀)²` has a saddle at `v = y` and no minimum. A single random probe direction
    rarely finds the one direction of descent in 8 dimensions: the saddle was returned as "converged"."""
    y_, v_ = il.Input("y"), il.Variable("v")

    def objective(v, y):
        return ((v - y) ** 2).sum(1) - 2 * (v[:, 0] - y[:, 0]) ** 2

    layer = il.ImplicitLayer(il.Problem([il.Minimize(v_, objective, (v_, y_), step_size=0.1)]), y_, v_,
                             solver=solver(tol=1e-10, stop="abs", max_iter=300), init={"v": torch.zeros(dim, dtype=F64)})
    y = torch.randn(3, dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    v, warned = _caught(lambda: layer(y))
    (info,) = layer.last_solution.info.values()
    at_saddle = (v - y).abs().amax(1) < 1e-6
    assert bool(at_saddle.any())  # the root finders do reach the saddle ...
    assert not bool((info.converged & at_saddle).any())  # ... and it is never called a minimum
    assert all(c == "not_optimal" for c, s in zip(info.causes, at_saddle.tolist()) if s)
    assert warned  # reported, with the default on_failure="warn"


def test_a_minimum_with_flat_directions_is_still_a_minimum():
    """The exact-Hessian saddle test leaves positive semi-definite curvature alone (a flat valley is optimal)."""
    y_, v_ = il.Input("y"), il.Variable("v")

    def objective(v, y):  # curvature 2 along v₀, 0 along the rest: every v with v₀ = y₀ is a minimum
        return (v[:, 0] - y[:, 0]) ** 2 + 0 * v.sum(1)

    layer = il.ImplicitLayer(il.Problem([il.Minimize(v_, objective, (v_, y_), step_size=0.25)]), y_, v_,
                             solver=il.Anderson(tol=1e-10, stop="abs", max_iter=100), init={"v": torch.zeros(5, dtype=F64)})
    y = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = layer(y)
    torch.testing.assert_close(v[:, 0], y[:, 0])
    assert bool(layer.last_solution.info["block 0 (v)"].converged.all())


def test_gmres_checks_its_claimed_convergence_against_the_true_residual():
    """On an inconsistent singular system (sample 1: `A = e₀e₀ᵀ`) GMRES's least-squares estimate falls below
    tol while `x` runs off to 1e31: it was reported converged with a true residual of 13."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 4, dtype=F64, generator=g)
    a = q @ q.mT + 4 * torch.eye(4, dtype=F64)
    a[1] = 0.0
    a[1, 0, 0] = 1.0
    b = torch.randn(3, 4, dtype=F64, generator=g)

    def matvec(x):
        return (a @ x[:, :, None])[:, :, 0]

    (x, info), warned = _caught(lambda: il.linear.GMRES(tol=1e-12, stop="abs").solve_linear(matvec, b))
    true = torch.linalg.vector_norm(matvec(x) - b, dim=1)
    assert info.converged.tolist() == [True, False, True]
    assert info.causes[1] == "stalled" and warned
    torch.testing.assert_close(info.residual[1], true[1])  # the reported residual is the true one
    assert bool((true[[0, 2]] < 1e-10).all())


def test_an_ift_gradient_at_a_singular_jacobian_is_reported_and_zeroed_with_gmres():
    """`v₀² = y₀` at `y₀ = 0` is a double root (singular Jacobian): `IFT(solver=GMRES)` returned a gradient of
    −1.3e16 silently; now, as with `Dense`, the sample is reported and its gradient zeroed."""
    y_, v_ = il.Input("y"), il.Variable("v")

    def equations(v, y):
        return torch.stack([v[:, 0] ** 2 - y[:, 0], v[:, 1] - y[:, 1]], 1)

    for linear in (il.linear.GMRES(), il.linear.Dense()):
        layer = il.ImplicitLayer(il.Problem([il.Root(v_, equations, (v_, y_))]), y_, v_, init={"v": torch.ones(2, dtype=F64)},
                                 solver=il.Broyden(tol=1e-12, stop="abs", max_iter=200, on_failure="ignore"),
                                 backward=il.IFT(solver=linear))
        y = torch.tensor([[0.0, 1.0], [4.0, 1.0]], dtype=F64, requires_grad=True)
        v = layer(y)
        (grad,), warned = _caught(lambda: torch.autograd.grad(v.sum(), y))
        assert warned, type(linear).__name__
        assert grad[0].tolist() == [0.0, 0.0]
        torch.testing.assert_close(grad[1], torch.tensor([1 / (2 * 2.0), 1.0], dtype=F64))


@pytest.mark.parametrize("solve", [il.fixed_point, il.root])
def test_a_complex_result_is_refused_not_cast_to_real(solve):
    """`z = 0.5 z + 1j` has its fixed point at 2j; casting the result to real dropped the imaginary part and
    reported 0 as converged."""
    with pytest.raises(TypeError, match="complex128.*real floating"):
        solve(lambda z: 0.5 * z + 1j, torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize("init, message", [
    ([torch.zeros(2)], "init must be a dict .* got list"),
    (torch.zeros(2), "init must be a dict .* got Tensor"),
    ({il.Variable("v"): torch.zeros(2)}, r"init keys must be variable names \(str\), got Variable\('v'\) \(use its name, 'v'\)"),
])
def test_an_init_of_the_wrong_container_says_what_it_must_be(init, message):
    y_, v_ = il.Input("y"), il.Variable("v")
    problem = il.Problem([il.FixedPoint(v_, lambda v, y: 0.5 * v + y, (v_, y_))])
    with pytest.raises(TypeError, match=message):
        il.ImplicitLayer(problem, y_, v_, init=init)
    layer = il.ImplicitLayer(problem, y_, v_, init={"v": torch.zeros(2)})
    with pytest.raises(TypeError, match=message):
        layer.solve(torch.ones(2, 2), init=init)


def test_an_empty_per_sample_shape_has_an_empty_gradient():
    """A DEQ on `(2, 0)` inputs solved forward, then its dense IFT backward raised a bare IndexError."""
    x = torch.zeros(2, 0, requires_grad=True)
    z = il.DEQ(lambda z, x: 0.5 * z + x)(x)
    (grad,) = torch.autograd.grad(z.sum(), x)
    assert grad.shape == (2, 0)


def test_phantom_keeps_a_non_finite_sample_out_of_the_shared_gradient():
    """One sample's cell is NaN (`log` of a negative input): Phantom made a shared parameter's gradient NaN
    for the whole batch, though the loss reads only the healthy sample. Its gradient is now Phantom's
    gradient of the healthy sample alone."""
    def run(x):
        weight = torch.tensor(0.5, dtype=F64, requires_grad=True)
        deq = il.DEQ(lambda z, x: weight * z + torch.log(x), backward=il.Phantom(k=30, damping=1.0),
                     solver=il.Anderson(tol=1e-12, stop="abs", max_iter=100, on_failure="ignore"))
        (grad,) = torch.autograd.grad(deq(x)[0].sum(), weight)
        return grad

    healthy = torch.tensor([[2.0, 3.0]], dtype=F64)
    mixed = torch.tensor([[2.0, 3.0], [-1.0, 3.0]], dtype=F64)
    grad = run(mixed)
    assert torch.isfinite(grad)
    torch.testing.assert_close(grad, run(healthy))
    # 30 undamped steps of a map with contraction 0.5: within 1e-8 of the exact d/dW Σ log(x) / (1 − W).
    torch.testing.assert_close(grad, (torch.log(healthy) / 0.25).sum(), rtol=1e-7, atol=0)


def test_learnable_bounds_get_their_gradient_when_nothing_else_requires_grad():
    """`argmin ½‖v − x‖²` over `Box(lo, hi)` is `clamp(x, lo, hi)`: with constant data and learnable bounds the
    output did not require grad and the bounds' gradient was silently missing."""
    x = torch.tensor([[0.3, -1.2, 0.9, -0.1, 2.0]], dtype=F64)
    lo = torch.full((5,), -0.7, dtype=F64, requires_grad=True)
    hi = torch.full((5,), 0.7, dtype=F64, requires_grad=True)
    x_, v_ = il.Input("x"), il.Variable("v")
    problem = il.Problem([il.Minimize(v_, lambda v, x: 0.5 * ((v - x) ** 2).sum(1), (v_, x_), il.sets.Box(lo, hi), step_size=0.5)])
    layer = il.ImplicitLayer(problem, x_, v_, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=100),
                             init={"v": torch.zeros(5, dtype=F64)})
    weights = torch.arange(1, 6, dtype=F64)
    out = layer(x)
    assert out.requires_grad
    got = torch.autograd.grad((out * weights).sum(), [lo, hi])
    assert got[0].tolist() == [0.0, 2.0, 0.0, 0.0, 0.0]
    assert got[1].tolist() == [0.0, 0.0, 3.0, 0.0, 5.0]


@pytest.mark.parametrize("solver", [il.Anderson(), il.Broyden(), il.Anderson(tol=1e-6, stop="abs")])
def test_a_constraint_that_never_binds_changes_neither_the_answer_nor_the_stopping_test(solver):
    """`min ¼v⁴ − 10⁻³ v` from 10 (v* = 0.1; "auto" takes α = 1/300 there): with `Box(−100, 100)`, never
    active, the residual `v − Π(v − α∇)` was α∇, and 0.31 passed as converged. The gradient mapping is ∇."""
    def solve(constraint):
        x_, v_ = il.Input("x"), il.Variable("v")
        problem = il.Problem([il.Minimize(v_, lambda v, x: (0.25 * v**4 - x * v).sum(1), (v_, x_), constraint)])
        layer = il.ImplicitLayer(problem, x_, v_, solver=solver, init={"v": torch.full((1,), 10.0, dtype=F64)})
        return layer(torch.full((1, 1), 1e-3, dtype=F64))

    free, boxed = solve(None), solve(il.sets.Box(-100.0, 100.0))
    torch.testing.assert_close(boxed, free, rtol=1e-10, atol=0)
    assert abs(float(boxed) - 0.1) < 0.003


@pytest.mark.parametrize("solve", [il.fixed_point, il.root])
def test_a_map_that_modifies_its_input_in_place_is_refused(solve):
    """`z.mul_(0.5).add_(1)` makes `z − f(z)` compare the mutated `z` with itself: exactly 0 at the first
    evaluation, and `f(z0)` was returned as converged (the fixed point is 2)."""
    with pytest.raises(ValueError, match="modified its input in place"):
        solve(lambda z: z.mul_(0.5).add_(1.0), torch.zeros(2, 3, dtype=F64))


def test_unroll_reports_a_maximum_as_it_does_under_the_ift():
    """`L = −½‖v‖² − y·v` has only a maximum: IFT and Phantom reported NOT_OPTIMAL, Unroll returned it converged."""
    y_, v_ = il.Input("y"), il.Variable("v")
    problem = il.Problem([il.Minimize(v_, lambda v, y: -0.5 * (v**2).sum(1) - (y * v).sum(1), (v_, y_), step_size=0.5)])
    layer = il.ImplicitLayer(problem, y_, v_, solver=il.Anderson(tol=1e-10, stop="abs", max_iter=100), backward=il.Unroll(),
                             init={"v": torch.zeros(3, dtype=F64)})
    y = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64, requires_grad=True)
    _, warned = _caught(lambda: layer(y))
    (info,) = layer.last_solution.info.values()
    assert warned and info.causes == ["not_optimal"]


def test_phantom_warns_when_its_steps_expand_instead_of_settling():
    """`z = 1.5 z + x` (fixed point −2x, found exactly by Anderson): 60 undamped phantom steps amplify the tiny
    forward residual, and the gradient came back 7e10 for −2 with no word."""
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: 1.5 * z + x, solver=il.Anderson(tol=1e-12, max_iter=100), backward=il.Phantom(k=60, damping=1.0))
    _, warned = _caught(lambda: deq(x).sum().backward())
    assert any("expands" in str(w.message) for w in warned)
    # A contracting map under the same mode says nothing.
    x.grad = None
    deq = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Anderson(tol=1e-12, max_iter=100), backward=il.Phantom(k=60, damping=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_a_sample_with_non_finite_logits_is_counted_wrong():
    """argmax of an all-NaN row is class 0: a NaN input counted as a correct prediction of label 0."""
    from implicitlayers import robust

    model = torch.nn.Linear(2, 3)
    x = torch.tensor([[float("nan"), 0.0], [1.0, 2.0]])
    y = torch.tensor([0, int(model(x[1:]).argmax())])
    assert robust.accuracy(model, x, y) == 0.5


def test_fusion_ignores_a_zero_weight_client_and_survives_huge_counts():
    """A client weighted 0 (quality 0: it diverged) poisoned the average with its NaN (0 · NaN = NaN), and
    `n · q` overflowing to inf made the weights NaN (inf / inf)."""
    from implicitlayers.federated import quality_weights, weighted_average

    good, diverged = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([float("nan"), float("inf")])}
    weights = quality_weights([100, 100], [0.9, 0.0])
    assert weights == [1.0, 0.0]
    assert weighted_average([good, diverged], weights)["w"].tolist() == [1.0, 2.0]
    assert quality_weights([1e308, 1e308], [1e10, 1e10]) == [0.5, 0.5]


def test_imaml_on_an_empty_meta_batch_says_so():
    model = torch.nn.Linear(2, 1)
    imaml = il.IMAML(model, lambda out, y: ((out - y) ** 2).sum(), lam=1.0)
    with pytest.raises(ValueError, match="no tasks"):
        imaml(torch.zeros(0, 5, 2), torch.zeros(0, 5, 1))


def test_broyden_unrolled_in_half_precision_keeps_the_dtype():
    """Broyden's step factor after a rejected trial is in float32 (its norms' dtype); under autograd it turned
    the float16 iterate into float32 and the user's float16 layer raised a dtype error."""
    lin = torch.nn.Linear(3, 3).half()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(4, 3).half().requires_grad_()
    deq = il.DEQ(lambda z, x: torch.tanh(lin(z)) + 8 * x, solver=il.Broyden(tol=1e-2, max_iter=30, on_failure="ignore"),
                 backward=il.Unroll())
    z = deq(x)
    assert z.dtype == torch.float16
    z.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16


def test_an_attack_refuses_a_non_finite_input():
    """NaN passes every comparison with the clamp box: pgd returned a NaN "adversarial example"."""
    from implicitlayers import robust

    model = torch.nn.Linear(2, 3)
    x = torch.tensor([[float("nan"), 0.1], [0.8, 0.2]])
    with pytest.raises(ValueError, match="non-finite"):
        robust.pgd(model, x, torch.tensor([0, 1]), eps=0.1, clamp=(0.0, 1.0))


def test_layers_with_objectives_solve_under_inference_mode():
    """An objective's residual is a gradient: under `torch.inference_mode()` a Minimize, JIIO or iMAML layer
    raised "the objective does not depend on v" (or a bare autograd error) where `no_grad` solves it."""
    y_, v_ = il.Input("y"), il.Variable("v")
    problem = il.Problem([il.Minimize(v_, lambda v, y: ((v - y) ** 2).sum(1), (v_, y_), step_size=0.25)])
    layer = il.ImplicitLayer(problem, y_, v_, init={"v": torch.zeros(3, dtype=F64)},
                             solver=il.Anderson(tol=1e-12, stop="abs", max_iter=100))
    y = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64)
    with torch.inference_mode():
        v = layer(y)
    torch.testing.assert_close(v, y)
    model = torch.nn.Linear(2, 1, bias=False)
    imaml = il.IMAML(model, lambda out, t: ((out - t) ** 2).sum(), lam=1.0)
    sx, sy = torch.randn(3, 5, 2), torch.randn(3, 5, 1)
    with torch.no_grad():
        expected = imaml(sx, sy)["weight"]
    with torch.inference_mode():
        got = imaml(sx, sy)["weight"]
    torch.testing.assert_close(got, expected)


def test_batched_gradients_through_the_ift_say_what_to_use_instead():
    """`is_grads_batched=True` / `jacobian(vectorize=True)` run the backward under the legacy vmap, where the
    adjoint solve cannot run: torch's "Batching rule not implemented for aten::detach" named neither."""
    weight = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.3
    deq = il.DEQ(lambda z, x: z @ weight.T + x, solver=il.Anderson(tol=1e-12, max_iter=200))
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="IFT backward cannot run under torch.autograd's batched gradients.*torch.func.jacrev"):
        torch.autograd.functional.jacobian(deq, x, vectorize=True)
    jac = torch.autograd.functional.jacobian(deq, x)  # the unbatched route works
    torch.testing.assert_close(jac[0, :, 0, :], torch.linalg.inv(torch.eye(3, dtype=F64) - weight))


@pytest.mark.parametrize("n", [1, 2, 10])
def test_broyden_escapes_a_singular_update_on_a_linear_kkt_system(n):
    """cvxpylayers' equality problem `min ‖x‖² s.t. x = b` as the root of its KKT system `(2x + ν, x − b)`:
    Broyden's type-II update made H exactly singular with `H R = 0` after one step, and every later step was
    zero (reported stalled, never solved). A zero step now becomes the H₀ step."""
    b = torch.randn(1, n, generator=torch.Generator().manual_seed(243), dtype=F64)

    def kkt(w):
        return torch.cat([2 * w[:, :n] + w[:, n:], w[:, :n] - b], 1)

    sol = il.root(kkt, torch.zeros(1, 2 * n, dtype=F64), solver=il.Broyden(tol=1e-11, stop="abs", max_iter=200))
    assert bool(sol.info.converged.all())
    torch.testing.assert_close(sol.value[:, :n], b, rtol=0, atol=1e-10)
    torch.testing.assert_close(sol.value[:, n:], -2 * b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", [il.linear.CG(tol=1e-6), il.linear.GMRES(tol=1e-6)])
def test_krylov_solves_report_the_true_residual_of_the_returned_x(solver):
    """CG and GMRES reported their recurrence's estimate (1e-18 where the returned x's true residual was 1e-7
    in float32); `converged` now means the true measure is within tol."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 6, generator=g)
    a = q @ q.mT + 6 * torch.eye(6)
    b = torch.randn(3, 6, generator=g)

    def matvec(x):
        return (a @ x[:, :, None])[:, :, 0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        x, info = solver.solve_linear(matvec, b)
    true = torch.linalg.vector_norm(matvec(x) - b, dim=1) / torch.linalg.vector_norm(b, dim=1)
    torch.testing.assert_close(info.residual, true, rtol=1e-5, atol=0)
    assert torch.equal(info.converged, true <= 1e-6)


def test_dense_reports_a_singular_sample_stalled_not_at_an_iteration_cap_and_casts_a_warm_start():
    """A numerically singular sample (two equal columns, b outside the range) was reported as stopped at
    `max_iter`, which a direct solve does not have."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=F64)
    spd = m @ m.T + 6 * torch.eye(6, dtype=F64)
    singular = spd.clone()
    singular[:, -1] = singular[:, 0]
    a, b6 = torch.stack([spd, singular]), torch.randn(2, 6, generator=g, dtype=F64)
    (x, info), warned = _caught(lambda: il.linear.Dense().solve_linear(lambda v: (a @ v[:, :, None])[:, :, 0], b6))
    assert info.causes == ["converged", "stalled"] and warned
    b = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=F64)
    # A float32 warm start for a float64 system: torch's raw dtype error in the user's matvec before.
    x, info = il.linear.CG(tol=1e-10).solve_linear(lambda v: 2 * v, b, torch.zeros(2, 2))
    assert x.dtype == F64
    torch.testing.assert_close(x, b / 2)


def test_a_layer_refuses_nodes_of_another_problem_with_the_same_names():
    x_, z_ = il.Input("x"), il.Variable("z1")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: 0.5 * z + x, (z_, x_))])
    init = {"z1": torch.zeros(2)}
    with pytest.raises(ValueError, match="not a node of this problem"):
        il.ImplicitLayer(problem, [x_], il.Variable("z1"), init=init)
    with pytest.raises(ValueError, match="not a node of this problem"):
        il.ImplicitLayer(problem, [il.Input("x")], z_, init=init)


def test_a_root_that_does_not_read_its_variable_is_refused():
    """`g(x) = 0` without `z` in args leaves `z` undetermined: its start came back as converged."""
    x_, z_ = il.Input("x"), il.Variable("z")
    with pytest.raises(ValueError, match="g does not read z"):
        il.Root(z_, lambda x: x - 1.0, (x_,))


def test_an_empty_batch_with_an_auto_step_is_an_empty_result():
    """The curvature estimate of `step_size="auto"` raised a raw reshape error on a batch of 0 (a numeric step
    returned the empty result)."""
    y_, v_ = il.Input("y"), il.Variable("v")
    layer = il.ImplicitLayer(il.Problem([il.Minimize(v_, lambda v, y: ((v - y) ** 2).sum(1), (v_, y_))]), y_, v_,
                             init={"v": torch.zeros(2)})
    assert layer(torch.zeros(0, 2)).shape == (0, 2)


class _LyingSolver:
    """A user's solver (the public `solve` protocol) that returns the start, or NaN, and claims convergence."""

    tol, stop = 1e-6, "abs"

    def __init__(self, value: str, dtype: torch.dtype | None = None) -> None:
        self.value, self.dtype = value, dtype

    def solve(self, residual_fn, w0, *, precond=None, name="solve", hints=None, scale_rows=None):
        w = w0.clone() if self.value == "start" else torch.full_like(w0, float("nan"))
        w = w if self.dtype is None else w.to(self.dtype)
        batch = w.shape[0]
        return w, il.SolveInfo(nstep=torch.ones(batch, dtype=torch.long), residual=torch.zeros(batch, dtype=w0.dtype),
                               converged=torch.ones(batch, dtype=torch.bool), nfe=1)


@pytest.mark.parametrize("value", ["start", "nan"])
def test_a_user_solvers_false_convergence_claim_is_measured_and_reported(value):
    """A custom solver that returned the start (or NaN) flagged converged was believed by `fixed_point` and the
    layer: a wrong value, a zero or NaN gradient, no warning."""
    sol, warned = _caught(lambda: il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=F64), solver=_LyingSolver(value)))
    assert not bool(sol.info.converged.any()) and warned
    x_, z_ = il.Input("x"), il.Variable("z")
    layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z_, lambda z, x: 0.5 * z + x, (z_, x_))]), x_, z_,
                             solver=_LyingSolver(value), init={"z": torch.zeros(2, dtype=F64)})
    _, warned = _caught(lambda: layer(torch.ones(2, 2, dtype=F64)))
    assert warned and not bool(layer.last_solution.info["block 0 (z)"].converged.any())


def test_a_user_solvers_output_of_another_dtype_is_named():
    with pytest.raises(TypeError, match="returned torch.float64 for a torch.float32 unknown"):
        il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3), solver=_LyingSolver("start", torch.float64))


class _UserLinearSolver:
    """A user's `LinearSolver` (the public protocol) whose answer can be made wrong."""

    def __init__(self, mode: str, tol: float | None = None) -> None:
        self.mode = mode
        if tol is not None:
            self.tol, self.stop = tol, "rel"

    def solve_linear(self, matvec, b, x0=None, *, precond=None, name="linear solve", hints=None):
        x = {"nan": torch.full_like(b, float("nan")), "zero": torch.zeros_like(b), "shape": b[:, :1]}[self.mode]
        batch = b.shape[0]
        return x, il.SolveInfo(nstep=torch.ones(batch, dtype=torch.long), residual=torch.zeros(batch, dtype=b.dtype),
                               converged=torch.ones(batch, dtype=torch.bool), nfe=1)


@pytest.mark.parametrize("mode, tol", [("nan", None), ("zero", 1e-8)])
def test_a_user_linear_solvers_false_claim_is_reported_and_its_gradient_zeroed(mode, tol):
    """A custom linear solver in `IFT(solver=...)` returning NaN (or zeros, with a tol) flagged converged gave a
    silent NaN (or zero) gradient."""
    x_, z_ = il.Input("x"), il.Variable("z")
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
    layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z_, lambda z, x: theta * z + x, (z_, x_))]), x_, z_,
                             backward=il.IFT(solver=_UserLinearSolver(mode, tol)), solver=il.Anderson(tol=1e-12, stop="abs"),
                             init={"z": torch.zeros(2, dtype=F64)})
    out = layer(torch.ones(2, 2, dtype=F64))
    (grad,), warned = _caught(lambda: torch.autograd.grad(out.sum(), theta))
    assert warned and float(grad) == 0.0


def test_a_user_linear_solvers_wrong_shape_is_named():
    x_, z_ = il.Input("x"), il.Variable("z")
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
    layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z_, lambda z, x: theta * z + x, (z_, x_))]), x_, z_,
                             backward=il.IFT(solver=_UserLinearSolver("shape")), solver=il.Anderson(tol=1e-12, stop="abs"),
                             init={"z": torch.zeros(2, dtype=F64)})
    out = layer(torch.ones(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="the linear solver _UserLinearSolver returned"):
        torch.autograd.grad(out.sum(), theta)
