"""Oracle suite: problems restated from the peers' public test files, checked against closed forms.

Each test restates one problem of a peer's test suite (cvxpylayers, jaxopt, optimistix, torchopt,
torchdeq) through the public API, in float64, and checks the solution AND its gradient against an
oracle that does not use this library: a closed form, the KKT conditions solved by dense linear
algebra, scipy, or the peer itself (torchdeq, the `[bench]` extra). The docstring of each test names
the peer test it restates. Gradients are also checked by `torch.autograd.gradcheck` where it fits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize

import implicitlayers as il

F64 = torch.float64
TIGHT = dict(tol=1e-11, stop="abs", on_failure="raise")


def _one_block_info(layer: il.ImplicitLayer) -> il.SolveInfo:
    (info,) = layer.last_solution.info.values()
    return info


def _minimize_layer(objective, inputs, init, *, solver, constraint=None, step_size=0.1, backward=None):
    """`v = argmin objective(v, *inputs)` (over `constraint`) as a one-variable layer."""
    nodes = [il.Input(f"in{i}") for i in range(len(inputs))]
    v = il.Variable("v")
    problem = il.Problem([il.Minimize(v, objective, (v, *nodes), constraint, step_size=step_size)])
    return il.ImplicitLayer(problem, nodes, v, solver=solver, backward=backward, init={"v": init})


def _root_layer(g, inputs, init, *, solver, backward=None):
    """`v` with `g(v, *inputs) = 0` as a one-variable layer."""
    nodes = [il.Input(f"in{i}") for i in range(len(inputs))]
    v = il.Variable("v")
    problem = il.Problem([il.Root(v, g, (v, *nodes))])
    return il.ImplicitLayer(problem, nodes, v, solver=solver, backward=backward, init={"v": init})


# ============================================================================ cvxpylayers


def test_cvxpylayers_ridge_least_squares_value_and_gradients():
    """cvxpylayers `torch/test_cvxpylayer.py::test_least_squares` (and `test_broadcasting`):
    `x* = argmin ‖Ax − b‖² + ‖x‖²`, against `(AᵀA + I)⁻¹Aᵀb` and the gradients of that closed form,
    with `A` shared by the batch (a captured parameter) and `b` batched."""
    gen = torch.Generator().manual_seed(243)
    m, n, batch = 12, 4, 3
    A = torch.randn(m, n, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(batch, m, generator=gen, dtype=F64, requires_grad=True)
    layer = _minimize_layer(
        lambda x, b: ((x @ A.T - b) ** 2).sum(1) + (x**2).sum(1), [b], torch.zeros(n, dtype=F64),
        solver=il.Broyden(**TIGHT, max_iter=100),
    )
    x = layer(b)
    exact = torch.linalg.solve(A.T @ A + torch.eye(n, dtype=F64), (b @ A).T).T
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-9)
    weights = torch.randn(batch, n, generator=gen, dtype=F64)
    got = torch.autograd.grad((x * weights).sum(), [A, b])
    want = torch.autograd.grad((exact * weights).sum(), [A, b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_cvxpylayers_logistic_regression_gradcheck_and_stationarity():
    """cvxpylayers `test_logistic_regression`: `a* = argmin −loglik(Xa; y) + λ‖a‖²`; the gradient at
    `a*` is zero, `da*/dλ = −H⁻¹ 2a*` (implicit function theorem on the stationarity, with the Hessian
    `H` formed densely), and `gradcheck` in `X` and `λ`."""
    gen = torch.Generator().manual_seed(243)
    N, n = 10, 2
    X = torch.randn(1, N, n, generator=gen, dtype=F64)
    a_true = torch.randn(n, generator=gen, dtype=F64)
    y = torch.round(torch.sigmoid(X[0] @ a_true + 0.5 * torch.randn(N, generator=gen, dtype=F64)))

    def objective(a, X, lam):
        logits = torch.einsum("bnk,bk->bn", X, a)
        loglik = (y * logits - torch.nn.functional.softplus(logits)).sum(1)
        return -loglik + lam[:, 0] * (a**2).sum(1)

    lam = torch.full((1, 1), 0.1, dtype=F64)
    layer = _minimize_layer(objective, [X, lam], torch.zeros(n, dtype=F64), solver=il.Broyden(**TIGHT, max_iter=100))
    a = layer(X, lam)
    grad_at_a = torch.func.grad(lambda a_: objective(a_[None], X, lam).sum())(a[0])
    assert float(grad_at_a.abs().max()) < 1e-9
    H = torch.autograd.functional.hessian(lambda a_: objective(a_[None], X, lam).sum(), a[0])
    lam_req = lam.clone().requires_grad_()
    (dlam,) = torch.autograd.grad(layer(X, lam_req).sum(), lam_req)
    expected = -torch.linalg.solve(H, 2 * a[0]).sum()
    torch.testing.assert_close(dlam[0, 0], expected, rtol=1e-7, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (X.clone().requires_grad_(), lam.clone().requires_grad_()), eps=1e-6, atol=1e-5)


def _ball_qp_oracle(Q: np.ndarray, q: np.ndarray, radius: float) -> np.ndarray:
    """`argmin ½xᵀQx + qᵀx` over `‖x‖ ≤ radius` from the KKT conditions: `x = −(Q + νI)⁻¹q`, `ν ≥ 0`,
    `ν (‖x‖ − radius) = 0` (`ν` by root bracketing on the secular equation)."""
    eye = np.eye(len(q))
    x = -np.linalg.solve(Q, q)
    if np.linalg.norm(x) <= radius:
        return x
    nu = optimize.brentq(lambda nu: np.linalg.norm(np.linalg.solve(Q + nu * eye, q)) - radius, 0.0, 1e6, xtol=1e-15)
    return -np.linalg.solve(Q + nu * eye, q)


def test_cvxpylayers_quadratic_program_in_a_ball_against_kkt():
    """cvxpylayers `test_simple_batch_socp` (and jaxopt `projected_gradient_test.py::
    test_projected_gradient_l2_ball`): `min ½‖P x‖² + qᵀx` over `‖x‖ ≤ 1`, restated without the
    equality row (the sets here are boxes and balls), batched; values against the KKT solution,
    gradients in `P` and `q` by `gradcheck`. Samples are chosen with the ball active and inactive."""
    gen = torch.Generator().manual_seed(243)
    n, batch = 4, 3
    P = torch.eye(n, dtype=F64) + 0.2 * torch.randn(batch, n, n, generator=gen, dtype=F64)
    q = torch.randn(batch, n, generator=gen, dtype=F64) * torch.tensor([[0.1], [3.0], [5.0]], dtype=F64)
    layer = _minimize_layer(
        lambda x, P, q: 0.5 * (torch.einsum("bij,bj->bi", P, x) ** 2).sum(1) + (q * x).sum(1), [P, q],
        torch.zeros(n, dtype=F64), solver=il.Anderson(**TIGHT, max_iter=500), constraint=il.sets.L2Ball(1.0),
        step_size=0.4,
    )
    x = layer(P, q)
    Q = (P.transpose(1, 2) @ P).numpy()
    exact = np.stack([_ball_qp_oracle(Q[i], q[i].numpy(), 1.0) for i in range(batch)])
    active = np.linalg.norm(exact, axis=1) > 1 - 1e-9
    assert active.tolist() == [False, True, True], "the oracle's mix of active and inactive samples"
    torch.testing.assert_close(x, torch.from_numpy(exact), rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(layer, (P.clone().requires_grad_(), q.clone().requires_grad_()), eps=1e-6, atol=1e-5)


def test_cvxpylayers_lml_projection_as_a_root_of_its_dual():
    """cvxpylayers `test_lml`: `y* = argmin −xᵀy − Σ H_b(y_i)` s.t. `Σ y = k` (binary entropies `H_b`).
    Its KKT conditions give `y = σ(x + ν)` with the scalar `ν` a root of `Σ σ(x + ν) − k`, declared as
    an `il.Root`; the Jacobian `dy/dx = D − ddᵀ/Σd` with `d = y(1 − y)` is the closed form."""
    k = 2.0
    x = torch.tensor([[1.0, -1.0, -1.0, -1.0], [0.3, 0.2, -2.0, 1.5]], dtype=F64)
    layer = _root_layer(
        lambda nu, x: torch.sigmoid(x + nu).sum(1, keepdim=True) - k, [x], torch.zeros(1, dtype=F64),
        solver=il.Broyden(**TIGHT, max_iter=100),
    )

    def lml(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x + layer(x))

    y = lml(x)
    torch.testing.assert_close(y.sum(1), torch.full((2,), k, dtype=F64), rtol=0, atol=1e-10)
    for i in range(2):
        nu = optimize.brentq(lambda s: float(torch.sigmoid(x[i] + s).sum()) - k, -50, 50, xtol=1e-15)
        torch.testing.assert_close(y[i], torch.sigmoid(x[i] + nu), rtol=0, atol=1e-10)
        d = y[i] * (1 - y[i])
        exact = torch.diag(d) - torch.outer(d, d) / d.sum()
        jac = torch.autograd.functional.jacobian(lambda xi: lml(xi[None])[0], x[i])
        torch.testing.assert_close(jac, exact, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lml, (x.clone().requires_grad_(),))


# ============================================================================ jaxopt


def test_jaxopt_ridge_regression_derivative_in_the_regularisation():
    """jaxopt `implicit_diff_test.py::test_root_vjp` / `test_custom_root`: ridge regression
    `argmin ½ mean((Xp − y)²) + ½λ‖p‖²` on `make_regression(10, 3, random_state=0)` at λ = 5; the
    solution `(XᵀX + λnI)⁻¹Xᵀy` and its derivative in λ, `−(XᵀX + λnI)⁻¹ n p*` (jaxopt compares to
    finite differences; this is the exact form)."""
    from sklearn.datasets import make_regression

    X_np, y_np = make_regression(n_samples=10, n_features=3, random_state=0)
    X, y = torch.from_numpy(X_np)[None], torch.from_numpy(y_np)[None]
    n = X.shape[1]
    layer = _minimize_layer(
        lambda p, lam, X, y: 0.5 * ((torch.einsum("bnk,bk->bn", X, p) - y) ** 2).mean(1) + 0.5 * lam[:, 0] * (p**2).sum(1),
        [X, X, y], torch.zeros(3, dtype=F64), solver=il.Broyden(tol=1e-13, max_iter=100, on_failure="raise"),
    )
    lam = torch.full((1, 1), 5.0, dtype=F64, requires_grad=True)
    p = layer(lam, X, y)
    system = X[0].T @ X[0] + 5.0 * n * torch.eye(3, dtype=F64)
    exact = torch.linalg.solve(system, X[0].T @ y[0])
    torch.testing.assert_close(p[0], exact, rtol=1e-10, atol=0)
    jac = torch.stack([torch.autograd.grad(p[0, j], lam, retain_graph=True)[0][0, 0] for j in range(3)])
    torch.testing.assert_close(jac, -torch.linalg.solve(system, n * exact), rtol=1e-8, atol=0)


def test_jaxopt_cos_fixed_point_value_and_gradcheck():
    """jaxopt `fixed_point_iteration_test.py::test_cos_fixed_point` / `test_simple_grads`:
    `x = cos(x) + θ` with `θ = (0, π/2)`: the Dottie number 0.739085133215161 and π/2, and
    `dx/dθ = 1/(1 + sin x*)` per coordinate; `gradcheck` through `il.DEQ`."""
    deq = il.DEQ(lambda z, theta: torch.cos(z) + theta, solver=il.Anderson(**TIGHT, max_iter=200))
    theta = torch.tensor([[0.0, math.pi / 2]], dtype=F64, requires_grad=True)
    x = deq(theta)
    torch.testing.assert_close(x, torch.tensor([[0.7390851332151607, math.pi / 2]], dtype=F64), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(x.sum(), theta)
    torch.testing.assert_close(g, 1 / (1 + torch.sin(x.detach())), rtol=1e-9, atol=0)
    assert torch.autograd.gradcheck(deq, (theta,))


def test_jaxopt_affine_contractive_mapping_gradients_in_matrix_and_offset():
    """jaxopt `fixed_point_iteration_test.py::test_affine_contractive_mapping`: `z = Mz + b` with `M`
    symmetric, spectral radius < 0.5 (here n = 40, not 200); `z* = (I − M)⁻¹b` and the gradients of a
    weighted sum in `M` (a captured parameter) and `b`, against the same closed form differentiated."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    M = 2 * torch.rand(n, n, generator=gen, dtype=F64) - 1
    M = M + M.T
    M = (M / (2 * torch.linalg.eigvalsh(M).abs().max() + 1e-4)).requires_grad_()
    b = torch.rand(2, n, generator=gen, dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, b: z @ M.T + b, solver=il.Anderson(**TIGHT, max_iter=100),
                 backward=il.IFT(solver=il.Anderson(tol=1e-12, stop="abs", max_iter=200)))
    z = deq(b)
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - M, b.T).T
    torch.testing.assert_close(z, exact, rtol=0, atol=1e-10)
    w = torch.randn(2, n, generator=gen, dtype=F64)
    got = torch.autograd.grad((z * w).sum(), [M, b])
    want = torch.autograd.grad((exact * w).sum(), [M, b])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-8, atol=1e-10)


def test_jaxopt_geometric_decay_is_solved_by_anderson_and_flagged_by_picard():
    """jaxopt `fixed_point_iteration_test.py::test_geometric_decay` (and `test_sin_fixed_point`):
    `x ← (0.9, 0.99, 0.999) ⊙ x` from `(1, 0.4, −0.2)` has the fixed point 0. Anderson reaches it; plain
    iteration capped at 100 steps cannot (0.999¹⁰⁰ · 0.2 ≈ 0.18) and must say so, not return it as
    converged. The cubic/sine maps `x ← sin(x) x²`, `x ← x³` reach 0 too."""
    ratios = torch.tensor([0.9, 0.99, 0.999], dtype=F64)
    x0 = torch.tensor([[1.0, 0.4, -0.2]], dtype=F64)
    sol = il.fixed_point(lambda x: ratios * x, x0, solver=il.Anderson(**TIGHT, max_iter=50))
    # ‖R‖ ≤ 1e-11 bounds the error by ‖R‖ / (1 − 0.999).
    torch.testing.assert_close(sol.value, torch.zeros_like(x0), rtol=0, atol=1e-8)
    capped = il.fixed_point(lambda x: ratios * x, x0, solver=il.FixedPointIteration(tol=1e-5, stop="abs", max_iter=100, on_failure="ignore"))
    assert capped.info.causes == ["max_iter"]
    with pytest.warns(il.ConvergenceWarning, match="max_iter=100"):
        il.fixed_point(lambda x: ratios * x, x0, solver=il.FixedPointIteration(tol=1e-5, stop="abs", max_iter=100))
    start = torch.tensor([[0.6, 0.0, -0.1, 0.7, 0.5]], dtype=F64)
    poly = il.fixed_point(
        lambda x: torch.cat([torch.sin(x[:, :3]) * x[:, :3] ** 2, x[:, 3:] ** 3], 1), start,
        solver=il.FixedPointIteration(tol=1e-6, stop="abs", max_iter=100, on_failure="raise"),
    )
    torch.testing.assert_close(poly.value, torch.zeros_like(start), rtol=0, atol=1e-6)


def _simplex_projection(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex by sorting (Duchi et al. 2008)."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, len(x) + 1) > 0)[0][-1]
    return np.maximum(x - css[rho] / (rho + 1), 0)


def test_jaxopt_simplex_projection_by_its_threshold_root():
    """jaxopt `root_finding_test.py::test_bisect` (and `projection_test.py`'s simplex Jacobian):
    the projection onto the simplex is `max(x − τ, 0)` with `τ` the root of `Σ max(x − τ, 0) − 1`,
    declared as an `il.Root` started at jaxopt's bracket `max(x) − 1`; the value against the sorting
    algorithm, the Jacobian against `diag(1_S) − 1_S1_Sᵀ/|S|` on the support `S`."""
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(4, 12))
    layer = _root_layer(
        lambda tau, x: torch.relu(x - tau).sum(1, keepdim=True) - 1, [x],
        lambda x: x.max(1, keepdim=True).values - 1, solver=il.Broyden(**TIGHT, max_iter=100),
    )

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - layer(x))

    p = project(x)
    for i in range(4):
        exact = _simplex_projection(x[i].numpy())
        torch.testing.assert_close(p[i], torch.from_numpy(exact), rtol=0, atol=1e-12)
        support = torch.from_numpy((exact > 0).astype(np.float64))
        want = torch.diag(support) - torch.outer(support, support) / support.sum()
        jac = torch.autograd.functional.jacobian(lambda xi: project(xi[None])[0], x[i])
        torch.testing.assert_close(jac, want, rtol=0, atol=1e-10)


def test_jaxopt_ball_projection_as_a_constrained_minimize():
    """jaxopt `projection_test.py` (`projection_l2_ball` and its Jacobian): `argmin ½‖v − x‖²` over
    `‖v‖ ≤ r` is `x · min(1, r/‖x‖)`, whose Jacobian outside the ball is `(r/‖x‖)(I − x̂x̂ᵀ)`."""
    r = 1.5
    x = torch.tensor([[0.3, -0.4, 0.2], [2.0, -1.0, 2.0]], dtype=F64)
    layer = _minimize_layer(
        lambda v, x: 0.5 * ((v - x) ** 2).sum(1), [x], torch.zeros(3, dtype=F64), solver=il.Anderson(**TIGHT, max_iter=100),
        constraint=il.sets.L2Ball(r), step_size=0.5,
    )
    v = layer(x)
    torch.testing.assert_close(v, torch.stack([x[0], x[1] * r / 3.0]), rtol=0, atol=1e-11)
    jac = torch.autograd.functional.jacobian(lambda xi: layer(xi[None])[0], x[1])
    unit = x[1] / 3.0
    torch.testing.assert_close(jac, (r / 3.0) * (torch.eye(3, dtype=F64) - torch.outer(unit, unit)), rtol=0, atol=1e-9)
    jac_inside = torch.autograd.functional.jacobian(lambda xi: layer(xi[None])[0], x[0])
    torch.testing.assert_close(jac_inside, torch.eye(3, dtype=F64), rtol=0, atol=1e-9)


def test_jaxopt_non_negative_least_squares_against_scipy_nnls():
    """jaxopt `projected_gradient_test.py::test_non_negative_least_squares`: `argmin ½‖Xw − y‖²` over
    `w ≥ 0` (X 10×5, jaxopt's seed), with a target that makes some bounds active; the value against
    `scipy.optimize.nnls`, the gradient in `y` against the least squares restricted to the free set
    (zero on the active bounds)."""
    rng = np.random.RandomState(0)
    X_np = rng.randn(10, 5)
    y_np = X_np @ np.array([0.6, -0.4, 0.8, -0.3, 0.5]) + 0.1 * rng.randn(10)
    exact, _ = optimize.nnls(X_np, y_np)
    free = exact > 0
    assert 0 < free.sum() < 5, "the oracle's active set must be proper for the test to mean something"
    X = torch.from_numpy(X_np)
    step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X).max())
    layer = _minimize_layer(
        lambda w, y: 0.5 * ((w @ X.T - y) ** 2).sum(1), [torch.zeros(1, 10, dtype=F64)], torch.zeros(5, dtype=F64),
        solver=il.Anderson(**TIGHT, max_iter=1000), constraint=il.sets.Box(0.0), step_size=step,
    )
    y = torch.from_numpy(y_np)[None].requires_grad_()
    w = layer(y)
    torch.testing.assert_close(w[0], torch.from_numpy(exact), rtol=0, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda y_: layer(y_)[0], y.detach())[:, 0]
    Xs = X_np[:, free]
    want = np.zeros((5, 10))
    want[free] = np.linalg.solve(Xs.T @ Xs, Xs.T)
    torch.testing.assert_close(jac, torch.from_numpy(want), rtol=0, atol=1e-8)


# ============================================================================ optimistix


def test_optimistix_rosenbrock_minimum_and_its_derivative_in_the_constant():
    """optimistix `tests/helpers.py` (`rosenbrock` in `least_squares_fn_minima_init_args`, started at
    1.5), here in its classic form `(a − x)² + 100(y − x²)²`, declared as a `Minimize` solved by Broyden
    on its gradient: the minimum `(a, a²)` and `d(x*, y*)/da = (1, 2a)` (implicit function theorem)."""
    a = torch.tensor([[1.0], [0.5], [-0.7]], dtype=F64, requires_grad=True)
    layer = _minimize_layer(
        lambda v, a: (a[:, 0] - v[:, 0]) ** 2 + 100 * (v[:, 1] - v[:, 0] ** 2) ** 2, [a],
        torch.tensor([1.5, 1.5], dtype=F64), solver=il.Broyden(tol=1e-10, stop="abs", max_iter=300, on_failure="raise"),
    )
    v = layer(a)
    exact = torch.cat([a, a**2], 1).detach()
    torch.testing.assert_close(v, exact, rtol=0, atol=1e-9)
    dx = torch.autograd.grad(v[:, 0].sum(), a, retain_graph=True)[0]
    dy = torch.autograd.grad(v[:, 1].sum(), a)[0]
    torch.testing.assert_close(dx, torch.ones_like(a), rtol=1e-7, atol=0)
    torch.testing.assert_close(dy, 2 * a.detach(), rtol=1e-7, atol=1e-9)


def _optimistix_rosenbrock(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """optimistix's `rosenbrock` residuals `(100(y[1:] − y[:-1]), c − y[:-1])`, summed squares: a linear
    least squares (Hessian eigenvalues up to ≈ 8e4) whose minimum is `y = c` everywhere."""
    return 1e4 * ((v[:, 1:] - v[:, :-1]) ** 2).sum(1) + ((c - v[:, :-1]) ** 2).sum(1)


def test_optimistix_rosenbrock_least_squares_with_a_scaled_step():
    """optimistix `tests/helpers.py` (`rosenbrock` on the 14-element pytree `(1.5 · ones((2, 4)),
    {"a": 1.5 · ones((2, 3, 2))})`): minimum `y = c` and `dy*/dc = 1`, with the step size scaled to
    the curvature (`1/λ_max`) as the map `v ← v − α∇` needs."""
    c = torch.tensor([[1.0], [0.3]], dtype=F64, requires_grad=True)
    layer = _minimize_layer(
        _optimistix_rosenbrock, [c], torch.full((14,), 1.5, dtype=F64), step_size=1e-5,
        solver=il.Broyden(tol=1e-10, stop="abs", max_iter=300, on_failure="raise"),
    )
    v = layer(c)
    torch.testing.assert_close(v, c.detach().expand(2, 14), rtol=0, atol=1e-9)
    (g,) = torch.autograd.grad(v.sum(1).sum(), c)
    torch.testing.assert_close(g, torch.full_like(c, 14.0), rtol=1e-7, atol=0)


def test_optimistix_rosenbrock_least_squares_with_broyden_defaults():
    """The same problem with `Minimize`'s default step size and Broyden's defaults: it must be solved.

    Failed on main and after de3ac9f (stalled at its start: every step from H₀ = 0.1·I overshoots the
    Hessian's 8e4 and was rejected, and each restart went back to the same H₀); solved since restarts
    rescale H₀ by the last secant pair."""
    c = torch.tensor([[1.0], [0.3]], dtype=F64)
    layer = _minimize_layer(_optimistix_rosenbrock, [c], torch.full((14,), 1.5, dtype=F64),
                            solver=il.Broyden(tol=1e-8, stop="abs", max_iter=300, on_failure="ignore"))
    torch.testing.assert_close(layer(c), c.expand(2, 14), rtol=0, atol=1e-6)


def test_optimistix_himmelblau_minimum_and_its_derivative_in_the_constants():
    """optimistix `tests/helpers.py` (`_himmelblau` from `(2, 2.5)` with constants `(11, 7)`, in
    `minimisation_fn_minima_init_args`): the minimum `(3, 2)`; both squared terms vanish there, so
    `d(x*, y*)/d(c₁, c₂)` is the inverse of the residuals' Jacobian `[[2x, 1], [1, 2y]]`."""
    c = torch.tensor([[11.0, 7.0]], dtype=F64, requires_grad=True)
    layer = _minimize_layer(
        lambda v, c: (v[:, 0] ** 2 + v[:, 1] - c[:, 0]) ** 2 + (v[:, 0] + v[:, 1] ** 2 - c[:, 1]) ** 2, [c],
        torch.tensor([2.0, 2.5], dtype=F64), solver=il.Broyden(tol=1e-11, stop="abs", max_iter=200, on_failure="raise"),
    )
    v = layer(c)
    torch.testing.assert_close(v, torch.tensor([[3.0, 2.0]], dtype=F64), rtol=0, atol=1e-10)
    jac = torch.stack([torch.autograd.grad(v[0, i], c, retain_graph=True)[0][0] for i in range(2)])
    torch.testing.assert_close(jac, torch.linalg.inv(torch.tensor([[6.0, 1.0], [1.0, 4.0]], dtype=F64)), rtol=1e-8, atol=0)


def test_optimistix_exponential_fixed_point_is_the_omega_constant():
    """optimistix `tests/helpers.py` (`_exponential` in `fixed_point_fn_init_args`, the 28-element
    `ones_pytree` start 0.5): `y = exp(−c y)`; at `c = 1` every entry is the omega constant
    `Ω = W(1) = 0.5671432904097838`, and `dy/dc = −y²/(1 + c y)`; `gradcheck` at several `c`."""
    deq = il.DEQ(lambda y, c: torch.exp(-c * y), solver=il.Anderson(**TIGHT, max_iter=100),
                 z_init=torch.full((28,), 0.5, dtype=F64))
    ones = torch.ones(1, 28, dtype=F64)
    torch.testing.assert_close(deq(ones), torch.full((1, 28), 0.5671432904097838, dtype=F64), rtol=0, atol=1e-12)
    c = torch.linspace(0.5, 2.0, 28, dtype=F64)[None].requires_grad_()
    y = deq(c)
    (g,) = torch.autograd.grad(y.sum(), c)
    torch.testing.assert_close(g, -(y**2) / (1 + c * y), rtol=1e-9, atol=0)
    assert torch.autograd.gradcheck(deq, (c,))


def test_optimistix_nonlinear_heat_step_against_its_quadratic_closed_form():
    """optimistix `tests/helpers.py::_nonlinear_heat_pde` (100 points, start ones): one Crank–Nicolson
    step `y = c(y₀ + ½(f(y) + f(y₀)))` with `f(y) = (1 − y)·L(y)`, `y₀ = x²` on `[−1, 1]`. The helper's
    `_laplacian` returns its input, so `L` is the identity and each point solves the quadratic
    `½c y² + (1 − ½c) y − c(y₀ + ½f₀) = 0`: value and `dy/dc` against that closed form."""
    x = torch.linspace(-1, 1, 100, dtype=F64)
    y0 = x**2
    f0 = (1 - y0) * y0
    deq = il.DEQ(lambda y, c: c * (y0 + 0.5 * ((1 - y) * y + f0)), solver=il.Anderson(**TIGHT, max_iter=200),
                 z_init=torch.ones(100, dtype=F64))
    c = torch.tensor([[1.0], [0.8]], dtype=F64).expand(2, 100).clone().requires_grad_()

    def closed_form(c: torch.Tensor) -> torch.Tensor:
        qa, qb, qc = 0.5 * c, 1 - 0.5 * c, -c * (y0 + 0.5 * f0)
        return (-qb + torch.sqrt(qb**2 - 4 * qa * qc)) / (2 * qa)

    y = deq(c)
    exact = closed_form(c)
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-11)
    w = torch.randn(2, 100, generator=torch.Generator().manual_seed(0), dtype=F64)
    got, want = torch.autograd.grad((y * w).sum(), c)[0], torch.autograd.grad((exact * w).sum(), c)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


# ============================================================================ torchopt


def test_torchopt_ridge_hypergradient_of_the_validation_loss():
    """torchopt `tests/test_implicit.py::test_rr_solve_cg` / `test_rr_solve_inv`: ridge regression
    `w* = argmin ½ mean((X_tr w − y_tr)²) + ½λ‖w‖²` (10 features), and the hypergradient
    `d/dλ mean((X_q w* − y_q)²)`, per task of a batch, against the closed form
    `w* = (X_trᵀX_tr/n + λI)⁻¹ X_trᵀy_tr/n` differentiated by autograd."""
    gen = torch.Generator().manual_seed(42)
    tasks, n, d = 3, 64, 10
    Xtr, ytr = torch.randn(tasks, n, d, generator=gen, dtype=F64), torch.randn(tasks, n, generator=gen, dtype=F64)
    Xq, yq = torch.randn(tasks, n, d, generator=gen, dtype=F64), torch.randn(tasks, n, generator=gen, dtype=F64)
    layer = _minimize_layer(
        lambda w, lam, X, y: 0.5 * ((torch.einsum("bnk,bk->bn", X, w) - y) ** 2).mean(1) + 0.5 * lam[:, 0] * (w**2).sum(1),
        [Xtr, Xtr, ytr], torch.zeros(d, dtype=F64), solver=il.Broyden(**TIGHT, max_iter=100),
    )
    lam = torch.rand(tasks, 1, generator=gen, dtype=F64).requires_grad_()

    def validation(w: torch.Tensor) -> torch.Tensor:
        return ((torch.einsum("bnk,bk->bn", Xq, w) - yq) ** 2).mean(1).sum()

    w = layer(lam, Xtr, ytr)
    exact = torch.linalg.solve(Xtr.transpose(1, 2) @ Xtr / n + lam[:, :, None] * torch.eye(d, dtype=F64),
                               torch.einsum("bnk,bn->bk", Xtr, ytr) / n)
    torch.testing.assert_close(w, exact.detach(), rtol=0, atol=1e-10)
    (got,) = torch.autograd.grad(validation(w), lam)
    (want,) = torch.autograd.grad(validation(exact), lam)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_torchopt_imaml_meta_gradient_against_dense_newton():
    """torchopt `tests/test_implicit.py::test_imaml_solve_inv` / `test_imaml_module`: a linear
    classifier adapted per task by `φ* = argmin CE(φ) + ½λ‖φ − θ‖²` (`il.IMAML`, λ = 1), and the
    meta-gradient of the mean query output. The oracle solves the inner problem by dense Newton steps
    and forms `dφ*/dθ = λ(H + λI)⁻¹` with the dense Hessian `H` of the cross-entropy."""
    gen = torch.Generator().manual_seed(42)
    torch.manual_seed(42)
    model = torch.nn.Linear(4, 3).double()
    lam, tasks, shots = 1.0, 2, 6
    sx, sy = torch.randn(tasks, shots, 4, generator=gen, dtype=F64), torch.randint(0, 3, (tasks, shots), generator=gen)
    qx = torch.randn(tasks, 5, 4, generator=gen, dtype=F64)
    imaml = il.IMAML(model, torch.nn.functional.cross_entropy, lam,
                     solver=il.Anderson(**TIGHT, max_iter=300),
                     backward=il.IFT(solver=il.linear.CG(tol=1e-12, max_iter=200)))
    params = imaml(sx, sy)
    outer = imaml.functional(params, qx).mean()
    got = torch.autograd.grad(outer, list(model.parameters()))
    got = torch.cat([g.reshape(-1) for g in got])

    theta = imaml.flat_parameters().detach()
    want = torch.zeros_like(theta)
    for t in range(tasks):
        def inner(phi: torch.Tensor) -> torch.Tensor:
            return imaml.task_loss(phi, sx[t], sy[t]) + 0.5 * lam * ((phi - theta) ** 2).sum()

        phi = theta.clone()
        for _ in range(20):  # Newton on a strongly convex objective: quadratic convergence
            grad = torch.func.grad(inner)(phi)
            phi = phi - torch.linalg.solve(torch.autograd.functional.hessian(inner, phi), grad)
        torch.testing.assert_close(imaml.last_solution.values["phi"][t], phi, rtol=0, atol=1e-9)
        hess_ce = torch.autograd.functional.hessian(lambda p: imaml.task_loss(p, sx[t], sy[t]), phi)
        query = torch.func.grad(lambda p: imaml.functional(imaml.unflatten(p[None]), qx[t : t + 1]).mean() / tasks)(phi)
        want += lam * torch.linalg.solve(hess_ce + lam * torch.eye(len(phi), dtype=F64), query)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


# ============================================================================ torchdeq


def test_torchdeq_nonlinear_deq_fixed_point_and_gradients_agree():
    """torchdeq (`get_deq`, the `[bench]` extra) as the oracle, as in its own `test/` DEQ checks: the
    same tanh cell `z = tanh(Wz + Ux)` (‖W‖₂ = 0.9) solved by both to 1e-12, and the gradients of one
    loss in `W`, `U` and `x` by both libraries' IFT backward passes."""
    torchdeq = pytest.importorskip("torchdeq")
    gen = torch.Generator().manual_seed(0)
    d, batch = 8, 4
    W = torch.randn(d, d, generator=gen, dtype=F64)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    U = torch.randn(d, d, generator=gen, dtype=F64, requires_grad=True)
    x = torch.randn(batch, d, generator=gen, dtype=F64, requires_grad=True)
    target = torch.randn(batch, d, generator=gen, dtype=F64)

    def cell(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x @ U.T)

    deq = il.DEQ(cell, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=300, on_failure="raise"),
                 backward=il.IFT(solver=il.Anderson(tol=1e-12, stop="abs", max_iter=300)))
    theirs = torchdeq.get_deq(f_solver="anderson", f_max_iter=300, f_tol=1e-12, f_stop_mode="abs",
                              b_solver="anderson", b_max_iter=300, b_tol=1e-12, b_stop_mode="abs", ift=True)
    theirs.train()
    z_ours = deq(x)
    z_out, _ = theirs(lambda z: cell(z, x), torch.zeros(batch, d, dtype=F64))
    z_theirs = z_out[-1]
    torch.testing.assert_close(z_ours, z_theirs, rtol=0, atol=1e-10)
    loss = lambda z: ((z - target) ** 2).sum()  # noqa: E731
    got = torch.autograd.grad(loss(z_ours), [W, U, x])
    want = torch.autograd.grad(loss(z_theirs), [W, U, x])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-8, atol=1e-10)
