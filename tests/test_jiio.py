"""JIIO: the augmented KKT fixed point against closed forms, constraints, gradients, and the runnable demos."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIGHT = il.Anderson(memory=5, tol=1e-11, max_iter=400)


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread is faster than several contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearQuadratic:
    """cell(z, x) = A z + B x + c, head(z) = C z, objective ½‖Cz − y‖² + ½ρ‖x‖², in float64.

    Closed form: z = M(Bx + c) with M = (I − A)⁻¹, so out = G x + h with G = CMB, h = CMc, and
    x* = (GᵀG + ρI)⁻¹ Gᵀ (y − h).
    """

    def __init__(self, n: int = 6, k: int = 3, p: int = 5, rho: float = 0.3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        self.n, self.k, self.p, self.rho = n, k, p, rho
        self.A = 0.5 * torch.randn(n, n, generator=g, dtype=dt) / n**0.5
        self.B = torch.randn(n, k, generator=g, dtype=dt) / k**0.5
        self.c = (0.1 * torch.randn(n, generator=g, dtype=dt)).requires_grad_()
        self.C = torch.randn(p, n, generator=g, dtype=dt) / n**0.5

    def cell(self, z, x):
        return z @ self.A.T + x @ self.B.T + self.c

    def head(self, z):
        return z @ self.C.T

    def objective(self, out, y, x):
        return 0.5 * ((out - y) ** 2).sum(1) + 0.5 * self.rho * (x**2).sum(1)

    def jiio(self, **kw) -> il.JIIO:
        kw.setdefault("solver", TIGHT)
        kw.setdefault("step_size", 0.3)
        return il.JIIO(self.cell, self.head, self.objective, self.k, state_shape=self.n, **kw)

    def reduced(self, c=None):
        c = self.c if c is None else c
        M = torch.linalg.inv(torch.eye(self.n, dtype=torch.float64) - self.A)
        return self.C @ M @ self.B, self.C @ M @ c, M

    def x_star(self, y, c=None):
        G, h, _ = self.reduced(c)
        H = G.T @ G + self.rho * torch.eye(self.k, dtype=torch.float64)
        return torch.linalg.solve(H, G.T @ (y - h).T).T

    def z_of(self, x, c=None):
        _, _, M = self.reduced(c)
        c = self.c if c is None else c
        return (x @ self.B.T + c) @ M.T


def _y(batch=4, p=5, seed=1):
    return torch.randn(batch, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------ forward
def test_linear_quadratic_matches_the_closed_form_optimum():
    lq = LinearQuadratic()
    y = _y()
    x, z = lq.jiio()(y)
    x_true = lq.x_star(y)
    torch.testing.assert_close(x, x_true, atol=1e-8, rtol=0)
    torch.testing.assert_close(z, lq.z_of(x_true), atol=1e-8, rtol=0)


@pytest.mark.parametrize("constraint", [None, il.sets.L2Ball(0.2)], ids=["free", "l2"])
def test_auto_step_takes_the_reduced_curvature_and_solves_the_same_problem(constraint):
    # The total objective's curvature in x is GᵀG + ρI (G = C (I − A)⁻¹ B); "auto" estimates it through
    # the equation, and the solution (a fixed point, whatever α) is the one of a fixed step.
    lq = LinearQuadratic()
    y = 3 * _y()
    G, _, _ = lq.reduced()
    top = float(torch.linalg.eigvalsh(G.T @ G + lq.rho * torch.eye(lq.k, dtype=torch.float64))[-1].detach())
    auto = lq.jiio(step_size="auto", constraint=constraint)
    layer = auto.layer(0)
    system = layer.block_system(0, {"z": torch.zeros(4, lq.n), "x": torch.zeros(4, lq.k)})
    steps = system.step_sizes(torch.zeros(4, system.dim, dtype=torch.float64), {"target": y})
    # From below (power iteration; the equation's response still building up under dampings 0.8 / 0.6).
    ratio = steps.curvature["x"] / top
    assert bool((ratio > 0.9).all()) and bool((ratio < 1 + 1e-6).all()), ratio
    x_auto, z_auto = auto(y)
    x_fixed, z_fixed = lq.jiio(constraint=constraint)(y)
    torch.testing.assert_close(x_auto, x_fixed, atol=1e-8, rtol=0)
    torch.testing.assert_close(z_auto, z_fixed, atol=1e-8, rtol=0)


def test_dual_is_the_deq_backward_variable():
    # At the optimum μ = (I − A)⁻ᵀ Cᵀ (Cz − y): the adjoint of the DEQ for the objective's gradient in z.
    lq = LinearQuadratic()
    y = _y()
    sol = lq.jiio().solve(y)
    residual_out = lq.head(sol["z"]) - y
    mu_true = torch.linalg.solve(torch.eye(lq.n, dtype=torch.float64) - lq.A.T, (residual_out @ lq.C).T).T
    torch.testing.assert_close(sol.duals["mu[x|z]"], mu_true.detach(), atol=1e-8, rtol=0)


def test_maximize_finds_the_maximiser_of_a_concave_objective():
    lq = LinearQuadratic()
    y = _y()
    neg = il.JIIO(lq.cell, lq.head, lambda o, t, x: -lq.objective(o, t, x), lq.k, maximize=True,
                  solver=TIGHT, state_shape=lq.n, step_size=0.3)
    x, _ = neg(y)
    torch.testing.assert_close(x, lq.x_star(y).detach(), atol=1e-8, rtol=0)


def test_warm_start_x0_at_the_solution_needs_few_iterations():
    lq = LinearQuadratic()
    y = _y()
    jiio = lq.jiio()
    cold = next(iter(jiio.solve(y).info.values())).nfe
    warm_sol = jiio.solve(y, x0=lq.x_star(y).detach())
    warm = next(iter(warm_sol.info.values())).nfe
    assert warm < cold
    torch.testing.assert_close(warm_sol["x"], lq.x_star(y), atol=1e-8, rtol=0)


def test_context_tensors_reach_cell_and_head_and_targets_may_be_labels():
    # Integer class labels as the target: the layer takes its dtype from the (float) context.
    torch.manual_seed(0)
    W = 0.3 * torch.randn(8, 8, dtype=torch.float64)
    V = torch.randn(3, 8, dtype=torch.float64)
    u = torch.rand(5, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    ce = lambda logits, y, d: torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    jiio = il.JIIO(lambda z, d, u: torch.tanh(z @ W.T + u + d), lambda z, u: z @ V.T, ce, 8,
                   constraint=il.sets.L2Ball(0.5), maximize=True, state_shape=8, step_size=0.2,
                   solver=il.Anderson(tol=1e-9, max_iter=300))
    d, z = jiio(labels, u)
    assert d.dtype == torch.float64
    clean = il.fixed_point(lambda s: torch.tanh(s @ W.T + u), torch.zeros(5, 8, dtype=torch.float64)).value
    assert (jiio.inner_objective(d, z, labels, u) > ce(clean @ V.T, labels, None) - 1e-9).all()


# ------------------------------------------------------------------------------------ constraints
@pytest.mark.parametrize(
    "constraint",
    [il.sets.L2Ball(0.2), il.sets.LInfBall(0.1), il.sets.Box(-0.05, 0.15)],
    ids=["l2", "linf", "box"],
)
def test_constraint_holds_exactly_and_matches_projected_gradient_oracle(constraint):
    lq = LinearQuadratic()
    y = 3 * _y()  # far targets: the unconstrained optimum lies outside every set below
    x, z = lq.jiio(constraint=constraint)(y)
    assert bool(constraint.contains(x, atol=1e-12).all())
    assert not bool(constraint.contains(lq.x_star(y), atol=1e-3).all())
    # Oracle: projected gradient descent on the reduced problem x ↦ ½‖Gx + h − y‖² + ½ρ‖x‖².
    G, h, _ = lq.reduced()
    G, h = G.detach(), h.detach()
    step = 1.0 / float(torch.linalg.matrix_norm(G.T @ G, 2) + lq.rho)
    xo = torch.zeros_like(x)
    for _ in range(5000):
        xo = constraint.project(xo - step * ((xo @ G.T + h - y) @ G + lq.rho * xo))
    torch.testing.assert_close(x, xo, atol=1e-7, rtol=0)
    torch.testing.assert_close(z, lq.z_of(x).detach(), atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------------ gradients
def test_exact_gradient_matches_the_closed_form_gradient():
    lq = LinearQuadratic()
    y = _y().requires_grad_()
    x, z = lq.jiio()(y)
    gx, gz = torch.randn_like(x), torch.randn_like(z)
    got = torch.autograd.grad((x * gx).sum() + (z * gz).sum(), [y, lq.c])
    x_true = lq.x_star(y)
    want = torch.autograd.grad((x_true * gx).sum() + (lq.z_of(x_true) * gz).sum(), [y, lq.c])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=0)


def _outer(lq, jiio, c):
    """An outer loss that is *not* the inner objective, so x*'s dependence on c matters."""
    lq_c = lq.c
    lq.c = c
    try:
        x, z = jiio(_y())
        return (z**2).sum() + z.sum()
    finally:
        lq.c = lq_c


def test_exact_and_first_order_gradients_against_finite_differences():
    lq = LinearQuadratic()
    exact, first = lq.jiio(), lq.jiio(backward=il.IFT(first_order=True))
    c0 = lq.c.detach().clone()
    c = c0.clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(_outer(lq, exact, c), [c])
    c = c0.clone().requires_grad_()
    (g_first,) = torch.autograd.grad(_outer(lq, first, c), [c])
    # Central differences of the closed form, with x*(c) moving and with x* held at its value.
    eps = 1e-6
    x_fixed = lq.x_star(_y(), c0).detach()
    fd_total, fd_fixed = torch.zeros_like(c0), torch.zeros_like(c0)
    for i in range(c0.numel()):
        e = torch.zeros_like(c0)
        e[i] = eps
        with torch.no_grad():
            zp, zm = lq.z_of(lq.x_star(_y(), c0 + e), c0 + e), lq.z_of(lq.x_star(_y(), c0 - e), c0 - e)
            fd_total[i] = (((zp**2).sum() + zp.sum()) - ((zm**2).sum() + zm.sum())) / (2 * eps)
            zp, zm = lq.z_of(x_fixed, c0 + e), lq.z_of(x_fixed, c0 - e)
            fd_fixed[i] = (((zp**2).sum() + zp.sum()) - ((zm**2).sum() + zm.sum())) / (2 * eps)
    torch.testing.assert_close(g_exact, fd_total, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_first, fd_fixed, atol=1e-6, rtol=1e-6)
    assert float((g_exact - g_first).norm()) > 1e-2 * float(g_exact.norm())  # the two really differ here


def test_first_order_is_exact_when_the_outer_loss_is_the_inner_objective():
    # The envelope theorem: d/dc min_x L(x, c) = ∂L/∂c at x*, so holding x* fixed loses nothing.
    lq = LinearQuadratic()
    y = _y()
    grads = []
    for backward in (il.IFT(), il.IFT(first_order=True)):
        jiio = lq.jiio(backward=backward)
        x, z = jiio(y)
        (g,) = torch.autograd.grad(jiio.inner_objective(x, z, y).sum(), [lq.c])
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=0)


def test_gradcheck_exact_ift_float64():
    lq = LinearQuadratic(n=4, k=2, p=3)
    jiio = lq.jiio(solver=il.Anderson(memory=5, tol=1e-12, max_iter=500))
    y = _y(batch=2, p=3).requires_grad_()

    def fn(y):
        x, z = jiio(y)
        return x, z

    assert torch.autograd.gradcheck(fn, (y,), eps=1e-6, atol=1e-5)


def test_gradcheck_constrained_with_context_float64():
    torch.manual_seed(3)
    W = 0.4 * torch.randn(4, 4, dtype=torch.float64) / 2
    V = torch.randn(3, 4, dtype=torch.float64)
    jiio = il.JIIO(lambda z, x, u: torch.tanh(z @ W.T + x + u), lambda z, u: z @ V.T,
                   lambda o, y, x: 0.5 * ((o - y) ** 2).sum(1), 4, constraint=il.sets.L2Ball(0.3),
                   state_shape=4, step_size=0.3, solver=il.Anderson(memory=5, tol=1e-12, max_iter=500))
    y = (3 * torch.randn(2, 3, dtype=torch.float64)).requires_grad_()
    u = (0.1 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda y, u: jiio(y, u), (y, u), eps=1e-6, atol=1e-5)


def test_module_parameters_receive_gradients():
    head = torch.nn.Linear(4, 3)

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.inj = torch.nn.Linear(2, 4)

        def forward(self, z, x):
            return torch.tanh(0.3 * self.lin(z) + self.inj(x))

    jiio = il.JIIO(Cell(), head, lambda o, y, x: ((o - y) ** 2).sum(1) + (x**2).sum(1), 2, state_shape=4,
                   solver=il.Anderson(tol=1e-6, max_iter=200), backward=il.IFT(first_order=True))
    names = {n for n, _ in jiio.named_parameters()}
    assert {"cell.lin.weight", "head.weight"} <= names
    x, z = jiio(torch.randn(3, 3))
    jiio.inner_objective(x, z, torch.randn(3, 3)).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in jiio.parameters())


# ------------------------------------------------------------------------------------ errors
def test_needs_exactly_one_of_state_shape_and_z_init():
    lq = LinearQuadratic()
    with pytest.raises(ValueError, match="exactly one of state_shape"):
        il.JIIO(lq.cell, lq.head, lq.objective, 3)
    with pytest.raises(ValueError, match="exactly one of state_shape"):
        il.JIIO(lq.cell, lq.head, lq.objective, 3, state_shape=6, z_init=torch.zeros(6))


def test_z_init_callable_sets_the_state_shape():
    lq = LinearQuadratic()
    jiio = il.JIIO(lq.cell, lq.head, lq.objective, lq.k, z_init=lambda y: torch.zeros(y.shape[0], lq.n, dtype=y.dtype),
                   solver=TIGHT, step_size=0.3)
    x, _ = jiio(_y())
    torch.testing.assert_close(x, lq.x_star(_y()).detach(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("bad", [0, (), (2, -1), "3"])
def test_bad_input_shape_is_a_clear_error(bad):
    lq = LinearQuadratic()
    with pytest.raises(ValueError, match="input_shape"):
        il.JIIO(lq.cell, lq.head, lq.objective, bad, state_shape=6)


def test_bad_x0_shape_is_a_clear_error():
    lq = LinearQuadratic()
    with pytest.raises(ValueError, match="x0 has shape"):
        lq.jiio()(_y(), x0=torch.zeros(4, 7, dtype=torch.float64))


def test_objective_not_per_sample_is_a_clear_error():
    lq = LinearQuadratic()
    jiio = il.JIIO(lq.cell, lq.head, lambda o, y, x: ((o - y) ** 2).sum(), lq.k, state_shape=lq.n)
    with pytest.raises(ValueError, match="one value per sample"):
        jiio(_y())


def test_non_callable_cell_is_a_type_error():
    with pytest.raises(TypeError, match="cell must be callable"):
        il.JIIO(3, lambda z: z, lambda o, y, x: o.sum(1), 2, state_shape=2)


# ------------------------------------------------------------------------------------ demos
def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_cli_runs_and_writes_its_figure(tmp_path, capsys):
    from implicitlayers.__main__ import main

    assert main(["demo", "jiio", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out reconstruction MSE" in printed
    assert (tmp_path / "jiio_demo.png").stat().st_size > 0


def test_cli_help_lists_commands(capsys):
    from implicitlayers.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["jiio_generative", "jiio_inverse", "jiio_adversarial"])
def test_examples_run_in_fast_mode(name, tmp_path):
    module = _load(ROOT / "examples" / f"{name}.py")
    metrics = module.main(["--fast", "--out", str(tmp_path), "--no-progress"])
    assert isinstance(metrics, dict) and metrics
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_constrained_input_stays_feasible_when_the_solve_stops_at_its_cap():
    # Anderson mixes projected points with affine weights; a capped solve must still return x in the set.
    torch.manual_seed(0)
    W, U, V = 0.05 * torch.randn(32, 32), torch.randn(32, 64) / 8, torch.randn(10, 32)
    ball = il.sets.L2Ball(1.0)
    attack = il.JIIO(lambda z, d, u: torch.tanh(z @ W.T + (u + d) @ U.T), lambda z, u: z @ V.T,
                     lambda lo, y, d: torch.nn.functional.cross_entropy(lo, y, reduction="none"), 64,
                     constraint=ball, maximize=True, state_shape=32, step_size=2.0,
                     solver=il.Anderson(memory=5, tol=1e-8, max_iter=20, on_failure="ignore"))
    u, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    delta, _ = attack(y, u)
    assert bool(ball.contains(delta, atol=1e-6).all())


def test_changing_the_solver_after_construction_takes_effect():
    lq = LinearQuadratic()
    jiio = lq.jiio()
    jiio(_y())
    jiio.solver = il.Anderson(tol=1e-3, max_iter=3, on_failure="raise")
    with pytest.raises(il.ConvergenceError):
        jiio(_y())


def test_cli_bench_runs_a_benchmark_script_and_rejects_unknown_names(capsys):
    from implicitlayers.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "backward", "--help"])
    assert exit_info.value.code == 0
    assert "--iters" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "nonexistent"])
