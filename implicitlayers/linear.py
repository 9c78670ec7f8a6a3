"""Matrix-free, batched linear solvers for the backward pass: `CG`, `GMRES`, `Neumann`, `Dense`.

Each solves `A x = b` per sample, where `A` is given only through `matvec: (B, D) -> (B, D)` (for the
IFT adjoint of a block, `A = (∂R/∂w)ᵀ` applied by a vector–Jacobian product). Every scalar of the
method (CG's α and β, GMRES's least-squares problem, the convergence test) is per sample, so a
sample's solution does not depend on the rest of the batch, and a converged sample stops changing.

`CG`, `GMRES` and `Neumann` run on the solvers' shared loop (`implicitlayers.solvers._loop.iterate`), which
owns per-sample stopping and freezing, the best iterate, divergence and NaN isolation, `SolveInfo.status`,
the trace and the failure policy; each only supplies `init`/`step`. `Neumann` is `FixedPointIteration`'s
linear solve. `Dense` is a direct solve.

The stopping measure is `‖A x − b‖ / (‖b‖ + tiny)` (`stop="rel"`) or `‖A x − b‖` (`"abs"`), as for every
`solve_linear` of the package. The result is reported like every other solve: a `SolveInfo` and the
solver's `on_failure` policy, so a
backward solve that failed (not converged, broke down, or turned NaN) warns or raises instead of
silently handing back a wrong gradient. Under autograd (`create_graph` in a double backward) the
solvers use no in-place writes on tensors that carry gradients, so their output is differentiable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch

from .solvers import FixedPointIteration, IterativeMethod, SolveInfo, SolverConfig, apply_failure_policy
from .solvers._external import without_false_claims
from .solvers._info import Status
from .solvers._linear import linear_system
from .solvers._loop import iterate
from .solvers._protocol import MatVec

__all__ = ["CG", "GMRES", "Neumann", "Dense", "MatVec"]


def _for_every_cause(advice: str) -> dict[str, str]:
    """The same advice for every failure cause (see `apply_failure_policy`)."""
    return dict.fromkeys(("max_iter", "stalled", "diverged", "nonfinite"), advice)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None], a, b)


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(1)


class _Krylov(SolverConfig):
    """A Krylov method on the shared loop: the loop's function is the matvec `A` itself (each call one
    counted product), and the method's state carries `b`; the loop's residual is `A x − b`."""

    # Advice by failure cause for the failure message (`apply_failure_policy`), as IterativeSolver.linear_hints.
    linear_hints: ClassVar[Mapping[str, str]]

    def solve_linear(self, matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
                     precond: torch.Tensor | None = None, name: str = "linear solve",
                     hints: Mapping[str, str] | None = None) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo`.

        The relative stopping measure is ‖A x − b‖ / ‖b‖ (`stop="rel"`); `hints` is advice by failure cause.
        """
        system = linear_system(self, matvec, b, x0, precond, name)
        self._check_precond(system.who, precond)
        # A nonzero start costs one product, counted like the loop's (SolveInfo.nfe counts every matvec).
        start_product = system.r0 is None
        r0 = system.matvec(system.x0) - b if start_product else system.r0
        hints = hints or self.linear_hints
        # The policy is applied below, once the claimed convergence has been checked against the true residual.
        method = dataclasses.replace(self, on_failure="ignore")._method(b, precond)
        x, info = iterate(method, system.matvec, system.x0, name=name, hints=hints, scale=system.scale, r0=r0)
        info = self._verified(info, system.matvec(x) - b, system.scale)
        if start_product:
            info = dataclasses.replace(info, nfe=info.nfe + 1)
        apply_failure_policy(info, name=name, tol=self.tol, max_iter=self.max_iter, on_failure=self.on_failure, hints=hints)
        return x, info

    def _verified(self, info: SolveInfo, r_true: torch.Tensor, scale: torch.Tensor) -> SolveInfo:
        """`info` with each claimed convergence checked against the true residual `A x − b` (one more product).

        The methods track ‖A x − b‖ by a recurrence (GMRES from its small least-squares problem, CG from its
        residual update). On an inconsistent singular system the estimate falls below `tol` while `x` runs off
        to 1e30 and the true residual stays large; rounding drift also separates the two. A sample whose true
        measure exceeds `tol` is reported `STALLED` (`NONFINITE` for a non-finite one); every sample's residual is
        its true measure.
        """
        norm = torch.linalg.vector_norm(r_true, dim=1, dtype=scale.dtype if scale.dtype != r_true.dtype else None)
        measure = torch.nan_to_num(norm / scale if self.stop == "rel" else norm, nan=float("inf"))
        info, _ = without_false_claims(info, measure, self.tol)
        # The reported residual is the true one of the returned x (the estimate can differ by orders of magnitude).
        return dataclasses.replace(info, nfe=info.nfe + 1, residual=measure.to(info.residual.dtype))

    def _check_precond(self, who: str, precond: torch.Tensor | None) -> None:
        """Reject a preconditioner the method cannot use (nothing by default)."""

    def _method(self, b: torch.Tensor, precond: torch.Tensor | None) -> IterativeMethod[Any]:
        """The method's `init`/`step` bound to this system (each subclass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} must define _method")


@dataclasses.dataclass
class _CGState:
    w: torch.Tensor  # the iterate x
    r: torch.Tensor  # b − A x by the recurrence (the loop takes only its norm)
    r_norm: torch.Tensor  # ‖r‖, inf where the curvature pᵀA p was not positive (a breakdown)
    p: torch.Tensor
    rz: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _CGMethod:
    """CG's `init`/`step` for the loop (`IterativeMethod`), bound to one system's `precond`."""

    config: "CG"
    precond: torch.Tensor | None

    def __getattr__(self, option: str):  # tol, max_iter, stop, ...: the config's
        return getattr(self.config, option)

    def init(self, fn, x, r, precond) -> _CGState:
        r = -r  # the loop's residual is A x − b; CG's recurrence runs on b − A x
        z = r if self.precond is None else r * self.precond
        return _CGState(w=x, r=r, r_norm=torch.linalg.vector_norm(r, dim=1), p=z, rz=_dot(r, z))

    def step(self, fn, s: _CGState, frozen: torch.Tensor | None) -> _CGState:
        Ap = fn(s.p)
        pAp = _dot(s.p, Ap)
        active = pAp > 0  # False for NaN too
        if frozen is not None:
            active = active & ~frozen
        alpha = torch.where(active, s.rz / torch.where(active, pAp, 1.0), 0.0)
        x = s.w + alpha[:, None] * s.p
        r = s.r - alpha[:, None] * Ap
        z = r if self.precond is None else r * self.precond
        rz = _dot(r, z)
        beta = torch.where(active, rz / torch.where(active, s.rz, 1.0), 0.0)
        p = _where(active, z + beta[:, None] * s.p, s.p)
        r_norm = torch.linalg.vector_norm(r, dim=1)
        broke = ~(pAp > 0) if frozen is None else ~(pAp > 0) & ~frozen
        # A breakdown ends the sample as non-finite (the loop freezes it and keeps its best iterate).
        return _CGState(w=x, r=r, r_norm=torch.where(broke, torch.inf, r_norm), p=p, rz=torch.where(active, rz, s.rz))

    def release(self, state) -> None:
        """CG keeps no reusable buffers."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CG(_Krylov):
    """Conjugate gradients, per sample, for a symmetric positive-definite `A`, on the shared loop.

    A diagonal `precond` is used as a Jacobi preconditioner `M⁻¹ = diag(P)` (it must be positive, which
    keeps the preconditioned operator symmetric positive-definite). A sample whose curvature `pᵀA p`
    is not positive (an indefinite or nonsymmetric `A`) or not finite stops there and is reported failed
    (status non-finite). The residual measured is CG's recurrence, which can drift from `A x − b` in
    finite precision by a few rounding errors of ‖A‖‖x‖.
    """

    max_iter: int = 100
    linear_hints: ClassVar[Mapping[str, str]] = _for_every_cause(
        "CG needs a symmetric positive-definite operator (use il.linear.GMRES otherwise); else increase max_iter or loosen tol")

    def _check_precond(self, who: str, precond: torch.Tensor | None) -> None:
        if precond is not None and not bool((precond > 0).all()):
            raise ValueError(f"{who}: precond must be positive to keep CG's operator symmetric positive-definite.")

    def _method(self, b: torch.Tensor, precond: torch.Tensor | None) -> IterativeMethod[Any]:
        return _CGMethod(self, precond)


@dataclasses.dataclass
class _GMRESState:
    w: torch.Tensor  # x = base + P V y, the cycle's current least-squares iterate
    r: None  # GMRES knows only ‖A x − b‖ (from its small QR) during a cycle
    r_norm: torch.Tensor
    base: torch.Tensor  # the iterate the cycle started from
    beta: torch.Tensor  # ‖b − A base‖
    basis: list[torch.Tensor] | torch.Tensor  # the Arnoldi vectors (a list under autograd)
    columns: list[torch.Tensor]  # the Hessenberg matrix's columns
    k: int  # Arnoldi steps taken in this cycle


@dataclasses.dataclass(frozen=True)
class _GMRESMethod:
    """GMRES's `init`/`step` for the loop: one Arnoldi step (one matvec) per step, a restart every
    `restart` steps (one more matvec: the true residual)."""

    config: "GMRES"
    b: torch.Tensor
    precond: torch.Tensor | None

    def __getattr__(self, option: str):  # tol, max_iter, stop, ...: the config's
        return getattr(self.config, option)

    def init(self, fn, x, r, precond) -> _GMRESState:
        return self._cycle(x, -r, torch.linalg.vector_norm(r, dim=1))

    def _cycle(self, x: torch.Tensor, r: torch.Tensor, r_norm: torch.Tensor) -> _GMRESState:
        """A new cycle from `x` with residual `r = b − A x`."""
        batch, dim = r.shape
        v = r / torch.where(r_norm > torch.finfo(r.dtype).tiny, r_norm, 1.0)[:, None]
        # Under autograd the basis is a list (no in-place writes); otherwise one preallocated buffer.
        basis: list[torch.Tensor] | torch.Tensor
        if torch.is_grad_enabled():
            basis = [v]
        else:
            basis = r.new_empty(batch, self.config.restart + 1, dim)
            basis[:, 0] = v
        return _GMRESState(w=x, r=None, r_norm=r_norm, base=x, beta=r_norm, basis=basis, columns=[], k=0)

    def step(self, fn, s: _GMRESState, frozen: torch.Tensor | None) -> _GMRESState:
        if s.k == self.config.restart:
            # Restart from the true residual, which also corrects the drift of the estimate.
            r = self.b - fn(s.w)
            s = self._cycle(s.w, r, torch.linalg.vector_norm(r, dim=1))
        k, steps, basis = s.k, self.config.restart, s.basis
        grad = isinstance(basis, list)
        batch = s.w.shape[0]
        tiny = torch.finfo(s.w.dtype).tiny
        V = torch.stack(basis, 1) if isinstance(basis, list) else basis[:, : k + 1]
        v = V[:, k]
        w = fn(v if self.precond is None else v * self.precond)
        h = torch.zeros(batch, 1, k + 1, dtype=w.dtype, device=w.device)
        for _ in range(2):  # classical Gram–Schmidt, twice ("twice is enough")
            c = torch.bmm(w[:, None], V.transpose(1, 2))
            w = w - torch.bmm(c, V)[:, 0]
            h = h + c
        h_next = torch.linalg.vector_norm(w, dim=1)
        # A (near-)zero h_next is a lucky breakdown: the solution lies in the basis; the next vector is unused.
        v_next = w / torch.where(h_next > tiny, h_next, 1.0)[:, None]
        if isinstance(basis, list):
            basis.append(v_next)
        else:
            basis[:, k + 1] = v_next
        s.columns.append(torch.nn.functional.pad(torch.cat([h[:, 0], h_next[:, None]], 1), (0, steps - k - 1)))
        H = torch.stack(s.columns, 2)[:, : k + 2]
        # With H = Q R (complete), the least-squares residual of β e₁ is β |Q[0, k+1]|, and y = R⁻¹ β Q[0, :k+1].
        # The complete QR has no derivative, so under autograd y comes from a second, reduced one.
        with torch.no_grad():
            Q, R = torch.linalg.qr(H.detach() if grad else H, mode="complete")
        r_norm = s.beta.detach() * Q[:, 0, k + 1].abs()
        if grad:
            Q, R = torch.linalg.qr(H)
        y = torch.linalg.solve_triangular(R[:, : k + 1], (s.beta[:, None] * Q[:, 0, : k + 1])[:, :, None], upper=True)
        update = torch.bmm(y.transpose(1, 2), V)[:, 0]
        x = s.base + (update if self.precond is None else update * self.precond)
        # A non-finite least-squares solution ends the sample (the loop reads a non-finite norm).
        r_norm = torch.where(torch.isfinite(y[:, :, 0]).all(1), r_norm, torch.nan)
        if frozen is not None:
            x, r_norm = _where(frozen, s.w, x), torch.where(frozen, s.r_norm, r_norm)
        s.w, s.r_norm, s.k = x, r_norm, k + 1
        return s

    def release(self, state) -> None:
        """GMRES keeps no reusable buffers between solves."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(_Krylov):
    """Restarted GMRES, per sample, for any nonsingular `A`, on the shared loop.

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors (classical Gram–Schmidt,
    applied twice for stability) and solves each sample's small least-squares problem
    `min_y ‖β e₁ − H y‖` by a QR factorisation, whose last `Q` entry is the residual norm, so every
    sample stops at its own iteration. A diagonal `precond` is applied on the right (`A P u = b`,
    `x = P u`), which leaves the stopping measure the true residual. The residual measured during a
    cycle is the least-squares estimate (exact up to rounding); a restart measures the true one.
    `max_iter` counts Arnoldi steps (one matvec each; a restart costs one more).

    Args:
        restart: Krylov dimension per cycle (≥ 1); memory is `O(restart · B · D)`.
    """

    max_iter: int = 100
    restart: int = 20
    linear_hints: ClassVar[Mapping[str, str]] = _for_every_cause("increase max_iter or restart, loosen tol, or precondition the system")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an integer >= 1, got {self.restart!r}.")

    def _method(self, b: torch.Tensor, precond: torch.Tensor | None) -> IterativeMethod[Any]:
        return _GMRESMethod(self, b, precond)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(FixedPointIteration):
    """Richardson iteration `x ← x − damping · P ⊙ (A x − b)`: the truncated Neumann series of `(P A)⁻¹ P b`.

    This is `FixedPointIteration` (Picard) on the root of `A x − b`, i.e. its `solve_linear`; the class
    exists under this name for the backward pass. With `P = 1` and the IFT adjoint `A = I − Jᵀ` of a
    fixed point this is the classic `x ← b + Jᵀ x`, which converges when the spectral radius of
    `I − P A` (of `J`) is below one. Each sample keeps its lowest-residual iterate. For a deliberately
    truncated series (a fixed number of terms) set `max_iter` and `on_failure="ignore"`.
    """

    linear_hints: ClassVar[Mapping[str, str] | None] = _for_every_cause(
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
                     precond: torch.Tensor | None = None, name: str = "linear solve",
                     hints: Mapping[str, str] | None = None) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `A x = b` per sample; returns `x` (`(B, D)`) and its `SolveInfo` (`hints`: advice by cause)."""
        system = linear_system(self, matvec, b, x0, precond, name)
        batch, dim = b.shape
        if dim > self.max_dim:
            raise ValueError(f"{system.who}: D = {dim} exceeds max_dim = {self.max_dim}; materialising A would take "
                             f"{dim} matvecs and B·D² memory. Use il.linear.GMRES or CG, or raise max_dim.")
        A = self._materialise(system.matvec, system.who, batch, dim, b)
        x, singular = torch.linalg.solve_ex(A, b[:, :, None])
        x = x[:, :, 0]
        res = torch.linalg.vector_norm(torch.bmm(A, x[:, :, None])[:, :, 0] - b, dim=1)
        res = res / system.scale if self.stop == "rel" else res
        res = torch.where(singular == 0, torch.nan_to_num(res, nan=torch.inf), torch.inf)
        nstep = torch.ones(batch, dtype=torch.long, device=b.device)
        converged = res <= self.tol
        # A direct solve has no iteration cap to hit: an unmet tol is a singular or ill-conditioned sample.
        # A finite x that misses tol is a (nearly) singular or ill-conditioned sample; a non-finite x, an exactly
        # singular one or non-finite data.
        status = torch.where(converged, int(Status.CONVERGED),
                             torch.where(torch.isfinite(x).all(1), int(Status.STALLED), int(Status.NONFINITE)))
        info = SolveInfo(nstep=nstep, residual=res, converged=converged, nfe=dim, trace=[res] if self.trace else None,
                         status=status)
        apply_failure_policy(info, name=name, tol=self.tol, max_iter=self.max_iter, on_failure=self.on_failure,
                             hint="the system is singular or too ill-conditioned for this dtype; try float64", hints=hints)
        return x, info

    @staticmethod
    def _materialise(matvec: MatVec, who: str, batch: int, dim: int, b: torch.Tensor) -> torch.Tensor:
        """`A` as `(B, D, D)`: column j is `matvec(e_j)` for every sample."""
        eye = torch.eye(dim, dtype=b.dtype, device=b.device)
        probes = eye[:, None, :].expand(dim, batch, dim)
        try:
            chunk = max(1, (1 << 22) // max(1, batch * dim))
            columns = torch.func.vmap(matvec, chunk_size=chunk)(probes)
        except (RuntimeError, NotImplementedError, ValueError):
            # matvec is not vmappable (e.g. it calls torch.autograd.grad): one call per column instead.
            columns = torch.stack([matvec(probes[j].contiguous()) for j in range(dim)])
        if columns.shape != (dim, batch, dim):
            raise ValueError(f"{who}: matvec returned {tuple(columns.shape[1:])} for an input of shape {(batch, dim)}.")
        return columns.permute(1, 2, 0)
