"""`run_federated`: one federated run on Flower's simulation engine (Ray), returning Flower's `Result`."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from flwr.simulation import run_simulation
from torch import nn

from .server import make_server_app

__all__ = ["run_federated"]


def run_federated(
    strategy: Strategy,
    client_app: ClientApp,
    model_fn: Callable[[], nn.Module],
    *,
    num_clients: int,
    num_rounds: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    num_actors: int = 1,
    round_timeout: float = 600.0,
    backend_config: dict[str, Any] | None = None,
    verbose: bool = False,
) -> Result:
    """Simulate `num_clients` nodes running `client_app` for `num_rounds` rounds of `strategy`.

    A thin wrapper over `flwr.simulation.run_simulation` (Ray backend) that returns the strategy's
    `Result` (which Flower's function does not) and checks the set-up first: Flower ends the whole
    process, not just the call, when Ray is missing, and FedAvg waits forever for more nodes than
    exist.

    Args:
        strategy: the server strategy (`QualityWeightedFedAvg`, `flwr.serverapp.strategy.FedAvg`, ...).
        client_app: e.g. `make_deq_client_app(...)`; virtual node `i` gets `partition-id = i`.
        model_fn: builds the initial global model (see `make_server_app`).
        num_clients: number of virtual SuperNodes.
        num_rounds: federated rounds.
        evaluate_fn: optional centralised evaluation `(round, arrays) -> MetricRecord`.
        num_actors: Ray workers running ClientApps in parallel (one CPU each). The default 1 runs the
            nodes one after another, which is fastest for small models (Ray's start-up dominates)
            and makes the order of replies, hence the float rounding of the average, reproducible.
        round_timeout: seconds the server waits for one round's replies. If Ray fails to start,
            `run_federated` raises, but Flower's ServerApp thread keeps waiting this long per
            remaining round before the process can exit; lower it for tests.
        backend_config: Flower's backend config; replaces the one built from `num_actors`.
        verbose: Flower's DEBUG logging.

    Returns:
        Flower's `Result`: the final `arrays`, and per-round `train_metrics_clientapp`,
        `evaluate_metrics_clientapp` and `evaluate_metrics_serverapp`.

    Raises:
        ImportError: Ray is not installed (`pip install "implicitlayers[federated]"`).
        ValueError: the strategy needs more nodes than `num_clients`, or a count is below 1.
    """
    if importlib.util.find_spec("ray") is None:
        raise ImportError(
            "run_federated needs Ray for Flower's simulation engine: pip install \"implicitlayers[federated]\"."
        )
    if num_clients < 1 or num_rounds < 1 or num_actors < 1:
        raise ValueError(
            f"run_federated: num_clients, num_rounds and num_actors must be >= 1, got {num_clients}, "
            f"{num_rounds}, {num_actors}."
        )
    if isinstance(strategy, FedAvg):
        needed = max(strategy.min_available_nodes, strategy.min_train_nodes, strategy.min_evaluate_nodes)
        if needed > num_clients:
            raise ValueError(
                f"run_federated: the strategy waits for {needed} nodes (min_available_nodes / min_train_nodes / "
                f"min_evaluate_nodes) but only num_clients={num_clients} exist, so it would wait forever; "
                "lower those minimums or add clients."
            )
    if backend_config is None:
        backend_config = {
            "init_args": {"num_cpus": num_actors, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        }
    # Ray >= 2.55 warns (FutureWarning) unless this is set; "0" keeps the current behaviour.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    results: list[Result] = []

    def keep(result: Result, _context: Context) -> None:
        results.append(result)

    server_app = make_server_app(
        strategy, model_fn, num_rounds=num_rounds, evaluate_fn=evaluate_fn, round_timeout=round_timeout, on_result=keep
    )
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if not results:
        raise RuntimeError("run_federated: the simulation ended without a result; see Flower's log above.")
    return results[0]
