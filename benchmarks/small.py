"""The fixed cost of a call: a 4-dimensional fixed point, where the solver's bookkeeping is all there is to time.

Run: `python benchmarks/small.py [--dim 4] [--batch 1 8] [--repeats 300] [--quick] [--threads 1]`

Against another checkout (e.g. before and after an optimisation of the core), run the same script with
that checkout first on the path: `PYTHONPATH=<checkout> python benchmarks/small.py --quick`
(`implicitlayers` is imported from the path; only this script's helpers come from its own checkout).
`main(argv)` returns the numbers as a dict, for a script that compares two runs.

Problem: `z = tanh(W z + x)` with `z, x ∈ R^dim` (default 4), `W` random with spectral norm 0.9
(contractive), batch `B = 1` and `B = 8`, float32. Evaluating `f` takes a few microseconds, so each row
below measures what a call costs beyond the evaluations: argument checks, solver state, per-iteration
bookkeeping, the autograd glue of the IFT. Users who solve many small problems pay this. Rows:

- `f` alone (`t(f)`, no grad) and one VJP of `f` (`t(vjp)`, `torch.autograd.grad` on a kept graph),
  each the mean over a loop of 20 calls;
- `bare Anderson`: `benchmarks/solvers.py`'s `anderson_floor` (same `m` and `λ`, preallocated history,
  no stopping test, no per-sample bookkeeping) run for the NFE of `il.fixed_point`;
- `il.fixed_point`: the default `il.Anderson()` (m = 5, λ = 1e-4, relative tolerance 1e-4), and the same
  solver forced to run 1, 10 and 20 iterations (`tol=1e-30`; a sample whose residual reaches exactly 0
  stops early, which NFE, a batched count, does not see);
- `torchdeq solver`: torchdeq's Anderson alone, same `m`, `λ`, relative tolerance and `max_iter`;
- `ImplicitLayer` (one `FixedPoint` condition, zeros start) forward under `torch.no_grad()` (inference;
  compared with torchdeq's solver alone), forward with `W` requiring grad, and forward
  + IFT backward of `z.sum()` into `W`; `il.DEQ` forward + IFT backward, the same problem, and the same
  with the forward capped at one iteration (the fixed cost of a round trip: the call, one step, the exact
  dense IFT backward);
- `torchdeq DEQ`: `get_deq(anderson, IFT)` with the same options both ways, forward and forward + backward.

Columns: the median and the minimum time over `--repeats` rounds in which every row takes one turn (so
load drifts on a shared machine hit all alike; `--warmup` untimed rounds first; `W.grad` is cleared,
untimed, before each turn; on a loaded machine a call of several milliseconds is preempted more often
than a short one, which inflates its median, so both statistics are kept), the forward NFE (batched
evaluations of `f`; torchdeq's is its `nstep`), the time ÷ the bare floor (`NFE · t(f)` for a forward,
plus `NFE_bwd · t(vjp) + t(f)` for a backward of `NFE_bwd` adjoint iterations) and ÷ torchdeq's
matching row, for the medians and the minima. Below the table: the per-iteration cost of
`il.fixed_point`, the slope between its 10- and 20-iteration rows (and its overhead beyond `t(f)`), the
same slope for the bare Anderson loop, and the per-call cost: what the 1-iteration solve spends beyond
its evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
from typing import Callable, Mapping

import torch

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(ROOT))
from benchmarks._common import pinned_threads, round_robin_samples  # noqa: E402
from benchmarks.solvers import anderson_floor  # noqa: E402

try:
    from torchdeq import get_deq as _torchdeq_get_deq
    from torchdeq.solver import get_solver as _torchdeq_get_solver
except ImportError:  # the `bench` extra is optional; without it only our rows are printed
    _torchdeq_get_deq = _torchdeq_get_solver = None

TOL, MAX_ITER, MEMORY, LAM = 1e-4, 50, 5, 1e-4
LOOP = 20  # calls per timed turn of `f` and of the VJP: a single 4 µs call is too close to the timer's own cost
FIXED = (1, 10, 20)  # forced iteration counts of `il.fixed_point`: the per-call cost and the per-iteration slope
# What a forward + backward costs before any iteration count enters: one forward iteration, the exact backward.
ONE_ITERATION_ROUND_TRIP = "il.DEQ fwd + IFT bwd, 1 iteration"


def _fixed(n: int) -> str:
    return f"il.fixed_point, {n} iteration{'s' * (n > 1)}"


def _bare(n: int) -> str:
    return f"bare Anderson, {n} iterations"


def _only_nfe(infos: Mapping[str, il.SolveInfo | None]) -> int:
    """The NFE of a one-block problem's `SolveInfo` (per-block dicts: `Solution.info`, `backward_info`)."""
    (info,) = infos.values()
    if info is None:
        raise RuntimeError("small.py: no SolveInfo was recorded (did the backward pass run?)")
    return info.nfe


@dataclasses.dataclass
class Case:
    """One problem instance: the map, its parameter and input, and a start."""

    W: torch.nn.Parameter
    x: torch.Tensor
    z0: torch.Tensor

    def f(self, z: torch.Tensor) -> torch.Tensor:
        """The map with the input bound (what `il.fixed_point` and torchdeq's solver iterate)."""
        return torch.tanh(torch.addmm(self.x, z, self.W.T))

    def cell(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The DEQ cell `(z, x) -> tanh(W z + x)`."""
        return torch.tanh(torch.addmm(x, z, self.W.T))


def make_case(dim: int, batch: int, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g)
    W = torch.nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, 2))
    return Case(W=W, x=torch.randn(batch, dim, generator=g), z0=torch.zeros(batch, dim))


def our_solver(**changes) -> il.Anderson:
    return il.Anderson(**{"memory": MEMORY, "lam": LAM, "tol": TOL, "max_iter": MAX_ITER, **changes})


def make_layer(case: Case) -> il.ImplicitLayer:
    x, z = il.Input("x"), il.Variable("z")
    return il.ImplicitLayer(
        il.Problem([il.FixedPoint(z, case.cell, (z, x))]), inputs=x, outputs=z, solver=our_solver(),
        init={"z": torch.zeros_like},
    )


def make_torchdeq(case: Case) -> Callable[[], tuple[torch.Tensor, int]]:
    deq = _torchdeq_get_deq(
        f_solver="anderson", f_max_iter=MAX_ITER, f_tol=TOL, f_stop_mode="rel",
        b_solver="anderson", b_max_iter=100, b_tol=TOL, b_stop_mode="rel", ift=True, n_states=1,
    )
    deq.train()

    def forward() -> tuple[torch.Tensor, int]:
        z_out, info = deq(lambda z: case.cell(z, case.x), torch.zeros_like(case.x), solver_kwargs={"m": MEMORY, "lam": LAM})
        return z_out[-1], int(info["nstep"].max())

    return forward


def make_steps(case: Case) -> tuple[dict[str, Callable[[], object]], dict[str, int], dict[str, int]]:
    """The timed rows, and the forward and backward NFE of each (measured once, untimed)."""
    f, z0 = case.f, case.z0
    layer, deq = make_layer(case), il.DEQ(case.cell, solver=our_solver())
    # The fixed cost of a round trip: one forward iteration (reported, not raised: it has not converged) and
    # the default (dense, exact) IFT backward, which at tol 1e-4 converges.
    deq_one = il.DEQ(case.cell, solver=our_solver(max_iter=1, on_failure="ignore"))
    fixed = {n: our_solver(tol=1e-30, max_iter=n, on_failure="ignore") for n in FIXED}
    nfe: dict[str, int] = {}
    nfe_bwd: dict[str, int] = {}

    def evals() -> None:
        with torch.no_grad():
            for _ in range(LOOP):
                f(z0)

    z_star = il.fixed_point(f, z0, solver=our_solver()).value.requires_grad_()
    with torch.no_grad():
        v = torch.ones_like(z0)
    kept = f(z_star)  # a graph kept for the VJP loop

    def vjps() -> None:
        for _ in range(LOOP):
            torch.autograd.grad(kept, z_star, v, retain_graph=True)

    def fixed_point(solver: il.Anderson) -> Callable[[], object]:
        return lambda: il.fixed_point(f, z0, solver=solver)

    def layer_forward() -> torch.Tensor:
        return layer(case.x)

    def layer_inference() -> torch.Tensor:
        with torch.no_grad():
            return layer(case.x)

    def layer_step() -> None:
        layer(case.x).sum().backward()

    def deq_step() -> None:
        deq(case.x).sum().backward()

    def deq_one_step() -> None:
        deq_one(case.x).sum().backward()

    steps: dict[str, Callable[[], object]] = {"f": evals, "vjp": vjps, "il.fixed_point": fixed_point(our_solver())}
    nfe["il.fixed_point"] = il.fixed_point(f, z0, solver=our_solver()).info.nfe
    for n, solver in fixed.items():
        steps[_fixed(n)] = fixed_point(solver)
        nfe[_fixed(n)] = il.fixed_point(f, z0, solver=solver).info.nfe
    for label, n in (("bare Anderson", nfe["il.fixed_point"]), *((_bare(k), nfe[_fixed(k)]) for k in FIXED[1:])):
        steps[label] = (lambda run, n: lambda: run(f, z0, n))(anderson_floor(z0, m=MEMORY, lam=LAM), n)
        nfe[label] = n
    steps["ImplicitLayer forward, no grad"] = layer_inference
    steps["ImplicitLayer forward"] = layer_forward
    steps["ImplicitLayer forward + IFT backward"] = layer_step
    steps["il.DEQ forward + IFT backward"] = deq_step
    steps[ONE_ITERATION_ROUND_TRIP] = deq_one_step
    layer_step()
    forward_nfe = _only_nfe(layer.last_solution.info if layer.last_solution is not None else {})
    for name in ("ImplicitLayer forward, no grad", "ImplicitLayer forward", "ImplicitLayer forward + IFT backward"):
        nfe[name] = forward_nfe
    nfe_bwd["ImplicitLayer forward + IFT backward"] = _only_nfe(layer.backward_info)
    deq_step()
    nfe["il.DEQ forward + IFT backward"] = deq.nfe
    nfe_bwd["il.DEQ forward + IFT backward"] = _only_nfe(deq.layer.backward_info)
    deq_one_step()
    nfe[ONE_ITERATION_ROUND_TRIP] = deq_one.nfe
    nfe_bwd[ONE_ITERATION_ROUND_TRIP] = _only_nfe(deq_one.layer.backward_info)

    if _torchdeq_get_deq is not None:
        solve = _torchdeq_get_solver("anderson")
        options = dict(m=MEMORY, lam=LAM, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")

        def their_solver() -> tuple:
            with torch.no_grad():
                return solve(f, z0, **options)

        theirs = make_torchdeq(case)

        def their_forward() -> torch.Tensor:
            return theirs()[0]

        def their_step() -> None:
            theirs()[0].sum().backward()

        steps["torchdeq solver"] = their_solver
        steps["torchdeq DEQ forward"] = their_forward
        steps["torchdeq DEQ forward + backward"] = their_step
        nfe["torchdeq solver"] = int(their_solver()[2]["nstep"].max())
        nfe["torchdeq DEQ forward"] = nfe["torchdeq DEQ forward + backward"] = theirs()[1]
    return steps, nfe, nfe_bwd


# Each of our rows and the torchdeq row it is compared with.
PEERS = {
    "il.fixed_point": "torchdeq solver",
    "ImplicitLayer forward, no grad": "torchdeq solver",
    "ImplicitLayer forward": "torchdeq DEQ forward",
    "ImplicitLayer forward + IFT backward": "torchdeq DEQ forward + backward",
    "il.DEQ forward + IFT backward": "torchdeq DEQ forward + backward",
}


def measure(dim: int, batch: int, repeats: int, warmup: int) -> dict:
    """NFE, and for each statistic (`median`, `min`) the times, floors and per-iteration decomposition, at one batch size."""
    case = make_case(dim, batch)
    steps, nfe, nfe_bwd = make_steps(case)
    samples = round_robin_samples(steps, repeats, warmup=warmup, before=lambda: setattr(case.W, "grad", None))
    result: dict = {"batch": batch, "nfe": nfe, "nfe_bwd": nfe_bwd}
    for stat, reduce in (("median", statistics.median), ("min", min)):
        times = {name: reduce(t) for name, t in samples.items()}
        result[stat] = _decompose(times, nfe, nfe_bwd)
    return result


def _decompose(times: dict[str, float], nfe: dict[str, int], nfe_bwd: dict[str, int]) -> dict:
    """Per-row times and floors, and the per-iteration and per-call costs, from one statistic's times."""
    t_f, t_vjp = times.pop("f") / LOOP, times.pop("vjp") / LOOP
    floors: dict[str, float | None] = {}
    for name in times:
        floors[name] = nfe[name] * t_f + (nfe_bwd[name] * t_vjp + t_f if name in nfe_bwd else 0.0)
        if "backward" in name and name not in nfe_bwd:
            floors[name] = None  # torchdeq does not report its backward iterations
    # The slope between the 10- and 20-iteration solves (the history is full: steady-state iterations);
    # the per-call cost is what a 1-iteration solve spends beyond its evaluations.
    one, (a, b) = _fixed(FIXED[0]), FIXED[1:]
    n1, n2 = nfe[_fixed(a)], nfe[_fixed(b)]
    per_iteration = (times[_fixed(b)] - times[_fixed(a)]) / (n2 - n1)
    return {
        "t_f": t_f,
        "t_vjp": t_vjp,
        "times": times,
        "floors": floors,
        "per_iteration": per_iteration,
        "per_iteration_overhead": per_iteration - t_f,
        "per_call": times[one] - nfe[one] * t_f,
        "bare_per_iteration": (times[_bare(b)] - times[_bare(a)]) / (n2 - n1),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with command-line arguments `argv`; returns `{"dim", "repeats", ..., batch: measure(...)}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 300; 60 with --quick)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (60): a few seconds per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (60 if args.quick else 300)
    results: dict = {"dim": args.dim, "repeats": repeats, "torch": torch.__version__, "implicitlayers": il.__file__}
    with pinned_threads(args.threads):
        for batch in args.batch:
            results[batch] = r = measure(args.dim, batch, repeats, args.warmup)
            _print_table(r, args.dim, repeats)
    return results


def _print_table(r: dict, dim: int, repeats: int) -> None:
    us = 1e6
    med, low = r["median"], r["min"]
    times = med["times"]
    print(f"\nfixed point z = tanh(W z + x), dim={dim}, B={r['batch']}, threads={torch.get_num_threads()}, "
          f"{repeats} interleaved rounds; t(f) = {us * med['t_f']:.1f} µs, t(vjp) = {us * med['t_vjp']:.1f} µs (medians)")
    print(f"implicitlayers from {pathlib.Path(il.__file__).parent}")
    print(f"{'':40s}{'median (µs)':>12s}{'min (µs)':>10s}{'NFE':>8s}{'÷ floor':>14s}{'÷ torchdeq':>14s}")
    for name, seconds in times.items():
        nfe = f"{r['nfe'][name]}" + (f"+{r['nfe_bwd'][name]}" if name in r["nfe_bwd"] else "")
        peer = PEERS.get(name)
        ratio = f"{seconds / times[peer]:.2f} ({low['times'][name] / low['times'][peer]:.2f})" if peer in times else ""
        floor = f"{seconds / med['floors'][name]:.1f} ({low['times'][name] / low['floors'][name]:.1f})" if med["floors"][name] else ""
        print(f"{name:40s}{us * seconds:12.1f}{us * low['times'][name]:10.1f}{nfe:>8s}{floor:>14s}{ratio:>14s}")
    print("(ratios of the medians, of the minima in brackets; floor = NFE · t(f), plus NFE_bwd · t(vjp) + t(f) for a backward;\n"
          " on a loaded machine a longer call is more often preempted, so the minima are the steadier statistic)")
    for stat, d in (("median", med), ("min", low)):
        print(f"{stat:>6s}: il.fixed_point per iteration {us * d['per_iteration']:.1f} µs (beyond t(f): "
              f"{us * d['per_iteration_overhead']:.1f} µs; bare Anderson {us * d['bare_per_iteration']:.1f} µs), "
              f"per call {us * d['per_call']:.1f} µs (a 1-iteration solve beyond its evaluations)")
    if "torchdeq solver" not in times:
        print("torchdeq is not installed (pip install implicitlayers[bench]); its rows are skipped.")


if __name__ == "__main__":
    main()
