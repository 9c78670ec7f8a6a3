"""`make_server_app`: a Flower `ServerApp` that runs a strategy from a model's initial arrays.

The same ServerApp serves the simulation engine (`run_federated`) and the deployment engine
(`flwr run` against a SuperLink), where the number of rounds comes from the run config.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

__all__ = ["make_server_app", "run_strategy"]

ROUNDS_KEY = "num-server-rounds"


def run_strategy(
    grid: Grid,
    context: Context,
    strategy: Strategy,
    model_fn: Callable[[], nn.Module],
    *,
    num_rounds: int = 3,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    round_timeout: float = 600.0,
) -> Result:
    """The body of a ServerApp's main: `strategy.start(...)` from `model_fn()`'s initial state.

    For a ServerApp that builds its strategy from the run config (as `implicitlayers.federated.app`
    does); `make_server_app` wraps it for a fixed strategy. Arguments as in `make_server_app`.
    """
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model_fn().state_dict()),
        num_rounds=int(context.run_config.get(ROUNDS_KEY, num_rounds)),
        timeout=round_timeout,
        evaluate_fn=evaluate_fn,
    )


def make_server_app(
    strategy: Strategy,
    model_fn: Callable[[], nn.Module],
    *,
    num_rounds: int = 3,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    round_timeout: float = 600.0,
    on_result: Callable[[Result, Context], None] | None = None,
) -> ServerApp:
    """A `ServerApp` whose main runs `strategy.start(...)` from `model_fn()`'s initial state.

    Args:
        strategy: a Flower strategy, e.g. `QualityWeightedFedAvg` or `FedAvg`.
        model_fn: builds the global model; its `state_dict()` is the initial `ArrayRecord` (seed
            torch inside `model_fn` for a reproducible start).
        num_rounds: rounds to run, unless the run config has `"num-server-rounds"` (`flwr run
            --run-config "num-server-rounds=5"`, or the app's `pyproject.toml`).
        evaluate_fn: centralised evaluation `(round, arrays) -> MetricRecord`, called before the
            first round and after each.
        round_timeout: seconds to wait for the replies of one round (Flower's `timeout`).
        on_result: receives Flower's `Result` (final arrays and per-round metrics) and the server
            context when the strategy finishes (`run_federated` keeps it with a closure).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_strategy(
            grid, context, strategy, model_fn,
            num_rounds=num_rounds, evaluate_fn=evaluate_fn, round_timeout=round_timeout,
        )
        if on_result is not None:
            on_result(result, context)

    return app
