"""`DEQ`: a deep equilibrium layer, `z* = cell(z*, x)`, as one `FixedPoint` problem.

A DEQ is the smallest instance of the library: one input `x`, one variable `z`, one condition
`FixedPoint(z, cell, (z, x))`, wrapped in an `ImplicitLayer`. Everything else — the solver loop,
per-sample convergence, the failure policy, the IFT / phantom / unrolled backward — is the
layer's, so this module holds no solver or backward code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..problem import FixedPoint, Input, Problem, Variable
from ..solvers import Anderson, SolveInfo, Solver

__all__ = ["DEQ"]

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DEQ(nn.Module):
    """A deep equilibrium layer: `deq(x)` returns `z*` with `z* = cell(z*, x)`, per sample.

    The equilibrium is found by `solver` without recording a graph, and differentiated by
    `backward` — by default the implicit function theorem, whose memory does not depend on the
    number of forward iterations.

    Args:
        cell: the map `(z, x) -> z'`, returning a tensor shaped like `z`. An `nn.Module` is registered
            as the submodule `cell`, so its parameters appear in `deq.parameters()`; parameters
            captured by a plain function receive gradients too, but you must hand them to the
            optimizer yourself.
        solver: forward solver (default `il.Anderson(memory=5, tol=1e-4, max_iter=50)`); any
            implicitlayers solver, e.g. `il.Broyden(...)` or `il.FixedPointIteration(...)`.
        backward: `il.IFT()` (default), `il.Phantom(k, damping)` or `il.Unroll()`.
        z_init: the solver's start. `None` (default) starts at zeros shaped like `x`; a tensor is either
            batched `(B, ...)` or one sample's shape (broadcast over the batch); a callable receives `x`
            and returns the batched start. Use a tensor or callable when `z` and `x` differ in shape.

    Attributes:
        last_solution: the `il.Solution` of the last call (`None` before the first).

    Example:
        ```python
        import torch
        import implicitlayers as il

        class Cell(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.linear = torch.nn.Linear(d, d)

            def forward(self, z, x):
                return torch.tanh(0.5 * self.linear(z) + x)

        deq = il.DEQ(Cell(8))
        x = torch.randn(4, 8)
        z = deq(x)                 # (4, 8), the equilibrium
        print(deq.last_info)       # SolveInfo(converged=4/4, ..., nfe=...)
        z.sum().backward()         # IFT gradients reach deq.cell's parameters
        ```
    """

    def __init__(
        self,
        cell: Cell,
        *,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        z_init: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"DEQ: cell must be a callable (z, x) -> z' or an nn.Module, got {type(cell).__name__}.")
        if z_init is not None and not (isinstance(z_init, torch.Tensor) or callable(z_init)):
            raise TypeError(
                f"DEQ: z_init must be None (zeros shaped like x), a tensor or a callable of x, got {type(z_init).__name__}."
            )
        if isinstance(z_init, torch.Tensor) and not z_init.is_floating_point():
            raise TypeError(f"DEQ: a z_init tensor must be floating point, got {z_init.dtype}.")
        if isinstance(z_init, torch.Tensor):
            # A buffer moves with `.to(device)` and is saved in the state dict; the start reads it at call time.
            self.register_buffer("z_init", z_init.detach().clone())
            start: Any = _BufferStart(self)
        else:
            self.z_init = z_init
            start = _zeros_like if z_init is None else z_init
        # The cell is registered once, under its own name (`deq.cell.weight`): the layer uses it without
        # registering it again, so `state_dict` keys are unique and `torch.func.functional_call` swaps
        # (and restores) each parameter under one name.
        self.cell = cell
        x, z = Input("x"), Variable("z")
        self.layer = ImplicitLayer(
            Problem([FixedPoint(z, cell, (z, x))]),
            inputs=[x],
            outputs=[z],
            solver=solver if solver is not None else Anderson(memory=5, tol=1e-4, max_iter=50),
            backward=backward,
            init={"z": start},
            register_modules=False,
        )

    @property
    def solver(self) -> Any:
        """The forward solver; assign another to change it (e.g. a per-client budget:
        `deq.solver = deq.solver.replace(max_iter=8)`)."""
        return self.layer.solver

    @solver.setter
    def solver(self, solver: Any) -> None:
        if not isinstance(solver, Solver):
            raise TypeError(f"DEQ: solver must be an implicitlayers solver (e.g. il.Anderson()), got {solver!r}.")
        self.layer.solver = solver

    @property
    def backward_mode(self) -> IFT | Phantom | Unroll:
        """The backward mode (`il.IFT`, `il.Phantom` or `il.Unroll`)."""
        return self.layer.backward_mode

    @property
    def last_solution(self) -> Solution | None:
        """The full `il.Solution` of the last call, or `None` before the first."""
        return self.layer.last_solution

    @property
    def last_info(self) -> SolveInfo | None:
        """The forward `SolveInfo` of the last call (per-sample `nstep`, `residual`, `converged`, and `nfe`)."""
        solution = self.layer.last_solution
        return None if solution is None else next(iter(solution.info.values()))

    @property
    def nfe(self) -> int:
        """Batched cell evaluations of the last forward solve (0 before the first call)."""
        info = self.last_info
        return 0 if info is None else info.nfe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The equilibrium `z*` for the batch `x` (`(B, ...)`), differentiable by the backward mode."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DEQ: x must be a torch.Tensor with a leading batch dimension, got {type(x).__name__}.")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"DEQ: x must have a non-empty leading batch dimension, got shape {tuple(x.shape)}.")
        # The layer computes normalised weights once per call and keeps a detached last solution.
        (z,) = self.layer(x)
        return z

    def solve(self, x: torch.Tensor) -> Solution:
        """Like `forward`, but returns the whole `il.Solution` (`.info`; `.values["z"]` is detached, use `forward` to differentiate)."""
        self.forward(x)
        return self.layer.last_solution

    def extra_repr(self) -> str:
        return f"solver={self.layer.solver!r}, backward={self.layer.backward_mode!r}"


def _zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


class _BufferStart:
    """Reads the DEQ's `z_init` buffer at call time (so it follows `.to(device)` and `load_state_dict`)."""

    def __init__(self, deq: DEQ) -> None:
        self.deq = deq  # a plain reference, so `copy.deepcopy(deq)` points the copy at its own buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        start = self.deq.z_init
        if start.dim() > 1 and start.shape[0] == x.shape[0]:
            return start  # batched
        return start.expand(x.shape[0], *start.shape)
