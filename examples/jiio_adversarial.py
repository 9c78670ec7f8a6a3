"""Adversarial training of a DEQ classifier with the inner maximisation done by JIIO, against PGD.

The classifier is a small DEQ on scikit-learn's digits: `z = tanh(W z + U u + b)` (`z ∈ R^64`,
`u` the 64-pixel image), logits `= V z + c`. Adversarial training minimises over the weights the
loss at the worst perturbation `δ` in a ball, `max_{‖δ‖ ≤ ε} CE(head(z), y)` with
`z = cell(z, u + δ)`. Two ways to solve the inner problem:

- **JIIO**: `il.JIIO(..., constraint=il.sets.L2Ball(ε) or LInfBall(ε), maximize=True)` solves for the
  perturbation, the DEQ state and the adjoint jointly, one augmented fixed point; the weights are then
  trained on `CE(head(z*), y)` with `il.IFT(first_order=True)` (Danskin's theorem: at the inner
  maximiser the perturbation's own dependence on the weights does not enter the gradient).
- **PGD**: `implicitlayers.robust.pgd` with `--pgd-steps` steps, each a full forward DEQ solve and an
  implicit backward solve, then the loss at the adversarial input.

The update of JIIO's perturbation is the plain projected gradient step `δ ← Π(δ + α ∇)`; the
reference code's normalised step `Π(δ + α ∇/‖∇‖)` is not a fixed-point residual of the declared
problem, so `il.JIIO` does not offer it.

Every model is evaluated on held-out digits: clean accuracy and PGD-20 robust accuracy in ℓ2
(ε = 1.0) and ℓ∞ (ε = 0.1), no box constraint on pixels (the threat model is the ball, as in training).

Outputs: a printed table and `jiio_adversarial.png` (accuracies and training times) in `--out`.

Run: `python examples/jiio_adversarial.py [--epochs 8] [--fast] [--out outputs]`
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import implicitlayers as il

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root makes `examples` importable
    sys.path.insert(0, str(ROOT))
from examples._common import digits_dataset, held_out_split, pinned_threads, pyplot, save_figure  # noqa: E402

EPS = {"l2": 1.0, "linf": 0.1}
# JIIO's projected-gradient step α and iteration budget per norm (tuned on a clean-trained model so
# that JIIO's inner loss matches PGD-20's; see the tutorial).
JIIO_STEP = {"l2": 2.0, "linf": 0.5}
JIIO_ITERS = {"l2": 20, "linf": 30}


class DEQClassifier(nn.Module):
    """`z = tanh(W z + U u + b)`, logits `V z + c`; `W` rescaled to Frobenius norm ≤ 0.9 (a contraction)."""

    def __init__(self, pixels: int = 64, state: int = 64, classes: int = 10, gamma: float = 0.9) -> None:
        super().__init__()
        self.state, self.gamma = state, gamma
        self.W = nn.Parameter(torch.randn(state, state) * 0.3 / state**0.5)
        self.U = nn.Parameter(torch.randn(state, pixels) / pixels**0.5)
        self.b = nn.Parameter(torch.zeros(state))
        self.out = nn.Linear(state, classes)
        z, u = il.Variable("z"), il.Input("u")
        solver = il.Anderson(memory=5, tol=1e-4, max_iter=50, on_failure="ignore")
        self.deq = il.ImplicitLayer(
            il.Problem([il.FixedPoint(z, self.cell, (z, u))]), [u], [z], solver=solver,
            backward=il.IFT(solver=solver), init={"z": lambda u: u.new_zeros(u.shape[0], self.state)},
        )

    def weight(self) -> torch.Tensor:
        return self.W * (self.gamma / torch.clamp(torch.linalg.vector_norm(self.W), min=self.gamma))

    def cell(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight().T + u @ self.U.T + self.b)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(z)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        (z,) = self.deq(u)
        return self.head(z)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def attack_jiio(model: DEQClassifier, norm: str, iters: int | None = None) -> il.JIIO:
    """The inner maximisation `max_{δ ∈ ball} CE(head(z), y)`, `z = cell(z, u + δ)`, as one JIIO layer."""
    ball = il.sets.L2Ball(EPS[norm]) if norm == "l2" else il.sets.LInfBall(EPS[norm])
    return il.JIIO(
        lambda z, delta, u: model.cell(z, u + delta), lambda z, u: model.head(z), cross_entropy, model.U.shape[1],
        constraint=ball, maximize=True, state_shape=model.state, step_size=JIIO_STEP[norm],
        solver=il.Anderson(memory=5, tol=1e-4, max_iter=iters or JIIO_ITERS[norm], on_failure="ignore"),
        backward=il.IFT(first_order=True),
    )


def train(method: str, norm: str | None, data, epochs: int, pgd_steps: int, seed: int = 0, progress: bool = True):
    """Train one classifier; `method` is "standard", "pgd" or "jiio". Returns it and the seconds spent."""
    X, Y = data
    torch.manual_seed(seed)
    model = DEQClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    jiio = attack_jiio(model, norm) if method == "jiio" else None
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    label = method if norm is None else f"{method} ({norm})"
    for _ in tqdm(range(epochs), desc=f"train {label}", disable=not progress, leave=False):
        perm = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], 128):
            u, y = X[perm[i : i + 128]], Y[perm[i : i + 128]]
            if method == "standard":
                loss = F.cross_entropy(model(u), y)
            elif method == "pgd":
                u_adv = il.robust.pgd(model, u, y, EPS[norm], steps=pgd_steps, norm=norm, clamp=None, generator=gen)
                loss = F.cross_entropy(model(u_adv), y)
            else:
                _, z_star = jiio(y, u)
                loss = F.cross_entropy(model.head(z_star), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, time.perf_counter() - start


def evaluate(model: DEQClassifier, data, steps: int) -> dict[str, float]:
    X, Y = data
    model.eval()
    with torch.no_grad():
        metrics = {"clean": float((model(X).argmax(1) == Y).float().mean())}
    for norm, eps in EPS.items():
        adv = il.robust.pgd(model, X, Y, eps, steps=steps, norm=norm, clamp=None, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            metrics[f"pgd_{norm}"] = float((model(adv).argmax(1) == Y).float().mean())
    model.train()
    return metrics


def plot_results(path: str, rows: dict[str, dict[str, float]]) -> None:
    plt = pyplot()
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.27
    for k, (key, label) in enumerate((("clean", "clean"), ("pgd_l2", "PGD ℓ2 ε=1"), ("pgd_linf", "PGD ℓ∞ ε=0.1"))):
        ax1.bar([i + (k - 1) * width for i in range(len(names))], [rows[n][key] for n in names], width, label=label)
    ax1.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax1.set_ylabel("held-out accuracy")
    ax1.legend(fontsize=7)
    ax2.bar(range(len(names)), [rows[n]["train_seconds"] for n in names], color="gray")
    ax2.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax2.set_ylabel("training time (s)")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD steps of the baseline's training attack")
    parser.add_argument("--fast", action="store_true", help="one epoch on a subset, PGD-5 evaluation (for tests)")
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train_set, test_set = held_out_split(*digits_dataset())
    epochs, eval_steps, pgd_steps = args.epochs, 20, args.pgd_steps
    if args.fast:
        train_set, test_set = tuple(t[:256] for t in train_set), tuple(t[:64] for t in test_set)
        epochs, eval_steps, pgd_steps = 1, 5, 3
    runs: list[tuple[str, str | None]] = [("standard", None), ("pgd", "l2"), ("jiio", "l2"), ("pgd", "linf"), ("jiio", "linf")]
    rows: dict[str, dict[str, float]] = {}
    with pinned_threads(1):
        for method, norm in tqdm(runs, desc="models", disable=args.no_progress):
            model, seconds = train(method, norm, train_set, epochs, pgd_steps, progress=not args.no_progress)
            name = method if norm is None else f"{method.upper()}-AT {norm}"
            rows[name] = {**evaluate(model, test_set, eval_steps), "train_seconds": seconds}
    print(f"{'model':<16}{'clean':>8}{f'PGD-{eval_steps} l2':>13}{f'PGD-{eval_steps} linf':>15}{'train s':>10}")
    for name, r in rows.items():
        print(f"{name:<16}{r['clean']:>8.3f}{r['pgd_l2']:>13.3f}{r['pgd_linf']:>15.3f}{r['train_seconds']:>10.1f}")
    for norm in EPS:
        speedup = rows[f"PGD-AT {norm}"]["train_seconds"] / rows[f"JIIO-AT {norm}"]["train_seconds"]
        print(f"{norm}: JIIO adversarial training is {speedup:.1f}x faster than PGD-{pgd_steps} adversarial training")
    figure = os.path.join(args.out, "jiio_adversarial.png")
    plot_results(figure, rows)
    print(f"figure: {figure}")
    return {"models": rows, "figure": figure, "pgd_train_steps": pgd_steps, "eval_steps": eval_steps}


if __name__ == "__main__":
    main()
