"""How a block's solution is differentiated: exact implicit differentiation, phantom gradients, unrolling.

Each mode turns the forward solution `w*` of a block into a differentiable tensor whose value is
(approximately) `w*` and whose gradient is the mode's.

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
from typing import Any, Callable

import torch

from .solvers import Anderson, SolverConfig
from .solvers._base import IterativeSolver

__all__ = ["IFT", "Phantom", "Unroll", "BackwardMode"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IFT:
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
    """

    solver: Any = None
    first_order: bool = False
    second_order: bool = False

    def __post_init__(self) -> None:
        if self.solver is not None and not hasattr(self.solver, "solve_linear"):
            raise TypeError(
                f"IFT: solver must be an il.linear solver or a fixed-point solver (il.Anderson, il.Broyden, ...), got {self.solver!r}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom:
    """Phantom gradient: unroll `k` damped steps of the map `F` from the detached solution.

    `k=1` is Jacobian-free backpropagation. Cheap and approximate; approaches the IFT as `k` grows
    (for `damping` small enough that the damped map contracts).
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Phantom: k must be an integer >= 1, got {self.k!r}.")
        if not isinstance(self.damping, (int, float)) or not 0 < self.damping <= 1:
            raise ValueError(f"Phantom: damping must lie in (0, 1], got {self.damping!r}.")


@dataclasses.dataclass(frozen=True)
class Unroll:
    """Backpropagate through every solver iteration (memory grows with the iterations; for testing and
    weight-tied networks)."""


BackwardMode = IFT | Phantom | Unroll


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

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        adjoint = ctx.adjoint
        with torch.no_grad():
            lam = adjoint.solve(grad)
        if not torch.is_grad_enabled():
            return -lam, None
        if not adjoint.second_order:
            raise NotImplementedError(
                f"{adjoint.name}: double backward (create_graph=True) through the IFT needs "
                "backward=il.IFT(second_order=True) (or use il.Unroll / il.Phantom)."
            )
        # A is held fixed here; its dependence on θ and w* enters through the second-order term of y
        # (see `attach_ift`). The dependence on g is linear: λ = λ* + (A⁻ᵀ-Jacobian)(g − g*).
        return -(lam + _InverseCorrection.apply(-grad, adjoint)), None


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
        second_order: whether double backward is prepared (`IFT(second_order=True)`).
        w_star: the detached solution.
        solver: linear or fixed-point solver.
        precond: the block's diagonal preconditioner (keeps the adjoint map as contractive as the forward one).
        name: for convergence messages.
        warm_start: optional `g ↦ λ₀`.
    """

    residual: Callable[[torch.Tensor], torch.Tensor]
    w_star: torch.Tensor
    solver: Any
    precond: torch.Tensor | None
    name: str
    warm_start: Callable[[torch.Tensor], torch.Tensor] | None = None
    second_order: bool = False
    info: Any = None

    def linearized(self, v: torch.Tensor) -> torch.Tensor:
        """`A v` with `A = ∂R/∂w` held constant (no derivative through `A`, even of captured parameters)."""
        return _ConstantProduct.apply(v, self, False)

    def _operator(self, transpose: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The matvec `v ↦ Aᵀ v` (VJP) or `v ↦ A v` (JVP by the double-VJP trick), at the solution."""
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
        """`A⁻ᵀ rhs` (default) or `A⁻¹ rhs`, matrix-free, with the failure policy of the solver."""
        matvec = self._operator(transpose)
        with torch.no_grad():
            x0 = self.warm_start(rhs) if (self.warm_start is not None and transpose) else None
            kind = "IFT backward" if transpose else "IFT double backward"
            x, self.info = self.solver.solve_linear(matvec, rhs.detach(), x0, precond=self.precond, name=f"{kind} of {self.name}")
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
) -> torch.Tensor:
    """`w* + correction(y)`: the value of `w*`, the gradient of the IFT (see the module docstring).

    `residual_theta` is `w ↦ R(w, θ)` with graph to every input and parameter.
    With `adjoint.second_order`, `y` gains the zero-valued term
    `T = R(w₁, θ) − R(w*, θ) − A (w₁ − w*)` with `w₁ = w* + correction(R(w*, θ))`, whose second
    derivative is `2 R_wθ dw + R_ww dw dw`: exactly the terms of the second-order IFT that the
    fixed-`A` correction leaves out, so gradient penalties are exact.
    """
    w_star = w_star.detach()
    y = residual_theta(w_star)
    if adjoint.second_order:
        shift = _ImplicitCorrection.apply(y, adjoint)
        y = y + (residual_theta(w_star + shift) - y - adjoint.linearized(shift))
    return w_star + _ImplicitCorrection.apply(y, adjoint)
