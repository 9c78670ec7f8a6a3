"""LyaDEQ's readings against a plain DEQ on scikit-learn's digits: clean and adversarial accuracy.

Run: `python examples/lyadeq_robustness.py [--seeds 0 1 2] [--epochs 5] [--training end-to-end|two-stage] [--fast]`

Every model shares the injection `u = U x + b`, the cell `f(z, u) = tanh(W z + u)` with `‖W‖₂ ≤ 0.9`
and a linear head, built from the same seed; they differ only in the state they hand the head
(`docs/concepts/lyadeq.md` states each reading's dynamics and equilibrium):

- `DEQ`: `z* = f(z*, u)` (`il.DEQ`);
- `fixed point`: `il.LyaDEQ(centre="fixed_point")`, `V` centred at the DEQ's own fixed point;
- `learned, K=10`: `V` centred at a learned point `c₀`, 10 Euler steps of the projected dynamics;
- `learned, pull`: `V` centred at `c₀`, balanced dynamics `ż = F(z) − β∇V(z)`, β = `--pull`;
- `conditioned, pull`: `V(z; u)` convex in `z` with minimum at a learned `c(u)`, balanced dynamics.

The LyaDEQ models put the orthogonal layer `Q` before the head. Each model is trained with
cross-entropy and with TRADES (`il.robust.trades_loss`, ℓ∞ radius `--train-eps`), either end to end or
in two stages (`--training two-stage`: the DEQ first, then the cell frozen and only `V`, its centre,
`Q` and the head trained). The held-out digits (25 %, `random_state=0`) are attacked with FGSM and
PGD-20 (ℓ∞, random start, attack gradients through the layer's backward mode) at ε ∈ {0.05, 0.1, 0.2},
and with AutoAttack's APGD-CE + APGD-T (`--autoattack standard` for the whole of torchattacks' AutoAttack;
ε = 0.1, first `--aa-samples` test digits) when `torchattacks` is installed. `class gap` is the smallest
distance between the mean states of two classes, before (`z*`) and after (`Q z*`) the orthogonal layer.

`--solver-table` only prints, for untrained models, whether Anderson, Broyden and Picard iteration
solve each reading (converged samples of 8, worst residual, steps; seeds 0 / 1 / 2).

Outputs in `--out`: `lyadeq_robustness.md` (mean ± half-range over the seeds), `.csv` (every run) and
`.png`. `--fast` trains on a subset for one epoch, attacks with PGD-3, on one seed (for the test suite).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
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
from implicitlayers.nn.lyapunov import ConditionalLyapunovFunction  # noqa: E402

EPS_LIST = (0.05, 0.1, 0.2)
KINDS = ("DEQ", "fixed point", "learned, K=10", "learned, pull", "conditioned, pull")
AUTOATTACK_EPS = 0.1


class TanhCell(torch.nn.Module):
    """`f(z, u) = tanh(W z + u)` with `‖W‖₂ ≤ 0.9`: a contraction, so the DEQ's fixed point is unique."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.normal_(self.linear.weight, std=0.5 / hidden**0.5)
        il.nn.spectral_norm(self.linear, bound=0.9)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


def make_core(kind: str, cell: TanhCell, hidden: int, pull: float) -> torch.nn.Module:
    # Attacked inputs may need more iterations; non-convergence is recorded (`max residual`), not raised.
    solver = il.Anderson(memory=5, tol=1e-4, max_iter=50, on_failure="ignore")
    if kind == "DEQ":
        return il.DEQ(cell, solver=solver, z_init=lambda u: torch.zeros_like(u))
    common = {"alpha": 0.1, "step_size": 0.5}
    if kind == "fixed point":
        return il.LyaDEQ(cell, hidden, lyapunov=il.nn.LyapunovFunction(hidden, (32, 32)), solver=solver, **common)
    if kind == "learned, K=10":
        return il.LyaDEQ(cell, hidden, lyapunov=il.nn.LyapunovFunction(hidden, (32, 32)), centre="learned", budget=10, **common)
    if kind == "learned, pull":
        lyapunov = il.nn.LyapunovFunction(hidden, (32, 32))
        return il.LyaDEQ(cell, hidden, lyapunov=lyapunov, centre="learned", pull=pull, solver=solver, **common)
    lyapunov = ConditionalLyapunovFunction(hidden, hidden, (32, 32))
    return il.LyaDEQ(cell, hidden, lyapunov=lyapunov, centre="conditioned", pull=pull, solver=solver, **common)


class Classifier(torch.nn.Module):
    """`x ↦ head(core(U x + b))`; `core` is a DEQ or a LyaDEQ (whose output is `Q z*`)."""

    def __init__(self, kind: str, hidden: int, seed: int, pull: float) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same injection, cell and head for every kind
        self.inject = torch.nn.Linear(64, hidden)
        cell = TanhCell(hidden)
        self.head = torch.nn.Linear(hidden, 10)
        self.core = make_core(kind, cell, hidden, pull)
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.core(self.inject(x)))

    def states(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(z*, features)`: the state before the orthogonal layer and what the head reads."""
        u = self.inject(x)
        if isinstance(self.core, il.DEQ):
            z = self.core(u)
            return z, z
        z = self.core.equilibrium(u)
        return z, z if self.core.orthogonal is None else self.core.orthogonal(z)

    def max_residual(self) -> float:
        """The largest residual of the last solve (0 for a budget reading, which solves nothing)."""
        info = self.core.last_info
        infos = [] if info is None else info.values() if isinstance(info, dict) else [info]
        return max((float(i.residual.max()) for i in infos), default=0.0)


def solver_table(dim: int = 16, batch: int = 8, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """Whether the library's solvers solve each reading: converged samples out of `batch`, worst residual.

    Random cells `tanh(W z + u)` with `‖W‖₂ = 0.9`, random inputs `u`, untrained `V` (widths 32, 32),
    `tol = 1e-4`, at most 200 iterations, `h = 0.5`.
    """
    solvers = {
        "Anderson": il.Anderson(memory=5, tol=1e-4, max_iter=200, on_failure="ignore"),
        "Broyden": il.Broyden(tol=1e-4, max_iter=200, on_failure="ignore"),
        "Picard": il.FixedPointIteration(tol=1e-4, max_iter=200, on_failure="ignore"),
    }
    readings = {"fixed point": {}, "conditioned": {"centre": "conditioned"}, "learned, pull": {"centre": "learned", "pull": 0.5},
                "conditioned, pull": {"centre": "conditioned", "pull": 0.5}}
    lines = ["| reading | " + " | ".join(solvers) + " |", "|---|" + "---|" * len(solvers)]
    for name, options in readings.items():
        cells = []
        for solver in solvers.values():
            results = []
            for seed in seeds:
                torch.manual_seed(seed)
                weight = torch.randn(dim, dim)
                weight = 0.9 * weight / torch.linalg.matrix_norm(weight, 2)
                u = torch.randn(batch, dim)
                conditioned = options.get("centre") == "conditioned"
                lyapunov = ConditionalLyapunovFunction(dim, dim, (32, 32)) if conditioned else il.nn.LyapunovFunction(dim, (32, 32))
                model = il.LyaDEQ(lambda z, u: torch.tanh(z @ weight.T + u), dim, lyapunov=lyapunov, solver=solver, **options)
                with torch.no_grad():
                    model.equilibrium(u)
                info = list(model.last_info.values())[-1]  # the state's block
                results.append(f"{int(info.converged.sum())} ({float(info.residual.max()):.0e}, {int(info.nstep.max())})")
            cells.append(" / ".join(results))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_data(fast: bool) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    if fast:
        x_train, y_train, x_test, y_test = x_train[:96], y_train[:96], x_test[:24], y_test[:24]
    return x_train, y_train, x_test, y_test


def fit(model: Classifier, params: list, data: tuple, args: argparse.Namespace, trades: bool, epochs: int, seed: int) -> None:
    x_train, y_train = data[0], data[1]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=generator)
        for start in range(0, x_train.shape[0], args.batch_size):
            idx = order[start : start + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            if trades:
                loss = il.robust.trades_loss(model, x, y, eps=args.train_eps, steps=args.train_steps, generator=generator)
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train(model: Classifier, data: tuple, args: argparse.Namespace, trades: bool, seed: int) -> None:
    if args.training == "end-to-end" or isinstance(model.core, il.DEQ):
        fit(model, list(model.parameters()), data, args, trades, args.epochs, seed)
        return
    # Two stages: the DEQ (injection, cell, head on z*), then the cell frozen and the stability module trained.
    deq = Classifier("DEQ", args.hidden, seed, args.pull)
    fit(deq, list(deq.parameters()), data, args, trades, args.epochs, seed)
    model.inject.load_state_dict(deq.inject.state_dict())
    model.cell.load_state_dict(deq.cell.state_dict())
    model.head.load_state_dict(deq.head.state_dict())
    model.inject.requires_grad_(False)
    model.cell.requires_grad_(False)
    fit(model, [*model.core.stability_parameters(), *model.head.parameters()], data, args, trades, args.epochs, seed)


def class_gap(features: torch.Tensor, y: torch.Tensor) -> float:
    """The smallest distance between the means of `features` over two classes (those present in `y`)."""
    classes = y.unique()
    means = torch.stack([features[y == c].mean(0) for c in classes])
    distances = torch.cdist(means, means) + torch.diag(torch.full((len(classes),), float("inf")))
    return float(distances.min())


class _Images(torch.nn.Module):
    """The classifier seen by torchattacks: images `(B, 1, 8, 8)` in, which its APGD and Square need."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.flatten(1))


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str = "apgd") -> torch.Tensor:
    """AutoAttack (ℓ∞) from torchattacks, without touching global state or parameter gradients.

    `version="standard"` is torchattacks' AutoAttack (APGD-CE, APGD-T and FAB-T with 10 steps where the
    original uses 100, then Square with 5000 queries); `"apgd"` keeps its two gradient attacks, APGD-CE
    and APGD-T, and drops FAB-T and Square (Square alone is ~85 % of the time, and LyaDEQ's forward
    costs several DEQ solves).
    """
    import torchattacks

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # FAB calls `.backward()`, which would fill the parameters' `.grad`
    images = _Images(model)
    try:
        with torch.random.fork_rng():  # its components reseed the global generator
            if version == "standard":
                attack = torchattacks.AutoAttack(images, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
            else:
                attack = torchattacks.MultiAttack([
                    torchattacks.APGD(images, norm="Linf", eps=eps, seed=0, loss="ce", n_restarts=1),
                    torchattacks.APGDT(images, norm="Linf", eps=eps, seed=0, n_classes=10, n_restarts=1),
                ])
            return attack(x.view(-1, 1, 8, 8), y).detach().flatten(1)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def evaluate(model: Classifier, data: tuple, args: argparse.Namespace, seed: int) -> dict[str, float]:
    x_test, y_test = data[2], data[3]
    model.eval()
    with torch.no_grad():
        z, features = model.states(x_test)
        residual = model.max_residual()
    row = {"clean": float((model.head(features).argmax(1) == y_test).float().mean())}
    fgsm = il.robust.robust_accuracy(model, (x_test, y_test), attack="fgsm", eps_list=EPS_LIST)
    generator = torch.Generator().manual_seed(seed)
    pgd = il.robust.robust_accuracy(model, (x_test, y_test), attack="pgd", eps_list=EPS_LIST, steps=args.pgd_steps, generator=generator)
    row.update({f"FGSM {eps}": fgsm[eps] for eps in EPS_LIST})
    row.update({f"PGD-{args.pgd_steps} {eps}": pgd[eps] for eps in EPS_LIST})
    if args.autoattack != "off":
        subset = (x_test[: args.aa_samples], y_test[: args.aa_samples])
        auto = il.robust.robust_accuracy(model, subset, attack=autoattack, eps_list=[AUTOATTACK_EPS], version=args.autoattack)
        row[f"AA-{args.autoattack} {AUTOATTACK_EPS}"] = auto[AUTOATTACK_EPS]
    row["gap z*"], row["gap Qz*"] = class_gap(z, y_test), class_gap(features, y_test)
    row["max residual"] = residual
    return row


def summarise(runs: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """`{model: {column: (mean, half-range)}}` over the seeds."""
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["model"] for r in runs):
        rows = [r for r in runs if r["model"] == name]
        columns = [c for c in rows[0] if c not in ("model", "seed")]
        summary[name] = {}
        for c in columns:
            values = torch.tensor([r[c] for r in rows], dtype=torch.float64)
            summary[name][c] = (float(values.mean()), float(values.max() - values.min()) / 2)
    return summary


def write_outputs(runs: list[dict], out: pathlib.Path, args: argparse.Namespace) -> str:
    summary = summarise(runs)
    columns = list(next(iter(summary.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in summary.items():
        cells = [f"{row[c][0]:.1e}" if c in ("max residual", "seconds") else f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "lyadeq_robustness.md").write_text(table + "\n")
    with open(out / "lyadeq_robustness.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, attack in zip(axes, ("FGSM", f"PGD-{args.pgd_steps}")):
        for name, row in summary.items():
            style = "--" if name.endswith("+ TRADES") else "-"
            means = [row["clean"][0], *(row[f"{attack} {eps}"][0] for eps in EPS_LIST)]
            spreads = [row["clean"][1], *(row[f"{attack} {eps}"][1] for eps in EPS_LIST)]
            ax.errorbar([0.0, *EPS_LIST], means, yerr=spreads, fmt=style, marker="o", capsize=2, label=name)
        ax.set_title(f"{attack} (ℓ∞), mean ± half-range over {len(args.seeds)} seed(s)")
        ax.set_xlabel("ε (pixels in [0, 1])")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lyadeq_robustness.png", dpi=110)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--pull", type=float, default=0.5, help="beta of the balanced readings")
    parser.add_argument("--training", choices=("end-to-end", "two-stage"), default="end-to-end")
    parser.add_argument("--no-trades", action="store_true", help="skip the TRADES-trained models")
    parser.add_argument("--train-eps", type=float, default=0.1, help="ℓ∞ radius of TRADES")
    parser.add_argument("--train-steps", type=int, default=2, help="PGD steps of TRADES' inner maximisation")
    parser.add_argument("--pgd-steps", type=int, default=20, help="PGD steps of the evaluation attack")
    parser.add_argument(
        "--autoattack", choices=("apgd", "standard", "off"), default="apgd",
        help="with torchattacks installed: APGD-CE + APGD-T (default), the standard AutoAttack, or none",
    )
    parser.add_argument("--aa-samples", type=int, default=50, help="test samples attacked by AutoAttack (it is slow)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--fast", action="store_true", help="tiny subset, one epoch, PGD-3, one seed (for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tensors are tiny)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--solver-table", action="store_true", help="only print whether the solvers solve each reading")
    args = parser.parse_args(argv)
    if args.solver_table:
        table = solver_table()
        print(table)
        return {}
    if args.fast or importlib.util.find_spec("torchattacks") is None:
        args.autoattack = "off"
    if args.fast:
        args.epochs, args.pgd_steps, args.train_steps, args.seeds = 1, 3, 2, args.seeds[:1]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.fast)
    schedules = (False,) if args.no_trades else (False, True)
    jobs = [(seed, kind, trades) for seed in args.seeds for trades in schedules for kind in args.kinds]
    runs: list[dict] = []
    start = time.perf_counter()
    for seed, kind, trades in tqdm(jobs, desc="training", disable=args.no_progress):
        tic = time.perf_counter()
        model = Classifier(kind, args.hidden, seed, args.pull)
        train(model, data, args, trades, seed)
        row = {"model": kind + (" + TRADES" if trades else ""), "seed": seed, **evaluate(model, data, args, seed)}
        row["seconds"] = time.perf_counter() - tic
        runs.append(row)
        table = write_outputs(runs, args.out, args)  # after every run, so a long run can be read as it goes
    if args.autoattack == "off":
        print("AutoAttack skipped (--fast, --autoattack off, or the torchattacks extra not installed).")
    print(table)
    print(f"training: {args.training}; total {time.perf_counter() - start:.0f} s; outputs in {args.out}/")
    return summarise(runs)


if __name__ == "__main__":
    main()
