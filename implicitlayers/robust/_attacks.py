"""White-box attacks: FGSM and PGD in ℓ∞ and ℓ2, on any classifier `model(x) -> logits`."""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

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
    cross_entropy_per_sample,
    eval_mode,
    input_gradient,
    project,
    uniform_in_ball,
)

__all__ = ["fgsm", "pgd"]


def _attack_objective(
    fn: Classifier, loss_fn: LossFn, y: torch.Tensor, who: str, name: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return loss_fn(check_logits(fn(x_adv), x_adv.shape[0], who, name), y)

    return objective


def fgsm(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: Literal["linf", "l2"] = "linf",
    loss_fn: Optional[LossFn] = None,
    clamp: Clamp = (0.0, 1.0),
    grad_model: Optional[Classifier] = None,
) -> torch.Tensor:
    """Fast gradient (sign) method: one step of length `eps` along the steepest ascent of the loss.

    `x_adv = Π(x + eps · d)` with `d = sign(∇ₓℓ)` for `norm="linf"` (Goodfellow et al. 2015) or
    `d = ∇ₓℓ / ‖∇ₓℓ‖₂` per sample for `norm="l2"`, and `Π` the clamp to the box `clamp`.

    Args:
        model: the classifier, `model(x) -> logits` (an `nn.Module` or any callable).
        x: clean inputs, `(B, ...)`, inside `clamp`.
        y: targets for `loss_fn`, batch size `B` (class indices for the default loss).
        eps: the radius of the attack ball, `>= 0`.
        norm: `"linf"` or `"l2"` (per sample, over all non-batch dimensions).
        loss_fn: `loss_fn(logits, y)`, per sample `(B,)` or a scalar; the gradient is that of its sum.
            Default: cross-entropy.
        clamp: `(lo, hi)` box for valid inputs, or `None`.
        grad_model: optional callable that supplies the gradient instead of `model`; see `pgd`.

    Returns:
        The adversarial inputs, detached, same shape as `x`.
    """
    who = "fgsm"
    x = check_batch(x, y, who)
    eps, norm = check_eps(eps, who), check_norm(norm, who)
    clamp = check_clamp(clamp, x, who)
    x = x.detach()
    if eps == 0:
        return x.clone()
    source, name = (model, "model") if grad_model is None else (grad_model, "grad_model")
    objective = _attack_objective(source, loss_fn or cross_entropy_per_sample, y, who, name)
    with eval_mode(model, grad_model):
        grad, _ = input_gradient(objective, x, who)
    return project(x, x + eps * ascent_direction(grad, norm), eps, norm, clamp)


class _BestIterate:
    """Per sample, the iterate with the highest loss seen so far (ties keep the earlier one)."""

    def __init__(self) -> None:
        self.x: Optional[torch.Tensor] = None
        self.loss: Optional[torch.Tensor] = None

    def offer(self, x_adv: torch.Tensor, loss: torch.Tensor, who: str) -> None:
        if loss.shape != (x_adv.shape[0],):
            raise ValueError(
                f"{who}: select='best' compares samples, so loss_fn must return one loss per sample, "
                f"shape ({x_adv.shape[0]},); it returned shape {tuple(loss.shape)}."
            )
        if self.x is None or self.loss is None:
            self.x, self.loss = x_adv, loss
            return
        better = loss > self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.x = torch.where(better.reshape((-1,) + (1,) * (x_adv.dim() - 1)), x_adv, self.x)


def pgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 20,
    step_size: Optional[float] = None,
    norm: Literal["linf", "l2"] = "linf",
    random_start: bool = True,
    clamp: Clamp = (0.0, 1.0),
    loss_fn: Optional[LossFn] = None,
    grad_model: Optional[Classifier] = None,
    select: Literal["last", "best"] = "last",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected gradient ascent on the loss inside the ε-ball (Madry et al. 2018).

    From `x` (plus a uniform random point of the ball if `random_start`), repeat `steps` times:
    `x ← Π(x + step_size · d)`, with `d` the steepest-ascent direction of `∇ₓℓ` (sign for ℓ∞, the
    per-sample normalised gradient for ℓ2) and `Π` the projection onto the ε-ball around the clean input
    (per sample) followed by the clamp box. Every iterate, hence the result, lies in both sets.

    The model (and `grad_model`) are put in eval mode for the attack and restored afterwards; gradients
    are taken with respect to the input only, so no parameter's `.grad` changes.

    Args:
        model: the classifier under attack, `model(x) -> logits` (an `nn.Module` or any callable).
        x: clean inputs, `(B, ...)`, inside `clamp`.
        y: targets for `loss_fn`, batch size `B` (class indices for the default loss).
        eps: the radius of the attack ball, `>= 0` (`0` returns `x`).
        steps: number of ascent steps.
        step_size: length of each step; default `2.5 · eps / steps`, so the iterates can cross the ball.
        norm: `"linf"` or `"l2"` (per sample, over all non-batch dimensions).
        random_start: start from a point drawn uniformly in the ball instead of `x`.
        clamp: `(lo, hi)` box for valid inputs (default `[0, 1]`), or `None` for unbounded inputs.
        loss_fn: `loss_fn(logits, y)`, per sample `(B,)` or a scalar; the attack ascends its sum.
            Default: cross-entropy. For a targeted attack pass the negated loss to the target class.
        grad_model: optional second callable that supplies the attack gradient, while `model` remains
            the classifier under attack. For an implicit model this is the surrogate-gradient attack of
            Yang et al. (ICML 2023): differentiate the DEQ at an intermediate solver state or through a
            few unrolled steps (e.g. an `il.DEQ` sharing the classifier's cell with
            `solver=il.FixedPointIteration(max_iter=4, on_failure="ignore"), backward=il.Unroll()`), which is often
            stronger than the exact implicit gradient at the fixed point. With `select="best"`, each
            iterate is scored on `model`, so the surrogate only proposes and `model` decides.
        select: `"last"` returns the final iterate; `"best"` returns, per sample, the iterate (start
            included) with the highest loss under `model` (needs a per-sample `loss_fn`; costs one extra
            forward of `model` per step when `grad_model` is given, one in all otherwise).
        generator: random generator for the random start, for reproducible attacks.

    Returns:
        The adversarial inputs, detached, same shape as `x`.

    Raises:
        ValueError: for `eps < 0`, an unknown `norm` or `select`, non-positive `steps` or `step_size`,
            mismatched batch sizes of `x` and `y`, or `x` outside `clamp`.
        RuntimeError: if the loss does not depend on `x` through autograd.
    """
    who = "pgd"
    x = check_batch(x, y, who)
    eps, norm = check_eps(eps, who), check_norm(norm, who)
    steps = check_positive_int(steps, "steps", who)
    step_size = 2.5 * eps / steps if step_size is None else check_step_size(step_size, who)
    clamp = check_clamp(clamp, x, who)
    if select not in ("last", "best"):
        raise ValueError(f"{who}: unknown select {select!r}; select must be 'last' or 'best'.")
    x = x.detach()
    if eps == 0:
        return x.clone()

    loss_fn = loss_fn or cross_entropy_per_sample
    source, name = (model, "model") if grad_model is None else (grad_model, "grad_model")
    objective = _attack_objective(source, loss_fn, y, who, name)
    model_objective = _attack_objective(model, loss_fn, y, who, "model")
    best = _BestIterate() if select == "best" else None

    with eval_mode(model, grad_model):
        start = x + uniform_in_ball(x, eps, norm, generator) if random_start else x
        x_adv = project(x, start, eps, norm, clamp)
        for _ in range(steps):
            grad, grad_loss = input_gradient(objective, x_adv, who)
            if best is not None:
                # Without a surrogate, the loss of this iterate under `model` came with its gradient.
                with torch.no_grad():
                    score = grad_loss if grad_model is None else model_objective(x_adv)
                best.offer(x_adv, score, who)
            x_adv = project(x, x_adv + step_size * ascent_direction(grad, norm), eps, norm, clamp)
        if best is not None:
            with torch.no_grad():
                best.offer(x_adv, model_objective(x_adv), who)
            assert best.x is not None
            x_adv = best.x
    return x_adv

