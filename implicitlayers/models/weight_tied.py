"""`WeightTied`: the explicit baseline of a DEQ, the same cell applied a fixed number of times."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["WeightTied"]


class WeightTied(nn.Module):
    """`z_{k+1} = cell(z_k, x)` for `depth` steps from `z_0`, backpropagated through every step.

    The network a DEQ is the limit of: with a contractive cell, `WeightTied(cell, depth)(x)` tends
    to `il.DEQ(cell)(x)` as `depth` grows, and so do its gradients. Training memory grows linearly
    with `depth` (every step's activations are kept), which is what the DEQ's implicit backward
    avoids; `benchmarks/deq.py` compares the two at `depth` = the DEQ's forward NFE.

    Args:
        cell: the map `(z, x) -> z'`; an `nn.Module` is registered as the submodule `cell`.
        depth: the number of applications (≥ 1).
        z_init: `None` (zeros shaped like `x`), a tensor (one sample's shape, or batched), or a
            callable of `x`, as for `il.DEQ`.
    """

    def __init__(
        self,
        cell: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        depth: int,
        *,
        z_init: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"WeightTied: cell must be a callable (z, x) -> z' or an nn.Module, got {type(cell).__name__}.")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"WeightTied: depth must be an integer >= 1, got {depth!r}.")
        if z_init is not None and not (isinstance(z_init, torch.Tensor) or callable(z_init)):
            raise TypeError(f"WeightTied: z_init must be None, a tensor or a callable of x, got {type(z_init).__name__}.")
        self.cell = cell
        self.depth = depth
        if isinstance(z_init, torch.Tensor):
            self.register_buffer("z_init", z_init.detach().clone())
        else:
            self.z_init = z_init

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.z_init is None:
            return torch.zeros_like(x)
        if isinstance(self.z_init, torch.Tensor):
            start = self.z_init.to(dtype=x.dtype, device=x.device)
            return start if start.dim() > 1 and start.shape[0] == x.shape[0] else start.expand(x.shape[0], *start.shape)
        return self.z_init(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`z_depth` for the batch `x`."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"WeightTied: x must be a tensor with a leading batch dimension, got {x!r:.60}.")
        z = self._start(x)
        for _ in range(self.depth):
            z = self.cell(z, x)
        return z

    def extra_repr(self) -> str:
        return f"depth={self.depth}"
