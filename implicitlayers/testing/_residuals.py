"""Each condition of a solved problem, re-evaluated at the returned solution, sample by sample."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ..problem import Condition, FixedPoint, Minimize, Root
from ._common import Record

__all__ = ["ConditionResidual", "condition_residuals"]


@dataclasses.dataclass(frozen=True)
class ConditionResidual:
    """How far one condition is from holding, per sample.

    Attributes:
        label: the condition and its block, e.g. `"FixedPoint(z) in block 0 (z)"`.
        measure: what `residual` measures, e.g. `"‖z − f(z, x)‖"`.
        residual: `(B,)` Euclidean norm of the condition's residual.
        scale: `(B,)` norm of the variable, for relative tolerances.
        block: the block's name (a key of `Solution.info`).
    """

    label: str
    measure: str
    residual: torch.Tensor
    scale: torch.Tensor
    block: str


def _norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.detach().reshape(t.shape[0], -1), dim=1)


def _args(cond: Condition) -> str:
    return ", ".join(a.name for a in cond.args)


def _equation(cond: Condition, scope: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    v = cond.variable.name
    out = cond.fn(*(scope[a.name] for a in cond.args))
    if not isinstance(out, torch.Tensor) or out.shape != scope[v].shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{cond!r}: the function returned {got} at the solution, but {v} has shape {tuple(scope[v].shape)}.")
    if isinstance(cond, FixedPoint):
        return scope[v] - out, f"‖{v} − f({_args(cond)})‖"
    assert isinstance(cond, Root)
    return out, f"‖g({_args(cond)})‖"


def _stationarity(cond: Minimize, scope: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    """`∇_v (±L)` with the other arguments held fixed, or the gradient mapping `(v − Π(v − α∇))/α`."""
    name = cond.variable.name
    with torch.enable_grad():
        v = scope[name].detach().requires_grad_()
        args = [v if a.name == name else scope[a.name].detach() for a in cond.args]
        loss = cond.sign * cond.fn(*args)
        if not isinstance(loss, torch.Tensor) or loss.shape != (v.shape[0],):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"{cond!r}: the objective returned {got}; it must return one value per sample, ({v.shape[0]},).")
        (grad,) = torch.autograd.grad(loss.sum(), v, allow_unused=True)
    grad = torch.zeros_like(v) if grad is None else grad
    if cond.constraint is None:
        return grad, f"‖∇_{name} L‖"
    alpha = cond.fixed_step  # (1 for step_size="auto": any positive step measures stationarity)
    mapping = (v.detach() - cond.constraint.project(v.detach() - alpha * grad)) / alpha
    return mapping, f"‖({name} − Π({name} − α∇L))/α‖ (gradient mapping, α={alpha:g})"


def condition_residuals(record: Record) -> list[ConditionResidual]:
    """Every condition (and every adjoint equation of a total objective) of a recorded solve, re-evaluated.

    Equations and objectives that read no equation variable of their block are re-derived from the
    user's functions alone. The stationarity of a *total* objective involves the adjoint variables of
    the block's equations, so it (and the adjoint equations) are read off the layer's own block residual
    at the returned solution and duals.
    """
    layer, solution = record.layer, record.solution
    problem = layer.problem
    inputs = {n: t.detach() for n, t in zip(layer.input_names, record.tensors)}
    values = {n: t.detach() for n, t in solution.values.items()}
    scope = {**inputs, **values}
    batch = next(iter(values.values())).shape[0]
    out: list[ConditionResidual] = []
    for index, names in enumerate(problem.blocks):
        system = layer.block_system(index, values)
        totals = {c.variable.name for c in system.total_objectives}
        block_residual = None
        if totals:
            packed = system.pack({**{n: values[n] for n in names}, **solution.duals}, batch)
            outer = {n: scope[n] for n in system.reads}
            block_residual = system.unpack(system.residual(packed, outer))
        for name in names:
            cond = problem.conditions[name]
            label = f"{type(cond).__name__}({name}) in {system.name}"
            if name in totals:
                assert block_residual is not None and isinstance(cond, Minimize)
                r = block_residual[name]
                if cond.constraint is not None:
                    r, measure = r / cond.fixed_step, f"‖total gradient mapping of {name}‖ (with adjoints)"
                else:
                    measure = f"‖d{name} L‖ (total derivative, with adjoints)"
            elif cond.is_equation:
                r, measure = _equation(cond, scope)
            else:
                assert isinstance(cond, Minimize)  # Maximize is a Minimize of −L
                r, measure = _stationarity(cond, scope)
            out.append(ConditionResidual(label, measure, _norm(r), _norm(values[name]), system.name))
        if block_residual is not None:
            for obj in system.total_objectives:
                for eq in system.equations:
                    dual = system.adjoint_name(obj, eq)
                    out.append(
                        ConditionResidual(
                            f"adjoint {dual} in {system.name}", f"‖adjoint equation of {dual}‖",
                            _norm(block_residual[dual]), _norm(solution.duals[dual]), system.name,
                        )
                    )
    return out
