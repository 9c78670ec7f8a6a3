"""Plumbing shared by the checks: recording (and overriding) the implicit solves a module runs, calling
it, copying it safely, and formatting reports."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import types
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConvergenceWarning
from ..layer import ImplicitLayer, Solution

__all__ = [
    "Record",
    "check_module",
    "record_solves",
    "call",
    "outputs_of",
    "detached_deepcopy",
    "silence_convergence_warnings",
    "fmt",
]


@dataclasses.dataclass
class Record:
    """One call of `ImplicitLayer.solve` seen while running a module.

    Attributes:
        layer: the layer that solved.
        tensors: its input tensors.
        solution: what it returned.
        backward_mode: the layer's own backward mode (before any override).
    """

    layer: ImplicitLayer
    tensors: tuple[torch.Tensor, ...]
    solution: Solution
    backward_mode: Any


def check_module(module: Any) -> None:
    """The checks take modules: an `ImplicitLayer` or any `nn.Module` that runs one."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"implicitlayers.testing: expected an il.ImplicitLayer or an nn.Module that runs one, got {type(module).__name__}."
        )


@contextlib.contextmanager
def record_solves(
    solver: Callable[[Any], Any] | None = None, backward: Any = None
) -> Iterator[list[Record]]:
    """Record every `ImplicitLayer.solve` while the block runs, optionally overriding solver and backward mode.

    The class method is wrapped (and restored afterwards), so layers that a module builds lazily or
    keeps outside its registered submodules are seen too, whether the module calls `layer(...)` or
    `layer.solve(...)`. The backward mode is read during `solve` (the IFT's adjoint problem is built
    there), so an override applies to the gradients of the recorded calls.

    Args:
        solver: maps each layer's forward solver to the one to use (e.g. a tightened copy).
        backward: a backward mode to use instead of each layer's own.
    """
    records: list[Record] = []
    original = ImplicitLayer.solve

    @functools.wraps(original)
    def solve(self: ImplicitLayer, *tensors: torch.Tensor) -> Solution:
        saved = (self.solver, self.backward_mode)
        if solver is not None:
            self.solver = solver(self.solver)
        if backward is not None:
            self.backward_mode = backward
        try:
            solution = original(self, *tensors)
        finally:
            self.solver, self.backward_mode = saved
        records.append(Record(self, tuple(tensors), solution, saved[1]))
        return solution

    ImplicitLayer.solve = solve  # type: ignore[method-assign]
    try:
        yield records
    finally:
        ImplicitLayer.solve = original  # type: ignore[method-assign]


def outputs_of(result: Any) -> list[torch.Tensor]:
    """The tensors a module returned: a tensor, or the tensors of a (nested) tuple/list/dict, in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Solution):
        return list(result.values.values())
    if isinstance(result, dict):
        return [t for v in result.values() for t in outputs_of(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in outputs_of(v)]
    return []


def call(module: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Run `module(*inputs)` and return its tensor outputs; a module that returns none is an error."""
    result = module(*inputs)
    tensors = outputs_of(result)
    if not tensors:
        raise TypeError(
            f"implicitlayers.testing: {type(module).__name__} returned {type(result).__name__}; "
            "the checks need a module that returns a tensor or a tuple of tensors."
        )
    return tensors


def _seed_memo(obj: Any, memo: dict[int, Any], seen: set[int], depth: int = 0) -> None:
    """Map every non-leaf tensor reachable from `obj` to a detached copy in a deepcopy memo.

    `copy.deepcopy` refuses tensors that carry an autograd graph; modules hold some after a forward
    (the last solution, cached normalised weights). A check wants the module's state, not that graph.
    """
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None:
            memo[id(obj)] = obj.detach().clone()
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None))) or callable(obj) and not isinstance(obj, nn.Module):
        return
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return
    for child in list(children):
        _seed_memo(child, memo, seen, depth + 1)


def _copy_function(f: types.FunctionType, memo: dict[int, Any]) -> types.FunctionType:
    """A copy of a closure whose captured values are deep-copied with the same memo, so a function
    that captures a module (`lambda z, x: cell(z, x)`) follows the copy of that module."""
    if not f.__closure__:
        return f
    cells = tuple(types.CellType() for _ in f.__closure__)
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, cells)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    g.__dict__.update(f.__dict__)
    memo[id(f)] = g  # before the contents: a closure may capture itself
    for new, old in zip(cells, f.__closure__):
        try:
            contents = old.cell_contents
        except ValueError:  # an empty cell (a name assigned later)
            continue
        try:
            new.cell_contents = copy.deepcopy(contents, memo)
        except Exception:  # not copyable (a module object, a lock): share it, as deepcopy shares functions
            new.cell_contents = contents
    return g


def detached_deepcopy(module: nn.Module) -> nn.Module:
    """`copy.deepcopy(module)`, with tensors that carry an autograd graph copied detached and closures
    copied together with what they capture.

    Python's deepcopy shares functions; a problem's conditions are often closures over the module's
    own submodules, and the copy must call the copied (e.g. float64) submodules, not the originals.
    """
    memo: dict[int, Any] = {}
    _seed_memo(module, memo, set())
    dispatch = copy._deepcopy_dispatch  # type: ignore[attr-defined]
    previous = dispatch.get(types.FunctionType)
    dispatch[types.FunctionType] = _copy_function
    try:
        return copy.deepcopy(module, memo)
    finally:
        if previous is None:
            dispatch.pop(types.FunctionType, None)
        else:
            dispatch[types.FunctionType] = previous


@contextlib.contextmanager
def silence_convergence_warnings() -> Iterator[None]:
    """Let a check report non-convergence itself instead of a `ConvergenceWarning` (an error under
    `-W error`); other warnings pass through unchanged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        yield


def fmt(x: float) -> str:
    """A number as a report shows it."""
    return f"{x:.3g}"
