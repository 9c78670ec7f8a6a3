"""A Flower `ClientApp` that trains a classifier built on `il.DEQ` under a per-node fixed-point budget.

Heterogeneous clients spend different compute on the same model: node `i` caps every DEQ in the
model at `K_i` forward iterations (the solver's `max_iter`). A capped solve stops short of the
equilibrium on purpose, so the budgeted solvers do not warn (`on_failure="ignore"`); the final
residual is reported to the server instead, where it can serve as the client's quality.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ..models.deq import DEQ

__all__ = ["ClientData", "fixed_point_budget", "make_deq_client_app", "set_fixed_point_budget"]

BUDGET_KEY = "fp-budget"
PARTITION_KEY = "partition-id"


class ClientData(NamedTuple):
    """One client's local data for a classifier: inputs `(N, ...)` and integer labels `(N,)`."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def set_fixed_point_budget(model: nn.Module, max_iter: int) -> int:
    """Cap the forward solver of every `il.DEQ` inside `model` at `max_iter` iterations.

    Each DEQ's solver is replaced by `solver.replace(max_iter=max_iter, on_failure="ignore")`:
    solvers are immutable configs, so other models sharing the old config are not affected.

    Returns:
        The number of DEQs found (0 for an explicit network, which has no budget to set).

    Raises:
        ValueError: if `max_iter < 1`.
        TypeError: if a DEQ's solver is not a configurable implicitlayers solver (no `replace`).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"set_fixed_point_budget: the budget must be an integer >= 1, got {max_iter!r}.")
    deqs = [module for module in model.modules() if isinstance(module, DEQ)]
    for deq in deqs:
        if not hasattr(deq.solver, "replace"):
            raise TypeError(
                f"set_fixed_point_budget: the DEQ's solver {deq.solver!r} has no `replace`; use an "
                "implicitlayers solver (il.Anderson, il.Broyden, il.FixedPointIteration)."
            )
        deq.solver = deq.solver.replace(max_iter=max_iter, on_failure="ignore")
    return len(deqs)


def fixed_point_budget(context: Context, budgets: Sequence[int] | None = None) -> int | None:
    """This node's fixed-point budget `K`, or `None` to keep the model's own solver.

    In order: the node config's `"fp-budget"` (deployment: `flower-supernode --node-config
    "fp-budget=5 ..."`), else `budgets[partition-id]` (simulation, where the engine sets only
    `partition-id` and `num-partitions`), else `None`.
    """
    node_config = context.node_config
    if BUDGET_KEY in node_config:
        return int(node_config[BUDGET_KEY])
    if budgets is None:
        return None
    if PARTITION_KEY not in node_config:
        raise KeyError(
            f"fixed_point_budget: `budgets` is indexed by the node's `{PARTITION_KEY}`, which its node config "
            f"lacks ({dict(node_config)}); set `{BUDGET_KEY}` or `{PARTITION_KEY}` with --node-config."
        )
    partition = int(node_config[PARTITION_KEY])
    if not 0 <= partition < len(budgets):
        raise IndexError(f"fixed_point_budget: partition {partition} has no entry in budgets of length {len(budgets)}.")
    return int(budgets[partition])


def make_deq_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[Context], ClientData],
    *,
    budgets: Sequence[int] | None = None,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> ClientApp:
    """A `ClientApp` that trains and evaluates a classifier containing `il.DEQ` layers.

    On a train message the node loads the global arrays into `model_fn()`, caps its DEQs at its
    budget (`fixed_point_budget`), runs `local_epochs` of Adam on cross-entropy, evaluates on its
    validation split, and replies with the new arrays and the metrics `num-examples` (training
    examples), `train-loss`, `val-loss`, `val-accuracy`, `residual` (mean final forward residual of
    the DEQs on the validation split, 0 without DEQs), `fp-budget` (0 without DEQs or budget) and
    `upload-bytes` (Flower's `ArrayRecord.count_bytes()` of the reply). On an evaluate message it
    replies `num-examples` (validation examples), `eval-loss`, `eval-accuracy` and `residual`.

    Flower sends the ClientApp to its workers by pickling it with every message, so `data_fn` should
    load its data from the context (e.g. `context.node_config["partition-id"]`) rather than capture it.

    Args:
        model_fn: builds the model (same architecture on every node); it maps `x` to logits `(B, C)`.
            A model without DEQs (an explicit baseline) trains the same way, with no budget.
        data_fn: this node's `ClientData` from its `Context`.
        budgets: `K` per partition id, for simulation; a node config's `"fp-budget"` overrides it.
        local_epochs: passes over the local training split per round.
        batch_size: minibatch size.
        lr: Adam's learning rate (a fresh optimiser each round, as in FedAvg).
        seed: the local shuffling of round `r` on partition `p` depends only on `(seed, r, p)`.

    Returns:
        A `flwr.clientapp.ClientApp` with `train` and `evaluate` handlers.
    """
    if local_epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"make_deq_client_app: need local_epochs >= 1, batch_size >= 1 and lr > 0, got "
            f"{local_epochs}, {batch_size}, {lr}."
        )
    app = ClientApp()

    def prepared(msg: Message, context: Context) -> tuple[nn.Module, ClientData, int]:
        model = model_fn()
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        budget = fixed_point_budget(context, budgets)
        has_deq = budget is not None and set_fixed_point_budget(model, budget) > 0
        data = data_fn(context)
        _check_data(data)
        return model, data, budget if has_deq else 0

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model, data, budget = prepared(msg, context)
        round_ = int(msg.content.config_records["config"].get("server-round", 0))
        partition = int(context.node_config.get(PARTITION_KEY, 0))
        generator = torch.Generator().manual_seed((seed * 1_000_003 + round_) * 1_009 + partition)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(local_epochs):
            order = torch.randperm(len(data.x_train), generator=generator)
            total = 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
        val_loss, val_accuracy, residual = _evaluate(model, data.x_val, data.y_val)
        arrays = ArrayRecord(model.state_dict())
        metrics = MetricRecord(
            {
                "num-examples": len(data.x_train),
                "train-loss": total / len(data.x_train),
                "val-loss": val_loss,
                "val-accuracy": val_accuracy,
                "residual": residual,
                "fp-budget": budget,
                "upload-bytes": arrays.count_bytes(),
            }
        )
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, data, _ = prepared(msg, context)
        loss, accuracy, residual = _evaluate(model, data.x_val, data.y_val)
        metrics = MetricRecord(
            {"num-examples": len(data.x_val), "eval-loss": loss, "eval-accuracy": accuracy, "residual": residual}
        )
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Cross-entropy, accuracy and the mean final residual of the model's DEQs (0 without DEQs)."""
    model.eval()
    logits = model(x)
    residuals = [
        float(module.last_info.residual.float().mean())
        for module in model.modules()
        if isinstance(module, DEQ) and module.last_info is not None
    ]
    # A non-finite logit row (a diverged model) is a wrong prediction: argmax of an all-NaN row is class 0,
    # which would give a diverged client the share of class 0 as its accuracy, hence a fusion weight.
    correct = (logits.argmax(1) == y) & torch.isfinite(logits).all(1)
    return (
        float(F.cross_entropy(logits, y)),
        float(correct.float().mean()),
        sum(residuals) / len(residuals) if residuals else 0.0,
    )


def _check_data(data: ClientData) -> None:
    if not isinstance(data, ClientData):
        raise TypeError(f"make_deq_client_app: data_fn must return a ClientData, got {type(data).__name__}.")
    if len(data.x_train) == 0 or len(data.x_val) == 0:
        raise ValueError(
            f"make_deq_client_app: a client needs training and validation examples, got {len(data.x_train)} "
            f"and {len(data.x_val)}; give every partition enough data."
        )
    if len(data.x_train) != len(data.y_train) or len(data.x_val) != len(data.y_val):
        raise ValueError("make_deq_client_app: inputs and labels of a split differ in length.")
