"""Declaring implicit problems: nodes, defining conditions, and the validated graph of blocks."""

from __future__ import annotations

import copy
import inspect
import math
import types
from typing import Callable, Sequence

import networkx as nx

from .sets import ConstraintSet

__all__ = ["Node", "Input", "Variable", "Condition", "FixedPoint", "Root", "Minimize", "Maximize", "Problem"]


class Node:
    """A named node of a problem graph (an `Input` or a `Variable`)."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{type(self).__name__}: the name must be a Python identifier string, got {name!r}.")
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Input(Node):
    """A tensor given when the layer is called (leading batch dimension B)."""


class Variable(Node):
    """An unknown tensor (leading batch dimension B) defined by exactly one condition."""


def _is_positive(value: object) -> bool:
    # `value > 0` is False for NaN; booleans are not numbers here.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_positive(owner: str, what: str, value: float, upper: float | None = None) -> None:
    ok = _is_positive(value)
    if not ok or (upper is not None and value > upper):
        bound = f" and at most {upper}" if upper is not None else " and finite"
        raise ValueError(f"{owner}: {what} must be positive{bound}, got {value!r}.")


def copy_function(fn: Callable, memo: dict) -> Callable:
    """A copy of `fn` whose captured values are deep-copied with `memo`.

    `copy.deepcopy` shares functions, so a condition written as a closure over a module or tensor
    (`lambda z, x: torch.tanh(z @ W.T + x)`) would keep reading the *original* `W` in a copied layer
    (an EMA teacher, a float64 copy for checking). Copying the captured values with the same memo makes
    the copy read the copied tensors and modules.
    """
    if not isinstance(fn, types.FunctionType):
        return copy.deepcopy(fn, memo)
    if not fn.__closure__:
        return fn
    cells = []
    for cell in fn.__closure__:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell (a name not yet bound)
            cells.append(cell)
            continue
        try:
            cells.append(types.CellType(copy.deepcopy(contents, memo)))
        except Exception:  # noqa: BLE001 - not copyable (a lock, a C object): share it, as deepcopy shares functions
            cells.append(cell)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    return new


class Condition:
    """The defining condition of one variable: `fn(*args)` relates it to the nodes it reads.

    Args:
        variable: the `Variable` this condition defines.
        fn: the function, called with the tensors of `args` in order.
        args: every node `fn` reads (it may include `variable` itself).
    """

    kind = "condition"

    def __init__(self, variable: Variable, fn: Callable, args: Sequence[Node]) -> None:
        if not isinstance(variable, Variable):
            raise TypeError(f"{type(self).__name__}: the first argument must be an il.Variable, got {variable!r}.")
        if not callable(fn):
            raise TypeError(f"{type(self).__name__}({variable.name}): fn must be callable, got {type(fn).__name__}.")
        if isinstance(args, Node):
            args = (args,)
        args = tuple(args)
        for a in args:
            if not isinstance(a, Node):
                raise TypeError(
                    f"{type(self).__name__}({variable.name}): every argument must be an il.Input or il.Variable, got {a!r}."
                )
        self.variable, self.fn, self.args = variable, fn, args
        _check_arity(self)

    def __deepcopy__(self, memo: dict) -> "Condition":
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "fn":
                new.fn = copy_function(value, memo)
            else:
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    @property
    def is_equation(self) -> bool:
        """Whether the condition is an equation (`FixedPoint`/`Root`) rather than an objective."""
        return isinstance(self, (FixedPoint, Root))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.variable.name}, args=({', '.join(a.name for a in self.args)}))"


def _check_arity(cond: Condition) -> None:
    try:
        sig = inspect.signature(cond.fn)
    except (TypeError, ValueError):
        return  # builtins and some C functions have no signature; checked at call time instead
    try:
        sig.bind(*([None] * len(cond.args)))
    except TypeError:
        raise TypeError(
            f"{type(cond).__name__}({cond.variable.name}): fn takes {sig} but args lists {len(cond.args)} nodes "
            f"({', '.join(a.name for a in cond.args)}); list every node the function reads, in order."
        ) from None


class FixedPoint(Condition):
    """`v = f(*args)`; residual `v − f(*args)`.

    Args:
        damping: the fixed-point map's step `v ← v + damping · (f − v)` (Picard/Anderson), in (0, 1].
    """

    kind = "fixed point"

    def __init__(self, variable: Variable, f: Callable, args: Sequence[Node], *, damping: float = 1.0) -> None:
        super().__init__(variable, f, args)
        _check_positive(f"FixedPoint({variable.name})", "damping", damping, upper=1.0)
        self.damping = float(damping)


class Root(Condition):
    """`g(*args) = 0`, where `g` returns a tensor shaped like `v`; residual `g(*args)`.

    Args:
        damping: the map's step `v ← v − damping · g` (Picard/Anderson); Broyden does not need it.
    """

    kind = "root"

    def __init__(self, variable: Variable, g: Callable, args: Sequence[Node], *, damping: float = 1.0) -> None:
        super().__init__(variable, g, args)
        _check_positive(f"Root({variable.name})", "damping", damping)
        if not any(a is variable or a.name == variable.name for a in self.args):
            # g(*args) = 0 that does not read v leaves v undetermined: any start would be returned "converged".
            raise ValueError(
                f"Root({variable.name}): g does not read {variable.name} (it is not in args), so g(*args) = 0 does not "
                f"determine it; list {variable.name} in args (a FixedPoint takes a variable computed from others)."
            )
        self.damping = float(damping)


class Minimize(Condition):
    """`v ∈ argmin_v L(*args)` over an optional constraint set; `L` returns one value per sample, `(B,)`.

    With `total=True` (default), when `L` reads variables that the same block defines by equations
    depending on `v`, `v` minimises the *total* objective: the compiler adds adjoint variables
    (the KKT system of the design). `total=False` holds those variables fixed (partial, Nash-style
    stationarity).

    Args:
        constraint: an `il.sets` set; the residual becomes the gradient mapping
            `(v − Π(v − step_size · ∇)) / step_size` (`∇` wherever the set is inactive).
        total: total (KKT) or partial semantics.
        step_size: the gradient step α of the fixed-point map `v ← Π(v − α ∇)` (Picard/Anderson; with a
            constraint also inside the residual). `"auto"` (default) sets `α = 1 / λ` per sample at the
            start of every solve, with `λ` the objective's largest curvature estimated by a few
            Hessian–vector products (see `BlockSystem.step_sizes`, and the concepts page on problems
            for the cost); a positive number fixes `α` for every sample (the override, e.g. when
            `2 / curvature` is known). The solution does not depend on `α`; how fast it is reached does.
        adjoint_damping: damping of the adjoint map `μ ← μ + β (Jᵀμ + ∂L/∂z − μ)`.
    """

    kind = "minimize"
    sign = 1.0

    def __init__(
        self,
        variable: Variable,
        objective: Callable,
        args: Sequence[Node],
        constraint: ConstraintSet | None = None,
        *,
        total: bool = True,
        step_size: float | str = "auto",
        adjoint_damping: float = 1.0,
    ) -> None:
        super().__init__(variable, objective, args)
        name = f"{type(self).__name__}({variable.name})"
        if constraint is not None and not isinstance(constraint, ConstraintSet):
            raise TypeError(f"{name}: constraint must be an il.sets set (Box, L2Ball, LInfBall), got {constraint!r}.")
        if not (step_size == "auto" if isinstance(step_size, str) else _is_positive(step_size)):
            raise ValueError(f"{name}: step_size must be positive and finite, or \"auto\", got {step_size!r}.")
        _check_positive(name, "adjoint_damping", adjoint_damping, upper=1.0)
        self.constraint, self.total = constraint, bool(total)
        self.step_size: float | str = step_size if isinstance(step_size, str) else float(step_size)
        self.adjoint_damping = float(adjoint_damping)

    @property
    def auto_step(self) -> bool:
        """Whether the step size is estimated per sample at every solve (`step_size="auto"`)."""
        return self.step_size == "auto"

    @property
    def fixed_step(self) -> float:
        """The step size used where no per-sample estimate is at hand: `step_size`, or `1.0` for `"auto"`
        (e.g. the gradient mapping `v − Π(v − ∇)` that `BlockSystem.residual` measures without one)."""
        return 1.0 if isinstance(self.step_size, str) else self.step_size


class Maximize(Minimize):
    """`v ∈ argmax_v L(*args)`: `Minimize` of `−L`, with the same options."""

    kind = "maximize"
    sign = -1.0


class Problem:
    """A validated set of conditions: the graph of nodes and its blocks (strongly connected components).

    Args:
        conditions: one condition per variable.

    Attributes:
        graph: `networkx.DiGraph` over node names, edge `u → v` when `u` is an argument of `v`'s condition.
        blocks: lists of variable names, in an order in which every block only reads earlier ones.
        inputs: the `Input` nodes the conditions read, by name.
        variables: the `Variable` nodes, by name.
    """

    def __init__(self, conditions: Sequence[Condition]) -> None:
        if isinstance(conditions, Condition):
            conditions = [conditions]
        conditions = list(conditions)
        if not conditions:
            raise ValueError("Problem: give at least one condition (FixedPoint, Root, Minimize or Maximize).")
        self.conditions: dict[str, Condition] = {}
        nodes: dict[str, Node] = {}
        for cond in conditions:
            if not isinstance(cond, Condition):
                raise TypeError(f"Problem: every entry must be a condition (il.FixedPoint, ...), got {cond!r}.")
            for node in (cond.variable, *cond.args):
                other = nodes.setdefault(node.name, node)
                if other is not node:
                    raise ValueError(
                        f"Problem: two different nodes are named {node.name!r} ({other!r} and {node!r}); names must be unique."
                    )
            if cond.variable.name in self.conditions:
                raise ValueError(
                    f"Problem: variable {cond.variable.name!r} has two conditions ({self.conditions[cond.variable.name]!r} "
                    f"and {cond!r}); each variable needs exactly one."
                )
            self.conditions[cond.variable.name] = cond
        self.variables = {n: v for n, v in nodes.items() if isinstance(v, Variable)}
        self.inputs = {n: v for n, v in nodes.items() if isinstance(v, Input)}
        undefined = sorted(set(self.variables) - set(self.conditions))
        if undefined:
            raise ValueError(
                f"Problem: variable(s) {undefined} are read but have no defining condition; "
                "add a FixedPoint/Root/Minimize for each, or declare them as il.Input."
            )
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(nodes)
        for cond in self.conditions.values():
            self.graph.add_edges_from((a.name, cond.variable.name) for a in cond.args)
        variable_graph = self.graph.subgraph(self.variables)
        condensed = nx.condensation(variable_graph)
        self.blocks: list[list[str]] = [
            sorted(condensed.nodes[c]["members"], key=list(self.conditions).index) for c in nx.topological_sort(condensed)
        ]

    def block_of(self, name: str) -> int:
        """The index of the block that solves variable `name`."""
        for i, block in enumerate(self.blocks):
            if name in block:
                return i
        raise KeyError(f"Problem: no variable named {name!r}; variables are {sorted(self.variables)}.")

    def __repr__(self) -> str:
        return f"Problem(blocks={self.blocks}, inputs={sorted(self.inputs)})"
