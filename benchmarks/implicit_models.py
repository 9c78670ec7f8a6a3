"""Implicit models at equal parameters on digits: DEQ (IFT, phantom) against weight-tied models with and without
distinct sparse masks — the cost of a training step, and the masked kernel (dense-masked against `torch.sparse`).

Run: `python benchmarks/implicit_models.py [--hidden 128] [--batch 32] [--repeats 20] [--device cpu|cuda] [--threads 1] [--fast]`

The models are those of `examples/weight_tied_vs_deq.py` (imported from it): injection, the cell
`tanh(W z + u)`, head, one initialisation, so every model has the same parameters. Two tables:

1. **Masked kernel.** One masked application `z ↦ z (W ⊙ M)ᵀ`, forward and backward (gradients for
   `W` and `z`), timed as the fastest of `--repeats` round-robin runs (see `round_robin`): `dense` forms `W ⊙ M` and calls
   `F.linear` (what `WeightTied` does); `coo` / `csr` gather the kept entries of `W` into a
   `torch.sparse` matrix with the mask's fixed indices and multiply with it. Ratios are against
   `dense` in the same run. Densities 0.05 (to show where sparse formats could start to pay) and
   the supported 0.25 / 0.5 / 0.75.
2. **Training step** (injection, body, head, cross-entropy, backward; `zero_grad` excluded), at the
   initial parameters, on the first `--batch` digits: fastest time (round-robin) and its ratio to the
   DEQ with IFT; forward NFE (the DEQ's batch NFE, L for weight-tied models); the peak memory of the
   step (CUDA: `max_memory_allocated`; CPU: the peak of the PyTorch profiler's allocation events, as
   in `benchmarks/backward.py`) and the bytes autograd saves for the backward pass (as in
   `benchmarks/deq.py`). At initialisation the DEQ converges in few iterations; during training its
   NFE grows (see the example's time per epoch, which includes that growth).

`--fast` shrinks everything for the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time
import warnings
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path: pathlib.Path) -> ModuleType:
    """Import a sibling script by path (benchmarks and examples are scripts, not a package)."""
    name = f"_implicit_models_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


example = _load(ROOT / "examples" / "weight_tied_vs_deq.py")
_deq_bench = _load(ROOT / "benchmarks" / "deq.py")  # saved_bytes, peak_cuda: the same memory measures as the DEQ benchmark
_backward_bench = _load(ROOT / "benchmarks" / "backward.py")  # the CPU step peak from the profiler's allocation events


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest of `repeats` timings of each step, measured in turns so that load drifts hit all alike.

    The minimum, not the median: on a shared, oversubscribed CPU most runs of a step are stretched by
    waiting for a core, by amounts unrelated to the step, and the least disturbed run is the best
    estimate of its cost.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def masked_kernels(weight: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Forward + backward of one masked application in three ways; each returns the output (for checking)."""
    index = mask.nonzero().T  # row-major, hence already coalesced
    rows = torch.bincount(index[0], minlength=mask.shape[0])
    crow = torch.cat([rows.new_zeros(1), rows.cumsum(0)])

    def run(product: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            weight.grad = z.grad = None
            out = product()
            out.backward(torch.ones_like(out))
            return out.detach()

        return step

    def coo() -> torch.Tensor:
        matrix = torch.sparse_coo_tensor(index, weight[mask], mask.shape, is_coalesced=True, check_invariants=False)
        return torch.sparse.mm(matrix, z.T).T

    def csr() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(crow, index[1], weight[mask], mask.shape, check_invariants=False)
        return (matrix @ z.T).T

    return {"dense": run(lambda: F.linear(z, weight * mask)), "coo": run(coo), "csr": run(csr)}


def kernel_table(hidden: int, batch: int, densities: list[float], repeats: int, device: torch.device) -> dict[float, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(hidden, hidden, generator=generator).to(device).requires_grad_()
    z = torch.randn(batch, hidden, generator=generator).to(device).requires_grad_()
    table = {}
    for density in densities:
        mask = (torch.rand(hidden, hidden, generator=generator) < density).to(device)
        steps = masked_kernels(weight, mask, z)
        reference = steps["dense"]()
        for step in steps.values():  # the three compute the same product
            torch.testing.assert_close(step(), reference, rtol=1e-4, atol=1e-4)
        table[density] = round_robin(steps, repeats, device)
    return table


def step_table(hidden: int, batch: int, repeats: int, device: torch.device) -> dict[str, dict]:
    digits = load_digits()
    x = torch.tensor(digits.data[:batch] / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(digits.target[:batch], device=device)
    models = {spec.label: example.Classifier(spec, hidden, seed=0).to(device) for spec in example.COMPARISON}

    def step(model) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return run

    rows: dict[str, dict] = {}
    for label, model in models.items():
        model.train()
        run = step(model)
        run()
        nfe = model.body.nfe if hasattr(model.body, "nfe") else model.body.depth
        if device.type == "cuda":
            peak = _deq_bench.peak_cuda(model, model.features, x, y, device) * 2**20
        else:
            peak = _backward_bench._step_peak_cpu(run)
        rows[label] = {"nfe": nfe, "peak": peak, "saved": _deq_bench.saved_bytes(model, model.features, x, y)}
    for label, seconds in round_robin({label: step(model) for label, model in models.items()}, repeats, device).items():
        rows[label]["seconds"] = seconds
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kernel-hidden", type=int, nargs="+", default=[128, 512], help="sizes of the masked-kernel table")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: small matrices on a shared CPU)")
    parser.add_argument("--fast", action="store_true", help="tiny sizes and few repeats, for the test suite")
    args = parser.parse_args(argv)
    if args.fast:
        args.hidden, args.batch, args.kernel_hidden, args.repeats = 16, 8, [32], 2
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        densities = [0.05, 0.25, 0.5, 0.75]
        kernels = {h: kernel_table(h, args.batch, densities, args.repeats, device) for h in args.kernel_hidden}
        steps = step_table(args.hidden, args.batch, args.repeats, device)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the test suite
    _print(kernels, steps, args, device)
    return {"kernels": kernels, "steps": steps}


def _print(kernels: dict, steps: dict, args: argparse.Namespace, device: torch.device) -> None:
    print(f"masked application z (W ⊙ M)ᵀ, forward + backward, batch {args.batch}, {device}, {args.threads} thread(s); fastest µs (ratio to dense)")
    print(f"{'hidden':>6s} {'density':>7s} {'dense':>10s} {'coo':>18s} {'csr':>18s}")
    for hidden, table in kernels.items():
        for density, t in table.items():
            cells = "".join(f"{1e6 * t[k]:>10.0f} ({t[k] / t['dense']:4.1f}×)" for k in ("coo", "csr"))
            print(f"{hidden:6d} {density:7.2f} {1e6 * t['dense']:10.0f} {cells}")
    mib = 2**20
    base = steps["DEQ (IFT)"]
    print(f"\ntraining step at initialisation, hidden {args.hidden}, batch {args.batch}, equal parameters")
    print(f"{'model':16s} {'ms / step':>10s} {'÷ DEQ (IFT)':>12s} {'forward NFE':>12s} {'peak (MiB)':>11s} {'saved (MiB)':>12s}")
    for label, r in steps.items():
        print(f"{label:16s} {1e3 * r['seconds']:10.2f} {r['seconds'] / base['seconds']:11.2f}× {r['nfe']:12d} {r['peak'] / mib:11.2f} {r['saved'] / mib:12.2f}")


if __name__ == "__main__":
    main()
