"""Checking what a solver that is not this package's own returns.

The package's solvers run on the shared loop (`_loop.iterate`), which measures every claim it makes and
applies the failure policy. A user's solver (anything with a `solve` method, see `_protocol.Solver`) is
trusted with neither: its output is validated, and its convergence claims are measured once at the value
it returns (one residual evaluation); a false claim is corrected and reported by the solver's
`on_failure` policy (default "warn"). Reporting its own honest failures stays the solver's job.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from ._base import IterativeSolver
from ._info import SolveInfo, Status, apply_failure_policy
from ._loop import stopping_measure

__all__ = ["is_own_solver", "checked_external_result", "validated", "without_false_claims", "solver_tol"]


def is_own_solver(solver: object) -> bool:
    """Whether `solver` is one of the package's solvers (whose loop measures and reports every claim)."""
    from .scipy_root import ScipyRoot  # (scipy is optional: imported only when asked)

    return isinstance(solver, (IterativeSolver, ScipyRoot))


def solver_tol(solver: object) -> float:
    """A solver's numeric `tol`, or `inf` when it has none (then only a non-finite result is a false claim)."""
    tol = getattr(solver, "tol", None)
    return float(tol) if isinstance(tol, (int, float)) and not isinstance(tol, bool) else float("inf")


def validated(who: str, w: object, like: torch.Tensor, info: object) -> tuple[torch.Tensor, SolveInfo]:
    """`(w, info)` checked to be a tensor shaped and typed like `like` and a `SolveInfo` for its samples.

    Raises:
        ValueError: `w` is not a tensor of `like`'s shape. TypeError: of another dtype, or `info` is not a
            `SolveInfo` for the batch.
    """
    if not isinstance(w, torch.Tensor) or w.shape != like.shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{who} returned {got} for an unknown of shape {tuple(like.shape)}; it must return the same shape.")
    if w.dtype != like.dtype:
        raise TypeError(f"{who} returned {w.dtype} for a {like.dtype} unknown; it must solve in that dtype.")
    if not isinstance(info, SolveInfo) or info.converged.shape != (like.shape[0],):
        got = type(info).__name__ if not isinstance(info, SolveInfo) else f"a SolveInfo for {info.converged.shape[0]} samples"
        raise TypeError(f"{who} returned {got} as its info; it must return an il.SolveInfo for the {like.shape[0]} samples.")
    return w, info


def without_false_claims(info: SolveInfo, measure: torch.Tensor, tol: float,
                         valid: torch.Tensor | None = None) -> tuple[SolveInfo, torch.Tensor]:
    """`info` with each claimed convergence whose measured stopping measure is not within `tol` (or not
    finite, or not `valid`) withdrawn: `STALLED` (`NONFINITE` for a non-finite measure), with the measure as
    its residual. Returns the new info and the mask of withdrawn claims."""
    measure = torch.nan_to_num(measure, nan=float("inf"))
    within = (measure <= tol) & (measure < float("inf"))
    false = info.converged & ~(within if valid is None else within & valid)
    if not bool(false.any()):
        return info, false
    status = info.status if info.status is not None else torch.zeros_like(info.nstep)
    return dataclasses.replace(
        info, converged=info.converged & ~false, residual=torch.where(false, measure.to(info.residual.dtype), info.residual),
        status=torch.where(false, torch.where(measure < float("inf"), int(Status.STALLED), int(Status.NONFINITE)), status),
    ), false


def checked_external_result(
    solver: Any, residual_fn: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor, w: object, info: object,
    name: str, scale_rows: torch.Tensor | None = None, hints: Mapping[str, str] | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """`(w, info)` of a user's solver, `validated`, with `converged` measured at `w`; false claims reported.

    Raises:
        TypeError / ValueError: see `validated`.
    """
    w, info = validated(f"{name}: the solver {type(solver).__name__}", w, w0, info)
    if not bool(info.converged.any()):
        return w, info
    stop = getattr(solver, "stop", "rel")
    with torch.no_grad():
        measure = stopping_measure(residual_fn(w), w, stop if stop in ("rel", "abs") else "rel", scale_rows)
    tol = solver_tol(solver)
    info, false = without_false_claims(info, measure, tol, valid=torch.isfinite(w).all(1))
    if bool(false.any()):
        # Reported by the solver's own policy (default "warn"), for the false claims only: its honest reports are its own.
        apply_failure_policy(dataclasses.replace(info, converged=~false), name=name, tol=tol,
                             max_iter=int(getattr(solver, "max_iter", 0) or 0), on_failure=getattr(solver, "on_failure", "warn"),
                             hint=f"{type(solver).__name__} reported these samples converged, but their residual at the "
                                  "returned value is above tol", hints=hints)
    return w, info
