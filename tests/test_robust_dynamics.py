"""Specification of the neural-dynamics tools of `implicitlayers.robust` (Yang et al., ICML 2023)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from implicitlayers import robust

D, FEATURES, CLASSES = 12, 16, 4
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Cell(nn.Module):
    """`z ↦ tanh(W z + u)` with ‖W‖₂ = 0.8: a contraction, so every solver converges."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        with torch.no_grad():
            self.linear.weight.mul_(0.8 / torch.linalg.matrix_norm(self.linear.weight, ord=2))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


def classifier(solver=None, dtype=torch.float64, seed: int = 0, image: bool = False) -> robust.DEQClassifier:
    torch.manual_seed(seed)
    solver = solver or il.Broyden(tol=1e-10, max_iter=60, on_failure="ignore")
    flatten = [nn.Flatten()] if image else []
    encoder = nn.Sequential(*flatten, nn.Linear(FEATURES, D))
    with torch.no_grad():
        encoder[-1].weight.mul_(3.0)  # inputs matter, so entropy can be moved
    model = robust.DEQClassifier(encoder, il.DEQ(Cell(), solver=solver), nn.Linear(D, CLASSES))
    return model.to(dtype)


def batch(n: int = 8, dtype=torch.float64, seed: int = 1, image: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, FEATURES, generator=g, dtype=dtype)
    return (x.reshape(n, 1, 4, 4) if image else x), torch.randint(0, CLASSES, (n,), generator=g)


# ---------------------------------------------------------------- the solver's trajectory


def test_states_follow_the_solver_to_the_equilibrium():
    model = classifier()
    x, _ = batch()
    states = model.states(x, 25)
    assert len(states) == 26 and torch.equal(states[0], torch.zeros_like(states[0]))
    torch.testing.assert_close(states[-1], model.deq(model.encoder(x)).detach(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("mode", ["lift", "continue", "restart"])
@pytest.mark.parametrize("solver", [il.Broyden(tol=1e-12, max_iter=80), il.Anderson(tol=1e-12, max_iter=80)], ids=["broyden", "anderson"])
def test_a_run_continued_for_a_new_input_reaches_the_new_fixed_point(solver, mode):
    model = classifier(solver)
    x, _ = batch()
    u_old = model.encoder(x).detach()
    u_new = u_old + 0.01 * torch.randn(u_old.shape, generator=torch.Generator().manual_seed(2), dtype=u_old.dtype)
    run = robust.SolverRun(model.deq, u_old)
    for _ in range(5):
        run.step()
    run.change_input(u_new, mode)
    for _ in range(60):
        run.step()
    assert float(run.residual_norm().max()) < 1e-9
    torch.testing.assert_close(run.z, model.deq(u_new).detach(), atol=1e-8, rtol=0)
    run.close()


def test_bad_anatomy_and_solvers_are_rejected_with_clear_errors():
    model = classifier()
    with pytest.raises(TypeError, match="il.DEQ"):
        robust.DEQClassifier(nn.Identity(), model.head, model.head)
    with pytest.raises(TypeError, match="callable"):
        robust.DEQClassifier(3, model.deq, model.head)
    scipy_deq = il.DEQ(Cell().double(), solver=il.ScipyRoot())
    with pytest.raises(TypeError, match="init/step"):
        robust.SolverRun(scipy_deq, torch.zeros(2, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        model.states(batch()[0], -1)


def test_the_lift_retakes_the_last_step_with_the_new_residual():
    # After the lift the solver's state is the one it would have if the last evaluation had seen the new
    # input: same iterate, residual R_new(z_k).
    model = classifier()
    x, _ = batch()
    u_old = model.encoder(x).detach()
    run = robust.SolverRun(model.deq, u_old)
    for _ in range(3):
        run.step()
    z_k = run.z.clone()
    u_new = u_old + 0.05
    run.change_input(u_new, "lift")
    torch.testing.assert_close(run.z, z_k, atol=1e-14, rtol=0)
    torch.testing.assert_close(run.state.r, z_k - model.deq.cell(z_k, u_new), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="mode must be"):
        run.change_input(u_new, "reset")
    with pytest.raises(ValueError, match="shape"):
        run.change_input(u_new[:2], "lift")
    run.close()


def test_intermediate_state_unroll_is_backprop_through_damped_steps():
    model = classifier()
    x, y = batch()
    surrogate = robust.IntermediateState(model, state=3, unroll=4, damping=0.5)
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(surrogate(x_req), y), x_req)
    x_ref = x.clone().requires_grad_(True)
    u = model.encoder(x_ref)
    z = model.states(x, 3)[3]
    for _ in range(4):
        z = 0.5 * z + 0.5 * model.deq.cell(z, u)
    (g_ref,) = torch.autograd.grad(nn.functional.cross_entropy(model.head(z), y), x_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="state"):
        robust.IntermediateState(model, state=-1)


# ---------------------------------------------------------------- random intermediate states


def test_random_state_gradient_is_backprop_through_the_same_unrolled_steps():
    model = classifier(il.Broyden(tol=1e-10, max_iter=60))
    x, y = batch()
    params = list(model.parameters())
    with robust.random_intermediate_states(model, max_steps=6, k=5, damping=0.5, generator=torch.Generator().manual_seed(0)) as mode:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    (budget,) = mode.budgets
    # The oracle: the solver capped at T steps without gradient, then 5 damped steps recorded by autograd.
    u = model.encoder(x)
    capped = il.Broyden(tol=1e-10, max_iter=budget, on_failure="ignore")
    with torch.no_grad():
        z = il.fixed_point(lambda z: model.deq.cell(z, u), torch.zeros_like(u), solver=capped).value
    for _ in range(5):
        z = 0.5 * z + 0.5 * model.deq.cell(z, u)
    expected = torch.autograd.grad(nn.functional.cross_entropy(model.head(z), y), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_random_states_leave_eval_calls_and_the_layer_untouched():
    model = classifier()
    x, _ = batch()
    layer = model.deq.layer
    solver, backward = layer.solver, layer.backward_mode
    handle = robust.random_intermediate_states(model, max_steps=2)
    model.eval()
    model(x)
    assert bool(model.deq.last_info.converged.all()) and handle.budgets == []  # a full solve, not a capped one
    model.train()
    model(x)
    assert len(handle.budgets) == 1 and layer.solver is solver and layer.backward_mode is backward
    handle.remove()
    model(x)
    assert len(handle.budgets) == 1


def test_random_states_restore_the_layer_when_the_forward_fails():
    model = classifier()
    layer = model.deq.layer
    solver = layer.solver
    with robust.random_intermediate_states(model), pytest.raises(RuntimeError):
        model(torch.rand(3, FEATURES + 1, dtype=torch.float64))
    assert layer.solver is solver


def test_random_states_are_reproducible_under_a_seed_and_train_a_lyadeq():
    torch.manual_seed(0)
    lya = il.LyaDEQ(Cell(), D, solver=il.Anderson(tol=1e-6, max_iter=30, on_failure="ignore"))
    model = nn.Sequential(nn.Linear(FEATURES, D), lya, nn.Linear(D, CLASSES)).double()
    x, y = batch()
    runs = []
    for _ in range(2):
        with robust.random_intermediate_states(model, max_steps=5, generator=torch.Generator().manual_seed(3)) as mode:
            loss = robust.trades_loss(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(4))
            grads = torch.autograd.grad(loss, list(model.parameters()))
        runs.append((mode.budgets, loss.detach(), grads))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 2  # the clean and the adversarial forward
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    assert any(float(g.abs().sum()) > 0 for g in runs[0][2])


def test_random_states_reject_models_without_implicit_layers():
    with pytest.raises(ValueError, match="no il.ImplicitLayer"):
        robust.random_intermediate_states(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_steps"):
        robust.random_intermediate_states(classifier(), max_steps=0)


# ---------------------------------------------------------------- entropy reduction


def test_entropy_reduction_lowers_the_entropy_and_stays_in_the_ball_and_the_box():
    model = classifier()
    x, _ = batch(16)
    eps = 0.1
    defence = robust.EntropyDefence(model, eps=eps, steps=8, every=2, input_steps=10)
    trace = defence.defend(x)
    assert len(trace.inputs) == 1 + 3 * 10 and len(trace.states) == 9
    for x_t in trace.inputs:
        assert float((x_t - x).abs().max()) <= eps + 1e-12
        assert float(x_t.min()) >= 0 and float(x_t.max()) <= 1
    per_update = [trace.entropy[i * 11 : (i + 1) * 11] for i in range(3)]
    for values in per_update:
        assert values[-1] < values[0]
    torch.testing.assert_close(defence(x), trace.logits, atol=0, rtol=0)


@settings(max_examples=12, deadline=None)
@given(eps=st.floats(0.0, 0.5), step_size=st.floats(1e-3, 0.6), every=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_every_purified_input_lies_in_the_ball_and_the_box(eps, step_size, every, seed):
    model = classifier(il.Anderson(tol=1e-6, max_iter=20))
    x, _ = batch(4, seed=seed)
    x[0, 0], x[1, 1] = 0.0, 1.0  # pixels on the edge of the box
    trace = robust.EntropyDefence(model, eps=eps, steps=4, every=every, input_steps=2, step_size=step_size).defend(x)
    for x_t in trace.inputs:
        assert float((x_t - x).abs().max()) <= eps + 1e-12
        assert float(x_t.min()) >= 0 and float(x_t.max()) <= 1


def test_entropy_defence_gives_the_bpda_gradient_to_an_adaptive_attack():
    model = classifier()
    x, y = batch()
    defence = robust.EntropyDefence(model, eps=0.1, steps=6, every=2, input_steps=3)
    x_req = x.clone().requires_grad_(True)
    logits = defence(x_req)
    torch.testing.assert_close(logits.detach(), defence.defend(x).logits, atol=0, rtol=0)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), x_req)
    # BPDA: the loss's cotangent at the defended logits, pulled back through the classifier at the purified input.
    leaf = logits.detach().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(nn.functional.cross_entropy(leaf, y), leaf)
    purified = defence.defend(x).x.requires_grad_(True)
    (g_ref,) = torch.autograd.grad(model(purified), purified, cotangent)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)
    x_adv = robust.pgd(defence, x, y, eps=0.1, steps=2)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-12


def test_entropy_defence_is_deterministic_and_checks_its_arguments():
    model = classifier()
    x, _ = batch()
    defence = robust.EntropyDefence(model, eps=0.05, steps=4, on_input_change="restart")
    assert torch.equal(defence(x), defence(x))
    with pytest.raises(ValueError, match="on_input_change"):
        robust.EntropyDefence(model, eps=0.1, on_input_change="keep")
    with pytest.raises(ValueError, match="outside clamp"):
        defence(x + 2)


# ---------------------------------------------------------------- per-state evaluation


def test_evaluate_states_reports_every_state_and_attacks_lower_the_final_accuracy():
    model = classifier(dtype=torch.float64)
    x, y = batch(32)
    with torch.no_grad():
        y = model(x).argmax(1)  # the equilibrium's own predictions: clean final accuracy is 1
    clean = robust.evaluate_states(model, (x, y), steps=30)
    assert len(clean.accuracy) == len(clean.entropy) == 31
    assert clean.accuracy[-1] == 1.0
    assert clean.entropy[0] == pytest.approx(float(robust.prediction_entropy(model.head(torch.zeros(1, D, dtype=x.dtype))).detach()), rel=1e-9)
    attacked = robust.evaluate_states(model, (x, y), steps=30, eps=0.3, attack_steps=10)
    assert attacked.accuracy[-1] < clean.accuracy[-1]
    surrogate = robust.IntermediateState(model, state=2, unroll=3)
    via_surrogate = robust.evaluate_states(model, (x, y), steps=30, eps=0.3, grad_model=surrogate, attack_steps=10)
    assert via_surrogate.accuracy[-1] < 1.0


def test_early_state_defence_predicts_from_the_last_but_one_state():
    model = classifier()
    x, _ = batch()
    early = robust.IntermediateState(model, state=7)
    torch.testing.assert_close(early(x), model.head(model.states(x, 8)[7]), atol=0, rtol=0)


# ---------------------------------------------------------------- AutoAttack through torchattacks


def test_autoattack_without_torchattacks_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    x, y = batch(image=True)
    with pytest.raises(ImportError, match="--no-deps"):
        robust.autoattack(classifier(image=True), x, y, eps=0.1)


def test_autoattack_stays_in_the_ball_and_matches_pgd_on_a_deq():
    pytest.importorskip("torchattacks")
    model = classifier(image=True, solver=il.Anderson(tol=1e-6, max_iter=40, on_failure="ignore"))
    x, y = batch(16, image=True)
    with torch.no_grad():
        y = model(x).argmax(1)
    state = torch.random.get_rng_state()
    x_adv = robust.autoattack(model, x, y, eps=0.2, attacks=("apgd-ce", "apgd-t"), n_classes=CLASSES)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-12 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    aa = robust.accuracy(model, x_adv, y)
    ours = robust.accuracy(model, robust.pgd(model, x, y, eps=0.2, steps=20, generator=torch.Generator().manual_seed(0)), y)
    assert aa < 1.0 and abs(aa - ours) <= 0.25
    with pytest.raises(ValueError, match="subset"):
        robust.autoattack(model, x, y, eps=0.1, attacks=("cw",))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        robust.autoattack(model, x.flatten(1), y, eps=0.1)


# ---------------------------------------------------------------- the example


def test_the_example_runs_in_fast_mode(tmp_path):
    pytest.importorskip("torchattacks")
    spec = importlib.util.spec_from_file_location("robust_dynamics", ROOT / "examples" / "robust_dynamics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    summary = module.main(["--fast", "--out", str(tmp_path), "--no-progress"])
    assert torch.get_num_threads() == threads
    assert all(p.exists() and p.stat().st_size > 0 for p in summary["plots"])
    for variant in module.VARIANTS:
        res = summary["results"][variant]
        assert len(res["states"]["IFT"]["entropy"]) == module.STEPS + 1
        for key in ("clean", "PGD-20 0.1", "AutoAttack 0.1", "defended adaptive PGD-20 0.1"):
            mean, spread = res[key]
            assert 0.0 <= mean <= 1.0 and spread == 0.0  # one seed in fast mode
