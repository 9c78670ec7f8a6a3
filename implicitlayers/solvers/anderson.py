"""Anderson acceleration with a fixed-size circular history and an incrementally updated Gram matrix."""

from __future__ import annotations

import dataclasses
import inspect
import math
from types import SimpleNamespace

import torch

from . import _workspace
from ._base import IterativeSolver
from ._config import check_int, check_real
from ._precision import bmm, work_dtype

__all__ = ["Anderson"]

# History sizes from which the weights' ridge-regularised system is solved by Cholesky rather than LU.
_CHOLESKY_FROM = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(IterativeSolver):
    """Anderson acceleration (type II) of the map `F(w) = w − P ⊙ R(w)`.

    With `g_i = F(w_i) − w_i` over the last `m = memory` iterates, each step solves, per sample,
    `min_α ‖Σ α_i g_i‖² + lam ‖α‖²` subject to `Σ α_i = 1` and moves to
    `w ← Σ α_i (w_i + damping · g_i)`.

    Cost per step: one evaluation plus `O(m · B · D)`: the history lives in preallocated `(B, m, D)`
    buffers (the mixed points `w_i + damping · g_i` and the `g_i`; kept between solves of one shape,
    see `implicitlayers.solvers.set_workspace_limit`), only the new row of the Gram
    matrix `H = g gᵀ` is computed each step, into a preallocated `(B, m, m)` buffer, so a step is two
    batched products and one `m × m` solve (`α ∝ (H + ridge)⁻¹ 1`).

    Args:
        memory: history size m (≥ 1; `memory=1` is damped fixed-point iteration), the name `il.Broyden`
            uses for its own history. `m=` is accepted as an alias (the spelling of the design contract
            and of the Anderson literature); giving both with different values is a `TypeError`.
        lam: ridge regularisation relative to the largest diagonal entry of the Gram matrix,
            `H + lam · max(diag H) · I` (scale-free; it bounds the condition number by about `m / lam`,
            which keeps the small solve sound even when the history spans many orders of magnitude).
        damping: mixing β in (0, 1].
    """

    memory: int = 5
    lam: float = 1e-4
    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "memory", low=1)
        check_real(self, "lam", "a finite number >= 0", lambda v: 0 <= v < math.inf)
        check_real(self, "damping", "a number in (0, 1]", lambda v: 0 < v <= 1)

    @property
    def m(self) -> int:
        """The history size (`memory`), under the name of the Anderson literature."""
        return self.memory

    def replace(self, **changes) -> "Anderson":
        """A copy with some options changed; `m=` is `memory=`."""
        return dataclasses.replace(self, **_memory_alias(changes, self))

    def init(self, fn, w, r, precond):
        # Under autograd (Unroll) in-place buffer writes would break the graph, so keep lists then.
        s = SimpleNamespace(w=w, r=r, r_norm=None, precond=precond, count=1, grad=torch.is_grad_enabled())
        # `pr = P ⊙ R(w) = −g`: the sign does not change the Gram matrix, and `w + βg = w − β pr`.
        pr = r if precond is None else r * precond
        if s.grad:
            s.Y, s.G = [w - self.damping * pr], [pr]
            return s
        s.hist = _workspace.take(_History, w, self.memory)
        s.eye_lam = s.hist.scaled_eyes(self.lam)
        s.hist.record(w, pr, 0, self.damping)
        return s

    def release(self, s) -> None:
        if not s.grad:
            _workspace.give_back(s.hist)

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

    def _weights_buffered(self, s, n: int) -> torch.Tensor:
        """`_weights` on the history's Gram matrix, without copying it: the ridge enters through `addcmul`."""
        hist = s.hist
        if self.lam == 0:
            return self._weights(hist.H_first[n].clone(), hist.ones[n], (s.count - 1) % self.memory, in_place=True)
        largest = hist.diag_first[n].amax(2, keepdim=True)  # (B, 1, 1)
        system = torch.addcmul(hist.H_first[n], largest, s.eye_lam[n])
        if n >= _CHOLESKY_FROM:
            # With a ridge the system is symmetric positive-definite (a sample whose history is all zero has
            # converged and is frozen; its weights are never used), and from about 8 slots a Cholesky solve is
            # cheaper than LU: 0.25 against 0.46 ms for 128 samples of 20 slots.
            y = torch.cholesky_solve(hist.ones[n], torch.linalg.cholesky_ex(system)[0])
        else:
            y, _ = torch.linalg.solve_ex(system, hist.ones[n])
        return (y / y.sum(1, keepdim=True)).mT

    def step(self, fn, s, frozen):
        n = min(s.count, self.memory)
        if s.grad:
            w = self._proposal_unrolled(s, n, frozen)
        else:
            hist = s.hist
            # (B, 1, n); n == 1 is the plain damped step
            alpha = hist.ones[1].mT if n == 1 else self._weights_buffered(s, n)
            if alpha.dtype != s.w.dtype:  # the small system is solved in float32 for half precision
                alpha = alpha.to(s.w.dtype)
            if frozen is None:
                w = torch.bmm(alpha, hist.Y_first[n]).squeeze(1)
            else:
                # Zero weights plus the old iterate hold a frozen sample exactly, far cheaper than a
                # row-masked `where` on the CPU (a failed sample's NaN history may poison it; it is frozen anyway).
                hold = frozen.to(alpha.dtype)
                alpha = alpha * (1 - hold)[:, None, None]
                w = torch.baddbmm((s.w * hold[:, None])[:, None], alpha, hist.Y_first[n]).squeeze(1)
        if s.grad:
            r = fn(w)
            pr = r if s.precond is None else r * s.precond
            s.Y, s.G = (s.Y + [w - self.damping * pr])[-self.memory :], (s.G + [pr])[-self.memory :]
        else:
            slot = s.hist.G_slot[s.count % self.memory]
            if s.precond is None:  # the residual is what the history keeps: let fn write it into its slot
                r = pr = fn(w, slot)
            else:
                r = fn(w)
                pr = torch.mul(r, s.precond, out=slot)
            # ‖R(w)‖ is on the Gram diagonal already: spare the loop one pass over the residual.
            r_sq = s.hist.record(w, pr, s.count, self.damping)
            s.r_norm = r_sq.sqrt() if s.precond is None else None
        s.w, s.r = w, r
        s.count += 1
        return s

    def _proposal_unrolled(self, s, n: int, frozen: torch.Tensor | None) -> torch.Tensor:
        """The step under autograd: the same mixing from the history lists, without in-place writes."""
        Y, G = torch.stack(s.Y, 1), torch.stack(s.G, 1)
        if n == 1:
            w = Y[:, 0]
        else:
            H = bmm(G, G.transpose(1, 2))  # in float32 for half precision (see `work_dtype`)
            if frozen is not None:
                # A frozen sample repeats its history, which can make its system singular: NaN weights would
                # be discarded below, but their gradients (0 · NaN) would not. Give it a harmless system.
                H = torch.where(frozen[:, None, None], torch.eye(n, dtype=H.dtype, device=H.device), H)
            alpha = self._weights(H, H.new_ones(H.shape[0], n, 1), n - 1, in_place=False)
            w = torch.bmm(alpha.to(Y.dtype), Y)[:, 0]
        return w if frozen is None else torch.where(frozen[:, None], s.w, w)


def _memory_alias(kwargs: dict, owner: object) -> dict:
    """`kwargs` with the alias `m` renamed `memory` (a `TypeError` if both are given and differ)."""
    if "m" in kwargs:
        m = kwargs.pop("m")
        if "memory" in kwargs and kwargs["memory"] != m:
            raise TypeError(f"{type(owner).__name__}: m is an alias of memory; got m={m!r} and memory={kwargs['memory']!r}.")
        kwargs["memory"] = m
    return kwargs


_dataclass_init = Anderson.__init__


def _init_with_alias(self: Anderson, **kwargs) -> None:
    _dataclass_init(self, **_memory_alias(kwargs, self))


_init_with_alias.__doc__ = _dataclass_init.__doc__
_init_with_alias.__signature__ = inspect.signature(_dataclass_init)  # type: ignore[attr-defined]
Anderson.__init__ = _init_with_alias  # type: ignore[method-assign]


class _History:
    """Anderson's buffers for one `(B, m, D)`, dtype and device, with every view a step uses made once.

    `Y` holds the mixed points `w_i − β pr_i`, `G` the `pr_i`, both by circular slot; `H` is the
    Gram matrix `G Gᵀ` by slot. Slots beyond the filled ones are never read, so nothing needs zeroing,
    and the object can serve one solve after another (`_workspace`): building the views costs about as
    much as the tensor indexing of a few steps, which it replaces.
    """

    def __init__(self, like: torch.Tensor, m: int) -> None:
        batch, dim = like.shape
        self.m = m
        self.Y = like.new_empty(batch, m, dim)
        self.G = like.new_empty(batch, m, dim)
        # The Gram matrix and its solve in at least float32 (a float16 squared norm overflows at 256).
        self.H = torch.zeros(batch, m, m, dtype=work_dtype(like.dtype), device=like.device)
        self.nbytes = self.Y.nbytes + self.G.nbytes + self.H.nbytes
        self._eyes: dict[float, list[torch.Tensor]] = {}
        # Indexed by the number n of filled slots:
        self.Y_first = [self.Y[:, :n] for n in range(m + 1)]
        self.H_first = [self.H[:, :n, :n] for n in range(m + 1)]
        self.diag_first = [torch.diagonal(h, dim1=1, dim2=2).unsqueeze(1) for h in self.H_first]  # (B, 1, n)
        self.ones = [self.H.new_ones(batch, n, 1) for n in range(m + 1)]
        # Indexed by slot: the newest pr as a row, and where its Gram row and column go. While the
        # history fills (slot = step count < m) only slots 0..slot are filled; after that, all m.
        self.Y_slot, self.G_slot = self.Y.unbind(1), self.G.unbind(1)
        self.G_row = [self.G[:, k : k + 1] for k in range(m)]
        self.G_cols = [self.G[:, : k + 1].mT for k in range(m)] + [self.G.mT]
        self.H_row = [[self.H[:, k : k + 1, :n] for n in (k + 1, m)] for k in range(m)]
        self.H_col = [[self.H[:, :n, k : k + 1].mT for n in (k + 1, m)] for k in range(m)]
        self.H_diag = [self.H[:, k, k] for k in range(m)]

    def scaled_eyes(self, lam: float) -> list[torch.Tensor]:
        """`lam · I_n` for every n (the ridge's shape, scaled by the largest diagonal entry per sample)."""
        if lam not in self._eyes:
            eye = lam * torch.eye(self.m, dtype=self.H.dtype, device=self.H.device)
            self._eyes[lam] = [eye[:n, :n] for n in range(self.m + 1)]
        return self._eyes[lam]

    def record(self, w: torch.Tensor, pr: torch.Tensor, count: int, damping: float) -> torch.Tensor:
        """Write step `count`'s point into its slot and its row of the Gram matrix into `H`; return ‖pr‖²."""
        slot = count % self.m
        full = int(count >= self.m)
        if pr is not self.G_slot[slot]:  # else the residual function wrote it there already
            self.G_slot[slot].copy_(pr)
        torch.sub(w, pr, alpha=damping, out=self.Y_slot[slot])
        row = bmm(self.G_row[slot], self.G_cols[slot if not full else self.m])
        self.H_row[slot][full].copy_(row)
        self.H_col[slot][full].copy_(row)
        return self.H_diag[slot]
