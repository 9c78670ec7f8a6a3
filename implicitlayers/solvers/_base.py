"""The base class of the iterative solvers: shared options plus `solve`, which runs the loop."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch

from ._config import SolverConfig
from ._info import SolveInfo
from ._loop import ResidualFn, iterate

__all__ = ["IterativeSolver"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSolver(SolverConfig):
    """A solver that implements `init(fn, w, r, precond) -> state` and `step(fn, state, frozen) -> state`.

    The state exposes the newest iterate `w` and its residual `r`; `frozen` is the `(B,)` mask of samples
    whose iterate must not change. Everything else (stopping, statistics, failure policy) is the loop's.
    `release(state)` runs once the solve has ended, to hand buffers back (see `_workspace`).
    """

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
        matvec: Callable[[torch.Tensor], torch.Tensor],
        b: torch.Tensor,
        x0: torch.Tensor | None = None,
        *,
        precond: torch.Tensor | None = None,
        name: str = "linear solve",
        hints: Mapping[str, str] | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample as the root of `R(x) = A x − b`.

        Picard and Anderson then iterate `x ← x − P ⊙ (A x − b)`, which for the IFT adjoint of a
        fixed point (`A = I − Jᵀ`) is the classic `x ← b + Jᵀ x`.
        """
        start = torch.zeros_like(b) if x0 is None else x0

        def residual(x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
            return torch.sub(matvec(x), b, out=into)

        residual.writes_into = True  # type: ignore[attr-defined]
        return self.solve(residual, start, precond=precond, name=name, hints=hints)
