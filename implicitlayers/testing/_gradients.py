"""`check_gradients`: a layer's gradients against float64 finite differences and unrolled autograd."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backward import BackwardMode, Unroll
from ..layer import ImplicitLayer
from ..solvers import SolverConfig
from ._common import Record, call, check_module, detached_deepcopy, fmt, record_solves, silence_convergence_warnings

__all__ = ["check_gradients"]

_MAX_LINES = 12


@dataclasses.dataclass
class _Runner:
    """Runs the float64 copy with tightened forward solvers (finite differences of a solution known
    only to 1e-4 would be noise), optionally with another backward mode; records every solve."""

    model: nn.Module
    dtype: torch.dtype | None
    solver_tol: float
    backward: BackwardMode | None = None

    def tighten(self, solver: Any) -> Any:
        if isinstance(solver, SolverConfig):
            return solver.replace(tol=self.solver_tol, max_iter=max(solver.max_iter, 1000), on_failure="ignore")
        return solver

    def __call__(self, inputs: Sequence[Any]) -> tuple[list[torch.Tensor], list[Record]]:
        try:
            with silence_convergence_warnings(), record_solves(self.tighten, self.backward) as records:
                outs = [o for o in call(self.model, inputs) if o.is_floating_point()]
        except RuntimeError as err:
            if self.dtype is not None and any(s in str(err) for s in ("dtype", "Double", "Float", "scalar type")):
                raise TypeError(
                    f"check_gradients: the {self.dtype} copy of {type(self.model).__name__} failed ({err}). Tensors "
                    "captured in closures are not converted by module.to(dtype): hold them in an nn.Module (as "
                    "parameters or buffers), or pass dtype=None to check in the layer's own dtype."
                ) from err
            raise
        if not outs:
            raise TypeError(f"check_gradients: {type(self.model).__name__} returned no floating-point tensor to differentiate.")
        if not records:
            raise AssertionError(f"check_gradients: running {type(self.model).__name__} called no ImplicitLayer.solve; nothing to check.")
        return outs, records


def _scalar(outs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """`s_b = Σ_o ⟨c_o, out_o⟩` per sample `(B,)`, or the total `(1,)` when an output has no batch dimension."""
    rows = batch if all(o.dim() > 0 and o.shape[0] == batch for o in outs) else 1
    return sum((c * o).reshape(rows, -1).sum(1) for o, c in zip(outs, cotangents))  # type: ignore[return-value]


def _gradients(run: _Runner, xs, float_idx, names, cotangents, batch):
    """Gradients of `Σ_b s_b` w.r.t. the floating inputs and the named parameters of `run.model`."""
    xs = [x.detach().clone().requires_grad_() if i in float_idx else x for i, x in enumerate(xs)]
    params = dict(run.model.named_parameters())
    targets = [xs[i] for i in float_idx] + [params[n] for n in names]
    outs, records = run(xs)
    s = _scalar(outs, cotangents, batch).sum()
    if not s.requires_grad:
        return [torch.zeros_like(t) for t in targets], records
    grads = torch.autograd.grad(s, targets, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)], records


def check_gradients(
    layer: nn.Module,
    *inputs: Any,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    against_unroll: bool = True,
    wrt_parameters: bool = True,
    directions: int = 2,
    dtype: torch.dtype | None = torch.float64,
    solver_tol: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Assert that the layer's gradients match central finite differences (and unrolled autograd).

    A copy of the module is cast to `dtype` (float64 by default) and, while the check runs, every
    implicit solve uses its forward solver tightened to `solver_tol`; the backward mode (and an explicit
    `IFT(solver=...)`) stays as configured: that is what is being checked. With random output
    cotangents `c` and `s_b = Σ_o ⟨c_o, out_o⟩` per sample, for each floating input and each of
    `directions` random directions `d`:

        (s_b(x + εd) − s_b(x − εd)) / 2ε   ≈   ⟨∂s_b/∂x_b, d_b⟩     per sample b,

    which passes when `|fd − grad| ≤ atol + rtol·|fd|`. Parameters that require grad are checked the
    same way on the batch total, all at once along random directions, then one tensor at a time to
    name the culprit if that fails. With `against_unroll`, the full gradients are also compared with
    those of backpropagating through the solver's iterations (`backward=il.Unroll()`), where that is
    a reference: not when every layer already unrolls, and not when the unrolled gradients themselves
    fail the finite-difference probes (unrolled quasi-Newton iterations need not converge to the
    derivative; the result then says so in `"unroll_note"`). The per-sample comparison assumes that samples do not interact
    (see `check_batch_independence`).

    Cost: two backward passes, plus `2 · directions` solves per floating input and for the parameters.

    Args:
        eps: finite-difference step.
        atol: absolute tolerance (see above).
        rtol: relative tolerance (see above).
        against_unroll: also compare with backpropagation through the solver iterations.
        wrt_parameters: also check the gradients of `module.parameters()` that require grad.
        directions: random directions per input (and for the parameters).
        dtype: the dtype of the copy (`None` keeps the layer's own).
        solver_tol: the forward solvers' tolerance (default 1e-12 in float64, 1e-6 otherwise).
        seed: seeds the cotangents and directions.

    Returns:
        The largest finite-difference discrepancy (`"finite_differences"`), the largest difference
        from unrolled autograd (`"unroll"`, `None` when not compared) and, when that comparison was
        skipped, why (`"unroll_note"`).

    Raises:
        AssertionError: naming the input (or parameter), the sample and direction, and both values.
    """
    check_module(layer)
    if not isinstance(directions, int) or directions < 1:
        raise ValueError(f"check_gradients: directions must be an integer >= 1, got {directions!r}.")
    if solver_tol is None:
        solver_tol = 1e-12 if (dtype or _first_float_dtype(inputs)) == torch.float64 else 1e-6
    model = detached_deepcopy(layer)
    if dtype is not None:
        model.to(dtype)
    run = _Runner(model, dtype, solver_tol)
    xs = [x.detach().to(dtype) if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    float_idx = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    names = [n for n, p in model.named_parameters() if p.requires_grad] if wrt_parameters else []
    if not float_idx and not names:
        raise ValueError("check_gradients: no floating-point input and no parameter to differentiate.")
    batch = next((x.shape[0] for x in xs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    labels = _input_labels(layer, len(xs))
    gen = torch.Generator().manual_seed(seed)

    def randn_like(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    with torch.no_grad():
        outs, _ = run(xs)
    cotangents = [randn_like(o) for o in outs]
    grads, records = _gradients(run, xs, float_idx, names, cotangents, batch)

    def s(inputs_now: Sequence[Any]) -> torch.Tensor:
        with torch.no_grad():
            return _scalar(run(inputs_now)[0], cotangents, batch)

    lines: list[str] = []
    worst = 0.0
    probes: list[tuple[list[tuple[int, torch.Tensor]], torch.Tensor]] = []  # (target index, direction) pairs and fd
    for t, i in enumerate(float_idx):
        for k in range(directions):
            d = randn_like(xs[i])
            plus = [x + eps * d if j == i else x for j, x in enumerate(xs)]
            minus = [x - eps * d if j == i else x for j, x in enumerate(xs)]
            fd = (s(plus) - s(minus)) / (2 * eps)
            probes.append(([(t, d)], fd))
            worst = max(worst, _compare(fd, _directional(grads, [(t, d)], fd), atol, rtol, f"{labels[i]}, direction {k}", lines))
    if names:
        params = dict(model.named_parameters())
        first = len(float_idx)
        perturb = _ParameterPerturbation(params, xs, s, eps)
        joint: list[str] = []
        for k in range(directions):
            pairs = [(first + m, randn_like(params[n])) for m, n in enumerate(names)]
            fd = perturb({names[t - first]: d for t, d in pairs})
            probes.append((pairs, fd))
            worst = max(worst, _compare(fd, _directional(grads, pairs, fd), atol, rtol, f"all parameters, direction {k}", joint, per_sample=False))
        if joint:  # localise: one tensor at a time
            for m, n in enumerate(names):
                d = randn_like(params[n])
                fd = perturb({n: d})
                _compare(fd, _directional(grads, [(first + m, d)], fd), atol, rtol, f"parameter {n!r}", joint, per_sample=False)
        lines += joint
    result: dict[str, Any] = {"finite_differences": worst, "unroll": None}
    unroll_lines: list[str] = []
    if against_unroll and any(not isinstance(r.backward_mode, Unroll) for r in records):
        unrolled = _Runner(model, dtype, solver_tol, backward=Unroll())
        grads_u, _ = _gradients(unrolled, xs, float_idx, names, cotangents, batch)
        # Backpropagating through a quasi-Newton solver's iterations is not always a convergent
        # approximation of the derivative (Anderson on a KKT system can blow up): trust the unrolled
        # gradients as a reference only where they agree with the finite differences themselves.
        invalid: list[str] = []
        for pairs, fd in probes:
            _compare(fd, _directional(grads_u, pairs, fd), atol, rtol, "", invalid)
        if invalid:
            result["unroll"] = None
            result["unroll_note"] = (
                "skipped: the unrolled gradients disagree with finite differences themselves "
                f"({len(invalid)} of {len(probes)} probes), so they are no reference here"
            )
        else:
            targets = [labels[i] for i in float_idx] + [f"parameter {n!r}" for n in names]
            result["unroll"] = max(
                _compare_full(g, gu, atol, rtol, label, unroll_lines, per_sample=j < len(float_idx) and g.dim() > 0 and g.shape[0] == batch)
                for j, (g, gu, label) in enumerate(zip(grads, grads_u, targets))
            )
    if lines or unroll_lines:
        report = [f"check_gradients: the layer's gradients are wrong ({dtype or 'own dtype'} copy, forward solves "
                  f"to tol={solver_tol:g}, eps={eps:g}, atol={atol:g}, rtol={rtol:g})."]
        if lines:
            report.append(f"  against central finite differences ({len(lines)} failing):")
            report += _clip(lines)
        if unroll_lines:
            report.append(f"  against unrolled autograd (backward=il.Unroll()) ({len(unroll_lines)} failing):")
            report += _clip(unroll_lines)
        report.append(_solve_note(records, solver_tol))
        raise AssertionError("\n".join(report))
    return result


@dataclasses.dataclass
class _ParameterPerturbation:
    """Central difference of the batch total along a direction in (some of) the parameters, restored after."""

    params: dict[str, nn.Parameter]
    xs: list[Any]
    s: Callable[[Sequence[Any]], torch.Tensor]
    eps: float

    def __call__(self, direction: dict[str, torch.Tensor]) -> torch.Tensor:
        originals = {n: self.params[n].detach().clone() for n in direction}
        values = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, d in direction.items():
                        self.params[n].copy_(originals[n] + sign * self.eps * d)
                values.append(self.s(self.xs).sum())
        finally:
            with torch.no_grad():
                for n, p in originals.items():
                    self.params[n].copy_(p)
        return ((values[0] - values[1]) / (2 * self.eps)).reshape(1)


def _directional(grads: Sequence[torch.Tensor], pairs: Sequence[tuple[int, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """`Σ ⟨grad_t, d⟩` over the (target, direction) pairs, per sample when `like` has one entry per sample."""
    rows = like.shape[0]
    return sum((grads[t] * d).reshape(rows, -1).sum(1) if rows > 1 else (grads[t] * d).sum().reshape(1) for t, d in pairs)  # type: ignore[return-value]


def _clip(lines: list[str]) -> list[str]:
    shown = ["    " + s for s in lines[:_MAX_LINES]]
    return shown + ([f"    ... and {len(lines) - _MAX_LINES} more"] if len(lines) > _MAX_LINES else [])


def _compare(fd, ad, atol, rtol, label, lines, per_sample=True) -> float:
    err = (fd - ad).abs()
    bound = atol + rtol * fd.abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        b = int(torch.argmax(torch.where(torch.isfinite(err), err - bound, torch.full_like(err, float("inf")))))
        several = per_sample and fd.numel() > 1
        where = f", sample {b}" if several else ""
        count = f" ({int(bad.sum())}/{bad.numel()} samples)" if several else ""
        lines.append(f"{label}{where}: finite difference {fmt(float(fd[b]))} vs layer gradient {fmt(float(ad[b]))} "
                     f"(off by {fmt(float(err[b]))} > {fmt(float(bound[b]))}){count}")
    return float(err.max())


def _compare_full(g, gu, atol, rtol, label, lines, per_sample) -> float:
    rows = g.shape[0] if per_sample else 1
    diff = (g - gu).abs().reshape(rows, -1).amax(1)
    bound = atol + rtol * gu.abs().reshape(rows, -1).amax(1)
    bad = ~(diff <= bound)
    if bool(bad.any()):
        b = int(torch.argmax(diff - bound))
        where = f", sample {b}" if per_sample else ""
        lines.append(f"{label}{where}: differs from the unrolled gradient by {fmt(float(diff[b]))} (max abs) > {fmt(float(bound[b]))}")
    return float(diff.max()) if diff.numel() else 0.0


def _first_float_dtype(inputs: Sequence[Any]) -> torch.dtype | None:
    return next((x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()), None)


def _input_labels(layer: nn.Module, n: int) -> list[str]:
    if isinstance(layer, ImplicitLayer) and len(layer.input_names) == n:
        return [f"input {i} ({name})" for i, name in enumerate(layer.input_names)]
    return [f"input {i}" for i in range(n)]


def _solve_note(records: Sequence[Record], tol: float) -> str:
    worst = max((float(info.residual.detach().max()) for r in records for info in r.solution.info.values()), default=0.0)
    modes = ", ".join(sorted({repr(r.backward_mode) for r in records}))
    if worst > tol:
        return (f"  Note: the forward solves only reached residual {fmt(worst)} (asked {tol:g}), so finite differences "
                f"carry errors of about {fmt(worst)}/eps. Backward mode(s) checked: {modes}.")
    return f"  The forward solves converged (worst residual {fmt(worst)}). Backward mode(s) checked: {modes}."
