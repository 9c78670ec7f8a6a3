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
    """

    solver: Any = None
    first_order: bool = False

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
    """Value 0; vector–Jacobian product `g ↦ −A⁻ᵀ g` with `A = ∂R/∂w` at the solution."""

    @staticmethod
    def forward(y: torch.Tensor, adjoint: "AdjointProblem") -> torch.Tensor:
        return torch.zeros_like(y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.adjoint = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.adjoint.solve(grad), None


@dataclasses.dataclass
class AdjointProblem:
    """The transposed linear system `Aᵀ λ = g` of a block at its solution, solved matrix-free.

    Args:
        residual: `w ↦ R(w)` with the block's outer tensors detached, differentiable in `w`.
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
    info: Any = None

    def solve(self, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"{self.name}: double backward (create_graph=True) through the IFT backward is not supported yet; "
                "use backward=il.Unroll() or il.Phantom(...) for gradient penalties."
            )
        with torch.enable_grad():
            w = self.w_star.detach().requires_grad_()
            r = self.residual(w)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                (out,) = torch.autograd.grad(r, w, v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if out is None else out

            with torch.no_grad():
                x0 = self.warm_start(grad) if self.warm_start is not None else None
                lam, self.info = self.solver.solve_linear(matvec, grad, x0, precond=self.precond, name=f"IFT backward of {self.name}")
        return lam


def attach_ift(y: torch.Tensor, w_star: torch.Tensor, adjoint: AdjointProblem) -> torch.Tensor:
    """`w* + correction(y)`: the value of `w*`, the gradient of the IFT (see the module docstring)."""
    return w_star.detach() + _ImplicitCorrection.apply(y, adjoint)
