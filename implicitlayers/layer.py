"""`ImplicitLayer`: a `Problem` wrapped as an `nn.Module` (inputs in, solved variables out).

The layer orchestrates; it does not differentiate. It validates the call, builds each block's start,
hands every block (in topological order) to the backward mode, which solves it and returns its
differentiable solution (see `implicitlayers.backward`), and collects the results.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._calls import InitSpec, batched_start, check_init, check_inputs, init_mapping
from .backward import IFT, BackwardMode, BlockSolve
from .nn._cache import cached_weights
from .problem import Input, Problem, Variable
from .solvers import Anderson, SolveInfo, Solver
from .system import BlockSystem

__all__ = ["ImplicitLayer", "Solution", "intercept_solves"]

# Compiled blocks kept per layer (one per block and per set of sample shapes; the oldest are dropped).
_MAX_COMPILED_BLOCKS = 32

@dataclasses.dataclass(frozen=True)
class Solution:
    """Everything a solve produced.

    Attributes:
        values: every variable's `(B, ...)` solution, by name (differentiable per the backward mode).
        info: the forward `SolveInfo` of each block, by block name (e.g. `"block 0 (z, u)"`).
        duals: the adjoint variables of total objectives (e.g. `"mu[u|z]"`), detached.
    """

    values: dict[str, torch.Tensor]
    info: dict[str, SolveInfo]
    duals: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]


@dataclasses.dataclass(frozen=True)
class _Interceptor:
    solver: Callable[[Any], Any] | None
    backward: BackwardMode | None
    record: Callable[["ImplicitLayer", tuple[torch.Tensor, ...], Solution, BackwardMode], None] | None


_interceptors: contextvars.ContextVar[tuple[_Interceptor, ...]] = contextvars.ContextVar("implicitlayers_interceptors", default=())


@contextlib.contextmanager
def intercept_solves(
    *,
    solver: Callable[[Any], Any] | None = None,
    backward: BackwardMode | None = None,
    record: Callable[["ImplicitLayer", tuple[torch.Tensor, ...], Solution, BackwardMode], None] | None = None,
) -> Iterator[None]:
    """Inside the block, every `ImplicitLayer` solve (in this thread or task) is seen and may be altered.

    This is the hook that checking tools use (`implicitlayers.testing`): it reaches layers that a model
    builds lazily or keeps outside its registered submodules, without touching any layer's settings.

    Args:
        solver: maps each layer's forward solver to the one to use for this solve (e.g. a tightened copy).
        backward: a backward mode to use instead of each layer's own.
        record: called after each solve with `(layer, input tensors, solution, the layer's own backward mode)`.

    Blocks nest; the innermost override is applied last.
    """
    if backward is not None and not isinstance(backward, BackwardMode):
        raise TypeError(f"intercept_solves: backward must be a backward mode (il.IFT(), ...), got {backward!r}.")
    token = _interceptors.set(_interceptors.get() + (_Interceptor(solver, backward, record),))
    try:
        yield
    finally:
        _interceptors.reset(token)


def _as_list(value: Any, what: str, kind: type) -> tuple[list, bool]:
    """`(list of nodes, was it given as a single node)`."""
    if isinstance(value, kind):
        return [value], True
    try:
        return list(value), False
    except TypeError:
        raise TypeError(f"ImplicitLayer: {what}= must be an il.{kind.__name__} or a list of them, got {value!r}.") from None


class ImplicitLayer(nn.Module):
    """A differentiable layer whose outputs are the solutions of an implicit problem.

    Args:
        problem: the `il.Problem`.
        inputs: the `il.Input` nodes, in the order the layer is called with (one node or a list).
        outputs: the `il.Variable` nodes returned, in order. A list gives a tuple; a single node gives
            its tensor alone.
        solver: forward solver for every block (default `il.Anderson()`).
        backward: `il.IFT()` (default), `il.Phantom(...)` or `il.Unroll()`, or any `il.backward.BackwardMode`.
        init: start of each variable, by name: a callable receiving the layer's input tensors (in the
            order of `inputs`) and returning the batched `(B, ...)` start, or a tensor, batched or one
            sample's shape (broadcast over the batch). Every variable needs one.
        register_modules: register the `nn.Module`s used as condition functions as submodules (so
            their parameters appear in `layer.parameters()`). Pass `False` when the module that owns the
            layer registers them itself, so each parameter has one name in `state_dict` (this is what
            `il.DEQ` does).

    Parameters captured in closures receive gradients too (the backward differentiates the residual
    with autograd). A closure over tensors or modules is copied along with the layer by
    `copy.deepcopy`, but `.to()`/`.double()` cannot reach tensors that are not registered: prefer
    `nn.Module`s (or modules' methods) as condition functions.
    """

    def __init__(
        self,
        problem: Problem,
        inputs: Input | Sequence[Input],
        outputs: Variable | Sequence[Variable],
        *,
        solver: Any = None,
        backward: BackwardMode | None = None,
        init: Mapping[str, InitSpec] | None = None,
        register_modules: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(problem, Problem):
            raise TypeError(f"ImplicitLayer: problem must be an il.Problem, got {type(problem).__name__}.")
        inputs, _ = _as_list(inputs, "inputs", Input)
        outputs, single = _as_list(outputs, "outputs", Variable)
        for node in inputs:
            if not isinstance(node, Input):
                raise TypeError(f"ImplicitLayer: inputs must be il.Input nodes, got {node!r}.")
        if not inputs:
            raise ValueError("ImplicitLayer: give at least one input; the inputs set the batch size, dtype and device.")
        missing = sorted(set(problem.inputs) - {i.name for i in inputs})
        if missing:
            raise ValueError(f"ImplicitLayer: the problem reads input(s) {missing} that are not in inputs=; list them.")
        unknown = [i.name for i in inputs if i.name not in problem.inputs]
        if unknown:
            raise ValueError(f"ImplicitLayer: input(s) {unknown} are not read by any condition of the problem.")
        if len({i.name for i in inputs}) != len(inputs):
            raise ValueError("ImplicitLayer: an input is listed twice in inputs=.")
        for node in [*inputs, *(o for o in outputs if isinstance(o, Variable))]:
            own = problem.inputs.get(node.name) if isinstance(node, Input) else problem.variables.get(node.name)
            if own is not None and own is not node:
                # The problem refuses two node objects of one name; so does the layer (a node of another problem).
                raise ValueError(
                    f"ImplicitLayer: {node!r} is not a node of this problem but a different object with the same name "
                    "(e.g. from another Problem); pass the nodes the problem's conditions were declared with."
                )
        if not outputs:
            raise ValueError("ImplicitLayer: outputs= must name at least one variable.")
        for node in outputs:
            if not isinstance(node, Variable) or node.name not in problem.variables:
                raise ValueError(f"ImplicitLayer: output {node!r} is not a variable of the problem; variables are {sorted(problem.variables)}.")
        init = init_mapping(init)
        absent = sorted(set(problem.variables) - set(init))
        if absent:
            raise ValueError(
                f"ImplicitLayer: no init for variable(s) {absent}; pass init={{name: tensor or callable of the inputs}}."
            )
        check_init(init, problem)
        if backward is not None and not isinstance(backward, BackwardMode):
            raise TypeError(f"ImplicitLayer: backward must be il.IFT(), il.Phantom() or il.Unroll(), got {backward!r}.")
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(f"ImplicitLayer: solver must be an implicitlayers solver (e.g. il.Anderson()), got {solver!r}.")
        self.problem = problem
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        self._single_output = single
        self.solver = solver if solver is not None else Anderson()
        self.backward_mode: BackwardMode = backward if backward is not None else IFT()
        self.init = init
        if register_modules:
            self.functions = nn.ModuleList(
                dict.fromkeys(c.fn for c in problem.conditions.values() if isinstance(c.fn, nn.Module))
            )
        self._systems: OrderedDict[tuple, BlockSystem] = OrderedDict()
        self._sample_shapes: dict[str, tuple[int, ...]] = {}
        self.last_solution: Solution | None = None
        self._backward_infos: dict[str, SolveInfo | None] = {}

    @property
    def backward_info(self) -> dict[str, SolveInfo | None]:
        """The `SolveInfo` of each block's last IFT backward solve (`None` until a backward pass ran)."""
        return dict(self._backward_infos)

    # ------------------------------------------------------------------------------ calling
    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Solve for the given inputs; returns the outputs' solutions as a tuple in the order of `outputs`
        (the tensor alone when `outputs` was a single node)."""
        solution = self.solve(*tensors)
        if self._single_output:
            return solution.values[self.output_names[0]]
        return tuple(solution.values[n] for n in self.output_names)

    # A user's `torch.compile(model)` breaks the graph cleanly here instead of tracing the solver loop
    # (whose data-dependent stopping makes Dynamo skip frames and compile tiny per-iteration lambdas).
    @torch.compiler.disable
    def solve(self, *tensors: torch.Tensor, init: Mapping[str, InitSpec] | None = None) -> Solution:
        """Solve for the given inputs; returns the full `Solution` (every variable, per-block info).

        Args:
            *tensors: the input tensors, in the order of `inputs`.
            init: starts for this call only, by variable name (same forms as the constructor's `init`),
                overriding the layer's; e.g. a warm start from the previous solution.

        Normalised weights (`il.nn.weight_norm`, `il.nn.spectral_norm`) are computed once for the whole
        solve, not once per iteration. Under `torch.compile` the solve runs eagerly (a graph break).
        """
        if torch.is_inference_mode_enabled() and any(not c.is_equation for c in self.problem.conditions.values()):
            # An objective's residual is its gradient, which autograd cannot take in inference mode (nor
            # through inference tensors): solve as under no_grad, on ordinary copies of the inputs.
            with torch.inference_mode(False), torch.no_grad():
                copies = [t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in tensors]
                return self.solve(*copies, init=init)
        solver, mode = self.solver, self.backward_mode
        interceptors = _interceptors.get()
        for hook in interceptors:
            solver = hook.solver(solver) if hook.solver is not None else solver
            mode = hook.backward if hook.backward is not None else mode
        overrides = init_mapping(init)
        if overrides:
            check_init(overrides, self.problem)
        with cached_weights():
            solution = self._solve(tensors, solver, mode, overrides)
        for hook in interceptors:
            if hook.record is not None:
                hook.record(self, tensors, solution, self.backward_mode)
        return solution

    def _solve(self, tensors: Sequence[torch.Tensor], solver: Any, mode: BackwardMode, overrides: Mapping[str, InitSpec]) -> Solution:
        env = check_inputs(self.input_names, tensors)
        batch = tensors[0].shape[0]
        ref = next(t for t in tensors if t.is_floating_point())  # starts take its dtype and device
        starts = {
            name: batched_start(name, overrides.get(name, self.init[name]), tensors, batch, ref, self._sample_shapes)
            for name in self.problem.variables
        }
        infos: dict[str, SolveInfo] = {}
        duals: dict[str, torch.Tensor] = {}
        for index in range(len(self.problem.blocks)):
            system = self.block_system(index, starts)
            outer = {n: env[n] for n in system.reads}
            w0 = system.pack({n: starts[n] for n in system.names}, batch)
            block = BlockSolve(system, outer, w0, solver, system.preconditioner(w0), self._reporter(system.name))
            w_out, info = mode.solve(block)
            values = system.unpack(w_out)
            duals.update({n: values.pop(n).detach() for n in list(values) if n not in system.names})
            env.update(values)
            infos[system.name] = info
        solution = Solution(values={n: env[n] for n in self.problem.variables}, info=infos, duals=duals)
        # Detached, so that keeping the last solution does not keep the last call's autograd graph alive.
        self.last_solution = Solution({n: v.detach() for n, v in solution.values.items()}, infos, duals)
        return solution

    def _reporter(self, name: str) -> Callable[[SolveInfo], None]:
        self._backward_infos.setdefault(name, None)

        def report(info: SolveInfo) -> None:
            self._backward_infos[name] = info

        return report

    # ------------------------------------------------------------------------------ compiled blocks
    def block_system(self, index: int, values: Mapping[str, torch.Tensor]) -> BlockSystem:
        """Block `index` compiled for the sample shapes of `values` (batched `(B, ...)` tensors by name,
        e.g. `solution.values`): its packed residual, packing and slots. Compiled once per shape."""
        if not 0 <= index < len(self.problem.blocks):
            raise IndexError(f"ImplicitLayer: block {index} does not exist; the problem has {len(self.problem.blocks)} block(s).")
        shapes = {n: tuple(values[n].shape[1:]) for n in self.problem.blocks[index]}
        key = (index, tuple(sorted(shapes.items())))
        system = self._systems.get(key)
        if system is None:
            system = self._systems[key] = BlockSystem(self.problem, index, shapes)
            while len(self._systems) > _MAX_COMPILED_BLOCKS:
                self._systems.popitem(last=False)
        else:
            self._systems.move_to_end(key)
        return system
