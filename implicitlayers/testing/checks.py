"""Checks for implicit layers, usable in any test suite: each raises `AssertionError` with a report.

Every check accepts an `il.ImplicitLayer` or any `nn.Module` that contains one (a DEQ, a JIIO model,
your own network) and whose forward returns a tensor or a tuple of tensors. Inputs are passed exactly
as to the module; every tensor input must carry the leading batch dimension.

```python
import torch
import implicitlayers as il
from implicitlayers.testing import check_solution, check_gradients, check_batch_independence

z, x_ = il.Variable("z"), il.Input("x")
layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z, lambda z, x: torch.tanh(0.5 * z + x), (z, x_))]),
                         [x_], [z], solver=il.Anderson(tol=1e-6, max_iter=100), init={"z": torch.zeros(3)})
x = torch.randn(4, 3)

check_solution(layer, x)            # every condition holds at the returned solution
check_gradients(layer, x)           # gradients == float64 finite differences == unrolled autograd
check_batch_independence(layer, x)  # a batch solves like its samples one by one
```
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._common import call, check_module, fmt, record_solves, silence_convergence_warnings
from ._gradients import check_gradients
from ._residuals import condition_residuals

__all__ = ["check_solution", "check_gradients", "check_batch_independence", "check_convergence"]

_MAX_LINES = 12  # a report lists at most this many failures, then counts the rest


def _fail(title: str, lines: list[str], footer: str = "") -> None:
    shown = lines[:_MAX_LINES]
    if len(lines) > _MAX_LINES:
        shown.append(f"... and {len(lines) - _MAX_LINES} more")
    raise AssertionError("\n".join([title, *("  " + s for s in shown)] + ([footer] if footer else [])))


def _solver_note(record: Any, block: str) -> str:
    info = record.solution.info.get(block)
    if info is None:
        return ""
    return f"; the forward solve reported {int(info.converged.sum())}/{info.converged.numel()} converged, nfe={info.nfe}"


def check_solution(layer: nn.Module, *inputs: Any, atol: float = 1e-4, rtol: float = 1e-3) -> dict[str, float]:
    """Assert that every condition holds, per sample, at the solution the layer returns.

    Each condition is re-evaluated from the user's functions at the returned solution: `‖v − f(args)‖`
    for `FixedPoint`, `‖g(args)‖` for `Root`, `‖∇_v L‖` for an unconstrained `Minimize`/`Maximize` and
    the gradient mapping `‖(v − Π(v − α∇L))/α‖` with a constraint. A total objective's stationarity
    (which involves adjoint variables) and its adjoint equations are read off the layer's block residual.
    Sample `b` passes when `residual_b ≤ atol + rtol · ‖v_b‖`.

    Args:
        layer: an `ImplicitLayer`, or a module containing one (every implicit solve it runs is checked).
        *inputs: the module's inputs.
        atol: absolute tolerance on each condition's residual norm.
        rtol: tolerance relative to the norm of the condition's variable.

    Returns:
        The worst residual of each condition, by label (for logging).

    Raises:
        AssertionError: naming each violated condition, how many samples violate it, and the worst
            sample with its residual and tolerance.
    """
    check_module(layer)
    with torch.no_grad(), silence_convergence_warnings(), record_solves() as records:
        call(layer, inputs)
    if not records:
        raise AssertionError(f"check_solution: running {type(layer).__name__} called no ImplicitLayer.solve; nothing to check.")
    worst: dict[str, float] = {}
    lines: list[str] = []
    for k, record in enumerate(records):
        where = f" [solve {k}]" if len(records) > 1 else ""
        for c in condition_residuals(record):
            bound = atol + rtol * c.scale
            excess = torch.where(torch.isfinite(c.residual), c.residual - bound, torch.full_like(bound, float("inf")))
            worst[c.label + where] = float(c.residual.max())
            bad = excess > 0
            if bool(bad.any()):
                b = int(torch.argmax(excess))
                lines.append(
                    f"{c.label}{where}: {int(bad.sum())}/{bad.numel()} samples violate it; worst sample {b}: "
                    f"{c.measure} = {fmt(float(c.residual[b]))} > {fmt(float(bound[b]))} "
                    f"(atol {atol:g} + rtol {rtol:g} · norm {fmt(float(c.scale[b]))})" + _solver_note(record, c.block)
                )
    if lines:
        _fail(
            f"check_solution: {len(lines)} condition(s) do not hold at the returned solution:",
            lines,
            "Tighten the solver's tol, raise max_iter, or make the map more contractive; or loosen atol/rtol.",
        )
    return worst


def _batch_size(inputs: tuple[Any, ...]) -> int:
    sizes = [x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not sizes:
        raise TypeError("implicitlayers.testing: pass at least one tensor input with a leading batch dimension.")
    return sizes[0]


def _sample(inputs: tuple[Any, ...], batch: int, b: int) -> list[Any]:
    return [x[b : b + 1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else x for x in inputs]


def check_batch_independence(layer: nn.Module, *inputs: Any, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Assert that a batch solves like its samples one by one (samples never interact).

    Runs the module on the whole batch and on each sample alone (tensor inputs sliced `x[b:b+1]`,
    other inputs passed unchanged) and compares every output: sample `b` passes when
    `max |batched_b − alone_b| ≤ atol + rtol · max |alone_b|`. Per-sample convergence makes the two
    agree to rounding; a layer that mixes samples (batch statistics, a global stopping test that lets
    early samples keep moving) does not.

    Raises:
        ValueError: the batch has fewer than two samples, or no output has the batch dimension
            (nothing could differ).
        AssertionError: naming each output and sample that differ, and by how much.
    """
    check_module(layer)
    batch = _batch_size(inputs)
    if batch < 2:
        raise ValueError(f"check_batch_independence: needs a batch of at least 2 samples, got {batch}.")
    with torch.no_grad(), silence_convergence_warnings():
        full = call(layer, inputs)
        alone = [call(layer, _sample(inputs, batch, b)) for b in range(batch)]
    per_sample = [o for o, out in enumerate(full) if out.dim() > 0 and out.shape[0] == batch]
    if not per_sample:
        raise ValueError(
            f"check_batch_independence: no output of {type(layer).__name__} has the batch dimension ({batch}); "
            "nothing to compare sample by sample."
        )
    lines: list[str] = []
    for o in per_sample:
        out = full[o]
        for b in range(batch):
            ref = alone[b][o]
            diff = float((out[b : b + 1] - ref).abs().max()) if ref.numel() else 0.0
            bound = atol + rtol * (float(ref.abs().max()) if ref.numel() else 0.0)
            if not diff <= bound:
                lines.append(f"output {o}, sample {b}: batched and one-by-one results differ by {fmt(diff)} (max abs) > {fmt(bound)}")
    if lines:
        _fail(
            f"check_batch_independence: {len(lines)} (output, sample) pair(s) depend on the rest of the batch:",
            lines,
            "Look for operations over the batch dimension (mean(0), batch norm) or solver tests on the whole batch.",
        )


def check_convergence(
    layer: nn.Module,
    *inputs: Any,
    max_nfe: int | None = None,
    max_residual: float | None = None,
    max_nstep: int | None = None,
    require_converged: bool = True,
) -> dict[str, dict[str, float]]:
    """Assert that every forward solve converged within the given budget, block by block.

    Uses the `SolveInfo` of each block (`layer.solve(...).info`) of every implicit solve the module runs.

    Args:
        max_nfe: the most batched function evaluations a block may use.
        max_residual: the largest stopping measure any sample may end with.
        max_nstep: the most iterations any sample may take.
        require_converged: every sample must meet its solver's tolerance.

    Returns:
        Statistics per block: `converged` (fraction), `nfe`, `max_residual`, `mean_nstep`, `max_nstep`.
    """
    check_module(layer)
    with torch.no_grad(), silence_convergence_warnings(), record_solves() as records:
        call(layer, inputs)
    if not records:
        raise AssertionError(f"check_convergence: running {type(layer).__name__} called no ImplicitLayer.solve; nothing to check.")
    stats: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    for k, record in enumerate(records):
        where = f" [solve {k}]" if len(records) > 1 else ""
        for block, info in record.solution.info.items():
            res, nstep = info.residual.detach().double(), info.nstep.double()
            s = {
                "converged": float(info.converged.double().mean()),
                "nfe": float(info.nfe),
                "max_residual": float(res.max()),
                "mean_nstep": float(nstep.mean()),
                "max_nstep": float(nstep.max()),
            }
            stats[block + where] = s
            failed = (~info.converged).nonzero().flatten().tolist()
            if require_converged and failed:
                lines.append(f"{block}{where}: samples {failed[:10]}{'...' if len(failed) > 10 else ''} did not converge "
                             f"(worst residual {fmt(s['max_residual'])} at sample {int(torch.argmax(res))})")
            if max_nfe is not None and info.nfe > max_nfe:
                lines.append(f"{block}{where}: nfe {info.nfe} > max_nfe {max_nfe}")
            if max_residual is not None and not s["max_residual"] <= max_residual:
                lines.append(f"{block}{where}: residual {fmt(s['max_residual'])} at sample {int(torch.argmax(res))} > max_residual {max_residual:g}")
            if max_nstep is not None and s["max_nstep"] > max_nstep:
                lines.append(f"{block}{where}: {int(s['max_nstep'])} iterations at sample {int(torch.argmax(nstep))} > max_nstep {max_nstep}")
    if lines:
        _fail(f"check_convergence: {len(lines)} bound(s) exceeded:", lines)
    return stats

