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

__all__ = ["is_own_solver", "checked_external_result"]


def is_own_solver(solver: object) -> bool:
    """Whether `solver` is one of the package's solvers (whose loop measures and reports every claim)."""
    from .scipy_root import ScipyRoot  # (scipy is optional: imported only when asked)

    return isinstance(solver, (IterativeSolver, ScipyRoot))


def checked_external_result(
    solver: Any, residual_fn: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor, w: object, info: object,
    name: str, scale_rows: torch.Tensor | None = None, hints: Mapping[str, str] | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """`(w, info)` of a user's solver, validated, with `converged` measured at `w` and the policy applied.

    Raises:
        TypeError / ValueError: the solver returned something other than a `(B, D)` tensor of the start's
            dtype and a `SolveInfo` for `B` samples.
    """
    who = f"{name}: the solver {type(solver).__name__}"
    if not isinstance(w, torch.Tensor) or w.shape != w0.shape:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{who} returned {got} for an unknown of shape {tuple(w0.shape)}; it must return the same shape.")
    if w.dtype != w0.dtype:
        raise TypeError(f"{who} returned {w.dtype} for a {w0.dtype} unknown; it must solve in the start's dtype.")
    if not isinstance(info, SolveInfo) or info.converged.shape != (w0.shape[0],):
        got = type(info).__name__ if not isinstance(info, SolveInfo) else f"a SolveInfo for {info.converged.shape[0]} samples"
        raise TypeError(f"{who} returned {got} as its info; it must return an il.SolveInfo for the {w0.shape[0]} samples.")
    tol, stop = getattr(solver, "tol", None), getattr(solver, "stop", "rel")
    if not bool(info.converged.any()):
        return w, info
    if not isinstance(tol, (int, float)) or isinstance(tol, bool):
        tol = float("inf")  # a solver without a tol: only a non-finite value or residual is a false claim
    with torch.no_grad():
        measure = stopping_measure(residual_fn(w), w, stop if stop in ("rel", "abs") else "rel", scale_rows)
    # (stopping_measure is inf for a non-finite residual; a non-finite value is never a solution either)
    false = info.converged & ~((measure <= tol) & (measure < float("inf")) & torch.isfinite(w).all(1))
    if not bool(false.any()):
        return w, info
    status = info.status if info.status is not None else torch.zeros_like(info.nstep)
    info = dataclasses.replace(
        info, converged=info.converged & ~false, residual=torch.where(false, measure.to(info.residual.dtype), info.residual),
        status=torch.where(false, torch.where(measure < float("inf"), int(Status.STALLED), int(Status.NONFINITE)), status),
    )
    # Reported by the solver's own policy (default "warn"), for the false claims only: its honest reports are its own.
    apply_failure_policy(dataclasses.replace(info, converged=~false), name=name, tol=float(tol),
                         max_iter=int(getattr(solver, "max_iter", 0) or 0), on_failure=getattr(solver, "on_failure", "warn"),
                         hint=f"{type(solver).__name__} reported these samples converged, but their residual at the returned "
                              "value is above tol", hints=hints)
    return w, info
