"""Damped Picard iteration: w ← w − damping · P ⊙ R(w)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from ._base import IterativeSolver
from ._config import check_real

__all__ = ["FixedPointIteration"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedPointIteration(IterativeSolver):
    """Damped fixed-point (Picard) iteration.

    For `il.fixed_point(f, z0)` one step is `z ← z + damping · (f(z) − z)`.

    Args:
        damping: step fraction in (0, 1]; smaller is slower but more stable.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real(self, "damping", "a number in (0, 1]", lambda v: 0 < v <= 1)

    def init(self, fn, w, r, precond):
        return SimpleNamespace(w=w, r=r, precond=precond)

    def step(self, fn, state, frozen):
        step = state.r if state.precond is None else state.r * state.precond
        if frozen is None:
            w = torch.sub(state.w, step, alpha=self.damping)
        elif torch.is_grad_enabled():
            w = torch.where(frozen[:, None], state.w, state.w - self.damping * step)
        else:
            # A zero step size holds a frozen sample exactly, and is far cheaper than a row-masked
            # `where` on the CPU. (A failed sample's NaN step may turn its iterate NaN; it is frozen anyway.)
            size = (~frozen).to(step.dtype).mul_(self.damping)
            w = torch.addcmul(state.w, step, size[:, None], value=-1)
        state.w, state.r = w, fn(w)
        return state
