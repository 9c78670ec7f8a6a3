"""The solvers' contracts as a researcher relies on them, checked against closed forms.

- `SolveInfo`: `converged` means the *returned* value's stopping measure (recomputed here from the
  value, `"rel"` and `"abs"`, float32 and float64) is within `tol`; the reported residual is that measure;
  `nstep`, `nfe`, `trace`, `causes`; the failure policies (`"raise"`, `"warn"` once per solve, `"ignore"`).
- user-written solvers through the public `Solver` / `LinearSolver` protocols, in `il.fixed_point`,
  `il.root`, `il.ImplicitLayer` and `il.IFT(solver=...)`.
- `il.linear`: CG on non-symmetric and indefinite operators, GMRES restarts, Neumann on a divergent
  series, Dense on singular and NaN samples, warm starts and preconditioners.
- solver configs: immutable, comparable, hashable, picklable; unknown options are `TypeError`, values
  at and over their edges `ValueError`.
- closed-form oracles: `z = A z + b` per sample, `z³ = 2`, `cos z = z`.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers import linear as L
from implicitlayers.solvers import LinearSolver, Solver

torch.set_num_threads(1)
F32, F64 = torch.float32, torch.float64
NONLINEAR = [il.Anderson, il.Broyden, il.FixedPointIteration, il.ScipyRoot]
LINEAR = [L.CG, L.GMRES, L.Neumann, L.Dense]


def _measure(r: torch.Tensor, z: torch.Tensor, stop: str) -> torch.Tensor:
    """The documented stopping measure: ‖R‖ ("abs") or ‖R‖ / (‖z‖ + 1e-8) ("rel"), in float64."""
    r, z = r.double(), z.double()
    norm = torch.linalg.vector_norm(r, dim=1)
    return norm / (torch.linalg.vector_norm(z, dim=1) + 1e-8) if stop == "rel" else norm


def _linear_batch(dtype: torch.dtype):
    """Six samples of `z = A z + b`: contractions of norm 0.3 .. 0.99, one of norm 1.5 (spectral radius
    may still be < 1), right-hand sides from 1e-6 to 1e4. Closed form `(I − A)⁻¹ b` per sample."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, 5, generator=g, dtype=F64)
    norms = torch.tensor([0.5, 0.9, 0.99, 0.5, 1.5, 0.3], dtype=F64)
    a = a / torch.linalg.matrix_norm(a, ord=2)[:, None, None] * norms[:, None, None]
    b = torch.randn(6, 5, generator=g, dtype=F64) * torch.tensor([1, 1, 1, 1e4, 1, 1e-6], dtype=F64)[:, None]
    z_star = torch.linalg.solve(torch.eye(5, dtype=F64) - a, b)
    a, b = a.to(dtype), b.to(dtype)
    return (lambda z: (a @ z[..., None])[..., 0] + b), a.double(), z_star


# ============================================================================ SolveInfo


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("stop", ["rel", "abs"])
@pytest.mark.parametrize("cls", NONLINEAR)
def test_converged_means_the_returned_values_measure_is_within_tol(cls, stop, dtype):
    f, a, z_star = _linear_batch(dtype)
    tol = 1e-4 if dtype == F32 else 1e-9
    sol = il.fixed_point(f, torch.zeros(6, 5, dtype=dtype), solver=cls(tol=tol, stop=stop, max_iter=30, on_failure="ignore"))
    z, info = sol.value, sol.info
    assert z.dtype == dtype and z.shape == (6, 5)
    measure = _measure(z - f(z), z, stop)
    assert bool((measure[info.converged] <= tol).all()), (measure, info.converged)
    # The reported residual is the measure of the returned value (to rounding of its dtype).
    assert torch.allclose(info.residual.double(), measure, rtol=1e-2, atol=tol * 1e-2), (info.residual, measure)
    assert info.converged.dtype == torch.bool and info.converged.shape == (6,)
    assert info.causes == ["converged" if c else info.causes[i] for i, c in enumerate(info.converged.tolist())]
    assert all(c != "converged" for c, ok in zip(info.causes, info.converged.tolist()) if not ok)
    # A converged sample is near the closed form: ‖z − z*‖ ≤ ‖(I − A)⁻¹‖ ‖R(z)‖ (+ rounding).
    inv = torch.linalg.matrix_norm(torch.linalg.inv(torch.eye(5, dtype=F64) - a), ord=2)
    bound = inv * torch.linalg.vector_norm((z - f(z)).double(), dim=1) + 1e-5 * z_star.norm(dim=1) * (dtype == F32)
    err = (z.double() - z_star).norm(dim=1)
    assert bool((err[info.converged] <= 1.01 * bound[info.converged] + 1e-12).all()), (err, bound)
    assert info.nstep.dtype == torch.long
    if cls is not il.ScipyRoot:  # (ScipyRoot reports scipy's evaluation count, up to 100 * max_iter)
        assert bool((info.nstep <= 30).all())


@pytest.mark.parametrize("cls", [il.Anderson, il.Broyden, il.FixedPointIteration])
def test_a_batch_mixing_easy_hard_and_unsolvable_samples_reports_each(cls):
    # sample 0 easy (0.5 z + 1), 1 slow (0.999 z + 1), 2 has no fixed point (z + 1), 3 cos.
    def f(z):
        return torch.cat([0.5 * z[:1] + 1, 0.999 * z[1:2] + 1, z[2:3] + 1, torch.cos(z[3:])])

    tol = 1e-10
    sol = il.fixed_point(f, torch.zeros(4, 3, dtype=F64), solver=cls(tol=tol, max_iter=80, on_failure="ignore"))
    z, info = sol.value, sol.info
    assert not bool(info.converged[2]) and info.causes[2] != "converged"
    assert bool(info.converged[0]) and torch.allclose(z[0], torch.full((3,), 2.0, dtype=F64), atol=1e-8)
    assert bool(info.converged[3]) and torch.allclose(z[3], torch.full((3,), 0.7390851332151607, dtype=F64), atol=1e-8)
    measure = _measure(z - f(z), z, "rel")
    assert bool((measure[info.converged] <= tol).all())
    if cls is il.FixedPointIteration:  # 0.999-contraction: 80 Picard steps cannot reach 1e-10
        assert not bool(info.converged[1]) and info.causes[1] == "max_iter"


@pytest.mark.parametrize("cls", [il.Anderson, il.Broyden, il.FixedPointIteration])
def test_trace_nstep_and_nfe_agree(cls):
    f, _, _ = _linear_batch(F64)
    sol = il.fixed_point(f, torch.zeros(6, 5, dtype=F64), solver=cls(tol=1e-9, max_iter=30, trace=True, on_failure="ignore"))
    info = sol.info
    assert info.trace is not None and len(info.trace) == int(info.nstep.max()) + 1
    assert all(t.shape == (6,) for t in info.trace)
    assert info.nfe >= int(info.nstep.max()) + 1
    # The trace is that of the iterates: the first entry is the start's measure (‖b‖ / 1e-8 from zero).
    assert torch.allclose(info.trace[0].double(), _measure(-f(torch.zeros(6, 5, dtype=F64)), torch.zeros(6, 5, dtype=F64), "rel"),
                          rtol=1e-6)
    untraced = il.fixed_point(f, torch.zeros(6, 5, dtype=F64), solver=cls(tol=1e-9, max_iter=30, on_failure="ignore"))
    assert untraced.info.trace is None
    assert torch.equal(untraced.value, sol.value)


@pytest.mark.parametrize("cls", [il.Anderson, il.Broyden, il.FixedPointIteration, il.ScipyRoot])
def test_raise_warn_once_and_ignore(cls):
    def f(z):  # sample 1 has no fixed point
        return torch.cat([0.5 * z[:1] + 1, z[1:] + 1])

    z0 = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(il.ConvergenceError, match=r"1/2 samples did not converge.*sample 1"):
        il.fixed_point(f, z0, solver=cls(tol=1e-10, max_iter=60, on_failure="raise"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = il.fixed_point(f, z0, solver=cls(tol=1e-10, max_iter=60))
    assert [w.category for w in caught] == [il.ConvergenceWarning], [str(w.message) for w in caught]
    assert "1/2" in str(caught[0].message) and "tol=1e-10" in str(caught[0].message)
    assert sol.info.converged.tolist() == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = il.fixed_point(f, z0, solver=cls(tol=1e-10, max_iter=60, on_failure="ignore"))
    assert torch.equal(quiet.value, sol.value)


# ============================================================================ closed-form scalar oracles


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cls", [il.Anderson, il.Broyden, il.ScipyRoot])
def test_cube_root_of_two(cls, dtype):
    tol = 1e-5 if dtype == F32 else 1e-10
    sol = il.root(lambda z: z**3 - 2, torch.ones(3, 1, dtype=dtype), solver=cls(tol=tol, max_iter=200))
    assert sol.info.all_converged
    assert torch.allclose(sol.value.double(), torch.full((3, 1), 2 ** (1 / 3), dtype=F64), atol=20 * tol)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cls", NONLINEAR)
def test_cos_fixed_point(cls, dtype):
    tol = 1e-5 if dtype == F32 else 1e-10
    sol = il.fixed_point(torch.cos, torch.zeros(3, 1, dtype=dtype), solver=cls(tol=tol, max_iter=200))
    assert sol.info.all_converged
    assert torch.allclose(sol.value.double(), torch.full((3, 1), 0.7390851332151607, dtype=F64), atol=20 * tol)


def test_picard_on_the_cube_root_is_reported_not_returned():
    # z ← z − (z³ − 2) from 1 expands: never a silent wrong answer.
    sol = il.root(lambda z: z**3 - 2, torch.ones(2, 1, dtype=F64), solver=il.FixedPointIteration(tol=1e-10, on_failure="ignore"))
    assert not bool(sol.info.converged.any()) and set(sol.info.causes) <= {"diverged", "nonfinite", "stalled"}


# ============================================================================ the public protocols


class _Picard:
    """A minimal user solver: plain Picard steps on R, following only the `Solver` protocol."""

    def __init__(self, steps: int = 200) -> None:
        self.steps = steps

    def solve(self, residual_fn, w0, *, precond=None, name="solve", hints=None, scale_rows=None):
        w = w0.clone()
        for _ in range(self.steps):
            w = w - residual_fn(w)
        r = residual_fn(w)
        res = torch.linalg.vector_norm(r, dim=1) / (torch.linalg.vector_norm(w, dim=1) + 1e-8)
        batch = w.shape[0]
        return w, il.SolveInfo(nstep=torch.full((batch,), self.steps), residual=res, converged=res <= 1e-10,
                               nfe=self.steps + 1)


class _DenseLinear:
    """A minimal user linear solver: materialise A by D products, then `torch.linalg.solve`."""

    def __init__(self) -> None:
        self.calls = 0

    def solve_linear(self, matvec, b, x0=None, *, precond=None, name="linear solve", hints=None):
        self.calls += 1
        batch, dim = b.shape
        eye = torch.eye(dim, dtype=b.dtype)
        a = torch.stack([matvec(eye[i].expand(batch, dim).contiguous()) for i in range(dim)], -1)
        x = torch.linalg.solve(a, b)
        res = torch.linalg.vector_norm(matvec(x) - b, dim=1) / torch.linalg.vector_norm(b, dim=1)
        return x, il.SolveInfo(nstep=torch.ones(batch, dtype=torch.long), residual=res, converged=res <= 1e-10, nfe=dim + 1)


def test_user_solvers_satisfy_the_protocols():
    assert isinstance(_Picard(), Solver) and not isinstance(_Picard(), LinearSolver)
    assert isinstance(_DenseLinear(), LinearSolver) and not isinstance(_DenseLinear(), Solver)


def test_a_user_solver_in_fixed_point_and_root():
    a = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=F64)
    b = torch.tensor([1.0, 2.0], dtype=F64)
    z_star = torch.linalg.solve(torch.eye(2, dtype=F64) - a, b)
    sol = il.fixed_point(lambda z: z @ a.T + b, torch.zeros(3, 2, dtype=F64), solver=_Picard())
    assert sol.info.all_converged and torch.allclose(sol.value, z_star.expand(3, 2), atol=1e-12)
    # root: g(z) = z − (A z + b), same answer.
    sol = il.root(lambda z: z - (z @ a.T + b), torch.zeros(3, 2, dtype=F64), solver=_Picard())
    assert torch.allclose(sol.value, z_star.expand(3, 2), atol=1e-12)


def test_a_user_solver_in_a_layer_and_a_user_linear_solver_in_ift():
    x_, z_ = il.Input("x"), il.Variable("z")

    def layer_with(solver, backward):
        theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
        layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z_, lambda z, x: theta * z + x, (z_, x_))]), x_, z_,
                                 solver=solver, backward=backward, init={"z": torch.zeros(2, dtype=F64)})
        return layer, theta

    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64)
    linear = _DenseLinear()
    for solver, backward in [(_Picard(), il.IFT()), (il.Anderson(tol=1e-12, stop="abs", max_iter=100), il.IFT(solver=linear)),
                             (_Picard(), il.IFT(solver=linear))]:
        layer, theta = layer_with(solver, backward)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = layer(x)
            (g,) = torch.autograd.grad(out.sum(), theta)
        # z = x / (1 − θ) = 2x; dz/dθ = x / (1 − θ)² = 4x.
        assert torch.allclose(out.detach(), 2 * x, atol=1e-10)
        assert torch.allclose(g, 4 * x.sum(), atol=1e-8)
    assert linear.calls == 2


# ============================================================================ il.linear


def _systems():
    g = torch.Generator().manual_seed(0)
    d = 6
    m = torch.randn(d, d, generator=g, dtype=F64)
    spd = m @ m.T + d * torch.eye(d, dtype=F64)
    nonsym = spd + 3 * torch.triu(torch.randn(d, d, generator=g, dtype=F64), 1)
    q, _ = torch.linalg.qr(m)
    indef = q @ torch.diag(torch.tensor([1.0, 2, 3, -1, -2, 4], dtype=F64)) @ q.T
    singular = spd.clone()
    singular[:, -1] = singular[:, 0]
    nan = spd.clone()
    nan[0, 0] = float("nan")
    a = torch.stack([spd, nonsym, indef, singular, nan])
    b = torch.randn(5, d, generator=g, dtype=F64)
    return a, b


def _true_measure(a, x, b, stop):
    r = torch.linalg.vector_norm((a @ x[..., None])[..., 0] - b, dim=1)
    return r / torch.linalg.vector_norm(b, dim=1) if stop == "rel" else r


@pytest.mark.parametrize("stop", ["rel", "abs"])
@pytest.mark.parametrize("solver", [L.CG(max_iter=60), L.GMRES(max_iter=60, restart=3), L.GMRES(max_iter=60, restart=1),
                                    L.Neumann(max_iter=60), L.Dense(), il.Anderson(max_iter=60), il.Broyden(max_iter=60)],
                         ids=["cg", "gmres3", "gmres1", "neumann", "dense", "anderson", "broyden"])
def test_a_linear_solve_never_claims_what_its_value_does_not_satisfy(solver, stop):
    a, b = _systems()  # spd, non-symmetric, indefinite, singular (inconsistent), NaN
    solver = solver.replace(tol=1e-8, stop=stop, on_failure="ignore")
    x, info = solver.solve_linear(lambda v: (a @ v[..., None])[..., 0], b)
    measure = _true_measure(a, x, b, stop)
    assert bool((measure[info.converged] <= 1e-8).all()), (info.causes, measure)
    assert not bool(info.converged[3]) and not bool(info.converged[4])  # singular inconsistent, NaN
    if isinstance(solver, L.CG):
        assert bool(info.converged[0]) and not bool(info.converged[1:].any())
    if isinstance(solver, (L.GMRES, L.Dense)):
        assert bool(info.converged[:2].all())
    if isinstance(solver, L.Neumann):  # ‖I − A‖ > 1 for all of these: the series diverges
        assert not bool(info.converged.any()) and info.causes[:4] == ["diverged"] * 4
    if isinstance(solver, L.Dense):
        assert info.causes[4] == "nonfinite"


def test_gmres_restart_cycles_reach_the_same_solution():
    a, b = _systems()
    a, b = a[:2], b[:2]
    xs = torch.linalg.solve(a, b)
    for restart in (1, 2, 3, 6, 20):
        x, info = L.GMRES(tol=1e-10, max_iter=200, restart=restart).solve_linear(lambda v: (a @ v[..., None])[..., 0], b)
        assert info.all_converged and torch.allclose(x, xs, atol=1e-8), restart


def test_warm_starts_and_preconditioners():
    a, b = _systems()
    spd, b = a[0].expand(3, 6, 6), b[:3]
    mv = lambda v: (spd @ v[..., None])[..., 0]  # noqa: E731
    xs = torch.linalg.solve(spd, b)
    for solver in (L.CG(tol=1e-10), L.GMRES(tol=1e-10)):
        x, info = solver.solve_linear(mv, b, xs.clone())
        assert info.all_converged and bool((info.nstep == 0).all()) and info.nfe <= 2
        assert torch.allclose(x, xs, atol=1e-12)
        x, info = solver.solve_linear(mv, b, precond=1 / torch.diagonal(spd[0]))
        assert info.all_converged and torch.allclose(x, xs, atol=1e-8)
        assert bool((_true_measure(spd, x, b, "rel") <= 1e-10).all())
    with pytest.raises(ValueError, match="precond must be positive"):
        L.CG().solve_linear(mv, b, precond=-torch.ones(6, dtype=F64))
    with pytest.raises(ValueError, match="x0 has shape"):
        L.GMRES().solve_linear(mv, b, torch.zeros(2, 6, dtype=F64))
    # A NaN preconditioner or start is reported, never a converged NaN.
    for solver, kw in ((L.GMRES(on_failure="ignore"), {"precond": torch.full((6,), float("nan"), dtype=F64)}),
                       (L.GMRES(on_failure="ignore"), {"x0": torch.full((3, 6), float("nan"), dtype=F64)}),
                       (L.CG(on_failure="ignore"), {"x0": torch.full((3, 6), float("nan"), dtype=F64)}),
                       (L.Neumann(on_failure="ignore"), {"precond": torch.full((6,), float("nan"), dtype=F64)})):
        x, info = solver.solve_linear(mv, b, **kw)
        assert not bool(info.converged.any()) and set(info.causes) == {"nonfinite"}


def test_neumann_on_a_contraction_and_on_a_divergent_series():
    g = torch.Generator().manual_seed(3)
    j = 0.5 * torch.randn(3, 6, 6, generator=g, dtype=F64) / 6**0.5
    a = torch.eye(6, dtype=F64) - j
    b = torch.randn(3, 6, generator=g, dtype=F64)
    x, info = L.Neumann(tol=1e-10, max_iter=300).solve_linear(lambda v: (a @ v[..., None])[..., 0], b)
    assert info.all_converged and torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    with pytest.raises(il.ConvergenceError, match="diverged"):
        L.Neumann(tol=1e-10, max_iter=300, on_failure="raise").solve_linear(lambda v: -2 * v, b)


@pytest.mark.parametrize("cls", LINEAR)
def test_float32_linear_solves_report_a_tolerance_below_their_dtype(cls):
    g = torch.Generator().manual_seed(3)
    j = 0.5 * torch.randn(3, 6, 6, generator=g, dtype=F64) / 6**0.5
    a = torch.eye(6, dtype=F64) - j
    if cls is L.CG:
        a = (a + a.transpose(1, 2)) / 2
    a, b = a.float(), torch.randn(3, 6, generator=g).float()
    mv = lambda v: (a @ v[..., None])[..., 0]  # noqa: E731
    x, info = cls(tol=1e-5, max_iter=200).solve_linear(mv, b)
    assert info.all_converged and x.dtype == F32
    x, info = cls(tol=1e-12, max_iter=200, on_failure="ignore").solve_linear(mv, b)
    assert not bool(info.converged.any())


# ============================================================================ configs


@pytest.mark.parametrize("cls", NONLINEAR + LINEAR)
def test_configs_are_frozen_comparable_hashable_picklable(cls):
    a, b = cls(tol=1e-3), cls(tol=1e-3)
    assert a == b and hash(a) == hash(b) and a != cls(tol=1e-2)
    assert pickle.loads(pickle.dumps(a)) == a and copy.deepcopy(a) == a
    assert repr(a).startswith(f"{cls.__name__}(tol=0.001")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tol = 1.0
    with pytest.raises(TypeError, match="tolerance"):
        cls(tolerance=1e-3)
    with pytest.raises(TypeError, match="bogus"):
        a.replace(bogus=1)
    with pytest.raises(ValueError, match="tol must be"):
        a.replace(tol=-1)
    assert a.replace(max_iter=7).max_iter == 7 and a.max_iter != 7 or cls is L.Dense


@pytest.mark.parametrize("cls", NONLINEAR + LINEAR)
@pytest.mark.parametrize("option, value", [
    ("tol", 0), ("tol", -1e-300), ("tol", float("nan")), ("tol", float("inf")), ("tol", True), ("tol", "1e-3"),
    ("max_iter", 0), ("max_iter", -1), ("max_iter", 1.5), ("max_iter", True), ("max_iter", 2.0),
    ("stop", "REL"), ("stop", None), ("on_failure", "Warn"), ("on_failure", None),
    ("check_every", 0), ("check_every", True), ("trace", 1), ("trace", None),
])
def test_every_shared_option_over_its_edge_is_a_value_error(cls, option, value):
    with pytest.raises(ValueError, match=f"{option} must"):
        cls(**{option: value})


@pytest.mark.parametrize("cls", NONLINEAR + LINEAR)
def test_every_shared_option_at_its_edge_is_accepted(cls):
    config = cls(tol=5e-324, max_iter=1, check_every=1, trace=True, stop="abs", on_failure="ignore")
    assert config.tol == 5e-324 and config.max_iter == 1


@pytest.mark.parametrize("make, match", [
    (lambda: il.Anderson(memory=0), "memory must"), (lambda: il.Anderson(lam=-1e-12), "lam must"),
    (lambda: il.Anderson(lam=float("inf")), "lam must"), (lambda: il.Anderson(damping=0), "damping must"),
    (lambda: il.Anderson(damping=1 + 1e-12), "damping must"), (lambda: il.Anderson(damping=float("nan")), "damping must"),
    (lambda: il.Broyden(memory=0), "memory must"), (lambda: il.Broyden(line_search=1), "line_search must"),
    (lambda: il.FixedPointIteration(damping=0), "damping must"), (lambda: il.FixedPointIteration(damping=2), "damping must"),
    (lambda: L.GMRES(restart=0), "restart must"), (lambda: L.GMRES(restart=2.0), "restart must"),
])
def test_solver_specific_options_over_their_edges(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_solver_specific_options_at_their_edges_solve():
    f = lambda z: 0.5 * z + 1  # noqa: E731
    for solver in (il.Anderson(memory=1, lam=0, damping=1), il.Anderson(memory=1, damping=1e-2, max_iter=5000, tol=1e-6),
                   il.Broyden(memory=1), il.FixedPointIteration(damping=1)):
        sol = il.fixed_point(f, torch.zeros(2, 3, dtype=F64), solver=solver)
        assert sol.info.all_converged and torch.allclose(sol.value, torch.full((2, 3), 2.0, dtype=F64), atol=1e-3)


def test_the_anderson_alias_survives_replace_and_pickle():
    assert il.Anderson(m=3) == il.Anderson(memory=3)
    assert il.Anderson().replace(m=2).memory == 2
    assert pickle.loads(pickle.dumps(il.Anderson(m=2))).memory == 2
    with pytest.raises(TypeError, match="alias"):
        il.Anderson(m=3, memory=4)


# ============================================================================ property: any contraction


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), rho=st.floats(0.05, 0.999), log_scale=st.floats(-8, 6),
       cls=st.sampled_from([il.Anderson, il.Broyden, il.FixedPointIteration]), stop=st.sampled_from(["rel", "abs"]),
       f32=st.booleans(), check_every=st.sampled_from([None, 1, 3]), max_iter=st.integers(1, 40))
def test_a_claimed_convergence_always_holds_on_random_contractions(seed, rho, log_scale, cls, stop, f32, check_every, max_iter):
    dtype = F32 if f32 else F64
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 3, 3, generator=g, dtype=F64)
    a = (a / torch.linalg.matrix_norm(a, ord=2)[:, None, None] * rho).to(dtype)
    b = (torch.randn(4, 3, generator=g, dtype=F64) * 10**log_scale).to(dtype)

    def f(z):
        return (a @ z[..., None])[..., 0] + b

    tol = 1e-4 if f32 else 1e-9
    solver = cls(tol=tol, stop=stop, max_iter=max_iter, check_every=check_every, on_failure="ignore")
    sol = il.fixed_point(f, torch.zeros(4, 3, dtype=dtype), solver=solver)
    measure = _measure(sol.value - f(sol.value), sol.value, stop)
    assert bool((measure[sol.info.converged] <= tol).all()), (measure, sol.info.converged)
    assert bool((sol.info.nstep <= max_iter).all()) and sol.info.nfe <= max_iter + 2


def test_on_a_linear_map_anderson_and_broyden_terminate_like_krylov_methods():
    # Undamped, unregularised Anderson with a full history is GMRES-equivalent on z = A z + c: at most
    # D + 1 steps (plus rounding); Broyden's method terminates in at most 2D steps (Gay, 1979).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 20, 20, generator=g, dtype=F64)
    a = 0.9 * a / torch.linalg.matrix_norm(a, ord=2)[:, None, None]
    c = torch.randn(3, 20, generator=g, dtype=F64)
    z_star = torch.linalg.solve(torch.eye(20, dtype=F64) - a, c)

    def f(z):
        return (a @ z[..., None])[..., 0] + c

    for solver, most in ((il.Anderson(memory=25, lam=0, tol=1e-10, max_iter=300), 22),
                         (il.Broyden(memory=50, tol=1e-10, max_iter=300), 40)):
        sol = il.fixed_point(f, torch.zeros(3, 20, dtype=F64), solver=solver)
        assert sol.info.all_converged and int(sol.info.nstep.max()) <= most, (type(solver).__name__, sol.info.nstep)
        assert torch.allclose(sol.value, z_star, atol=1e-8)
