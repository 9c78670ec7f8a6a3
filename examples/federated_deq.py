"""Federated DEQs on digits with Flower: DEQ vs an explicit untied network, FedAvg vs quality-weighted fusion.

Run: `python examples/federated_deq.py [--rounds 20] [--clients 10] [--seeds 0 1 2] [--out outputs/] [--fast]`
(needs `pip install "implicitlayers[federated]"`).

A replica at digits scale of Gkillas et al., "Deep Equilibrium Models Meet Federated Learning":

- 10 clients share the 1,437 training digits, IID or label-skewed (Dirichlet α = 0.5); the server
  keeps a fixed 360-image test set (`implicitlayers.federated.digits`).
- Heterogeneous compute: client `i` caps the DEQ's forward solver at `K_i` Anderson iterations,
  `K = 2, 4, ..., 20` (the fixed-point budget of `make_deq_client_app`).
- Models: `DigitsDEQ` (one weight-tied layer `z = tanh(W z + U x + b)`, width 64) and its explicit
  twin `DigitsUntied` (the same cell unrolled 10 times with 10 different `W_l`: equal depth to the
  median budget, about 5× the parameters).
- Fusion: Flower's `FedAvg` (weights `n_i`) vs `QualityWeightedFedAvg` (weights `n_i · q_i`, `q_i` the
  client's validation accuracy after local training; our rule, the paper's is not available);
  `--fusions residual` adds weights `n_i / (r_i + ε)`, `r_i` the client's final fixed-point residual.
- One local Adam epoch per round; Flower's simulation engine (`run_federated`), one Ray worker.

It reports, over the seeds (mean ± half the range): the server's test accuracy per round, the bytes
the clients upload per round (Flower's `ArrayRecord.count_bytes()`), and the rounds needed to reach
`--target` test accuracy; it saves `federated_accuracy.png`, `federated_weights.png` and
`federated_results.json` under `--out`. `--fast` (for the test suite): 3 clients, 2 rounds, one
seed, the label-skewed split, and two runs only (DEQ + quality weights, untied + FedAvg).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from tqdm import tqdm  # noqa: E402

from implicitlayers.federated import QualityWeightedFedAvg, make_deq_client_app, run_federated  # noqa: E402
from implicitlayers.federated.digits import DigitsDEQ, DigitsPartitions, DigitsUntied, centralised_evaluator  # noqa: E402

PARTITIONS = {"iid": None, "dirichlet-0.5": 0.5}
MODELS = ("deq", "untied")
FUSIONS = ("fedavg", "quality", "residual")


def build_model(kind: str, hidden: int, depth: int, seed: int) -> torch.nn.Module:
    """The global model's architecture; seeded, so the server's initial arrays are reproducible."""
    torch.manual_seed(seed)
    return DigitsDEQ(hidden) if kind == "deq" else DigitsUntied(hidden, depth)


def one_run(kind: str, fusion: str, alpha: float | None, seed: int, args: argparse.Namespace) -> dict:
    """One federated training run; returns its per-round history."""
    model_fn = functools.partial(build_model, kind, args.hidden, args.depth, seed)
    budgets = np.linspace(2, 20, args.clients).round().astype(int).tolist()
    client_app = make_deq_client_app(
        model_fn, DigitsPartitions(alpha=alpha, seed=seed), budgets=budgets, lr=args.lr, batch_size=32, seed=seed
    )
    # Federated evaluation is off (the server's test set measures the global model); every client trains each round.
    nodes = dict(min_available_nodes=args.clients, min_train_nodes=args.clients, fraction_evaluate=0.0)
    if fusion == "quality":
        strategy = QualityWeightedFedAvg(**nodes)
    elif fusion == "residual":  # weights ∝ n / (final residual + ε): a converged client dominates
        strategy = QualityWeightedFedAvg(quality_key="residual", lower_is_better=True, **nodes)
    else:
        strategy = FedAvg(**nodes)
    start = time.perf_counter()
    result = run_federated(
        strategy, client_app, model_fn, num_clients=args.clients, num_rounds=args.rounds,
        evaluate_fn=centralised_evaluator(model_fn), round_timeout=args.round_timeout,
    )
    rounds = sorted(result.train_metrics_clientapp)
    accuracy = [float(result.evaluate_metrics_serverapp[r]["test-accuracy"]) for r in [0, *rounds]]
    reached = next((r for r, a in enumerate(accuracy) if a >= args.target), None)
    return {
        "model": kind,
        "fusion": fusion,
        "alpha": alpha,
        "seed": seed,
        "budgets": budgets,
        "test_accuracy": accuracy,  # index 0: before training
        # Every client uploads the same ArrayRecord; Flower counts its bytes, the reply's metric carries it.
        "upload_bytes_per_round": args.clients * float(result.train_metrics_clientapp[rounds[0]]["upload-bytes"]),
        "num_parameters": sum(p.numel() for p in model_fn().parameters()),
        "rounds_to_target": reached,
        "fusion_log": {str(r): log for r, log in getattr(strategy, "fusion_log", {}).items()},
        "seconds": time.perf_counter() - start,
    }


def summarise(runs: list[dict], target: float) -> list[str]:
    """One line per (split, model, fusion): final accuracy, bytes per round and rounds to target, over seeds."""
    lines = []
    for split, alpha in PARTITIONS.items():
        for kind in MODELS:
            for fusion in FUSIONS:
                group = [r for r in runs if r["alpha"] == alpha and r["model"] == kind and r["fusion"] == fusion]
                if not group:
                    continue
                final = np.array([100 * r["test_accuracy"][-1] for r in group])
                # One round's accuracy swings by a point or more under label skew; the last five say more.
                last5 = np.array([100 * np.mean(r["test_accuracy"][-5:]) for r in group])
                reached = [r["rounds_to_target"] for r in group]
                reached_text = "/".join("-" if n is None else str(n) for n in reached)
                lines.append(
                    f"{split:>13s} {kind:>6s} {fusion:>8s}: test accuracy, last round {final.mean():.1f} ± "
                    f"{(final.max() - final.min()) / 2:.1f} %, last 5 rounds {last5.mean():.1f} ± "
                    f"{(last5.max() - last5.min()) / 2:.1f} %; upload {group[0]['upload_bytes_per_round'] / 1e3:.0f} kB/round "
                    f"({group[0]['num_parameters']} parameters), rounds to {100 * target:.0f} %: {reached_text}"
                )
    return lines


def plot_accuracy(runs: list[dict], path: pathlib.Path) -> None:
    splits = [s for s, a in PARTITIONS.items() if any(r["alpha"] == a for r in runs)]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for kind in MODELS:
            for fusion in FUSIONS:
                group = [r for r in runs if r["alpha"] == PARTITIONS[split] and r["model"] == kind and r["fusion"] == fusion]
                if not group:
                    continue
                acc = 100 * np.array([r["test_accuracy"] for r in group])
                x = np.arange(acc.shape[1])
                line = "-" if kind == "deq" else "--"
                ax.plot(x, acc.mean(0), line, label=f"{kind}, {fusion}")
                ax.fill_between(x, acc.min(0), acc.max(0), alpha=0.15)
        ax.set_title(f"{split} split: server test accuracy (seed range shaded)")
        ax.set_xlabel("round")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(runs: list[dict], path: pathlib.Path) -> None:
    """Mean fusion weight of the DEQ clients relative to FedAvg's `n_i / Σ n`, against the budget K."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, alpha in PARTITIONS.items():
        for fusion in ("quality", "residual"):
            group = [r for r in runs if r["alpha"] == alpha and r["model"] == "deq" and r["fusion"] == fusion]
            per_budget: dict[int, list[float]] = {}
            for run in group:
                for log in run["fusion_log"].values():
                    total = sum(c["num-examples"] for c in log)
                    for c in log:  # > 1: the quality raised this client's weight above FedAvg's
                        per_budget.setdefault(int(c["fp-budget"]), []).append(c["weight"] * total / c["num-examples"])
            if per_budget:
                budgets = sorted(per_budget)
                ax.plot(budgets, [np.mean(per_budget[k]) for k in budgets], "o-", label=f"{fusion}, {split}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("client's fixed-point budget K")
    ax.set_ylabel("fusion weight / FedAvg weight")
    ax.set_title("DEQ clients: how much each rule trusts each budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration, print the summary and save the plots; returns the runs and paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=10, help="layers of the explicit untied network")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fusions", nargs="+", choices=FUSIONS, default=["fedavg", "quality"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy for 'rounds to target'")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for one round's replies")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs"))
    parser.add_argument("--fast", action="store_true", help="3 clients, 2 rounds, 2 runs (for the test suite)")
    args = parser.parse_args(argv)
    if args.fast:
        args.rounds, args.clients, args.seeds, args.hidden, args.depth = 2, 3, [0], 16, 3
        configs = [("dirichlet-0.5", "deq", "quality"), ("dirichlet-0.5", "untied", "fedavg")]
    else:
        configs = [(s, m, f) for s in PARTITIONS for m in args.models for f in args.fusions]
    # Quiet Flower's per-round INFO log; tqdm shows the progress. Telemetry off by default here (offline runs).
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [
            one_run(kind, fusion, PARTITIONS[split], seed, args)
            for split, kind, fusion in tqdm(configs, desc="configurations")
            for seed in args.seeds
        ]
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the test suite
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"accuracy": args.out / "federated_accuracy.png", "weights": args.out / "federated_weights.png"}
    plot_accuracy(runs, paths["accuracy"])
    plot_weights(runs, paths["weights"])
    (args.out / "federated_results.json").write_text(json.dumps(runs, indent=1))
    for line in summarise(runs, args.target):
        print(line)
    return {"runs": runs, **paths}


if __name__ == "__main__":
    main()
