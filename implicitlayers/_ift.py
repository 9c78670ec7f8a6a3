"""The implicit function theorem's machinery: the correction functions and the adjoint linear systems.

**IFT.** With `R(w*, θ) = 0`, the implicit function theorem gives `dw*/dθ = −A⁻¹ ∂R/∂θ` with
`A = ∂R/∂w`. We build it from one differentiable evaluation `y = R(w*, θ)` (its graph reaches every
input and every parameter that the user's functions capture) followed by `_ImplicitCorrection`, an
autograd function whose value is 0 and whose vector–Jacobian product is `g ↦ −A⁻ᵀ g`:

    out = w* + correction(y)      ⇒   ∂out/∂θ = −A⁻¹ ∂R/∂θ   (exactly the IFT)

so the upstream gradient `g` costs one matrix-free solve `Aᵀ λ = g` (matvecs are VJPs of `R` in `w`)
and one VJP of `R` in `θ`. Memory does not depend on the forward iterations.

"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ._transforms import active_transforms, inside_functorch_transform, tangents_may_flow, vmapped_solve, with_cached_signature
from .solvers import Anderson, SolveInfo, SolverConfig, apply_failure_policy
from .solvers._base import IterativeSolver
from .solvers._external import solver_tol, validated, without_false_claims
from .solvers._precision import work_dtype

if TYPE_CHECKING:
    from .backward import IFT

__all__ = ["AdjointProblem", "adjoint_solver", "attach_ift"]


# Blocks of at most this many unknowns a sample get an exact dense adjoint solve by default: `A` from one
# batched VJP (`D` products in one autograd call), then `torch.linalg.solve` — cheaper than an iterative solve's
# ten or more separate VJPs, each of which pays the autograd engine's fixed cost (≈ 100 µs on a CPU).
DENSE_ADJOINT_MAX_DIM = 16


@dataclasses.dataclass(frozen=True)
class DefaultAdjointSolver:
    """The IFT's linear solver when `IFT(solver=None)`: exact and dense for blocks of at most
    `DENSE_ADJOINT_MAX_DIM` unknowns a sample (when the residual's VJP can be batched), else `iterative`
    (a solver like the forward one)."""

    iterative: Any

    @property
    def tol(self) -> float:
        return self.iterative.tol

    @property
    def max_iter(self) -> int:
        return self.iterative.max_iter


def adjoint_solver(mode: "IFT", forward_solver: Any) -> Any:
    """The solver of the IFT linear system: the mode's, else one like the forward solver (see `DefaultAdjointSolver`)."""
    if mode.solver is not None:
        return mode.solver
    try:
        return _DEFAULT_ADJOINTS[forward_solver]
    except (KeyError, TypeError):  # (TypeError: a user's solver that is not hashable)
        pass
    if isinstance(forward_solver, IterativeSolver):
        default = DefaultAdjointSolver(forward_solver.replace(max_iter=max(forward_solver.max_iter, 100), trace=False))
    else:
        tol = forward_solver.tol if isinstance(forward_solver, SolverConfig) else 1e-5
        default = DefaultAdjointSolver(Anderson(tol=tol, max_iter=100))
    if len(_DEFAULT_ADJOINTS) < 256:
        try:
            _DEFAULT_ADJOINTS[forward_solver] = default
        except TypeError:
            pass
    return default


# Forward solver -> its default adjoint solver (configs are immutable: built once, not on every call).
_DEFAULT_ADJOINTS: dict[Any, DefaultAdjointSolver] = {}


@with_cached_signature
class _ImplicitCorrection(torch.autograd.Function):
    """Value 0; vector–Jacobian product `g ↦ −A⁻ᵀ g` with `A = ∂R/∂w` at the solution.

    Under double backward (`create_graph=True`, with `IFT(second_order=True)`) the VJP is itself
    differentiable in `g`; the derivatives of `A` enter through the second-order term of `attach_ift`.
    """

    # Under torch.func.vmap (jacfwd): the value is zeros and the jvp rule folds its tangents (`solve`).
    generate_vmap_rule = True

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
        if not adjoint.second_order and "jvp" in active_transforms():
            # Forward mode over this backward (torch.func.hessian, jvp of grad): a second derivative.
            _refuse_second_order(adjoint.name)
        try:
            with torch.no_grad():
                lam = adjoint.solve(grad)
        except RuntimeError as err:
            if "Batching rule not implemented" not in str(err):
                raise
            # torch.autograd's batched gradients (is_grads_batched=True, jacobian(vectorize=True),
            # gradcheck(check_batched_grad=True)) run this backward under the legacy vmap, which cannot run
            # the adjoint solve; torch.func's transforms can.
            raise RuntimeError(
                f"{adjoint.name}: the IFT backward cannot run under torch.autograd's batched gradients "
                "(grad(..., is_grads_batched=True), torch.autograd.functional.jacobian(..., vectorize=True), "
                "gradcheck(..., check_batched_grad=True)). Use torch.func.jacrev / torch.func.vmap(torch.func.grad(...)), "
                "which the IFT supports, or vectorize=False / check_batched_grad=False (or il.Phantom / il.Unroll)."
            ) from err
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


@with_cached_signature
class _FirstOrderOnly(torch.autograd.Function):
    """The value of `lam`; differentiating it again raises (the IFT was not prepared for second order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(lam: torch.Tensor, grad: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        return lam.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.name = inputs[3]

    @staticmethod
    def backward(ctx, *_):
        _refuse_second_order(ctx.name)

    @staticmethod
    def jvp(ctx, *_):
        _refuse_second_order(ctx.name)


@with_cached_signature
class _InverseCorrection(torch.autograd.Function):
    """Value 0; vector–Jacobian product `k ↦ −A⁻¹ k` (the transpose of `_ImplicitCorrection`'s)."""

    generate_vmap_rule = True

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

    @staticmethod
    def jvp(ctx, h_tangent: torch.Tensor, _adjoint_tangent: None) -> torch.Tensor:
        return torch.zeros_like(h_tangent)  # the value is 0 whatever h


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
    graph: tuple[torch.Tensor, torch.Tensor] | None = None
    outer: Mapping[str, torch.Tensor] | None = None
    residual_in: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor] | None = None

    def linearized(self, v: torch.Tensor) -> torch.Tensor:
        """`A v` with `A = ∂R/∂w` held constant (no derivative through `A`, even of captured parameters)."""
        return _ConstantProduct.apply(v, self, False)

    def _residual_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(R(w*), w*)` with a graph from the leaf `w*` (call under `torch.enable_grad()`)."""
        if self.graph is not None:
            # R evaluated in the forward pass, at w*, with the parameters of that call: a backward that
            # runs after `functional_call` has restored other parameters must not re-evaluate R.
            return self.graph
        w = self.w_star.detach().requires_grad_()
        return self.residual(w), w

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
            r, w = self._residual_graph()
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
        """`A⁻ᵀ rhs` (default) or `A⁻¹ rhs`, matrix-free; failed samples are zeroed and reported.

        Under `torch.func.vmap` (`jacrev`, `jacfwd`, per-sample gradients) the vmapped right-hand sides are
        folded into the batch: `V` copies of the `B` samples' systems are solved as one batch of `V·B`.
        """
        if "vmap" in active_transforms():
            unsupported = (
                f"{self.name}: this vmapped gradient reads a tensor that is vmapped but not an input of the layer "
                "(e.g. parameters stacked for an ensemble, or per-sample gradients with respect to parameters through "
                "functional_call). The layer's batch dimension is already per sample: call it on the whole batch and "
                "take torch.autograd gradients per sample, or use torch.func.jacrev / jacfwd on the batched call."
            )
            if self.residual_in is None or self.outer is None:
                return vmapped_solve(lambda folded: self._solve(folded, transpose), rhs, unsupported=unsupported)
            # Fold the solution and the outer tensors too: under per-sample gradients (vmap over grad) each vmapped
            # copy has its own inputs, so its own system; as one batch of V·B samples it is one solve.
            names = list(self.outer)
            residual_in = self.residual_in

            def folded_solve(rhs_f: torch.Tensor, w_f: torch.Tensor, *outer_f: torch.Tensor) -> torch.Tensor:
                env = dict(zip(names, outer_f))
                folded = dataclasses.replace(self, residual=lambda w: residual_in(w, env), w_star=w_f, graph=None,
                                             warm_start=None, outer=None, residual_in=None)
                return folded._solve(rhs_f, transpose)

            return vmapped_solve(folded_solve, rhs, self.w_star.detach(), *self.outer.values(), unsupported=unsupported)
        return self._solve(rhs, transpose)

    def _dense_solve(self, rhs: torch.Tensor, tol: float, stop: str) -> tuple[torch.Tensor, SolveInfo] | None:
        """`Aᵀ λ = rhs` exactly: `Aᵀ` from one batched VJP of the residual's graph, then a dense solve per sample.

        `None` when the VJP cannot be batched (an operation without a batching rule): the caller then solves
        iteratively.
        """
        batch, dim = rhs.shape
        if dim == 0:  # no unknowns (an empty per-sample shape): the adjoint is empty, and exact
            zero = torch.zeros(batch, dtype=rhs.dtype, device=rhs.device)
            return rhs.clone(), SolveInfo(nstep=torch.zeros(batch, dtype=torch.long, device=rhs.device), residual=zero,
                                          converged=torch.ones(batch, dtype=torch.bool, device=rhs.device), nfe=0)
        with torch.enable_grad():
            r, w = self._residual_graph()
            probes = torch.eye(dim, dtype=rhs.dtype, device=rhs.device)[:, None, :].expand(dim, batch, dim)
            # An operation without a batching rule makes torch fall back to a slow loop with a UserWarning (an
            # error in a warnings-as-errors test suite): solve iteratively instead.
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                try:
                    (rows,) = torch.autograd.grad(r, w, probes, retain_graph=True, allow_unused=True,
                                                  is_grads_batched=True)
                except (RuntimeError, NotImplementedError, UserWarning):
                    return None
        with torch.no_grad():
            # rows[j] = e_jᵀ A, so the (B, D, D) stack with rows[j] as column j is Aᵀ. Solved in at least
            # float32 (LU is not implemented for half precision everywhere), returned in the rhs's dtype.
            dtype = work_dtype(rhs.dtype)
            b = rhs.to(dtype)
            a_t = torch.zeros(batch, dim, dim, dtype=dtype, device=rhs.device) if rows is None else rows.permute(1, 2, 0).to(dtype)
            x, singular = torch.linalg.solve_ex(a_t, b[:, :, None])
            x = x[:, :, 0]
            res = torch.linalg.vector_norm(torch.bmm(a_t, x[:, :, None])[:, :, 0] - b, dim=1)
            if stop == "rel":
                res = res / (torch.linalg.vector_norm(b, dim=1) + torch.finfo(dtype).tiny)
            x = x.to(rhs.dtype)
            res = torch.where(singular == 0, torch.nan_to_num(res, nan=torch.inf), torch.inf)
            info = SolveInfo(nstep=torch.ones(batch, dtype=torch.long, device=rhs.device), residual=res,
                             converged=res <= tol, nfe=dim)
        return x, info

    def _folded_operator(self, transpose: bool, copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """`_operator` for `copies` right-hand sides of the `B` samples stacked along the batch (`(copies·B, D)`)."""
        operator = self._operator(transpose)
        if copies == 1:
            return operator

        def matvec(v: torch.Tensor) -> torch.Tensor:
            stacked = v.reshape(copies, -1, *v.shape[1:])
            return torch.cat([operator(part) for part in stacked.unbind(0)]).reshape(v.shape)

        return matvec

    def _solve(self, rhs: torch.Tensor, transpose: bool) -> torch.Tensor:
        batch = self.w_star.shape[0]
        copies = rhs.shape[0] // batch if batch else 1
        matvec = self._folded_operator(transpose, copies)
        precond = self.precond
        if precond is not None and precond.dim() == 2 and copies > 1:  # per-sample (B, D): one row per copy
            precond = precond.repeat(copies, 1)
        kind = "IFT backward" if transpose else "IFT double backward"
        name = f"{kind} of {self.name}"
        solver, solved = self.solver, None
        if isinstance(solver, DefaultAdjointSolver):
            if transpose and copies == 1 and rhs.shape[1] <= DENSE_ADJOINT_MAX_DIM and not inside_functorch_transform():
                solved = self._dense_solve(rhs.detach(), solver.tol, solver.iterative.stop)
            solver = solver.iterative
        # The mode's policy applies, not the solver's: report once, below, after zeroing failed samples.
        solver = solver.replace(on_failure="ignore") if isinstance(solver, SolverConfig) else solver
        with torch.no_grad():
            if solved is not None:
                x, info = solved
            else:
                x0 = self.warm_start(rhs) if (self.warm_start is not None and transpose and copies == 1) else None
                x, info = solver.solve_linear(matvec, rhs.detach(), x0, precond=precond, name=name)
                if not is_own_linear_solver(solver):  # a user's linear solver: checked, not trusted
                    x, info = _checked_linear_result(solver, matvec, rhs.detach(), x, info, name)
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


@with_cached_signature
class _ConstantProduct(torch.autograd.Function):
    """`v ↦ A v` (or `Aᵀ v`) with `A` a constant: differentiable in `v` to any order, never through `A`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: torch.Tensor, adjoint: AdjointProblem, transpose: bool) -> torch.Tensor:
        return adjoint._operator(transpose)(v.detach())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.adjoint, ctx.transpose = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ConstantProduct.apply(grad, ctx.adjoint, not ctx.transpose), None, None

    @staticmethod
    def jvp(ctx, v_tangent: torch.Tensor, _adjoint_tangent: None, _transpose_tangent: None) -> torch.Tensor:
        return _ConstantProduct.apply(v_tangent, ctx.adjoint, ctx.transpose)  # linear in v


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
    if inside_functorch_transform():
        transforms = active_transforms()
        if {"jvp", "grad"} <= transforms:  # forward and reverse mode nested (hessian, jvp of grad): second order
            if "vmap" in transforms:
                _refuse_second_order_under_vmap(adjoint.name)
            if not adjoint.second_order:
                _refuse_second_order(adjoint.name)
        y = residual_theta(w_star)
    else:
        # One evaluation serves both derivatives: ∂R/∂θ through the correction below, and the matvecs with
        # ∂R/∂w of the backward's linear solve (`adjoint.graph`), taken with this call's parameters.
        w_leaf = w_star.clone().requires_grad_()
        with torch.enable_grad():
            y = residual_theta(w_leaf)
        if not tangents_may_flow() and not _reaches_leaf_other_than(y, w_leaf):
            return None  # nothing the block reads requires grad
        adjoint.graph = (y, w_leaf)
    if not y.requires_grad and not tangents_may_flow():  # nothing the block reads requires grad
        return None
    if adjoint.second_order:
        if "vmap" in active_transforms():
            _refuse_second_order_under_vmap(adjoint.name)
        shift = _ImplicitCorrection.apply(y, adjoint)
        y = y + (residual_theta(w_star + shift) - y - adjoint.linearized(shift))
    return w_star + _ImplicitCorrection.apply(y, adjoint)


def _refuse_second_order(name: str) -> None:
    raise NotImplementedError(
        f"{name}: second derivatives through the IFT (torch.func.hessian, grad of grad) need "
        "backward=il.IFT(second_order=True)."
    )


def _refuse_second_order_under_vmap(name: str) -> None:
    raise NotImplementedError(
        f"{name}: second derivatives under torch.func.vmap (torch.func.hessian, jacfwd of jacrev) are not "
        "supported through the IFT. Use torch.autograd double backward (create_graph=True) with "
        "backward=il.IFT(second_order=True), e.g. torch.autograd.functional.hessian."
    )


def _reaches_leaf_other_than(t: torch.Tensor, leaf: torch.Tensor, budget: int = 100_000) -> bool:
    """Whether `t`'s autograd graph reaches a tensor that requires grad other than `leaf` (a parameter, an
    input): then there is a gradient to attach. Walks the graph of one residual evaluation; a graph too
    large to walk within `budget` nodes is assumed to reach one."""
    if t.grad_fn is None:
        return t.requires_grad and t is not leaf
    seen: set[int] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > budget:
            return True
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def is_own_linear_solver(solver: object) -> bool:
    """Whether `solver` is one of the package's linear solvers (which measure what they report)."""
    from .linear import Dense, _Krylov
    from .solvers._external import is_own_solver

    return is_own_solver(solver) or isinstance(solver, (_Krylov, Dense))


def _checked_linear_result(solver: Any, matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: object,
                           info: object, name: str) -> tuple[torch.Tensor, SolveInfo]:
    """A user's linear solver's `(x, info)`, validated, with each convergence claim measured (one matvec:
    ‖A x − b‖ against its `tol` and `stop`, or finiteness alone without a `tol`). A false claim is marked
    failed; the caller zeroes the failed samples' gradients and reports them."""
    x, info = validated(f"{name}: the linear solver {type(solver).__name__}", x, b, info)
    if not bool(info.converged.any()):
        return x, info
    with torch.no_grad():
        norm = torch.linalg.vector_norm(matvec(x) - b, dim=1)
        rel = getattr(solver, "stop", "rel") == "rel"
        measure = norm / (torch.linalg.vector_norm(b, dim=1) + torch.finfo(b.dtype).tiny) if rel else norm
    return x, without_false_claims(info, measure, solver_tol(solver))[0]
