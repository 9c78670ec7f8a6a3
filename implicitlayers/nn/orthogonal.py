"""A linear layer with a (semi-)orthogonal weight, as placed after LyaDEQ's stability module."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.utils.parametrizations import orthogonal

__all__ = ["OrthogonalLinear"]


class OrthogonalLinear(nn.Linear):
    """`y = W x + b` with `W` orthogonal (square) or semi-orthogonal, kept so through training.

    The weight is `torch.nn.utils.parametrizations.orthogonal` of an unconstrained tensor: a
    matrix exponential (square) or a Householder product (rectangular) of it, with the dynamic
    trivialisation of Lezcano-Casado (2019), so any optimizer (Adam included) steps freely and the
    weight stays orthogonal to float precision. With `out_features ≥ in_features` the columns are
    orthonormal (`WᵀW = I`, an isometry: ‖Wx‖ = ‖x‖); otherwise the rows are (`WWᵀ = I`).

    Being an isometry, the layer cannot pull apart nor collapse the equilibria it receives; in
    LyaDEQ it keeps the stable fixed points of different classes from being mapped close together.

    Args:
        in_features: input dimension.
        out_features: output dimension.
        bias: whether to add a learnable bias.
        orthogonal_map: `"matrix_exp"`, `"cayley"` or `"householder"`; `None` lets torch choose
            (matrix exponential for square weights, Householder otherwise).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        orthogonal_map: Literal["matrix_exp", "cayley", "householder"] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        orthogonal(self, "weight", orthogonal_map=orthogonal_map)
