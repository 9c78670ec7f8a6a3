"""The federated digits DEQ as a Flower app for the deployment engine (`flwr run`).

`examples/federated_app/pyproject.toml` names `server_app` and `client_app` below as its components.
The same two objects run on one machine or many: a SuperLink, one SuperNode per client, then `flwr
run`. What varies is read at run time:

- per node (`flower-supernode --node-config "..."`): `partition-id`, `num-partitions` (the node's
  share of the digits) and `fp-budget` (its fixed-point budget `K`);
- per run (`[tool.flwr.app.config]` or `flwr run --run-config "..."`): `num-server-rounds`, `fusion`
  (`"quality"` or `"fedavg"`), `dirichlet-alpha` (0 for IID), `seed`, `min-nodes`,
  `fraction-evaluate` and `results-path` (a JSON summary written by the ServerApp; empty: none).

The ServerApp also prints the summary as one line starting with `RESULT_MARKER`, which `flwr run
--stream` and `flwr log` carry back to the submitting machine.
"""

from __future__ import annotations

import json
import pathlib

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .client import ClientData, make_deq_client_app
from .digits import DigitsDEQ, DigitsPartitions, centralised_evaluator
from .server import run_strategy
from .strategy import QualityWeightedFedAvg

__all__ = ["RESULT_MARKER", "client_app", "model_fn", "server_app"]

RESULT_MARKER = "FEDERATED-DEQ-RESULT "
HIDDEN = 32


def model_fn() -> DigitsDEQ:
    """The global model; seeded, so every run starts from the same arrays."""
    torch.manual_seed(0)
    return DigitsDEQ(HIDDEN)


def data_fn(context: Context) -> ClientData:
    """The node's share of the digits: `partition-id` of `num-partitions`, split by the run's seed."""
    alpha = float(context.run_config.get("dirichlet-alpha", 0.0))
    return DigitsPartitions(alpha=alpha if alpha > 0 else None, seed=int(context.run_config.get("seed", 0)))(context)


client_app = make_deq_client_app(model_fn, data_fn)
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config.get("min-nodes", 2))
    options = dict(
        min_available_nodes=nodes,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
        fraction_evaluate=float(config.get("fraction-evaluate", 1.0)),
    )
    fusion = str(config.get("fusion", "quality"))
    if fusion not in ("quality", "fedavg"):
        raise ValueError(f"run config `fusion` must be \"quality\" or \"fedavg\", got {fusion!r}.")
    strategy = QualityWeightedFedAvg(**options) if fusion == "quality" else FedAvg(**options)
    result = run_strategy(grid, context, strategy, model_fn, evaluate_fn=centralised_evaluator(model_fn))
    summary = {
        "fusion": fusion,
        "test-accuracy": {r: float(m["test-accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()},
        "train-metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "fusion-log": getattr(strategy, "fusion_log", {}),
    }
    print(RESULT_MARKER + json.dumps(summary), flush=True)
    if config.get("results-path"):
        path = pathlib.Path(str(config["results-path"]))
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(summary, indent=1))
        partial.replace(path)  # atomic: a reader never sees half a file
