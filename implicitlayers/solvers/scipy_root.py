"""A reference root finder: `scipy.optimize.root`, one sample at a time in float64 on the CPU."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import torch

from ._config import SolverConfig
from ._info import SolveInfo, apply_failure_policy
from ._loop import ResidualFn, stopping_measure

__all__ = ["ScipyRoot"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScipyRoot(SolverConfig):
    """`scipy.optimize.root` per sample (slow; for checking the fast solvers).

    Each sample is solved alone in float64 on the CPU with the rest of the batch held at its
    start, which is exact because samples never interact. `tol` is applied to the result with
    the same `stop` measure as the other solvers; scipy runs to its own tight tolerance.

    Args:
        method: any `scipy.optimize.root` method (`"hybr"`, `"lm"`, `"krylov"`, ...).
    """

    method: str = "hybr"

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
        """Solve `R(w) = 0` for flat `(B, D)` unknowns, one sample at a time (`hints`: see `apply_failure_policy`;
        `scale_rows`: the columns of `w` that the relative measure divides by, see `iterate`)."""
        import scipy.optimize  # imported here: it is slow to import and only this reference solver needs it

        nfe = 0
        base = w0.detach()
        out = base.clone()
        nstep = torch.zeros(w0.shape[0], dtype=torch.long, device=w0.device)
        for b in range(w0.shape[0]):

            def residual_of_sample(x: np.ndarray, b: int = b) -> np.ndarray:
                nonlocal nfe
                nfe += 1
                batch = out.clone()
                batch[b] = torch.as_tensor(x, dtype=w0.dtype, device=w0.device)
                with torch.no_grad():
                    return residual_fn(batch)[b].detach().cpu().double().numpy()

            result = scipy.optimize.root(residual_of_sample, base[b].cpu().double().numpy(), method=self.method,
                                         options=self._options())
            out[b] = torch.as_tensor(result.x, dtype=w0.dtype, device=w0.device)
            nstep[b] = int(getattr(result, "nfev", 0) or getattr(result, "nit", 0) or 0)
        with torch.no_grad():
            r = residual_fn(out)
        nfe += 1
        res = stopping_measure(r, out, self.stop, scale_rows)
        info = SolveInfo(nstep=nstep, residual=res, converged=res <= self.tol, nfe=nfe)
        apply_failure_policy(info, name=name, tol=self.tol, max_iter=self.max_iter, on_failure=self.on_failure,
                             hint="try another scipy method, e.g. 'lm' or 'krylov'", hints=hints)
        return out, info

    def _options(self) -> dict:
        if self.method in ("hybr",):
            return {"maxfev": self.max_iter * 100, "xtol": 1e-12}
        if self.method in ("lm",):
            return {"maxiter": self.max_iter * 100, "xtol": 1e-12, "ftol": 1e-12}
        return {"maxiter": self.max_iter * 100}
