"""Strongly convex, smooth objectives `L(v, y)` with known constants, and their Hypothesis strategy."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import nn

from ..backward import BackwardMode
from ..layer import ImplicitLayer
from ..problem import Input, Minimize, Problem, Variable
from ..sets import ConstraintSet
from ..solvers import Anderson
from ._basic import batch_sizes, dtypes, seeds

__all__ = ["QuadraticObjective", "LogSumExpObjective", "SoftplusObjective", "ConvexObjective", "convex_objectives"]

KINDS = ("quadratic", "logsumexp", "softplus")


class QuadraticObjective(nn.Module):
    """`L(v, y) = ½ vᵀ A v − yᵀ v` with `A` symmetric positive definite; minimiser `A⁻¹ y`."""

    A: torch.Tensor  # a buffer

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((v @ self.A) * v).sum(1) - (y * v).sum(1)


class LogSumExpObjective(nn.Module):
    """`L(v, y) = logsumexp(M v) + μ/2 ‖v − y‖²`."""

    M: torch.Tensor  # a buffer

    def __init__(self, M: torch.Tensor, mu: float) -> None:
        super().__init__()
        self.register_buffer("M", M)
        self.mu = mu

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(v @ self.M.T, dim=1) + 0.5 * self.mu * ((v - y) ** 2).sum(1)


class SoftplusObjective(nn.Module):
    """`L(v, y) = Σ_i softplus(a_i v_i) + μ/2 ‖v − y‖²`."""

    a: torch.Tensor  # a buffer

    def __init__(self, a: torch.Tensor, mu: float) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.mu = mu

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(v * self.a).sum(1) + 0.5 * self.mu * ((v - y) ** 2).sum(1)


@dataclasses.dataclass(frozen=True)
class ConvexObjective:
    """A drawn objective `L(v, y)` (one value per sample) with its constants.

    Attributes:
        objective: the module `L(v, y) -> (B,)`.
        y: a batch of inputs `(B, d)`.
        v0: a start, zeros `(B, d)`.
        strong_convexity: `μ`, a lower bound of the Hessian's eigenvalues in `v`.
        smoothness: an upper bound of the Hessian's eigenvalues in `v`.
        kind: `"quadratic"`, `"logsumexp"` or `"softplus"`.
    """

    objective: nn.Module
    y: torch.Tensor
    v0: torch.Tensor
    strong_convexity: float
    smoothness: float
    kind: str

    @property
    def step_size(self) -> float:
        """`1 / smoothness`: the gradient step that makes `v ← v − α∇L` a contraction."""
        return 1.0 / self.smoothness

    def minimizer(self) -> torch.Tensor | None:
        """The closed-form unconstrained minimiser (`A⁻¹ y` for a quadratic), else `None`."""
        if self.kind != "quadratic":
            return None
        return torch.linalg.solve(self.objective.A, self.y.T).T.detach()

    def minimize(self, constraint: ConstraintSet | None = None, *, tol: float = 1e-13) -> torch.Tensor:
        """An oracle: projected gradient descent in float64 from `v0` until the step is below `tol`
        (linear convergence at rate `1 − μ/L`, so the iteration count is known in advance)."""
        objective = _float64_copy(self.objective)
        y = self.y.detach().double()
        v = self.v0.detach().double()
        alpha = self.step_size
        rate = 1.0 - self.strong_convexity / self.smoothness
        iters = min(100_000, int(math.log(tol) / math.log(max(rate, 1e-12))) + 50)
        for _ in range(iters):
            with torch.enable_grad():
                w = v.requires_grad_()
                (grad,) = torch.autograd.grad(objective(w, y).sum(), w)
            v = (v - alpha * grad).detach()
            if constraint is not None:
                v = constraint.project(v)
        return v.to(self.y.dtype)

    def layer(
        self,
        constraint: ConstraintSet | None = None,
        *,
        solver=None,
        backward: BackwardMode | None = None,
    ) -> ImplicitLayer:
        """An `ImplicitLayer` for `v = argmin_{v ∈ C} L(v, y)` with step size `1/L`, from zeros."""
        v, y = Variable("v"), Input("y")
        if solver is None:
            solver = Anderson(tol=1e-5 if self.y.dtype == torch.float32 else 1e-9, max_iter=500)
        problem = Problem([Minimize(v, self.objective, (v, y), constraint, step_size=self.step_size)])
        return ImplicitLayer(problem, [y], [v], solver=solver, backward=backward, init={"v": torch.zeros_like(self.v0[0])})


def _float64_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).double()


def convex_objectives(
    kind: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    max_dim: int = 6,
) -> st.SearchStrategy[ConvexObjective]:
    """Strongly convex smooth objectives: quadratics with random positive definite Hessians
    (eigenvalues in `[μ, L]`), regularised log-sum-exp, and regularised softplus sums.

    Args:
        kind: `"quadratic"`, `"logsumexp"`, `"softplus"`, or `None` for any.
        dtype: fixed dtype, or `None` to draw float32/float64.
        batch_size: fixed batch size, or `None` to draw 1–8.
        max_dim: the largest dimension of `v`.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"convex_objectives: kind must be one of {KINDS} or None, got {kind!r}.")
    return _convex_objectives(kind, dtype, batch_size, max_dim)


@st.composite
def _convex_objectives(draw: Callable, kind, dtype, batch_size, max_dim) -> ConvexObjective:
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind
    dtype = draw(dtypes()) if dtype is None else dtype
    batch = draw(batch_sizes()) if batch_size is None else batch_size
    d = draw(st.integers(1, max_dim))
    mu = draw(st.floats(0.2, 1.0))
    gen = torch.Generator().manual_seed(draw(seeds()))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind == "quadratic":
        big = mu * draw(st.floats(1.0, 10.0))
        q, _ = torch.linalg.qr(randn(d, d))
        eig = mu + (big - mu) * torch.rand(d, generator=gen, dtype=torch.float64)
        eig[0], eig[-1] = mu, big  # the bounds are attained, so the constants are exact
        A = (q * eig) @ q.T
        objective: nn.Module = QuadraticObjective(0.5 * (A + A.T))
        smooth = big
    elif kind == "logsumexp":
        k = draw(st.integers(1, max_dim))
        M = randn(k, d) * draw(st.floats(0.1, 1.5)) / max(1.0, k**0.5)
        objective = LogSumExpObjective(M, mu)
        smooth = mu + float(torch.linalg.matrix_norm(M, 2)) ** 2
    else:
        a = randn(d) * draw(st.floats(0.1, 2.0))
        objective = SoftplusObjective(a, mu)
        smooth = mu + float(a.abs().max()) ** 2 / 4
    objective = objective.to(dtype)
    y = randn(batch, d).to(dtype)
    return ConvexObjective(objective, y, torch.zeros(batch, d, dtype=dtype), mu, smooth, kind)
