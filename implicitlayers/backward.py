"""How a block's solution is differentiated: exact implicit differentiation, phantom gradients, unrolling.

Each backward mode is an object that owns its differentiation. The layer hands a mode a
[`BlockSolve`][implicitlayers.backward.BlockSolve] — one compiled block, the tensors it reads, its start
and the forward solver — and the mode returns the block's solution as a tensor whose value is
(approximately) `w*` and whose gradient is the mode's:

- `IFT` solves without a graph, then attaches the implicit-function-theorem gradient;
- `Phantom` solves without a graph, then unrolls `k` damped steps from the solution;
- `Unroll` solves *with* the graph (backpropagation through the iterations).

A mode attaches a gradient only when something the block reads requires one: a block whose inputs
and parameters are all constants returns a plain tensor (no graph kept, no adjoint solve).

**IFT.** With `R(w*, θ) = 0`, the implicit function theorem gives `dw*/dθ = −A⁻¹ ∂R/∂θ` with
`A = ∂R/∂w`. We build it from one differentiable evaluation `y = R(w*, θ)` (its graph reaches every
input and every parameter that the user's functions capture) followed by `_ImplicitCorrection`, an
autograd function whose value is 0 and whose vector–Jacobian product is `g ↦ −A⁻ᵀ g`:

    out = w* + correction(y)      ⇒   ∂out/∂θ = −A⁻¹ ∂R/∂θ   (exactly the IFT)

so the upstream gradient `g` costs one matrix-free solve `Aᵀ λ = g` (matvecs are VJPs of `R` in `w`)
and one VJP of `R` in `θ`. Memory does not depend on the forward iterations.

**A failed backward solve.** The adjoint solve has its own failure policy, `IFT(on_failure=...)`
(default `"warn"`, whatever the forward's is). A sample whose adjoint solve did not converge gets a
**zero** gradient from this block (its wrong `λ` is dropped), so one failed sample cannot push garbage
into the parameters; the policy reports it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .solvers import Anderson, SolveInfo, SolverConfig, apply_failure_policy
from .solvers._base import IterativeSolver
from .solvers._info import Status
from .nn._cache import inside_functorch_transform
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

if TYPE_CHECKING:
    from .system import BlockSystem

__all__ = ["IFT", "Phantom", "Unroll", "BackwardMode", "BlockSolve"]

_POLICIES = ("warn", "raise", "ignore")


@dataclasses.dataclass
class BlockSolve:
    """One block handed to a backward mode: what to solve, from where, and with what.

    Attributes:
        system: the compiled block (`R(w)`, packing, projections).
        outer: the tensors the block reads from outside (inputs, earlier blocks), with their graphs.
        w0: the packed start `(B, D)`.
        solver: the forward solver.
        precond: the block's diagonal preconditioner `(D,)`, or `None`.
        report_backward: called with the `SolveInfo` of each backward (adjoint) solve of the block.
    """

    system: "BlockSystem"
    outer: Mapping[str, torch.Tensor]
    w0: torch.Tensor
    solver: Any
    precond: torch.Tensor | None
    report_backward: Callable[[SolveInfo], None] | None = None

    def __post_init__(self) -> None:
        self.detached = {n: t.detach() for n, t in self.outer.items()}

    @property
    def name(self) -> str:
        return self.system.name

    def residual(self, w: torch.Tensor, *, graph: bool = True, theta: bool = True, equations_only: bool = False) -> torch.Tensor:
        """`R(w)`; `graph` keeps the autograd graph; `theta` reads the outer tensors with their graphs
        (else detached, so that only `w` is differentiated)."""
        env = self.outer if theta else self.detached
        return self.system.residual(w, env, create_graph=graph, equations_only=equations_only)

    def forward_solve(self) -> tuple[torch.Tensor, SolveInfo]:
        """Solve the block without recording a graph; the constrained variables are projected onto their sets.

        Under `torch.func.vmap` the solve is one opaque operation whose vmapped dimension is folded into
        the batch dimension (samples are independent, so a vmapped solve is a bigger batch).
        """
        if _transforms() & {"vmap"}:
            names = list(self.detached)
            infos: list[SolveInfo] = []

            def solve(w0: torch.Tensor, *outer: torch.Tensor) -> torch.Tensor:
                w, info = self._solve_plain(w0, dict(zip(names, outer)))
                infos.append(info)
                return w

            w_star = _FoldedCall.apply(solve, self.w0.detach(), *self.detached.values())
            return w_star, infos[-1]
        return self._solve_plain(self.w0.detach(), self.detached)

    def _solve_plain(self, w0: torch.Tensor, env: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, SolveInfo]:
        with torch.no_grad():
            w_star, info = self.solver.solve(lambda w: self.system.residual(w, env), w0, precond=self.precond, name=self.name)
            w_star = self.system.project_constrained(w_star)
            if self.system.objectives:
                info = self._flag_rounding_stalls(w_star, info, env)
            return w_star, info

    def _flag_rounding_stalls(self, w: torch.Tensor, info: SolveInfo, env: Mapping[str, torch.Tensor]) -> SolveInfo:
        """Samples reported converged whose map cannot move although a residual entry exceeds `tol`.

        Far out along an unbounded direction (`|v| ≫ |α∇| / eps`) an objective's step `α∇` is below the
        floating-point resolution of `v`: `v − α∇` rounds to `v`, so the map is stuck, while the
        relative residual `‖R‖ / ‖w‖` is tiny and passes a `"rel"` test. Such a point is no solution.
        Costs one residual evaluation per solve of a block with objectives.
        """
        tol = getattr(self.solver, "tol", None)
        if tol is None or not bool(info.converged.any()):
            return info
        r = self.system.residual(w, env)
        step = r if self.precond is None else r * self.precond
        stuck = ((w - step) == w) & (r.abs() > tol)
        stalled = stuck.any(1) & info.converged
        if not bool(stalled.any()):
            return info
        status = info.status.clone() if getattr(info, "status", None) is not None else None
        fields = {"converged": info.converged & ~stalled}
        if status is not None:
            fields["status"] = torch.where(stalled, int(Status.STALLED), status)
        flagged = dataclasses.replace(info, **fields)
        only_new = dataclasses.replace(flagged, converged=~stalled, **({"status": fields["status"]} if status is not None else {}))
        apply_failure_policy(
            only_new, name=self.name, tol=tol, max_iter=getattr(self.solver, "max_iter", 0),
            on_failure=getattr(self.solver, "on_failure", "warn"),
            hint=(
                "the update of a variable is below the floating-point resolution of its value (it is huge: "
                f"max |w| = {float(w.abs().max()):.3g}), so the iteration cannot move although the residual is not "
                "zero; start closer to the solution and check that the problem is bounded"
            ),
        )
        return flagged

    def reads_grad(self, w_star: torch.Tensor) -> bool | None:
        """Whether the block's solution depends on anything that requires a gradient.

        `True` when an outer tensor requires grad. Otherwise only the user's functions can tell (they
        may capture parameters): a block with objectives evaluates them once at `w*` (its residual
        always carries a graph through the objective's internal VJP, so it cannot tell); for a block of
        equations only, `None` means "look at whether `R(w*)` requires grad", which costs nothing extra.
        """
        transforms = _transforms()
        if "vmap" in transforms:
            if transforms & {"grad", "jvp"}:
                raise NotImplementedError(
                    f"{self.name}: torch.func.vmap combined with grad/vjp/jvp (jacrev, jacfwd, hessian, per-sample "
                    "gradients) is not supported over an implicit layer yet. Its batch dimension is already per "
                    "sample: call the layer on the whole batch and use torch.autograd (or torch.func.grad / jvp "
                    "without vmap)."
                )
            if torch.is_grad_enabled() and self.system.reads_grad(w_star, self.outer):
                raise NotImplementedError(
                    f"{self.name}: gradients through torch.func.vmap over an implicit layer are not supported yet "
                    "(vmapped solves run forward only). Call the layer on the whole batch instead: samples are "
                    "independent, so its batch dimension is already per sample; or run vmap under torch.no_grad()."
                )
            return False
        if transforms or torch.autograd.forward_ad._current_level >= 0:
            return True  # forward mode or a torch.func transform: requires_grad does not tell
        if not torch.is_grad_enabled():
            return False
        if any(t.requires_grad for t in self.outer.values()):
            return True
        if not self.system.objectives:
            return None
        return self.system.reads_grad(w_star, self.outer)


def _tangents_may_flow() -> bool:
    """Whether derivatives may flow without `requires_grad` showing it: forward-mode AD is active
    (`torch.autograd.forward_ad.dual_level`) or a `torch.func` differentiation transform is running."""
    return torch.autograd.forward_ad._current_level >= 0 or bool(_transforms() & {"grad", "jvp"})


def _transforms() -> set[str]:
    """The `torch.func` transforms currently running (`"vmap"`, `"grad"`, `"jvp"`, ...)."""
    if not inside_functorch_transform():
        return set()
    return {i.key().name.lower() for i in retrieve_all_functorch_interpreters()}


class _FoldedCall(torch.autograd.Function):
    """`fn(*tensors)`, with every tensor batched along dim 0, as one opaque non-differentiable operation
    whose `vmap` rule folds the vmapped dimension into that batch dimension.

    Samples of a block never interact, so a solve vmapped over `V` copies is one solve of `V·B` samples;
    the solver loop (data-dependent stopping) then never sees a batched tensor.
    """

    @staticmethod
    def forward(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        return fn(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output)
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - the output is non-differentiable
        return (None,) * ctx.n_inputs

    @staticmethod
    def vmap(info, in_dims, fn, *tensors):
        size = info.batch_size
        folded = []
        for t, dim in zip(tensors, in_dims[1:]):
            t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            folded.append(t.reshape(size * t.shape[1], *t.shape[2:]))
        out = _FoldedCall.apply(fn, *folded)
        return out.reshape(size, -1, *out.shape[1:]), 0


class BackwardMode(abc.ABC):
    """What every backward mode does: solve a block and return its differentiable solution.

    Subclasses implement `attach(block, w_star) -> Tensor` (the value of `w_star`, the mode's gradient);
    a mode that must see the solver's iterations overrides `solve` instead.
    """

    def solve(self, block: BlockSolve) -> tuple[torch.Tensor, SolveInfo]:
        """Solve `block` and return its packed solution (differentiable when something requires grad) and `SolveInfo`."""
        w_star, info = block.forward_solve()
        if block.reads_grad(w_star) is False:
            return w_star, info
        return self.attach(block, w_star), info

    @abc.abstractmethod
    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        """The differentiable solution: the value of `w_star` with this mode's gradient."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IFT(BackwardMode):
    """Exact implicit differentiation of the whole block.

    Args:
        solver: solver of the adjoint linear system `Aᵀ λ = g`: any `il.linear` solver or fixed-point
            solver (default: the forward solver's type and options, with at least 100 iterations).
        first_order: treat optimised variables (`Minimize`/`Maximize`) as constants and differentiate only
            the block's equations, as the JIIO reference code does. Exact when the outer loss is the
            inner objective (envelope theorem), an approximation otherwise.
        second_order: prepare exact double backward (`create_graph=True`, e.g. gradient penalties);
            costs two more residual evaluations and one JVP per forward. Without it, double
            backward through the IFT raises `NotImplementedError` rather than returning a wrong value.
        on_failure: what a backward solve that did not converge does: `"warn"` (`il.ConvergenceWarning`),
            `"raise"` (`il.ConvergenceError`) or `"ignore"`. `None` (default) takes the policy of the
            `solver` you passed here, else `"warn"`: never the forward solver's, so a forward run with
            `on_failure="ignore"` still reports failed backward solves. Whatever the policy, a failed
            sample's gradient from this block is zero.
    """

    solver: Any = None
    first_order: bool = False
    second_order: bool = False
    on_failure: str | None = None

    def __post_init__(self) -> None:
        if self.solver is not None and not hasattr(self.solver, "solve_linear"):
            raise TypeError(
                f"IFT: solver must be an il.linear solver or a fixed-point solver (il.Anderson, il.Broyden, ...), got {self.solver!r}."
            )
        for flag in ("first_order", "second_order"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"IFT: {flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.on_failure is not None and self.on_failure not in _POLICIES:
            raise ValueError(f"IFT: on_failure must be None or one of {_POLICIES}, got {self.on_failure!r}.")

    @property
    def failure_policy(self) -> str:
        """The backward's effective failure policy (see `on_failure`)."""
        if self.on_failure is not None:
            return self.on_failure
        return getattr(self.solver, "on_failure", "warn") if self.solver is not None else "warn"

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        system = block.system
        solver = adjoint_solver(self, block.solver)
        if self.first_order and system.objectives:
            if not system.equations:
                return w_star  # optimised variables only: constants by definition of first_order
            idx = system.equation_indices(w_star.device)

            def embed(w_eq: torch.Tensor) -> torch.Tensor:
                return w_star.detach().index_copy(1, idx, w_eq)

            adjoint = AdjointProblem(
                residual=lambda w_eq: block.residual(embed(w_eq), theta=False, equations_only=True),
                w_star=w_star[:, idx], solver=solver, precond=None if block.precond is None else block.precond[idx],
                name=block.name, warm_start=system.dual_warm_start(w_star, idx), second_order=self.second_order,
                on_failure=self.failure_policy, report=block.report_backward,
            )
            out_eq = attach_ift(lambda w_eq: block.residual(embed(w_eq), equations_only=True), w_star[:, idx], adjoint)
            if out_eq is None:
                return w_star
            return w_star.detach().index_copy(1, idx, out_eq)
        warm = system.dual_warm_start(w_star, system.equation_indices(w_star.device)) if system.equations else None
        adjoint = AdjointProblem(
            residual=lambda w: block.residual(w, theta=False), w_star=w_star, solver=solver, precond=block.precond,
            name=block.name, second_order=self.second_order, warm_start=warm, on_failure=self.failure_policy,
            report=block.report_backward,
        )
        out = attach_ift(lambda w: block.residual(w), w_star, adjoint)
        return w_star if out is None else out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom(BackwardMode):
    """Phantom gradient: unroll `k` damped steps of the map `F` from the detached solution.

    `k=1` is Jacobian-free backpropagation. Cheap and approximate; approaches the IFT as `k` grows
    (for `damping` small enough that the damped map contracts).
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Phantom: k must be an integer >= 1, got {self.k!r}.")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"Phantom: damping must lie in (0, 1], got {self.damping!r}.")

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:
        w = w_star
        for _ in range(self.k):
            r = block.residual(w)
            if not r.requires_grad and not _tangents_may_flow():  # nothing upstream requires grad
                return w_star
            w = w - self.damping * (r if block.precond is None else r * block.precond)
        return w


@dataclasses.dataclass(frozen=True)
class Unroll(BackwardMode):
    """Backpropagate through every solver iteration (memory grows with the iterations; for testing and
    weight-tied networks).

    A sample that already meets the tolerance at its start runs no iteration; it is still
    differentiated through one step of the block's map `F(w) = w − P ⊙ R(w)` from its start, so its
    gradient is the one-step unrolled gradient, never a silent zero.
    """

    def solve(self, block: BlockSolve) -> tuple[torch.Tensor, SolveInfo]:
        if not torch.is_grad_enabled() or block.reads_grad(block.w0) is False:
            return block.forward_solve()
        w_out, info = block.solver.solve(lambda w: block.residual(w), block.w0, precond=block.precond, name=block.name)
        w_out = block.system.project_constrained(w_out)
        idle = info.nstep == 0
        if bool(idle.any()):
            # w_out is the (constant) start for these samples: take one differentiable step from it.
            r = block.residual(w_out)
            stepped = w_out - (r if block.precond is None else r * block.precond)
            stepped = block.system.project_constrained(stepped)
            w_out = torch.where(idle[:, None], stepped, w_out)
        return w_out, info

    def attach(self, block: BlockSolve, w_star: torch.Tensor) -> torch.Tensor:  # pragma: no cover - solve overrides
        raise NotImplementedError("Unroll differentiates the solver's iterations; see Unroll.solve.")


def adjoint_solver(mode: IFT, forward_solver: Any) -> Any:
    """The solver of the IFT linear system: the mode's, else one like the forward solver."""
    if mode.solver is not None:
        return mode.solver
    if isinstance(forward_solver, IterativeSolver):
        return forward_solver.replace(max_iter=max(forward_solver.max_iter, 100), trace=False)
    tol = forward_solver.tol if isinstance(forward_solver, SolverConfig) else 1e-5
    return Anderson(tol=tol, max_iter=100)


class _ImplicitCorrection(torch.autograd.Function):
    """Value 0; vector–Jacobian product `g ↦ −A⁻ᵀ g` with `A = ∂R/∂w` at the solution.

    Under double backward (`create_graph=True`, with `IFT(second_order=True)`) the VJP is itself
    differentiable in `g`; the derivatives of `A` enter through the second-order term of `attach_ift`.
    """

    @staticmethod
    def forward(y: torch.Tensor, adjoint: "AdjointProblem") -> torch.Tensor:
        return torch.zeros_like(y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.adjoint = inputs[1]
        if inside_functorch_transform():
            ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        adjoint = ctx.adjoint
        with torch.no_grad():
            lam = adjoint.solve(grad)
        if not torch.is_grad_enabled():
            return -lam, None
        if not adjoint.second_order and inside_functorch_transform():
            # torch.func.grad always differentiates with create_graph: first order is right as it is;
            # only a further derivative (e.g. torch.func.hessian) must refuse.
            # Tied to y (which depends on θ), so that any further derivative passes through the guard.
            (y,) = ctx.saved_tensors
            return _FirstOrderOnly.apply(-lam, grad, y, adjoint.name), None
        if not adjoint.second_order:
            raise NotImplementedError(
                f"{adjoint.name}: double backward (create_graph=True) through the IFT needs "
                "backward=il.IFT(second_order=True) (or use il.Unroll / il.Phantom)."
            )
        # A is held fixed here; its dependence on θ and w* enters through the second-order term of y
        # (see `attach_ift`). The dependence on g is linear: λ = λ* + (A⁻ᵀ-Jacobian)(g − g*).
        return -(lam + _InverseCorrection.apply(-grad, adjoint)), None


    @staticmethod
    def jvp(ctx, y_tangent: torch.Tensor, _adjoint_tangent: None) -> torch.Tensor:
        # Forward mode (torch.func.jvp, torch.autograd.forward_ad): ẇ = −A⁻¹ ẏ, one tangent solve.
        return -ctx.adjoint.solve(y_tangent, transpose=False)


class _FirstOrderOnly(torch.autograd.Function):
    """The value of `lam`; differentiating it again raises (the IFT was not prepared for second order)."""

    @staticmethod
    def forward(lam: torch.Tensor, grad: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        return lam.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.name = inputs[3]

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"{ctx.name}: second derivatives through the IFT (torch.func.hessian, grad of grad) need "
            "backward=il.IFT(second_order=True)."
        )


class _InverseCorrection(torch.autograd.Function):
    """Value 0; vector–Jacobian product `k ↦ −A⁻¹ k` (the transpose of `_ImplicitCorrection`'s)."""

    @staticmethod
    def forward(h: torch.Tensor, adjoint: "AdjointProblem") -> torch.Tensor:
        return torch.zeros_like(h)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.adjoint = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError(f"{ctx.adjoint.name}: third-order derivatives through the IFT are not supported.")
        return -ctx.adjoint.solve(grad, transpose=False), None


@dataclasses.dataclass
class AdjointProblem:
    """The linear systems `Aᵀ λ = g` (and `A x = k`) of a block at its solution, solved matrix-free.

    Args:
        residual: `w ↦ R(w)` with the block's outer tensors detached, differentiable in `w`.
        w_star: the detached solution.
        solver: linear or fixed-point solver.
        precond: the block's diagonal preconditioner (keeps the adjoint map as contractive as the forward one).
        name: for convergence messages.
        warm_start: optional `g ↦ λ₀`.
        second_order: whether double backward is prepared (`IFT(second_order=True)`).
        on_failure: the backward's failure policy (`IFT(on_failure=...)`).
        report: called with each solve's `SolveInfo` (the layer keeps the latest as `backward_info`).
    """

    residual: Callable[[torch.Tensor], torch.Tensor]
    w_star: torch.Tensor
    solver: Any
    precond: torch.Tensor | None
    name: str
    warm_start: Callable[[torch.Tensor], torch.Tensor] | None = None
    second_order: bool = False
    on_failure: str = "warn"
    report: Callable[[SolveInfo], None] | None = None

    def linearized(self, v: torch.Tensor) -> torch.Tensor:
        """`A v` with `A = ∂R/∂w` held constant (no derivative through `A`, even of captured parameters)."""
        return _ConstantProduct.apply(v, self, False)

    def _operator(self, transpose: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The matvec `v ↦ Aᵀ v` (VJP) or `v ↦ A v` (JVP by the double-VJP trick), at the solution.

        Inside a `torch.func` transform, where `requires_grad_` is not allowed, the same products come
        from `torch.func.vjp` / `torch.func.jvp` (the user's functions then need forward-mode support).
        """
        if inside_functorch_transform():
            w_star = self.w_star.detach()
            if transpose:
                _, vjp_fn = torch.func.vjp(self.residual, w_star)
                return lambda v: vjp_fn(v)[0]
            return lambda v: torch.func.jvp(self.residual, (w_star,), (v,))[1]
        with torch.enable_grad():
            w = self.w_star.detach().requires_grad_()
            r = self.residual(w)
            if transpose:

                def matvec(v: torch.Tensor) -> torch.Tensor:
                    (out,) = torch.autograd.grad(r, w, v, retain_graph=True, allow_unused=True)
                    return torch.zeros_like(v) if out is None else out

                return matvec
            u = torch.zeros_like(r, requires_grad=True)
            (vjp_u,) = torch.autograd.grad(r, w, u, create_graph=True, allow_unused=True)

        def jvp(v: torch.Tensor) -> torch.Tensor:
            if vjp_u is None:
                return torch.zeros_like(v)
            with torch.enable_grad():
                (out,) = torch.autograd.grad(vjp_u, u, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if out is None else out

        return jvp

    def solve(self, rhs: torch.Tensor, transpose: bool = True) -> torch.Tensor:
        """`A⁻ᵀ rhs` (default) or `A⁻¹ rhs`, matrix-free; failed samples are zeroed and reported."""
        if "vmap" in _transforms():
            raise NotImplementedError(
                f"{self.name}: the IFT's linear solve under torch.func.vmap (jacrev, jacfwd, hessian, per-sample "
                "gradients) is not supported yet. The layer's batch dimension is already per sample: use "
                "torch.autograd (or torch.func.grad / vjp / jvp without vmap)."
            )
        matvec = self._operator(transpose)
        kind = "IFT backward" if transpose else "IFT double backward"
        name = f"{kind} of {self.name}"
        # The mode's policy applies, not the solver's: report once, below, after zeroing failed samples.
        solver = self.solver.replace(on_failure="ignore") if isinstance(self.solver, SolverConfig) else self.solver
        with torch.no_grad():
            x0 = self.warm_start(rhs) if (self.warm_start is not None and transpose) else None
            x, info = solver.solve_linear(matvec, rhs.detach(), x0, precond=self.precond, name=name)
        failed = ~info.converged
        if bool(failed.any()):
            x = torch.where(failed[:, None], torch.zeros_like(x), x)
        if self.report is not None:
            self.report(info)
        apply_failure_policy(
            info, name=name, tol=getattr(self.solver, "tol", float("nan")), max_iter=getattr(self.solver, "max_iter", 0),
            on_failure=self.on_failure,
            hint=(
                "pass il.IFT(solver=...) a stronger linear solver (il.linear.GMRES, more max_iter) or make the map more "
                "contractive; the failed samples' gradients from this block were set to zero"
            ),
        )
        return x


class _ConstantProduct(torch.autograd.Function):
    """`v ↦ A v` (or `Aᵀ v`) with `A` a constant: differentiable in `v` to any order, never through `A`."""

    @staticmethod
    def forward(v: torch.Tensor, adjoint: AdjointProblem, transpose: bool) -> torch.Tensor:
        return adjoint._operator(transpose)(v.detach())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.adjoint, ctx.transpose = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ConstantProduct.apply(grad, ctx.adjoint, not ctx.transpose), None, None


def attach_ift(
    residual_theta: Callable[[torch.Tensor], torch.Tensor], w_star: torch.Tensor, adjoint: AdjointProblem
) -> torch.Tensor | None:
    """`w* + correction(y)`: the value of `w*`, the gradient of the IFT (see the module docstring), or
    `None` when `y = R(w*, θ)` requires no gradient (nothing to differentiate).

    `residual_theta` is `w ↦ R(w, θ)` with graph to every input and parameter.
    With `adjoint.second_order`, `y` gains the zero-valued term
    `T = R(w₁, θ) − R(w*, θ) − A (w₁ − w*)` with `w₁ = w* + correction(R(w*, θ))`, whose second
    derivative is `2 R_wθ dw + R_ww dw dw`: exactly the terms of the second-order IFT that the
    fixed-`A` correction leaves out, so gradient penalties are exact.
    """
    w_star = w_star.detach()
    y = residual_theta(w_star)
    if not y.requires_grad and not _tangents_may_flow():  # nothing the block reads requires grad
        return None
    if adjoint.second_order:
        shift = _ImplicitCorrection.apply(y, adjoint)
        y = y + (residual_theta(w_star + shift) - y - adjoint.linearized(shift))
    return w_star + _ImplicitCorrection.apply(y, adjoint)
