"""More peer oracles: problems from the peers' own test files, restated through the public API.

`tests/test_oracles.py` holds the first batch; this file adds further problems from the test suites of
jaxopt, optimistix, torchopt, cvxpylayers and torchdeq (each docstring names the peer test), checked in
float64 against a closed form, a dense oracle (numpy/scipy) or finite differences, never against this
library. Where a peer's test keeps its own default tolerances and iteration caps, the requirement here is
the project's contract: the answer is right, or the failure is reported (never a wrong converged value).
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


def _layer(kind, fn, inputs, init, *, solver, backward=None, **kwargs):
    """A one-variable layer `v` defined by the condition `kind(v, fn, (v, *inputs), **kwargs)`."""
    nodes = [il.Input(f"in{i}") for i in range(len(inputs))]
    v = il.Variable("v")
    problem = il.Problem([kind(v, fn, (v, *nodes), **kwargs)])
    return il.ImplicitLayer(problem, nodes, v, solver=solver, backward=backward, init={"v": init})


def _info(layer: il.ImplicitLayer) -> il.SolveInfo:
    (info,) = layer.last_solution.info.values()
    return info


def _fd_jacobian(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of `fn` (one sample) in `x`: the oracle where no closed form exists."""
    cols = []
    for j in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[j] = eps
        e = e.reshape(x.shape)
        cols.append(((fn(x + e) - fn(x - e)) / (2 * eps)).reshape(-1))
    return torch.stack(cols, 1)


# ============================================================================ jaxopt: fixed points


def test_jaxopt_anderson_rotation_map_fixed_point_is_the_centre():
    """jaxopt `anderson_test.py::test_rotation_map`: `x ← R(x − c) + c` with `R` block-diagonal 2×2
    rotations by `π/(2, 3, 4, 5, 6, 1.27, 1.73)`: not a contraction (‖R‖ = 1, plain iteration circles
    forever), yet Anderson (memory 10) finds the centre `c = (1, …, 14)`; the gradient in `c` is the
    identity (`(I − R)⁻¹(I − R)`)."""
    theta = math.pi / torch.tensor([2, 3, 4, 5, 6, 1.27, 1.73], dtype=F64)
    R = torch.block_diag(*[torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])]) for t in theta])
    c = torch.arange(1, 15, dtype=F64)[None].requires_grad_()
    x0 = torch.rand(14, generator=torch.Generator().manual_seed(0), dtype=F64)
    deq = il.DEQ(lambda x, c: (x - c) @ R.T + c, solver=il.Anderson(memory=10, **TIGHT, max_iter=400), z_init=x0,
                 backward=il.IFT(solver=il.linear.GMRES(tol=1e-12, max_iter=200)))
    x = deq(c)
    torch.testing.assert_close(x, c.detach(), rtol=0, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda c_: deq(c_)[0], c.detach())[:, 0]
    torch.testing.assert_close(jac, torch.eye(14, dtype=F64), rtol=0, atol=1e-8)
    picard = il.fixed_point(lambda x: (x - c.detach()) @ R.T + c.detach(), x0[None],
                            solver=il.FixedPointIteration(tol=1e-6, max_iter=100, on_failure="ignore"))
    assert not bool(picard.info.converged.any()), "plain iteration cannot converge on a rotation"


def test_jaxopt_anderson_scalar_affine_map():
    """jaxopt `anderson_test.py::test_support_for_scalars`: `x ← ½x + ½` from 0 has the fixed point 1,
    with Anderson's defaults (history 5) and with every solver; `dx/db = 2` for `x ← ½x + b`."""
    for solver in (il.Anderson(), il.Broyden(), il.FixedPointIteration(max_iter=100)):
        sol = il.fixed_point(lambda x: 0.5 * x + 0.5, torch.zeros(1, 1, dtype=F64), solver=solver)
        assert bool(sol.info.converged.all())
        torch.testing.assert_close(sol.value, torch.ones(1, 1, dtype=F64), rtol=1e-3, atol=0)
    deq = il.DEQ(lambda x, b: 0.5 * x + b, solver=il.Anderson(**TIGHT))
    b = torch.full((1, 1), 0.5, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(deq(b).sum(), b)
    torch.testing.assert_close(g, torch.full_like(b, 2.0), rtol=1e-10, atol=0)


def test_jaxopt_anderson_sign_flip_and_cubic_maps_reach_zero():
    """jaxopt `anderson_test.py::test_sin_fixed_point` (its pytree leaf `x ← −x`, which plain iteration
    only oscillates on, beside `sin(x)x²` and `x³`): Anderson with history 3 reaches 0 in every entry."""
    start = torch.tensor([[0.6, 0.0, -0.1, 0.7, 0.5, -1 / 3, 0.0, 2 / 3, -0.4 / 3]], dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sin(x[:, :3]) * x[:, :3] ** 2, x[:, 3:5] ** 3, -x[:, 5:]], 1)

    sol = il.fixed_point(f, start, solver=il.Anderson(memory=3, lam=1e-6, tol=1e-6, stop="abs", max_iter=1000, on_failure="raise"))
    torch.testing.assert_close(sol.value, torch.zeros_like(start), rtol=0, atol=1e-6)


def test_jaxopt_flat_landscape_gradient_is_zero():
    """jaxopt `anderson_test.py::test_grads_flat_landscape` (and `broyden_test.py`'s): `x ← θ ⊙ x`
    with `θ = (0.05, 0.2)` from `(1, −0.5)`: the fixed point is 0 for every θ, so `dx/dθ = 0` (the
    IFT's `(I − diag θ)⁻¹ diag(x*) = 0`); `gradcheck` in θ, for the fixed point and for the root
    `θx − x = 0` with Broyden."""
    theta = torch.tensor([[0.05, 0.2]], dtype=F64, requires_grad=True)
    x0 = torch.tensor([1.0, -0.5], dtype=F64)
    deq = il.DEQ(lambda x, t: t * x, solver=il.Anderson(**TIGHT, max_iter=100), z_init=x0)
    root = _layer(il.Root, lambda x, t: t * x - x, [theta], x0, solver=il.Broyden(**TIGHT, max_iter=100))
    for layer in (deq, root):
        x = layer(theta)
        torch.testing.assert_close(x, torch.zeros_like(x), rtol=0, atol=1e-11)
        (g,) = torch.autograd.grad(x.sum(), theta)
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-10)
        assert torch.autograd.gradcheck(layer, (theta,), eps=1e-5, atol=1e-6)


# ============================================================================ jaxopt: Broyden roots


def test_jaxopt_broyden_geometric_decay_root_within_ten_steps():
    """jaxopt `broyden_test.py::test_geometric_decay`: the root of `(0.9, 0.99, 0.999) ⊙ x − x` from
    `(1, 0.4, −0.2)` within `maxiter=10`, `tol=1e-5`: linear in 3 unknowns, so Broyden's secant steps
    must reach it (the root is 0; a converged answer must have ‖x‖ small, the peer's 1e-2)."""
    r = torch.tensor([0.9, 0.99, 0.999], dtype=F64)
    sol = il.root(lambda x: r * x - x, torch.tensor([[1.0, 0.4, -0.2]], dtype=F64),
                  solver=il.Broyden(max_iter=10, tol=1e-5, stop="abs", on_failure="ignore"))
    if bool(sol.info.converged.all()):
        assert float(sol.value.norm()) < 1e-2
    else:  # not reached: then it must be reported, and the residual must be above tol
        assert float((r * sol.value - sol.value).norm()) > 1e-5


def test_jaxopt_broyden_sin_and_cubic_roots():
    """jaxopt `broyden_test.py::test_sin_fixed_point`: the roots of `sin(x)x² − x` (from 0.6, 0, −0.1)
    and `x³ − x` (from 0.7, 0.5) with tol 1e-6: whatever root is reached, the residual there is below
    the tolerance, and a converged flag means it."""
    start = torch.tensor([[0.6, 0.0, -0.1, 0.7, 0.5]], dtype=F64)

    def g(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sin(x[:, :3]) * x[:, :3] ** 2 - x[:, :3], x[:, 3:] ** 3 - x[:, 3:]], 1)

    sol = il.root(g, start, solver=il.Broyden(max_iter=100, tol=1e-6, stop="abs", on_failure="raise"))
    assert float(g(sol.value).norm()) < 1e-6


def test_jaxopt_broyden_cos_root_value_and_gradient():
    """jaxopt `broyden_test.py::test_cos_fixed_point` / `test_simple_grads`: the root of
    `cos(x) + θ − x` from `(0.3, π/4)` with θ = (0, π/2): `(0.739085…, π/2)`, at the peer's loose
    tolerance (1e-2, `stop="abs"`) to within 1e-2 and at a tight one to 1e-10; `dx/dθ = 1/(1 + sin x)`."""
    theta = torch.tensor([[0.0, math.pi / 2]], dtype=F64)
    exact = torch.tensor([[0.7390851332151607, math.pi / 2]], dtype=F64)
    loose = il.root(lambda x: torch.cos(x) + theta - x, torch.tensor([[0.3, math.pi / 4]], dtype=F64),
                    solver=il.Broyden(max_iter=100, tol=1e-2, stop="abs", on_failure="raise"))
    torch.testing.assert_close(loose.value, exact, rtol=0, atol=1e-2)
    layer = _layer(il.Root, lambda x, t: torch.cos(x) + t - x, [theta], torch.tensor([0.0, math.pi / 4], dtype=F64),
                   solver=il.Broyden(**TIGHT, max_iter=400))
    th = theta.clone().requires_grad_()
    x = layer(th)
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(x.sum(), th)
    torch.testing.assert_close(g, 1 / (1 + torch.sin(exact)), rtol=1e-9, atol=0)
    assert torch.autograd.gradcheck(layer, (th,))


def test_jaxopt_broyden_affine_root_gradients():
    """jaxopt `broyden_test.py::test_affine_contractive_mapping`: the root of `Mx + b − x` (M symmetric,
    spectral radius < 0.5; n = 30 here) by Broyden, `gradcheck` in `M` and `b` (as the peer's
    `check_grads`), and the value against `(I − M)⁻¹b`."""
    gen = torch.Generator().manual_seed(0)
    n = 30
    M = 2 * torch.rand(n, n, generator=gen, dtype=F64) - 1
    M = M + M.T
    M = M / (2 * torch.linalg.eigvalsh(M).abs().max() + 1e-4)
    b = torch.rand(1, n, generator=gen, dtype=F64)

    def solve(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        layer = _layer(il.Root, lambda x, M, b: torch.einsum("bij,bj->bi", M, x) + b - x, [M, b], torch.zeros(b.shape[1], dtype=F64),
                       solver=il.Broyden(**TIGHT, max_iter=200))
        return layer(M, b)

    x = solve(M[None], b)
    torch.testing.assert_close(x[0], torch.linalg.solve(torch.eye(n, dtype=F64) - M, b[0]), rtol=0, atol=1e-10)
    small = M[:6, :6][None].clone().requires_grad_()
    assert torch.autograd.gradcheck(solve, (small, b[:, :6].clone().requires_grad_()))


# ============================================================================ jaxopt: implicit diff


def test_jaxopt_ridge_as_a_fixed_point_of_gradient_descent():
    """jaxopt `implicit_diff_test.py::test_custom_fixed_point`: ridge regression written as the fixed
    point of one gradient step `p ← p − η∇`, `FixedPoint` solved by Anderson; value and `dp/dλ` against
    the closed form, as in the peer (there compared to finite differences)."""
    from sklearn.datasets import make_regression

    X_np, y_np = make_regression(n_samples=10, n_features=3, random_state=0)
    X, y = torch.from_numpy(X_np), torch.from_numpy(y_np)
    n = X.shape[0]
    eta = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max() + 5.0)

    def step(p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        grad = ((p @ X.T - y) @ X) / n + lam * p
        return p - eta * grad

    layer = _layer(il.FixedPoint, step, [torch.zeros(1, 1, dtype=F64)], torch.zeros(3, dtype=F64),
                   solver=il.Anderson(**TIGHT, max_iter=500))
    lam = torch.full((1, 1), 5.0, dtype=F64, requires_grad=True)
    p = layer(lam)

    def closed(lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X + lam[0, 0] * n * torch.eye(3, dtype=F64), X.T @ y)[None]

    torch.testing.assert_close(p, closed(lam).detach(), rtol=1e-9, atol=0)
    jac = torch.autograd.functional.jacobian(lambda l_: layer(l_)[0], lam.detach())[:, 0, 0]
    want = torch.autograd.functional.jacobian(lambda l_: closed(l_)[0], lam.detach())[:, 0, 0]
    torch.testing.assert_close(jac, want, rtol=1e-8, atol=0)


def test_jaxopt_maximize_is_minimize_of_the_negation():
    """jaxopt `implicit_diff_test.py` restates ridge as `custom_root(grad)`; the same optimality condition
    holds for a maximisation of the negated objective: `Maximize` of `−(½‖Xp − y‖²/n + ½λ‖p‖²)` has the
    ridge solution and the same `dp/dλ` (checked by `gradcheck`)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(1, 8, 3, generator=gen, dtype=F64)
    y = torch.randn(1, 8, generator=gen, dtype=F64)

    def neg(p, lam, X, y):
        return -(0.5 * ((torch.einsum("bnk,bk->bn", X, p) - y) ** 2).mean(1) + 0.5 * lam[:, 0] * (p**2).sum(1))

    layer = _layer(il.Maximize, neg, [X[:, :1, :1], X, y], torch.zeros(3, dtype=F64), solver=il.Broyden(**TIGHT, max_iter=100))
    lam = torch.full((1, 1), 0.3, dtype=F64, requires_grad=True)
    p = layer(lam, X, y)
    exact = torch.linalg.solve(X[0].T @ X[0] / 8 + 0.3 * torch.eye(3, dtype=F64), X[0].T @ y[0] / 8)
    torch.testing.assert_close(p[0], exact, rtol=1e-10, atol=0)
    assert torch.autograd.gradcheck(layer, (lam, X.clone().requires_grad_(), y.clone().requires_grad_()))


# ============================================================================ optimistix: zoo


def test_optimistix_cos_fixed_point_with_a_scaled_argument():
    """optimistix `tests/helpers.py` (`_cos` in `fixed_point_fn_init_args`, the 28-entry `ones_pytree`
    start 0.5, `const = 1`): `y = cos(c y)`; at `c = 1` the Dottie number; `dy/dc = −y sin(cy)/(1 + c
    sin(cy))`, for Anderson, Broyden and plain iteration forwards (`c ≤ 1.1`, where `c·sin(cy*) < 1`
    makes plain iteration contract), and `gradcheck` at several `c`."""
    c = torch.linspace(0.5, 1.1, 28, dtype=F64)[None].requires_grad_()
    for solver in (il.Anderson(**TIGHT, max_iter=200), il.Broyden(**TIGHT, max_iter=200),
                   il.FixedPointIteration(**TIGHT, max_iter=2000)):
        deq = il.DEQ(lambda y, c: torch.cos(c * y), solver=solver, z_init=torch.full((28,), 0.5, dtype=F64))
        torch.testing.assert_close(deq(torch.ones(1, 28, dtype=F64)), torch.full((1, 28), 0.7390851332151607, dtype=F64),
                                   rtol=0, atol=1e-10)
        y = deq(c)
        torch.testing.assert_close(y, torch.cos(c * y), rtol=0, atol=1e-10)
        s = torch.sin(c * y)
        (g,) = torch.autograd.grad(y.sum(), c)
        torch.testing.assert_close(g, (-y * s / (1 + c * s)).detach(), rtol=1e-9, atol=0)
    assert torch.autograd.gradcheck(deq, (c,))


def test_optimistix_midpoint_linear_fixed_points_are_zero_with_zero_gradient():
    """optimistix `tests/helpers.py` (`_midpoint_y_linear`, `_midpoint_f_linear`, `_midpoint_k_linear`:
    one implicit-midpoint step of `y' = My` from `y₀ = 0` with `dt = 1/16`, in y-, f- and k-space, 28
    unknowns started at 0.5, a normal random `M`): each map is linear in `y` with no offset, so the
    fixed point is 0 and its gradient in `M` is zero (`gradcheck`)."""
    gen = torch.Generator().manual_seed(19)
    M = torch.randn(28, 28, generator=gen, dtype=F64)
    dt = 1 / 16
    maps = {
        "y": lambda y, M: dt * torch.einsum("bij,bj->bi", M, 0.5 * y),
        "f": lambda y, M: torch.einsum("bij,bj->bi", M, dt * y),
        "k": lambda y, M: dt * torch.einsum("bij,bj->bi", M, y),
    }
    for name, f in maps.items():
        deq = il.DEQ(f, solver=il.Anderson(**TIGHT, max_iter=300), z_init=torch.full((28,), 0.5, dtype=F64),
                     backward=il.IFT(solver=il.linear.GMRES(tol=1e-12, max_iter=200)))
        y = deq(M[None])
        torch.testing.assert_close(y, torch.zeros(1, 28, dtype=F64), rtol=0, atol=1e-10, msg=name)
        Mr = M[None].clone().requires_grad_()
        (g,) = torch.autograd.grad((deq(Mr) * torch.arange(28, dtype=F64)).sum(), Mr)
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-9, msg=name)


def _robertson(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The Robertson chemical kinetics right-hand side, batched `(B, 3)`, rates `k = (k1, k2, k3)`."""
    k1, k2, k3 = k[:, 0], k[:, 1], k[:, 2]
    a, b, c = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([-k1 * a + k3 * b * c, k1 * a - k2 * b**2 - k3 * b * c, k2 * b**2], 1)


def test_optimistix_robertson_midpoint_steps_from_zero():
    """optimistix `tests/helpers.py` (`_midpoint_{y,f,k}_nonlinear`: implicit-midpoint steps of the stiff
    Robertson system, rates (0.04, 3e7, 1e4), `dt = 1e-8`, `y₀ = 0`, started at ones): the right-hand
    side vanishes at 0, so each fixed point is 0; with the tiny step each map is a contraction. The
    gradient in the rates is zero there; also solved as a root by Broyden."""
    k = torch.tensor([[0.04, 3e7, 1e4]], dtype=F64)
    dt = 1e-8
    maps = {
        "y": lambda y, k: dt * _robertson(0.5 * y, k),
        "f": lambda y, k: _robertson(dt * y, k),
        "k": lambda y, k: dt * _robertson(y, k),
    }
    for name, f in maps.items():
        for solver in (il.Anderson(**TIGHT, max_iter=200), il.Broyden(**TIGHT, max_iter=200)):
            deq = il.DEQ(f, solver=solver, z_init=torch.ones(3, dtype=F64))
            kr = k.clone().requires_grad_()
            y = deq(kr)
            torch.testing.assert_close(y, torch.zeros_like(y), rtol=0, atol=1e-10, msg=name)
            (g,) = torch.autograd.grad(y.sum(), kr)
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12, msg=name)


def test_optimistix_matyas_minimum_at_the_origin():
    """optimistix `tests/helpers.py` (`matyas` from `(6, 6)` with constants `(0.26, 0.48)`): the minimum
    of `c₁(x² + y²) − c₂xy` is the origin (a positive-definite quadratic for `2c₁ > c₂`), whatever the
    constants, so the gradient in them is zero; by Broyden and by Anderson with the default step."""
    c = torch.tensor([[0.26, 0.48]], dtype=F64, requires_grad=True)

    def matyas(v, c):
        return c[:, 0] * (v[:, 0] ** 2 + v[:, 1] ** 2) - c[:, 1] * v[:, 0] * v[:, 1]

    for solver in (il.Broyden(**TIGHT, max_iter=200), il.Anderson(**TIGHT, max_iter=2000)):
        layer = _layer(il.Minimize, matyas, [c], torch.tensor([6.0, 6.0], dtype=F64), solver=solver)
        v = layer(c)
        torch.testing.assert_close(v, torch.zeros_like(v), rtol=0, atol=1e-10)
        jac = torch.autograd.functional.jacobian(lambda c_: layer(c_)[0], c.detach())[:, 0]
        torch.testing.assert_close(jac, torch.zeros_like(jac), rtol=0, atol=1e-9)


def test_optimistix_beale_minimum_and_its_derivative_in_the_constants():
    """optimistix `tests/helpers.py` (`beale` from `(2, 0)` with constants `(1.5, 2.25, 2.625)`): the
    minimum `(3, ½)`, where every residual `cᵢ − x + x yⁱ` vanishes; so `d(x*, y*)/dc` is the least
    squares pseudo-inverse of the residuals' Jacobian `[[−1 + yⁱ, i x yⁱ⁻¹]]ᵢ` (negated)."""
    c = torch.tensor([[1.5, 2.25, 2.625]], dtype=F64, requires_grad=True)

    def beale(v, c):
        x, y = v[:, 0], v[:, 1]
        return sum((c[:, i - 1] - x + x * y**i) ** 2 for i in (1, 2, 3))

    layer = _layer(il.Minimize, beale, [c], torch.tensor([2.0, 0.0], dtype=F64), solver=il.Broyden(**TIGHT, max_iter=300))
    v = layer(c)
    torch.testing.assert_close(v, torch.tensor([[3.0, 0.5]], dtype=F64), rtol=0, atol=1e-9)
    J = torch.tensor([[-1 + 0.5**i, i * 3.0 * 0.5 ** (i - 1)] for i in (1, 2, 3)], dtype=F64)
    # r(v, c) = c + φ(v): d v*/dc = −(JᵀJ)⁻¹Jᵀ
    want = -torch.linalg.solve(J.T @ J, J.T)
    jac = torch.autograd.functional.jacobian(lambda c_: layer(c_)[0], c.detach())[:, 0]
    torch.testing.assert_close(jac, want, rtol=1e-7, atol=1e-9)


def test_optimistix_bowl_and_diagonal_bowl_minima():
    """optimistix `tests/helpers.py` (`bowl`: `yᵀAy` with `A = MᵀM`, M 20×20 normal, start 0.05;
    `diagonal_quadratic_bowl`: `Σ y²(0.1 + w)`, `w` squared normals, start 0.05): both minima are 0.
    Restated with a shift `s` (`(y − s)ᵀA(y − s)`) so the minimum is `s` and `dy*/ds = I`."""
    gen = torch.Generator().manual_seed(17)
    M = torch.randn(20, 20, generator=gen, dtype=F64)
    A = M.T @ M / 20  # the 1/20 keeps the eigenvalues near 1 (the peer's cond. number, smaller scale)
    w = torch.randn(20, generator=gen, dtype=F64) ** 2
    s = torch.zeros(1, 20, dtype=F64)
    bowl = _layer(il.Minimize, lambda y, s: torch.einsum("bi,ij,bj->b", y - s, A, y - s), [s], torch.full((20,), 0.05, dtype=F64),
                  solver=il.Broyden(**TIGHT, max_iter=300))
    diag = _layer(il.Minimize, lambda y, s: (((y - s) ** 2) * (0.1 + w)).sum(1), [s], torch.full((20,), 0.05, dtype=F64),
                  solver=il.Anderson(**TIGHT, max_iter=300))
    for layer in (bowl, diag):
        torch.testing.assert_close(layer(s), s, rtol=0, atol=1e-9)
        shift = torch.randn(1, 20, generator=gen, dtype=F64)
        jac = torch.autograd.functional.jacobian(lambda s_: layer(s_)[0], shift)[:, 0]
        torch.testing.assert_close(jac, torch.eye(20, dtype=F64), rtol=0, atol=1e-7)


def test_optimistix_square_minus_one_minimum():
    """optimistix `tests/helpers.py` (`square_minus_one`: `Σx² − 1` from 1, minimum value −1 at 0):
    solved by the three solvers with their defaults (a quadratic with Hessian 2I); the minimiser 0."""
    for solver in (il.Anderson(), il.Broyden(), il.FixedPointIteration()):
        layer = _layer(il.Minimize, lambda x, d: (x**2).sum(1) - 1 + 0 * d[:, 0], [torch.zeros(1, 1, dtype=F64)],
                       torch.ones(1, dtype=F64), solver=solver)
        x = layer(torch.zeros(1, 1, dtype=F64))
        assert bool(_info(layer).converged.all())
        assert float(x.abs().max()) < 1e-3


def test_optimistix_variably_dimensioned_least_squares():
    """optimistix `tests/helpers.py` (`variably_dimensioned`, TUOS eq. 25; the peer skips it as hard):
    residuals `(y − c, Σ i(yᵢ − c), (Σ i(yᵢ − c))²)`, n = 10, start `1 − i/10`; the minimum is `y = c`.
    With tight options it is solved or reported; a converged answer is `c`, and `dy*/dc = 1`."""
    n = 10
    i = torch.arange(1, n + 1, dtype=F64)

    def objective(y, c):
        t = ((y - c) * i).sum(1)
        return ((y - c) ** 2).sum(1) + t**2 + t**4

    layer = _layer(il.Minimize, objective, [torch.ones(1, 1, dtype=F64)], 1 - i / 10,
                   solver=il.Broyden(tol=1e-10, stop="abs", max_iter=500, on_failure="ignore"))
    c = torch.ones(1, 1, dtype=F64, requires_grad=True)
    y = layer(c)
    info = _info(layer)
    if bool(info.converged.all()):
        torch.testing.assert_close(y, torch.ones(1, n, dtype=F64), rtol=0, atol=1e-7)
        (g,) = torch.autograd.grad(y.sum(), c)
        torch.testing.assert_close(g, torch.full_like(g, float(n)), rtol=1e-6, atol=0)


def test_optimistix_bisection_style_scalar_roots():
    """optimistix `tests/helpers.py` (`bisection_fn_init_options_args`): `y − 1` from 1 (the start is the
    root), and the fixed points of `cos(y)` and `exp(−y)` in [0, 1] from 1, as roots `f(y) − y`;
    against the Dottie number and the omega constant, and `dy/dc` for `exp(−cy)` against
    `−y²/(1 + cy)`."""
    one = torch.ones(1, 1, dtype=F64)
    sol = il.root(lambda y: y - 1, one, solver=il.Broyden(**TIGHT))
    torch.testing.assert_close(sol.value, one, rtol=0, atol=0)
    assert int(sol.info.nstep[0]) == 0
    sol = il.root(lambda y: torch.cos(y) - y, one, solver=il.Broyden(**TIGHT))
    torch.testing.assert_close(sol.value, torch.full_like(one, 0.7390851332151607), rtol=0, atol=1e-10)
    layer = _layer(il.Root, lambda y, c: torch.exp(-c * y) - y, [one], torch.ones(1, dtype=F64), solver=il.Broyden(**TIGHT))
    c = one.clone().requires_grad_()
    y = layer(c)
    torch.testing.assert_close(y, torch.full_like(one, 0.5671432904097838), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(y.sum(), c)
    torch.testing.assert_close(g, -(y**2) / (1 + y), rtol=1e-9, atol=0)


def test_optimistix_small_mlp_fixed_point_against_scipy():
    """optimistix `tests/helpers.py` (`_nn`: `y = 0.1 · MLP(y)`, one softplus hidden layer of width 8, 28
    unknowns started at 0.5; the peer's weights are JAX-seeded, restated with torch-seeded ones): the
    fixed point against `scipy.optimize.fsolve`, and `gradcheck` in the first layer's weights."""
    gen = torch.Generator().manual_seed(42)
    W1, b1 = torch.randn(8, 28, generator=gen, dtype=F64) / 28**0.5, torch.randn(8, generator=gen, dtype=F64)
    W2, b2 = torch.randn(28, 8, generator=gen, dtype=F64) / 8**0.5, torch.randn(28, generator=gen, dtype=F64)

    def cell(y, W):
        return 0.1 * (torch.nn.functional.softplus(torch.einsum("bij,bj->bi", W, y) + b1) @ W2.T + b2)

    deq = il.DEQ(cell, solver=il.Anderson(**TIGHT, max_iter=100), z_init=torch.full((28,), 0.5, dtype=F64))
    y = deq(W1[None])

    def residual(y_np):
        yt = torch.from_numpy(y_np)[None]
        return (cell(yt, W1[None]) - yt)[0].numpy()

    exact = optimize.fsolve(residual, np.full(28, 0.5), xtol=1e-14)
    torch.testing.assert_close(y[0], torch.from_numpy(exact), rtol=0, atol=1e-10)
    small = il.DEQ(lambda y, W: cell(y, W), solver=il.Anderson(**TIGHT, max_iter=100), z_init=torch.full((28,), 0.5, dtype=F64))
    assert torch.autograd.gradcheck(small, (W1[None].clone().requires_grad_(),), eps=1e-6, atol=1e-6)


# ============================================================================ cvxpylayers: constrained


def _box_qp_oracle(Q: np.ndarray, q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    res = optimize.minimize(lambda x: 0.5 * x @ Q @ x + q @ x, np.zeros(len(q)), jac=lambda x: Q @ x + q,
                            bounds=[(lo, hi)] * len(q), method="L-BFGS-B", options=dict(ftol=1e-16, gtol=1e-14, maxiter=10000))
    return res.x


def test_cvxpylayers_box_constrained_qp_against_scipy_and_active_set_gradient():
    """cvxpylayers `torch/test_cvxpylayer.py` (its box-constrained QPs, e.g. `test_simple_batch_socp`'s
    `x ≥ 0` rows and the `test_basic_gp`-style bounds): `min ½xᵀQx + qᵀx` over `−1 ≤ x ≤ 1`, batched;
    values against scipy's L-BFGS-B, and `dx*/dq` against the free-set closed form `−Q_FF⁻¹` (zero on
    the rows at a bound)."""
    gen = torch.Generator().manual_seed(5)
    n, batch = 5, 3
    L = torch.randn(n, n, generator=gen, dtype=F64)
    Q = L @ L.T / n + 0.5 * torch.eye(n, dtype=F64)
    q = 2.0 * torch.randn(batch, n, generator=gen, dtype=F64)
    step = 1.0 / float(torch.linalg.eigvalsh(Q).max())
    layer = _layer(il.Minimize, lambda x, q: 0.5 * torch.einsum("bi,ij,bj->b", x, Q, x) + (q * x).sum(1), [q],
                   torch.zeros(n, dtype=F64), solver=il.Anderson(**TIGHT, max_iter=1000),
                   constraint=il.sets.Box(-1.0, 1.0), step_size=step)
    x = layer(q)
    for b in range(batch):
        exact = _box_qp_oracle(Q.numpy(), q[b].numpy(), -1.0, 1.0)
        torch.testing.assert_close(x[b], torch.from_numpy(exact), rtol=0, atol=1e-7)
        free = (x[b].abs() < 1 - 1e-8)
        assert 0 < int(free.sum()), "a sample with no free coordinate tests nothing"
        want = torch.zeros(n, n, dtype=F64)
        idx = free.nonzero()[:, 0]
        want[idx[:, None], idx[None, :]] = -torch.linalg.inv(Q[idx][:, idx])
        jac = torch.autograd.functional.jacobian(lambda q_: layer(q_[None])[0], q[b])
        torch.testing.assert_close(jac, want, rtol=0, atol=1e-8)


def test_cvxpylayers_linf_ball_projection_and_its_jacobian():
    """cvxpylayers' projection-type layers (`test_proj_*`-style problems; jaxopt `projection_test.py`
    `projection_linf_ball`): `argmin ½‖v − x‖²` over `‖v‖∞ ≤ r` is the clip `clamp(x, −r, r)`, whose
    Jacobian is the diagonal indicator of the unclipped coordinates."""
    r = 0.7
    x = torch.tensor([[0.3, -1.2, 0.9, -0.1, 2.0]], dtype=F64)
    layer = _layer(il.Minimize, lambda v, x: 0.5 * ((v - x) ** 2).sum(1), [x], torch.zeros(5, dtype=F64),
                   solver=il.Anderson(**TIGHT, max_iter=100), constraint=il.sets.LInfBall(r), step_size=0.5)
    v = layer(x)
    torch.testing.assert_close(v, x.clamp(-r, r), rtol=0, atol=1e-11)
    jac = torch.autograd.functional.jacobian(lambda x_: layer(x_[None])[0], x[0])
    torch.testing.assert_close(jac, torch.diag((x[0].abs() < r).to(F64)), rtol=0, atol=1e-9)


def test_cvxpylayers_entropy_regularised_simplex_layer_is_softmax():
    """cvxpylayers `test_entropy_maximization`-style layer (max entropy with a linear term on the
    simplex): `argmax xᵀy + H(y)` over the simplex is `softmax(x)`. Restated unconstrained through the
    KKT conditions: `y = softmax` is `exp(x − ν)` with `ν` the root of `Σ exp(x − ν) − 1`; the Jacobian
    `diag(y) − yyᵀ`."""
    x = torch.tensor([[0.5, -1.0, 2.0, 0.1], [3.0, 3.0, -2.0, 0.0]], dtype=F64)
    layer = _layer(il.Root, lambda nu, x: torch.exp(x - nu).sum(1, keepdim=True) - 1, [x],
                   lambda x: x.max(1, keepdim=True).values, solver=il.Broyden(**TIGHT, max_iter=100))

    def entmax(x):
        return torch.exp(x - layer(x))

    y = entmax(x)
    torch.testing.assert_close(y, torch.softmax(x, 1), rtol=0, atol=1e-12)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda xi: entmax(xi[None])[0], x[i])
        s = torch.softmax(x[i], 0)
        torch.testing.assert_close(jac, torch.diag(s) - torch.outer(s, s), rtol=0, atol=1e-11)


# ============================================================================ backward modes


def test_torchdeq_backward_modes_on_a_linear_cell():
    """torchdeq `test/`'s gradient checks (IFT vs. unrolled vs. phantom, `test_grad.py`-style) on the
    linear cell `z = Wz + x` (‖W‖ = 0.5): the exact gradient `(I − Wᵀ)⁻¹ w` in `x`, from `IFT` with
    each linear solver, from `Unroll`, and a `Phantom` gradient that converges to it as `k` grows."""
    gen = torch.Generator().manual_seed(0)
    d = 6
    W = torch.randn(d, d, generator=gen, dtype=F64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(2, d, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(2, d, generator=gen, dtype=F64)
    want = torch.linalg.solve(torch.eye(d, dtype=F64) - W.T, w.T).T
    backwards = [
        il.IFT(), il.IFT(solver=il.linear.GMRES(tol=1e-12)), il.IFT(solver=il.linear.Dense()),
        il.IFT(solver=il.linear.Neumann(tol=1e-12, stop="abs", max_iter=200)), il.IFT(solver=il.Broyden(tol=1e-12, stop="abs")),
        il.Unroll(),
    ]
    for backward in backwards:
        deq = il.DEQ(lambda z, x: z @ W.T + x, solver=il.Anderson(**TIGHT, max_iter=100), backward=backward)
        (g,) = torch.autograd.grad((deq(x) * w).sum(), x)
        tol = 1e-3 if isinstance(backward, il.IFT) and backward.solver is None else 1e-9
        torch.testing.assert_close(g, want, rtol=tol, atol=tol, msg=repr(backward))
    errors = []
    for k in (1, 5, 40):
        deq = il.DEQ(lambda z, x: z @ W.T + x, solver=il.Anderson(**TIGHT, max_iter=100), backward=il.Phantom(k=k, damping=1.0))
        (g,) = torch.autograd.grad((deq(x) * w).sum(), x)
        errors.append(float((g - want).norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-9, errors


# ============================================================================ cvxpylayers: API-level cases


def test_cvxpylayers_shared_parameter_across_two_layers_gradcheck():
    """cvxpylayers `test_shared_parameter`: two least-squares layers `argmin ‖Ax − bᵢ‖²` sharing the
    parameter `A` (a 10×5 input of both), their solutions concatenated; values against `lstsq`,
    `gradcheck` in `A`."""
    rng = np.random.RandomState(243)
    m, n = 10, 5
    b1, b2 = torch.from_numpy(rng.randn(1, m)), torch.from_numpy(rng.randn(1, m))

    def make(b):
        return _layer(il.Minimize, lambda x, A: ((torch.einsum("bij,bj->bi", A, x) - b) ** 2).sum(1), [torch.zeros(1, m, n, dtype=F64)],
                      torch.zeros(n, dtype=F64), solver=il.Broyden(**TIGHT, max_iter=200))

    layer1, layer2 = make(b1), make(b2)
    A = torch.from_numpy(rng.randn(1, m, n)).requires_grad_()
    for layer, b in ((layer1, b1), (layer2, b2)):
        exact = torch.linalg.lstsq(A[0].detach(), b[0]).solution
        torch.testing.assert_close(layer(A)[0], exact, rtol=0, atol=1e-9)
    assert torch.autograd.gradcheck(lambda A: torch.cat([layer1(A), layer2(A)], 1), (A,))


def test_cvxpylayers_equality_constrained_minimum_norm_via_its_kkt_root():
    """cvxpylayers `test_equality`: `min ‖x‖²` s.t. `Ax = b` (A = I, n = 10) has `x* = b`. Restated as the
    root of its KKT system `(2x + Aᵀν, Ax − b)` in the stacked unknown `(x, ν)` (an indefinite Jacobian,
    which a root solver must handle); value `b`, multiplier `−2b`, and `gradcheck` of `Σx*` in `b`."""
    n = 10
    A = torch.eye(n, dtype=F64)

    def kkt(w, b):
        x, nu = w[:, :n], w[:, n:]
        return torch.cat([2 * x + nu @ A, x @ A.T - b], 1)

    # line_search=True: without it Broyden's type-II update can turn singular on this system and stall
    # (reported, /tmp/reports/peer_2.py).
    layer = _layer(il.Root, kkt, [torch.zeros(1, n, dtype=F64)], torch.zeros(2 * n, dtype=F64),
                   solver=il.Broyden(**TIGHT, max_iter=200, line_search=True))
    b = torch.randn(1, n, generator=torch.Generator().manual_seed(243), dtype=F64, requires_grad=True)
    w = layer(b)
    torch.testing.assert_close(w[:, :n], b.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(w[:, n:], -2 * b.detach(), rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(lambda b: layer(b)[:, :n].sum(), (b,))


def test_cvxpylayers_incorrect_batch_sizes_are_a_value_error():
    """cvxpylayers `test_incorrect_parameter_shape`: inputs whose batch sizes disagree are refused with
    a `ValueError` that names them."""
    layer = _layer(il.Minimize, lambda x, A, b: ((torch.einsum("bij,bj->bi", A, x) - b) ** 2).sum(1),
                   [torch.zeros(1, 5, 3, dtype=F64), torch.zeros(1, 5, dtype=F64)], torch.zeros(3, dtype=F64), solver=il.Broyden())
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(4, 5, 3, dtype=F64), torch.randn(2, 5, dtype=F64))


def test_cvxpylayers_broadcast_parameter_gradient_sums_over_the_batch():
    """cvxpylayers `test_broadcasting`: `A` shared by the batch (captured), `b` repeated over 2 samples;
    the gradient in `A` of the batch is twice the single sample's, against the ridge closed form
    `(AᵀA + I)⁻¹Aᵀb`."""
    gen = torch.Generator().manual_seed(243)
    m, n = 30, 6
    A = torch.randn(m, n, generator=gen, dtype=F64, requires_grad=True)
    b0 = torch.randn(m, generator=gen, dtype=F64)
    b = b0[None].repeat(2, 1)
    layer = _layer(il.Minimize, lambda x, b: ((x @ A.T - b) ** 2).sum(1) + (x**2).sum(1), [b], torch.zeros(n, dtype=F64),
                   solver=il.Broyden(**TIGHT, max_iter=200))
    (g_batch,) = torch.autograd.grad(layer(b).sum(), A)
    exact = torch.linalg.solve(A.T @ A + torch.eye(n, dtype=F64), A.T @ b0)
    (g_one,) = torch.autograd.grad(exact.sum(), A)
    torch.testing.assert_close(g_batch, 2 * g_one, rtol=1e-8, atol=1e-10)


def test_cvxpylayers_unbounded_problem_is_reported_not_returned():
    """cvxpylayers `test_unbounded` (`min x` s.t. `x ≤ p`, a solver error there): `min p·x` with no bound
    below, unconstrained and over `Box(upper=1)`, must not be returned as converged; the default policy
    warns and `"raise"` raises."""
    p = torch.ones(1, 1, dtype=F64)
    for constraint in (None, il.sets.Box(upper=1.0)):
        layer = _layer(il.Minimize, lambda x, p: (x * p).sum(1), [p], torch.zeros(1, dtype=F64), solver=il.Anderson(max_iter=50),
                       constraint=constraint)
        with pytest.warns(il.ConvergenceWarning, match="did not converge"):
            layer(p)
        assert not bool(_info(layer).converged.any())
        strict = _layer(il.Minimize, lambda x, p: (x * p).sum(1), [p], torch.zeros(1, dtype=F64),
                        solver=il.Broyden(max_iter=50, on_failure="raise"), constraint=constraint)
        with pytest.raises(il.ConvergenceError):
            strict(p)


# ============================================================================ constrained and coupled problems


def test_linear_objective_over_a_ball_and_a_box():
    """cvxpylayers' LPs (the `test_example`-style `x ≥ 0` bounds with a linear objective) and jaxopt
    `projected_gradient_test.py` with a linear loss: `argmin cᵀx` over `‖x‖ ≤ 1` is `−c/‖c‖` with
    Jacobian `−(I − ĉĉᵀ)/‖c‖`; over `[0, 1]ⁿ` it is the vertex `1[c < 0]` with a zero Jacobian. No
    curvature: the `"auto"` step must still work, for every solver."""
    c = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.05]], dtype=F64)
    for solver in (il.Anderson(**TIGHT, max_iter=300), il.Broyden(**TIGHT, max_iter=300), il.FixedPointIteration(**TIGHT, max_iter=300)):
        ball = _layer(il.Minimize, lambda v, c: (v * c).sum(1), [c], torch.zeros(3, dtype=F64), solver=solver, constraint=il.sets.L2Ball(1.0))
        torch.testing.assert_close(ball(c), -c / c.norm(dim=1, keepdim=True), rtol=0, atol=1e-12)
        for i in range(2):
            jac = torch.autograd.functional.jacobian(lambda c_: ball(c_[None])[0], c[i])
            u = c[i] / c[i].norm()
            torch.testing.assert_close(jac, -(torch.eye(3, dtype=F64) - torch.outer(u, u)) / c[i].norm(), rtol=0, atol=1e-10)
        box = _layer(il.Minimize, lambda v, c: (v * c).sum(1), [c], torch.full((3,), 0.5, dtype=F64), solver=solver,
                     constraint=il.sets.Box(0.0, 1.0))
        torch.testing.assert_close(box(c), (c < 0).to(F64), rtol=0, atol=1e-12)
        cr = c.clone().requires_grad_()
        (g,) = torch.autograd.grad((box(cr) * torch.arange(3, dtype=F64)).sum(), cr)
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


def test_maximize_over_a_box_gradcheck_and_matrix_variable_in_a_ball():
    """jaxopt `projected_gradient_test.py` (box-constrained QPs; here as a `Maximize` of the negated
    quadratic) and `projection_l2_ball` on a matrix-shaped variable (norm over all trailing dims, as
    jaxopt's pytree projections): `gradcheck` through both, and the ball's value `X/‖X‖_F`."""
    Q = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=F64)
    x = torch.tensor([[0.3, -1.2, 0.9], [0.1, 0.2, -0.3]], dtype=F64, requires_grad=True)
    layer = _layer(il.Maximize, lambda v, x: -0.5 * torch.einsum("bi,ij,bj->b", v - x, Q, v - x), [x], torch.zeros(3, dtype=F64),
                   solver=il.Anderson(**TIGHT, max_iter=500), constraint=il.sets.Box(-0.5, 0.5))
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)
    X = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=F64, requires_grad=True)
    ball = _layer(il.Minimize, lambda v, x: 0.5 * ((v - x) ** 2).sum((1, 2)), [X], torch.zeros(2, 2, dtype=F64),
                  solver=il.Anderson(**TIGHT, max_iter=300), constraint=il.sets.L2Ball(1.0), step_size=0.5)
    torch.testing.assert_close(ball(X), (X / X.norm()).detach(), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(ball, (X,))


def test_bilevel_fixed_point_and_minimize_in_one_block_against_the_reduced_problem():
    """torchopt `test_implicit.py`'s bilevel setting and jaxopt's `custom_root` on a composed optimality
    condition: `u* = argmin_u ½‖z(u) − t‖² + ½λ‖u‖²` with `z = Az + Bu + c` (total semantics, one
    block with the adjoint). Eliminating `z = Mu + d` gives ridge regression in `u`: values and the
    gradient in `t` against its closed form, with Anderson and Broyden. `total=False` (each variable
    stationary with the other frozen) against its own linear system."""
    gen = torch.Generator().manual_seed(1)
    n, k, lam = 5, 3, 0.3
    A = torch.randn(n, n, generator=gen, dtype=F64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    B, c = torch.randn(n, k, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    t = torch.randn(2, n, generator=gen, dtype=F64, requires_grad=True)
    M = torch.linalg.solve(torch.eye(n, dtype=F64) - A, B)
    d = torch.linalg.solve(torch.eye(n, dtype=F64) - A, c)

    def build(solver, objective, total):
        T, z, u = il.Input("t"), il.Variable("z"), il.Variable("u")
        problem = il.Problem([il.FixedPoint(z, lambda z, u: z @ A.T + u @ B.T + c, (z, u)),
                              il.Minimize(u, objective, (u, z, T), total=total)])
        return il.ImplicitLayer(problem, [T], [u, z], solver=solver, init={"z": torch.zeros(n, dtype=F64), "u": torch.zeros(k, dtype=F64)})

    ridge = torch.linalg.solve(M.T @ M + lam * torch.eye(k, dtype=F64), ((t - d) @ M).T).T
    w = torch.randn(2, k, generator=gen, dtype=F64)
    (want,) = torch.autograd.grad((ridge * w).sum(), t)
    for solver in (il.Anderson(**TIGHT, max_iter=2000), il.Broyden(**TIGHT, max_iter=500)):
        layer = build(solver, lambda u, z, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * lam * (u**2).sum(1), True)
        u, z = layer(t)
        torch.testing.assert_close(u, ridge.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(z, (u @ M.T + d).detach(), rtol=0, atol=1e-9)
        (got,) = torch.autograd.grad((u * w).sum(), t)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # partial: λu + Bᵀ(z − t) = 0 with z = Mu + d
    partial = build(il.Broyden(**TIGHT, max_iter=500), lambda u, z, t: 0.5 * lam * (u**2).sum(1) + ((u @ B.T) * (z - t)).sum(1), False)
    exact = torch.linalg.solve(lam * torch.eye(k, dtype=F64) + B.T @ M, B.T @ (t - d).T).T
    u, _ = partial(t)
    torch.testing.assert_close(u, exact.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.autograd.grad(u.sum(), t)[0], torch.autograd.grad(exact.sum(), t)[0], rtol=1e-8, atol=1e-10)


def test_two_player_quadratic_game_with_partial_semantics():
    """A Nash equilibrium (jaxopt's `custom_root` on the stacked first-order conditions of two
    players): `u` minimises `u² + uᵀw − uᵀp`, `w` minimises `1.5w² + wᵀu + wᵀp`, each with the other
    frozen; the equilibrium solves `[[2, 1], [1, 3]] (u, w) = (p, −p)`; `gradcheck` in `p`."""
    P, u, w = il.Input("p"), il.Variable("u"), il.Variable("w")
    problem = il.Problem([
        il.Minimize(u, lambda u, w, p: (u**2).sum(1) + (u * w).sum(1) - (u * p).sum(1), (u, w, P), total=False),
        il.Minimize(w, lambda w, u, p: 1.5 * (w**2).sum(1) + (w * u).sum(1) + (w * p).sum(1), (w, u, P), total=False),
    ])
    layer = il.ImplicitLayer(problem, [P], [u, w], solver=il.Broyden(**TIGHT, max_iter=100),
                             init={"u": torch.zeros(2, dtype=F64), "w": torch.zeros(2, dtype=F64)})
    p = torch.tensor([[1.0, -0.5]], dtype=F64, requires_grad=True)
    U, W = layer(p)
    exact = torch.linalg.solve(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64), torch.stack([p[0], -p[0]]).detach())
    torch.testing.assert_close(U[0], exact[0], rtol=0, atol=1e-11)
    torch.testing.assert_close(W[0], exact[1], rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda p: layer(p), (p,))


def test_fixed_point_then_minimize_in_two_blocks_gradcheck():
    """jaxopt `implicit_diff_test.py`'s composition of solvers (a root whose parameters are another
    solver's output): `z = tanh(Az + t)` then `u = argmin ½‖u − z‖² + ¼Σu⁴` (two blocks, solved in
    order); `gradcheck` in `t` and the second block's stationarity `u − z + u³ = 0`."""
    gen = torch.Generator().manual_seed(1)
    n = 5
    A = torch.randn(n, n, generator=gen, dtype=F64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    T, z, u = il.Input("t"), il.Variable("z"), il.Variable("u")
    problem = il.Problem([il.FixedPoint(z, lambda z, t: torch.tanh(z @ A.T + t), (z, T)),
                          il.Minimize(u, lambda u, z: 0.5 * ((u - z) ** 2).sum(1) + 0.25 * (u**4).sum(1), (u, z))])
    layer = il.ImplicitLayer(problem, [T], [u, z], solver=il.Broyden(tol=1e-12, stop="abs", max_iter=300, on_failure="raise"),
                             init={"z": torch.zeros(n, dtype=F64), "u": torch.zeros(n, dtype=F64)})
    t = torch.randn(2, n, generator=gen, dtype=F64, requires_grad=True)
    uu, zz = layer(t)
    torch.testing.assert_close(uu - zz + uu**3, torch.zeros_like(uu), rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (t,))


def test_damped_fixed_point_and_root_conditions():
    """jaxopt `fixed_point_iteration_test.py` / `anderson_test.py` with damping (the peers' `mixing`/
    `beta`): `z = cos z + θ` as a `FixedPoint(damping=0.3)` (Anderson) and as the `Root` of
    `z − cos z − θ` with `damping=0.5` (Anderson, Picard) and Broyden; value and `gradcheck`."""
    theta = torch.tensor([[0.0, 1.0]], dtype=F64, requires_grad=True)
    layers = [
        _layer(il.FixedPoint, lambda z, t: torch.cos(z) + t, [theta], torch.zeros(2, dtype=F64),
               solver=il.Anderson(**TIGHT, max_iter=300), damping=0.3),
    ] + [
        _layer(il.Root, lambda z, t: z - torch.cos(z) - t, [theta], torch.zeros(2, dtype=F64), solver=solver, damping=0.5)
        for solver in (il.Anderson(**TIGHT, max_iter=300), il.FixedPointIteration(**TIGHT, max_iter=500), il.Broyden(**TIGHT, max_iter=100))
    ]
    for layer in layers:
        z = layer(theta)
        torch.testing.assert_close(z - torch.cos(z), theta, rtol=0, atol=1e-10)
        assert torch.autograd.gradcheck(layer, (theta,))


# ============================================================================ transforms and backward modes


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp decompositions
def test_jaxopt_jacobians_by_torch_func_transforms():
    """jaxopt `implicit_diff_test.py` (`jax.jacrev` / `jax.jacfwd` / `jax.vmap` over a solver with
    implicit differentiation): `torch.func.jacrev` and `jacfwd` of the cos fixed point against
    `diag(1/(1 + sin z*))`, and `vmap` over samples against the equation."""
    deq = il.DEQ(lambda z, th: torch.cos(z) + th, solver=il.Anderson(**TIGHT, max_iter=200))
    theta = torch.tensor([[0.0, 1.0, -0.5]], dtype=F64)
    exact = torch.diag(1 / (1 + torch.sin(deq(theta)[0])))
    torch.testing.assert_close(torch.func.jacrev(deq)(theta)[0, :, 0, :], exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(deq)(theta)[0, :, 0, :], exact, rtol=1e-10, atol=1e-12)
    many = torch.tensor([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]], dtype=F64)
    out = torch.func.vmap(lambda th: deq(th[None])[0])(many)
    torch.testing.assert_close(out - torch.cos(out), many, rtol=0, atol=1e-10)


def test_unroll_and_phantom_through_a_ball_projection():
    """jaxopt `projection_test.py` (the ball's Jacobian) with the other backward modes (jaxopt's
    `implicit_diff=False` unrolling; torchdeq's phantom gradients): `Unroll` and a long `Phantom` of the
    projected-gradient map give `(r/‖x‖)(I − x̂x̂ᵀ)` outside the ball."""
    x = torch.tensor([[2.0, -1.0, 2.0]], dtype=F64)
    u = x[0] / 3
    want = 0.5 * (torch.eye(3, dtype=F64) - torch.outer(u, u))
    for backward in (il.Unroll(), il.Phantom(k=30, damping=1.0)):
        layer = _layer(il.Minimize, lambda v, x: 0.5 * ((v - x) ** 2).sum(1), [x], torch.zeros(3, dtype=F64),
                       solver=il.Anderson(**TIGHT, max_iter=100), backward=backward, constraint=il.sets.L2Ball(1.5), step_size=0.5)
        jac = torch.autograd.functional.jacobian(lambda x_: layer(x_[None])[0], x[0])
        torch.testing.assert_close(jac, want, rtol=0, atol=1e-10)


def test_scipy_root_reference_solver_agrees():
    """optimistix `test_root_find.py` (the same root by several solvers): `ScipyRoot` (hybr) on
    `cos y − y` and on the Himmelblau gradient from `(2, 2.5)`, against the Dottie number and `(3, 2)`."""
    sol = il.root(lambda y: torch.cos(y) - y, torch.ones(2, 1, dtype=F64), solver=il.ScipyRoot(tol=1e-12))
    torch.testing.assert_close(sol.value, torch.full((2, 1), 0.7390851332151607, dtype=F64), rtol=0, atol=1e-10)

    def himmelblau_grad(v):
        x, y = v[:, 0], v[:, 1]
        a, b = x**2 + y - 11, x + y**2 - 7
        return torch.stack([4 * a * x + 2 * b, 2 * a + 4 * b * y], 1)

    sol = il.root(himmelblau_grad, torch.tensor([[2.0, 2.5]], dtype=F64), solver=il.ScipyRoot(tol=1e-12))
    torch.testing.assert_close(sol.value, torch.tensor([[3.0, 2.0]], dtype=F64), rtol=0, atol=1e-9)


# ============================================================================ float32, batches, steps


def test_jaxopt_cos_fixed_point_in_float32_at_the_peer_tolerance():
    """jaxopt `anderson_test.py::test_cos_fixed_point` runs in float32 (JAX's default) with tol 1e-6
    (history 4, ridge 1e-6): Anderson and Broyden reach `(0.7390851, π/2)` to float32 accuracy and say
    so, with `stop="rel"` and `"abs"`."""
    theta = torch.tensor([[0.0, math.pi / 2]])
    exact = torch.tensor([[0.7390851332151607, math.pi / 2]])
    for solver in (il.Anderson(memory=4, lam=1e-6, tol=1e-6, max_iter=100, on_failure="raise"),
                   il.Anderson(memory=4, lam=1e-6, tol=1e-6, stop="abs", max_iter=100, on_failure="raise"),
                   il.Broyden(tol=1e-6, max_iter=100, on_failure="raise")):
        sol = il.fixed_point(lambda x: torch.cos(x) + theta, torch.tensor([[0.3, math.pi / 4]]), solver=solver)
        assert sol.value.dtype == torch.float32
        torch.testing.assert_close(sol.value, exact, rtol=0, atol=3e-6)


def test_mixed_batch_a_failing_sample_does_not_change_a_converging_one():
    """jaxopt/optimistix batch their tests with `vmap` (each sample alone): a sample whose map repels
    (`x ← 3x + 1` under plain iteration) is reported, while its neighbour (`x ← ½x + 1`) gets its fixed
    point 2, the same as when solved alone."""
    a = torch.tensor([[0.5], [3.0]], dtype=F64)
    solver = il.FixedPointIteration(tol=1e-10, stop="abs", max_iter=60, on_failure="ignore")
    both = il.fixed_point(lambda x: a * x + 1, torch.zeros(2, 1, dtype=F64), solver=solver)
    alone = il.fixed_point(lambda x: a[:1] * x + 1, torch.zeros(1, 1, dtype=F64), solver=solver)
    assert both.info.converged.tolist() == [True, False]
    torch.testing.assert_close(both.value[:1], alone.value, rtol=0, atol=0)
    torch.testing.assert_close(both.value[0], torch.tensor([2.0], dtype=F64), rtol=0, atol=1e-9)


def test_optimistix_diagonal_bowls_of_very_different_scales_in_one_batch():
    """optimistix `diagonal_quadratic_bowl` with weights spanning 1 to 3e4 across the batch (the
    per-sample `"auto"` step of `Minimize`): `argmin ½Σdᵢvᵢ² − bᵀv = b/d`, unconstrained and clipped to
    `[−1, 1]`, for Anderson and plain iteration."""
    D = torch.tensor([[1.0, 2.0], [1e4, 3e4]], dtype=F64)
    b = torch.tensor([[1.0, -3.0], [2e4, -3e4]], dtype=F64)
    for solver in (il.Anderson(**TIGHT, max_iter=500), il.FixedPointIteration(**TIGHT, max_iter=3000)):
        free = _layer(il.Minimize, lambda v, D, b: 0.5 * (D * v * v).sum(1) - (b * v).sum(1), [D, b], torch.zeros(2, dtype=F64), solver=solver)
        torch.testing.assert_close(free(D, b), b / D, rtol=1e-9, atol=0)
        boxed = _layer(il.Minimize, lambda v, D, b: 0.5 * (D * v * v).sum(1) - (b * v).sum(1), [D, b], torch.zeros(2, dtype=F64),
                       solver=solver, constraint=il.sets.Box(-1.0, 1.0))
        torch.testing.assert_close(boxed(D, b), (b / D).clamp(-1, 1), rtol=0, atol=1e-9)


def test_torchdeq_spectral_radius_and_jacobian_regularizer_on_known_jacobians():
    """torchdeq's `jac_reg` (Hutchinson `‖J‖_F²`) and its spectral-radius monitor, on a linear map
    with a known Jacobian: a 0.8-scaled rotation by π/3 beside `diag(0.5, −0.3, 0.1)` has spectral
    radius 0.8 (a complex pair: the hard case for power iteration); the Hutchinson mean over 4000
    probes is within 3% of `‖J‖_F²`."""
    th = math.pi / 3
    J = torch.zeros(5, 5, dtype=F64)
    J[:2, :2] = 0.8 * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
    J[2:, 2:] = torch.diag(torch.tensor([0.5, -0.3, 0.1], dtype=F64))
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    rho = il.nn.spectral_radius(lambda z: z @ J.T, z, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, torch.full((3,), 0.8, dtype=F64), rtol=1e-3, atol=0)
    K = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    est = il.nn.jacobian_regularizer(lambda z: z @ K.T, torch.randn(2, 6, dtype=F64), probes=4000,
                                     generator=torch.Generator().manual_seed(1), reduction="none")
    torch.testing.assert_close(est, torch.full((2,), float((K**2).sum()), dtype=F64), rtol=0.03, atol=0)


def test_jiio_box_constrained_input_against_the_reduced_problem():
    """jaxopt `projected_gradient_test.py`'s box QP, composed with an equilibrium (JIIO's joint inference
    and input optimisation; cvxpylayers-style constrained layer): `x* = argmin ½‖Cz − y‖² + ½λ‖x‖²`
    over `[−½, ½]³` with `z = Az + Bx`. Eliminating `z` gives a box QP; value against scipy's
    L-BFGS-B on it, `dx*/dy` against central differences of that oracle, for Anderson and Broyden."""
    gen = torch.Generator().manual_seed(4)
    n, k, m, lam = 4, 3, 4, 0.1
    A = torch.randn(n, n, generator=gen, dtype=F64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    B, C = torch.randn(n, k, generator=gen, dtype=F64), torch.randn(m, n, generator=gen, dtype=F64)
    G = (C @ torch.linalg.solve(torch.eye(n, dtype=F64) - A, B)).numpy()

    def oracle(y: np.ndarray) -> np.ndarray:
        res = optimize.minimize(lambda x: 0.5 * np.sum((G @ x - y) ** 2) + 0.5 * lam * np.sum(x**2), np.zeros(k),
                                jac=lambda x: G.T @ (G @ x - y) + lam * x, bounds=[(-0.5, 0.5)] * k, method="L-BFGS-B",
                                options=dict(ftol=1e-16, gtol=1e-13, maxiter=10000))
        return res.x

    y = np.array([3.0, -2.0, 1.0, 0.5])
    exact = oracle(y)
    assert 0 < int((np.abs(exact) < 0.5 - 1e-6).sum()) < k, "the oracle must have free and active coordinates"
    fd = np.stack([(oracle(y + 1e-6 * e) - oracle(y - 1e-6 * e)) / 2e-6 for e in np.eye(m)], 1)
    for solver in (il.Anderson(**TIGHT, max_iter=3000), il.Broyden(**TIGHT, max_iter=500)):
        jiio = il.JIIO(cell=lambda z, x: z @ A.T + x @ B.T, head=lambda z: z @ C.T,
                       objective=lambda out, y, x: 0.5 * ((out - y) ** 2).sum(1) + 0.5 * lam * (x**2).sum(1),
                       input_shape=k, state_shape=n, constraint=il.sets.Box(-0.5, 0.5), solver=solver)
        yt = torch.from_numpy(y)[None].requires_grad_()
        x, _ = jiio(yt)
        torch.testing.assert_close(x[0], torch.from_numpy(exact), rtol=0, atol=1e-9)
        jac = torch.stack([torch.autograd.grad(x[0, i], yt, retain_graph=True)[0][0] for i in range(k)])
        torch.testing.assert_close(jac, torch.from_numpy(fd), rtol=0, atol=1e-7)


def test_second_order_gradients_through_fixed_points_minimize_and_a_bilevel_block():
    """optimistix/jaxopt differentiate their solves to any order (JAX transforms compose):
    `gradgradcheck` through the cos fixed point (Anderson and Broyden), a non-quadratic ridge
    `Minimize` in its regularisation, and a fixed point + `Minimize` block (total semantics), each with
    `IFT(second_order=True)`."""
    S = dict(tol=1e-12, stop="abs", on_failure="raise")
    theta = torch.tensor([[0.0, 1.0, -0.5]], dtype=F64, requires_grad=True)
    for solver in (il.Anderson(**S, max_iter=200), il.Broyden(**S, max_iter=200)):
        deq = il.DEQ(lambda z, t: torch.cos(z) + t, solver=solver,
                     backward=il.IFT(second_order=True, solver=il.linear.GMRES(tol=1e-13, max_iter=100)))
        assert torch.autograd.gradgradcheck(deq, (theta,))
    X = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.randn(1, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    ridge = _layer(il.Minimize, lambda v, lam: 0.5 * ((torch.einsum("bnk,bk->bn", X, v) - y) ** 2).sum(1) + 0.5 * lam[:, 0] * (v**2).sum(1)
                   + 0.1 * (v**4).sum(1), [torch.zeros(1, 1, dtype=F64)], torch.zeros(3, dtype=F64),
                   solver=il.Broyden(**S, max_iter=200), backward=il.IFT(second_order=True))
    assert torch.autograd.gradgradcheck(ridge, (torch.full((1, 1), 0.5, dtype=F64, requires_grad=True),))
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(3, 3, generator=gen, dtype=F64)
    A = 0.4 * A / torch.linalg.matrix_norm(A, 2)
    T, z, u = il.Input("t"), il.Variable("z"), il.Variable("u")
    problem = il.Problem([il.FixedPoint(z, lambda z, u: torch.tanh(z @ A.T + u), (z, u)),
                          il.Minimize(u, lambda u, z, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * (u**2).sum(1), (u, z, T))])
    block = il.ImplicitLayer(problem, [T], [u], solver=il.Broyden(**S, max_iter=300), backward=il.IFT(second_order=True),
                             init={"z": torch.zeros(3, dtype=F64), "u": torch.zeros(3, dtype=F64)})
    assert torch.autograd.gradgradcheck(block, (torch.tensor([[0.3, -0.2, 0.5]], dtype=F64, requires_grad=True),))


def test_torchdeq_convolutional_cell_gradients_against_unrolling():
    """torchdeq's DEQ tests on image-shaped states (`(B, C, H, W)`): `z = tanh(conv(z) + x)` with a
    small contractive convolution; `gradcheck` in `x`, and the gradients in the convolution's
    parameters by the IFT against backpropagation through 500 plain iterations (`Unroll`). Also a
    state shaped unlike the input (`z_init` a tensor, then a callable)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.mul_(0.3)
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)
    unrolled = il.DEQ(lambda z, x: torch.tanh(conv(z) + x), solver=il.FixedPointIteration(tol=1e-13, stop="abs", max_iter=500),
                      backward=il.Unroll())
    want = torch.autograd.grad(unrolled(x).pow(2).sum(), list(conv.parameters()))
    for solver in (il.Anderson(**TIGHT, max_iter=200), il.Broyden(**TIGHT, max_iter=200)):
        deq = il.DEQ(lambda z, x: torch.tanh(conv(z) + x), solver=solver)
        assert torch.autograd.gradcheck(deq, (x,))
        got = torch.autograd.grad(deq(x).pow(2).sum(), list(conv.parameters()))
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-9, atol=1e-10)
    gen = torch.Generator().manual_seed(0)
    W, U = 0.2 * torch.randn(3, 3, generator=gen, dtype=F64), torch.randn(3, 5, generator=gen, dtype=F64)
    xx = torch.randn(2, 5, generator=gen, dtype=F64, requires_grad=True)
    for start in (torch.zeros(3, dtype=F64), lambda x: torch.zeros(x.shape[0], 3, dtype=F64)):
        deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x @ U.T), solver=il.Anderson(**TIGHT, max_iter=200), z_init=start)
        assert torch.autograd.gradcheck(deq, (xx,))


def test_jaxopt_per_sample_gradients_by_vmap_of_grad_and_forward_mode():
    """jaxopt/optimistix batch a differentiated solve with `jax.vmap(jax.grad(...))` and check
    `jax.jvp`: `torch.func.vmap(torch.func.grad(...))` and `torch.func.jvp` over the cos fixed point,
    against `1/(1 + sin z*)`."""
    deq = il.DEQ(lambda z, t: torch.cos(z) + t, solver=il.Anderson(**TIGHT, max_iter=200))
    thetas = torch.tensor([[0.0, 1.0, -0.5], [0.3, 0.2, 0.1]], dtype=F64)
    want = 1 / (1 + torch.sin(deq(thetas)))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: deq(t[None]).sum()))(thetas)
    torch.testing.assert_close(per_sample, want, rtol=1e-10, atol=0)
    _, tangent = torch.func.jvp(deq, (thetas,), (torch.ones_like(thetas),))
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=0)


def test_two_players_through_a_shared_equilibrium_total_semantics():
    """A game through an equilibrium (two `Minimize` variables reading one `FixedPoint`, each total
    through it: jaxopt's `custom_root` on the stacked optimality conditions): `z = Az + B_u u + B_w w + c`,
    player u minimises `½‖z − t₁‖² + ½‖u‖²`, player w `½‖z − t₂‖² + ½‖w‖²`. Eliminating `z = M_u u +
    M_w w + d` gives a linear system for `(u, w)`: values and the gradient in `t₁`, Broyden and Anderson."""
    gen = torch.Generator().manual_seed(2)
    n, k = 4, 2
    A = torch.randn(n, n, generator=gen, dtype=F64)
    A = 0.4 * A / torch.linalg.matrix_norm(A, 2)
    Bu, Bw = torch.randn(n, k, generator=gen, dtype=F64), torch.randn(n, k, generator=gen, dtype=F64)
    c = torch.randn(n, generator=gen, dtype=F64)
    t1 = torch.randn(1, n, generator=gen, dtype=F64, requires_grad=True)
    t2 = torch.randn(1, n, generator=gen, dtype=F64)
    inv = torch.linalg.inv(torch.eye(n, dtype=F64) - A)
    Mu, Mw, d = inv @ Bu, inv @ Bw, inv @ c
    eye = torch.eye(k, dtype=F64)
    K = torch.cat([torch.cat([Mu.T @ Mu + eye, Mu.T @ Mw], 1), torch.cat([Mw.T @ Mu, Mw.T @ Mw + eye], 1)], 0)
    exact = torch.linalg.solve(K, torch.cat([Mu.T @ (t1[0] - d), Mw.T @ (t2[0] - d)]))
    T1, T2, z, u, w = il.Input("t1"), il.Input("t2"), il.Variable("z"), il.Variable("u"), il.Variable("w")
    problem = il.Problem([
        il.FixedPoint(z, lambda z, u, w: z @ A.T + u @ Bu.T + w @ Bw.T + c, (z, u, w)),
        il.Minimize(u, lambda u, z, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * (u**2).sum(1), (u, z, T1)),
        il.Minimize(w, lambda w, z, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * (w**2).sum(1), (w, z, T2)),
    ])
    (want,) = torch.autograd.grad(exact[:k].sum() + 2 * exact[k:].sum(), t1)
    for solver in (il.Broyden(**TIGHT, max_iter=500), il.Anderson(**TIGHT, max_iter=3000)):
        layer = il.ImplicitLayer(problem, [T1, T2], [u, w], solver=solver,
                                 init={"z": torch.zeros(n, dtype=F64), "u": torch.zeros(k, dtype=F64), "w": torch.zeros(k, dtype=F64)})
        U, W = layer(t1, t2)
        torch.testing.assert_close(torch.cat([U[0], W[0]]), exact.detach(), rtol=0, atol=1e-10)
        (got,) = torch.autograd.grad(U.sum() + 2 * W.sum(), t1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_jaxopt_projections_with_centres_infinite_bounds_and_a_zero_radius():
    """jaxopt `projection_test.py` (`projection_box` with infinite bounds, `projection_linf_ball` /
    `projection_l2_ball` with a centre and a degenerate radius): `argmin ½‖v − x‖²` over each set, by
    Anderson and Broyden, against the closed-form projections; the zero-radius ball is the point `c`,
    with a zero Jacobian."""
    x = torch.tensor([[0.3, -1.2, 0.9, -0.1, 2.0], [3.0, 0.1, -0.2, 0.4, -2.0]], dtype=F64)
    c = torch.tensor([0.5, -0.5, 0.0, 0.2, 1.0], dtype=F64)
    inf = float("inf")
    lo = torch.tensor([0.0, -inf, -1.0, -inf, 0.5], dtype=F64)
    hi = torch.tensor([inf, 0.0, 1.0, inf, inf], dtype=F64)
    cases = [
        (il.sets.LInfBall(0.6, center=c), c + (x - c).clamp(-0.6, 0.6)),
        (il.sets.Box(lo, hi), torch.maximum(torch.minimum(x, hi), lo)),
        (il.sets.L2Ball(0.0, center=c), c.expand_as(x)),
    ]
    for solver in (il.Anderson(**TIGHT, max_iter=300), il.Broyden(**TIGHT, max_iter=300)):
        for constraint, want in cases:
            layer = _layer(il.Minimize, lambda v, x: 0.5 * ((v - x) ** 2).sum(1), [x], torch.zeros(5, dtype=F64), solver=solver,
                           constraint=constraint, step_size=0.5)
            torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-11)
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(layer(xr).sum(), xr)
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


def test_torchdeq_failed_backward_solve_is_reported_and_zeroed():
    """torchdeq reports its backward solver's residual (`b_abs_trace`); here a backward solve that cannot
    converge (a 5-term Neumann series at spectral radius 0.99) must be reported by a
    `ConvergenceWarning` naming the IFT, and the failed samples get a zero gradient, not a wrong one."""
    W = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    W = 0.99 * W / torch.linalg.eigvals(W).abs().max()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    deq = il.DEQ(lambda z, x: z @ W.T + x, solver=il.Anderson(**TIGHT, max_iter=300),
                 backward=il.IFT(solver=il.linear.Neumann(tol=1e-10, max_iter=5)))
    with pytest.warns(il.ConvergenceWarning, match="IFT backward"):
        (g,) = torch.autograd.grad(deq(x).sum(), x)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


def test_jaxopt_lasso_by_a_nonnegative_split_against_sklearn_and_its_support_gradient():
    """jaxopt `proximal_gradient_test.py` / `implicit_diff_test.py` (lasso and its implicit
    differentiation in the regularisation): `min ½‖Xw − y‖² + λ‖w‖₁` restated smooth by the split
    `w = p − q`, `p, q ≥ 0` (a `Minimize` over `Box(0)` in 10 unknowns), on `make_regression(10, 5)`
    with normalised columns at λ = 60 (two coefficients zero). Value against sklearn's `Lasso`; `dw/dλ`
    against the support's closed form `−(X_SᵀX_S)⁻¹ sign(w_S)` (zero off the support)."""
    from sklearn.datasets import make_regression
    from sklearn.linear_model import Lasso

    X_np, y_np = make_regression(n_samples=10, n_features=5, random_state=0, noise=5.0)
    X_np = X_np / np.linalg.norm(X_np, axis=0)
    n, dim = X_np.shape
    lam = 60.0
    exact = Lasso(alpha=lam / n, fit_intercept=False, tol=1e-14, max_iter=100000).fit(X_np, y_np).coef_
    support = np.abs(exact) > 1e-10
    assert 0 < support.sum() < dim, "the oracle must be sparse for the test to mean something"
    want = np.zeros(dim)
    XS = X_np[:, support]
    want[support] = -np.linalg.solve(XS.T @ XS, np.sign(exact[support]))
    X, y = torch.from_numpy(X_np), torch.from_numpy(y_np)[None]

    def objective(w, lam):
        p, q = w[:, :dim], w[:, dim:]
        return 0.5 * (((p - q) @ X.T - y) ** 2).sum(1) + lam[:, 0] * (p + q).sum(1)

    for solver in (il.Anderson(**TIGHT, max_iter=5000), il.Broyden(**TIGHT, max_iter=1000)):
        layer = _layer(il.Minimize, objective, [torch.zeros(1, 1, dtype=F64)], torch.zeros(2 * dim, dtype=F64), solver=solver,
                       constraint=il.sets.Box(0.0))
        lam_t = torch.full((1, 1), lam, dtype=F64, requires_grad=True)
        w = layer(lam_t)
        coef = w[:, :dim] - w[:, dim:]
        torch.testing.assert_close(coef[0], torch.from_numpy(exact), rtol=0, atol=1e-9)
        jac = torch.stack([torch.autograd.grad(coef[0, i], lam_t, retain_graph=True)[0][0, 0] for i in range(dim)])
        torch.testing.assert_close(jac, torch.from_numpy(want), rtol=1e-8, atol=1e-10)


def test_jaxopt_bisection_cubic_root_and_its_derivative():
    """jaxopt `bisection_test.py` (the root of `x³ − x − 2` in [1, 2], 1.5213797068045676) as an
    `il.Root` by Broyden from the bracket's midpoint; `dx/dc` for `x³ − x − c` is `1/(3x² − 1)`."""
    layer = _layer(il.Root, lambda x, c: x**3 - x - c, [torch.zeros(1, 1, dtype=F64)], torch.full((1,), 1.5, dtype=F64),
                   solver=il.Broyden(**TIGHT, max_iter=100))
    c = torch.full((1, 1), 2.0, dtype=F64, requires_grad=True)
    x = layer(c)
    torch.testing.assert_close(x, torch.full((1, 1), 1.5213797068045676, dtype=F64), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(x.sum(), c)
    torch.testing.assert_close(g, 1 / (3 * x.detach() ** 2 - 1), rtol=1e-10, atol=0)


def test_torchdeq_phantom_gradients_match_torchdeq():
    """torchdeq's phantom gradients (`get_deq(ift=False, grad=k, tau=τ)`, the `[bench]` extra) as the
    oracle: the same tanh cell solved by both to 1e-12, and the gradients in `W`, `U` and `x` of
    `il.Phantom(k, damping=τ)` against torchdeq's for (k, τ) = (1, 1), (3, 0.5), (5, 0.8)."""
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

    for k, tau in ((1, 1.0), (3, 0.5), (5, 0.8)):
        ours = il.DEQ(cell, solver=il.Anderson(**TIGHT, max_iter=300), backward=il.Phantom(k=k, damping=tau))
        theirs = torchdeq.get_deq(f_solver="anderson", f_max_iter=300, f_tol=1e-12, f_stop_mode="abs", ift=False, grad=k, tau=tau)
        theirs.train()
        z_ours = ours(x)
        z_out, _ = theirs(lambda z: cell(z, x), torch.zeros(batch, d, dtype=F64))
        torch.testing.assert_close(z_ours, z_out[-1], rtol=0, atol=1e-10)
        got = torch.autograd.grad(((z_ours - target) ** 2).sum(), [W, U, x])
        want = torch.autograd.grad(((z_out[-1] - target) ** 2).sum(), [W, U, x])
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_, w_, rtol=1e-9, atol=1e-10)


def test_cvxpylayers_gradients_reach_constraint_parameters():
    """cvxpylayers differentiates in every parameter, those of the constraints included (jaxopt's
    `projection_box` / `projection_l2_ball` Jacobians in the bounds and centre): the projection of `x`
    onto `Box(lo, hi)`, `L2Ball(1, c)` and `LInfBall(0.4, c)` as a `Minimize`, with `x` and the set's
    tensors requiring grad; gradients in both against the closed-form projections. (With `x` constant
    the set's tensors get no gradient today: /tmp/reports/peer_1.py.)"""
    x = torch.tensor([[3.0, 2.0, -1.0], [0.6, 0.1, 0.2]], dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    lo = torch.tensor([-0.5, 0.0, -0.5], dtype=F64, requires_grad=True)
    hi = torch.tensor([0.5, 1.0, 0.1], dtype=F64, requires_grad=True)
    c = torch.tensor([0.5, 0.0, 0.0], dtype=F64, requires_grad=True)
    d = x - c
    cases = [
        (il.sets.Box(lo, hi), torch.maximum(torch.minimum(x, hi), lo), [x, lo, hi]),
        (il.sets.L2Ball(1.0, center=c), c + d * torch.clamp(1.0 / d.norm(dim=1, keepdim=True), max=1.0), [x, c]),
        (il.sets.LInfBall(0.4, center=c), c + d.clamp(-0.4, 0.4), [x, c]),
    ]
    for solver in (il.Anderson(**TIGHT, max_iter=100), il.Broyden(**TIGHT, max_iter=100)):
        for constraint, exact, wrt in cases:
            layer = _layer(il.Minimize, lambda v, x: 0.5 * ((v - x) ** 2).sum(1), [x], torch.zeros(3, dtype=F64), solver=solver,
                           constraint=constraint, step_size=0.5)
            v = layer(x)
            torch.testing.assert_close(v, exact.detach(), rtol=0, atol=1e-10)
            got = torch.autograd.grad((v * w).sum(), wrt)
            want = torch.autograd.grad((exact * w).sum(), wrt, retain_graph=True)
            for g_, w_ in zip(got, want):
                torch.testing.assert_close(g_, w_, rtol=0, atol=1e-10)


def test_optimistix_fixed_point_zoo_as_roots_by_broyden():
    """optimistix `tests/test_root_find.py` solves its fixed-point zoo (`helpers.py`) as roots of
    `fn(y) − y` with atol 1e-8 and 256 steps: `_cos`, `_exponential`, the linear midpoint steps in y-, f-
    and k-space (28 unknowns, `M` normal) and the Robertson midpoint steps, by Broyden in both sign
    conventions (`f(y) − y` and `y − f(y)`), plus the nonlinear heat step as `y − f(y)` (as `f(y) − y`
    it needs over 256 steps: /tmp/reports/peer_5.py). Each answer satisfies `f(y) = y`."""
    M = torch.randn(28, 28, generator=torch.Generator().manual_seed(19), dtype=F64)
    dt = 1 / 16
    k = torch.tensor([[0.04, 3e7, 1e4]], dtype=F64)
    half = torch.full((1, 28), 0.5, dtype=F64)
    zoo = {
        "cos": (torch.cos, half),
        "exponential": (lambda y: torch.exp(-y), half),
        "midpoint_y": (lambda y: dt * (0.5 * y) @ M.T, half),
        "midpoint_f": (lambda y: (dt * y) @ M.T, half),
        "midpoint_k": (lambda y: dt * (y @ M.T), half),
        "robertson_y": (lambda y: 1e-8 * _robertson(0.5 * y, k), torch.ones(1, 3, dtype=F64)),
        "robertson_f": (lambda y: _robertson(1e-8 * y, k), torch.ones(1, 3, dtype=F64)),
        "robertson_k": (lambda y: 1e-8 * _robertson(y, k), torch.ones(1, 3, dtype=F64)),
    }
    solver = il.Broyden(tol=1e-8, stop="abs", max_iter=256, on_failure="raise")
    for name, (f, start) in zoo.items():
        for sign in (1.0, -1.0):
            sol = il.root(lambda y: sign * (f(y) - y), start, solver=solver)
            assert float((f(sol.value) - sol.value).abs().max()) < 1e-7, name
    x = torch.linspace(-1, 1, 100, dtype=F64)
    y0 = x**2
    f0 = (1 - y0) * y0
    sol = il.root(lambda y: y - (y0 + 0.5 * ((1 - y) * y + f0)), torch.ones(1, 100, dtype=F64), solver=solver)
    exact = -0.5 + torch.sqrt(0.25 + 2 * (y0 + 0.5 * f0))
    torch.testing.assert_close(sol.value[0], exact, rtol=0, atol=1e-7)
