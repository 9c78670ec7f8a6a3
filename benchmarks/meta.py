"""Meta-learning benchmarks: iMAML (`il.IMAML`) against MAML, a per-task loop, torchopt, and JIIO against a nested loop.

Run: `python benchmarks/meta.py [--quick] [--tasks 16] [--repeats 3]`

Tables printed (CPU, `torch.set_num_threads(1)`, median wall time of `--repeats` runs):

1. **Memory and time of one meta-gradient vs inner steps K** (5-way 1-shot digits tasks, MLP
   64-64-64-5, 16 tasks). iMAML takes K gradient steps on the proximal objective
   (`il.FixedPointIteration(max_iter=K)`) and 5 CG steps; MAML backpropagates through K SGD steps.
   *Memory* is the peak number of bytes autograd holds in saved tensors (the activations kept for
   the backward pass), counted with `torch.autograd.graph.saved_tensors_hooks`: the pack hook wraps each
   saved tensor in a holder that adds its bytes to a live counter and subtracts them when autograd
   frees it. That is the part of memory that grows with unrolling; parameters, inputs and transient
   buffers are not counted, and a tensor saved twice counts twice. The solvers' own evaluations
   run under identity hooks, because every tensor they save is freed before the next iteration —
   and because hook-packed tensors saved under `retain_graph=True` (which the residual's inner
   gradient uses) are never released back to the counter, which would count them forever.
2. **Meta-gradient error vs CG steps** (float64, MLP 64-16-5, 4 tasks, tight inner solve): relative
   error against the exact dense `Σ_t (I + H_t/λ)⁻¹ ∇L_test,t`, with `H_t` from `torch.func` Hessians.
3. **Batched meta-batch vs a per-task loop vs torchopt** (16 tasks, K = 16 inner GD steps, 5 CG steps
   for all three): one `il.IMAML` call on `(16, N, ...)` tensors; the same layer called once per task;
   `torchopt.diff.implicit.custom_root` with `torchopt.linear_solve.solve_cg(maxiter=5)` per task
   (torchopt has no task batching). Also the largest relative difference between the meta-gradients.
4. **JIIO context learner vs the nested loop**: per-task context inference on 16 support sets with
   one joint `il.JIIO` solve, against gradient descent on the context (the same step size as JIIO's
   input update) where each step is a full DEQ solve plus an implicit backward. Reported: time, the
   inner objective reached, and the time the nested loop needs to reach JIIO's objective.
5. **Inner solve to tolerance vs step size, along meta-training** (`--only 5`): the example's iMAML
   learner (5-way 5-shot, seed 0) is meta-trained for `--train-steps` meta-steps; at its start, half-way
   and at the end, the inner problems of 16 held-out meta-training tasks are solved to `tol = 1e-4`
   (at most 1000 iterations) with the step the example used before (0.1), the descent step
   `1/(L + λ)` and the accelerated step `1/√(λ(L + λ))` of `step_size="auto"`, with `L` the largest
   task curvature (30 power iterations). Reported: tasks that met tol, median and largest iterations,
   and the time of one solve; and what `step_size="auto"` itself picks with its 3 warm-started
   Hessian–vector products, and their time against one gradient of the meta-batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import implicitlayers as il
from implicitlayers.models.imaml import default_backward

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `benchmarks` and `examples` importable
    sys.path.insert(0, str(ROOT))
from benchmarks._common import median_time, pinned_threads  # noqa: E402
from examples import fewshot_digits as fd  # noqa: E402


# ------------------------------------------------------------------------------ measuring
class SavedTensorMeter:
    """Live and peak bytes of tensors saved by autograd inside the `with` block (see the module docstring)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> "_Saved":
        return _Saved(self, t)

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    __slots__ = ("meter", "tensor", "nbytes")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


def _unpack(saved: _Saved) -> torch.Tensor:
    return saved.tensor


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclasses.dataclass(frozen=True)
class Unmetered:
    """A solver whose own evaluations are hidden from an enclosing `SavedTensorMeter` (transient memory)."""

    inner: Any

    def solve(self, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            return self.inner.solve(*args, **kwargs)

    def solve_linear(self, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            return self.inner.solve_linear(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class FixedBudget:
    """A linear solver run for exactly its `max_iter` steps, its result used as is (the paper's "5 CG steps").

    The IFT zeroes the meta-gradient of a task whose adjoint solve missed its tolerance, and with
    `tol=1e-30` every one does, so this wrapper reports every task as converged: it measures what a
    fixed CG budget gives (table 2: its error; tables 1 and 3: its time), not a converged solve.
    """

    inner: Any

    def solve_linear(self, *args, **kwargs):
        x, info = self.inner.solve_linear(*args, **kwargs)
        done = torch.ones_like(info.converged)
        return x, dataclasses.replace(info, converged=done, status=torch.zeros_like(info.nstep))


def linear_solver(steps: int, tol: float = 1e-30) -> tuple[Any, str]:
    """`il.linear.CG` with a fixed number of steps (falls back to Anderson if `il.linear` is missing)."""
    solver = default_backward(tol=tol, max_iter=steps).solver.replace(on_failure="ignore")
    return FixedBudget(solver), type(solver).__name__


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


# ------------------------------------------------------------------------------ 1. memory and time vs K
def imaml_learner(inner_steps: int, cg_steps: int) -> fd.IMAMLLearner:
    """The example's learner with a fixed budget: `inner_steps` gradient steps of size 0.1, `cg_steps` CG steps."""
    learner = fd.IMAMLLearner(5)
    cg, _ = linear_solver(cg_steps)
    learner.imaml = il.IMAML(
        learner.imaml.model, F.cross_entropy, 1.0, step_size=0.1,
        solver=Unmetered(il.FixedPointIteration(tol=1e-30, max_iter=inner_steps, on_failure="ignore")),
        backward=il.IFT(solver=Unmetered(cg), on_failure="ignore"),
    )
    return learner


def meta_gradient(learner: torch.nn.Module, batch: fd.Tasks) -> None:
    sx, sy, qx, qy = batch
    learner.zero_grad()
    F.cross_entropy(learner(sx, sy, qx).flatten(0, 1), qy.flatten()).backward()


def bench_inner_steps(batch: fd.Tasks, steps: list[int], repeats: int) -> None:
    rows = []
    for k in steps:
        row = [str(k)]
        for learner in (imaml_learner(k, 5), fd.MAMLLearner(5, steps=k)):
            with SavedTensorMeter() as meter:
                meta_gradient(learner, batch)
            seconds = median_time(lambda: meta_gradient(learner, batch), repeats)
            row += [f"{meter.peak / 2**20:.2f}", f"{1e3 * seconds:.1f}"]
        rows.append(row)
    table(
        f"1. One meta-gradient vs inner steps K ({batch[0].shape[0]} tasks; peak saved-tensor MiB, median ms)",
        ["K", "iMAML MiB", "iMAML ms", "MAML MiB", "MAML ms"], rows,
    )


# ------------------------------------------------------------------------------ 2. error vs CG steps
def bench_cg_error(steps: list[int], lam: float = 2.0) -> None:
    torch.manual_seed(0)
    sampler = fd.TaskSampler([0, 1, 2, 3, 4], 5, 5, 5, seed=3)
    sx, sy, qx, qy = (t.double() if t.is_floating_point() else t for t in sampler.sample(4))
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    forward = il.Anderson(memory=5, tol=1e-12, max_iter=500)
    imaml = il.IMAML(model, F.cross_entropy, lam, solver=forward)
    with torch.no_grad():
        params = imaml(sx, sy)
    phi = torch.cat([params[n].flatten(1) for n in imaml._names], 1)
    # Exact: per task, (I + H/λ)⁻¹ ∇_φ L_test(φ*), with dense Hessians (jacrev∘jacrev: reverse mode only).
    exact = torch.zeros(phi.shape[1], dtype=torch.float64)
    eye = torch.eye(phi.shape[1], dtype=torch.float64)
    for t in range(phi.shape[0]):
        hessian = jacrev(jacrev(lambda p: imaml.task_loss(p, sx[t], sy[t])))(phi[t])
        test_grad = jacrev(lambda p: F.cross_entropy(functional_call(model, imaml.unflatten(p), (qx[t],)), qy[t], reduction="sum"))(phi[t])
        exact += torch.linalg.solve(eye + hessian / lam, test_grad)
    rows = []
    for k in steps:
        cg, name = linear_solver(k)
        imaml = il.IMAML(model, F.cross_entropy, lam, solver=forward, backward=il.IFT(solver=cg))
        model.zero_grad()
        logits = imaml.functional(imaml(sx, sy), qx)
        F.cross_entropy(logits.flatten(0, 1), qy.flatten(), reduction="sum").backward()
        got = torch.cat([p.grad.flatten() for p in model.parameters()])
        rows.append([str(k), f"{float((got - exact).norm() / exact.norm()):.2e}"])
    table(f"2. Meta-gradient relative error vs {name} steps (float64, P = {phi.shape[1]}, λ = {lam})", ["steps", "rel. error"], rows)


# ------------------------------------------------------------------------------ 3. batched vs loop vs torchopt
def torchopt_meta_gradient(model: torch.nn.Module, batch: fd.Tasks, inner_steps: int, cg_steps: int, lam: float) -> list[torch.Tensor] | None:
    try:
        import torchopt
    except ImportError:
        return None
    names = [n for n, _ in model.named_parameters()]

    def inner_objective(params, meta, x, y):
        out = functional_call(model, dict(zip(names, params)), (x,))
        return F.cross_entropy(out, y) + 0.5 * lam * sum(((p - m) ** 2).sum() for p, m in zip(params, meta))

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(inner_objective, argnums=0), argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps)
    )
    def solve(params, meta, x, y):
        with torch.enable_grad():
            for _ in range(inner_steps):
                params = tuple(p.detach().requires_grad_() for p in params)
                grads = torch.autograd.grad(inner_objective(params, meta, x, y), params)
                params = tuple(p - 0.1 * g for p, g in zip(params, grads))
        return tuple(p.detach() for p in params)

    sx, sy, qx, qy = batch
    meta = tuple(model.parameters())
    total = 0.0
    for t in range(sx.shape[0]):
        phi = solve(tuple(p.detach() for p in meta), meta, sx[t], sy[t])
        logits = functional_call(model, dict(zip(names, phi)), (qx[t],))
        total = total + F.cross_entropy(logits, qy[t], reduction="sum")
    return list(torch.autograd.grad(total, meta))


def bench_batching(batch: fd.Tasks, repeats: int, inner_steps: int = 16, cg_steps: int = 5, lam: float = 2.0) -> None:
    torch.manual_seed(0)
    model = fd.mlp(5)
    cg, name = linear_solver(cg_steps)
    # The same inner iteration in all three: K plain gradient steps (lr 0.1) on the proximal objective.
    imaml = il.IMAML(
        model, F.cross_entropy, lam, step_size=0.1,
        solver=il.FixedPointIteration(tol=1e-30, max_iter=inner_steps, on_failure="ignore"), backward=il.IFT(solver=cg),
    )
    sx, sy, qx, qy = batch

    def ours(sl: slice) -> list[torch.Tensor]:
        logits = imaml.functional(imaml(sx[sl], sy[sl]), qx[sl])
        loss = F.cross_entropy(logits.flatten(0, 1), qy[sl].flatten(), reduction="sum")
        return list(torch.autograd.grad(loss, list(model.parameters())))

    def batched() -> list[torch.Tensor]:
        return ours(slice(None))

    def looped() -> list[torch.Tensor]:
        grads = [ours(slice(t, t + 1)) for t in range(sx.shape[0])]
        return [sum(g) for g in zip(*grads)]

    def rel(a, b):
        return float(torch.cat([x.flatten() for x in a]).sub(torch.cat([x.flatten() for x in b])).norm() / torch.cat([x.flatten() for x in b]).norm())

    g_batched, g_looped = batched(), looped()
    t_batched, t_looped = median_time(batched, repeats), median_time(looped, repeats)
    rows = [
        ["il.IMAML, one batched solve", f"{1e3 * t_batched:.1f}", "1.00", "—"],
        ["il.IMAML, loop over tasks", f"{1e3 * t_looped:.1f}", f"{t_looped / t_batched:.2f}", f"{rel(g_looped, g_batched):.1e}"],
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchopt calls the deprecated functorch API
        g_torchopt = torchopt_meta_gradient(model, batch, inner_steps, cg_steps, lam)
        if g_torchopt is None:
            rows.append(["torchopt (not installed)", "—", "—", "—"])
        else:
            t_torchopt = median_time(lambda: torchopt_meta_gradient(model, batch, inner_steps, cg_steps, lam), repeats)
            rows.append(["torchopt custom_root, loop over tasks", f"{1e3 * t_torchopt:.1f}", f"{t_torchopt / t_batched:.2f}",
                         f"{rel(g_torchopt, g_batched):.1e}"])
    table(
        f"3. One meta-gradient, {sx.shape[0]} tasks, K = {inner_steps} GD steps, {cg_steps} {name} steps",
        ["method", "median ms", "× batched", "rel. diff. of meta-gradient"], rows,
    )


# ------------------------------------------------------------------------------ 4. JIIO vs nested loop
def bench_jiio(batch: fd.Tasks, repeats: int, max_outer: int = 300) -> None:
    torch.manual_seed(0)
    learner = fd.JIIOContextLearner(5, steps=100)
    learner.jiio.solver = il.Anderson(memory=5, tol=1e-4, max_iter=100, on_failure="ignore")
    sx, sy, _, _ = batch
    objective = learner.jiio.objective
    lr = learner.jiio.step_size  # the nested loop takes the same gradient step on c as JIIO's input update

    def inner_value(c: torch.Tensor) -> torch.Tensor:
        xc = torch.cat([sx, c.unsqueeze(1).expand(-1, sx.shape[1], -1)], -1)
        return objective(learner.head(learner.query_deq(xc)), sy, c)

    def joint() -> torch.Tensor:
        with torch.no_grad():
            return learner.adapt(sx, sy)

    learner.cell.contract()
    c_joint = joint()
    with torch.no_grad():
        target = float(inner_value(c_joint).mean())
    nfe_joint = learner.jiio.layer(1).last_solution.info[next(iter(learner.jiio.layer(1).last_solution.info))].nfe
    t_joint = median_time(joint, repeats)

    def nested(stop_at: float | None) -> tuple[float, int]:
        learner.cell.contract()
        c = torch.zeros_like(c_joint, requires_grad=True)
        value = float("inf")
        for step in range(1, max_outer + 1):
            value_t = inner_value(c).sum()
            (g,) = torch.autograd.grad(value_t, c)
            value = float(value_t.detach()) / c.shape[0]
            if stop_at is not None and value <= stop_at:
                return value, step
            with torch.no_grad():
                c -= lr * g
        return value, max_outer

    start = time.perf_counter()
    value_nested, steps_to_match = nested(target)
    t_match = time.perf_counter() - start
    rows = [
        ["JIIO (one joint solve)", f"{1e3 * t_joint:.1f}", f"{target:.4f}", str(nfe_joint), "1.00"],
        [f"nested loop until ≤ JIIO ({steps_to_match} outer steps)", f"{1e3 * t_match:.1f}", f"{value_nested:.4f}", "—", f"{t_match / t_joint:.2f}"],
    ]
    table(
        f"4. Context inference for {sx.shape[0]} support sets: JIIO vs gradient descent on c (lr {lr}), each step a DEQ solve + IFT",
        ["method", "ms", "inner objective", "augmented NFE", "× JIIO"], rows,
    )


# ------------------------------------------------------------------------------ 5. inner solve vs step size
def bench_step_size(train_steps: int, lam: float = 1.0) -> None:
    torch.manual_seed(0)
    sampler = fd.TaskSampler([0, 1, 2, 3, 4], 5, 5, 5, seed=0, rotations=True)
    held_out = fd.TaskSampler([0, 1, 2, 3, 4], 5, 5, 5, seed=7, rotations=True)
    learner = fd.IMAMLLearner(5, lam=lam)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    rows = []
    checkpoints = sorted({0, train_steps // 2, train_steps})
    for step in range(train_steps + 1):
        if step in checkpoints:
            warm, (sx, sy, _, _) = held_out.sample(16), held_out.sample(16)
            rows += _step_size_rows(learner, step, warm, sx, sy, lam)
        if step == train_steps:
            break
        bx, by, qx, qy = sampler.sample(16)
        opt.zero_grad()
        F.cross_entropy(learner(bx, by, qx).flatten(0, 1), qy.flatten()).backward()
        opt.step()
    table(
        f"5. Inner solve of 16 tasks to tol 1e-4 vs step size, along meta-training (5-way 5-shot, λ = {lam}; L = largest curvature)",
        ["meta-step", "L", "solver", "step rule", "α", "met tol", "median it", "max it", "ms"], rows,
    )


def _step_size_rows(learner: fd.IMAMLLearner, step: int, warm: fd.Tasks, sx: torch.Tensor, sy: torch.Tensor, lam: float) -> list[list[str]]:
    model = learner.imaml.model
    probe = il.IMAML(model, F.cross_entropy, lam, power_iters=30)
    curvature = float(probe.curvature(sx, sy).max())
    rules = {"0.1 (before)": 0.1, "1/(L + λ)": 1 / (curvature + lam), "1/√(λ(L + λ)) (auto)": (lam * (curvature + lam)) ** -0.5}
    rows = []
    for solver_name, solver in (("Anderson(10)", il.Anderson(memory=10, tol=1e-4, max_iter=1000, on_failure="ignore")),
                                ("FixedPointIteration", il.FixedPointIteration(tol=1e-4, max_iter=1000, on_failure="ignore"))):
        for rule, alpha in rules.items():
            if solver_name == "FixedPointIteration" and rule != "1/(L + λ)":
                continue  # plain gradient steps above 2/(L + λ) diverge
            imaml = il.IMAML(model, F.cross_entropy, lam, solver=solver, step_size=alpha)
            start = time.perf_counter()
            with torch.no_grad():
                imaml(sx, sy)
            seconds = time.perf_counter() - start
            info = imaml.last_info
            rows.append([str(step), f"{curvature:.1f}", solver_name, rule, f"{alpha:.3g}", f"{int(info.converged.sum())}/{sx.shape[0]}",
                         str(int(info.nstep.median())), str(int(info.nstep.max())), f"{1e3 * seconds:.0f}"])
    # What step_size="auto" picks with its default 3 Hessian-vector products, warm-started on another batch.
    auto = il.IMAML(model, F.cross_entropy, lam)
    auto.curvature(warm[0], warm[1])
    hvp = median_time(lambda: auto.curvature(sx, sy), 3)
    theta = auto.flat_parameters().detach().expand(sx.shape[0], -1).clone().requires_grad_()
    grad = median_time(lambda: torch.autograd.grad(torch.func.vmap(auto.task_loss)(theta, sx, sy).sum(), theta), 3)
    estimate = float(auto.curvature(sx, sy).max())
    rows.append([str(step), f"{estimate:.1f}", f"auto's estimate ({auto.power_iters} HVPs)", f"{1e3 * hvp:.1f} ms = {hvp / grad:.1f} gradients",
                 f"{auto.auto_step_size(estimate):.3g}", "—", "—", "—", "—"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer K and CG values")
    parser.add_argument("--only", nargs="+", type=int, choices=[1, 2, 3, 4, 5], default=[1, 2, 3, 4, 5])
    parser.add_argument("--train-steps", type=int, default=300, help="table 5: meta-training steps (--quick: 60)")
    args = parser.parse_args(argv)
    with pinned_threads(1):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    batch = fd.TaskSampler([0, 1, 2, 3, 4], 5, 1, 5, seed=0).sample(args.tasks)
    if 1 in args.only:
        bench_inner_steps(batch, [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32, 64], args.repeats)
    if 2 in args.only:
        bench_cg_error([1, 2, 5] if args.quick else [1, 2, 3, 5, 10, 20, 40])
    if 3 in args.only:
        bench_batching(batch, args.repeats)
    if 4 in args.only:
        bench_jiio(batch, args.repeats)
    if 5 in args.only:
        bench_step_size(60 if args.quick else args.train_steps)


if __name__ == "__main__":
    main()
