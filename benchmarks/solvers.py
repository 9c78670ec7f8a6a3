"""Forward fixed-point solvers, ours against torchdeq's, on two DEQ-style cells.

Run: `python benchmarks/solvers.py [--repeats 7] [--device cpu|cuda] [--max-iter 50] [--tol 1e-4]`

Cells (bigger on CUDA):

- `tanh-linear`: `f(z) = tanh(W z + U x)`, `d = 256`, `B = 64` (CUDA: `d = 1024`, `B = 256`).
- `conv`: `f(z) = tanh(GroupNorm(conv(z)) · 0.3 + conv(x))`-style cell with 16 channels on 16×16, `B = 16`
  (CUDA: 64 channels on 32×32, `B = 32`).

For each solver the table prints the number of batched evaluations of `f` (NFE), the median wall
time after warm-up, the median time of one `f`, the overhead `time / (NFE · t(f))` (1.0 is the floor:
nothing but `f`) and our time ÷ torchdeq's for the same method, measured in the same run. Both sides
stop at the same relative tolerance (ours `‖f(z) − z‖ / ‖z‖` per sample, torchdeq's
`‖f(z) − z‖ / ‖f(z)‖` batch-max) with the same `max_iter`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import implicitlayers as il

try:
    from torchdeq.solver import get_solver as _torchdeq_solver
except ImportError:  # the `bench` extra is optional: skip torchdeq's rows without it
    _torchdeq_solver = None


class _Counted:
    """Counts batched calls of a map (NFE), the same way for both libraries."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.f, self.count = f, 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.f(z)


def tanh_linear_cell(device: torch.device, big: bool) -> tuple[Callable, torch.Tensor]:
    """`f(z) = tanh(W z + U x)` with `W` of spectral radius ≈ 0.9 (contractive after tanh)."""
    d, batch = (1024, 256) if big else (256, 64)
    g = torch.Generator().manual_seed(0)
    W = (0.9 * torch.randn(d, d, generator=g) / d**0.5).to(device)
    U = (torch.randn(d, d, generator=g) / d**0.5).to(device)
    x = torch.randn(batch, d, generator=g).to(device)
    injection = x @ U.T  # DEQs compute the input injection once per forward

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(injection, z, W.T))

    return f, torch.zeros(batch, d, device=device)


def conv_cell(device: torch.device, big: bool) -> tuple[Callable, torch.Tensor]:
    """`f(z) = tanh(GroupNorm(conv(z)) · 0.3 + conv(x))`, a small DEQ image cell."""
    channels, side, batch = (64, 32, 32) if big else (16, 16, 16)
    torch.manual_seed(0)
    conv_z = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    conv_x = torch.nn.Conv2d(3, channels, 3, padding=1).to(device)
    norm = torch.nn.GroupNorm(4, channels, affine=False).to(device)
    x = torch.randn(batch, 3, side, side, device=device)
    with torch.no_grad():
        injection = conv_x(x)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.3 * norm(conv_z(z)) + injection)

    return f, torch.zeros(batch, channels, side, side, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(solver: il.solvers.SolverConfig) -> Callable:
    def run(f: Callable, z0: torch.Tensor) -> torch.Tensor:
        return il.fixed_point(f, z0, solver=solver).value

    return run


def _theirs(name: str, **options) -> Callable | None:
    if _torchdeq_solver is None:
        return None
    solve = _torchdeq_solver(name)

    def run(f: Callable, z0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return solve(f, z0, **options)[0]

    return run


def _methods(tol: float, max_iter: int) -> list[tuple[str, Callable, Callable | None]]:
    common = dict(tol=tol, max_iter=max_iter, stop="rel", on_failure="ignore")
    theirs = dict(tol=tol, max_iter=max_iter, stop_mode="rel")
    return [
        ("fixed_point_iter", _ours(il.FixedPointIteration(**common)), _theirs("fixed_point_iter", **theirs)),
        ("anderson", _ours(il.Anderson(m=6, lam=1e-4, **common)), _theirs("anderson", m=6, lam=1e-4, **theirs)),
        ("broyden", _ours(il.Broyden(**common)), _theirs("broyden", **theirs)),
    ]


def _residual(f: Callable, z: torch.Tensor) -> float:
    """The batch-max relative residual of a returned solution, to check both sides solved it."""
    with torch.no_grad():
        r = (f(z) - z).flatten(1).norm(dim=1) / (z.flatten(1).norm(dim=1) + 1e-8)
    return float(r.max())


def bench_cell(name: str, f: Callable, z0: torch.Tensor, args: argparse.Namespace) -> None:
    device = z0.device
    with torch.no_grad():
        t_f = _median_time(lambda: f(z0 + 0.1), device, max(args.repeats, 20))
    print(f"\n{name}: z {tuple(z0.shape)}, t(f) = {t_f * 1e3:.3f} ms, tol {args.tol:g} (rel), max_iter {args.max_iter}")
    print(f"{'solver':<18}{'lib':<10}{'NFE':>5}{'time ms':>10}{'overhead':>10}{'residual':>10}{'ours/theirs':>13}")
    for method, ours, theirs in _methods(args.tol, args.max_iter):
        times = {}
        for lib, run in (("torchdeq", theirs), ("ours", ours)):
            if run is None:
                continue
            counted = _Counted(f)
            z = run(counted, z0)
            nfe = counted.count
            t = _median_time(lambda: run(f, z0), device, args.repeats)
            times[lib] = t
            ratio = f"{t / times['torchdeq']:.2f}" if lib == "ours" and "torchdeq" in times else ""
            print(f"{method:<18}{lib:<10}{nfe:>5}{t * 1e3:>10.2f}{t / (nfe * t_f):>10.2f}"
                  f"{_residual(f, z):>10.1e}{ratio:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per row (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--cells", default="tanh,conv", help="comma-separated subset of tanh,conv")
    args = parser.parse_args()
    device = torch.device(args.device)
    big = device.type == "cuda"
    if _torchdeq_solver is None:
        print("torchdeq is not installed (pip install 'implicitlayers[bench]'); its rows are skipped.")
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    cells = {"tanh": ("tanh-linear", tanh_linear_cell), "conv": ("conv", conv_cell)}
    for key in args.cells.split(","):
        label, build = cells[key]
        f, z0 = build(device, big)
        bench_cell(label, f, z0, args)


if __name__ == "__main__":
    main()
