"""The one loop every iterative solver runs in.

The loop owns stopping, per-sample freezing, best-iterate tracking, NaN isolation, statistics
and the failure policy; a solver only says how to start (`init`) and how to take one step
(`step`). A solver works on flat `(B, D)` unknowns and a residual function `R: (B, D) -> (B, D)`
whose zero is the solution, plus a diagonal preconditioner `P` (`(D,)`, or `None` for ones) that
defines the fixed-point map `F(w) = w - P * R(w)` used by Picard and Anderson steps. A residual
function wrapped in `WritesInto` may write into a buffer the solver names (see `_protocol`).

Speed notes. Each iteration costs one evaluation plus a handful of `(B,)`-sized kernels here; the
only host synchronisation is the "is every sample frozen?" test every `check_every` steps (every
step on the CPU, where a sync is free, so the loop also uses the host there to skip work). When the
loop knows that no sample is frozen it passes `frozen=None`, so solvers skip their masking, and when
every sample improved it keeps a reference to the new iterate instead of copying it (solvers never
write into an iterate they returned).
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any, Mapping

import torch

from ._info import SolveInfo, Status, apply_failure_policy
from ._precision import work_dtype
from ._protocol import IterativeMethod, IterativeState, ResidualFn, WritesInto

__all__ = ["ResidualFn", "IterativeState", "iterate", "stopping_measure"]

_REL_EPS = 1e-8
# A sample whose residual norm grows this much over its start is stopped as diverged.
_DIVERGED = 1e8
# A relative residual this many machine epsilons small is at the dtype's floor: a sample stuck there stalled.
_FLOOR_ULPS = 16
# Batches up to this size test "every sample improved and is above tol" on the host (see `_iterate`).
_HOST_BATCH = 8


def _measure(
    r: torch.Tensor, w: torch.Tensor, rel: bool, r_norm: torch.Tensor | None = None, eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, ‖R(w)‖ and the stopping measure (‖R(w)‖, or ‖R(w)‖ / (‖w‖ + eps)); NaN stays NaN.

    Norms are taken in at least float32 (`work_dtype`): in float16 a norm overflows at 256 and the
    guard `eps` (`max(1e-8, tiny)` of that dtype unless given) would round to zero, which made every
    relative test from a zero start infinite.
    """
    dtype = work_dtype(r.dtype)
    wide = None if dtype == r.dtype else dtype  # passing the input's own dtype would copy needlessly
    if r_norm is None:
        res = torch.linalg.vector_norm(r, dim=1, dtype=wide)
    else:
        res = r_norm if r_norm.dtype == dtype else r_norm.to(dtype)
    if not rel:
        return res, res
    if eps is None:
        eps = max(_REL_EPS, torch.finfo(dtype).tiny)
    return res, res / torch.linalg.vector_norm(w, dim=1, dtype=wide).add(eps)


def stopping_measure(r: torch.Tensor, w: torch.Tensor, stop: str, scale_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample stopping measure: ‖R(w)‖ (`"abs"`) or ‖R(w)‖ / (‖w‖ + 1e-8) (`"rel"`); non-finite → inf.

    `scale_rows` restricts ‖w‖ to those columns; an empty selection makes the measure absolute (see `iterate`).
    """
    rel = stop == "rel" and (scale_rows is None or scale_rows.numel() > 0)
    w = w if scale_rows is None or not rel else w.index_select(1, scale_rows)
    return torch.nan_to_num(_measure(r, w, rel)[1], nan=float("inf"), posinf=float("inf"))


class _Counted:
    """Wraps the residual function to count batched evaluations, and to hand it an output buffer.

    A residual function wrapped in `WritesInto` is called as `fn(w, out=buffer)` when a solver offers
    a `(B, D)` buffer (Anderson passes the history slot the residual is headed for, which spares a
    copy per step). Any other function is called with `w` alone.

    Under `torch.autocast` the solver's own arithmetic runs with autocast off (its small systems and
    norms would otherwise run in bfloat16/float16), and each call of the function re-enters the
    caller's autocast (`amp`: device type and dtype), so the user's model still runs in mixed precision.
    """

    __slots__ = ("fn", "count", "writes_into", "amp")

    def __init__(self, fn: ResidualFn, amp: tuple[str, torch.dtype] | None = None) -> None:
        self.writes_into = isinstance(fn, WritesInto)
        self.fn = fn.fn if isinstance(fn, WritesInto) else fn
        self.count = 0
        self.amp = amp

    def __call__(self, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.count += 1
        if self.amp is not None:
            with torch.autocast(self.amp[0], dtype=self.amp[1]):
                return self.fn(w, out=out) if out is not None and self.writes_into else self.fn(w)
        return self.fn(w, out=out) if out is not None and self.writes_into else self.fn(w)


def _caller_autocast(device_type: str) -> tuple[str, torch.dtype] | None:
    """The caller's autocast for this device type, or `None` when it is off."""
    if device_type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def iterate(
    solver: IterativeMethod[Any],
    residual_fn: ResidualFn,
    w0: torch.Tensor,
    *,
    precond: torch.Tensor | None = None,
    name: str = "solve",
    hints: Mapping[str, str] | None = None,
    scale_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    r0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Drive `R(w) = 0` from `w0` with `solver`, sample by sample.

    A sample freezes (its iterate stops changing) once its stopping measure is within `tol`, once its
    residual turns non-finite, or once its residual norm has grown `1e8`-fold over its start
    (diverged); each sample's result therefore does not depend on which other samples share the batch.

    The iterate returned for a sample that did not converge is the one of lowest residual *norm*
    ‖R(w)‖, whatever the stopping measure: the relative measure ‖R(w)‖ / ‖w‖ falls as a diverging
    iterate grows, so it must not pick the answer. `SolveInfo.status` says why each sample ended
    (see `Status`); `hints` is advice by cause for the failure message (`apply_failure_policy`).

    `scale_rows` (indices into the `D` columns) restricts the norm of the relative measure to those rows,
    `‖R(w)‖ / ‖w[:, scale_rows]‖`; an empty selection makes the measure absolute. A block with objectives
    passes its equation and adjoint rows: an objective's residual is a (projected) gradient, and relating it
    to the size of the optimised variable would report a start far out along a flat or unbounded
    direction as converged.

    `scale` (`(B,)`, positive) replaces ‖w‖ as the relative measure's divisor: a linear solve passes
    ‖b‖ + tiny, so that `"rel"` means ‖A x − b‖ / ‖b‖ there. `r0`, when given, is `R(w0)` (a linear
    solve from zero knows it, `−b`, without a matvec).

    Returns:
        The best iterate of each sample, `(B, D)`, and its `SolveInfo`.
    """
    amp = _caller_autocast(w0.device.type)
    with contextlib.nullcontext() if amp is None else torch.autocast(amp[0], enabled=False):
        return _iterate(solver, _Counted(residual_fn, amp), w0, precond, name, hints, scale_rows, scale, r0)


def _iterate(solver: IterativeMethod[Any], fn: _Counted, w0: torch.Tensor, precond: torch.Tensor | None, name: str,
             hints: Mapping[str, str] | None, scale_rows: torch.Tensor | None, divisor: torch.Tensor | None,
             r0: torch.Tensor | None) -> tuple[torch.Tensor, SolveInfo]:
    """`iterate` with the residual function wrapped (and autocast off for the solver's arithmetic).

    Per step it tracks only each sample's lowest residual norm (`best_abs`) and its iterate; the
    stopping measure of the returned iterate is computed once at the end.
    """
    check_every = solver.check_every or (8 if w0.is_cuda else 1)
    # With a check every step (the CPU default) host-side tests are free, so use them to skip masks.
    eager = check_every == 1
    tol, rel, batch = solver.tol, solver.stop == "rel", w0.shape[0]
    if scale_rows is not None and scale_rows.numel() == 0:
        rel, scale_rows = False, None
    if not rel:
        divisor = None

    def scale(w: torch.Tensor) -> torch.Tensor:
        return w if scale_rows is None else w.index_select(1, scale_rows)

    wide = work_dtype(w0.dtype)
    eps = max(_REL_EPS, torch.finfo(wide).tiny) if rel else 0.0
    wide = None if wide == w0.dtype else wide  # (passing the iterate's own dtype to a norm would copy it)
    r0 = fn(w0) if r0 is None else r0
    if r0.shape != w0.shape:
        raise ValueError(f"{name}: the residual has shape {tuple(r0.shape)} but the unknown has shape {tuple(w0.shape)}; they must match.")
    state = solver.init(fn, w0, r0, precond)
    if divisor is None:
        best_abs, res = _measure(r0, scale(w0), rel, eps=eps)
    else:
        best_abs = _measure(r0, w0, False)[0]
        res = best_abs / divisor
    # 0-dim tensors: comparing with a Python float would wrap it into a new tensor every step.
    tol_t = torch.full((), tol, dtype=res.dtype, device=res.device)
    inf_t = torch.full((), float("inf"), dtype=res.dtype, device=res.device)
    # A sample runs while its measure is finite and above tol (NaN compares False).
    frozen = ~((res > tol_t) & (res < inf_t))
    # Per-sample records made only when needed (most solves never need them): the cause of an early end
    # (`status`), the steps taken while some sample was frozen (`nstep`), the divergence limit (`limit`).
    status: torch.Tensor | None = None
    nstep: torch.Tensor | None = None
    limit: torch.Tensor | None = None
    start_abs = best_abs
    # Whether the host knows that no sample is frozen: then a step needs no mask and no test of `frozen`.
    none_frozen = eager and not bool(frozen.any())
    # With a handful of samples that test is cheaper on the host: the residual norms come over in one transfer
    # and are compared there, exactly as the tensors would be (float32 values are exact as Python floats).
    host_best = best_abs.tolist() if none_frozen and batch <= _HOST_BATCH else None
    host_tol = _host_value(tol, res.dtype)
    if not none_frozen:
        status = (~(res < inf_t)).long() * int(Status.NONFINITE)  # (res >= 0: `< inf` is isfinite, and cheaper)
        # best_abs holds no NaN from here on, so `res < best_abs` is False for a NaN residual.
        best_abs = start_abs = torch.nan_to_num(best_abs, nan=float("inf"))
    best_w = w0
    unmasked_steps = 0  # steps in which the host knew that every sample ran (added to nstep at the end)
    # A sample with no new lowest residual since halfway stalled (judged on runs of at least 10 steps).
    halfway, best_halfway = (solver.max_iter // 2 if solver.max_iter >= 10 else -1), None
    trace = [torch.nan_to_num(res, nan=float("inf"))] if solver.trace else None
    try:
        for k in range(solver.max_iter):
            if k == halfway:
                best_halfway = best_abs  # never written in place: a reference is a snapshot
            mask: torch.Tensor | None = None if none_frozen else frozen
            if not none_frozen and k % check_every == 0:
                n_frozen = int(frozen.sum())
                if n_frozen == batch:
                    break
                if n_frozen == 0:
                    mask, none_frozen = None, eager
                    if eager and batch <= _HOST_BATCH:
                        host_best = torch.nan_to_num(best_abs, nan=float("inf")).tolist()
            state = solver.step(fn, state, mask)
            # `_measure`, inlined: this runs every step
            res_abs = getattr(state, "r_norm", None)
            if res_abs is None:
                res_abs = torch.linalg.vector_norm(state.r, dim=1, dtype=wide)
            elif wide is not None:
                res_abs = res_abs.to(wide)
            if not rel:
                res = res_abs
            elif divisor is None:
                res = res_abs / torch.linalg.vector_norm(scale(state.w), dim=1, dtype=wide).add_(eps)
            else:
                res = res_abs / divisor
            if trace is not None:
                trace.append(torch.nan_to_num(res, nan=float("inf")))
            if mask is None:
                unmasked_steps += 1
                if none_frozen:
                    # The common case, one host test: every residual finite, lower, and still above tol.
                    if host_best is not None:
                        norms, measures = torch.stack((res_abs, res)).tolist()
                        if all(a < b and m > host_tol for a, b, m in zip(norms, host_best, measures)):
                            best_w, best_abs, host_best = state.w, res_abs, norms
                            continue
                    elif bool(((res_abs < best_abs) & (res > tol_t)).all()):
                        best_w, best_abs = state.w, res_abs
                        continue
                    none_frozen, host_best = False, None
            else:
                nstep = (~frozen).long() if nstep is None else nstep + ~frozen
            improved = res_abs < best_abs  # False for NaN
            within = res <= tol_t
            if eager and bool(improved.all()):  # every residual finite and lower; some within tol
                best_w, best_abs = state.w, res_abs
                frozen = frozen | within
                continue
            # An iterate within tol is the answer even where another had a lower norm (the "rel" test;
            # with "abs", an unfrozen sample within tol has improved).
            take = improved | within if rel else improved
            if eager:  # copying the taken rows is several times cheaper than a row-masked `where` on the CPU
                rows = take.nonzero()[:, 0]
                best_w = best_w.index_copy(0, rows, state.w.index_select(0, rows))
            else:
                best_w = torch.where(take[:, None], state.w, best_w)
            best_abs = torch.where(take, res_abs, best_abs)
            # Non-finite, or grown 1e8-fold over its start: the sample ends here (NaN compares False).
            if limit is None:
                limit = torch.nan_to_num(start_abs, nan=float("inf")) * _DIVERGED
            within_limit = res_abs <= limit
            if not eager or not bool(within_limit.all()):
                ended = ~within_limit
                code = torch.where(res_abs < inf_t, int(Status.DIVERGED), int(Status.NONFINITE))
                status = torch.where(ended & ~frozen, code, 0 if status is None else status)
                frozen = frozen | ended
            frozen = frozen | within
    finally:
        solver.release(state)  # the solve is over: its buffers may serve the next one
    if best_w is w0:  # never hand the caller's tensor back as the solution
        best_w = w0.clone()
    if nstep is None:
        nstep = torch.full((batch,), unmasked_steps, dtype=torch.long, device=w0.device)
    elif unmasked_steps:
        nstep = nstep + unmasked_steps
    if status is None:
        status = torch.zeros(batch, dtype=torch.long, device=w0.device)
    with torch.no_grad():
        best_abs = torch.nan_to_num(best_abs, nan=float("inf"))
        best_res, w_norm = _returned_measure(scale(best_w), best_abs, rel, eps, divisor)
        # A relative measure is 0 at an infinite iterate: only a finite iterate can have converged.
        # (Norms are >= 0 or NaN, so `< inf` is `isfinite`, at a fraction of its cost.)
        finite_w = w_norm < float("inf")
        converged = (best_res <= tol) & finite_w
        if not bool(converged.all()):  # (else every status is CONVERGED already)
            # A relative residual within a few rounding errors cannot fall further in this dtype.
            at_floor = best_abs <= (_FLOOR_ULPS * torch.finfo(w0.dtype).eps) * (w_norm if divisor is None else divisor)
            no_progress = torch.zeros_like(converged) if best_halfway is None else best_abs >= best_halfway
            status = _final_status(status, converged, at_floor | no_progress, finite_w)
    info = SolveInfo(nstep=nstep, residual=best_res, converged=converged, nfe=fn.count, trace=trace, status=status)
    apply_failure_policy(info, name=name, tol=tol, max_iter=solver.max_iter, on_failure=solver.on_failure, hints=hints)
    return best_w, info


def _host_value(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (float32 or float64), as a Python float: what a 0-dim tensor of it holds."""
    if dtype == torch.float64:
        return float(value)
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", value))[0]
    return float(torch.tensor(value, dtype=dtype))


def _returned_measure(w: torch.Tensor, r_norm: torch.Tensor, rel: bool, eps: float,
                      divisor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stopping measure of the returned iterates (non-finite → inf), and their norms."""
    w_norm = torch.linalg.vector_norm(w, dim=1, dtype=None if work_dtype(w.dtype) == w.dtype else work_dtype(w.dtype))
    res = (r_norm / (w_norm + eps) if divisor is None else r_norm / divisor) if rel else r_norm
    return torch.nan_to_num(res, nan=float("inf")), w_norm


def _final_status(status: torch.Tensor, converged: torch.Tensor, stalled: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Why each sample ended: converged; else an infinite iterate or the cause the loop saw (non-finite,
    diverged); else stalled (at the dtype's rounding floor, or no new lowest residual in the second
    half of the iterations); else the iteration cap."""
    open_ = torch.where(stalled, int(Status.STALLED), int(Status.MAX_ITER))
    status = torch.where(status == int(Status.CONVERGED), open_, status)
    status = torch.where(finite, status, int(Status.NONFINITE))
    return torch.where(converged, int(Status.CONVERGED), status)
