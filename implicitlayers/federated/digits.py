"""The federated digits task: client partitions, a DEQ classifier and its explicit untied twin.

Shared by `examples/federated_deq.py`, the `flwr run` app (`implicitlayers.federated.app`) and the
tests. Needs scikit-learn (the `dev` extra) for the bundled digits.

- Data: scikit-learn's 1,797 digits (8×8, scaled to [0, 1]); a fixed stratified 360-image test set
  for the server, the other 1,437 split over the clients, IID or label-skewed (per class, the
  clients' shares are drawn from Dirichlet(α)). Each client keeps 20 % of its share for validation.
- `DigitsDEQ`: `x ↦ head(z*)`, `z* = tanh(W z* + U x + b)` solved by `il.DEQ` (Anderson).
- `DigitsUntied`: the same cell unrolled `depth` times with a different `W_l` per layer, the
  explicit network of equal depth; it sends about `depth` times more parameters per round.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from torch import nn

from ..backward import IFT
from ..models.deq import DEQ
from ..solvers import Anderson
from .client import ClientData

__all__ = ["DigitsDEQ", "DigitsPartitions", "DigitsUntied", "digits_split", "partition_indices", "centralised_evaluator"]

NUM_FEATURES, NUM_CLASSES, TEST_SIZE = 64, 10, 360


class _TanhCell(nn.Module):
    """`f(z, u) = tanh(W z + u)`; the injection `u = U x + b` is computed once per batch."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False)
        nn.init.normal_(self.linear.weight, std=0.5 / hidden**0.5)  # ‖W‖ ≈ 1 at the start: near-contractive

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


class DigitsDEQ(nn.Module):
    """A DEQ classifier: `head(z*)` with `z* = tanh(W z* + U x + b)`.

    Args:
        hidden: width of `z`.
        max_iter: the solver's own cap (a node's budget replaces it); Anderson, tolerance 1e-4.
    """

    def __init__(self, hidden: int = 64, max_iter: int = 30) -> None:
        super().__init__()
        self.inject = nn.Linear(NUM_FEATURES, hidden)
        # A budget-capped forward stops short of z*, where the IFT's adjoint solve may not converge
        # either; its failed samples get a zero gradient (the library's rule). Ten workers warning
        # about it every batch would bury the log, so both solves stay quiet and the client reports
        # its final forward residual instead.
        self.deq = DEQ(
            _TanhCell(hidden),
            solver=Anderson(memory=5, tol=1e-4, max_iter=max_iter, on_failure="ignore"),
            backward=IFT(on_failure="ignore"),
        )
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))


class DigitsUntied(nn.Module):
    """The explicit twin of `DigitsDEQ`: `z_{l+1} = tanh(W_l z_l + U x + b)`, `z_0 = 0`, `depth` distinct `W_l`."""

    def __init__(self, hidden: int = 64, depth: int = 10) -> None:
        super().__init__()
        self.inject = nn.Linear(NUM_FEATURES, hidden)
        self.cells = nn.ModuleList(_TanhCell(hidden) for _ in range(depth))
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inject(x)
        z = torch.zeros_like(u)
        for cell in self.cells:
            z = cell(z, u)
        return self.head(z)


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(x_pool, y_pool, x_test, y_test)`: the clients' 1,437 images and the server's fixed 360-image test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, digits.target, test_size=TEST_SIZE, stratify=digits.target, random_state=0
    )
    return x_pool, y_pool, x_test, y_test


def partition_indices(
    labels: np.ndarray, num_clients: int, *, alpha: float | None = None, seed: int = 0, min_size: int = 10
) -> list[np.ndarray]:
    """Split `range(len(labels))` over `num_clients` clients, IID (`alpha=None`) or label-skewed.

    Label skew: for each class, the clients' shares are drawn from Dirichlet(α, ..., α) (smaller α,
    more skew); the draw is repeated until every client holds at least `min_size` examples.

    Raises:
        ValueError: `alpha <= 0`, fewer than `num_clients * min_size` examples, or no valid draw in 100 tries.
    """
    if alpha is not None and not alpha > 0:
        raise ValueError(f"partition_indices: alpha must be positive (or None for IID), got {alpha!r}.")
    if num_clients < 1 or len(labels) < num_clients * min_size:
        raise ValueError(
            f"partition_indices: {len(labels)} examples cannot give {num_clients} clients {min_size} each."
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(int)
            for client, share in enumerate(np.split(members, cuts)):
                parts[client].extend(share.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    raise ValueError(f"partition_indices: no Dirichlet({alpha}) draw gave every client {min_size} examples in 100 tries.")


@dataclasses.dataclass(frozen=True)
class DigitsPartitions:
    """The `data_fn` of the digits ClientApp: node `partition-id` of `num-partitions` gets its share.

    Picklable (Flower ships the ClientApp to its workers); the data is loaded inside the call.

    Args:
        alpha: Dirichlet concentration of the label skew, or `None` for IID shares.
        seed: the partition and the train/validation split depend only on it.
        val_fraction: share of each client's examples kept for validation.
    """

    alpha: float | None = None
    seed: int = 0
    val_fraction: float = 0.2

    def __call__(self, context: Any) -> ClientData:
        partition = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        x_pool, y_pool, _, _ = digits_split()
        mine = partition_indices(y_pool, num_partitions, alpha=self.alpha, seed=self.seed)[partition]
        mine = np.random.default_rng((self.seed, partition)).permutation(mine)
        n_val = max(1, int(round(self.val_fraction * len(mine))))
        train, val = mine[n_val:], mine[:n_val]
        return ClientData(
            torch.from_numpy(x_pool[train]), torch.from_numpy(y_pool[train]),
            torch.from_numpy(x_pool[val]), torch.from_numpy(y_pool[val]),
        )


def centralised_evaluator(model_fn: Callable[[], nn.Module]) -> Callable[[int, ArrayRecord], MetricRecord]:
    """The server's centralised evaluation on the 360 test images: `(round, arrays) -> MetricRecord`.

    A DEQ is evaluated with its own solver (the server is not budget-limited).
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        _, _, x_test, y_test = digits_split()
        x, y = torch.from_numpy(x_test), torch.from_numpy(y_test)
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return MetricRecord(
            {"test-loss": float(F.cross_entropy(logits, y)), "test-accuracy": float((logits.argmax(1) == y).float().mean())}
        )

    return evaluate
