"""Random problem graphs: DAGs of blocks of contractive linear conditions, with a dense oracle.

Every variable `v_i` obeys one linear relation `H_i v_i = Σ_j W_ij a_j + c_i`, where the `a_j` are the
nodes its condition reads (variables of its own block, of earlier blocks, and inputs):

- `FixedPoint(v, f, (v, ...))` with `f = W_self v + Σ_j W_j a_j + c` (`H = I − W_self`),
- `Root(v, g, (v, ...))` with `g = v − f` (the same relation),
- `Minimize(v, ½ vᵀQv − vᵀ(Σ_j W_j a_j + c), (v, ...))` in a block of its own (`H = Q`, positive definite).

Inside a block the coupling matrix of the block's variables has spectral norm `contraction < 1`, so
the block's map contracts; the whole system is block lower triangular in topological order, so one
dense solve of `(H − W) V = E X + c` gives every variable exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from hypothesis import strategies as st
from torch import nn

from ..backward import BackwardMode
from ..layer import ImplicitLayer
from ..problem import Condition, FixedPoint, Input, Minimize, Node, Problem, Root, Variable
from ..solvers import Anderson
from ._basic import batch_sizes, dtypes, seeds

__all__ = ["LinearMap", "ResidualOf", "QuadraticOf", "ProblemGraph", "problem_graphs"]

KINDS = ("fixed_point", "root", "minimize")


class LinearMap(nn.Module):
    """`f(a_1, …, a_k) = Σ_j a_j W_jᵀ + c`."""

    def __init__(self, weights: Sequence[torch.Tensor], bias: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
        self.bias = nn.Parameter(bias)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.bias
        for a, w in zip(args, self.weights, strict=True):
            out = out + a @ w.T
        return out


class ResidualOf(nn.Module):
    """`g(v, a_1, …) = v − f(v, a_1, …)` for a `Root` condition."""

    def __init__(self, f: LinearMap) -> None:
        super().__init__()
        self.f = f

    def forward(self, v: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return v - self.f(v, *args)


class QuadraticOf(nn.Module):
    """`L(v, a_1, …) = ½ vᵀ Q v − vᵀ f(a_1, …)` for a `Minimize` condition; stationarity `Q v = f`."""

    Q: torch.Tensor  # a buffer

    def __init__(self, Q: torch.Tensor, f: LinearMap) -> None:
        super().__init__()
        self.register_buffer("Q", Q)
        self.f = f

    def forward(self, v: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((v @ self.Q) * v).sum(1) - (v * self.f(*args)).sum(1)


@dataclasses.dataclass(frozen=True)
class ProblemGraph:
    """A drawn problem with inputs, starts and its exact solution.

    Attributes:
        problem: the `il.Problem`.
        inputs: its `il.Input` nodes, in the order `tensors` follow.
        variables: its `il.Variable` nodes (every one is an output of `layer()`).
        tensors: a batch of input tensors `(B, d_x)`.
        init: zeros of one sample's shape, by variable name (for `ImplicitLayer(init=...)`).
        contraction: the spectral norm of each block's coupling.
        kinds: the condition kind of each variable, by name.
    """

    problem: Problem
    inputs: list[Input]
    variables: list[Variable]
    tensors: tuple[torch.Tensor, ...]
    init: dict[str, torch.Tensor]
    contraction: float
    kinds: dict[str, str]
    _oracle: Callable[..., dict[str, torch.Tensor]] = dataclasses.field(repr=False)

    def solution(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every variable's exact value for the given inputs (default: the drawn ones), by a dense solve."""
        return self._oracle(*(tensors or self.tensors))

    def layer(self, *, solver=None, backward: BackwardMode | None = None) -> ImplicitLayer:
        """An `ImplicitLayer` returning every variable (in `variables` order), with a tight default solver."""
        if solver is None:
            solver = Anderson(tol=1e-5 if self.tensors[0].dtype == torch.float32 else 1e-9, max_iter=300)
        return ImplicitLayer(self.problem, self.inputs, self.variables, solver=solver, backward=backward, init=self.init)


def problem_graphs(
    *,
    max_blocks: int = 3,
    max_block_size: int = 2,
    max_dim: int = 3,
    max_inputs: int = 2,
    kinds: Sequence[str] = KINDS,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    contraction: tuple[float, float] = (0.1, 0.8),
) -> st.SearchStrategy[ProblemGraph]:
    """Random DAGs of blocks of contractive linear conditions, as an `il.Problem` with inputs and an oracle.

    Args:
        max_blocks: the most blocks (strongly connected components).
        max_block_size: the most variables in one block (each reads every other one: a cycle).
        max_dim: the largest dimension of a variable or input.
        max_inputs: the most inputs (each is read by at least one condition).
        kinds: the condition kinds to draw from (`"minimize"` only for single-variable blocks).
        dtype: fixed dtype, or `None` to draw float32/float64.
        batch_size: fixed batch size, or `None` to draw 1–8.
        contraction: the range of the blocks' coupling norm.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"problem_graphs: kinds must be a non-empty subset of {KINDS}, got {list(kinds)}.")
    if not 0 < contraction[0] <= contraction[1] < 1:
        raise ValueError(f"problem_graphs: contraction must be a range within (0, 1), got {contraction!r}.")
    for name, value in (("max_blocks", max_blocks), ("max_block_size", max_block_size), ("max_dim", max_dim), ("max_inputs", max_inputs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"problem_graphs: {name} must be an integer >= 1, got {value!r}.")
    return _problem_graphs(max_blocks, max_block_size, max_dim, max_inputs, tuple(kinds), dtype, batch_size, contraction)


@st.composite
def _problem_graphs(draw: Callable, max_blocks, max_block_size, max_dim, max_inputs, kinds, dtype, batch_size, contraction) -> ProblemGraph:
    dtype = draw(dtypes()) if dtype is None else dtype
    batch = draw(batch_sizes()) if batch_size is None else batch_size
    factor = draw(st.floats(*contraction))
    gen = torch.Generator().manual_seed(draw(seeds()))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n_inputs = draw(st.integers(1, max_inputs))
    input_dims = [draw(st.integers(1, max_dim)) for _ in range(n_inputs)]
    blocks: list[list[int]] = []
    dims: list[int] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        size = draw(st.integers(1, max_block_size))
        blocks.append(list(range(len(dims), len(dims) + size)))
        dims += [draw(st.integers(1, max_dim)) for _ in range(size)]
    n_vars = len(dims)
    block_of = {i: b for b, members in enumerate(blocks) for i in members}
    # Which earlier variables and inputs each variable reads; every input is read somewhere.
    reads_var = {i: [j for j in range(n_vars) if block_of[j] < block_of[i] and draw(st.booleans())] for i in range(n_vars)}
    reads_in = {i: [k for k in range(n_inputs) if draw(st.booleans())] for i in range(n_vars)}
    for k in range(n_inputs):
        if not any(k in r for r in reads_in.values()):
            reads_in[draw(st.integers(0, n_vars - 1))].append(k)
    kind_of = {}
    for members in blocks:
        allowed = [k for k in kinds if k != "minimize" or len(members) == 1] or ["fixed_point"]
        for i in members:
            kind_of[i] = draw(st.sampled_from(allowed))

    offsets = [sum(dims[:i]) for i in range(n_vars)]
    in_offsets = [sum(input_dims[:k]) for k in range(n_inputs)]
    D, Dx = sum(dims), sum(input_dims)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    H, T, E, c = zeros(D, D), zeros(D, D), zeros(D, Dx), zeros(D)

    def rows(i: int) -> slice:
        return slice(offsets[i], offsets[i] + dims[i])

    variables = [Variable(f"v{i}") for i in range(n_vars)]
    inputs = [Input(f"x{k}") for k in range(n_inputs)]
    conditions: list[Condition] = []
    for members in blocks:
        size = sum(dims[i] for i in members)
        coupling = randn(size, size)
        coupling = coupling * (factor / float(torch.linalg.matrix_norm(coupling, 2)))
        local = {i: sum(dims[j] for j in members if j < i) for i in members}
        for i in members:
            args: list[Node] = []
            weights: list[torch.Tensor] = []
            r = slice(local[i], local[i] + dims[i])
            if kind_of[i] != "minimize":  # equations read their own variable and the rest of the block
                for j in [i] + [m for m in members if m != i]:  # own variable first (ResidualOf reads it)
                    args.append(variables[j])
                    weights.append(coupling[r, local[j] : local[j] + dims[j]].clone())
            for j in reads_var[i]:
                args.append(variables[j])
                weights.append(randn(dims[i], dims[j]) / dims[j] ** 0.5)
            for k in reads_in[i]:
                args.append(inputs[k])
                weights.append(randn(dims[i], input_dims[k]) / input_dims[k] ** 0.5)
            bias = 0.1 * randn(dims[i])
            for node, w in zip(args, weights):
                if isinstance(node, Variable):
                    T[rows(i), rows(variables.index(node))] += w
                else:
                    assert isinstance(node, Input)
                    k = inputs.index(node)
                    E[rows(i), in_offsets[k] : in_offsets[k] + input_dims[k]] += w
            c[rows(i)] = bias
            f = LinearMap(weights, bias)
            if kind_of[i] == "minimize":
                q, _ = torch.linalg.qr(randn(dims[i], dims[i]))
                eig = 0.5 + 1.5 * torch.rand(dims[i], generator=gen, dtype=torch.float64)
                Q = (q * eig) @ q.T
                Q = 0.5 * (Q + Q.T)
                H[rows(i), rows(i)] = Q
                conditions.append(Minimize(variables[i], QuadraticOf(Q, f).to(dtype), (variables[i], *args), step_size=1.0 / 2.0))
            else:
                H[rows(i), rows(i)] = torch.eye(dims[i], dtype=torch.float64)
                fn: nn.Module = f.to(dtype) if kind_of[i] == "fixed_point" else ResidualOf(f).to(dtype)
                cls = FixedPoint if kind_of[i] == "fixed_point" else Root
                conditions.append(cls(variables[i], fn, args))

    system = H - T

    def oracle(*tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.cat([t.detach().double().reshape(t.shape[0], -1) for t in tensors], 1)
        values = torch.linalg.solve(system, (x @ E.T + c).T).T
        return {v.name: values[:, rows(i)].to(tensors[0].dtype) for i, v in enumerate(variables)}

    tensors = tuple(randn(batch, d).to(dtype) for d in input_dims)
    init = {v.name: torch.zeros(dims[i], dtype=dtype) for i, v in enumerate(variables)}
    return ProblemGraph(
        Problem(conditions), inputs, variables, tensors, init, factor,
        {v.name: kind_of[i] for i, v in enumerate(variables)}, oracle,
    )
