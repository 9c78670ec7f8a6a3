"""Accuracy and prediction entropy at every solver state, clean or under attack."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._attacks import pgd
from ._common import Classifier, check_eps, check_positive_int, eval_mode
from ._evaluate import Attack, Data, _batches, resolve_attack
from ._trajectory import DEQClassifier, _check_steps, prediction_entropy

__all__ = ["StateReport", "evaluate_states"]


@dataclasses.dataclass(frozen=True)
class StateReport:
    """Per-state results; index `t` is the solver's state after `t` steps (`0`: the start).

    Attributes:
        accuracy: fraction classified correctly by `head(z_t)`.
        entropy: mean prediction entropy of `head(z_t)` (nats).
    """

    accuracy: list[float]
    entropy: list[float]


def evaluate_states(
    model: DEQClassifier,
    data: Data,
    *,
    steps: int,
    eps: float = 0.0,
    attack: str | Attack = pgd,
    grad_model: Classifier | None = None,
    batch_size: int = 256,
    **attack_kwargs: Any,
) -> StateReport:
    """Accuracy and entropy of the prediction `head(z_t)` at each state `t = 0, …, steps` of the solve.

    With `eps > 0` each batch is first attacked (`attack(model, x, y, eps, grad_model=grad_model,
    **attack_kwargs)`, default PGD), and the states are those of the solve on the attacked input. The
    attack gradient is the model's own (its DEQ's backward mode, e.g. the exact IFT) unless `grad_model`
    supplies another: `IntermediateState(model, state=T, unroll=5)` (a phantom gradient) or
    `IntermediateState(model, state=i, unroll=K)` (unrolling an intermediate state).

    Args:
        model: the `DEQClassifier`.
        data: `(X, Y)` tensors or an iterable of `(x, y)` batches.
        steps: solver steps `T` (every sample takes all of them).
        eps: attack radius; `0` evaluates clean inputs.
        attack: `"pgd"`, `"fgsm"` or a callable like `robust.pgd`.
        grad_model: surrogate that supplies the attack's gradient.
        batch_size: samples per batch when `data` is `(X, Y)`.
        **attack_kwargs: passed to the attack (`step_size`, `generator`, ...); the attack's own step
            count is `attack_steps` here, since `steps` is the solver's.

    Returns:
        A [`StateReport`][implicitlayers.robust.StateReport] with `steps + 1` entries per list.
    """
    who = "evaluate_states"
    steps = _check_steps(steps, who)
    eps = check_eps(eps, who)
    attack_fn = resolve_attack(attack, who)
    batch_size = check_positive_int(batch_size, "batch_size", who)
    if "attack_steps" in attack_kwargs:
        attack_kwargs["steps"] = attack_kwargs.pop("attack_steps")
    if grad_model is not None:
        attack_kwargs["grad_model"] = grad_model
    correct = [0] * (steps + 1)
    entropy = [0.0] * (steps + 1)
    total = 0
    with eval_mode(model):
        for x, y in _batches(data, batch_size, who):
            if eps > 0:
                x = attack_fn(model, x, y, eps, **attack_kwargs)
            for t, z in enumerate(model.states(x, steps)):
                with torch.no_grad():
                    logits = model.head(z)
                correct[t] += int((logits.argmax(1) == y).sum())
                entropy[t] += float(prediction_entropy(logits).sum())
            total += x.shape[0]
    if total == 0:
        raise ValueError(f"{who}: data has no samples.")
    return StateReport(accuracy=[c / total for c in correct], entropy=[e / total for e in entropy])
