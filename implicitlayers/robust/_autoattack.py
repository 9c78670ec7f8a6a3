"""AutoAttack and its components through `torchattacks` (the optional `robust` extra), made safe for DEQs.

`torchattacks` (MIT) runs APGD-CE, APGD-T, FAB-T and Square on any `nn.Module`; wrapped here are its
side effects, each observed on `il.DEQ` classifiers (`research/torchattacks.md`): it re-seeds the global
RNG (run inside `torch.random.fork_rng`), FAB fills parameters' `.grad` (parameters frozen meanwhile),
FAB casts to float32 (a float32 facade around a float64 model), APGD returns tensors that require grad
(detached), and a capped DEQ solve would warn thousands of times (`il.ConvergenceWarning` silenced).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConvergenceWarning
from ._common import Classifier, check_batch, check_clamp, check_eps, eval_mode, project

__all__ = ["COMPONENTS", "autoattack"]

COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
INSTALL = 'pip install "torch==$(python -c \'import torch; print(torch.__version__)\')" && pip install --no-deps "torchattacks==3.5.1"'


class _Facade(nn.Module):
    """`model` called in its own dtype, answering in float32 (FAB works in float32 only)."""

    def __init__(self, model: Classifier, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype  # an nn.Module model is registered, so modes and devices follow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _import_torchattacks():
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(
            "robust.autoattack needs the optional package torchattacks (the 'robust' extra). Install it without "
            f"letting pip replace your torch build: {INSTALL}"
        ) from err
    return torchattacks


def autoattack(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    attacks: Sequence[str] = COMPONENTS,
    n_classes: int = 10,
    steps: int = 10,
    n_queries: int = 5000,
    seed: int = 0,
) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) in ℓ∞ through `torchattacks`: each attack runs on what the previous left.

    The default is the 'standard' ensemble as `torchattacks.AutoAttack` builds it: APGD-CE, APGD-T (9
    target classes), FAB-T and Square (5000 queries), one restart each, with `steps=10` iterations for
    the first three where the original AutoAttack uses 100 (say so when you report it). Inputs live in
    `[0, 1]` (torchattacks hard-codes the box) and must be images `(B, C, H, W)`; flatten inside the model.

    Args:
        model: the classifier `model(x) -> logits`.
        x: clean inputs `(B, C, H, W)` in `[0, 1]`.
        y: integer labels `(B,)`.
        eps: ℓ∞ radius.
        attacks: a subset of `COMPONENTS`, in the order to run.
        n_classes: number of classes (APGD-T and FAB-T target the others).
        steps: iterations of APGD-CE, APGD-T and FAB-T.
        n_queries: queries of Square.
        seed: seed of every component (the global RNG is left as it was).

    Returns:
        The adversarial inputs, detached, in `x`'s dtype, inside the ε-ball and `[0, 1]`.

    Raises:
        ImportError: if `torchattacks` is not installed (with the safe install line).
    """
    who = "autoattack"
    x = check_batch(x, y, who)
    eps = check_eps(eps, who)
    check_clamp((0.0, 1.0), x, who)
    if x.dim() != 4:
        raise ValueError(f"{who}: torchattacks needs images (B, C, H, W), got shape {tuple(x.shape)}; reshape and flatten inside the model.")
    unknown = [a for a in attacks if a not in COMPONENTS]
    if unknown or not attacks:
        raise ValueError(f"{who}: attacks must be a non-empty subset of {COMPONENTS}, got {tuple(attacks)!r}.")
    ta = _import_torchattacks()
    x = x.detach()
    if eps == 0:
        return x.clone()
    facade = _Facade(model, x.dtype)
    build = {
        "apgd-ce": lambda: ta.APGD(facade, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed),
        "apgd-t": lambda: ta.APGDT(facade, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=n_classes, seed=seed),
        "fab-t": lambda: ta.FAB(facade, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                                n_classes=n_classes, seed=seed),
        "square": lambda: ta.Square(facade, norm="Linf", eps=eps, n_queries=n_queries, n_restarts=1, seed=seed),
    }
    params = [p for p in facade.parameters() if p.requires_grad]
    with eval_mode(facade), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for p in params:
            p.requires_grad_(False)
        try:
            components = [build[name]() for name in attacks]
            atk = components[0] if len(components) == 1 else ta.MultiAttack(components)
            x_adv = atk(x.float(), y).detach().to(x.dtype)
        finally:
            for p in params:
                p.requires_grad_(True)
    # float32 rounding may leave a hair outside the ball; project exactly.
    return project(x, x_adv, eps, "linf", (0.0, 1.0))
