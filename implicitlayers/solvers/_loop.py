"""The one loop every iterative solver runs in.

The loop owns stopping, per-sample freezing, best-iterate tracking, NaN isolation, statistics
and the failure policy; a solver only says how to start (`init`) and how to take one step
(`step`). A solver works on flat `(B, D)` unknowns and a residual function `R: (B, D) -> (B, D)`
whose zero is the solution, plus a diagonal preconditioner `P` (`(D,)`, or `None` for ones) that
defines the fixed-point map `F(w) = w - P * R(w)` used by Picard and Anderson steps. A residual
function may offer to write into a buffer the solver names (see `_Counted`).

Speed notes. Each iteration costs one evaluation plus a handful of `(B,)`-sized kernels here; the
only host synchronisation is the "is every sample frozen?" test every `check_every` steps (every
step on the CPU, where a sync is free, so the loop also uses the host there to skip work). When the
loop knows that no sample is frozen it passes `frozen=None`, so solvers skip their masking, and when
every sample improved it keeps a reference to the new iterate instead of copying it (solvers never
write into an iterate they returned).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ._info import SolveInfo, apply_failure_policy

__all__ = ["ResidualFn", "IterativeState", "iterate", "stopping_measure"]

ResidualFn = Callable[[torch.Tensor], torch.Tensor]

_REL_EPS = 1e-8


class IterativeState(Protocol):
    """What the loop reads from a solver's state after every step: the newest iterate and its residual
    (and, optionally, `r_norm`, the per-sample ‖R(w)‖ when the solver has it for free, else `None`).

    `step(fn, state, frozen)` receives `frozen`, the `(B,)` mask of samples whose iterate must not
    change, or `None` when the loop knows that no sample is frozen. A step must return a new tensor
    as `state.w` (never one it will later write into), because the loop may keep it as the best iterate.
    """

    w: torch.Tensor
    r: torch.Tensor


def _measure(r: torch.Tensor, w: torch.Tensor, rel: bool, r_norm: torch.Tensor | None = None) -> torch.Tensor:
    """‖R(w)‖ or ‖R(w)‖ / (‖w‖ + 1e-8) per sample (`r_norm`: ‖R(w)‖ if known); NaN stays NaN."""
    res = torch.linalg.vector_norm(r, dim=1) if r_norm is None else r_norm
    if rel:
        res = res / torch.linalg.vector_norm(w, dim=1).add(_REL_EPS)
    return res


def stopping_measure(r: torch.Tensor, w: torch.Tensor, stop: str) -> torch.Tensor:
    """Per-sample stopping measure: ‖R(w)‖ (`"abs"`) or ‖R(w)‖ / (‖w‖ + 1e-8) (`"rel"`); non-finite → inf."""
    return torch.nan_to_num(_measure(r, w, stop == "rel"), nan=float("inf"), posinf=float("inf"))


class _Counted:
    """Wraps the residual function to count batched evaluations, and to hand it an output buffer.

    A residual function whose attribute `writes_into` is true takes a second argument, a `(B, D)`
    buffer, writes `R(w)` there and returns it (Anderson passes the history slot the residual is
    headed for, which spares a copy per step). Any other function is called with `w` alone.
    """

    __slots__ = ("fn", "count", "writes_into")

    def __init__(self, fn: ResidualFn) -> None:
        self.fn = fn
        self.count = 0
        self.writes_into = bool(getattr(fn, "writes_into", False))

    def __call__(self, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.count += 1
        return self.fn(w, out) if out is not None and self.writes_into else self.fn(w)


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
    # With a check every step (the CPU default) host-side tests are free, so use them to skip masks.
    eager = check_every == 1
    tol, rel, batch = solver.tol, solver.stop == "rel", w0.shape[0]
    r0 = fn(w0)
    if r0.shape != w0.shape:
        raise ValueError(f"{name}: the residual has shape {tuple(r0.shape)} but the unknown has shape {tuple(w0.shape)}; they must match.")
    state = solver.init(fn, w0, r0, precond)
    best_res = _measure(r0, w0, rel)
    frozen = (best_res <= tol) | ~torch.isfinite(best_res)
    # best_res holds no NaN from here on, so `res < best_res` is False for a NaN residual.
    best_res = torch.nan_to_num(best_res, nan=float("inf"))
    best_w = w0
    nstep = torch.zeros(batch, dtype=torch.long, device=w0.device)
    unmasked_steps = 0  # steps in which the host knew that every sample ran (added to nstep at the end)
    trace = [best_res.clone()] if solver.trace else None
    # 0-dim tensors: comparing with a Python float would wrap it into a new tensor every step.
    tol_t, inf_t = best_res.new_tensor(tol), best_res.new_tensor(float("inf"))
    try:
        for k in range(solver.max_iter):
            mask: torch.Tensor | None = frozen
            if k % check_every == 0:
                n_frozen = int(frozen.sum())
                if n_frozen == batch:
                    break
                if n_frozen == 0:
                    mask = None
            state = solver.step(fn, state, mask)
            res = _measure(state.r, state.w, rel, getattr(state, "r_norm", None))
            improved = res < best_res  # False for NaN
            if mask is None:
                unmasked_steps += 1
            else:
                nstep = nstep + ~frozen
            if eager and bool(improved.all()):  # the common case: every residual finite and lower
                best_w, best_res = state.w, res
                frozen = frozen | (res <= tol_t)
            else:
                if eager:  # copying the improved rows is several times cheaper than a row-masked `where` on the CPU
                    rows = improved.nonzero()[:, 0]
                    best_w = best_w.index_copy(0, rows, state.w.index_select(0, rows))
                else:
                    best_w = torch.where(improved[:, None], state.w, best_w)
                best_res = torch.where(improved, res, best_res)
                frozen = frozen | (best_res <= tol_t) | ~(res < inf_t)
            if trace is not None:
                trace.append(torch.nan_to_num(res, nan=float("inf")))
    finally:
        solver.release(state)  # the solve is over: its buffers may serve the next one
    if best_w is w0:  # never hand the caller's tensor back as the solution
        best_w = w0.clone()
    info = SolveInfo(nstep=nstep + unmasked_steps, residual=best_res, converged=best_res <= tol, nfe=fn.count, trace=trace)
    apply_failure_policy(info, name=name, tol=tol, max_iter=solver.max_iter, on_failure=solver.on_failure)
    return best_w, info
