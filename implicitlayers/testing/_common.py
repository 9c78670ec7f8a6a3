"""Plumbing shared by the checks: recording (and overriding) the implicit solves a module runs, calling
it, copying it safely, and formatting reports. It uses the layer's public hooks only
(`implicitlayers.layer.intercept_solves`, `ImplicitLayer.block_system`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..backward import BackwardMode
from ..errors import ConvergenceWarning
from ..layer import ImplicitLayer, Solution, intercept_solves

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
    backward_mode: BackwardMode


def check_module(module: Any) -> None:
    """The checks take modules: an `ImplicitLayer` or any `nn.Module` that runs one."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"implicitlayers.testing: expected an il.ImplicitLayer or an nn.Module that runs one, got {type(module).__name__}."
        )


@contextlib.contextmanager
def record_solves(
    solver: Callable[[Any], Any] | None = None, backward: BackwardMode | None = None
) -> Iterator[list[Record]]:
    """Record every `ImplicitLayer.solve` while the block runs, optionally overriding solver and backward mode.

    Built on the public hook `implicitlayers.layer.intercept_solves`, so layers that a module builds
    lazily or keeps outside its registered submodules are seen too, whether the module calls
    `layer(...)` or `layer.solve(...)`, and no layer's own settings change.

    Args:
        solver: maps each layer's forward solver to the one to use (e.g. a tightened copy).
        backward: a backward mode to use instead of each layer's own.
    """
    records: list[Record] = []

    def record(layer: ImplicitLayer, tensors: tuple[torch.Tensor, ...], solution: Solution, own: BackwardMode) -> None:
        records.append(Record(layer, tuple(tensors), solution, own))

    with intercept_solves(solver=solver, backward=backward, record=record):
        yield records


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


@dataclasses.dataclass
class _Memo:
    """A deepcopy memo seeded from a walk over the module (depth-limited), before copying.

    - Tensors that carry an autograd graph map to detached copies: `copy.deepcopy` refuses them, and
      modules hold some after a forward (the last solution, cached normalised weights). A check wants
      the module's state, not that graph.
    - Closures map to copies whose cells are filled once the module is copied, from the same memo: a
      function that captures the module (`lambda z, x: self.cell(z, x)`, kept inside a model's wrapper
      object such as JIIO's state map) then calls the copy. `Condition.__deepcopy__` does this for
      functions that are a condition itself; functions held deeper need the memo.
    """

    memo: dict[int, Any] = dataclasses.field(default_factory=dict)
    closures: list[tuple[types.FunctionType, types.FunctionType]] = dataclasses.field(default_factory=list)
    seen: set[int] = dataclasses.field(default_factory=set)

    def walk(self, obj: Any, depth: int = 0) -> None:
        if depth > 8 or id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None:
                self.memo[id(obj)] = obj.detach().clone()
            return
        if isinstance(obj, types.FunctionType):
            if obj.__closure__:
                self._closure(obj)
                for cell in obj.__closure__:
                    with contextlib.suppress(ValueError):  # an empty cell (a name not yet bound)
                        self.walk(cell.cell_contents, depth + 1)
            return
        if isinstance(obj, (str, bytes, int, float, bool, type(None), type, types.ModuleType)):
            return
        if isinstance(obj, dict):
            children: Any = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = obj
        elif hasattr(obj, "__dict__"):
            children = vars(obj).values()
        else:
            return
        for child in list(children):
            self.walk(child, depth + 1)

    def _closure(self, f: types.FunctionType) -> None:
        assert f.__closure__ is not None
        g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, tuple(types.CellType() for _ in f.__closure__))
        g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
        g.__dict__.update(f.__dict__)
        self.memo[id(f)] = g
        self.closures.append((f, g))

    def fill_closures(self) -> None:
        """Give each copied closure deep copies of what the original captures (after the module is copied)."""
        for f, g in self.closures:
            for old, new in zip(f.__closure__ or (), g.__closure__ or ()):
                try:
                    contents = old.cell_contents
                except ValueError:
                    continue
                try:
                    new.cell_contents = copy.deepcopy(contents, self.memo)
                except Exception:  # noqa: BLE001 - not copyable (a lock, a C object): share it, as deepcopy shares functions
                    new.cell_contents = contents


def detached_deepcopy(module: nn.Module) -> nn.Module:
    """`copy.deepcopy(module)`, with tensors that carry an autograd graph copied detached and closures
    copied together with what they capture (see `_Memo`), so the copy calls the copied (e.g. float64)
    submodules, not the originals."""
    seeded = _Memo()
    seeded.walk(module)
    copied = copy.deepcopy(module, seeded.memo)
    seeded.fill_closures()
    return copied


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
