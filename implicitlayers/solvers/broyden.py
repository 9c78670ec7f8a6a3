"""Limited-memory ("good") Broyden with its low-rank factors in a circular buffer."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from . import _workspace
from ._base import IterativeSolver

__all__ = ["Broyden"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(IterativeSolver):
    """Broyden's good method on `R(w) = 0`, with an inverse-Jacobian estimate `H ≈ (∂R/∂w)⁻¹`.

    `H = diag(P) + U Vᵀ` starts at the preconditioner (so the first step is the damped fixed-point
    step) and takes one rank-one update per step, `H ← H + (s − H y) sᵀH / (sᵀ H y)` with
    `s = Δw`, `y = ΔR`. `U`, `V` are `(B, memory, D)` buffers (kept between solves of one shape, see
    `implicitlayers.solvers.set_workspace_limit`); when full the oldest pair is overwritten, so memory
    is `O(memory · B · D)` whatever `max_iter` is.

    A step reads the factors four times (two products for `H R(w_new)`, two for `Hᵀ s`): `H y` is
    not computed but taken as `H R(w_new) − H R(w_old)`, and `H R(w_new)` after the update is
    `H R(w_new) + u (vᵀ R(w_new))`, which is also the next step's direction. Without a line search
    the step is `s = −H R(w_old)`, so `s − H y = −H R(w_new)`: then `u` is a multiple of `H R(w_new)`
    and the update of `H R(w_new)` a rescaling.

    Args:
        memory: number of rank-one pairs kept (≥ 1).
        line_search: backtrack (up to 3 halvings, one evaluation each) on samples whose residual
            norm grew. It tests on the host whether any sample needs it, one sync per step on CUDA.
    """

    memory: int = 20
    line_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Broyden: memory must be an integer >= 1, got {self.memory!r}.")
        if not isinstance(self.line_search, bool):
            raise ValueError(f"Broyden: line_search must be a bool, got {self.line_search!r}.")

    def init(self, fn, w, r, precond):
        # Under autograd (Unroll) in-place buffer writes would break the graph, so keep lists then.
        s = SimpleNamespace(w=w, r=r, precond=precond, count=0, grad=torch.is_grad_enabled())
        s.Hr = r if precond is None else r * precond  # H R(w) with H = diag(P)
        if s.grad:
            s.U, s.V = [], []
        else:
            s.factors = _workspace.take(_Factors, w, self.memory)
        return s

    def release(self, s) -> None:
        if not s.grad:
            _workspace.give_back(s.factors)

    def step(self, fn, s, frozen):
        n = min(s.count, self.memory)
        if n == 0:
            U = V = None
        elif s.grad:
            U, V = torch.stack(s.U, 1), torch.stack(s.V, 1)
        else:
            U, V = s.factors.U_first[n], s.factors.V_first[n]
        if frozen is None:
            direction = -s.Hr
        elif s.grad:
            direction = torch.where(frozen[:, None], 0.0, -s.Hr)
        else:  # scaling is far cheaper than a row-masked fill on the CPU; a failed (NaN) sample is frozen anyway
            direction = s.Hr * (frozen.to(s.Hr.dtype) - 1)[:, None]
        w = s.w + direction
        r = fn(w)
        if self.line_search:
            w, r = self._backtrack(fn, s, direction, w, r)
            ds = w - s.w
        else:
            ds = direction
        dr = r - s.r
        # H r and Hᵀ ds with the current factors; `coeff = Vᵀ r` is kept to drop the oldest pair below.
        Hr, coeff = self._apply(s.precond, U, V, r)
        v, _ = self._apply(s.precond, V, U, ds)
        denom = (v * dr).sum(1, keepdim=True)
        scale = torch.linalg.vector_norm(ds, dim=1, keepdim=True) * torch.linalg.vector_norm(dr, dim=1, keepdim=True)
        # Skip the update (u = 0) where sᵀH y is negligible: a frozen sample, or a step that made no progress.
        denom = torch.where(denom.abs() > torch.finfo(w.dtype).eps * scale, denom, torch.inf)
        vr = (v * r).sum(1, keepdim=True)
        if self.line_search:
            u = (ds - (Hr - s.Hr)) / denom
            Hr_next = torch.addcmul(Hr, u, vr)
        else:
            # The full step s = −H r_old makes s − H y = −H r_new, so u = −H r_new / (sᵀ H y), and the updated
            # H r_new is H r_new (1 − vᵀr / sᵀ H y): two passes fewer. (A frozen sample has s = 0, v = 0,
            # hence an infinite denominator and u = 0, as the general formula gives.)
            u = None
            Hr_next = Hr * (1 - vr / denom)
        full = n == self.memory
        if s.grad:
            u = Hr / -denom if u is None else u
            if full:
                Hr_next = Hr_next - U[:, 0] * coeff[:, 0, :1]
            s.U, s.V = (s.U + [u])[-self.memory :], (s.V + [v])[-self.memory :]
        else:
            slot = s.count % self.memory
            if full:  # the pair in `slot` is about to be overwritten: take it out of H r too
                Hr_next = Hr_next - s.factors.U_slot[slot] * coeff[:, 0, slot : slot + 1]
            if u is None:
                torch.div(Hr, denom.neg(), out=s.factors.U_slot[slot])
            else:
                s.factors.U_slot[slot].copy_(u)
            s.factors.V_slot[slot].copy_(v)
        s.count += 1
        s.w, s.r, s.Hr = w, r, Hr_next
        return s

    @staticmethod
    def _apply(diag, A, B, x):
        """`(diag ⊙ x + A (Bᵀ x), Bᵀ x)`: `H x` for `(A, B) = (U, V)`, `Hᵀ x` for `(V, U)`.

        The products are written as `(1, D) @ (D, n)` and `(1, n) @ (n, D)` per sample, the fast
        layout for batched matrix products (an `einsum("bnd,bd->bn")` is several times slower on CPU).
        """
        base = x if diag is None else x * diag
        if A is None:
            return base, None
        coeff = torch.bmm(x[:, None], B.transpose(1, 2))
        return torch.baddbmm(base[:, None], coeff, A)[:, 0], coeff

    def _backtrack(self, fn, s, direction, w, r):
        old = torch.linalg.vector_norm(s.r, dim=1)
        tau = 1.0
        for _ in range(3):
            worse = torch.linalg.vector_norm(r, dim=1) > old
            if not bool(worse.any()):
                break
            tau *= 0.5
            trial = s.w + tau * direction
            r_trial = fn(trial)
            w = torch.where(worse[:, None], trial, w)
            r = torch.where(worse[:, None], r_trial, r)
        return w, r


class _Factors:
    """Broyden's `(B, memory, D)` factors `U`, `V` by circular slot, with the views a step uses made once.

    Slots beyond the filled ones are never read, so nothing needs zeroing, and the object can serve
    one solve after another (`_workspace`).
    """

    def __init__(self, like: torch.Tensor, memory: int) -> None:
        batch, dim = like.shape
        self.U = like.new_empty(batch, memory, dim)
        self.V = like.new_empty(batch, memory, dim)
        self.nbytes = self.U.nbytes + self.V.nbytes
        self.U_first = [self.U[:, :n] for n in range(memory + 1)]
        self.V_first = [self.V[:, :n] for n in range(memory + 1)]
        self.U_slot, self.V_slot = self.U.unbind(1), self.V.unbind(1)
