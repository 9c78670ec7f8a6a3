"""`fixed_point` and `root`: the functional entry points on batched tensors."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ._external import checked_external_result, is_own_solver
from ._info import SolveInfo
from ._protocol import ResidualFn, Solver, WritesInto, is_solver
from .anderson import Anderson
from .broyden import Broyden

__all__ = ["FunctionalSolution", "fixed_point", "root"]


@dataclasses.dataclass(frozen=True)
class FunctionalSolution:
    """The result of `fixed_point` or `root`: `value` has the shape of `z0`; `info` is per sample."""

    value: torch.Tensor
    info: SolveInfo


def _check_start(z0: object, who: str) -> torch.Tensor:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{who}: z0 must be a torch.Tensor of shape (B, ...), got {type(z0).__name__}.")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"{who}: z0 must have a non-empty leading batch dimension, got shape {tuple(z0.shape)}.")
    if not z0.is_floating_point():
        raise TypeError(f"{who}: z0 must be a floating-point tensor, got {z0.dtype}.")
    return z0


def _flat_residual(fn: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, who: str,
                   fixed: bool) -> ResidualFn | WritesInto:
    def residual(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        z = w.reshape(shape)
        version = None if w.is_inference() else w._version  # (inference tensors keep no version counter)
        value = fn(z)
        if version is not None and w._version != version:
            # z − f(z) would compare the mutated z with itself: exactly 0, a "converged" wrong answer.
            raise ValueError(
                f"{who}: the function modified its input in place (e.g. z.mul_(...), z += ..., torch.relu_(z)); "
                "it must return a new tensor and leave its input unchanged (use the out-of-place ops: z * 0.5, torch.relu(z))."
            )
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{who}: the function returned {got} for an input of shape {tuple(shape)}; it must return the same shape.")
        if value.dtype != w.dtype and not value.is_floating_point():
            # A complex (or integer, bool) result cast to the start's real dtype would drop its imaginary part
            # (or fractions) and solve another problem; only a floating dtype is cast.
            raise TypeError(
                f"{who}: the function returned {value.dtype} for a {w.dtype} input; it must return a real floating "
                f"tensor (the solve runs in the dtype of z0, {w.dtype}). For a complex problem, solve for the real "
                "and imaginary parts stacked as real numbers (torch.view_as_real)."
            )
        value = value.reshape(shape[0], -1)
        if value.dtype != w.dtype:  # the solve runs in the start's dtype (e.g. a float64 map, or autocast's bfloat16)
            value = value.to(w.dtype)
        return torch.sub(w, value, out=out) if fixed else value

    # z − f(z) can be written straight into a solver's buffer; a root's g(z) is already a fresh tensor.
    return WritesInto(residual) if fixed else residual


def _solve(fn, z0, solver, who: str, fixed: bool) -> FunctionalSolution:
    z0 = _check_start(z0, who)
    if not callable(fn):
        raise TypeError(f"{who}: the first argument must be callable, got {type(fn).__name__}.")
    if not is_solver(solver):
        raise TypeError(f"{who}: solver must be an implicitlayers solver (e.g. il.Anderson()), got {type(solver).__name__}.")
    residual = _flat_residual(fn, z0.shape, who, fixed)
    w0 = z0.detach().reshape(z0.shape[0], -1)
    with torch.no_grad():
        w, info = solver.solve(residual, w0, name=who)
        if not is_own_solver(solver):  # a user's solver: its output is validated and its claims measured
            w, info = checked_external_result(solver, residual, w0, w, info, who)
    return FunctionalSolution(value=w.reshape(z0.shape), info=info)


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, solver: Solver | None = None
) -> FunctionalSolution:
    """Solve `z = f(z)` per sample from `z0` (no gradient; see `ImplicitLayer` for differentiable solves).

    Args:
        f: batched map `(B, ...) -> (B, ...)`; samples must not interact. Its result is cast to the
            dtype of `z0`, in which the whole solve runs.
        z0: the start, `(B, ...)`.
        solver: any `Solver` (default `Anderson()`); its residual is `z − f(z)`, a `WritesInto`.

    Returns:
        `FunctionalSolution` with `.value` (shape of `z0`) and `.info` (`SolveInfo`).
    """
    return _solve(f, z0, solver or Anderson(), "fixed_point", fixed=True)


def root(g: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, solver: Solver | None = None) -> FunctionalSolution:
    """Solve `g(z) = 0` per sample from `z0` (no gradient).

    Picard and Anderson iterate the map `z ← z − g(z)`, so they suit `g` whose Jacobian is near the
    identity; Broyden (the default) suits any smooth `g`.

    Args:
        g: batched function `(B, ...) -> (B, ...)`, the same shape as its input (cast to the dtype of `z0`).
        z0: the start, `(B, ...)`.
        solver: any `Solver` (default `Broyden()`).
    """
    return _solve(g, z0, solver or Broyden(), "root", fixed=False)
