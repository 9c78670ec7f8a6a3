"""Clean and robust accuracy over a data set given as `(X, Y)` tensors or an iterable of batches."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Sequence, Tuple, Union

import torch

from ._attacks import fgsm, pgd
from ._common import Classifier, check_batch, check_eps, check_logits, check_positive_int, eval_mode

__all__ = ["accuracy", "resolve_attack", "robust_accuracy"]

Attack = Callable[..., torch.Tensor]
Data = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Any]]

_ATTACKS: Dict[str, Attack] = {"fgsm": fgsm, "pgd": pgd}


def resolve_attack(attack: Union[str, Attack], who: str) -> Attack:
    """`"fgsm"`, `"pgd"`, or any callable `attack(model, x, y, eps, **kwargs) -> x_adv`."""
    if isinstance(attack, str):
        if attack not in _ATTACKS:
            raise ValueError(f"{who}: unknown attack {attack!r}; use 'fgsm', 'pgd' or a callable.")
        return _ATTACKS[attack]
    if not callable(attack):
        raise TypeError(f"{who}: attack must be 'fgsm', 'pgd' or a callable, got {type(attack).__name__}.")
    return attack


def _batches(data: Data, batch_size: int, who: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        X, Y = data
        check_batch(X, Y, who)
        for start in range(0, X.shape[0], batch_size):
            yield X[start : start + batch_size], Y[start : start + batch_size]
        return
    try:
        batches = iter(data)
    except TypeError:
        raise TypeError(
            f"{who}: data must be a pair (X, Y) of tensors or an iterable of (x, y) batches, "
            f"got {type(data).__name__}."
        ) from None
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{who}: batch {i} of data is not an (x, y) pair (got {type(batch).__name__}).")
        yield batch[0], batch[1]


def _correct(model: Classifier, x: torch.Tensor, y: torch.Tensor, who: str) -> int:
    with torch.no_grad():
        logits = check_logits(model(x), x.shape[0], who)
    if logits.dim() != 2:
        raise ValueError(f"{who}: accuracy needs logits of shape (B, classes), got {tuple(logits.shape)}.")
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(
            f"{who}: accuracy needs integer class labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}."
        )
    # A sample whose logits are not all finite (a NaN input, a diverged solve) is counted wrong: argmax of an
    # all-NaN row is 0, which would count it correct whenever its label is 0.
    finite = torch.isfinite(logits).all(dim=1)
    return int(((logits.argmax(dim=1) == y) & finite).sum())


def accuracy(model: Classifier, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of `X` that `model` classifies as `Y`, in eval mode and without gradients.

    Args:
        model: `model(x) -> logits` of shape `(B, classes)`.
        X: inputs `(N, ...)`.
        Y: integer labels `(N,)`.
        batch_size: samples per forward.
    """
    who = "accuracy"
    if not (isinstance(X, torch.Tensor) and isinstance(Y, torch.Tensor)):
        raise TypeError(f"{who}: X and Y must be tensors, got {type(X).__name__} and {type(Y).__name__}.")
    batch_size = check_positive_int(batch_size, "batch_size", who)
    return _evaluate(model, (X, Y), fgsm, [], batch_size, who, {})[0.0]


def robust_accuracy(
    model: Classifier,
    data: Data,
    *,
    attack: Union[str, Attack] = "pgd",
    eps_list: Sequence[float] = (0.05, 0.1, 0.2),
    batch_size: int = 256,
    **attack_kwargs: Any,
) -> Dict[float, float]:
    """Clean accuracy and accuracy under attack at each radius in `eps_list`.

    Each batch is loaded once and attacked at every radius, so `data` may be a one-shot iterable.

    Args:
        model: the classifier, `model(x) -> logits` of shape `(B, classes)`.
        data: `(X, Y)` tensors (split into batches of `batch_size`) or an iterable of `(x, y)` batches,
            such as a `torch.utils.data.DataLoader`; labels are integer class indices.
        attack: `"pgd"` (default), `"fgsm"`, or a callable `attack(model, x, y, eps, **attack_kwargs)`
            returning adversarial inputs.
        eps_list: attack radii, each `>= 0`.
        batch_size: samples per batch when `data` is `(X, Y)`.
        **attack_kwargs: passed to the attack, e.g. `norm="l2"`, `steps=20`, `grad_model=...`,
            `generator=...`.

    Returns:
        `{eps: accuracy}`: key `0.0` is the clean accuracy, then one entry per radius in `eps_list`.

    Example:
        ```python
        import torch
        import implicitlayers as il

        model = torch.nn.Sequential(torch.nn.Linear(64, 10))  # any classifier of inputs in [0, 1]
        X_test, y_test = torch.rand(32, 64), torch.randint(0, 10, (32,))
        acc = il.robust.robust_accuracy(model, (X_test, y_test), eps_list=[0.05, 0.1], steps=20)
        print(acc)  # {0.0: clean accuracy, 0.05: ..., 0.1: ...} (a trained model: e.g. 0.97, 0.81, 0.42)
        ```
    """
    who = "robust_accuracy"
    attack_fn = resolve_attack(attack, who)
    batch_size = check_positive_int(batch_size, "batch_size", who)
    radii = [check_eps(eps, who) for eps in eps_list]
    return _evaluate(model, data, attack_fn, radii, batch_size, who, attack_kwargs)


def _evaluate(
    model: Classifier,
    data: Data,
    attack_fn: Attack,
    radii: Sequence[float],
    batch_size: int,
    who: str,
    attack_kwargs: Dict[str, Any],
) -> Dict[float, float]:
    attacked = [eps for eps in dict.fromkeys(radii) if eps > 0]
    correct = dict.fromkeys([0.0] + attacked, 0)
    total = 0
    with eval_mode(model):
        for x, y in _batches(data, batch_size, who):
            check_batch(x, y, who)
            total += x.shape[0]
            correct[0.0] += _correct(model, x, y, who)
            for eps in attacked:
                x_adv = attack_fn(model, x, y, eps, **attack_kwargs)
                correct[eps] += _correct(model, x_adv, y, who)
    if total == 0:
        raise ValueError(f"{who}: data has no samples; accuracy is undefined.")
    return {eps: count / total for eps, count in correct.items()}
