"""Federated deep equilibrium models on Flower (Gkillas et al., "Deep Equilibrium Models Meet Federated Learning").

Clients train models built on `il.DEQ` (one weight-tied layer: few parameters to send) under
per-node fixed-point budgets, and the server fuses them with a quality-weighted average.

- `quality_weights`, `weighted_average`: the fusion rule, without Flower.
- `QualityWeightedFedAvg`: Flower's FedAvg with that fusion (only its aggregation is overridden).
- `make_deq_client_app`, `ClientData`, `set_fixed_point_budget`, `fixed_point_budget`: the ClientApp.
- `make_server_app`, `run_strategy`: the ServerApp (simulation and `flwr run`).
- `run_federated`: one run on Flower's simulation engine (Ray).

Everything except the fusion functions needs the extra: `pip install "implicitlayers[federated]"`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from .fusion import quality_weights as quality_weights
from .fusion import weighted_average as weighted_average

# Public name -> submodule; these import Flower, so they load on first use.
_FLOWER_NAMES = {
    "QualityWeightedFedAvg": "strategy",
    "ClientData": "client",
    "fixed_point_budget": "client",
    "make_deq_client_app": "client",
    "set_fixed_point_budget": "client",
    "make_server_app": "server",
    "run_strategy": "server",
    "run_federated": "simulation",
}

__all__ = ["quality_weights", "weighted_average", *_FLOWER_NAMES]


def __getattr__(name: str) -> Any:
    if name not in _FLOWER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if importlib.util.find_spec("flwr") is None:
        raise ImportError(
            f"implicitlayers.federated.{name} needs Flower: pip install \"implicitlayers[federated]\"."
        )
    return getattr(importlib.import_module(f".{_FLOWER_NAMES[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
