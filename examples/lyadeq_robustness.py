"""Adversarial robustness of a plain DEQ and of LyaDEQ on scikit-learn's digits.

Run: `python examples/lyadeq_robustness.py [--epochs 10] [--hidden 32] [--cell spectral|free] [--out outputs/] [--fast]`

Three models share the injection `u = U x + b`, the cell `f(z, u) = tanh(W z + u)` (by default with
`‖W‖₂ ≤ 0.9`; `--cell free` leaves `W` unconstrained) and a linear head:

- `DEQ`: `head(z*)` with `z* = f(z*, u)` (`il.DEQ`);
- `LyaDEQ`: `head(Q z*)`, `z*` the equilibrium of the Lyapunov-projected dynamics and `Q` orthogonal
  (`il.LyaDEQ`, see `docs/concepts/lyadeq.md`);
- `LyaDEQ w/o orth`: the same without `Q` (`il.LyaDEQ(..., orthogonal=False)`).

Each is trained twice from the same initialisation: with cross-entropy, and with PGD adversarial
training (`il.robust.adversarial_loss`, ℓ∞ radius `--train-eps`, `--train-steps` PGD steps). The
held-out test set (fixed split: 25 %, `random_state=0`) is then evaluated clean, under FGSM and under
PGD-20 (ℓ∞, random start) at ε ∈ {0.05, 0.1, 0.2} on [0, 1] pixels, with attack gradients by the
implicit function theorem. The column `z0-stable` is the fraction of test predictions unchanged when
the solver starts from a random state `z₀ ~ N(0, I)` instead of 0 (the stability LyaDEQ certifies).

Outputs in `--out`: `lyadeq_robustness.md`, `lyadeq_robustness.csv` and `lyadeq_robustness.png`.
`--fast` trains on a small subset for one epoch and attacks with PGD-3 (for the test suite).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicitlayers as il  # noqa: E402

EPS_LIST = (0.05, 0.1, 0.2)
KINDS = ("DEQ", "LyaDEQ", "LyaDEQ w/o orth")


class TanhCell(torch.nn.Module):
    """`f(z, u) = tanh(W z + u)`; `u` is the input injection, computed once per batch outside the solve.

    With `spectral=True`, `‖W‖₂ ≤ 0.9` (`il.nn.spectral_norm`): the cell stays a contraction through
    training, the DEQ's fixed point is unique and LyaDEQ's IFT is exact (see the concepts page).
    """

    def __init__(self, hidden: int, spectral: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.normal_(self.linear.weight, std=0.5 / hidden**0.5)  # start contractive
        if spectral:
            il.nn.spectral_norm(self.linear, bound=0.9)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


class Classifier(torch.nn.Module):
    """`x ↦ head(core(U x + b))`; the core is a DEQ or a LyaDEQ."""

    def __init__(self, kind: str, hidden: int, seed: int, spectral: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same injection, cell and head for every kind
        self.inject = torch.nn.Linear(64, hidden)
        cell = TanhCell(hidden, spectral)
        self.head = torch.nn.Linear(hidden, 10)
        # The models are attacked, and adversarial inputs can need more iterations; the test accuracy is
        # what matters here, so non-convergence is recorded (see `max_residual`) instead of raised.
        solver = il.Anderson(m=5, tol=1e-4, max_iter=50, on_failure="ignore")
        self.z0_std = 0.0
        start = self._start
        if kind == "DEQ":
            self.core: torch.nn.Module = il.DEQ(cell, solver=solver, z_init=start)
        else:
            lyapunov = il.nn.LyapunovFunction(hidden, (32, 32), eps=1e-2)
            self.core = il.LyaDEQ(
                cell, hidden, lyapunov=lyapunov, alpha=0.1, step=0.5, orthogonal=kind == "LyaDEQ", solver=solver, z_init=start
            )

    def _start(self, u: torch.Tensor) -> torch.Tensor:
        """The solver's start: 0, or `N(0, z0_std²)` for the initial-state perturbation test."""
        return self.z0_std * torch.randn_like(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.core(self.inject(x)))

    def max_residual(self) -> float:
        info = self.core.last_info
        infos = info.values() if isinstance(info, dict) else [info]
        return max(float(i.residual.max()) for i in infos)


def load_data(fast: bool) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    if fast:
        x_train, y_train, x_test, y_test = x_train[:128], y_train[:128], x_test[:32], y_test[:32]
    return x_train, y_train, x_test, y_test


def train(model: Classifier, data: tuple[torch.Tensor, ...], args: argparse.Namespace, adversarial: bool, bar: tqdm) -> None:
    x_train, y_train = data[0], data[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=generator)
        for start in range(0, x_train.shape[0], args.batch_size):
            idx = order[start : start + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if adversarial:
                loss = il.robust.adversarial_loss(
                    model, x, y, eps=args.train_eps, attack="pgd", steps=args.train_steps, step_size=2.5 * args.train_eps / args.train_steps
                )
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.update(1)


def evaluate(model: Classifier, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict[str, float]:
    x_test, y_test = data[2], data[3]
    model.eval()
    with torch.no_grad():
        model.z0_std = 0.0
        clean = model(x_test).argmax(1)
        residual = model.max_residual()
        model.z0_std = 1.0
        perturbed = model(x_test).argmax(1)
        model.z0_std = 0.0
    row = {"clean": float((clean == y_test).float().mean()), "z0-stable": float((clean == perturbed).float().mean())}
    generator = torch.Generator().manual_seed(args.seed)
    fgsm = il.robust.robust_accuracy(model, (x_test, y_test), attack="fgsm", eps_list=EPS_LIST)
    pgd = il.robust.robust_accuracy(model, (x_test, y_test), attack="pgd", eps_list=EPS_LIST, steps=args.pgd_steps, generator=generator)
    for eps in EPS_LIST:
        row[f"FGSM {eps}"] = fgsm[eps]
    for eps in EPS_LIST:
        row[f"PGD-{args.pgd_steps} {eps}"] = pgd[eps]
    row["max residual"] = residual
    return row


def write_outputs(results: dict[str, dict[str, float]], out: pathlib.Path, args: argparse.Namespace) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in results.items():
        cells = [f"{row[c]:.2e}" if c == "max residual" else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "lyadeq_robustness.md").write_text(table + "\n")
    with open(out / "lyadeq_robustness.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", *columns])
        for name, row in results.items():
            writer.writerow([name, *(row[c] for c in columns)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, attack in zip(axes, ("FGSM", f"PGD-{args.pgd_steps}")):
        for name, row in results.items():
            style = "--" if name.endswith("+ AT") else "-"
            ax.plot([0.0, *EPS_LIST], [row["clean"], *(row[f"{attack} {eps}"] for eps in EPS_LIST)], style, marker="o", label=name)
        ax.set_title(f"{attack} (ℓ∞)")
        ax.set_xlabel("ε (pixels in [0, 1])")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lyadeq_robustness.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--train-eps", type=float, default=0.1, help="ℓ∞ radius of adversarial training")
    parser.add_argument("--train-steps", type=int, default=3, help="PGD steps of adversarial training")
    parser.add_argument("--pgd-steps", type=int, default=20, help="PGD steps of the evaluation attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cell", choices=("spectral", "free"), default="spectral", help="‖W‖₂ ≤ 0.9 (default) or an unconstrained W"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--fast", action="store_true", help="tiny subset, one epoch, PGD-3 (for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tensors are tiny; more threads mostly contend)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.pgd_steps, args.train_steps = 1, 3, 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.fast)
    results: dict[str, dict[str, float]] = {}
    runs = [(kind, adversarial) for adversarial in (False, True) for kind in KINDS]
    start = time.perf_counter()
    with tqdm(total=len(runs) * args.epochs, desc="training", disable=args.no_progress) as bar:
        for kind, adversarial in runs:
            name = kind + (" + AT" if adversarial else "")
            bar.set_postfix_str(name)
            model = Classifier(kind, args.hidden, args.seed, spectral=args.cell == "spectral")
            tic = time.perf_counter()
            train(model, data, args, adversarial, bar)
            row = evaluate(model, data, args)
            row["seconds"] = time.perf_counter() - tic
            results[name] = row
    table = write_outputs(results, args.out, args)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s; outputs in {args.out}/")
    return results


if __name__ == "__main__":
    main()
