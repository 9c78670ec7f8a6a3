"""Regulating a DEQ's neural dynamics for robustness (Yang et al., ICML 2023), on scikit-learn's digits.

A small DEQ classifier (`u = U x`, `z = tanh(W z + u)` with `‖W‖₂ ≤ 0.9`, logits `V z`; 64 units;
Broyden with 8 forward steps as in the paper, exact IFT backward) is adversarially trained four ways:

- PGD-AT and TRADES (β = 6), ℓ∞ ε = 0.1 on pixels in [0, 1], inner PGD-10 with step ε/4;
- each again with *random intermediate states* (`robust.random_intermediate_states`: budget
  T ~ U{1..8}, then 5 damped steps with λ = 0.5, the loss on that state).

Each model is evaluated without and with *input entropy reduction* (`robust.EntropyDefence`: 10
signed steps of ε/4 every 2 solver steps, ε = 0.1 ball, Broyden's history lifted):

- clean, PGD-20 (exact IFT gradient) and AutoAttack (torchattacks: APGD-CE, APGD-T, FAB-T with 10
  steps each, Square with `--square-queries` queries) accuracy at several ε;
- for the defence, the *oblivious* attack (PGD-20 on the undefended model, then defended), the
  *adaptive* ones (PGD-20 and APGD-CE through the defended forward, BPDA through the purification),
  and per sample the worst of the three;
- accuracy and prediction entropy at every solver state, under PGD-20 with the IFT gradient, a phantom
  gradient (5 damped steps from the last state) and an unrolled intermediate state (state 4, 5 steps);
  the early-state defence (state 7 of 8);
- the lift against a restart and the plain continuation of the solve inside the defence.

Three seeds (`--seeds`), mean ± half the range. Outputs in `--out`: `robust_dynamics.json` and the plots
`robust_accuracy.png`, `robust_states.png`.

Run: `python examples/robust_dynamics.py [--epochs 8] [--variants ...] [--eps ...] [--fast] [--out outputs] [--no-progress]`
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import implicitlayers as il
from implicitlayers import robust

TRAIN_EPS = 0.1
STEPS = 8  # forward solver steps (the paper's F_THRES for its MDEQ)
VARIANTS = ("PGD-AT", "PGD-AT + RIS", "TRADES", "TRADES + RIS")


class Cell(nn.Module):
    """`z ↦ tanh(W z + u)` with `W` rescaled to spectral norm ≤ 0.9 (a contraction in every state)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(hidden, hidden) * 0.5 / hidden**0.5)
        self.b = nn.Parameter(torch.zeros(hidden))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        W = self.W * (0.9 / torch.linalg.matrix_norm(self.W, ord=2).clamp_min(0.9))
        return torch.tanh(z @ W.T + u + self.b)


def make_model(hidden: int, seed: int) -> robust.DEQClassifier:
    torch.manual_seed(seed)
    deq = il.DEQ(Cell(hidden), solver=il.Broyden(tol=1e-4, max_iter=STEPS, on_failure="ignore"),
                 backward=il.IFT(solver=il.Anderson(tol=1e-4, max_iter=20, on_failure="ignore")))
    return robust.DEQClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, hidden)), deq, nn.Linear(hidden, 10))


def load(fast: bool):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8): torchattacks wants images
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    if fast:
        return x_train[:64], y_train[:64], x_test[:16], y_test[:16]
    return x_train, y_train, x_test, y_test


def train(variant: str, data, epochs: int, hidden: int, seed: int, progress: bool) -> robust.DEQClassifier:
    x_train, y_train = data
    model = make_model(hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    ris = robust.random_intermediate_states(model, max_steps=STEPS, k=5, damping=0.5, generator=gen) if "RIS" in variant else None
    bar = tqdm(range(epochs), desc=f"{variant} seed {seed}", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(x_train), generator=gen)
        model.train()
        for i in range(0, len(x_train), 64):
            x, y = x_train[perm[i : i + 64]], y_train[perm[i : i + 64]]
            if variant.startswith("TRADES"):
                loss = robust.trades_loss(model, x, y, eps=TRAIN_EPS, beta=6.0, steps=10, generator=gen)
            else:
                loss = robust.adversarial_loss(model, x, y, eps=TRAIN_EPS, steps=10, step_size=TRAIN_EPS / 4, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if ris is not None:
        ris.remove()
    return model.eval()


def pgd20(model: Callable, x, y, eps: float, seed: int, **kw) -> torch.Tensor:
    return robust.pgd(model, x, y, eps=eps, steps=20, step_size=eps / 4, generator=torch.Generator().manual_seed(seed), **kw)


def evaluate(model: robust.DEQClassifier, test, eps_list: list[float], aa_samples: int, square_queries: int, seed: int) -> dict[str, Any]:
    x, y = test
    acc = robust.accuracy
    defence = robust.EntropyDefence(model, eps=TRAIN_EPS, steps=STEPS, every=2, input_steps=10)
    out: dict[str, Any] = {"clean": acc(model, x, y), "defended clean": acc(defence, x, y)}
    xa, ya = x[:aa_samples], y[:aa_samples]
    for eps in eps_list:
        x_adv = pgd20(model, x, y, eps, seed)
        out[f"PGD-20 {eps}"] = acc(model, x_adv, y)
        oblivious = _correct(defence, x_adv, y)
        adaptive = _correct(defence, pgd20(defence, x, y, eps, seed), y)
        out[f"defended oblivious PGD-20 {eps}"] = float(oblivious.float().mean())
        out[f"defended adaptive PGD-20 {eps}"] = float(adaptive.float().mean())
        out[f"APGD-CE {eps}"] = acc(model, robust.autoattack(model, xa, ya, eps, attacks=("apgd-ce",), seed=seed), ya)
        out[f"AutoAttack {eps}"] = acc(model, robust.autoattack(model, xa, ya, eps, n_queries=square_queries, seed=seed), ya)
        apgd = _correct(defence, robust.autoattack(defence, xa, ya, eps, attacks=("apgd-ce",), seed=seed), ya)
        out[f"defended adaptive APGD-CE {eps}"] = float(apgd.float().mean())
        # Per sample, the worst of the three attacks on the defence (on the samples all three attacked).
        worst = oblivious[: len(ya)] & adaptive[: len(ya)] & apgd
        out[f"defended worst case {eps}"] = float(worst.float().mean())
    # Per-state accuracy and entropy at the training radius, three gradient sources for the attack.
    sources = {
        "clean": {"eps": 0.0},
        "IFT": {"eps": TRAIN_EPS},
        "phantom": {"eps": TRAIN_EPS, "grad_model": robust.IntermediateState(model, state=STEPS, unroll=5)},
        "unroll state 4": {"eps": TRAIN_EPS, "grad_model": robust.IntermediateState(model, state=4, unroll=5)},
    }
    states = {}
    for name, kw in sources.items():
        report = robust.evaluate_states(model, (x, y), steps=STEPS, attack_steps=20, step_size=TRAIN_EPS / 4,
                                        generator=torch.Generator().manual_seed(seed), **kw)
        states[name] = {"accuracy": report.accuracy, "entropy": report.entropy}
    out["states"] = states
    out["early-state PGD-20 (IFT)"] = states["IFT"]["accuracy"][STEPS - 1]
    # What the lift buys inside the defence: residual of the final state, accuracy under oblivious PGD-20.
    x_adv = pgd20(model, x, y, TRAIN_EPS, seed)
    for mode in ("lift", "continue", "restart"):
        trace = robust.EntropyDefence(model, eps=TRAIN_EPS, steps=STEPS, on_input_change=mode).defend(x_adv)
        out[f"{mode}: residual"] = float(trace.residual.mean())
        out[f"{mode}: oblivious PGD-20 {TRAIN_EPS}"] = float((trace.logits.argmax(1) == y).float().mean())
    return out


def _correct(model: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and half-range over seeds, for every scalar and every per-state list."""

    def merge(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [merge([v[i] for v in values]) for i in range(len(values[0]))]
        t = torch.tensor(values, dtype=torch.float64)
        return [float(t.mean()), float((t.max() - t.min()) / 2)]

    return merge(runs)


def plot(results: dict[str, Any], eps_list: list[float], out: pathlib.Path) -> list[pathlib.Path]:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for variant, res in results.items():
        for ax, key in zip(axes, ("PGD-20", "AutoAttack", "defended adaptive PGD-20")):
            mean = [res[f"{key} {e}"][0] for e in eps_list]
            err = [res[f"{key} {e}"][1] for e in eps_list]
            ax.errorbar(eps_list, mean, yerr=err, marker="o", capsize=3, label=variant)
            ax.set(title=key, xlabel="ℓ∞ ε", ylabel="accuracy", ylim=(0, 1))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    acc_path = out / "robust_accuracy.png"
    fig.savefig(acc_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    t = list(range(STEPS + 1))
    for variant, res in results.items():
        for ax, metric in zip(axes, ("entropy", "accuracy")):
            (line,) = ax.plot(t, [m for m, _ in res["states"]["IFT"][metric]], marker="o", label=f"{variant} (PGD-20)")
            ax.plot(t, [m for m, _ in res["states"]["clean"][metric]], ls="--", alpha=0.6, color=line.get_color())
    axes[0].set(title=f"prediction entropy per state (ε = {TRAIN_EPS}; dashed: clean)", xlabel="solver state t", ylabel="entropy (nats)")
    axes[1].set(title="accuracy per state", xlabel="solver state t", ylabel="accuracy", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    states_path = out / "robust_states.png"
    fig.savefig(states_path, dpi=110)
    plt.close(fig)
    return [acc_path, states_path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--aa-samples", type=int, default=150, help="test samples given to AutoAttack")
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--fast", action="store_true", help="tiny data, 1 epoch, 1 seed (for the tests)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.epochs, args.hidden, args.eps, args.aa_samples, args.square_queries = [0], 1, 16, [0.1], 8, 20
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_train, y_train, x_test, y_test = load(args.fast)
        args.out.mkdir(parents=True, exist_ok=True)
        results, seconds = {}, {}
        for variant in args.variants:
            runs, start = [], time.perf_counter()
            for seed in args.seeds:
                model = train(variant, (x_train, y_train), args.epochs, args.hidden, seed, not args.no_progress)
                with warnings.catch_warnings():
                    # The 8-step forward solve stops short of tol by design; the IFT backward's rare caps too.
                    warnings.simplefilter("ignore", il.ConvergenceWarning)
                    runs.append(evaluate(model, (x_test, y_test), args.eps, args.aa_samples, args.square_queries, seed))
            results[variant] = aggregate(runs)
            seconds[variant] = (time.perf_counter() - start) / len(args.seeds)
            if not args.no_progress:
                r = results[variant]
                print(f"{variant:14s} clean {r['clean'][0]:.3f}  PGD-20@{TRAIN_EPS} {r[f'PGD-20 {TRAIN_EPS}'][0]:.3f}  "
                      f"AA@{TRAIN_EPS} {r[f'AutoAttack {TRAIN_EPS}'][0]:.3f}  defended adaptive {r[f'defended adaptive PGD-20 {TRAIN_EPS}'][0]:.3f}")
        summary = {"results": results, "seconds_per_seed": seconds, "args": {k: str(v) for k, v in vars(args).items()}}
        (args.out / "robust_dynamics.json").write_text(json.dumps(summary, indent=1))
        summary["plots"] = plot(results, args.eps, args.out)
        return summary
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
