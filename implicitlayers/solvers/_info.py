"""Per-sample solve statistics and the failure policy shared by every solver."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..errors import ConvergenceError, ConvergenceWarning

__all__ = ["SolveInfo", "apply_failure_policy"]


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """What a batched solve did, per sample.

    Attributes:
        nstep: `(B,)` long tensor, iterations each sample ran before it froze.
        residual: `(B,)` tensor, the stopping measure (`"rel"` or `"abs"`) of the returned iterate.
        converged: `(B,)` bool tensor, `residual <= tol` and finite.
        nfe: number of batched function evaluations (each evaluates every sample once).
        trace: per-iteration `(B,)` residuals when the solver was built with `trace=True`, else `None`.
    """

    nstep: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    nfe: int
    trace: list[torch.Tensor] | None = None

    @property
    def all_converged(self) -> bool:
        """Whether every sample converged (one host sync)."""
        return bool(self.converged.all())

    def __repr__(self) -> str:
        res = self.residual.detach()
        return (
            f"SolveInfo(converged={int(self.converged.sum())}/{self.converged.numel()}, "
            f"max_residual={float(res.max()) if res.numel() else 0.0:.3g}, "
            f"max_nstep={int(self.nstep.max()) if self.nstep.numel() else 0}, nfe={self.nfe})"
        )


def apply_failure_policy(info: SolveInfo, *, name: str, tol: float, max_iter: int, on_failure: str, hint: str = "") -> None:
    """Warn, raise or stay silent when some samples did not converge.

    Args:
        info: the statistics of the finished solve.
        name: what was solved, for the message (a block, "fixed_point", "IFT backward of block 0", ...).
        tol: the tolerance that was asked for.
        max_iter: the iteration cap.
        on_failure: `"warn"`, `"raise"` or `"ignore"`.
        hint: what to try, appended to the message.
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
    advice = hint or (
        "increase max_iter, loosen tol, try another solver (Broyden/Anderson), damp the map, "
        "or make the map more contractive (e.g. spectral normalisation)"
    )
    message = (
        f"{name}: {n_failed}/{failed.numel()} samples did not converge within max_iter={max_iter} "
        f"(tol={tol:g}); worst residual {float(residual[worst]):.3g} at sample {worst}. Try: {advice}."
    )
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)
