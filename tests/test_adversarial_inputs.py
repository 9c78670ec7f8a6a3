"""Adversarial inputs against the public API that the library handles today, each checked against a
closed form or an exact error message.

Complements `test_adversarial.py`, `test_trust.py` and `test_solver_trust.py` (not repeated here):
edge starts (already solved, constant maps, expanded / channels-last / 1-D starts, NaN in one sample of
the start), a sample whose map is NaN on every evaluation, `max_iter=1`, float64 scales of 1e20,
persistent per-sample faults under each backward mode, sets at their degenerate edges (a point box, a
ball of radius 0), option values of the wrong type, the `il.linear` solvers on singular and NaN
samples, and the closed forms of JIIO and iMAML on linear problems.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import implicitlayers as il

F64 = torch.float64
SOLVERS = {"picard": il.FixedPointIteration, "anderson": il.Anderson, "broyden": il.Broyden}


def _tight(name: str, **kw) -> il.Anderson:
    return SOLVERS[name](**({"tol": 1e-12, "stop": "abs", "max_iter": 200} | kw))


def _minimize_layer(objective, dim, *, solver=None, constraint=None, step_size=0.1, backward=None):
    y, v = il.Input("y"), il.Variable("v")
    problem = il.Problem([il.Minimize(v, objective, (v, y), constraint, step_size=step_size)])
    return il.ImplicitLayer(problem, y, v, solver=solver or il.Anderson(tol=1e-12, stop="abs", max_iter=500),
                            backward=backward, init={"v": torch.zeros(dim, dtype=F64)})


def _info(layer: il.ImplicitLayer) -> il.SolveInfo:
    (info,) = layer.last_solution.info.values()
    return info


# ============================================================================ functional: starts and maps


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_constant_map_and_a_start_at_the_solution(name):
    const = il.fixed_point(lambda z: torch.full_like(z, 3.0), torch.zeros(2, 3, dtype=F64), solver=_tight(name))
    assert torch.equal(const.value, torch.full((2, 3), 3.0, dtype=F64))
    assert const.info.causes == ["converged", "converged"]
    solved = il.fixed_point(lambda z: 0.5 * z + 1, torch.full((2, 3), 2.0, dtype=F64), solver=_tight(name))
    assert solved.info.nstep.tolist() == [0, 0] and solved.info.all_converged
    assert torch.equal(solved.value, torch.full((2, 3), 2.0, dtype=F64))


@pytest.mark.parametrize(
    "start",
    [
        torch.zeros(1, 3, dtype=F64).expand(4, 3),
        torch.zeros(2, 3, 4, 5, dtype=F64).to(memory_format=torch.channels_last),
        torch.zeros(5, dtype=F64),  # a batch of scalars
    ],
    ids=["expanded", "channels-last", "batch-of-scalars"],
)
def test_unusual_start_layouts_reach_the_closed_form(start):
    s = il.fixed_point(lambda z: 0.5 * z + 1, start, solver=_tight("anderson"))
    assert s.value.shape == start.shape and s.info.all_converged
    torch.testing.assert_close(s.value, torch.full(start.shape, 2.0, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: il.fixed_point(lambda z: z, torch.tensor(0.0)), ValueError, r"non-empty leading batch dimension, got shape \(\)"),
        (lambda: il.fixed_point(lambda z: z, torch.zeros(3, 2, dtype=torch.long)), TypeError, "floating-point tensor, got torch.int64"),
        (lambda: il.fixed_point(lambda z: z, torch.zeros(3, 2, dtype=torch.complex64)), TypeError, "floating-point tensor, got torch.complex64"),
        (lambda: il.fixed_point(lambda z: z, np.zeros((3, 2))), TypeError, "z0 must be a torch.Tensor.*got ndarray"),
        (lambda: il.fixed_point(lambda z: z, [[0.0, 1.0]]), TypeError, "z0 must be a torch.Tensor.*got list"),
        (lambda: il.fixed_point(lambda z: z, torch.zeros(3, 2), solver="anderson"), TypeError, "solver must be an implicitlayers solver.*got str"),
        (lambda: il.root(torch.zeros(3, 2), torch.zeros(3, 2)), TypeError, "first argument must be callable, got Tensor"),
        (lambda: il.fixed_point(lambda z: z, torch.zeros(3, 2), tol=1e-3), TypeError, "unexpected keyword argument 'tol'"),
        (lambda: il.fixed_point(lambda z: None, torch.zeros(3, 2)), ValueError, r"returned NoneType for an input of shape \(3, 2\)"),
        (lambda: il.fixed_point(lambda z: z.numpy(), torch.zeros(3, 2)), ValueError, r"returned ndarray for an input of shape \(3, 2\)"),
        (lambda: il.root(lambda z: z.sum(1), torch.zeros(3, 2)), ValueError, r"returned \(3,\) for an input of shape \(3, 2\)"),
    ],
    ids=["0-dim", "integer", "complex", "numpy", "list", "solver-str", "root-not-callable", "unknown-kwarg",
         "returns-none", "returns-numpy", "returns-reduced"],
)
def test_functional_misuse_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_non_finite_start_in_one_sample_is_reported_and_the_others_exact(name, bad):
    z0 = torch.tensor([[0.0, 1.0], [bad, 1.0], [5.0, -3.0]], dtype=F64)
    with pytest.warns(il.ConvergenceWarning, match=r"1/3 samples.*non-finite \(sample 1 at step 0\)"):
        s = il.fixed_point(lambda z: 0.5 * z + 1, z0, solver=_tight(name))
    assert s.info.causes == ["converged", "nonfinite", "converged"]
    torch.testing.assert_close(s.value[[0, 2]], torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_map_that_is_nan_for_one_sample_on_every_call(name):
    def f(z):
        out = 0.5 * z + 1
        return torch.where(torch.arange(z.shape[0])[:, None] == 1, torch.nan, out)

    with pytest.warns(il.ConvergenceWarning, match=r"1/3 samples.*1 turned non-finite \(sample 1"):
        s = il.fixed_point(f, torch.zeros(3, 2, dtype=F64), solver=_tight(name))
    assert s.info.causes == ["converged", "nonfinite", "converged"]
    torch.testing.assert_close(s.value[[0, 2]], torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-10)
    assert bool(torch.isfinite(s.value[1]).all())  # the last finite iterate, not NaN


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_max_iter_one_takes_one_step_and_says_so(name):
    with pytest.warns(il.ConvergenceWarning, match=r"2/2 samples did not converge within max_iter=1"):
        s = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 2, dtype=F64), solver=_tight(name, max_iter=1))
    assert s.info.causes == ["max_iter", "max_iter"]
    assert torch.equal(s.value, torch.ones(2, 2, dtype=F64))  # one Picard step from 0


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_float64_at_scale_1e20_solves_to_relative_accuracy(name):
    s = il.fixed_point(lambda z: 0.5 * z + 1e20, torch.zeros(2, 2, dtype=F64), solver=SOLVERS[name](tol=1e-10, max_iter=200))
    assert s.info.all_converged
    torch.testing.assert_close(s.value / 2e20, torch.ones(2, 2, dtype=F64), rtol=1e-8, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_half_precision_starts_solve_in_their_dtype(name, dtype):
    s = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=dtype), solver=SOLVERS[name](tol=1e-2))
    assert s.value.dtype == dtype and s.info.all_converged
    torch.testing.assert_close(s.value.double(), torch.full((2, 3), 2.0, dtype=F64), rtol=0, atol=0.05)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_map_with_two_fixed_points_returns_one_of_them_or_reports(name):
    # z = z²: fixed points 0 (attracting) and 1 (repelling); 1.2 escapes under Picard.
    z0 = torch.tensor([[0.3], [1.2], [0.9]], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        s = il.fixed_point(lambda z: z**2, z0, solver=_tight(name))
    ok = s.info.converged
    assert bool(ok.any())
    dist = torch.minimum(s.value.abs(), (s.value - 1).abs())[:, 0]
    assert bool((dist[ok] < 1e-8).all()), (s.value, s.info.causes)


def test_a_root_of_a_cube_and_its_gradient_through_broyden():
    y_, v_ = il.Input("y"), il.Variable("v")
    layer = il.ImplicitLayer(il.Problem([il.Root(v_, lambda v, y: v**3 - y, (v_, y_))]), y_, v_,
                             solver=il.Broyden(tol=1e-12, stop="abs", max_iter=200), init={"v": torch.ones(2, dtype=F64)})
    y = torch.tensor([[8.0, 27.0], [-1.0, 2.0]], dtype=F64, requires_grad=True)
    v = layer(y)
    torch.testing.assert_close(v, torch.sign(y) * y.abs() ** (1 / 3), rtol=1e-10, atol=0)
    (g,) = torch.autograd.grad(v.sum(), y)
    torch.testing.assert_close(g, 1 / (3 * v.detach() ** 2), rtol=1e-8, atol=0)


# ============================================================================ gradients


def _linear_layer(backward, cell, dim=3):
    x, z = il.Input("x"), il.Variable("z")
    return il.ImplicitLayer(il.Problem([il.FixedPoint(z, cell, (z, x))]), x, z, backward=backward,
                            solver=il.Anderson(tol=1e-12, stop="abs", max_iter=200, on_failure="ignore"),
                            init={"z": torch.zeros(dim, dtype=F64)})


BACKWARDS = {"ift": il.IFT(), "phantom": il.Phantom(k=60, damping=1.0), "unroll": il.Unroll()}


@pytest.mark.parametrize("bname", sorted(BACKWARDS))
def test_gradcheck_and_closed_form_of_a_linear_equilibrium(bname):
    A = 0.3 * torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) / 3**0.5
    layer = _linear_layer(BACKWARDS[bname], lambda z, x: z @ A.T + x)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), atol=1e-6)
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    M = torch.linalg.inv(torch.eye(3, dtype=F64) - A)  # z = M x
    torch.testing.assert_close(g, torch.ones(2, 3, dtype=F64) @ M, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bname", ["ift", "unroll"])
def test_a_sample_whose_cell_is_always_nan_leaves_the_shared_gradient_exact(bname):
    # log of a negative input: sample 1 is NaN on every evaluation; z = log(x) / (1 − W) for the others.
    W = torch.tensor(0.5, dtype=F64, requires_grad=True)
    layer = _linear_layer(BACKWARDS[bname], lambda z, x: W * z + torch.log(x), dim=2)
    x = torch.tensor([[2.0, 3.0], [-1.0, 3.0], [1.5, 0.5]], dtype=F64, requires_grad=True)
    z = layer(x)
    assert _info(layer).causes == ["converged", "nonfinite", "converged"]
    healthy = [0, 2]
    torch.testing.assert_close(z[healthy], torch.log(x[healthy]) / 0.5, rtol=0, atol=1e-10)
    gW, gx = torch.autograd.grad(z[healthy].sum(), (W, x))
    torch.testing.assert_close(gW, (torch.log(x[healthy]) / 0.25).sum().detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(gx[healthy], (1 / (0.5 * x[healthy])).detach(), rtol=1e-9, atol=0)
    assert torch.equal(gx[1], torch.zeros(2, dtype=F64))


def test_ift_gradient_of_a_sample_stopped_at_max_iter_is_the_linear_closed_form():
    # Linear map: the Jacobian does not depend on where the forward stopped, so the IFT gradient of a
    # sample that hit max_iter is still 1 / (1 − a) exactly.
    layer = _linear_layer(il.IFT(), lambda z, x: torch.cat([0.1 * z[:1], 0.99 * z[1:]]) + x)
    layer.solver = il.Anderson(tol=1e-12, stop="abs", max_iter=3, memory=1, on_failure="ignore")
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    z = layer(x)
    assert _info(layer).causes == ["max_iter", "max_iter"]
    (g,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g, torch.tensor([[1 / 0.9] * 3, [1 / 0.01] * 3], dtype=F64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("bname", ["ift", "unroll"])
def test_gradcheck_of_a_box_constrained_nonquadratic_minimum(bname):
    layer = _minimize_layer(lambda v, y: ((v - y) ** 2).sum(1) + 0.1 * (v**4).sum(1), 2,
                            constraint=il.sets.Box(-1.0, 2.0), backward=BACKWARDS[bname])
    y = torch.tensor([[0.5, -2.0], [3.0, 0.2]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (y,), atol=1e-5)
    v = layer(y)
    assert v[0, 1].item() == -1.0  # the lower bound is active: zero derivative there
    free = v.detach()[[0, 1, 1], [0, 0, 1]]
    torch.testing.assert_close(2 * (free - y.detach()[[0, 1, 1], [0, 0, 1]]) + 0.4 * free**3, torch.zeros(3, dtype=F64), rtol=0, atol=1e-9)
    (g,) = torch.autograd.grad(v.sum(), y)
    assert abs(g[0, 1].item()) < 1e-9  # Unroll: differentiated iterates, exact up to the tolerance
    torch.testing.assert_close(g[[0, 1, 1], [0, 0, 1]], 2 / (2 + 1.2 * free**2), rtol=1e-7, atol=0)


# ============================================================================ sets at their edges


@pytest.mark.parametrize(
    "constraint, exact",
    [
        (il.sets.Box(0.5, 0.5), lambda y: torch.full_like(y, 0.5)),
        (il.sets.Box(0.0, 1.0), lambda y: y.clamp(0, 1)),
        (il.sets.L2Ball(0.0), lambda y: torch.zeros_like(y)),
        (il.sets.L2Ball(1.0), lambda y: y / y.norm(dim=1, keepdim=True)),
        (il.sets.LInfBall(1.0, center=torch.tensor([0.5, 0.5], dtype=F64)), lambda y: y.clamp(-0.5, 1.5)),
    ],
    ids=["point-box", "box", "l2-radius-0", "l2-radius-1", "linf-centred"],
)
def test_projecting_a_point_onto_degenerate_and_centred_sets(constraint, exact):
    layer = _minimize_layer(lambda v, y: ((v - y) ** 2).sum(1), 2, constraint=constraint)
    y = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=F64)
    torch.testing.assert_close(layer(y), exact(y), rtol=0, atol=1e-10)
    assert _info(layer).all_converged


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: il.sets.Box(float("nan"), 1.0), ValueError, "Box: lower contains NaN"),
        (lambda: il.sets.Box(torch.tensor([0.0, float("nan")]), 1.0), ValueError, "Box: lower contains NaN"),
        (lambda: il.sets.Box(float("inf"), float("inf")), ValueError, r"Box: lower must be finite \(it may be -inf\)"),
        (lambda: il.sets.Box("0", 1.0), TypeError, "Box: lower must be a number or a tensor, got str"),
        (lambda: il.sets.Box(torch.zeros(2), torch.ones(3)), ValueError, r"lower \(2,\) and upper \(3,\) do not broadcast"),
        (lambda: il.sets.L2Ball(float("inf")), ValueError, "L2Ball: radius must be a non-negative number, finite, got inf"),
        (lambda: il.sets.L2Ball(1.0, center=torch.tensor([float("nan")])), ValueError, "L2Ball: center contains NaN"),
        (lambda: il.sets.LInfBall(-0.5), ValueError, "LInfBall: radius must be a non-negative number"),
    ],
    ids=["box-nan", "box-tensor-nan", "box-lower-inf", "box-str", "box-shapes", "l2-inf", "l2-centre-nan", "linf-negative"],
)
def test_bad_sets_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("step", [0, -1, float("nan"), None, True], ids=["zero", "negative", "nan", "none", "bool"])
def test_bad_step_sizes_are_refused(step):
    with pytest.raises(ValueError, match=r'Minimize\(v\): step_size must be positive and finite, or "auto"'):
        _minimize_layer(lambda v, y: ((v - y) ** 2).sum(1), 2, step_size=step)


def test_extreme_step_sizes_are_reported_and_auto_solves():
    y = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=F64)
    objective = lambda v, y: ((v - y) ** 2).sum(1)  # noqa: E731
    with pytest.warns(il.ConvergenceWarning, match=r"2/2 samples did not converge within max_iter=500.*raise the step"):
        _minimize_layer(objective, 2, step_size=1e-12)(y)
    with pytest.warns(il.ConvergenceWarning, match=r"2 diverged.*lower the"):
        _minimize_layer(objective, 2, step_size=1e6)(y)
    torch.testing.assert_close(_minimize_layer(objective, 2, step_size="auto")(y), y, rtol=0, atol=1e-10)


def test_a_local_maximum_of_a_double_well_is_not_optimal():
    layer = _minimize_layer(lambda v, y: ((v**2 - 1) ** 2).sum(1), 2,
                            solver=il.Anderson(tol=1e-12, stop="abs", max_iter=100, on_failure="ignore"))
    v = layer(torch.ones(2, 2, dtype=F64))
    assert torch.equal(v, torch.zeros(2, 2, dtype=F64))
    assert _info(layer).causes == ["not_optimal", "not_optimal"]


# ============================================================================ il.linear


def _spd_system():
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(3, 4, 4, dtype=F64, generator=g)
    A = Q @ Q.transpose(1, 2) + 4 * torch.eye(4, dtype=F64)
    return A, torch.randn(3, 4, dtype=F64, generator=g)


LINEAR = {"cg": lambda: il.linear.CG(tol=1e-12, stop="abs"), "gmres": lambda: il.linear.GMRES(tol=1e-12, stop="abs"),
          "dense": lambda: il.linear.Dense(tol=1e-10)}


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_linear_solvers_on_spd_zero_and_nan_right_hand_sides(name):
    A, b = _spd_system()
    mv = lambda x: (A @ x[:, :, None])[:, :, 0]  # noqa: E731
    x, info = LINEAR[name]().solve_linear(mv, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    assert info.all_converged
    x0, info0 = LINEAR[name]().solve_linear(mv, torch.zeros_like(b))
    assert torch.equal(x0, torch.zeros_like(b)) and info0.all_converged
    bad = b.clone()
    bad[1] = float("nan")
    with pytest.warns(il.ConvergenceWarning, match=r"1/3 samples.*non-finite \(sample 1"):
        xn, infon = LINEAR[name]().solve_linear(mv, bad)
    assert infon.causes == ["converged", "nonfinite", "converged"]
    torch.testing.assert_close(xn[[0, 2]], torch.linalg.solve(A, b)[[0, 2]], rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match=r"b must be a floating-point tensor of shape \(B, D\), got shape \(4,\)"):
        LINEAR[name]().solve_linear(mv, b[0])


@pytest.mark.parametrize("name", ["cg", "dense"])
def test_a_singular_sample_is_reported_by_cg_and_dense(name):
    A, b = _spd_system()
    A[1] = 0.0
    A[1, 0, 0] = 1.0  # rank one, b[1] outside its range: no solution
    mv = lambda x: (A @ x[:, :, None])[:, :, 0]  # noqa: E731
    with pytest.warns(il.ConvergenceWarning, match="1/3 samples"):
        x, info = LINEAR[name]().solve_linear(mv, b)
    assert info.causes == ["converged", "nonfinite", "converged"]
    torch.testing.assert_close(x[[0, 2]], torch.linalg.solve(A[[0, 2]], b[[0, 2]]), rtol=0, atol=1e-10)


def test_neumann_on_a_non_contracting_system_is_reported_diverged():
    A, b = _spd_system()  # eigenvalues of I − A well outside the unit disk
    with pytest.warns(il.ConvergenceWarning, match="3 diverged"):
        _, info = il.linear.Neumann(tol=1e-12).solve_linear(lambda x: (A @ x[:, :, None])[:, :, 0], b)
    assert info.causes == ["diverged"] * 3


# ============================================================================ options


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: il.Anderson(memory=2.0), ValueError, "Anderson: memory must be an integer >= 1, got 2.0"),
        (lambda: il.Anderson(max_iter=2.5), ValueError, "max_iter must be an integer >= 1, got 2.5"),
        (lambda: il.Anderson(max_iter=None), ValueError, "max_iter must be an integer >= 1, got None"),
        (lambda: il.Anderson(max_iter=torch.tensor(5)), ValueError, r"max_iter must be an integer >= 1, got tensor\(5\)"),
        (lambda: il.Anderson(tol="1e-3"), ValueError, "tol must be a positive number.*got '1e-3'"),
        (lambda: il.Anderson(tol=None), ValueError, "tol must be a positive number.*got None"),
        (lambda: il.Anderson(tol=0.0), ValueError, "tol must be a positive number.*got 0.0"),
        (lambda: il.Broyden(tol=torch.tensor(1e-3)), ValueError, "Broyden: tol must be a positive number"),
        (lambda: il.Anderson(stop="ABS"), ValueError, r"stop must be one of \('rel', 'abs'\), got 'ABS'"),
        (lambda: il.Anderson(stop=None), ValueError, "stop must be one of.*got None"),
        (lambda: il.Anderson(m=3, memory=4), TypeError, "m is an alias of memory; got m=3 and memory=4"),
        (lambda: il.Anderson(damping=float("inf")), ValueError, r"damping must be a number in \(0, 1\], got inf"),
        (lambda: il.Anderson(damping=0), ValueError, r"damping must be a number in \(0, 1\], got 0"),
        (lambda: il.FixedPointIteration(check_every=0), ValueError, "check_every must be None or an integer >= 1"),
        (lambda: il.Broyden(trace=1), ValueError, "trace must be a bool, got 1"),
        (lambda: il.Phantom(k=0), ValueError, "Phantom: k must be an integer >= 1, got 0"),
        (lambda: il.Phantom(damping=2), ValueError, r"Phantom: damping must lie in \(0, 1\], got 2"),
        (lambda: il.IFT(solver="cg"), TypeError, "IFT: solver must be an il.linear solver or a fixed-point solver"),
        (lambda: il.IFT(first_order=1), TypeError, "IFT: first_order must be True or False"),
        (lambda: il.Unroll(5), TypeError, "takes 1 positional argument"),
        (lambda: il.DEQ(lambda z, x: z, backward="ift"), TypeError, r"backward must be il.IFT\(\), il.Phantom\(\) or il.Unroll\(\), got 'ift'"),
        (lambda: il.DEQ(lambda z, x: z, solver="anderson"), TypeError, "solver must be an implicitlayers solver.*got 'anderson'"),
        (lambda: il.DEQ(3), TypeError, "DEQ: cell must be a callable"),
        (lambda: il.linear.Dense(max_dim=0), ValueError, "Dense: max_dim must be an integer >= 1, got 0"),
        (lambda: il.IMAML(torch.nn.Linear(2, 1), lambda p, t: p.sum(), lam=0), ValueError, "IMAML: lam must be a positive finite number, got 0"),
        (lambda: il.IMAML(lambda x: x, lambda p, t: p.sum(), lam=1.0), TypeError, "IMAML: model must be an nn.Module"),
        (lambda: il.LyaDEQ(lambda z, u: z, 3, step_size=0), ValueError, "LyaDEQ: step_size must be a positive number"),
        (lambda: il.LyaDEQ(lambda z, u: z, 3, alpha=-1), ValueError, "LyaDEQ: alpha must be a positive number"),
        (lambda: il.LyaDEQ(lambda z, u: z, 3, centre="middle"), ValueError, "LyaDEQ: centre must be one of"),
        (lambda: il.LyaDEQ(lambda z, u: z, 0), ValueError, "LyaDEQ: dim must be a positive integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_option_values_of_the_wrong_type_or_range_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "kw",
    [dict(memory=1), dict(memory=1000), dict(lam=0.0), dict(lam=1e300), dict(tol=1e-300, stop="abs"), dict(check_every=1000)],
    ids=["memory-1", "memory-1000", "lam-0", "lam-huge", "tol-tiny", "check-every-large"],
)
def test_anderson_options_at_their_edges_still_solve_or_report(kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        s = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=F64), solver=il.Anderson(max_iter=200, **kw))
    err = (s.value - 2).abs().amax(1)
    tol = kw.get("tol", 1e-4)
    assert bool((~s.info.converged | (err <= 10 * max(tol, 1e-15) * 2 * 3**0.5)).all()), (s.value, s.info.causes)
    assert s.info.all_converged or kw.get("tol") == 1e-300


def test_a_vanishing_anderson_damping_is_reported_stalled():
    with pytest.warns(il.ConvergenceWarning, match="2 stalled"):
        s = il.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=F64), solver=il.Anderson(damping=1e-300))
    assert s.info.causes == ["stalled", "stalled"]


# ============================================================================ layers and models


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_deq_and_its_gradient(dtype):
    x = torch.ones(2, 3, dtype=dtype, requires_grad=True)
    z = il.DEQ(lambda z, x: 0.5 * z + x)(x)
    assert z.dtype == dtype
    torch.testing.assert_close(z.double(), torch.full((2, 3), 2.0, dtype=F64), rtol=0, atol=0.02)
    (g,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g.double(), torch.full((2, 3), 2.0, dtype=F64), rtol=0, atol=0.02)


def test_an_expanded_input_accumulates_its_gradient():
    x = torch.ones(1, 3, dtype=F64, requires_grad=True)
    z = il.DEQ(lambda z, x: 0.5 * z + x, solver=il.Anderson(tol=1e-12, stop="abs"))(x.expand(4, 3))
    (g,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(g, torch.full((1, 3), 8.0, dtype=F64))  # 4 samples × dz/dx = 2


def test_a_cell_that_ignores_its_state_gives_the_constant_and_zero_gradient():
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    z = il.DEQ(lambda z, x: torch.full_like(z, 5.0) + 0 * x)(x)
    assert torch.equal(z, torch.full((2, 3), 5.0, dtype=F64))
    (g,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(g, torch.zeros(2, 3, dtype=F64))


@pytest.mark.parametrize(
    "cell, x, error, match",
    [
        (lambda z, x: (0.5 * z + x).double(), torch.ones(2, 3), TypeError, "returned torch.float64 but z is torch.float32"),
        (lambda z, x: (0.5 * z + x,), torch.ones(2, 3), ValueError, r"returned tuple but z has shape \(2, 3\)"),
        (lambda z, x: 0.5 * z + x, torch.ones(2, 3, dtype=torch.long), TypeError, "at least one input must be a floating-point"),
        (lambda z, x: 0.5 * z + x, torch.tensor(1.0), ValueError, r"DEQ: x must have a non-empty leading batch dimension, got shape \(\)"),
    ],
    ids=["wrong-dtype", "tuple", "integer-input", "0-dim"],
)
def test_deq_misuse_is_named(cell, x, error, match):
    with pytest.raises(error, match=match):
        il.DEQ(cell)(x)


def _jiio(**kw) -> il.JIIO:
    # z = 0.5 z + x (z = 2x), L = ‖z − y‖² + 0.5 ‖x‖²: x* = 2y / 4.5, z* = 4y / 4.5.
    return il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                   objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1,
                   solver=il.Anderson(tol=1e-10, stop="abs", max_iter=500), **kw)


def test_jiio_matches_the_closed_form_free_and_in_a_box():
    y = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=F64)
    x_star, z_star = _jiio()(y)
    torch.testing.assert_close(x_star, 2 * y / 4.5, rtol=0, atol=1e-9)
    torch.testing.assert_close(z_star, 4 * y / 4.5, rtol=0, atol=1e-9)
    x_box, _ = _jiio(constraint=il.sets.Box(0.0, 0.2))(y)
    torch.testing.assert_close(x_box, (2 * y / 4.5).clamp(0, 0.2), rtol=0, atol=1e-9)


def test_jiio_misuse_is_named():
    jiio = _jiio()
    with pytest.raises(ValueError, match="input 'target' contains NaN or Inf"):
        jiio(torch.tensor([[1.0, float("nan"), 0.0]], dtype=F64))
    with pytest.raises(TypeError, match="at least one input must be a floating-point"):
        jiio(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"Minimize\(x\).*target: \(2, 5\)"):
        jiio(torch.ones(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="JIIO: input_shape must be a positive int"):
        il.JIIO(cell=lambda z, x: z, head=lambda z: z, objective=lambda o, y, x: o.sum(1), input_shape=-3, state_shape=3)


def test_imaml_on_linear_regression_matches_the_normal_equations():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False).double()
    imaml = il.IMAML(model, lambda p, t: ((p - t) ** 2).mean(), lam=1.0, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=500))
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(3, 5, 2, dtype=F64, generator=g), torch.randn(3, 5, 1, dtype=F64, generator=g)
    phi = imaml(X, Y)["weight"][:, 0, :]
    theta = model.weight.detach()[0]
    for t in range(3):  # argmin mean((X φ − y)²) + ½‖φ − θ‖²: (2XᵀX/N + I) φ = 2Xᵀy/N + θ
        exact = torch.linalg.solve(2 * X[t].T @ X[t] / 5 + torch.eye(2, dtype=F64), 2 * X[t].T @ Y[t, :, 0] / 5 + theta)
        torch.testing.assert_close(phi[t], exact, rtol=0, atol=1e-10)
    assert imaml(X[:1], Y[:1])["weight"].shape == (1, 1, 2)
    with pytest.raises(ValueError, match="support_x has 3 task.*but support_y has 2"):
        imaml(X, Y[:2])


# ============================================================================ what SolveInfo claims


@pytest.mark.parametrize("stop", ["rel", "abs"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_reported_residual_is_the_residual_of_the_returned_iterate(name, stop):
    # Maps of mixed scale (1e-3 to 1e3 per sample), linear and not, contracting or not: whatever the
    # outcome, `info.residual` is the stopping measure recomputed at `value`, and `converged` means ≤ tol.
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(6, 6, dtype=F64, generator=g)
        A = A / torch.linalg.matrix_norm(A, 2) * (0.5 + 0.6 * torch.rand(1, generator=g, dtype=F64).item())
        b = torch.randn(4, 6, dtype=F64, generator=g) * 10.0 ** torch.randint(-3, 4, (4, 1), generator=g)
        for f in (lambda z: z @ A.T + b, lambda z: torch.tanh(3 * z @ A.T + b), lambda z: 2 * torch.sin(2 * z @ A.T) + b):
            for kw in ({}, {"max_iter": 7}):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", il.ConvergenceWarning)
                    s = il.fixed_point(f, torch.zeros(4, 6, dtype=F64), solver=SOLVERS[name](tol=1e-6, stop=stop, **kw))
                r = torch.linalg.vector_norm(s.value - f(s.value), dim=1)
                measure = r / (torch.linalg.vector_norm(s.value, dim=1) + 1e-8) if stop == "rel" else r
                torch.testing.assert_close(s.info.residual, measure, rtol=1e-6, atol=1e-9)
                assert bool((~s.info.converged | (measure <= 1e-6 * (1 + 1e-9))).all())


@pytest.mark.parametrize("options", [{}, {"centre": "learned", "pull": 0.5}], ids=["fixed-point-centre", "learned-pull"])
def test_lyadeq_gradcheck_in_float64(options):
    torch.manual_seed(0)
    lyadeq = il.LyaDEQ(lambda z, u: torch.tanh(0.5 * z + u), 3, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=300), **options).double()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lyadeq, (x,), atol=1e-6)


def test_lyadeq_with_budget_refuses_a_solver():
    with pytest.raises(ValueError, match="budget=K fixes the computation.*do not pass solver= or backward="):
        il.LyaDEQ(lambda z, u: z, 3, centre="origin", budget=5, solver=il.Anderson())


def test_a_maximize_in_a_box_and_its_gradient():
    y_, v_ = il.Input("y"), il.Variable("v")
    layer = il.ImplicitLayer(il.Problem([il.Maximize(v_, lambda v, y: -((v - y) ** 2).sum(1), (v_, y_), il.sets.Box(0.0, 1.0), step_size=0.25)]),
                             y_, v_, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=300), init={"v": torch.zeros(2, dtype=F64)})
    y = torch.tensor([[2.0, -1.0], [0.5, 0.25]], dtype=F64, requires_grad=True)
    v = layer(y)
    torch.testing.assert_close(v, y.detach().clamp(0, 1), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(v.sum(), y)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64), rtol=0, atol=1e-10)


def test_first_order_ift_equals_ift_on_a_block_without_objectives():
    W = 0.15 * torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = []
    for backward in (il.IFT(), il.IFT(first_order=True)):
        deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x), solver=il.Anderson(tol=1e-12, stop="abs", max_iter=200), backward=backward)
        grads.append(torch.autograd.grad(deq(x).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
@pytest.mark.parametrize("g", [lambda z: z**2 + 1, lambda z: torch.sign(z - 0.3)], ids=["no-real-root", "step"])
def test_roots_that_do_not_exist_are_never_converged(name, g):
    with pytest.warns(il.ConvergenceWarning, match="2/2 samples did not converge"):
        s = il.root(g, torch.zeros(2, 2, dtype=F64), solver=_tight(name))
    assert not bool(s.info.converged.any())
