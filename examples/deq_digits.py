"""A deep equilibrium classifier on scikit-learn's digits, trained with and without Jacobian regularisation.

Run: `python examples/deq_digits.py [--epochs 30] [--hidden 256] [--gamma 10.0] [--out outputs/] [--fast]`

The model is `x ↦ head(z*)` with `z* = tanh(W z* + U x + b)`: the input injection `U x + b` is
computed once per batch, and `il.DEQ` finds the equilibrium with Anderson acceleration and
differentiates it with the implicit function theorem. Two runs from the same initialisation:

1. plain cross-entropy;
2. cross-entropy + γ · ‖∂f/∂z‖_F² / d at `z*` (`il.nn.jacobian_regularizer`, Bai et al. 2021), which keeps
   the cell well conditioned so the solver needs fewer evaluations (forward NFE) at similar accuracy.

It prints the held-out test accuracy (fixed split: 25 % test, `random_state=0`) and the forward
NFE of both runs, and saves `deq_digits.png` (training loss, test accuracy, forward NFE per epoch).
`--fast` trains on a small subset for two epochs (for the test suite).

Measured with the defaults (30 epochs, hidden 256, batch 32, γ = 10, one thread, 2-core CPU), seeds
0 / 1 / 2: plain 97.56 / 98.22 / 97.78 % test accuracy at a mean training NFE of 44.5 / 48.0 / 45.9 in
the last epoch (cap 50); Jacobian-regularised 96.22 / 96.89 / 97.11 % at 12.3 / 11.0 / 11.1, every
test sample converged. (γ = 5 cut the NFE in two seeds out of three only.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `examples` importable
    sys.path.insert(0, str(ROOT))
from examples._common import digits_dataset, pinned_threads, pyplot, save_figure  # noqa: E402


class TanhCell(torch.nn.Module):
    """`f(z, u) = tanh(W z + u)`; `u` is the input injection, computed once per batch outside the solve."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.normal_(self.linear.weight, std=0.5 / hidden**0.5)  # start contractive: ‖W‖ ≈ 1

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


class DEQClassifier(torch.nn.Module):
    def __init__(self, hidden: int, solver: il.Anderson) -> None:
        super().__init__()
        self.inject = torch.nn.Linear(64, hidden)
        self.deq = il.DEQ(TanhCell(hidden), solver=solver)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, the equilibrium `z*` and the injection `u` (the regulariser re-evaluates the cell at `z*`)."""
        u = self.inject(x)
        z = self.deq(u)
        return self.head(z), z, u


def load_data(fast: bool) -> tuple[torch.Tensor, ...]:
    x, y = digits_dataset()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    if fast:
        x_train, y_train, x_test, y_test = x_train[:256], y_train[:256], x_test[:128], y_test[:128]
    return x_train, y_train, x_test, y_test


@torch.no_grad()
def evaluate(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Test accuracy, mean solver iterations per sample, and the fraction of samples that converged.

    The mean per-sample iteration count (`SolveInfo.nstep`) says more than the batch's NFE, which is
    set by its slowest sample.
    """
    model.eval()
    logits, _, _ = model(x)
    info = model.deq.last_info
    return (
        float((logits.argmax(1) == y).float().mean()),
        float(info.nstep.float().mean()),
        float(info.converged.float().mean()),
    )


def train(
    gamma: float, data: tuple[torch.Tensor, ...], *, epochs: int, hidden: int, batch_size: int, lr: float, seed: int, label: str
) -> dict:
    """One training run; returns its per-epoch history and final test metrics."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    # on_failure="ignore": an unregularised DEQ may hit the cap late in training; that is what the
    # NFE plot shows, and the converged fraction is reported rather than warned about every batch.
    solver = il.Anderson(memory=5, tol=1e-4, max_iter=50, on_failure="ignore")
    model = DEQClassifier(hidden, solver)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(x_train) // batch_size))
    history: dict[str, list[float]] = {"loss": [], "train_nfe": [], "test_accuracy": [], "test_nfe": []}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=label, unit="epoch")
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses, nfes = [], []
        for i in range(0, len(x_train), batch_size):
            idx = order[i : i + batch_size]
            logits, z, u = model(x_train[idx])
            nfes.append(model.deq.nfe)
            loss = F.cross_entropy(logits, y_train[idx])
            if gamma > 0:
                cell = model.deq.cell
                loss = loss + gamma * il.nn.jacobian_regularizer(lambda z_: cell(z_, u), z, normalize=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        accuracy, test_nfe, _ = evaluate(model, x_test, y_test)
        history["loss"].append(sum(losses) / len(losses))
        history["train_nfe"].append(sum(nfes) / len(nfes))
        history["test_accuracy"].append(accuracy)
        history["test_nfe"].append(test_nfe)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{accuracy:.3f}", nfe=f"{history['train_nfe'][-1]:.1f}")
    accuracy, test_nfe, converged = evaluate(model, x_test, y_test)
    return {
        "history": history,
        "test_accuracy": accuracy,
        "test_nfe": test_nfe,
        "test_converged": converged,
        "seconds": time.perf_counter() - start,
        "model": model,
    }


def plot(runs: dict[str, dict], path: pathlib.Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, run in runs.items():
        h = run["history"]
        epochs = range(1, len(h["loss"]) + 1)
        axes[0].plot(epochs, h["loss"], label=label)
        axes[1].plot(epochs, h["test_accuracy"], label=label)
        axes[2].plot(epochs, h["train_nfe"], label=label)
    for ax, title in zip(axes, ["training loss (incl. regulariser)", "test accuracy", "forward NFE (mean per training batch)"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    """Train both runs, print and plot them; returns `{"plain": ..., "jacobian": ..., "plot": path}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gamma", type=float, default=10.0, help="weight of the Jacobian regulariser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--fast", action="store_true", help="tiny run (subset, 2 epochs) for the test suite")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the matrices are small: 1 is fastest)")
    args = parser.parse_args(argv)
    with pinned_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    epochs = 2 if args.fast else args.epochs
    hidden = 32 if args.fast else args.hidden
    data = load_data(args.fast)
    options = dict(epochs=epochs, hidden=hidden, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    runs = {
        "plain": train(0.0, data, label="plain", **options),
        "jacobian": train(args.gamma, data, label=f"jacobian γ={args.gamma:g}", **options),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deq_digits.png"
    plot(runs, path)
    for label, run in runs.items():
        print(
            f"{label:>9s}: test accuracy {100 * run['test_accuracy']:.2f}%, mean solver iterations per test sample {run['test_nfe']:.1f} "
            f"({100 * run['test_converged']:.0f}% converged), mean training NFE in the last epoch "
            f"{run['history']['train_nfe'][-1]:.1f}, {run['seconds']:.0f} s"
        )
    print(f"saved {path}")
    return {**runs, "plot": path}


if __name__ == "__main__":
    main()
