"""Matrix-free, batched linear solvers for the backward pass: `CG`, `GMRES`, `Neumann`, `Dense`.

Each solves `A x = b` per sample, where `A` is given only through `matvec: (B, D) -> (B, D)` (for the
IFT adjoint of a block, `A = (∂R/∂w)ᵀ` applied by a vector–Jacobian product). Every scalar of the
method (CG's α and β, GMRES's least-squares problem, the convergence test) is per sample, so a
sample's solution does not depend on the rest of the batch, and a converged sample stops changing.

The stopping measure is `‖A x − b‖ / (‖b‖ + tiny)` (`stop="rel"`) or `‖A x − b‖` (`"abs"`). The
result is reported like every other solve: a `SolveInfo` and the solver's `on_failure` policy, so a
backward solve that failed (not converged, broke down, or turned NaN) warns or raises instead of
silently handing back a wrong gradient. Under autograd (`create_graph` in a double backward) the
solvers use no in-place writes on tensors that carry gradients, so their output is differentiable.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .solvers import SolverConfig, SolveInfo, apply_failure_policy

__all__ = ["CG", "GMRES", "Neumann", "Dense", "MatVec"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


class _Problem:
    """The validated system, the matvec counter and the stopping measure shared by the solvers."""

    def __init__(self, solver: SolverConfig, matvec: MatVec, b: object, x0: object, precond: object, name: str):
        who = f"{name} ({type(solver).__name__})"
        if not callable(matvec):
            raise TypeError(f"{who}: matvec must be callable (B, D) -> (B, D), got {type(matvec).__name__}.")
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or not b.is_floating_point():
            got = f"shape {tuple(b.shape)}, {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise TypeError(f"{who}: b must be a floating-point tensor of shape (B, D), got {got}.")
        for label, t, shapes in (("x0", x0, [b.shape]), ("precond", precond, [b.shape[1:], (1, b.shape[1]), b.shape])):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{who}: {label} must be a tensor or None, got {type(t).__name__}.")
            if tuple(t.shape) not in [tuple(s) for s in shapes]:
                raise ValueError(f"{who}: {label} has shape {tuple(t.shape)}; expected one of {[tuple(s) for s in shapes]}.")
        self.who, self.matvec, self.b, self.precond, self.name = who, matvec, b, precond, name
        self.nfe = 0
        b_norm = torch.linalg.vector_norm(b, dim=1)
        self.scale = b_norm + torch.finfo(b.dtype).tiny if solver.stop == "rel" else torch.ones_like(b_norm)
        # b = 0 has the exact solution 0; starting there avoids chasing an exact zero in "rel".
        self.x0 = torch.zeros_like(b) if x0 is None else torch.where((b_norm == 0)[:, None], 0.0, x0)
        self.check_every = solver.check_every or (8 if b.is_cuda else 1)
        self.tol = solver.tol

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """`A x`, counted and shape-checked."""
        self.nfe += 1
        out = self.matvec(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{self.who}: matvec returned {got} for an input of shape {tuple(x.shape)}; it must return the same shape.")
        return out

    def initial_residual(self) -> torch.Tensor:
        """`b − A x0` (free when `x0` is zero)."""
        return self.b if not bool(self.x0.any()) else self.b - self.apply(self.x0)

    def measure(self, r: torch.Tensor) -> torch.Tensor:
        """Per-sample stopping measure; non-finite → inf so that `<= tol` is False."""
        return torch.nan_to_num(torch.linalg.vector_norm(r, dim=1) / self.scale, nan=float("inf"))

    def finish(self, solver: SolverConfig, x, res, nstep, trace, hint: str) -> tuple[torch.Tensor, SolveInfo]:
        info = SolveInfo(nstep=nstep, residual=res, converged=res <= solver.tol, nfe=self.nfe, trace=trace)
        apply_failure_policy(info, name=self.name, tol=solver.tol, max_iter=solver.max_iter,
                             on_failure=solver.on_failure, hint=hint)
        return x, info


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None], a, b)


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(SolverConfig):
    """Conjugate gradients, per sample, for a symmetric positive-definite `A`.

    A diagonal `precond` is used as a Jacobi preconditioner `M⁻¹ = diag(P)` (it must be positive, which
    keeps the preconditioned operator symmetric positive-definite). A sample whose curvature `pᵀA p`
    is not positive (an indefinite or nonsymmetric `A`) or not finite stops there and is reported failed.
    """

    max_iter: int = 100

    def solve_linear(self, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                     precond: torch.Tensor | None = None, name: str = "linear solve") -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`."""
        pb = _Problem(self, matvec, b, x0, precond, name)
        if precond is not None and not bool((precond > 0).all()):
            raise ValueError(f"{pb.who}: precond must be positive to keep CG's operator symmetric positive-definite.")
        x, r = pb.x0, pb.initial_residual()
        z = r if precond is None else r * precond
        p, rz = z, _dot(r, z)
        res = pb.measure(r)
        failed = ~torch.isfinite(res)
        done = (res <= self.tol) | failed
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [res] if self.trace else None
        for k in range(self.max_iter):
            if k % pb.check_every == 0 and bool(done.all()):
                break
            Ap = pb.apply(p)
            pAp = _dot(p, Ap)
            breakdown = ~done & ~(pAp > 0)  # also catches NaN
            failed = failed | breakdown
            active = ~done & ~breakdown
            alpha = torch.where(active, rz / torch.where(active, pAp, 1.0), 0.0)
            x = _where(active, x + alpha[:, None] * p, x)
            r = _where(active, r - alpha[:, None] * Ap, r)
            z = r if precond is None else r * precond
            rz_new = _dot(r, z)
            beta = torch.where(active, rz_new / torch.where(active, rz, 1.0), 0.0)
            p = _where(active, z + beta[:, None] * p, p)
            rz = rz_new
            nstep = nstep + active
            res = pb.measure(r)
            failed = failed | (active & ~torch.isfinite(res))
            done = done | breakdown | (res <= self.tol) | failed
            if trace is not None:
                trace.append(res)
        # The recurrence drifts from the true residual in finite precision; report the true one.
        res = torch.where(failed, torch.inf, pb.measure(b - pb.apply(x)))
        return pb.finish(self, x, res, nstep, trace,
                         "CG needs a symmetric positive-definite operator (use il.linear.GMRES otherwise); "
                         "else increase max_iter or loosen tol")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(SolverConfig):
    """Restarted GMRES, per sample, for any nonsingular `A`.

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors (classical Gram–Schmidt,
    applied twice for stability) and solves each sample's small least-squares problem
    `min_y ‖β e₁ − H y‖` by a QR factorisation, whose last `Q` entry is the residual norm, so every
    sample stops at its own iteration. A diagonal `precond` is applied on the right (`A P u = b`,
    `x = P u`), which leaves the stopping measure the true residual. `max_iter` counts matvecs.

    Args:
        restart: Krylov dimension per cycle (≥ 1); memory is `O(restart · B · D)`.
    """

    max_iter: int = 100
    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an integer >= 1, got {self.restart!r}.")

    def solve_linear(self, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                     precond: torch.Tensor | None = None, name: str = "linear solve") -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`."""
        pb = _Problem(self, matvec, b, x0, precond, name)
        x, r = pb.x0, pb.initial_residual()
        res = pb.measure(r)
        failed = ~torch.isfinite(res)
        done = (res <= self.tol) | failed
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [res] if self.trace else None
        used = 0
        while used < self.max_iter and not bool(done.all()):
            steps = min(self.restart, self.max_iter - used)
            update, ran, cycle_failed, ran_steps = self._cycle(pb, r, res, done, steps, trace)
            used += ran_steps
            nstep = nstep + ran
            x = _where(done, x, x + update)
            r = b - pb.apply(x)
            res = torch.where(done, res, pb.measure(r))
            failed = failed | (~done & (cycle_failed | ~torch.isfinite(res)))
            done = done | failed | (res <= self.tol)
        return pb.finish(self, x, torch.where(failed, torch.inf, res), nstep, trace,
                         "increase max_iter or restart, loosen tol, or precondition the system")

    def _cycle(self, pb: _Problem, r: torch.Tensor, res: torch.Tensor, done: torch.Tensor, steps: int, trace):
        """One GMRES cycle from residual `r`: the update of `x`, the steps each sample ran, breakdowns, matvecs."""
        batch, dim = r.shape
        grad = torch.is_grad_enabled()
        beta = torch.linalg.vector_norm(r, dim=1)
        tiny = torch.finfo(r.dtype).tiny
        v = r / torch.where(beta > tiny, beta, 1.0)[:, None]
        # Under autograd the basis is a list (no in-place writes); otherwise one preallocated buffer.
        basis = [v] if grad else r.new_empty(batch, steps + 1, dim)
        if not grad:
            basis[:, 0] = v
        columns = []  # columns of the Hessenberg matrix, each padded to steps + 1 rows
        y_kept = r.new_zeros(batch, steps)
        stopped = done.clone()
        ran = torch.zeros(batch, dtype=torch.long, device=r.device)
        cycle_failed = torch.zeros_like(done)
        for k in range(steps):
            V = torch.stack(basis, 1) if grad else basis[:, : k + 1]
            w = pb.apply(v if pb.precond is None else v * pb.precond)
            h = torch.zeros(batch, 1, k + 1, dtype=r.dtype, device=r.device)
            for _ in range(2):  # classical Gram–Schmidt, twice ("twice is enough")
                c = torch.bmm(w[:, None], V.transpose(1, 2))
                w = w - torch.bmm(c, V)[:, 0]
                h = h + c
            h_next = torch.linalg.vector_norm(w, dim=1)
            # A (near-)zero h_next is a lucky breakdown: the solution lies in the basis; the next vector is unused.
            v = w / torch.where(h_next > tiny, h_next, 1.0)[:, None]
            if grad:
                basis.append(v)
            else:
                basis[:, k + 1] = v
            col = torch.cat([h[:, 0], h_next[:, None]], 1)
            columns.append(torch.nn.functional.pad(col, (0, steps - k - 1)))
            H = torch.stack(columns, 2)[:, : k + 2]
            # With H = Q R (complete), the least-squares residual of β e₁ is β |Q[0, k+1]|, and y = R⁻¹ β Q[0, :k+1].
            # The complete QR has no derivative, so under autograd y comes from a second, reduced one.
            with torch.no_grad():
                Q, R = torch.linalg.qr(H.detach() if grad else H, mode="complete")
            estimate = torch.nan_to_num(beta.detach() * Q[:, 0, k + 1].abs() / pb.scale.detach(), nan=float("inf"))
            if grad:
                Q, R = torch.linalg.qr(H)
            y = torch.linalg.solve_triangular(R[:, : k + 1], (beta[:, None] * Q[:, 0, : k + 1])[:, :, None], upper=True)[:, :, 0]
            y = torch.nn.functional.pad(y, (0, steps - k - 1))
            active = ~stopped
            ran = ran + active
            bad = active & (~torch.isfinite(estimate) | ~torch.isfinite(y).all(1))
            cycle_failed = cycle_failed | bad
            keep = active & ~bad & ((estimate <= pb.tol) | (k == steps - 1))
            y_kept = _where(keep, y, y_kept)
            stopped = stopped | keep | bad
            if trace is not None:
                res = torch.where(active, estimate, res)
                trace.append(res)
            if k % pb.check_every == 0 and bool(stopped.all()):
                break
        n = k + 1
        V = torch.stack(basis[:n], 1) if grad else basis[:, :n]
        update = torch.bmm(y_kept[:, None, :n], V)[:, 0]
        return (update if pb.precond is None else update * pb.precond), ran, cycle_failed, n


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(SolverConfig):
    """Richardson iteration `x ← x − P ⊙ (A x − b)`, i.e. the truncated Neumann series of `(P A)⁻¹ P b`.

    With `P = 1` and the IFT adjoint `A = I − Jᵀ` of a fixed point this is the classic
    `x ← b + Jᵀ x`, which converges when the spectral radius of `I − P A` (of `J`) is below one.
    Each sample keeps its lowest-residual iterate. For a deliberately truncated series (a fixed
    number of terms) set `max_iter` and `on_failure="ignore"`.
    """

    def solve_linear(self, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                     precond: torch.Tensor | None = None, name: str = "linear solve") -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`."""
        pb = _Problem(self, matvec, b, x0, precond, name)
        x = pb.x0
        best_x, best_res = x, torch.full_like(b[:, 0], torch.inf)
        done = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [] if self.trace else None
        # One more matvec than steps: the residual of the last step's iterate is measured too.
        for k in range(self.max_iter + 1):
            if k % pb.check_every == 0 and bool(done.all()):
                break
            r = pb.apply(x) - b
            res = pb.measure(r)
            improved = ~done & (res < best_res)
            best_x, best_res = _where(improved, x, best_x), torch.where(improved, res, best_res)
            done = done | (best_res <= self.tol) | (res == torch.inf)
            if trace is not None:
                trace.append(res)
            if k == self.max_iter:
                break
            nstep = nstep + ~done
            step = r if precond is None else r * precond
            x = _where(done, x, x - step)
        return pb.finish(self, best_x, best_res, nstep, trace,
                         "the series converges only when the spectral radius of I − P·A is below 1; "
                         "use il.linear.GMRES, a smaller precond (step), or increase max_iter")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dense(SolverConfig):
    """Materialise each sample's `A` with `D` matvecs and solve it directly (`torch.linalg.solve_ex`).

    Exact up to rounding and independent of conditioning short of singularity, but costs `D` matvecs
    and `O(B · D²)` memory, so it is for small `D` (checking, tiny blocks). The columns are computed
    with `torch.func.vmap` over the identity when `matvec` allows it, else one matvec per column.
    `x0`, `precond` and `max_iter` play no part; a singular sample is reported failed.

    Args:
        max_dim: refuse systems with `D` above this (a `ValueError` that suggests GMRES/CG).
    """

    max_dim: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_dim, int) or self.max_dim < 1:
            raise ValueError(f"Dense: max_dim must be an integer >= 1, got {self.max_dim!r}.")

    def solve_linear(self, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                     precond: torch.Tensor | None = None, name: str = "linear solve") -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`."""
        pb = _Problem(self, matvec, b, x0, precond, name)
        batch, dim = b.shape
        if dim > self.max_dim:
            raise ValueError(f"{pb.who}: D = {dim} exceeds max_dim = {self.max_dim}; materialising A would take "
                             f"{dim} matvecs and B·D² memory. Use il.linear.GMRES or CG, or raise max_dim.")
        A = self._materialise(pb, batch, dim, b)
        x, status = torch.linalg.solve_ex(A, b[:, :, None])
        x = x[:, :, 0]
        res = pb.measure(torch.bmm(A, x[:, :, None])[:, :, 0] - b)
        res = torch.where(status == 0, res, torch.inf)
        nstep = torch.ones(batch, dtype=torch.long, device=b.device)
        return pb.finish(self, x, res, nstep, [res] if self.trace else None,
                         "the system is singular or too ill-conditioned for this dtype; try float64")

    @staticmethod
    def _materialise(pb: _Problem, batch: int, dim: int, b: torch.Tensor) -> torch.Tensor:
        """`A` as `(B, D, D)`: column j is `matvec(e_j)` for every sample."""
        eye = torch.eye(dim, dtype=b.dtype, device=b.device)
        probes = eye[:, None, :].expand(dim, batch, dim)
        try:
            chunk = max(1, (1 << 22) // max(1, batch * dim))
            columns = torch.func.vmap(pb.matvec, chunk_size=chunk)(probes)
            pb.nfe += dim
        except (RuntimeError, NotImplementedError, ValueError):
            # matvec is not vmappable (e.g. it calls torch.autograd.grad): one call per column instead.
            columns = torch.stack([pb.apply(probes[j].contiguous()) for j in range(dim)])
        if columns.shape != (dim, batch, dim):
            raise ValueError(f"{pb.who}: matvec returned {tuple(columns.shape[1:])} for an input of shape {(batch, dim)}.")
        return columns.permute(1, 2, 0)
