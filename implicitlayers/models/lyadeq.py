"""`LyaDEQ`: a DEQ made Lyapunov stable by a learned convex Lyapunov function, in four readings.

A reconstruction of Chu, Wei, Liu, Zhao (and Miyatake), "Learning Robust Deep Equilibrium Models" /
"Lyapunov-Stable Deep Equilibrium Models" (arXiv 2304.12707), whose full text was not available:
the stable-dynamics projection of Kolter & Manek (2019) applied to the DEQ's continuous-time
dynamics `ż = f(z, x) − z`, then an orthogonal linear layer. Where `V` is centred decides what the
layer computes; `centre=`, `budget=` and `pull=` select the reading (`docs/concepts/lyadeq.md` states
each one's dynamics, equilibrium, well-posedness and gradients). Every state is solved by
`ImplicitLayer`; this module holds no solver or backward code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from ..backward import IFT, Phantom, Unroll
from ..layer import ImplicitLayer, Solution
from ..nn import LyapunovFunction, OrthogonalLinear
from ..nn.lyapunov import ConditionalLyapunovFunction
from ..problem import FixedPoint, Input, Problem, Variable
from ..solvers import Anderson, SolveInfo
from ._lyapunov_dynamics import project_dynamics, pull_dynamics
from .weight_tied import WeightTied

__all__ = ["LyaDEQ", "project_dynamics", "pull_dynamics"]

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Centre = Literal["fixed_point", "origin", "learned", "conditioned"]
CENTRES = ("fixed_point", "origin", "learned", "conditioned")


class LyaDEQ(nn.Module):
    """A Lyapunov-stable deep equilibrium layer: `lyadeq(x) = Q z*`, `z*` a state of stable dynamics.

    Reconstructed from Chu et al. (arXiv 2304.12707; full text unavailable — see
    `docs/concepts/lyadeq.md`). With `f = cell`, `F(z) = f(z, x) − z` and a learned convex Lyapunov
    function `V` (an input-convex network, minimal at its *centre*), the state follows either the
    **projected** dynamics `ż = F̃(z) = F − ∇V ReLU(∇VᵀF + αV)/‖∇V‖²` (along which `dV/dt ≤ −αV`,
    so the centre is the only equilibrium and is globally exponentially stable) or, with `pull=β`,
    the **balanced** dynamics `ż = F(z) − β∇V(z)`. The readings:

    | `centre` | options | state `z*` | gradients |
    |---|---|---|---|
    | `"fixed_point"` (default) | — | the DEQ's fixed point `c* = f(c*, x)`, on which `V` is centred | IFT |
    | `"origin"`, `"learned"` | `budget=K` | `K` Euler steps of `F̃` towards `0` / a learned point `c₀` | unrolled |
    | `"origin"`, `"learned"` | `pull=β` | `f(z*, x) − z* = β∇V(z*)` | IFT |
    | `"conditioned"` | none, `budget=K` or `pull=β` | `c(x)` (solver may stall), `K` steps, or balanced | IFT / unrolled / IFT |

    With `"conditioned"`, `V(z; x)` is convex in `z` for every `x` (a partially input-convex network)
    with minimum at a learned `c(x)` ([`ConditionalLyapunovFunction`][implicitlayers.nn.lyapunov.ConditionalLyapunovFunction]).
    Finally `Q` ([`OrthogonalLinear`][implicitlayers.nn.OrthogonalLinear], square) maps `z*` to the
    output features; put the classification head after it.

    !!! warning "What the default does not do"
        With `centre="fixed_point"`, `z* = c*`: the layer's value, hence its clean and adversarial
        predictions, are those of the plain DEQ with the same cell, and the task loss gives `V` no
        gradient. The other readings make the state depend on `V`; see the concepts page for what each
        costs and for the measured robustness.

    Args:
        cell: the DEQ map `(z, x) -> z'`, `z` of shape `(B, dim)`. An `nn.Module` is registered once, as
            `cell`, so its parameters appear in `parameters()`.
        dim: the dimension of `z` (the size of the cell's state).
        lyapunov: `V`: a module with `value_and_grad(z, ref) -> (V (B,), ∇V (B, dim))`. Default
            `il.nn.LyapunovFunction(dim)` (`ref` is the centre), or for `centre="conditioned"`
            `ConditionalLyapunovFunction(dim, dim)` (`ref` is `x`, which then has shape `(B, dim)`;
            pass your own for another width of `x`).
        centre: where `V` is minimal: `"fixed_point"`, `"origin"`, `"learned"` or `"conditioned"`.
        budget: with a centre other than `"fixed_point"`: the state is exactly `budget` Euler steps of
            `F̃` from `z_init` (an `il.WeightTied` network of the step map), differentiated by
            backpropagation through them.
        pull: with a centre other than `"fixed_point"`: the weight `β > 0` of the balanced dynamics.
        alpha: the guaranteed decay rate `α > 0` of `V` under the projected dynamics.
        step_size: the Euler step `h > 0` of the fixed-point map `z ↦ z + h ż` (its fixed points do not
            depend on `h`; with `budget`, `h` and `budget` set the integrated time `h · budget`). The same
            name as `Minimize(step_size=...)`, the step of the other fixed-point maps.
        step: deprecated spelling of `step_size` (a `DeprecationWarning`; removed in the next release).
        orthogonal: apply the orthogonal layer `Q` (`False` returns `z*` itself, for ablations).
        solver: forward solver (default `il.Anderson(memory=5, tol=1e-4, max_iter=50)`); not with `budget`.
        backward: `il.IFT()` (default), `il.Phantom(...)` or `il.Unroll()`; not with `budget`.
        z_init: start of every solve: `None` (zeros `(B, dim)`), a tensor (`(dim,)` or `(B, dim)`) or a
            callable of `x` returning `(B, dim)`.

    Example:
        ```python
        import torch
        import implicitlayers as il

        class Cell(torch.nn.Module):
            def __init__(self, d):
                super().__init__()
                self.linear = torch.nn.Linear(d, d)

            def forward(self, z, u):
                return torch.tanh(0.5 * self.linear(z) + u)

        lyadeq = il.LyaDEQ(Cell(8), 8, alpha=0.1)
        features = lyadeq(torch.randn(4, 8))                    # (4, 8) = Q z*
        pulled = il.LyaDEQ(Cell(8), 8, centre="learned", pull=0.5)
        z_star = pulled.equilibrium(torch.randn(4, 8))          # depends on V and its centre
        ```
    """

    def __init__(
        self,
        cell: Cell,
        dim: int,
        *,
        lyapunov: nn.Module | None = None,
        centre: Centre = "fixed_point",
        budget: int | None = None,
        pull: float | None = None,
        alpha: float = 0.1,
        step_size: float = 0.5,
        orthogonal: bool = True,
        solver: Any = None,
        backward: IFT | Phantom | Unroll | None = None,
        z_init: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        step: float | None = None,
    ) -> None:
        super().__init__()
        if step is not None:
            warnings.warn("LyaDEQ: `step` is deprecated, use `step_size` (the same Euler step h).",
                          DeprecationWarning, stacklevel=2)
            step_size = step
        if not callable(cell):
            raise TypeError(f"LyaDEQ: cell must be a callable (z, x) -> z' or an nn.Module, got {type(cell).__name__}.")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"LyaDEQ: dim must be a positive integer (the size of z), got {dim!r}.")
        for name, value in (("alpha", alpha), ("step_size", step_size)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                meaning = "the decay rate of V" if name == "alpha" else "the Euler step h"
                raise ValueError(f"LyaDEQ: {name} must be a positive number ({meaning}), and finite; got {value!r}.")
        _check_reading(centre, budget, pull, solver, backward)
        lyapunov = _check_lyapunov(lyapunov, dim, centre)
        if z_init is not None and not (isinstance(z_init, torch.Tensor) or callable(z_init)):
            raise TypeError(f"LyaDEQ: z_init must be None, a tensor or a callable of x, got {type(z_init).__name__}.")
        self.dim = dim
        self.centre_kind = centre
        self.budget = budget
        self.pull = None if pull is None else float(pull)
        self.alpha = float(alpha)
        self.step_size = float(step_size)
        # Registered here only (the layer gets `register_modules=False`; the state maps are bound methods),
        # so each parameter has one name: `functional_call` and `state_dict` see every tensor once.
        self.cell = cell
        self.lyapunov = lyapunov
        self.learned_centre = nn.Parameter(torch.zeros(dim)) if centre == "learned" else None
        self.orthogonal = OrthogonalLinear(dim, dim) if orthogonal else None
        self.z_init = z_init
        self._checked_shapes: set[tuple] = set()
        if budget is not None:
            # Exactly `budget` Euler steps, backpropagated through: a weight-tied network, not a solve
            # (a solver would return its best iterate, which switches discontinuously with the input).
            self.layer: ImplicitLayer | WeightTied = WeightTied(self._step, budget, z_init=self._start)
            return
        x, z = Input("x"), Variable("z")
        if centre == "fixed_point":
            anchor = Variable("anchor")
            conditions = [FixedPoint(anchor, cell, (anchor, x)), FixedPoint(z, self._anchored_step, (z, anchor, x))]
            init = {"anchor": self._start, "z": self._start}
        else:
            conditions, init = [FixedPoint(z, self._step, (z, x))], {"z": self._start}
        self.layer = ImplicitLayer(
            Problem(conditions),
            inputs=[x],
            outputs=[z],
            solver=solver if solver is not None else Anderson(memory=5, tol=1e-4, max_iter=50),
            backward=backward,
            init=init,
            register_modules=False,
        )

    # ------------------------------------------------------------------------------ calling
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features `Q z*` (or `z*` with `orthogonal=False`) for the batch `x`, shape `(B, dim)`."""
        z = self.equilibrium(x)
        return z if self.orthogonal is None else self.orthogonal(z)

    def equilibrium(self, x: torch.Tensor) -> torch.Tensor:
        """The state `z*` (before the orthogonal layer), differentiable by the backward mode."""
        return self.solve(x).values["z"]

    def solve(self, x: torch.Tensor) -> Solution:
        """The whole solve: `.values["z"]` (and `["anchor"]` for `centre="fixed_point"`), `.info` per block."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LyaDEQ: x must be a torch.Tensor with a leading batch dimension, got {type(x).__name__}.")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"LyaDEQ: x must have a non-empty leading batch dimension, got shape {tuple(x.shape)}.")
        self._check_cell(x)
        if isinstance(self.layer, WeightTied):
            return Solution(values={"z": self.layer(x)}, info={}, duals={})
        # The layer computes normalised weights once per solve and keeps a detached last solution.
        return self.layer.solve(x)

    # ------------------------------------------------------------------------------ the dynamics
    def centre(self, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """The minimiser of `V` for the batch `x`, `(B, dim)`: `anchor` (the DEQ fixed point), `0`, `c₀` or `c(x)`."""
        if self.centre_kind == "fixed_point":
            return _need_anchor(anchor)
        if self.centre_kind == "conditioned":
            return self.lyapunov.centre(x)
        z = x.new_zeros(x.shape[0], self.dim)
        return z if self.learned_centre is None else z + self.learned_centre

    def lyapunov_value_and_grad(
        self, z: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(V(z), ∇V(z))` of this reading, shapes `(B,)` and `(B, dim)` (`anchor` only for `"fixed_point"`)."""
        if self.centre_kind == "fixed_point":
            return self.lyapunov.value_and_grad(z, _need_anchor(anchor))
        if self.centre_kind == "conditioned":
            return self.lyapunov.value_and_grad(z, x)
        return self.lyapunov.value_and_grad(z, None if self.learned_centre is None else self.learned_centre)

    def lyapunov_value(self, z: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """`V(z)` of this reading, shape `(B,)`."""
        return self.lyapunov_value_and_grad(z, x, anchor)[0]

    def dynamics(self, z: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """The vector field `ż` whose state the layer returns: `F̃(z)` (projected) or `F(z) − β∇V(z)` (with `pull`)."""
        nominal = self.cell(z, x) - z
        # `value_and_grad` uses `torch.func`: ∇V is itself differentiable (the IFT of the state block
        # differentiates the field, hence ∇V, so it needs V's second derivatives).
        value, grad = self.lyapunov_value_and_grad(z, x, anchor)
        if self.pull is not None:
            return pull_dynamics(nominal, grad, self.pull)
        return project_dynamics(nominal, value, grad, self.alpha)

    def stability_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of `V`, of a learned centre and of `Q`: stage two of two-stage training.

        Train the DEQ (the cell and its head) first, freeze the cell (`lyadeq.cell.requires_grad_(False)`),
        then optimise these together with the head.
        """
        yield from self.lyapunov.parameters()
        if self.learned_centre is not None:
            yield self.learned_centre
        if self.orthogonal is not None:
            yield from self.orthogonal.parameters()

    # ------------------------------------------------------------------------------ diagnostics
    @property
    def last_solution(self) -> Solution | None:
        """The `il.Solution` of the last call (detached values); `None` before the first and with `budget`."""
        return None if isinstance(self.layer, WeightTied) else self.layer.last_solution

    @property
    def last_info(self) -> dict[str, SolveInfo] | None:
        """Forward `SolveInfo` of the last call by block (the anchor's solve first, for `"fixed_point"`).

        `None` before the first call, and with `budget` (no solve: a fixed number of steps).
        """
        solution = self.last_solution
        return None if solution is None else dict(solution.info)

    @property
    def nfe(self) -> int:
        """Batched evaluations of the last forward call, all solves together (0 before the first call; `budget` with it)."""
        if isinstance(self.layer, WeightTied):
            return self.budget
        info = self.last_info
        return 0 if info is None else sum(i.nfe for i in info.values())

    # ------------------------------------------------------------------------------ conditions
    def _anchored_step(self, z: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z + self.step_size * self.dynamics(z, x, anchor)

    def _step(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z + self.step_size * self.dynamics(z, x)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.z_init
        if spec is None:
            return x.new_zeros(x.shape[0], self.dim)
        start = spec(x) if callable(spec) and not isinstance(spec, torch.Tensor) else spec
        if not isinstance(start, torch.Tensor):
            raise TypeError(f"LyaDEQ: z_init must return a tensor, got {type(start).__name__}.")
        if start.shape == (self.dim,):
            start = start.expand(x.shape[0], self.dim)
        if start.shape != (x.shape[0], self.dim):
            raise ValueError(f"LyaDEQ: z_init gave shape {tuple(start.shape)}; expected ({x.shape[0]}, {self.dim}) or ({self.dim},).")
        return start.to(device=x.device, dtype=x.dtype)

    def _check_cell(self, x: torch.Tensor) -> None:
        """Apply the cell once per input shape, so that a `dim` that does not fit it fails here, clearly."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key in self._checked_shapes:
            return
        z = self._start(x)
        expected = f"z of shape (B, dim) = {tuple(z.shape)} and x of shape {tuple(x.shape)}"
        try:
            with torch.no_grad():
                out = self.cell(z, x)
        except RuntimeError as error:
            message = str(error).lower()
            if "dtype" in message or ("type" in message and "expected" in message):
                # A dtype mismatch (e.g. float16 inputs to a float32 cell) is not about dim: say what it is.
                raise TypeError(
                    f"LyaDEQ: the cell fails on {expected} ({x.dtype}): {error}. Give x the dtype of the cell's "
                    "parameters, or convert the module (e.g. .to(x.dtype))."
                ) from error
            raise ValueError(
                f"LyaDEQ: the cell fails on {expected}: {error}. LyaDEQ(cell, dim) needs dim = the size of the "
                f"cell's state z; pass the dim your cell expects (now dim={self.dim})."
            ) from error
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"LyaDEQ: the cell returned {got} for {expected}; it must return z' shaped like z, "
                f"{tuple(z.shape)}. Pass dim = the size of the cell's state (now dim={self.dim})."
            )
        self._checked_shapes.add(key)

    def extra_repr(self) -> str:
        reading = f"centre={self.centre_kind!r}"
        if self.budget is not None:
            reading += f", budget={self.budget}"
        if self.pull is not None:
            reading += f", pull={self.pull}"
        return f"dim={self.dim}, {reading}, alpha={self.alpha}, step_size={self.step_size}, solver={self.layer.solver!r}"


def _need_anchor(anchor: torch.Tensor | None) -> torch.Tensor:
    if anchor is None:
        raise ValueError(
            "LyaDEQ: with centre='fixed_point', V is centred at the DEQ fixed point; pass anchor= "
            "(e.g. lyadeq.solve(x).values['anchor'])."
        )
    return anchor


def _check_reading(centre: object, budget: object, pull: object, solver: Any, backward: Any) -> None:
    """Reject combinations of `centre`, `budget` and `pull` that do not define a usable state, saying why."""
    if centre not in CENTRES:
        raise ValueError(f"LyaDEQ: centre must be one of {CENTRES}, got {centre!r}.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"LyaDEQ: budget must be None or a positive number of Euler steps, got {budget!r}.")
    if pull is not None and (isinstance(pull, bool) or not isinstance(pull, (int, float)) or not 0 < pull < math.inf):
        raise ValueError(f"LyaDEQ: pull must be None or a positive finite weight beta, got {pull!r}.")
    if budget is not None and pull is not None:
        raise ValueError("LyaDEQ: pass budget= (stop the projected dynamics after K steps) or pull= (balanced dynamics), not both.")
    if centre == "fixed_point" and (budget is not None or pull is not None):
        raise ValueError(
            "LyaDEQ: centre='fixed_point' solves the projected dynamics to their equilibrium, the DEQ fixed point; "
            "budget= and pull= apply to centre='origin', 'learned' or 'conditioned'."
        )
    if centre in ("origin", "learned") and budget is None and pull is None:
        raise ValueError(
            f"LyaDEQ: with centre={centre!r} and neither budget= nor pull=, every input would converge to the same "
            "point (the centre of V is the projected dynamics' only equilibrium). Pass budget=K (stop after K Euler "
            "steps) or pull=beta (balanced dynamics), or use centre='fixed_point' or 'conditioned'."
        )
    if budget is not None and (solver is not None or backward is not None):
        raise ValueError(
            "LyaDEQ: budget=K fixes the computation (K explicit Euler steps, backpropagated through); "
            "do not pass solver= or backward= with it."
        )


def _check_lyapunov(lyapunov: nn.Module | None, dim: int, centre: str) -> nn.Module:
    conditioned = centre == "conditioned"
    if lyapunov is None:
        return ConditionalLyapunovFunction(dim, dim) if conditioned else LyapunovFunction(dim)
    if not callable(getattr(lyapunov, "value_and_grad", None)):
        raise TypeError(
            "LyaDEQ: lyapunov must provide value_and_grad(z, ref) -> (V, ∇V), like il.nn.LyapunovFunction; "
            f"got {type(lyapunov).__name__}."
        )
    if getattr(lyapunov, "dim", dim) != dim:
        raise ValueError(f"LyaDEQ: lyapunov acts on dimension {lyapunov.dim}, but dim={dim}.")
    has_centre = callable(getattr(lyapunov, "centre", None))
    if conditioned and not has_centre:
        raise TypeError(
            "LyaDEQ: centre='conditioned' needs a Lyapunov function of (z, x) with a centre(x) method, like "
            f"ConditionalLyapunovFunction; got {type(lyapunov).__name__}."
        )
    if has_centre and not conditioned:
        raise TypeError(f"LyaDEQ: a Lyapunov function conditioned on x ({type(lyapunov).__name__}) needs centre='conditioned'.")
    return lyapunov
