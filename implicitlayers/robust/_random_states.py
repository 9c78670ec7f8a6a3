"""Random intermediate states (Yang et al., ICML 2023, Sec. 3.3): train on where the solve is, not where it ends.

Under adversarial training a DEQ's intermediate states stay under-regulated (their predictions have high
entropy). The remedy: at every training forward, draw a solver budget `T ~ U{1, …, max_steps}`, run `T`
steps without gradient, then `k` damped steps `z ← (1 − λ) z + λ f(z)` with gradient, and put the loss
on that state. In this library the damped steps from the solver's output are exactly the
[`il.Phantom`][implicitlayers.Phantom] backward mode (for a DEQ, `F(z) = z − R(z) = f(z)`), so the
training mode is: a capped copy of the layer's solver plus `Phantom(k, λ)`, applied (through
`intercept_solves`) to every `il.ImplicitLayer` solve of one training-mode call. Nothing here solves.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from ..backward import Phantom
from ..layer import ImplicitLayer, intercept_solves
from ._trajectory import _check_damping

__all__ = ["RandomIntermediateStates", "random_intermediate_states"]


class RandomIntermediateStates:
    """The handle of [`random_intermediate_states`][implicitlayers.robust.random_intermediate_states].

    A context manager (the mode ends on exit) with `remove()` to end it by hand.

    Attributes:
        budgets: the budget `T` drawn for each training-mode call so far, in order.
    """

    def __init__(self, model: nn.Module, layers: list[ImplicitLayer], max_steps: int, k: int, damping: float,
                 generator: torch.Generator | None) -> None:
        self.layers, self.max_steps, self.generator = layers, max_steps, generator
        self.phantom = Phantom(k=k, damping=damping)
        self.budgets: list[int] = []
        self._saved: contextlib.ExitStack | None = None
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or self._saved is not None:
            return  # evaluation, attacks in eval mode and nested calls see the layers as they are
        budget = int(torch.randint(1, self.max_steps + 1, (), generator=self.generator))
        self.budgets.append(budget)
        # For this call only, and in this thread only: the layers themselves are never modified.
        # A capped solve stops short of the tolerance by design: that is not a failure to report.
        self._saved = contextlib.ExitStack()
        self._saved.enter_context(
            intercept_solves(solver=lambda s: s.replace(max_iter=budget, on_failure="ignore"), backward=self.phantom)
        )

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._saved is None:
            return
        self._saved.close()
        self._saved = None

    def remove(self) -> None:
        """End the mode: later calls solve and differentiate as the layers are configured."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def random_intermediate_states(
    model: nn.Module,
    *,
    max_steps: int = 8,
    k: int = 5,
    damping: float = 0.5,
    generator: torch.Generator | None = None,
) -> RandomIntermediateStates:
    """Train `model` on random intermediate solver states instead of its equilibria.

    While the mode is on, every call of `model` in training mode with gradient recording on draws
    `T ~ U{1, …, max_steps}` and, in every `il.ImplicitLayer` inside `model` (an `il.DEQ`, `il.LyaDEQ`,
    or your own), runs the layer's solver with `max_iter=T` (no warning when it stops short) and
    differentiates by `il.Phantom(k, damping)`: `k` damped steps `z ← (1 − λ) z + λ f(z)` from the
    `T`-step state, with gradient. Calls in eval mode (e.g. the inner attack of
    [`trades_loss`][implicitlayers.robust.trades_loss]) or without gradient are untouched, as is the model
    once the mode ends. Combine it with either robust loss:

    ```python
    import torch
    import implicitlayers as il
    from implicitlayers import robust

    mix = torch.nn.Linear(16, 16, bias=False)
    torch.nn.init.normal_(mix.weight, std=0.1)
    deq = il.DEQ(lambda z, u: torch.tanh(mix(z) + u))
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), deq, torch.nn.Linear(16, 10)).train()
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    with robust.random_intermediate_states(model, max_steps=8, k=5, damping=0.5):
        loss = robust.trades_loss(model, x, y, eps=0.1)   # or robust.adversarial_loss(...)
        loss.backward()
    ```

    Args:
        model: an `nn.Module` containing at least one `il.ImplicitLayer` (the hook is on `model` itself,
            so one budget serves every implicit layer of one call).
        max_steps: the largest budget `T` (the paper's `F_THRES`, 8 for its MDEQ).
        k: damped steps with gradient (the paper's 5).
        damping: `λ ∈ (0, 1]` (the paper's 0.5).
        generator: random generator for the budgets, for reproducible training.

    Returns:
        A handle: a context manager, with `remove()` and the drawn `budgets`.
    """
    who = "random_intermediate_states"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module (the mode hooks its calls), got {type(model).__name__}.")
    for name, value in (("max_steps", max_steps), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}.")
    damping = _check_damping(damping, who)
    layers = [m for m in model.modules() if isinstance(m, ImplicitLayer)]
    if not layers:
        raise ValueError(f"{who}: {type(model).__name__} contains no il.ImplicitLayer (an il.DEQ, il.LyaDEQ, ...).")
    for layer in layers:
        if not callable(getattr(layer.solver, "replace", None)):
            raise TypeError(f"{who}: the layer's solver {layer.solver!r} cannot be capped (it has no replace(max_iter=...)).")
    return RandomIntermediateStates(model, layers, max_steps, k, damping, generator)
