"""Limited-memory ("good") Broyden with its low-rank factors in a circular buffer."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from ._base import IterativeSolver

__all__ = ["Broyden"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(IterativeSolver):
    """Broyden's good method on `R(w) = 0`, with an inverse-Jacobian estimate `H ≈ (∂R/∂w)⁻¹`.

    `H = diag(P) + U Vᵀ` starts at the preconditioner (so the first step is the damped fixed-point
    step) and takes one rank-one update per step, `H ← H + (s − H y) sᵀH / (sᵀ H y)` with
    `s = Δw`, `y = ΔR`. `U`, `V` are `(B, memory, D)` buffers; when full the oldest pair is
    overwritten, so memory is `O(memory · B · D)` whatever `max_iter` is.

    Args:
        memory: number of rank-one pairs kept (≥ 1).
        line_search: backtrack (up to 3 halvings, one evaluation each) on samples whose residual
            norm grew.
    """

    memory: int = 20
    line_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Broyden: memory must be an integer >= 1, got {self.memory!r}.")

    def init(self, fn, w, r, precond):
        batch, dim = w.shape
        grad = torch.is_grad_enabled()
        s = SimpleNamespace(w=w, r=r, precond=precond, count=0, grad=grad)
        if grad:
            s.U, s.V = [], []
        else:
            s.U = w.new_zeros(batch, self.memory, dim)
            s.V = w.new_zeros(batch, self.memory, dim)
        return s

    def _factors(self, s):
        n = min(s.count, self.memory)
        if s.grad:
            if n == 0:
                return None, None
            return torch.stack(s.U[-n:], 1), torch.stack(s.V[-n:], 1)
        return (s.U[:, :n], s.V[:, :n]) if n else (None, None)

    @staticmethod
    def _apply(diag, U, V, x, transpose=False):
        """H x (or Hᵀ x) with H = diag(P) + U Vᵀ."""
        out = x if diag is None else x * diag
        if U is None:
            return out
        a, b = (U, V) if not transpose else (V, U)
        return out + torch.einsum("bnd,bn->bd", a, torch.einsum("bnd,bd->bn", b, x))

    def step(self, fn, s, frozen):
        U, V = self._factors(s)
        direction = -self._apply(s.precond, U, V, s.r)
        direction = torch.where(frozen[:, None], torch.zeros_like(direction), direction)
        w, r = s.w + direction, fn(s.w + direction)
        if self.line_search:
            w, r = self._backtrack(fn, s, direction, w, r)
        ds, dr = w - s.w, r - s.r
        h_dr = self._apply(s.precond, U, V, dr)
        v = self._apply(s.precond, U, V, ds, transpose=True)
        denom = (v * dr).sum(1, keepdim=True)
        ok = denom.abs() > torch.finfo(w.dtype).eps * ds.norm(dim=1, keepdim=True) * dr.norm(dim=1, keepdim=True)
        u = torch.where(ok, (ds - h_dr) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(ds))
        u = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
        v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        if s.grad:
            s.U.append(u)
            s.V.append(v)
        else:
            slot = s.count % self.memory
            s.U[:, slot], s.V[:, slot] = u, v
        s.count += 1
        s.w, s.r = w, r
        return s

    def _backtrack(self, fn, s, direction, w, r):
        old = s.r.norm(dim=1)
        tau = 1.0
        for _ in range(3):
            worse = r.norm(dim=1) > old
            if not bool(worse.any()):
                break
            tau *= 0.5
            trial = s.w + tau * direction
            r_trial = fn(trial)
            w = torch.where(worse[:, None], trial, w)
            r = torch.where(worse[:, None], r_trial, r)
        return w, r
