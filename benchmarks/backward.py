"""Cost of the backward pass of a DEQ-like layer: IFT backward ÷ forward time, and training-step memory
as the forward iteration count grows (IFT flat, `Unroll` growing).

    python benchmarks/backward.py                       # d=256, B=64, float32, max_iter 10 20 40 80
    python benchmarks/backward.py --dim 64 --batch 16 --iters 10 20 --repeats 3    # quick

The cell is `z = tanh(W z + U x + b)` with `‖W‖₂ = 0.9` (a contraction, as a spectrally normalised DEQ).

**Memory, measured two ways** (CPU tensors have no allocator statistics like `torch.cuda.max_memory_allocated`):

1. *Saved for backward*: the bytes of the distinct tensor storages that autograd saves during the
   forward pass (`torch.autograd.graph.saved_tensors_hooks`), i.e. the activation memory that a
   training step keeps alive until `backward()`. This is what unrolling makes grow with the iterations.
2. *Step peak*: the peak of the running sum of every allocation and free that the PyTorch profiler
   records (`torch.profiler.profile(profile_memory=True)`, its raw allocator events) over one whole
   training step, forward + backward, relative to the memory held when the step starts. It includes
   the solvers' buffers (e.g. Anderson's history) and the backward pass's temporaries. On CUDA the
   script reports `torch.cuda.max_memory_allocated` instead.

Timing uses the median over `--repeats` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch
from torch import nn

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(ROOT))
from benchmarks._common import median_time, saved_tensor_bytes, step_peak_cuda, timed  # noqa: E402
from benchmarks._common import step_peak_cpu as _step_peak_cpu  # noqa: E402  (the name benchmarks/implicit_models.py reads)


class TanhCell(nn.Module):
    """`(z, x) ↦ tanh(W z + U x + b)` with `W` scaled once to spectral norm 0.9."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(dim, dim, generator=generator) / dim**0.5
        self.W = nn.Parameter(0.9 * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(dim, dim, generator=generator) / dim**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, generator=generator))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def make_layer(cell: TanhCell, dim: int, solver, backward) -> il.ImplicitLayer:
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, cell, (z_, x_))])
    return il.ImplicitLayer(problem, [x_], [z_], solver=solver, backward=backward, init={"z": torch.zeros(dim)})


def time_ift(cell, x, cotangent, dim: int, repeats: int, tol: float) -> dict:
    """Median forward and backward wall time of the exact IFT at a realistic tolerance."""
    layer = make_layer(cell, dim, il.Anderson(tol=tol, max_iter=100), il.IFT())
    forward, backward = [], []
    for run in range(repeats + 1):
        cell.zero_grad(set_to_none=True)
        out: list[torch.Tensor] = []
        seconds_forward = timed(lambda: out.append(layer(x)[0]), x.device)
        seconds_backward = timed(lambda: (out[0] * cotangent).sum().backward(), x.device)
        if run:  # the first run warms up
            forward.append(seconds_forward)
            backward.append(seconds_backward)
    info = layer.last_solution.info["block 0 (z)"]
    return {
        "forward_s": statistics.median(forward),
        "backward_s": statistics.median(backward),
        "nfe": info.nfe,
        "max_residual": float(info.residual.max()),
    }


def step_memory(cell, x, cotangent, dim: int, max_iter: int, backward, repeats: int) -> dict:
    """Memory and time of one training step whose forward runs exactly `max_iter` iterations."""
    # A tolerance out of reach: every forward runs all max_iter iterations (failure deliberately ignored).
    solver = il.Anderson(tol=1e-30, max_iter=max_iter, on_failure="ignore")
    if isinstance(backward, il.IFT):  # a fixed backward solve, so only the forward iterations vary
        backward = il.IFT(solver=il.Anderson(tol=1e-5, max_iter=50, on_failure="ignore"))
    layer = make_layer(cell, dim, solver, backward)

    def step() -> None:
        cell.zero_grad(set_to_none=True)
        (z,) = layer(x)
        (z * cotangent).sum().backward()

    cell.zero_grad(set_to_none=True)
    (z,), saved = saved_tensor_bytes(lambda: layer(x))
    (z * cotangent).sum().backward()
    del z
    peak = step_peak_cuda(step, x.device) if x.device.type == "cuda" else _step_peak_cpu(step)
    return {"saved": saved, "peak": peak, "step_s": median_time(step, repeats, warmup=0, device=x.device)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="state and input dimension d")
    parser.add_argument("--batch", type=int, default=64, help="batch size B")
    parser.add_argument("--iters", type=int, nargs="+", default=[10, 20, 40, 80], help="forward max_iter values")
    parser.add_argument("--tol", type=float, default=1e-4, help="forward tolerance of the timing run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads; 1 by default because on a shared CPU OpenMP contention dominates small ops"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    cell = TanhCell(args.dim, gen).to(device=device, dtype=dtype)
    x = torch.randn(args.batch, args.dim, generator=gen).to(device=device, dtype=dtype)
    cotangent = torch.randn(args.batch, args.dim, generator=gen).to(device=device, dtype=dtype)

    print(f"DEQ tanh cell, d={args.dim}, B={args.batch}, {args.dtype}, {device}, {torch.get_num_threads()} threads")
    t = time_ift(cell, x, cotangent, args.dim, args.repeats, args.tol)
    print(
        f"\nIFT at tol={args.tol:g} (Anderson, forward nfe={t['nfe']}, max residual {t['max_residual']:.2g}):\n"
        f"  forward {1e3 * t['forward_s']:.2f} ms, backward {1e3 * t['backward_s']:.2f} ms, "
        f"backward / forward = {t['backward_s'] / t['forward_s']:.2f}"
    )

    peak_label = "step peak (CUDA max allocated)" if device.type == "cuda" else "step peak (profiler)"
    print(
        "\nOne training step (forward + backward) with the forward forced to run max_iter iterations.\n"
        "saved = bytes of distinct storages autograd saves in the forward (saved_tensors_hooks);\n"
        f"{peak_label} = peak of the running sum of allocations over the whole step.\n"
    )
    header = f"{'max_iter':>8} | {'IFT saved':>10} | {'IFT peak':>10} | {'IFT step':>9} | {'Unroll saved':>12} | {'Unroll peak':>11} | {'Unroll step':>11}"
    print(header)
    print("-" * len(header))
    mib = 2.0**20
    for n in args.iters:
        ift = step_memory(cell, x, cotangent, args.dim, n, il.IFT(), args.repeats)
        unroll = step_memory(cell, x, cotangent, args.dim, n, il.Unroll(), args.repeats)
        print(
            f"{n:>8} | {ift['saved'] / mib:>7.2f} MiB | {ift['peak'] / mib:>6.2f} MiB | {1e3 * ift['step_s']:>6.1f} ms | "
            f"{unroll['saved'] / mib:>9.2f} MiB | {unroll['peak'] / mib:>7.2f} MiB | {1e3 * unroll['step_s']:>8.1f} ms"
        )


if __name__ == "__main__":
    main()
