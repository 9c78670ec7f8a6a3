"""`QualityWeightedFedAvg`: Flower's FedAvg with the quality-weighted fusion of `fusion.py`.

Only `aggregate_train` is overridden; sampling, configuration, failure handling, federated and
centralised evaluation and the `Result` history are FedAvg's own.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from .fusion import quality_weights, weighted_average

__all__ = ["QualityWeightedFedAvg"]


class QualityWeightedFedAvg(FedAvg):
    """FedAvg whose model average weighs client `i` by `n_i · g(q_i)` (see `quality_weights`).

    `n_i` is the reply's `weighted_by_key` metric (`"num-examples"`, as in FedAvg) and `q_i` its
    `quality_key` metric; `g(q) = q`, or `1 / (q + ε)` with `lower_is_better=True`. The rule is ours
    (the paper's exact formula is not available). Floating-point arrays are averaged in float64
    and keep their dtype; integer and boolean buffers are copied from the heaviest client instead of
    being turned into float64 averages (what FedAvg does to them). The train metrics are still
    averaged by `n_i` alone, and evaluation is FedAvg's.

    Args:
        quality_key: the train-reply metric that holds `q_i`. The DEQ ClientApp of
            `make_deq_client_app` reports `"val-accuracy"` (default) and `"residual"`.
        lower_is_better: `True` for a quality such as `"residual"` (weights `∝ n_i / (q_i + ε)`).
        eps: the `ε` above.
        **fedavg_options: passed to `flwr.serverapp.strategy.FedAvg` (`fraction_train`,
            `min_available_nodes`, `weighted_by_key`, ...).

    Attributes:
        fusion_log: per server round, one dict per aggregated client: its fusion `"weight"` and its
            reported metrics (`"fp-budget"`, `"val-accuracy"`, ...), in reply order.

    Example:
        ```python
        from implicitlayers.federated import QualityWeightedFedAvg

        strategy = QualityWeightedFedAvg(quality_key="residual", lower_is_better=True,
                                         min_available_nodes=4, fraction_evaluate=0.5)
        ```
    """

    def __init__(
        self,
        *,
        quality_key: str = "val-accuracy",
        lower_is_better: bool = False,
        eps: float = 1e-8,
        **fedavg_options: Any,
    ) -> None:
        super().__init__(**fedavg_options)
        self.quality_key = quality_key
        self.lower_is_better = lower_is_better
        self.eps = eps
        self.fusion_log: dict[int, list[dict[str, Any]]] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the valid train replies with quality weights; aggregate their metrics as FedAvg does."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [msg.content for msg in valid_replies]
        client_metrics = [next(iter(content.metric_records.values())) for content in contents]
        if any(self.quality_key not in metrics for metrics in client_metrics):
            raise InconsistentMessageReplies(
                reason=f"QualityWeightedFedAvg needs the metric `{self.quality_key}` in every train reply "
                f"(got {sorted(client_metrics[0])}); report it from the ClientApp or set `quality_key`."
            )
        weights = quality_weights(
            [float(metrics[self.weighted_by_key]) for metrics in client_metrics],
            [float(metrics[self.quality_key]) for metrics in client_metrics],
            lower_is_better=self.lower_is_better,
            eps=self.eps,
        )
        states = [next(iter(content.array_records.values())).to_torch_state_dict() for content in contents]
        arrays = ArrayRecord(weighted_average(states, weights))
        self.fusion_log[server_round] = [
            {"weight": weight, **dict(metrics)} for weight, metrics in zip(weights, client_metrics)
        ]
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
