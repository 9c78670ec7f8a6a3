"""The base class of the iterative solvers: shared options plus `solve`, which runs the loop."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import torch

from ._config import SolverConfig
from ._info import SolveInfo
from ._linear import linear_system
from ._loop import iterate
from ._protocol import IterativeState, MatVec, ResidualFn

__all__ = ["IterativeSolver"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSolver(SolverConfig):
    """The base of a solver that implements `init`/`step` (the `IterativeMethod` protocol).

    `init(fn, w, r, precond) -> state` and `step(fn, state, frozen) -> state`: the state exposes the
    newest iterate `w` and its residual `r` (an `IterativeState`); `frozen` is the `(B,)` mask of samples
    whose iterate must not change. Everything else (stopping, statistics, failure policy) is the loop's.
    `release(state)` runs once the solve has ended, to hand buffers back (see `_workspace`). The class
    supplies `solve` (a `Solver`) and `solve_linear` (a `LinearSolver`).
    """

    # Advice by failure cause for a linear solve's failure message (`apply_failure_policy`); None: the default.
    linear_hints: ClassVar[Mapping[str, str] | None] = None

    def init(self, fn: ResidualFn, w: torch.Tensor, r: torch.Tensor, precond: torch.Tensor | None) -> IterativeState:
        """The state at the start `w` with residual `r = fn(w)` (each solver defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define init")

    def step(self, fn: ResidualFn, state: IterativeState, frozen: torch.Tensor | None) -> IterativeState:
        """One step; `frozen` (`(B,)` or `None`) marks the samples that must not change (each solver defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define step")

    def release(self, state) -> None:
        """Hand the state's reusable buffers back once the solve has ended (nothing to do by default)."""

    def solve(
        self,
        residual_fn: ResidualFn,
        w0: torch.Tensor,
        *,
        precond: torch.Tensor | None = None,
        name: str = "solve",
        hints: Mapping[str, str] | None = None,
        scale_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `R(w) = 0` for flat `(B, D)` unknowns; see `implicitlayers.solvers._loop.iterate`.

        `hints` is advice by failure cause for the failure message (see `apply_failure_policy`);
        `scale_rows` restricts the relative measure's norm of `w` to those columns (empty: absolute).
        """
        return iterate(self, residual_fn, w0, precond=precond, name=name, hints=hints, scale_rows=scale_rows)

    def solve_linear(
        self,
        matvec: MatVec,
        b: torch.Tensor,
        x0: torch.Tensor | None = None,
        *,
        precond: torch.Tensor | None = None,
        name: str = "linear solve",
        hints: Mapping[str, str] | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample as the root of `R(x) = A x − b`, on the shared loop.

        The relative stopping measure is ‖A x − b‖ / ‖b‖ (`stop="rel"`). Picard and Anderson iterate
        `x ← x − P ⊙ (A x − b)`, which for the IFT adjoint of a fixed point (`A = I − Jᵀ`) is the classic
        `x ← b + Jᵀ x` (the Neumann series, see `il.linear.Neumann`).
        """
        system = linear_system(self, matvec, b, x0, precond, name)
        return iterate(self, system.residual, system.x0, precond=precond, name=name, hints=hints or self.linear_hints,
                       scale=system.scale, r0=system.r0)
