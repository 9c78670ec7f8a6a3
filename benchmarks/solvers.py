"""Forward fixed-point solvers, ours against torchdeq's, on two DEQ-style cells.

Run: `python benchmarks/solvers.py [--repeats 7] [--device cpu|cuda] [--threads N] [--max-iter 50] [--tol 1e-4]`
(`pip install torchdeq`, or the `bench` extra, for the comparison rows). On a shared CPU, `--threads 1`
gives far steadier numbers: a multi-threaded kernel waits for its slowest thread.

Cells (bigger on CUDA):

- `tanh-linear`: `f(z) = tanh(W z + U x)`, `d = 256`, `B = 64` (CUDA: `d = 1024`, `B = 256`).
- `conv`: `f(z) = tanh(GroupNorm(conv(z)) · 0.3 + conv(x))`-style cell with 16 channels on 16×16, `B = 16`
  (CUDA: 64 channels on 32×32, `B = 32`).

For each solver the table prints the number of batched evaluations of `f` (NFE), the median wall
time after warm-up, the median time of one `f`, the overhead `time / (NFE · t(f))` (1.0 is the floor:
nothing but `f`) and our time ÷ torchdeq's for the same method, measured in the same run. Both sides
stop at the same relative tolerance (ours `‖f(z) − z‖ / ‖z‖` per sample, torchdeq's
`‖f(z) − z‖ / ‖f(z)‖` batch-max) with the same `max_iter`; Anderson uses `m = 6`, `lam = 1e-4` on both
sides; our Broyden (type II, see `il.Broyden`) keeps its default `memory = 40` pairs where torchdeq's
(type I) keeps all `max_iter`. The
residual column is the batch-max relative residual of what each returned. The `floor` rows are
`anderson_floor` and `broyden_floor`: a bare Anderson of the same `m` and `lam` and a bare Broyden of
the same memory, run for our number of evaluations without any stopping test or bookkeeping (no eager
implementation of the method can do much less).

Protocol: the libraries take turns (so both see the same machine load), and each timed run follows
an untimed run of the same solver, so each is measured in its own steady state, as in a training
loop that calls one library. Timing them strictly back to back instead charges each library for the
other's freed memory (on the CPU, glibc hands it back to the system and `f`'s next temporaries pay a
page fault per 4 KiB): for our Anderson on the conv cell that adds about 0.7–1 ms per solve.
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


def _timed(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


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
        ("anderson", _ours(il.Anderson(memory=6, lam=1e-4, **common)), _theirs("anderson", m=6, lam=1e-4, **theirs)),
        ("broyden", _ours(il.Broyden(**common)), _theirs("broyden", **theirs)),
    ]


def anderson_floor(z0: torch.Tensor, m: int = 6, lam: float = 1e-4) -> Callable:
    """A bare Anderson (the same mixing as ours) that runs a fixed number of evaluations: history
    allocated once for every call, one Gram row per step, no stopping test, no per-sample bookkeeping,
    no validation.

    No eager implementation of Anderson with this `m` can do much less per evaluation, so its time is
    the floor against which our overhead (and the target) can be judged. Returns `run(f, z0, evaluations)`.
    """
    batch, dim = z0.shape[0], z0[0].numel()
    Y, G = z0.new_empty(batch, m, dim), z0.new_empty(batch, m, dim)
    H = z0.new_zeros(batch, m, m)
    ones = [z0.new_ones(batch, n, 1) for n in range(m + 1)]
    eye = lam * torch.eye(m, dtype=z0.dtype, device=z0.device)

    def run(f: Callable, z0: torch.Tensor, evaluations: int) -> torch.Tensor:
        with torch.no_grad():
            w = z0.reshape(batch, dim)
            for k in range(evaluations):
                r = w - f(w.view(z0.shape)).view(batch, dim)
                slot, n = k % m, min(k + 1, m)
                G[:, slot].copy_(r)
                torch.sub(w, r, out=Y[:, slot])
                row = torch.bmm(G[:, slot : slot + 1], G[:, :n].mT)
                H[:, slot : slot + 1, :n] = row
                H[:, :n, slot : slot + 1] = row.mT
                gram = H[:, :n, :n]
                ridge = torch.diagonal(gram, dim1=1, dim2=2).amax(1)[:, None, None]
                y, _ = torch.linalg.solve_ex(torch.addcmul(gram, ridge, eye[:n, :n]), ones[n])
                w = torch.bmm((y / y.sum(1, keepdim=True)).mT, Y[:, :n]).squeeze(1)
        return w.view(z0.shape)

    return run


def broyden_floor(z0: torch.Tensor, memory: int = 40) -> Callable:
    """A bare type-II Broyden (the same compact limited-memory update as ours, `H = I + Z N⁻¹ Yᵀ` with
    `N⁻¹` grown one column a step, buffers allocated once) that runs a fixed number of evaluations: two
    passes over the pairs per step, no stopping test, no per-sample bookkeeping, no safeguard, and no
    memory wrap (run it for fewer evaluations than `memory`). Returns `run(f, z0, evaluations)`.
    """
    batch, dim = z0.shape[0], z0[0].numel()
    Z, Y = z0.new_empty(batch, memory, dim), z0.new_empty(batch, memory, dim)
    N_inv = z0.new_zeros(batch, memory, memory)

    def run(f: Callable, z0: torch.Tensor, evaluations: int) -> torch.Tensor:
        with torch.no_grad():
            N_inv.zero_()
            w = z0.reshape(batch, dim)
            r = w - f(w.view(z0.shape)).view(batch, dim)
            Hr, coeff = r, r.new_zeros(batch, 0)
            for n in range(min(evaluations - 1, memory)):
                ds = -Hr
                w = w + ds
                r_new = w - f(w.view(z0.shape)).view(batch, dim)
                y = torch.sub(r_new, r, out=Y[:, n])
                torch.sub(ds, y, out=Z[:, n])
                c_new = torch.bmm(r_new[:, None], Y[:, :n].mT)[:, 0]
                inv_d = torch.linalg.vecdot(y, y).reciprocal_()
                if n:
                    N_inv[:, :n, n] = torch.bmm(N_inv[:, :n, :n], (c_new - coeff)[:, :, None])[:, :, 0] * -inv_d[:, None]
                N_inv[:, n, n] = inv_d
                coeff = torch.cat((c_new, torch.linalg.vecdot(y, r_new)[:, None]), 1)
                c = torch.bmm(N_inv[:, : n + 1, : n + 1], coeff[:, :, None])[:, :, 0]
                Hr = torch.baddbmm(r_new[:, None], c[:, None], Z[:, : n + 1])[:, 0]
                r = r_new
        return w.view(z0.shape)

    return run


def _residual(f: Callable, z: torch.Tensor) -> float:
    """The batch-max relative residual of a returned solution, to check both sides solved it."""
    with torch.no_grad():
        r = (f(z) - z).flatten(1).norm(dim=1) / (z.flatten(1).norm(dim=1) + 1e-8)
    return float(r.max())


def bench_cell(name: str, f: Callable, z0: torch.Tensor, args: argparse.Namespace) -> None:
    """One table: every method, both libraries, timed in alternation so that both see the same machine load."""
    device = z0.device
    print(f"\n{name}: z {tuple(z0.shape)}, tol {args.tol:g} (rel), max_iter {args.max_iter}, "
          f"median of {args.repeats} after warm-up")
    print(f"{'solver':<18}{'lib':<10}{'NFE':>5}{'time ms':>10}{'t(f) ms':>9}{'overhead':>10}{'residual':>10}{'ours/theirs':>13}")
    z_probe = z0 + 0.1
    for method, ours, theirs in _methods(args.tol, args.max_iter):
        runs = [(lib, run) for lib, run in (("torchdeq", theirs), ("ours", ours)) if run is not None]
        nfe, residual = {}, {}
        for lib, run in list(runs):
            counted = _Counted(f)
            residual[lib] = _residual(f, run(counted, z0))
            nfe[lib] = counted.count
            if method in ("anderson", "broyden") and lib == "ours":  # the floor, at our number of evaluations
                floor, evals = (anderson_floor if method == "anderson" else broyden_floor)(z0), nfe["ours"]
                runs.append(("floor", lambda f, z0: floor(f, z0, evals)))
                nfe["floor"], residual["floor"] = evals, _residual(f, floor(f, z0, evals))
            for _ in range(2):  # warm-up: first calls pay for allocations and kernel selection
                run(f, z0)
        times: dict[str, list[float]] = {lib: [] for lib, _ in runs}
        t_f: list[float] = []
        with torch.no_grad():
            for _ in range(args.repeats):
                t_f.append(min(_timed(lambda: f(z_probe), device) for _ in range(5)))
                for lib, run in runs:
                    # One untimed run first: each library is timed in its own steady state, not in the
                    # allocator state the other left (on the CPU, memory one frees is handed back to
                    # the system, and the next solve pays a page fault per 4 KiB it touches again).
                    run(f, z0)
                    times[lib].append(_timed(lambda: run(f, z0), device))
        tf = statistics.median(t_f)
        med = {lib: statistics.median(ts) for lib, ts in times.items()}
        for lib, _ in runs:
            ratio = f"{med[lib] / med['torchdeq']:.2f}" if lib != "torchdeq" and "torchdeq" in med else ""
            print(f"{method:<18}{lib:<10}{nfe[lib]:>5}{med[lib] * 1e3:>10.2f}{tf * 1e3:>9.3f}"
                  f"{med[lib] / (nfe[lib] * tf):>10.2f}{residual[lib]:>10.1e}{ratio:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per row (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--cells", default="tanh,conv", help="comma-separated subset of tanh,conv")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
