"""`il.DEQ` against torchdeq: one DEQ training step on scikit-learn's digits, same cell, same tolerances.

Run: `python benchmarks/deq.py [--hidden 256] [--batch 128] [--repeats 15] [--tol 1e-4] [--equal-accuracy] [--device cpu|cuda] [--threads N]`

The model is the digits classifier of `examples/deq_digits.py`: input injection `u = U x`
(64 → hidden), cell `f(z, u) = tanh(W z + u)` with `W` scaled to spectral norm 0.9, head
`Linear(hidden → 10)`, cross-entropy loss. Both libraries solve with Anderson (m = 5, ridge 1e-4,
relative tolerance `--tol`, at most 50 iterations) and differentiate with the IFT, whose adjoint
system each solves with Anderson to relative tolerance `--tol` (at most 100 iterations). The table reports:

- the max relative difference of the fixed points, `max_b ‖z_ours − z_torchdeq‖ / ‖z_torchdeq‖`;
- the max relative difference of the IFT gradients of the loss w.r.t. every parameter, and of both
  against a tight-tolerance float64 reference of our own (to show which side is closer);
- the median time of a training step (injection, forward solve, head, loss and IFT backward;
  `zero_grad` excluded), ours ÷ torchdeq's, measured round-robin in one process. Part of the
  difference is the iteration count: torchdeq's Anderson starts with two plain steps and stops when
  the *worst* sample converges, ours freezes each sample at its own tolerance;
- with `--equal-accuracy` (and torchdeq installed), the same comparison at equal gradient error: our
  forward and backward tolerances are tightened together down the ladder `--tol` × 1, 1/2, 1/5, 1/10,
  1/20, 1/50, 1/100 until our gradient error against the float64 reference is at most torchdeq's at
  `--tol`; that setting is timed in the same round-robin as the others, and both ratios are printed
  (equal tolerance, equal gradient error). If no rung reaches torchdeq's error the last one is timed
  and the line says so;
- the memory autograd keeps for the backward pass (bytes of the saved tensors, distinct storages), for
  the DEQ (IFT) and for the same cell unrolled to depth NFE with plain backprop. On CUDA the peak
  allocated memory of the step is printed too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import implicitlayers as il
from implicitlayers.models.weight_tied import WeightTied

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(ROOT))
from benchmarks._common import digits_dataset, round_robin, saved_tensor_bytes, step_peak_cuda  # noqa: E402

try:
    from torchdeq import get_deq as _torchdeq_get_deq
except ImportError:  # the `bench` extra is optional; without it only our rows are printed
    _torchdeq_get_deq = None


class Model(torch.nn.Module):
    """Injection, tanh cell and head; the solve is delegated to `deq_forward`."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inject = torch.nn.Linear(64, hidden)
        self.W = torch.nn.Linear(hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, 10)
        with torch.no_grad():
            self.W.weight.mul_(0.9 / torch.linalg.matrix_norm(self.W.weight, 2))

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + u)


LADDER = (1, 2, 5, 10, 20, 50, 100)  # --equal-accuracy divides --tol by each in turn


def make_ours(model: Model, tol: float) -> Callable[[torch.Tensor], torch.Tensor]:
    deq = il.DEQ(
        model.cell,
        solver=il.Anderson(memory=5, lam=1e-4, tol=tol, max_iter=50, on_failure="ignore"),
        backward=il.IFT(solver=il.Anderson(memory=5, lam=1e-4, tol=tol, max_iter=100, on_failure="ignore")),
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = deq(model.inject(x))
        forward.nfe = deq.nfe
        return z

    forward.deq = deq
    return forward


def make_torchdeq(model: Model, tol: float) -> Callable[[torch.Tensor], torch.Tensor]:
    deq = _torchdeq_get_deq(
        f_solver="anderson", f_max_iter=50, f_tol=tol, f_stop_mode="rel",
        b_solver="anderson", b_max_iter=100, b_tol=tol, b_stop_mode="rel",
        ift=True, n_states=1,
    )
    deq.train()

    def forward(x: torch.Tensor) -> torch.Tensor:
        u = model.inject(x)
        z_out, info = deq(lambda z: model.cell(z, u), torch.zeros_like(u), solver_kwargs={"m": 5, "lam": 1e-4})
        forward.nfe = int(info["nstep"].max())
        return z_out[-1]

    return forward


def match_gradient_error(model: Model, x, y, g_ref: list[torch.Tensor], target: float, tol: float) -> dict:
    """Tighten our forward and backward tolerances together down `LADDER` until our gradient error
    against `g_ref` is at most `target`; the first rung that reaches it (else the last), its error and NFE."""
    for divisor in LADDER:
        forward = make_ours(model, tol / divisor)
        err = max_rel(grads(model, forward, x, y), g_ref)
        (info,) = forward.deq.layer.backward_info.values()
        if err <= target:
            break
    return {"forward": forward, "tol": tol / divisor, "grad_err": err, "nfe": forward.nfe, "nfe_bwd": info.nfe,
            "reached": err <= target}


def make_unrolled(model: Model, depth: int) -> Callable[[torch.Tensor], torch.Tensor]:
    net = WeightTied(model.cell, depth)
    return lambda x: net(model.inject(x))


def loss_of(model: Model, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.head(forward(x)), y)


def grads(model: Model, forward, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, forward, x, y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).norm() / q.norm().clamp_min(1e-30)) for p, q in zip(a, b))


def step_times(model: Model, forwards: dict[str, Callable], x, y, repeats: int, device: torch.device) -> dict[str, float]:
    """Median time of a training step for each forward, measured round-robin so that load drifts hit all alike."""

    def step(forward: Callable) -> Callable[[], None]:
        return lambda: loss_of(model, forward, x, y).backward()

    steps = {name: step(forward) for name, forward in forwards.items()}
    return round_robin(steps, repeats, warmup=3, device=device, before=lambda: model.zero_grad(set_to_none=True))


def saved_bytes(model: Model, forward, x, y) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass of one step."""
    model.zero_grad(set_to_none=True)
    loss, saved = saved_tensor_bytes(lambda: loss_of(model, forward, x, y))
    loss.backward()
    return saved


def peak_cuda(model: Model, forward, x, y, device: torch.device) -> float | None:
    """Peak CUDA memory of one training step in MiB (`None` on the CPU)."""
    if device.type != "cuda":
        return None
    model.zero_grad(set_to_none=True)
    return step_peak_cuda(lambda: loss_of(model, forward, x, y).backward(), device) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--equal-accuracy", action="store_true",
                        help="also time ours with tolerances tightened until our gradient error matches torchdeq's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    images, labels = digits_dataset()
    # Copies, not views: a view's storage is the whole dataset's, which the saved-bytes count would include.
    x, y = images[: args.batch].clone().to(device), labels[: args.batch].clone().to(device)
    model = Model(args.hidden).to(device)
    ours = make_ours(model, args.tol)
    results: dict = {}

    # A tight float64 reference, to say which library's gradient is closer to the exact one.
    model64 = Model(args.hidden).to(device).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref = make_ours(model64, 1e-10)
    ref.deq.layer.solver = il.Anderson(memory=5, lam=1e-10, tol=1e-10, max_iter=300, on_failure="ignore")
    ref.deq.layer.backward_mode = il.IFT(solver=il.Anderson(memory=5, lam=1e-10, tol=1e-10, max_iter=300, on_failure="ignore"))
    g_ref = [g.float() for g in grads(model64, ref, x.double(), y)]

    g_ours = grads(model, ours, x, y)
    with torch.no_grad():
        z_ours = ours(x)
    nfe = ours.nfe
    results.update(nfe=nfe, grad_err_ours=max_rel(g_ours, g_ref))
    unrolled = make_unrolled(model, nfe)
    forwards = {"ours": ours, "unrolled": unrolled}
    results["saved_ours"] = saved_bytes(model, ours, x, y)
    results["saved_unrolled"] = saved_bytes(model, unrolled, x, y)
    results["peak_ours"] = peak_cuda(model, ours, x, y, device)
    results["peak_unrolled"] = peak_cuda(model, unrolled, x, y, device)

    if _torchdeq_get_deq is not None:
        theirs = forwards["torchdeq"] = make_torchdeq(model, args.tol)
        g_theirs = grads(model, theirs, x, y)
        with torch.no_grad():
            z_theirs = theirs(x)
        results["z_rel_diff"] = float(((z_ours - z_theirs).norm(dim=1) / z_theirs.norm(dim=1)).max())
        results["grad_rel_diff"] = max_rel(g_ours, g_theirs)
        results["grad_err_torchdeq"] = max_rel(g_theirs, g_ref)
        results["nfe_torchdeq"] = theirs.nfe
        results["saved_torchdeq"] = saved_bytes(model, theirs, x, y)
        results["peak_torchdeq"] = peak_cuda(model, theirs, x, y, device)
        if args.equal_accuracy:
            matched = match_gradient_error(model, x, y, g_ref, results["grad_err_torchdeq"], args.tol)
            forwards["ours_eq"] = matched.pop("forward")
            results.update({f"{k}_eq": v for k, v in matched.items()})
    for name, seconds in step_times(model, forwards, x, y, args.repeats, device).items():
        results[f"time_{name}"] = seconds

    _print_table(results, args, device)
    return results


def _print_table(r: dict, args, device: torch.device) -> None:
    mib = 2**20
    print(f"DEQ training step on digits: hidden={args.hidden}, batch={args.batch}, tol={args.tol:g} (rel), device={device}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'':28s}{'time/step (ms)':>16s}{'saved for bwd (MiB)':>22s}{'forward NFE':>13s}{'grad err vs f64':>17s}")
    print(f"{'il.DEQ (IFT)':28s}{1e3 * r['time_ours']:16.2f}{r['saved_ours'] / mib:22.3f}{r['nfe']:13d}{r['grad_err_ours']:17.2e}")
    if "time_ours_eq" in r:
        label = f"il.DEQ (IFT), tol={r['tol_eq']:g}"
        print(f"{label:28s}{1e3 * r['time_ours_eq']:16.2f}{'':>22s}{r['nfe_eq']:13d}{r['grad_err_eq']:17.2e}")
    if "time_torchdeq" in r:
        print(f"{'torchdeq (IFT)':28s}{1e3 * r['time_torchdeq']:16.2f}{r['saved_torchdeq'] / mib:22.3f}"
              f"{r['nfe_torchdeq']:13d}{r['grad_err_torchdeq']:17.2e}")
    print(f"{'unrolled, depth = NFE':28s}{1e3 * r['time_unrolled']:16.2f}{r['saved_unrolled'] / mib:22.3f}{r['nfe']:13d}{'':>17s}")
    if r["peak_ours"] is not None:
        line = f"peak CUDA memory of a step (MiB): il.DEQ {r['peak_ours']:.1f}, unrolled {r['peak_unrolled']:.1f}"
        if r.get("peak_torchdeq") is not None:
            line += f", torchdeq {r['peak_torchdeq']:.1f}"
        print(line)
    print(f"memory: unrolled ÷ il.DEQ = {r['saved_unrolled'] / r['saved_ours']:.1f}×")
    if "time_torchdeq" in r:
        print(f"fixed points: max relative difference {r['z_rel_diff']:.2e}")
        print(f"IFT gradients: max relative difference {r['grad_rel_diff']:.2e}")
        print(f"time per training step: il.DEQ ÷ torchdeq = {r['time_ours'] / r['time_torchdeq']:.2f}× at equal tol (target ≤ 0.5×)")
        if "time_ours_eq" in r:
            reached = "≤" if r["reached_eq"] else "> (not reached: the ladder's last rung)"
            print(f"time per training step: il.DEQ ÷ torchdeq = {r['time_ours_eq'] / r['time_torchdeq']:.2f}× at equal gradient "
                  f"error (ours at tol={r['tol_eq']:g}: {r['grad_err_eq']:.2e} {reached} torchdeq's {r['grad_err_torchdeq']:.2e}; "
                  f"NFE forward {r['nfe_eq']}, backward {r['nfe_bwd_eq']})")
    else:
        print("torchdeq is not installed (pip install implicitlayers[bench]); its rows are skipped.")


if __name__ == "__main__":
    main()
