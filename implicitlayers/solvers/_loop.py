"""The one loop every iterative solver runs in.

The loop owns stopping, per-sample freezing, best-iterate tracking, NaN isolation, statistics
and the failure policy; a solver only says how to start (`init`) and how to take one step
(`step`). A solver works on flat `(B, D)` unknowns and a residual function `R: (B, D) -> (B, D)`
whose zero is the solution, plus a diagonal preconditioner `P` (`(D,)`, or `None` for ones) that
defines the fixed-point map `F(w) = w - P * R(w)` used by Picard and Anderson steps.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ._info import SolveInfo, apply_failure_policy

__all__ = ["ResidualFn", "IterativeState", "iterate", "stopping_measure"]

ResidualFn = Callable[[torch.Tensor], torch.Tensor]

_REL_EPS = 1e-8


class IterativeState(Protocol):
    """What the loop reads from a solver's state after every step: the newest iterate and its residual."""

    w: torch.Tensor
    r: torch.Tensor


def stopping_measure(r: torch.Tensor, w: torch.Tensor, stop: str) -> torch.Tensor:
    """Per-sample stopping measure: ‖R(w)‖ (`"abs"`) or ‖R(w)‖ / (‖w‖ + 1e-8) (`"rel"`); non-finite → inf."""
    res = torch.linalg.vector_norm(r, dim=1)
    if stop == "rel":
        res = res / (torch.linalg.vector_norm(w, dim=1) + _REL_EPS)
    return torch.nan_to_num(res, nan=float("inf"), posinf=float("inf"))


class _Counted:
    """Wraps the residual function to count batched evaluations."""

    __slots__ = ("fn", "count")

    def __init__(self, fn: ResidualFn) -> None:
        self.fn = fn
        self.count = 0

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.fn(w)


def iterate(
    solver: Any,
    residual_fn: ResidualFn,
    w0: torch.Tensor,
    *,
    precond: torch.Tensor | None = None,
    name: str = "solve",
) -> tuple[torch.Tensor, SolveInfo]:
    """Drive `R(w) = 0` from `w0` with `solver`, sample by sample.

    A sample freezes (its iterate stops changing) once its best residual is within `tol`, or once its
    residual turns non-finite (it is then failed and returned at its best finite iterate), so each
    sample's result does not depend on which other samples share the batch.

    Returns:
        The best iterate of each sample, `(B, D)`, and its `SolveInfo`.
    """
    fn = _Counted(residual_fn)
    check_every = solver.check_every or (8 if w0.is_cuda else 1)
    r0 = fn(w0)
    if r0.shape != w0.shape:
        raise ValueError(f"{name}: the residual has shape {tuple(r0.shape)} but the unknown has shape {tuple(w0.shape)}; they must match.")
    state = solver.init(fn, w0, r0, precond)
    best_res = stopping_measure(r0, w0, solver.stop)
    best_w = w0.clone() if not torch.is_grad_enabled() else w0
    frozen = (best_res <= solver.tol) | ~torch.isfinite(best_res)
    nstep = torch.zeros(w0.shape[0], dtype=torch.long, device=w0.device)
    trace = [best_res.clone()] if solver.trace else None
    for k in range(solver.max_iter):
        if k % check_every == 0 and bool(frozen.all()):
            break
        state = solver.step(fn, state, frozen)
        res = stopping_measure(state.r, state.w, solver.stop)
        improved = (res < best_res) & ~frozen
        best_w = torch.where(improved[:, None], state.w, best_w)
        best_res = torch.where(improved, res, best_res)
        nstep = nstep + (~frozen).long()
        frozen = frozen | (best_res <= solver.tol) | ~torch.isfinite(res)
        if trace is not None:
            trace.append(res.clone())
    info = SolveInfo(nstep=nstep, residual=best_res, converged=best_res <= solver.tol, nfe=fn.count, trace=trace)
    apply_failure_policy(info, name=name, tol=solver.tol, max_iter=solver.max_iter, on_failure=solver.on_failure)
    return best_w, info
