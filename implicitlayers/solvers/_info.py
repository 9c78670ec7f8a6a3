"""Per-sample solve statistics, why a sample failed, and the failure policy shared by every solver."""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import warnings
from typing import Mapping

import torch

from ..errors import ConvergenceError, ConvergenceWarning

__all__ = ["SolveInfo", "Status", "apply_failure_policy", "user_stacklevel"]


class Status(enum.IntEnum):
    """Why a sample's solve ended, as stored in `SolveInfo.status` (most severe last)."""

    CONVERGED = 0
    """Its stopping measure reached `tol`."""
    MAX_ITER = 1
    """It hit the iteration cap while its residual was still decreasing."""
    STALLED = 2
    """Its residual stopped decreasing: no new lowest residual in the second half of its steps."""
    DIVERGED = 3
    """Its residual norm grew a hundred-million-fold over its start, and the loop stopped it."""
    NONFINITE = 4
    """Its residual (or the iterate) turned NaN or infinite; it is returned at its best finite iterate."""
    NOT_OPTIMAL = 5
    """Stationary, but not an optimum: the objective of a `Minimize` (`Maximize`) still decreases
    (increases) on both sides of it along a direction (a maximum or a saddle point)."""


_CAUSE_KEYS = {Status.MAX_ITER: "max_iter", Status.STALLED: "stalled", Status.DIVERGED: "diverged",
               Status.NONFINITE: "nonfinite", Status.NOT_OPTIMAL: "not_optimal"}

_ADVICE = {
    Status.MAX_ITER: "increase max_iter, loosen tol, try another solver (Broyden/Anderson), damp the map, "
                     "or make the map more contractive (e.g. spectral normalisation)",
    Status.STALLED: "more iterations will not help: loosen tol (it may lie below what this dtype resolves), "
                    "damp the map, or try another solver",
    Status.DIVERGED: "the map expands here: damp it (damping < 1), make it contractive (e.g. spectral "
                     "normalisation), or start closer to the solution",
    Status.NOT_OPTIMAL: "start elsewhere, or use il.FixedPointIteration (a descent method on the gradient map), "
                        "which is not drawn to maxima or saddle points as Anderson and Broyden can be",
    Status.NONFINITE: "the map returned NaN/inf: check its inputs and parameters (torch.autograd.detect_anomaly "
                      "finds the operation), and damp the map so that iterates stay in its domain",
}


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """What a batched solve did, per sample.

    Attributes:
        nstep: `(B,)` long tensor, iterations each sample ran before it froze (for a sample that turned
            non-finite or diverged: the step at which it did).
        residual: `(B,)` tensor, the stopping measure (`"rel"` or `"abs"`) of the returned iterate.
        converged: `(B,)` bool tensor, `residual <= tol` and finite.
        nfe: number of batched function evaluations (each evaluates every sample once).
        trace: per-iteration `(B,)` residuals when the solver was built with `trace=True`, else `None`.
        status: `(B,)` long tensor of [`Status`][implicitlayers.solvers.Status] codes, why each sample's
            solve ended (derived from `converged` and `residual` when a solver does not give it).
    """

    nstep: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    nfe: int
    trace: list[torch.Tensor] | None = None
    status: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.status is None:
            finite = torch.isfinite(self.residual)
            status = torch.where(finite, int(Status.MAX_ITER), int(Status.NONFINITE))
            object.__setattr__(self, "status", torch.where(self.converged, int(Status.CONVERGED), status))

    @property
    def all_converged(self) -> bool:
        """Whether every sample converged (one host sync)."""
        return bool(self.converged.all())

    @property
    def causes(self) -> list[str]:
        """Each sample's `Status` as a lower-case name (`"converged"`, `"max_iter"`, `"stalled"`, ...)."""
        return [Status(int(code)).name.lower() for code in self.status.tolist()]

    def __repr__(self) -> str:
        res = self.residual.detach()
        return (
            f"SolveInfo(converged={int(self.converged.sum())}/{self.converged.numel()}, "
            f"max_residual={float(res.max()) if res.numel() else 0.0:.3g}, "
            f"max_nstep={int(self.nstep.max()) if self.nstep.numel() else 0}, nfe={self.nfe})"
        )


def user_stacklevel() -> int:
    """The `stacklevel` that makes a warning point at the first caller outside this package and torch.

    Walks the stack from the caller of this function; a warning issued there with this level names
    the user's line (their `il.fixed_point(...)` or `layer(x)` call) instead of library internals.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


# This package's directory and torch's (a layer is called through `nn.Module.__call__`).
_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__.rpartition(".")[0]], torch))


def _cause_summary(status: torch.Tensor, nstep: torch.Tensor, failed: torch.Tensor) -> list[str]:
    parts = []
    for code, what in ((Status.NONFINITE, "turned non-finite"), (Status.DIVERGED, "diverged"),
                       (Status.NOT_OPTIMAL, "stopped at a stationary point that is not an optimum"),
                       (Status.STALLED, "stalled"), (Status.MAX_ITER, "hit the iteration cap while still improving")):
        rows = ((status == int(code)) & failed).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        first = int(rows[0])
        where = f"sample {first} at step {int(nstep[first])}" if code in (Status.NONFINITE, Status.DIVERGED) else \
            f"e.g. sample {first}"
        parts.append(f"{rows.numel()} {what} ({where})")
    return parts


def apply_failure_policy(
    info: SolveInfo,
    *,
    name: str,
    tol: float,
    max_iter: int,
    on_failure: str,
    hint: str = "",
    hints: Mapping[str, str] | None = None,
) -> None:
    """Warn, raise or stay silent when some samples did not converge.

    The message gives the facts (how many failed, the worst residual and its sample), the cause of
    each failure (`SolveInfo.status`: non-finite at step k, diverged, stalled, or the iteration cap)
    and advice that fits the causes present.

    Args:
        info: the statistics of the finished solve.
        name: what was solved, for the message (a block, "fixed_point", "IFT backward of block 0", ...).
        tol: the tolerance that was asked for.
        max_iter: the iteration cap.
        on_failure: `"warn"`, `"raise"` or `"ignore"`.
        hint: what to try, whatever the cause (replaces the built-in advice).
        hints: advice by cause, `"max_iter"`, `"stalled"`, `"diverged"` or `"nonfinite"` (e.g. a block with a
            `Minimize` advises a smaller step size for `"diverged"`); takes precedence over `hint`.
    """
    if on_failure == "ignore" or info.converged.numel() == 0:
        return
    failed = ~info.converged
    if not bool(failed.any()):
        return
    residual = info.residual.detach()
    res = torch.where(torch.isfinite(residual), residual, torch.full_like(residual, float("inf")))
    worst = int(torch.argmax(res))
    n_failed = int(failed.sum())
    present = sorted({int(code) for code in info.status[failed].tolist()}, reverse=True)
    hints = hints or {}
    advice = "; ".join(dict.fromkeys(hints.get(_CAUSE_KEYS[Status(code)]) or hint or _ADVICE[Status(code)]
                                     for code in present))
    facts = f"worst residual {float(residual[worst]):.3g} at sample {worst}"
    if present == [int(Status.MAX_ITER)]:  # the plain case keeps its plain message
        message = (f"{name}: {n_failed}/{failed.numel()} samples did not converge within max_iter={max_iter} "
                   f"(tol={tol:g}); {facts}. Try: {advice}.")
    else:
        causes = ", ".join(_cause_summary(info.status, info.nstep, failed))
        message = (f"{name}: {n_failed}/{failed.numel()} samples did not converge (tol={tol:g}, max_iter={max_iter}): "
                   f"{causes}; {facts}. Try: {advice}.")
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=user_stacklevel())
