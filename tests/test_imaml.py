"""`il.IMAML`: closed-form linear-regression oracles, gradcheck, batching, and input validation.

Oracle. For a linear model `pred = X w` and `L_train(w) = ‖X w − y‖² / (2N)` (a mean over the N
support examples of half the squared error), the Hessian is `H = XᵀX / N`, so

    φ* = (H + λI)⁻¹ (Xᵀy / N + λθ)       and       dφ*/dθ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import implicitlayers as il
from implicitlayers.models.imaml import default_backward


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one thread avoids threading overhead (and thrashing on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TIGHT = dict(solver=il.Anderson(memory=5, tol=1e-12, max_iter=300), backward=il.IFT(solver=il.Anderson(tol=1e-12, max_iter=500)))


def half_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (pred - y).pow(2).sum(-1).mean()


def regression_tasks(tasks: int, n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(tasks, n, 1, generator=g, dtype=torch.float64)
    return x, y


def closed_form(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, lam: float):
    n, d = x.shape[1], x.shape[2]
    a = x.transpose(1, 2) @ x / n + lam * torch.eye(d, dtype=x.dtype)
    b = (x.transpose(1, 2) @ y / n).squeeze(-1) + lam * theta
    return torch.linalg.solve(a, b), a


def linear_imaml(d: int, lam: float, **kwargs) -> il.IMAML:
    model = torch.nn.Linear(d, 1, bias=False).double()
    return il.IMAML(model, half_mse, lam, **{**TIGHT, **kwargs})


def test_adapted_parameters_match_the_closed_form():
    torch.manual_seed(0)
    x, y = regression_tasks(5, 8, 4)
    imaml = linear_imaml(4, lam=2.0)
    params = imaml(x, y)
    assert set(params) == {"weight"} and params["weight"].shape == (5, 1, 4)
    expected, _ = closed_form(x, y, imaml.model.weight.detach().reshape(-1), 2.0)
    torch.testing.assert_close(params["weight"].reshape(5, 4), expected, atol=1e-9, rtol=1e-9)
    assert bool(imaml.last_info.converged.all())


def test_meta_gradient_is_the_inverse_of_identity_plus_hessian_over_lambda():
    torch.manual_seed(1)
    lam = 0.7
    x, y = regression_tasks(3, 6, 4)
    qx, qy = regression_tasks(3, 9, 4, seed=5)
    imaml = linear_imaml(4, lam=lam)
    params = imaml(x, y)
    pred = imaml.functional(params, qx)
    test_loss = 0.5 * (pred - qy).pow(2).sum()
    test_loss.backward()
    phi, a = closed_form(x, y, imaml.model.weight.detach().reshape(-1), lam)
    grad_test = (qx.transpose(1, 2) @ (qx @ phi.unsqueeze(-1) - qy)).squeeze(-1)  # ∇L_test(φ*) per task
    hessian = a - lam * torch.eye(4, dtype=torch.float64)
    meta = torch.linalg.solve(torch.eye(4, dtype=torch.float64) + hessian / lam, grad_test).sum(0)
    torch.testing.assert_close(imaml.model.weight.grad.reshape(-1), meta, atol=1e-8, rtol=1e-8)


@settings(max_examples=15, deadline=None)
@given(
    lam=st.floats(0.1, 10.0),
    tasks=st.integers(1, 4),
    n=st.integers(1, 6),
    d=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_closed_form_holds_for_random_tasks(lam, tasks, n, d, seed):
    torch.manual_seed(seed)
    x, y = regression_tasks(tasks, n, d, seed)
    imaml = linear_imaml(d, lam=lam)
    params = imaml(x, y)
    expected, _ = closed_form(x, y, imaml.model.weight.detach().reshape(-1), lam)
    torch.testing.assert_close(params["weight"].reshape(tasks, d), expected, atol=1e-8, rtol=1e-8)


def test_gradcheck_float64_through_theta_and_support_data():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    imaml = il.IMAML(model, half_mse, 1.5, solver=TIGHT["solver"], backward=default_backward(tol=1e-12, max_iter=100))
    x, _ = regression_tasks(2, 3, 2)
    y = torch.randn(2, 3, 2, dtype=torch.float64)
    qx = torch.randn(2, 3, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def meta_forward(*args):
        *params, sx = args
        adapted = functional_call(imaml, {f"model.{n}": p for n, p in zip(names, params)}, (sx, y))
        return imaml.functional(adapted, qx)

    assert torch.autograd.gradcheck(meta_forward, (*leaves, x.clone().requires_grad_()), atol=1e-6)


def test_a_task_batch_equals_its_tasks_solved_one_by_one():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    imaml = il.IMAML(model, F.cross_entropy, 2.0, **TIGHT)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 6))
    qx, qy = torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (3, 5))

    def meta_grad(sl: slice):
        model.zero_grad()
        params = imaml(x[sl], y[sl])
        logits = imaml.functional(params, qx[sl])
        F.cross_entropy(logits.flatten(0, 1), qy[sl].flatten(), reduction="sum").backward()
        return params, [p.grad.clone() for p in model.parameters()]

    batch_params, batch_grads = meta_grad(slice(None))
    single = [meta_grad(slice(t, t + 1)) for t in range(3)]
    for name in batch_params:
        one_by_one = torch.cat([p[name] for p, _ in single])
        torch.testing.assert_close(batch_params[name], one_by_one, atol=1e-9, rtol=1e-9)
    for i, g in enumerate(batch_grads):
        torch.testing.assert_close(g, sum(grads[i] for _, grads in single), atol=1e-8, rtol=1e-8)


def test_default_backward_matches_the_dense_meta_gradient():
    torch.manual_seed(4)
    lam = 1.0
    x, y = regression_tasks(3, 5, 4)
    imaml = linear_imaml(4, lam=lam, backward=default_backward(tol=1e-10, max_iter=200))
    params = imaml(x, y)
    c = torch.randn(3, 4, dtype=torch.float64)
    (params["weight"].reshape(3, 4) * c).sum().backward()
    _, a = closed_form(x, y, imaml.model.weight.detach().reshape(-1), lam)
    torch.testing.assert_close(imaml.model.weight.grad.reshape(-1), (lam * torch.linalg.solve(a, c)).sum(0), atol=1e-7, rtol=1e-7)


def test_unrolled_inner_solve_gives_the_same_meta_gradient():
    # Backprop through 200 converged gradient steps (MAML-style) agrees with the implicit meta-gradient.
    torch.manual_seed(6)
    x, y = regression_tasks(2, 5, 3)
    c = torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for backward in (il.Unroll(), il.IFT(solver=il.Anderson(tol=1e-12, max_iter=500))):
        torch.manual_seed(7)
        imaml = linear_imaml(3, lam=1.0, solver=il.FixedPointIteration(tol=1e-13, max_iter=400), backward=backward, step_size=0.3)
        (imaml(x, y)["weight"].reshape(2, 3) * c).sum().backward()
        grads.append(imaml.model.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-9)


def test_float32_classifier_converges_with_the_defaults():
    # A smooth activation: with ReLU the proximal minimiser can sit on a kink, where no gradient vanishes.
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    imaml = il.IMAML(model, F.cross_entropy, 2.0)
    x, y = torch.rand(8, 5, 16), torch.arange(5).repeat(8, 1)
    params = imaml(x, y)
    assert bool(imaml.last_info.converged.all())
    logits = imaml.functional(params, x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # adaptation helps on the support set it adapted to
    with torch.no_grad():
        before = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()) < before


# ------------------------------------------------------------------------------ the step size from curvature
def stiff_tasks(tasks: int = 3, n: int = 8, d: int = 5, top: float = 40.0, seed: int = 0):
    """Regression tasks with `H_t = X_tᵀX_t/N` of known spectrum: task t's largest eigenvalue is `top·(t+1)`,
    the others in [0.01, 1] (an ill-conditioned L_train: κ(H + λI) ≈ 120 for λ = 1)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for t in range(tasks):
        q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
        spectrum = torch.cat([torch.tensor([top * (t + 1)], dtype=torch.float64), torch.linspace(1.0, 0.01, d - 1, dtype=torch.float64)])
        v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        xs.append(q @ torch.diag((n * spectrum).sqrt()) @ v.T)  # XᵀX/N = V diag(spectrum) Vᵀ
    y = torch.randn(tasks, n, 1, generator=g, dtype=torch.float64)
    return torch.stack(xs), y


def stationarity(imaml: il.IMAML, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per task ‖∇L_train(φ) + λ(φ − θ)‖, computed here independently of the layer (for a block of objectives
    only, the solvers' stopping test is this absolute gradient norm)."""
    phi = params["weight"].detach().reshape(x.shape[0], -1).requires_grad_()
    theta = imaml.model.weight.detach().reshape(-1)
    loss = sum(half_mse(x[t] @ phi[t, :, None], y[t]) for t in range(x.shape[0]))
    (grad,) = torch.autograd.grad(loss, phi)
    return (grad + imaml.lam * (phi - theta)).norm(dim=1).detach()


def test_auto_step_size_solves_an_ill_conditioned_inner_problem_to_tol_where_a_fixed_step_diverges():
    x, y = stiff_tasks()
    model = torch.nn.Linear(5, 1, bias=False).double()
    fixed = il.IMAML(model, half_mse, 1.0, step_size=0.5, solver=il.FixedPointIteration(tol=1e-8, max_iter=200, on_failure="ignore"))
    fixed(x, y)
    assert not bool(fixed.last_info.converged.any())  # 0.5 > 2/(L + λ): plain gradient steps diverge
    for solver in (il.FixedPointIteration(tol=1e-8, max_iter=5000), il.Anderson(memory=10, tol=1e-8, max_iter=500)):
        imaml = il.IMAML(model, half_mse, 1.0, solver=solver, power_iters=30)
        params = imaml(x, y)
        assert bool(imaml.last_info.converged.all()) and imaml.last_finished_by_descent == 0
        assert float(stationarity(imaml, params, x, y).max()) <= 1e-8
        expected, _ = closed_form(x, y, model.weight.detach().reshape(-1), 1.0)
        torch.testing.assert_close(params["weight"].reshape(3, 5), expected, atol=1e-6, rtol=1e-6)


def test_auto_step_size_is_one_over_the_curvature_of_a_quadratic():
    x, y = stiff_tasks()
    lam = 1.0
    exact = torch.linalg.eigvalsh(x.transpose(1, 2) @ x / x.shape[1])[:, -1]  # 40, 80, 120
    model = torch.nn.Linear(5, 1, bias=False).double()
    descent = il.IMAML(model, half_mse, lam, solver=il.FixedPointIteration(tol=1e-8, max_iter=5000), power_iters=40)
    descent(x, y)
    torch.testing.assert_close(descent.last_curvature, exact, rtol=1e-6, atol=0)
    assert descent.last_step_size == pytest.approx(1 / (120 + lam), rel=1e-6)  # the largest over the meta-batch
    accelerated = il.IMAML(model, half_mse, lam, power_iters=40)  # Anderson: 1/√(λ(L + λ))
    accelerated(x, y)
    assert accelerated.last_step_size == pytest.approx((lam * (120 + lam)) ** -0.5, rel=1e-6)
    assert accelerated.solver is accelerated.layer.solver.inner and isinstance(accelerated.solver, il.Anderson)


def test_curvature_estimate_is_warm_started_from_the_previous_call():
    x, y = stiff_tasks(top=2.0)  # a small spectral gap (2 against 1): power iteration converges slowly
    exact = torch.linalg.eigvalsh(x.transpose(1, 2) @ x / x.shape[1])[:, -1]
    model = torch.nn.Linear(5, 1, bias=False).double()
    cold = il.IMAML(model, half_mse, 1.0).curvature(x, y, iters=1)
    imaml = il.IMAML(model, half_mse, 1.0)
    imaml.curvature(x, y, iters=60)
    warm = imaml.curvature(x, y, iters=1)
    torch.testing.assert_close(warm, exact, rtol=1e-9, atol=0)
    assert float(((cold - exact).abs() / exact).max()) > 1e-3
    # Another number of tasks reuses the vectors cyclically: the three tasks twice over, as tasks 0-2 and 3-5.
    again = imaml.curvature(torch.cat([x, x]), torch.cat([y, y]), iters=1)
    torch.testing.assert_close(again, exact.repeat(2), rtol=1e-9, atol=0)


def test_a_task_anderson_leaves_short_of_tol_is_finished_by_descent_steps(monkeypatch):
    from implicitlayers.models import imaml as module

    x, y = stiff_tasks()
    model = torch.nn.Linear(5, 1, bias=False).double()
    # Descent steps on κ ≈ 120 need about 2000 iterations to 1e-8: give them room (by default 4 × max_iter).
    monkeypatch.setattr(module._AutoStep, "FALLBACK_FACTOR", 1000)
    imaml = il.IMAML(model, half_mse, 1.0, solver=il.Anderson(memory=10, tol=1e-8, max_iter=3), power_iters=30)
    params = imaml(x, y)  # no warning: plain gradient steps of 1/(L + λ) finish what 3 Anderson steps left
    info = imaml.last_info
    assert bool(info.converged.all()) and bool((info.nstep > 3).all()) and info.nfe > 3
    assert imaml.last_finished_by_descent == 3
    assert float(stationarity(imaml, params, x, y).max()) <= 1e-8
    # A budget the descent cannot meet either: the solver's own policy applies, to the end result only.
    monkeypatch.setattr(module._AutoStep, "FALLBACK_FACTOR", 4)
    short = il.IMAML(model, half_mse, 1.0, solver=il.Anderson(memory=10, tol=1e-8, max_iter=3, on_failure="raise"))
    with pytest.raises(il.ConvergenceError, match="plain gradient steps from its best iterate.*within max_iter=15"):
        short(x, y)


def test_the_testing_toolkit_tightens_the_auto_stepped_solver():
    # check_gradients replaces the layer's solver by a tighter copy (solver.replace): the step must survive.
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    imaml = il.IMAML(model, F.cross_entropy, 1.0)
    x, y = torch.rand(2, 4, 3) * 3, torch.randint(0, 2, (2, 4))
    errors = il.testing.check_gradients(imaml, x, y)
    assert errors["finite_differences"] < 1e-3
    imaml.solver = il.Broyden(tol=1e-6, max_iter=200)  # a new solver keeps the auto step
    imaml(x, y)
    assert isinstance(imaml.solver, il.Broyden) and imaml.last_step_size == pytest.approx(imaml.auto_step_size(float(imaml.last_curvature.max())))
    with pytest.raises(TypeError, match="IMAML: solver must be an implicitlayers solver"):
        imaml.solver = "anderson"


def test_zero_curvature_gives_the_proximal_step():
    # L_train linear in φ: H = 0, so α = 1/λ and one gradient step lands on φ* = θ − ∇L_train/λ.
    model = torch.nn.Linear(3, 1, bias=False).double()
    imaml = il.IMAML(model, lambda p, y: (p * y).mean(), 2.0, solver=il.FixedPointIteration(tol=1e-12, max_iter=5))
    x, y = regression_tasks(2, 4, 3)
    params = imaml(x, y)
    assert torch.equal(imaml.last_curvature, torch.zeros(2, dtype=torch.float64)) and imaml.last_step_size == 0.5
    expected = model.weight.detach() - (x * y).mean(1, keepdim=True) / 2.0
    torch.testing.assert_close(params["weight"], expected, atol=1e-12, rtol=0)
    assert int(imaml.last_info.nstep.max()) <= 1


def test_gradcheck_float64_with_the_auto_step_and_plain_gradient_steps():
    # The default-solver gradcheck above runs with step_size="auto" (Anderson's step); this one with its
    # descent step 1/(L + λ), on support data whose curvature is well above λ.
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)).double()
    imaml = il.IMAML(model, half_mse, 1.0, solver=il.FixedPointIteration(tol=1e-12, max_iter=2000),
                     backward=default_backward(tol=1e-12, max_iter=100))
    x = torch.randn(1, 4, 2, dtype=torch.float64) * 2
    y, qx = torch.randn(1, 4, 1, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def meta_forward(*params):
        adapted = functional_call(imaml, {f"model.{n}": p for n, p in zip(names, params)}, (x, y))
        return imaml.functional(adapted, qx)

    assert torch.autograd.gradcheck(meta_forward, tuple(leaves), atol=1e-6)
    assert imaml.last_step_size == pytest.approx(1 / (float(imaml.last_curvature.max()) + 1.0))
    assert float(imaml.last_curvature.max()) > 1.0  # the curvature, not λ alone, set the step


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("step_size", ["fast", 0.0, -0.1, float("nan"), float("inf"), True, None])
def test_bad_step_size_is_rejected(step_size):
    with pytest.raises(ValueError, match="step_size must be 'auto' or a positive finite number"):
        il.IMAML(torch.nn.Linear(2, 1), half_mse, 1.0, step_size=step_size)


@pytest.mark.parametrize("power_iters", [0, -1, 1.5, True])
def test_bad_power_iters_are_rejected(power_iters):
    with pytest.raises(ValueError, match="power_iters must be a positive int"):
        il.IMAML(torch.nn.Linear(2, 1), half_mse, 1.0, power_iters=power_iters)


def test_auto_step_with_phantom_is_rejected():
    with pytest.raises(ValueError, match="il.Phantom.*float step_size"):
        il.IMAML(torch.nn.Linear(2, 1), half_mse, 1.0, backward=il.Phantom())
    il.IMAML(torch.nn.Linear(2, 1), half_mse, 1.0, backward=il.Phantom(), step_size=0.1)  # a fixed step is fine


def test_mismatched_task_counts_are_rejected():
    imaml = linear_imaml(3, lam=1.0)
    with pytest.raises(ValueError, match="support_x has 4 task.*support_y has 3"):
        imaml(torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(3, 5, 1, dtype=torch.float64))


def test_mismatched_support_sizes_are_rejected():
    imaml = linear_imaml(3, lam=1.0)
    with pytest.raises(ValueError, match="5 example.*support_y has 4"):
        imaml(torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 1, dtype=torch.float64))


def test_support_without_a_task_dimension_is_rejected():
    imaml = linear_imaml(3, lam=1.0)
    with pytest.raises(ValueError, match=r"\(T, N, \.\.\.\)"):
        imaml(torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64))


def test_support_that_does_not_fit_the_model_is_rejected_with_its_shape():
    imaml = linear_imaml(3, lam=1.0)
    with pytest.raises(ValueError, match=r"support_x of shape \(5, 4\)"):
        imaml(torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64))


def test_non_scalar_inner_loss_is_rejected():
    model = torch.nn.Linear(3, 1).double()
    imaml = il.IMAML(model, lambda p, y: (p - y).pow(2).squeeze(-1), 1.0)
    with pytest.raises(ValueError, match="scalar per task"):
        imaml(torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), True])
def test_lambda_must_be_positive(lam):
    with pytest.raises(ValueError, match="lam must be a positive"):
        il.IMAML(torch.nn.Linear(2, 1), half_mse, lam)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        il.IMAML(lambda x: x, half_mse, 1.0)


def test_functional_checks_task_counts():
    imaml = linear_imaml(3, lam=1.0)
    params = imaml(torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 task.*query_x has 3"):
        imaml.functional(params, torch.randn(3, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="keys"):
        imaml.functional({"bias": params["weight"]}, torch.randn(2, 4, 3, dtype=torch.float64))


# ------------------------------------------------------------------------------ the example
def _fewshot_example():
    """`examples/fewshot_digits.py` as a module."""
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    try:
        import fewshot_digits
    finally:
        sys.path.pop(0)
    return fewshot_digits


def test_fewshot_example_runs_in_fast_mode(tmp_path: pathlib.Path):
    fewshot_digits = _fewshot_example()
    metrics = fewshot_digits.main(["--fast", "--out", str(tmp_path)])
    assert (tmp_path / "fewshot_digits.png").exists()
    for setting in metrics.values():
        for learner in setting.values():
            assert 0.0 <= learner["accuracy"] <= 1.0 and learner["ci95"] >= 0.0
        # Per meta-step counts of iMAML's inner solves that met tol (3 meta-steps of 4 tasks): all of them.
        imaml = setting["iMAML"]
        assert imaml["train_inner_met_tol_per_step"] == [4, 4, 4]
        assert imaml["train_inner_failed"] == imaml["train_inner_cg_failed"] == imaml["test_inner_failed"] == 0


def test_fewshot_example_fails_loudly_when_an_inner_solve_misses_tol(tmp_path: pathlib.Path):
    fewshot_digits = _fewshot_example()
    args = ["--fast", "--learners", "iMAML", "--inner-max-iter", "1", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="missed their tolerance.*--inner-max-iter"):
        fewshot_digits.main(args)
    imaml = fewshot_digits.main([*args, "--allow-unconverged"])["5-way 1-shot"]["iMAML"]
    assert imaml["train_inner_failed"] > 0 and sum(imaml["train_inner_met_tol_per_step"]) == 12 - imaml["train_inner_failed"]
