"""JIIO: joint inference and input optimisation in an equilibrium network (Gurumurthy et al., NeurIPS 2021).

`JIIO` solves, per sample,

    min_x  objective(head(z, *context), target, x)   subject to   z = cell(z, x, *context),  x ∈ C

(or `max_x` with `maximize=True`) by declaring it as one `il.Problem`:

```text
FixedPoint(z, cell, (z, x, *context), damping=0.8)
Minimize(x, objective∘head, (z, target, x, *context), constraint=C, total=True,
         step_size=α, adjoint_damping=0.6)
```

Because the objective reads `z`, which the same block defines by an equation that depends on `x`, the
compiler adds the adjoint `μ` of the equation and the block's unknown is `[z; x; μ]` — the augmented
DEQ of the paper, solved jointly by one solver call. There is no solver or backward code here: the
forward solve, the KKT residual and the implicit gradients are those of `ImplicitLayer` (see the
concepts page on the KKT system).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..problem import FixedPoint, Input, Maximize, Minimize, Problem, Variable, copy_function
from ..sets import ConstraintSet
from ..solvers import Anderson

__all__ = ["JIIO"]

Shape = int | Sequence[int]


def _shape(value: Shape, what: str) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, int) else tuple(value)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"JIIO: {what} must be a positive int or a non-empty tuple of positive ints, got {value!r}.")
    return shape


class JIIO(nn.Module):
    """Joint inference (the DEQ state `z`) and input optimisation (`x`) in one augmented fixed point.

    `x_star, z_star = jiio(target, *context, x0=None)` returns, per sample, the optimised input and the
    equilibrium state at it. With `total=True` semantics (always, here) `x*` minimises the objective
    *through* the equilibrium: at the solution

    - `z = cell(z, x, *context)`,
    - `μ = J_zᵀ μ + ∂L/∂z` (the adjoint; `μ` is the DEQ backward variable),
    - `∂L/∂x + J_xᵀ μ = 0`, or `x = Π_C(x − α (∂L/∂x + J_xᵀ μ))` with a constraint set `C`,

    where `L(z, x) = objective(head(z, *context), target, x)`. One evaluation of the stacked map costs
    one call of `cell` and `head`/`objective` plus one vector–Jacobian product.

    Args:
        cell: the DEQ map `cell(z, x, *context) -> z'` (shaped like `z`).
        head: the output map `head(z, *context)`, e.g. a decoder's pixel layer or a classifier's logits.
        objective: `objective(output, target, x) -> (B,)`, one value per sample (sum, don't average over
            the batch: samples are independent problems).
        input_shape: the per-sample shape of the optimised input `x` (an int or a tuple).
        constraint: an `il.sets` set for `x` (`Box`, `L2Ball`, `LInfBall`), or `None`.
        maximize: maximise the objective instead (e.g. the loss of an adversarial perturbation).
        solver: forward solver of the augmented block; default
            `il.Anderson(memory=5, tol=1e-4, max_iter=100)`.
        backward: `il.IFT()` (default: exact implicit differentiation of the whole KKT block, which
            needs second derivatives of `cell` and `head`), `il.IFT(first_order=True)` (the reference
            code's choice: `x*` is held constant and only `z = cell(z, x*)` is differentiated, with the
            adjoint solve warm-started from the forward dual `μ*`), `il.Phantom(...)` or `il.Unroll()`.
        state_shape: the per-sample shape of `z`; it starts at zeros. Give this or `z_init`.
        z_init: start of `z`: a callable `z_init(target, *context) -> (B, ...)` or a tensor (one
            sample's shape broadcasts over the batch).
        step_size: the gradient step `α` of the input update `x ← Π(x − α ∇)` (the reference code's
            `ALPHA_0`). It depends on the scale of the objective; see the tutorial. `"auto"` takes
            `α = 1 / λ` per sample, `λ` the curvature of the total objective estimated at the start of
            each solve (21 evaluations): the right scale for any objective, but smaller than the step the
            joint iteration tolerates (see the concepts page on the KKT system).
        damping: the damping `β_z` of the state update `z ← z + β_z (cell(z, x) − z)` (reference: 0.8).
        adjoint_damping: the damping `β_μ` of `μ ← μ + β_μ (J_zᵀ μ + ∂L/∂z − μ)` (reference: 0.6).

    With a constraint, the returned `x_star` is always in the set: the layer projects constrained
    variables after the solve (Anderson mixes projected points with affine weights, which can leave it).

    Differences from the reference code (documented in the tutorial): the step size is constant (the
    reference switches `ALPHA_0[0] → ALPHA_0[1]` part-way), the solver stops at its tolerance (the
    reference always runs `JIIO_THRES` iterations), and the adversarial update is the plain projected
    gradient step `Π(x + α ∇)`, not the reference's normalised step `Π(x + α b/‖b‖)`, which is not a
    fixed-point residual of the declared problem.

    Example:
        ```python
        import torch
        import implicitlayers as il

        W = 0.5 * torch.eye(4)
        jiio = il.JIIO(
            cell=lambda z, x: torch.tanh(z @ W + x),
            head=lambda z: z,
            objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.1 * (x**2).sum(1),
            input_shape=4, state_shape=4, step_size=0.5,
        )
        x_star, z_star = jiio(0.3 * torch.ones(2, 4))
        ```
    """

    def __init__(
        self,
        cell: Callable[..., torch.Tensor],
        head: Callable[..., torch.Tensor],
        objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        input_shape: Shape,
        constraint: ConstraintSet | None = None,
        maximize: bool = False,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        *,
        state_shape: Shape | None = None,
        z_init: torch.Tensor | Callable[..., torch.Tensor] | None = None,
        step_size: float | str = 0.1,
        damping: float = 0.8,
        adjoint_damping: float = 0.6,
    ) -> None:
        super().__init__()
        for name, fn in (("cell", cell), ("head", head), ("objective", objective)):
            if not callable(fn):
                raise TypeError(f"JIIO: {name} must be callable, got {type(fn).__name__}.")
        if (state_shape is None) == (z_init is None):
            raise ValueError(
                "JIIO: give exactly one of state_shape= (z starts at zeros of that shape) or z_init= "
                "(a tensor or a callable of (target, *context)) so the state's shape is known."
            )
        # Registered so that their parameters are JIIO's parameters (the problem's wrappers are closures).
        self.cell, self.head, self.objective = cell, head, objective
        self.input_shape = _shape(input_shape, "input_shape")
        self.state_shape = None if state_shape is None else _shape(state_shape, "state_shape")
        self.z_init = z_init
        self.constraint, self.maximize = constraint, bool(maximize)
        self.solver = solver if solver is not None else Anderson(memory=5, tol=1e-4, max_iter=100)
        self.backward = backward if backward is not None else IFT()
        self.step_size, self.damping, self.adjoint_damping = step_size, damping, adjoint_damping
        # One layer per number of context tensors (the problem's inputs are fixed at declaration) and
        # per setting, so that changing e.g. `jiio.solver` after construction takes effect.
        self._layers: dict[tuple, ImplicitLayer] = {}
        self.layer(0)  # declare once now, so bad options fail at construction

    def __deepcopy__(self, memo: dict) -> "JIIO":
        # As default, but the user's functions (often lambdas over tensors) are copied with the memo, so a
        # copy (an EMA teacher, a float64 copy for checking) reads its own tensors, not the original's.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy_function(value, memo) if key in ("cell", "head", "objective") else copy.deepcopy(value, memo)
        return new

    # ------------------------------------------------------------------------------ the problem
    def layer(self, n_context: int) -> ImplicitLayer:
        """The `ImplicitLayer` of the augmented problem for `n_context` context tensors (built once per setting)."""
        key = (n_context, id(self.solver), id(self.backward), id(self.constraint), self.maximize,
               self.step_size, self.damping, self.adjoint_damping)
        if key not in self._layers:
            self._layers[key] = self._build(n_context)
        return self._layers[key]

    def _build(self, n_context: int) -> ImplicitLayer:
        z, x = Variable("z"), Variable("x")
        target = Input("target")
        context = [Input(f"context{i}") for i in range(n_context)]
        state_map, inner_objective = _StateMap(self.cell), _InnerObjective(self.objective, self.head)
        condition = Maximize if self.maximize else Minimize
        problem = Problem([
            FixedPoint(z, state_map, (z, x, *context), damping=self.damping),
            condition(
                x, inner_objective, (z, target, x, *context), self.constraint,
                total=True, step_size=self.step_size, adjoint_damping=self.adjoint_damping,
            ),
        ])
        # Context first: the layer takes its dtype from its first input, and targets may be class labels.
        return ImplicitLayer(
            problem, inputs=[*context, target], outputs=[x, z], solver=self.solver, backward=self.backward,
            init={"z": self._z_start, "x": self._zero_input},
            register_modules=False,
        )

    def _z_start(self, *tensors: torch.Tensor) -> torch.Tensor:
        *context, target = tensors
        batch = target.shape[0]
        ref = context[0] if context else target
        if self.state_shape is not None:
            return ref.new_zeros((batch, *self.state_shape), dtype=ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
        if callable(self.z_init) and not isinstance(self.z_init, torch.Tensor):
            return self.z_init(target, *context)
        start = self.z_init
        return start.expand(batch, *start.shape) if start.dim() == 0 or start.shape[0] != batch else start

    def _zero_input(self, *tensors: torch.Tensor) -> torch.Tensor:
        target = tensors[-1]
        ref = tensors[0] if tensors[0].is_floating_point() else target
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        return ref.new_zeros((target.shape[0], *self.input_shape), dtype=dtype)

    def _input_start(self, x0: torch.Tensor, batch: int) -> torch.Tensor:
        """The batched start of the optimised input from a user's `x0` (one sample's shape broadcasts)."""
        if tuple(x0.shape) == self.input_shape:
            return x0.expand(batch, *self.input_shape)
        if tuple(x0.shape) != (batch, *self.input_shape):
            raise ValueError(
                f"JIIO: x0 has shape {tuple(x0.shape)}; it must be ({batch}, *input_shape) = {(batch, *self.input_shape)} "
                f"or one sample's shape {self.input_shape}."
            )
        return x0

    # ------------------------------------------------------------------------------ calling
    def forward(self, target: torch.Tensor, *context: torch.Tensor, x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the joint problem; returns `(x_star, z_star)`, each `(B, ...)`.

        Args:
            target: what the objective compares the output with (images, labels, ...), `(B, ...)`.
            *context: further tensors passed to `cell` and `head` (e.g. the clean input of an attack).
            x0: start of the optimised input, `(B, *input_shape)` or `input_shape`; default zeros.
        """
        solution = self.solve(target, *context, x0=x0)
        return solution.values["x"], solution.values["z"]

    def solve(self, target: torch.Tensor, *context: torch.Tensor, x0: torch.Tensor | None = None) -> Solution:
        """Like calling the module, but returns the full `Solution`: `values["x"]`, `values["z"]`, the
        forward `SolveInfo` (`info`, one entry for the block; `nfe` counts augmented evaluations) and the
        dual `duals["mu[x|z]"]`."""
        if x0 is not None and not isinstance(x0, torch.Tensor):
            raise TypeError(f"JIIO: x0 must be a tensor or None, got {type(x0).__name__}.")
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"JIIO: target must be a torch.Tensor, got {type(target).__name__}.")
        layer = self.layer(len(context))
        # The start travels with this call (never through the module), so concurrent calls stay independent.
        init = None if x0 is None else {"x": self._input_start(x0, target.shape[0])}
        return layer.solve(*context, target, init=init)

    def inner_objective(self, x: torch.Tensor, z: torch.Tensor, target: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        """The objective `(B,)` at a given input and state (as minimised, i.e. without the sign of `maximize`)."""
        return self.objective(self.head(z, *context), target, x)

    def extra_repr(self) -> str:
        kind = "maximize" if self.maximize else "minimize"
        z = self.state_shape if self.state_shape is not None else "z_init"
        return (
            f"{kind}, input_shape={self.input_shape}, state={z}, constraint={self.constraint}, "
            f"step_size={self.step_size}, damping={self.damping}, adjoint_damping={self.adjoint_damping}, "
            f"solver={self.solver}, backward={self.backward}"
        )


class _StateMap:
    """`(z, x, *context) ↦ cell(z, x, *context)`: a picklable condition function (a local closure is not)."""

    def __init__(self, cell: Callable[..., torch.Tensor]) -> None:
        self.cell = cell

    def __deepcopy__(self, memo: dict) -> "_StateMap":
        # A user's lambda over tensors must follow the copy, as a condition's own closure does.
        return _StateMap(copy_function(self.cell, memo))

    def __call__(self, z: torch.Tensor, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return self.cell(z, x, *context)


class _InnerObjective:
    """`(z, target, x, *context) ↦ objective(head(z, *context), target, x)`, picklable."""

    def __init__(self, objective: Callable[..., torch.Tensor], head: Callable[..., torch.Tensor]) -> None:
        self.objective, self.head = objective, head

    def __deepcopy__(self, memo: dict) -> "_InnerObjective":
        return _InnerObjective(copy_function(self.objective, memo), copy_function(self.head, memo))

    def __call__(self, z: torch.Tensor, target: torch.Tensor, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return self.objective(self.head(z, *context), target, x)
