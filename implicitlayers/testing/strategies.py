"""Hypothesis strategies for implicit layers: contractive cells, convex objectives, constraint sets,
batch sizes, dtypes, and random problem graphs with closed-form solutions.

Every strategy draws its sizes and constants through Hypothesis (so failing examples shrink) and its
weights from a drawn seed (so an example is a few integers, not thousands of floats). Each drawn
object knows the facts a test needs as an oracle: the contraction factor of a cell, the strong
convexity of an objective, the exact solution where one exists.

```python
from hypothesis import given
from implicitlayers.testing import strategies as ils

@given(ils.contractive_cells())
def test_my_solver_finds_the_fixed_point(c):
    layer = c.layer()
    check_solution(layer, c.x)
```
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import nn

from .. import sets
from ..backward import BackwardMode
from ..layer import ImplicitLayer
from ..problem import FixedPoint, Input, Problem, Variable
from ..solvers import Anderson
from ._basic import DTYPES, batch_sizes, dtypes, seeds
from ._graphs import ProblemGraph, problem_graphs
from ._objectives import ConvexObjective, convex_objectives

__all__ = [
    "DTYPES",
    "dtypes",
    "batch_sizes",
    "seeds",
    "ContractiveCell",
    "DenseCell",
    "ConvCell",
    "contractive_cells",
    "ConvexObjective",
    "convex_objectives",
    "constraint_sets",
    "ProblemGraph",
    "problem_graphs",
]

def _spectral_normalised(a: torch.Tensor, target: float) -> torch.Tensor:
    return a * (target / torch.linalg.matrix_norm(a, 2).clamp_min(1e-12))


class DenseCell(nn.Module):
    """`cell(z, x) = act(z Wᵀ + x Uᵀ + b)` with `‖W‖₂ = contraction` and `act` tanh (1-Lipschitz) or identity."""

    def __init__(self, W: torch.Tensor, U: torch.Tensor, b: torch.Tensor, linear: bool) -> None:
        super().__init__()
        self.W, self.U, self.b = nn.Parameter(W), nn.Parameter(U), nn.Parameter(b)
        self.linear = linear

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pre = z @ self.W.T + x @ self.U.T + self.b
        return pre if self.linear else torch.tanh(pre)

    def solution(self, x: torch.Tensor) -> torch.Tensor:
        """The exact fixed point `(I − W)⁻¹ (U x + b)` of a linear cell."""
        if not self.linear:
            raise ValueError("DenseCell.solution: only linear cells have a closed-form fixed point.")
        eye = torch.eye(self.W.shape[0], dtype=self.W.dtype, device=self.W.device)
        rhs = x @ self.U.T + self.b
        return torch.linalg.solve(eye - self.W, rhs.T).T.detach()


class ConvCell(nn.Module):
    """`cell(z, x) = act(conv(z) + x)` (zero padding, stride 1) on `(B, C, H, W)` maps.

    The weights are scaled so that `Σ_{i,j} ‖K[:, :, i, j]‖₂ = contraction`, a bound on the operator
    norm of the convolution (a sum over kernel taps of a channel mix followed by a shift of norm ≤ 1).
    """

    def __init__(self, K: torch.Tensor, b: torch.Tensor, linear: bool) -> None:
        super().__init__()
        self.K, self.b = nn.Parameter(K), nn.Parameter(b)
        self.linear = linear

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pre = torch.nn.functional.conv2d(z, self.K, padding=self.K.shape[-1] // 2) + self.b[:, None, None] + x
        return pre if self.linear else torch.tanh(pre)

    def solution(self, x: torch.Tensor) -> torch.Tensor:
        """The exact fixed point of a linear cell, by a dense solve of the unrolled convolution."""
        if not self.linear:
            raise ValueError("ConvCell.solution: only linear cells have a closed-form fixed point.")
        shape = x.shape[1:]
        n = x[0].numel()
        basis = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *shape)
        conv = torch.nn.functional.conv2d(basis, self.K, padding=self.K.shape[-1] // 2).reshape(n, n).T
        rhs = (x + self.b[:, None, None]).reshape(x.shape[0], n)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        return torch.linalg.solve(eye - conv, rhs.T).T.reshape(x.shape).detach()


@dataclasses.dataclass(frozen=True)
class ContractiveCell:
    """A drawn cell with a known contraction factor.

    Attributes:
        cell: the module, `cell(z, x)`, a contraction in `z` with factor at most `contraction`.
        x: a batch of inputs `(B, ...)`.
        z0: a start for the state, zeros shaped like the state.
        contraction: the Lipschitz bound of `cell` in `z` (< 1).
        kind: `"dense"` or `"conv"`.
        linear: whether the cell is affine (then `solution(x)` is exact).
    """

    cell: DenseCell | ConvCell
    x: torch.Tensor
    z0: torch.Tensor
    contraction: float
    kind: str
    linear: bool

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def solution(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The exact fixed point for `x` (default: the drawn inputs); linear cells only."""
        return self.cell.solution(self.x if x is None else x)

    def layer(self, *, solver=None, backward: BackwardMode | None = None) -> ImplicitLayer:
        """An `ImplicitLayer` solving `z = cell(z, x)` from zeros; the default solver converges tightly
        for this dtype (an iteration cap that suffices for the contraction factor)."""
        z, x = Variable("z"), Input("x")
        if solver is None:
            tol = 1e-5 if self.dtype == torch.float32 else 1e-9
            solver = Anderson(tol=tol, max_iter=200)
        state = tuple(self.z0.shape[1:])
        # A callable start: a (C, H, W) tensor whose C equals the batch size would read as batched.
        return ImplicitLayer(Problem([FixedPoint(z, self.cell, (z, x))]), [x], [z], solver=solver, backward=backward,
                             init={"z": lambda x: x.new_zeros((x.shape[0], *state))})


def contractive_cells(
    kind: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    linear: bool | None = None,
    max_dim: int = 6,
    contraction: tuple[float, float] = (0.1, 0.9),
) -> st.SearchStrategy[ContractiveCell]:
    """Dense (`(B, d)`) or convolutional (`(B, C, H, W)`) contractive cells with inputs.

    Args:
        kind: `"dense"`, `"conv"`, or `None` for either.
        dtype: fixed dtype, or `None` to draw float32/float64.
        batch_size: fixed batch size, or `None` to draw 1–8.
        linear: affine cells (closed-form fixed point) or tanh cells; `None` draws either.
        max_dim: the largest state dimension (channels: at most 3, maps at most 5×5).
        contraction: the range of the drawn contraction factor, within (0, 1).
    """
    if kind not in ("dense", "conv", None):
        raise ValueError(f"contractive_cells: kind must be 'dense', 'conv' or None, got {kind!r}.")
    if not 0 < contraction[0] <= contraction[1] < 1:
        raise ValueError(f"contractive_cells: contraction must be a range within (0, 1), got {contraction!r}.")
    return _contractive_cells(kind, dtype, batch_size, linear, max_dim, contraction)


@st.composite
def _contractive_cells(draw: Callable, kind, dtype, batch_size, linear, max_dim, contraction) -> ContractiveCell:
    kind = draw(st.sampled_from(["dense", "conv"])) if kind is None else kind
    dtype = draw(dtypes()) if dtype is None else dtype
    batch = draw(batch_sizes()) if batch_size is None else batch_size
    linear = draw(st.booleans()) if linear is None else linear
    factor = draw(st.floats(*contraction))
    gen = torch.Generator().manual_seed(draw(seeds()))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    state: tuple[int, ...]
    if kind == "dense":
        d, dx = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
        cell: DenseCell | ConvCell = DenseCell(_spectral_normalised(randn(d, d), factor), randn(d, dx) / dx**0.5, 0.1 * randn(d), linear)
        x, state = randn(batch, dx), (batch, d)
    else:
        c = draw(st.integers(1, min(3, max_dim)))
        h, w = draw(st.integers(2, 5)), draw(st.integers(2, 5))
        k = draw(st.sampled_from([1, 3]))
        K = randn(c, c, k, k)
        taps = torch.linalg.matrix_norm(K.permute(2, 3, 0, 1), 2).sum()
        cell = ConvCell(K * (factor / float(taps)), 0.1 * randn(c), linear)
        x, state = randn(batch, c, h, w), (batch, c, h, w)
    cell = cell.to(dtype)
    return ContractiveCell(cell, x.to(dtype), torch.zeros(state, dtype=dtype), factor, kind, linear)


def constraint_sets(*, centered: bool | None = None) -> st.SearchStrategy[sets.ConstraintSet]:
    """`il.sets.Box`, `il.sets.L2Ball` or `il.sets.LInfBall` with float bounds, radii and centres.

    Args:
        centered: `True` keeps balls centred at 0 and boxes around 0; `None` draws either.
    """
    radius = st.floats(0.1, 3.0)
    centre = st.just(None) if centered else st.one_of(st.none(), st.floats(-1.0, 1.0))
    if centered:
        box = st.builds(lambda below, above: sets.Box(-below, above), st.floats(0.05, 2.0), st.floats(0.05, 2.0))
    else:
        box = st.builds(lambda lo, width: sets.Box(lo, lo + width), st.floats(-2.0, 1.0), st.floats(0.1, 3.0))
    l2 = st.builds(sets.L2Ball, radius, centre)
    linf = st.builds(sets.LInfBall, radius, centre)
    return st.one_of(box, l2, linf)
