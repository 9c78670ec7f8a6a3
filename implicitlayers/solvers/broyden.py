"""Limited-memory Broyden (type II, "bad" Broyden) in compact form, with a blow-up safeguard."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from . import _workspace
from ._base import IterativeSolver
from ._config import check_int
from ._precision import bmm, dot, work_dtype

__all__ = ["Broyden"]

# A trial whose residual norm exceeds `_GROWTH` times the sample's lowest so far (or is not finite) is
# rejected. Each rejection in a row loosens that limit `_LOOSEN`-fold, a non-finite trial also shortens
# the next step by `_SHRINK`, and the `_RESTART_AFTER`-th rejection in a row drops the sample's pairs.
_GROWTH, _LOOSEN, _SHRINK, _RESTART_AFTER = 10.0, 4.0, 0.25, 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(IterativeSolver):
    """Broyden's second ("type II") method on `R(w) = 0`, with limited memory in compact form.

    The inverse-Jacobian estimate `H ≈ (∂R/∂w)⁻¹` starts at `H₀ = diag(P)` (so the first step is the
    damped fixed-point step) and takes the update `H ← H + (s − H y) yᵀ / (yᵀ y)` per step, with
    `s = Δw`, `y = ΔR`. After the last `n ≤ memory` pairs it is, exactly,

        H = H₀ + (S − H₀ Y) N⁻¹ Yᵀ,   N = the upper triangle (diagonal included) of Yᵀ Y,

    in chronological order (the compact representation of Byrd, Nocedal and Schnabel, 1994). That form
    is why the memory can be limited without harm: dropping the oldest pair gives exactly the method
    restarted from `H₀` on the pairs kept. (Overwriting the oldest rank-one term of the product form
    `H₀ + Σ uᵢvᵢᵀ`, as circular-buffer code usually does, leaves the later terms built on a matrix
    that is gone, and the estimate degrades each time the memory wraps.) Of scipy's reductions for
    `broyden1` — `"restart"` (drop every pair), `"simple"` (drop the oldest), `"svd"` (keep the
    leading singular directions of `H − H₀`) — the compact form makes `"simple"` exact and cheap, and
    on the problems of `tests/test_solver_trust.py` it beat a restart.

    Why type II rather than the "good" (type I) update: both cost one evaluation a step, but type I
    needs `Hᵀ s` (two more passes over the pairs) and, in compact form, a dense `n × n` solve. On the
    DEQ cells of `benchmarks/solvers.py` both take the same number of steps (19 and 17–18); on the
    gradient systems of a `Minimize` (a least-squares fit, a bowl of condition number 1e3, 20
    unknowns) the type-I method did not converge in 200 steps even with full memory, where type II
    takes 30–46 (Fang and Saad, 2009, also found type II the more robust of the two).

    The safeguard (the method has no globalisation of its own): a trial whose residual norm is more
    than ten times the sample's lowest so far, or not finite, is rejected. The sample stays where it
    was but keeps the trial's secant pair (when finite), so its next step is a secant step that knows
    how steeply `R` grew; each rejection in a row loosens the limit fourfold (so that a badly scaled
    problem, whose early secant steps all overshoot, still gets through), a non-finite trial also
    shortens the next step fourfold, and the fifth rejection in a row drops the pairs (a restart from
    `H₀`). This costs no evaluation beyond the retried step, and no host synchronisation.

    Cost per step: one evaluation plus two passes over the `n` kept pairs (`Yᵀ R` and the step) and
    two small products with `N⁻¹`. The pairs live in `(B, memory, D)` buffers kept between solves of
    one shape (see `implicitlayers.solvers.set_workspace_limit`): memory is `O(memory · B · D)`
    whatever `max_iter` is, and only the filled pairs are read.

    Args:
        memory: number of secant pairs kept (≥ 1). The default 40 lets a 20-unknown problem keep the
            ~2n pairs a linear one needs (with 20, the bowl above needs 120–140 steps instead of 46).
        line_search: backtrack (up to 3 halvings, one evaluation each) on samples whose residual
            norm grew. It tests on the host whether any sample needs it, one sync per step on CUDA.
    """

    memory: int = 40
    line_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "memory", low=1)
        if not isinstance(self.line_search, bool):
            raise ValueError(f"Broyden: line_search must be a bool, got {self.line_search!r}.")

    def init(self, fn, w, r, precond):
        # Under autograd (Unroll) in-place buffer writes would break the graph, so keep lists then.
        s = SimpleNamespace(w=w, r=r, precond=precond, count=0, n=0, grad=torch.is_grad_enabled())
        # norms in float32 for half precision (a float16 norm overflows at 256)
        s.wide = None if work_dtype(r.dtype) == r.dtype else work_dtype(r.dtype)
        s.r_norm = torch.linalg.vector_norm(r, dim=1, dtype=s.wide)
        s.limit = _GROWTH * s.r_norm  # a trial above this residual norm is rejected
        s.h0_scale = None  # per-sample factor γ of H₀ = γ·diag(P), learned at restarts; None while all 1
        s.Hr = self._h0(s, r)
        s.loosen = None  # per-sample factor on the limit after rejections in a row; None while none
        s.scale = None  # per-sample step factor after non-finite trials; None while none
        if s.grad:
            s.Z, s.Y = [], []
        else:
            s.pairs = _workspace.take(_Pairs, w, self.memory)
            s.pairs.N_inv.zero_()  # its strictly lower triangle must read as zeros
            s.coeff = s.pairs.N_inv.new_zeros(w.shape[0], 0)  # yᵢᵀ R(w) for the kept pairs, by slot
        return s

    def release(self, s) -> None:
        if not s.grad:
            _workspace.give_back(s.pairs)

    @staticmethod
    def _h0(s, x: torch.Tensor) -> torch.Tensor:
        """`H₀ x = γ · P ⊙ x` (`γ` is 1 until a restart has rescaled it)."""
        out = x if s.precond is None else x * s.precond
        return out if s.h0_scale is None else out * s.h0_scale.to(out.dtype)[:, None]

    def step(self, fn, s, frozen):
        # (the step factor is in the norms' dtype, float32 for half precision: keep the iterate's dtype)
        direction = -s.Hr if s.scale is None else s.Hr * -s.scale.to(s.Hr.dtype)[:, None]
        # The type-II update can make H exactly singular with H R = 0 (a linear KKT system does it in one step):
        # the step would be zero, R would not change, and nothing would ever move the sample again. Such a
        # sample takes the H₀ step instead; its secant pair changes H.
        # (Checked every fourth step on the CPU, where it costs a sync: a stuck sample stays stuck until then.)
        if s.grad or not direction.is_cpu or s.count % 4 == 1:
            moving = direction.any(1)
            if s.grad or not direction.is_cpu or not bool(moving.all()):
                stuck = ~moving & (s.r_norm > 0)
                direction = torch.where(stuck[:, None], -self._h0(s, s.r), direction)
        if frozen is not None:
            if s.grad:
                direction = torch.where(frozen[:, None], 0.0, direction)
            else:  # scaling is far cheaper than a row-masked fill on the CPU
                direction = direction * (~frozen).to(direction.dtype)[:, None]
        trial = s.w + direction
        r_trial = fn(trial)
        if self.line_search:
            trial, r_trial = self._backtrack(fn, s, direction, trial, r_trial)
            step = trial - s.w
        else:
            step = direction
        # y goes straight into its slot (when the memory is full, the slot of the pair about to leave).
        slot = None if s.grad else (s.count % self.memory if s.n == self.memory else s.n)
        y = torch.sub(r_trial, s.r, out=None if slot is None else s.pairs.Y_slot[slot])
        r_norm = torch.linalg.vector_norm(r_trial, dim=1, dtype=s.wide)
        # False for NaN. Each rejection in a row loosens the sample's limit `_LOOSEN`-fold (`s.loosen`).
        accepted = (r_norm <= s.limit) if s.loosen is None else (r_norm <= s.limit * s.loosen)
        # On the CPU the host test is free; elsewhere (and under autograd) the masks are always applied.
        any_rejected = s.grad or not trial.is_cpu or not bool(accepted.all())
        keep = rejected = None  # which pairs to keep: all, unless a trial was rejected (a non-finite y is dropped)
        if any_rejected:
            rejected = ~accepted
            # A rejected sample stays where it was but keeps the pair (when finite): its next step is the
            # secant step from there, which knows how steeply R grew. A non-finite trial teaches nothing,
            # so the next step is also shortened.
            keep = torch.isfinite(r_norm)
            w = torch.where(rejected[:, None], s.w, trial)
            r = torch.where(rejected[:, None], s.r, r_trial)
            r_norm = torch.where(rejected, s.r_norm, r_norm)
            loosen = torch.ones_like(r_norm) if s.loosen is None else s.loosen
            s.loosen = torch.where(rejected, _LOOSEN * loosen, 1.0)
            scale = torch.ones_like(r_norm) if s.scale is None else s.scale
            s.scale = torch.where(rejected, torch.where(keep, scale, _SHRINK * scale), 1.0)
        else:
            w, r, s.scale, s.loosen = trial, r_trial, None, None
        # The fifth rejection in a row also drops the sample's pairs (a restart from H₀).
        restart = None if s.loosen is None else s.loosen == _LOOSEN**_RESTART_AFTER
        if restart is not None and (not y.is_cpu or s.grad or bool(restart.any())):
            # Restart with H₀ rescaled by the last secant pair (Barzilai–Borwein: γ = |sᵀPy| / |Py|²), only
            # ever shrinking it: five overshooting steps in a row say that H₀'s steps are far too long for
            # this problem's curvature (a Minimize whose step_size is above 2 / its largest curvature).
            py = y if s.precond is None else y * s.precond
            fitted = dot(step, py).abs() / dot(py, py).clamp_min(torch.finfo(py.dtype).tiny)
            current = torch.ones_like(fitted) if s.h0_scale is None else s.h0_scale
            fitted = torch.where(torch.isfinite(fitted) & (fitted > 0), torch.minimum(fitted, current), current)
            s.h0_scale = torch.where(restart, fitted, current)
        if s.grad:
            self._record_unrolled(s, step, y, r, keep, restart)
        else:
            self._record(s, slot, step, y, r_trial, r, keep, rejected, restart)
        s.count += 1
        s.w, s.r, s.r_norm = w, r, r_norm
        s.limit = torch.minimum(s.limit, _GROWTH * r_norm)
        return s

    def _record(self, s, slot, step, y, r_trial, r, keep, rejected, restart) -> None:
        """Keep the pair `(step, y)` (`y` is already in its slot) and compute the next `H r`: two passes
        over the pairs and two small products with the inverse triangle.

        Slots are circular; the triangle is kept in chronological order (oldest first), so when the
        memory is full the slot coefficients are rolled by the oldest slot's index. The buffers hold
        `N⁻¹` rather than `N`: appending a column costs one small product, `[[N, b], [0, d]]⁻¹ =
        [[N⁻¹, −N⁻¹b/d], [0, 1/d]]`, dropping the oldest pair keeps the trailing block (the inverse
        of a trailing block of a triangular matrix is the trailing block of its inverse), and `N⁻¹ a`
        is a plain batched product (a triangular solve on a slice of the buffer copies it first).
        `s.coeff` holds `yᵢᵀ R(w)` at the current point, by slot.
        """
        pairs, n, m = s.pairs, s.n, self.memory
        inv = pairs.N_inv
        if keep is not None:  # a non-finite y carries nothing
            y = torch.where(keep[:, None], y, y.new_zeros(()), out=y)
        coeff = bmm(r_trial[:, None], pairs.Y_first[n].mT)[:, 0]  # yᵢᵀ R(trial), by slot
        col = coeff - s.coeff  # yᵢᵀ y
        if keep is not None:
            col = torch.where(keep[:, None], col, 0.0)
        if rejected is not None:  # a rejected sample's point, hence its coefficients, did not change
            coeff = torch.where(rejected[:, None], s.coeff, coeff)
        if n == m:  # the oldest pair leaves its slot to the new one: keep the trailing block
            col = torch.roll(col, -slot, 1)[:, 1:]
            inv[:, :-1, :-1] = inv[:, 1:, 1:].clone()
            row = m - 1
        else:
            row = n
            coeff = torch.cat((coeff, pairs.zero_column), 1)
        torch.sub(step, self._h0(s, y), out=pairs.Z_slot[slot])
        # 1 / yᵀy, with yᵀy floored so that a pair with y = 0 (a frozen sample) drops out
        inv_d = dot(y, y).clamp_min_(torch.finfo(inv.dtype).tiny).reciprocal_()
        if row:
            torch.mul(torch.bmm(pairs.N_inv_first[row], col[:, :, None])[:, :, 0], inv_d.neg()[:, None],
                      out=pairs.N_inv_column[row])
        pairs.N_inv_diagonal[row].copy_(inv_d)
        coeff[:, slot] = dot(y, r)
        n = row + 1
        if restart is not None and (not y.is_cpu or bool(restart.any())):  # masks, not indexing: no sync
            held = (~restart).to(y.dtype)[:, None, None]
            pairs.Y.mul_(held)
            pairs.Z.mul_(held)
            inv.copy_(torch.where(restart[:, None, None], torch.eye(m, dtype=inv.dtype, device=y.device), inv))
            coeff = torch.where(restart[:, None], 0.0, coeff)
        s.coeff, s.n = coeff, n
        oldest = (s.count + 1) % m if n == m else 0
        c = torch.roll(coeff, -oldest, 1) if oldest else coeff
        c = torch.bmm(pairs.N_inv_first[n], c[:, :, None])[:, :, 0]
        c = torch.roll(c, oldest, 1) if oldest else c
        if c.dtype != r.dtype:
            c = c.to(r.dtype)
        s.Hr = torch.baddbmm(self._h0(s, r)[:, None], c[:, None], pairs.Z_first[n])[:, 0]

    def _record_unrolled(self, s, step, y, r, keep, restart) -> None:
        """The same update under autograd, from lists and without in-place writes (for `Unroll`)."""
        if keep is not None:
            y = torch.where(keep[:, None], y, 0.0)
            step = torch.where(keep[:, None], step, 0.0)
        s.Y = (s.Y + [y])[-self.memory :]
        s.Z = (s.Z + [step - self._h0(s, y)])[-self.memory :]
        if restart is not None:
            s.Y = [torch.where(restart[:, None], 0.0, v) for v in s.Y]
            s.Z = [torch.where(restart[:, None], 0.0, v) for v in s.Z]
        Y, Z = torch.stack(s.Y, 1), torch.stack(s.Z, 1)
        N = torch.triu(bmm(Y, Y.mT))
        unused = torch.diagonal(N, dim1=1, dim2=2) == 0  # a pair that carries nothing: an identity row
        N = N + torch.diag_embed(unused.to(N.dtype))
        c = torch.linalg.solve_triangular(N, bmm(Y, r[:, :, None]), upper=True).to(r.dtype)
        s.n = len(s.Y)
        s.Hr = self._h0(s, r) + torch.bmm(c.mT, Z)[:, 0]

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


class _Pairs:
    """Broyden's `(B, memory, D)` pairs by circular slot (`Z = S − H₀ Y` and `Y`), the inverse `N⁻¹`
    of the chronological `(B, memory, memory)` triangle, and the views a step uses, made once.

    Slots beyond the filled ones are never read, so only `N⁻¹` is zeroed (once per solve), and the
    object can serve one solve after another (`_workspace`). `N⁻¹` is kept in at least float32.
    """

    def __init__(self, like: torch.Tensor, memory: int) -> None:
        batch, dim = like.shape
        self.Z = like.new_empty(batch, memory, dim)
        self.Y = like.new_empty(batch, memory, dim)
        self.N_inv = torch.zeros(batch, memory, memory, dtype=work_dtype(like.dtype), device=like.device)
        self.nbytes = self.Z.nbytes + self.Y.nbytes + self.N_inv.nbytes
        self.Z_first = [self.Z[:, :n] for n in range(memory + 1)]
        self.Y_first = [self.Y[:, :n] for n in range(memory + 1)]
        self.N_inv_first = [self.N_inv[:, :n, :n] for n in range(memory + 1)]
        self.N_inv_column = [self.N_inv[:, :n, n] for n in range(memory)]  # above the diagonal
        self.N_inv_diagonal = [self.N_inv[:, n, n] for n in range(memory)]
        self.zero_column = self.N_inv.new_zeros(batch, 1)
        self.Z_slot, self.Y_slot = self.Z.unbind(1), self.Y.unbind(1)
