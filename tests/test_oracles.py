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
