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
    buffers (the mixed points `w_i + damping · g_i` and the `g_i`), only the new row of the Gram
    matrix `H = g gᵀ` is computed each step, into a preallocated `(B, m, m)` buffer, so a step is two
    batched products and one `m × m` solve (`α ∝ (H + ridge)⁻¹ 1`).

    Args:
        m: history size (≥ 1; `m = 1` is damped fixed-point iteration).
        lam: ridge regularisation relative to the largest diagonal entry of the Gram matrix,
            `H + lam · max(diag H) · I` (scale-free; it bounds the condition number by about `m / lam`,
            which keeps the small solve sound even when the history spans many orders of magnitude).
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
        # Under autograd (Unroll) in-place buffer writes would break the graph, so keep lists then.
        s = SimpleNamespace(w=w, r=r, r_norm=None, precond=precond, count=1, grad=torch.is_grad_enabled())
        # `pr = P ⊙ R(w) = −g`: the sign does not change the Gram matrix, and `w + βg = w − β pr`.
        pr = r if precond is None else r * precond
        if s.grad:
            s.Y, s.G = [w - self.damping * pr], [pr]
            return s
        # Slots beyond the filled ones are never read, so the history needs no zeroing.
        s.Y = w.new_empty(batch, self.m, dim)
        s.G = w.new_empty(batch, self.m, dim)
        torch.sub(w, pr, alpha=self.damping, out=s.Y[:, 0])
        s.G[:, 0] = pr
        s.H = w.new_zeros(batch, self.m, self.m)  # the Gram matrix G Gᵀ, by slot
        s.H[:, 0, 0] = (pr * pr).sum(1)
        s.ones = w.new_ones(batch, self.m, 1)
        return s

    def _weights(self, H: torch.Tensor, ones: torch.Tensor, newest: int, in_place: bool) -> torch.Tensor:
        """Mixing weights `(B, 1, n)`: `α = y / Σy` with `(H + ridge) y = 1`, the minimiser of αᵀHα on Σα = 1.

        `H + ridge` is symmetric positive-definite for every sample with a nonzero residual, so this
        `n × n` solve replaces the larger bordered (saddle-point) system at lower cost.
        """
        diag = torch.diagonal(H, dim1=1, dim2=2)
        ridge = diag.amax(1, keepdim=True) * self.lam
        if in_place:  # H is a private copy
            diag.add_(ridge)
        else:
            H = H + torch.diag_embed(ridge.expand_as(diag))
        y, _ = torch.linalg.solve_ex(H, ones)
        alpha = (y / y.sum(1, keepdim=True)).transpose(1, 2)
        if self.lam > 0:
            # The others have converged (or failed) and are frozen, so their weights are never used.
            return alpha
        # Without a ridge a repeated history is singular: fall back to the plain step from the newest iterate.
        newest_only = torch.zeros(alpha.shape[2], dtype=H.dtype, device=H.device)
        newest_only[newest] = 1
        return torch.where(torch.isfinite(alpha).all(2, keepdim=True), alpha, newest_only)

    def step(self, fn, s, frozen):
        n = min(s.count, self.m)
        if s.grad:
            w = self._proposal_unrolled(s, n, frozen)
        else:
            if n == 1:
                alpha = s.ones[:, :1]  # (B, 1, 1): the plain damped step
            else:
                H = s.H[:, :n, :n].clone()
                alpha = self._weights(H, s.ones[:, :n], (s.count - 1) % self.m, in_place=True)
            if frozen is None:
                w = torch.bmm(alpha, s.Y[:, :n])[:, 0]
            else:
                # Zero weights plus the old iterate hold a frozen sample exactly, far cheaper than a
                # row-masked `where` on the CPU (a failed sample's NaN history may poison it; it is frozen anyway).
                hold = frozen.to(alpha.dtype)
                alpha = alpha * (1 - hold)[:, None, None]
                w = torch.baddbmm((s.w * hold[:, None])[:, None], alpha, s.Y[:, :n])[:, 0]
        r = fn(w)
        s.w, s.r = w, r
        if s.grad:
            pr = r if s.precond is None else r * s.precond
            s.Y, s.G = (s.Y + [w - self.damping * pr])[-self.m :], (s.G + [pr])[-self.m :]
        else:
            self._record(s, w, r)
        s.count += 1
        return s

    def _proposal_unrolled(self, s, n: int, frozen: torch.Tensor | None) -> torch.Tensor:
        """The step under autograd: the same mixing from the history lists, without in-place writes."""
        Y, G = torch.stack(s.Y, 1), torch.stack(s.G, 1)
        if n == 1:
            w = Y[:, 0]
        else:
            H = torch.bmm(G, G.transpose(1, 2))
            if frozen is not None:
                # A frozen sample repeats its history, which can make its system singular: NaN weights would
                # be discarded below, but their gradients (0 · NaN) would not. Give it a harmless system.
                H = torch.where(frozen[:, None, None], torch.eye(n, dtype=H.dtype, device=H.device), H)
            alpha = self._weights(H, H.new_ones(H.shape[0], n, 1), n - 1, in_place=False)
            w = torch.bmm(alpha, Y)[:, 0]
        return w if frozen is None else torch.where(frozen[:, None], s.w, w)

    def _record(self, s, w: torch.Tensor, r: torch.Tensor) -> None:
        """Write the newest point into its circular slot and its row of the Gram matrix into `H`."""
        slot = s.count % self.m
        filled = min(s.count + 1, self.m)
        pr = s.G[:, slot]
        if s.precond is None:
            pr.copy_(r)
        else:
            torch.mul(r, s.precond, out=pr)
        torch.sub(w, pr, alpha=self.damping, out=s.Y[:, slot])
        row = torch.bmm(s.G[:, slot : slot + 1], s.G[:, :filled].transpose(1, 2))[:, 0]
        s.H[:, slot, :filled] = row
        s.H[:, :filled, slot] = row
        # ‖R(w)‖ is on the diagonal already: spare the loop one pass over the residual.
        s.r_norm = row[:, slot].sqrt() if s.precond is None else None
