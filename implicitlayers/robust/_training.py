"""Robust training losses: TRADES and PGD adversarial training."""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F

from ._common import (
    Clamp,
    Classifier,
    LossFn,
    ascent_direction,
    check_batch,
    check_clamp,
    check_eps,
    check_logits,
    check_norm,
    check_positive_int,
    check_step_size,
    eval_mode,
    input_gradient,
    project,
)
from ._evaluate import Attack, resolve_attack

__all__ = ["adversarial_loss", "trades_loss"]


def _kl_per_sample(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of each sample from log-probabilities over dimension 1, shape `(B,)`."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


def trades_loss(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    beta: float = 6.0,
    steps: int = 10,
    step_size: Optional[float] = None,
    norm: Literal["linf", "l2"] = "linf",
    clamp: Clamp = (0.0, 1.0),
    start_std: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The TRADES training loss (Zhang et al. 2019), a differentiable scalar.

    `CE(f(x), y) + β · KL(p(x) ‖ p(x_adv))`, batch means, where `p = softmax ∘ f` and `x_adv` maximises
    the KL term inside the ε-ball by PGD: from `x + start_std · N(0, I)` (at `x_adv = x` the KL has zero
    gradient, hence the small random start), `steps` ascent steps with the clean prediction held fixed,
    each projected onto the ε-ball and the clamp box. As in the reference code, the attack runs in eval
    mode, while the returned loss is evaluated in the model's own mode (e.g. training), and both
    arguments of the KL carry gradient.

    The KL runs in the direction of the reference code (yaodongyu/TRADES:
    `KLDivLoss(log_softmax(f(x_adv)), softmax(f(x)))`, which is KL(p(x) ‖ p(x_adv)), the clean
    distribution first); prose that writes "KL(adv ‖ clean)" means this same term.

    Args:
        model: the classifier, `model(x) -> logits` of shape `(B, classes)`.
        x: clean inputs `(B, ...)`, inside `clamp`.
        y: integer class labels `(B,)`.
        eps: radius of the attack ball, `>= 0` (`0` gives plain cross-entropy).
        beta: weight of the robustness term, `>= 0` (the TRADES default is 6).
        steps: PGD steps of the inner maximisation.
        step_size: PGD step length; default `2.5 · eps / steps` (`eps/4` for 10 steps, as in TRADES).
        norm: `"linf"` or `"l2"`.
        clamp: `(lo, hi)` box for valid inputs, or `None`.
        start_std: standard deviation of the Gaussian start around `x`.
        generator: random generator for the start.

    Returns:
        The scalar loss; call `.backward()` on it.
    """
    who = "trades_loss"
    x = check_batch(x, y, who)
    eps, norm = check_eps(eps, who), check_norm(norm, who)
    steps = check_positive_int(steps, "steps", who)
    step_size = 2.5 * eps / steps if step_size is None else check_step_size(step_size, who)
    clamp = check_clamp(clamp, x, who)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{who}: beta must be a finite number >= 0, got {beta!r}.")
    if not isinstance(start_std, numbers.Real) or not math.isfinite(start_std) or start_std < 0:
        raise ValueError(f"{who}: start_std must be a finite number >= 0, got {start_std!r}.")
    x = x.detach()

    x_adv = x
    if eps > 0:
        with eval_mode(model):
            with torch.no_grad():
                log_p_clean = F.log_softmax(check_logits(model(x), x.shape[0], who), dim=1)

            def kl_to_clean(z: torch.Tensor) -> torch.Tensor:
                logits = check_logits(model(z), z.shape[0], who)
                return _kl_per_sample(log_p_clean, F.log_softmax(logits, dim=1))

            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            x_adv = project(x, x + start_std * noise, eps, norm, clamp)
            for _ in range(steps):
                grad, _ = input_gradient(kl_to_clean, x_adv, who)
                x_adv = project(x, x_adv + step_size * ascent_direction(grad, norm), eps, norm, clamp)

    logits_clean = check_logits(model(x), x.shape[0], who)
    natural = F.cross_entropy(logits_clean, y)
    if eps == 0 or beta == 0:
        return natural
    logits_adv = check_logits(model(x_adv), x.shape[0], who)
    robust = _kl_per_sample(F.log_softmax(logits_clean, dim=1), F.log_softmax(logits_adv, dim=1)).mean()
    return natural + beta * robust


def adversarial_loss(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    attack: Union[str, Attack] = "pgd",
    loss_fn: Optional[LossFn] = None,
    **attack_kwargs: Any,
) -> torch.Tensor:
    """PGD adversarial training loss (Madry et al. 2018): the mean loss on attacked inputs.

    The attack (default `pgd`, in eval mode) produces detached `x_adv`; the returned loss
    `mean(loss_fn(model(x_adv), y))` is evaluated in the model's own mode and is differentiable
    with respect to the parameters.

    Args:
        model: the classifier, `model(x) -> logits`.
        x: clean inputs `(B, ...)`.
        y: targets `(B, ...)`.
        eps: radius of the attack ball, `>= 0`.
        attack: `"pgd"`, `"fgsm"`, or a callable `attack(model, x, y, eps, **attack_kwargs)`.
        loss_fn: `loss_fn(logits, y)`, per sample or a scalar, used by the attack and for the
            returned loss; default cross-entropy.
        **attack_kwargs: passed to the attack (`norm`, `steps`, `step_size`, `clamp`, `generator`, ...).

    Returns:
        The scalar loss.
    """
    who = "adversarial_loss"
    x = check_batch(x, y, who)
    attack_fn = resolve_attack(attack, who)
    if loss_fn is not None:
        attack_kwargs["loss_fn"] = loss_fn
    x_adv = attack_fn(model, x, y, eps, **attack_kwargs)
    logits = check_logits(model(x_adv), x.shape[0], who)
    loss = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)
    return loss.mean()
