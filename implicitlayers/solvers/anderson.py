"""Anderson acceleration with a fixed-size circular history and an incrementally updated Gram matrix."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from ._base import IterativeSolver

__all__ = ["Anderson"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(IterativeSolver):
    """Anderson acceleration (type II) of the map `F(w) = w − P ⊙ R(w)`.

    With `g_i = F(w_i) − w_i` over the last `m` iterates, each step solves, per sample,
    `min_α ‖Σ α_i g_i‖² + lam ‖α‖²` subject to `Σ α_i = 1` and moves to
    `w ← Σ α_i (w_i + damping · g_i)`.

    Cost per step: one evaluation plus `O(m · B · D)`: the history lives in preallocated `(B, m, D)`
    buffers and only the new row of the Gram matrix `g gᵀ` is computed each step.

    Args:
        m: history size (≥ 1).
        lam: ridge regularisation of the Gram matrix (relative to its scale).
        damping: mixing β in (0, 1].
    """

    m: int = 5
    lam: float = 1e-4
    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"Anderson: m must be an integer >= 1, got {self.m!r}.")
        if not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise ValueError(f"Anderson: lam must be >= 0, got {self.lam!r}.")
        if not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"Anderson: damping must lie in (0, 1], got {self.damping!r}.")

    def init(self, fn, w, r, precond):
        batch, dim = w.shape
        grad = torch.is_grad_enabled()
        # Under autograd (Unroll) in-place buffer writes would break the graph, so keep lists then.
        s = SimpleNamespace(w=w, r=r, precond=precond, count=1, grad=grad)
        g = -r if precond is None else -r * precond
        if grad:
            s.X, s.G = [w], [g]
            return s
        s.X = w.new_zeros(batch, self.m, dim)
        s.G = w.new_zeros(batch, self.m, dim)
        s.H = w.new_zeros(batch, self.m, self.m)
        s.X[:, 0], s.G[:, 0] = w, g
        s.H[:, 0, 0] = (g * g).sum(1)
        return s

    def _weights(self, H: torch.Tensor, n: int) -> torch.Tensor:
        """Per-sample mixing weights α (B, n): the bordered system [[0, 1ᵀ], [1, H + λI]] [ν; α] = [1; 0]."""
        batch = H.shape[0]
        scale = torch.diagonal(H, dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(H.dtype).tiny)
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        gram = H + (self.lam * scale)[:, None, None] * eye
        ones = H.new_ones(batch, 1, n)
        top = torch.cat([H.new_zeros(batch, 1, 1), ones], dim=2)
        body = torch.cat([ones.transpose(1, 2), gram], dim=2)
        rhs = H.new_zeros(batch, n + 1, 1)
        rhs[:, 0] = 1
        sol, _ = torch.linalg.solve_ex(torch.cat([top, body], dim=1), rhs)
        alpha = sol[:, 1:, 0]
        # A singular system (e.g. a frozen sample whose history repeats) falls back to the newest step.
        bad = ~torch.isfinite(alpha).all(1, keepdim=True)
        return torch.where(bad, torch.full_like(alpha, 1.0 / n), alpha)

    def step(self, fn, s, frozen):
        n = min(s.count, self.m)
        if s.grad:
            X, G = torch.stack(s.X[-n:], 1), torch.stack(s.G[-n:], 1)
            H = G @ G.transpose(1, 2)
        else:
            X, G, H = s.X[:, :n], s.G[:, :n], s.H[:, :n, :n]
        alpha = self._weights(H, n)
        proposal = torch.einsum("bn,bnd->bd", alpha, X + self.damping * G)
        w = torch.where(frozen[:, None], s.w, proposal)
        r = fn(w)
        g = -r if s.precond is None else -r * s.precond
        s.w, s.r = w, r
        if s.grad:
            s.X.append(w)
            s.G.append(g)
        else:
            slot = s.count % self.m
            s.X[:, slot], s.G[:, slot] = w, g
            filled = min(s.count + 1, self.m)
            row = torch.bmm(s.G[:, :filled], g[:, :, None])[:, :, 0]
            s.H[:, slot, :filled] = row
            s.H[:, :filled, slot] = row
        s.count += 1
        return s
