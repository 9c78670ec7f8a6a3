"""Specification of `implicitlayers.robust`: attacks, robust accuracy and robust training losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers.robust as robust

ATTACKS = {"fgsm": robust.fgsm, "pgd": robust.pgd}


# ---------------------------------------------------------------- fixed models


def mlp(features: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))


def linear(features: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))


class FixedPointNet(nn.Module):
    """A DEQ stand-in: `z = tanh(Wz + Ux)` iterated from zero (contractive W), then a linear head."""

    def __init__(self, features: int = 6, width: int = 8, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        W = torch.randn(width, width)
        self.W = nn.Parameter(0.5 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(width, features))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, iters: int = 30) -> torch.Tensor:
        z = torch.zeros(x.shape[0], self.W.shape[0], dtype=x.dtype)
        u = x.flatten(1) @ self.U.T
        for _ in range(iters):
            z = torch.tanh(z @ self.W.T + u)
        return self.head(z)


def data(n: int = 32, features: int = 6, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def per_sample_norms(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.reshape(v.shape[0], -1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def ce(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def binary_margin_setup(features: int = 5, n: int = 16, seed: int = 3):
    """Two-class linear model: the margin m = (w_y − w_o)·x + (b_y − b_o) has a closed-form worst case."""
    model = linear(features, 2, seed=seed)
    x, y = data(n, features, classes=2, seed=seed)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    sign = (1 - 2 * y).float()[:, None]  # +1 for class 0, −1 for class 1
    w = sign * (W[0] - W[1])
    margin = (x * w).sum(1) + sign[:, 0] * (b[0] - b[1])
    return model, x, y, w, margin


def margins_of(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return logits.gather(1, y[:, None])[:, 0] - logits.gather(1, (1 - y)[:, None])[:, 0]


# ---------------------------------------------------------------- the ε-ball and the box

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    dims=shapes,
    eps=st.floats(0.0, 2.0),
    norm=st.sampled_from(["linf", "l2"]),
    attack=st.sampled_from(["fgsm", "pgd"]),
    seed=st.integers(0, 2**16),
)
def test_attacks_stay_inside_eps_ball_and_clamp_box(batch, dims, eps, norm, attack, seed):
    features = math.prod(dims)
    model = linear(features, 3, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch,) + dims, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    kwargs = {"generator": g, "steps": 5} if attack == "pgd" else {}
    x_adv = ATTACKS[attack](model, x, y, eps, norm=norm, **kwargs)
    assert x_adv.shape == x.shape
    assert (per_sample_norms(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0.01, 3.0), norm=st.sampled_from(["linf", "l2"]), seed=st.integers(0, 2**16))
def test_pgd_without_clamp_stays_inside_eps_ball(eps, norm, seed):
    model = mlp()
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(5, 6, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    x_adv = robust.pgd(model, x, y, eps, norm=norm, clamp=None, steps=7, generator=g)
    assert (per_sample_norms(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()


def test_zero_eps_returns_the_clean_input():
    model, (x, y) = mlp(), data()
    for attack in ATTACKS.values():
        assert torch.equal(attack(model, x, y, 0.0), x)


# ---------------------------------------------------------------- attacks do harm


@pytest.mark.parametrize("make_model", [mlp, FixedPointNet], ids=["mlp", "fixed_point"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_raise_the_loss(make_model, norm, eps, attack):
    model, (x, y) = make_model(), data()
    x_adv = ATTACKS[attack](model, x, y, eps, norm=norm)
    assert ce(model, x_adv, y).mean() > ce(model, x, y).mean()


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_linear_model():
    model, (x, y) = linear(6, 3), data(n=128)
    g = torch.Generator().manual_seed(0)
    fgsm_loss = ce(model, robust.fgsm(model, x, y, 0.1), y).mean()
    pgd_loss = ce(model, robust.pgd(model, x, y, 0.1, generator=g), y).mean()
    assert pgd_loss >= fgsm_loss - 1e-6


@pytest.mark.parametrize("norm,dual", [("l2", 2.0), ("linf", 1.0)])
def test_pgd_reaches_the_closed_form_worst_margin_of_a_linear_model(norm, dual):
    # min over the ball of the margin w·(x + δ) is m − eps·‖w‖_*, with ‖·‖_* the dual norm.
    model, x, y, w, margin = binary_margin_setup()
    eps = 0.3
    worst = margin - eps * w.norm(p=dual, dim=1)
    exact = robust.pgd(model, x, y, eps, norm=norm, clamp=None, random_start=False)
    torch.testing.assert_close(margins_of(model, exact, y), worst, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    started = robust.pgd(model, x, y, eps, norm=norm, clamp=None, generator=g)
    reduction, best = margin - margins_of(model, started, y), margin - worst
    # From a random start the ℓ2 iterate turns onto w geometrically; 20 steps get within a few percent.
    assert (reduction >= 0.95 * best).all() and (reduction <= best + 1e-5).all()


def test_fgsm_linf_is_the_closed_form_worst_case_of_a_linear_model():
    model, x, y, w, margin = binary_margin_setup()
    x_adv = robust.fgsm(model, x, y, 0.2, clamp=None)
    torch.testing.assert_close(x_adv, x - 0.2 * w.sign())
    torch.testing.assert_close(margins_of(model, x_adv, y), margin - 0.2 * w.abs().sum(1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- grad_model (surrogate gradients)


def test_fgsm_follows_the_gradient_of_grad_model():
    model, x, y, _, _ = binary_margin_setup()
    surrogate = linear(5, 2, seed=11)
    W = surrogate[1].weight.detach()
    w_surrogate = (1 - 2 * y).float()[:, None] * (W[0] - W[1])
    x_adv = robust.fgsm(model, x, y, 0.2, clamp=None, grad_model=surrogate)
    torch.testing.assert_close(x_adv, x - 0.2 * w_surrogate.sign())


def test_pgd_select_best_scores_iterates_on_model_not_on_grad_model():
    model, (x, y) = mlp(), data()
    misleading = lambda x: -model(x)  # noqa: E731 — its gradient points away from model's loss
    last = robust.pgd(model, x, y, 0.2, grad_model=misleading, random_start=False)
    best = robust.pgd(model, x, y, 0.2, grad_model=misleading, random_start=False, select="best")
    assert ce(model, last, y).mean() < ce(model, x, y).mean()
    assert (ce(model, best, y) >= ce(model, x, y)).all()  # the clean start is a candidate


def test_pgd_with_unrolled_intermediate_state_attacks_the_converged_model():
    net, (x, y) = FixedPointNet(), data()
    g = torch.Generator().manual_seed(0)
    x_adv = robust.pgd(net, x, y, 0.1, grad_model=lambda x: net(x, iters=3), select="best", generator=g)
    assert (per_sample_norms(x_adv - x, "linf") <= 0.1 + 1e-6).all()
    assert ce(net, x_adv, y).mean() > ce(net, x, y).mean()


def test_select_best_never_does_worse_than_last_on_model():
    model, (x, y) = FixedPointNet(), data()
    last = robust.pgd(model, x, y, 0.3, generator=torch.Generator().manual_seed(0), step_size=0.3)
    best = robust.pgd(model, x, y, 0.3, generator=torch.Generator().manual_seed(0), step_size=0.3, select="best")
    assert (ce(model, best, y) >= ce(model, last, y) - 1e-6).all()


# ---------------------------------------------------------------- side effects


class ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.frozen = nn.Dropout(0.5)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training or self.body.training or self.frozen.training)
        return self.frozen(self.body(x))


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attack_runs_in_eval_mode_restores_each_mode_and_leaves_grads_alone(attack):
    model, (x, y) = ModeRecorder(), data()
    model.train()
    model.frozen.eval()
    ATTACKS[attack](model, x, y, 0.1)
    assert model.seen and not any(model.seen)
    assert model.training and model.body.training and model.body[1].training and not model.frozen.training
    assert all(p.grad is None for p in model.parameters())


def test_bound_method_grad_model_is_put_in_eval_mode():
    net, (x, y) = ModeRecorder(), data()
    net.train()
    robust.pgd(lambda x: net.body(x), x, y, 0.1, grad_model=net.forward, steps=2)
    assert net.seen and not any(net.seen) and net.training


def test_attack_works_under_no_grad_and_returns_a_detached_tensor():
    model, (x, y) = mlp(), data()
    x = x.clone().requires_grad_(True)
    with torch.no_grad():
        x_adv = robust.pgd(model, x, y, 0.1, steps=3)
    assert not x_adv.requires_grad
    assert (x_adv != x).any()


def test_attacks_preserve_float64():
    model, (x, y) = mlp().double(), data()
    assert robust.pgd(model, x.double(), y, 0.1, norm="l2", steps=3).dtype == torch.float64


# ---------------------------------------------------------------- TRADES and adversarial training


def test_trades_loss_is_at_least_clean_cross_entropy():
    model, (x, y) = mlp(), data()
    g = torch.Generator().manual_seed(0)
    loss = robust.trades_loss(model, x, y, eps=0.2, generator=g)
    clean = F.cross_entropy(model(x), y)
    assert loss.item() > clean.item()


def test_trades_loss_reduces_to_cross_entropy_without_attack_or_weight():
    model, (x, y) = mlp(), data()
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(robust.trades_loss(model, x, y, eps=0.0), clean)
    torch.testing.assert_close(robust.trades_loss(model, x, y, eps=0.1, beta=0.0), clean)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_loss_is_differentiable_in_the_parameters(norm):
    model, (x, y) = FixedPointNet(), data()
    loss = robust.trades_loss(model, x, y, eps=0.2, norm=norm, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())  # the inner attack does not leak gradients
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_trades_loss_restores_the_training_mode():
    model, (x, y) = ModeRecorder(), data()
    model.train()
    robust.trades_loss(model, x, y, eps=0.1, steps=2)
    # Clean target and two attack steps in eval mode; the returned loss's two forwards in training mode.
    assert model.seen == [False, False, False, True, True]
    assert model.training


def test_adversarial_loss_is_the_loss_at_the_attacked_input_and_is_differentiable():
    model, (x, y) = mlp(), data()
    loss = robust.adversarial_loss(model, x, y, eps=0.1, attack="fgsm")
    torch.testing.assert_close(loss, F.cross_entropy(model(robust.fgsm(model, x, y, 0.1)), y))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- robust accuracy


def test_robust_accuracy_of_a_linear_model_matches_the_closed_form():
    # Without a box, FGSM ℓ∞ is the exact worst case of a two-class linear model.
    model, x, y, w, margin = binary_margin_setup(n=64)
    eps_list = [0.05, 0.1, 0.2]
    acc = robust.robust_accuracy(model, (x, y), attack="fgsm", eps_list=eps_list, clamp=None, batch_size=10)
    assert list(acc) == [0.0] + eps_list
    for eps in [0.0] + eps_list:
        expected = (margin - eps * w.abs().sum(1) > 0).float().mean().item()
        assert acc[eps] == pytest.approx(expected)


def test_robust_accuracy_accepts_tensors_or_an_iterable_of_batches():
    model, (x, y) = mlp(), data(n=30)
    from_tensors = robust.robust_accuracy(model, (x, y), attack="fgsm", eps_list=[0.1], batch_size=7)
    batches = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 30, 8))  # a one-shot generator
    from_batches = robust.robust_accuracy(model, batches, attack="fgsm", eps_list=[0.1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    from_loader = robust.robust_accuracy(model, loader, attack="fgsm", eps_list=[0.1])
    assert from_tensors == from_batches == from_loader
    assert from_tensors[0.0] == robust.accuracy(model, x, y, batch_size=7)


def test_robust_accuracy_forwards_attack_options():
    model, (x, y) = mlp(), data()
    seen = []

    def attack(model, x, y, eps, *, marker):
        seen.append((eps, marker))
        return x

    acc = robust.robust_accuracy(model, (x, y), attack=attack, eps_list=[0.1, 0.2], marker="m")
    assert seen == [(0.1, "m"), (0.2, "m")] and acc[0.1] == acc[0.2] == acc[0.0]
    with pytest.raises(TypeError):
        robust.robust_accuracy(model, (x, y), eps_list=[0.1], not_an_option=1)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: robust.fgsm(m, x, y, -0.1),
        lambda m, x, y: robust.pgd(m, x, y, -0.1),
        lambda m, x, y: robust.trades_loss(m, x, y, eps=-0.1),
        lambda m, x, y: robust.robust_accuracy(m, (x, y), eps_list=[0.1, -0.1]),
    ],
)
def test_negative_eps_is_a_value_error_naming_eps(call):
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="eps"):
        call(model, x, y)


@pytest.mark.parametrize("attack", [robust.fgsm, robust.pgd])
def test_unknown_norm_is_a_value_error_naming_norm(attack):
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="norm"):
        attack(model, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="norm"):
        robust.trades_loss(model, x, y, eps=0.1, norm="Linf")


@pytest.mark.parametrize("attack", [robust.fgsm, robust.pgd])
def test_batch_size_mismatch_is_a_value_error(attack):
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="32 samples.*31 samples"):
        attack(model, x, y[:-1], 0.1)


def test_input_outside_the_clamp_box_is_a_value_error():
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="clamp"):
        robust.pgd(model, x + 2, y, 0.1)
    with pytest.raises(ValueError, match="clamp"):
        robust.fgsm(model, x, y, 0.1, clamp=(1.0, 0.0))


@pytest.mark.parametrize(
    "kwargs,name",
    [({"steps": 0}, "steps"), ({"step_size": 0.0}, "step_size"), ({"select": "worst"}, "select")],
)
def test_bad_pgd_options_are_value_errors_naming_them(kwargs, name):
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match=name):
        robust.pgd(model, x, y, 0.1, **kwargs)


def test_select_best_needs_a_per_sample_loss():
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="one loss per sample"):
        robust.pgd(model, x, y, 0.1, select="best", loss_fn=F.cross_entropy)


def test_a_model_without_input_gradient_is_a_clear_error():
    model, (x, y) = mlp(), data()

    def frozen(x):
        with torch.no_grad():
            return model(x)

    with pytest.raises(RuntimeError, match="differentiable with respect to its input"):
        robust.pgd(frozen, x, y, 0.1)


def test_logits_of_the_wrong_batch_size_are_a_value_error():
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="logits"):
        robust.fgsm(lambda x: model(x)[:3], x, y, 0.1)


def test_bad_data_and_attack_names_for_robust_accuracy():
    model, (x, y) = mlp(), data()
    with pytest.raises(ValueError, match="attack"):
        robust.robust_accuracy(model, (x, y), attack="cw")
    with pytest.raises(ValueError, match="no samples"):
        robust.robust_accuracy(model, [], eps_list=[0.1])
    with pytest.raises(TypeError, match="iterable"):
        robust.robust_accuracy(model, 3)


def test_pgd_with_an_unrolled_early_state_deq_surrogate_attacks_the_real_deq():
    # The surrogate-gradient attack on a real il.DEQ: the surrogate shares the cell, stops after
    # 4 Picard steps and is differentiated by backprop; the attack must still hurt the converged DEQ.
    import implicitlayers as il

    torch.manual_seed(0)
    d, k = 16, 3
    inject, head = torch.nn.Linear(8, d), torch.nn.Linear(d, k)
    weight = torch.nn.Linear(d, d, bias=False)
    torch.nn.init.normal_(weight.weight, std=0.4 / d**0.5)

    def cell(z, u):
        return torch.tanh(weight(z) + u)

    deq = il.DEQ(cell, solver=il.Anderson(tol=1e-6, max_iter=100))
    early = il.DEQ(cell, solver=il.FixedPointIteration(max_iter=4, on_failure="ignore"), backward=il.Unroll())
    model = lambda x: head(deq(inject(x)))  # noqa: E731
    surrogate = lambda x: head(early(inject(x)))  # noqa: E731
    x = torch.rand(32, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv = robust.pgd(model, x, y, eps=0.2, steps=10, grad_model=surrogate, select="best")
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        attacked = F.cross_entropy(model(x_adv), y)
    assert attacked > clean
