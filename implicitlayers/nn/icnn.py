"""Input-convex neural networks (Amos, Xu & Kolter, 2017): fully (`ICNN`) and partially (`PICNN`) convex."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ICNN", "PICNN"]


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _init_nonnegative(raw_weights: nn.ParameterList) -> None:
    """Raw weights whose softplus is near `U(0, 2/fan_in)`: each layer averages the previous one."""
    with torch.no_grad():
        for raw in raw_weights:
            fan_in = raw.shape[1]
            target = torch.empty_like(raw).uniform_(0.0, 2.0 / fan_in).clamp_min(1e-6 / fan_in)
            raw.copy_(_inverse_softplus(target))


class ICNN(nn.Module):
    """A scalar network `g(x)` that is convex in `x` by construction, and smooth (C^∞).

    With `x` the input and `z_k` the hidden layers:

    ```
    z_1     = softplus(W_0 x + b_0)
    z_{k+1} = softplus(U_k z_k + W_k x + b_k)        k = 1, ..., L−1
    g(x)    = u_L · z_L + w_L · x + b_L
    ```

    Convexity holds because an affine function of `x` is convex, a non-negative combination of
    convex functions is convex, and a convex non-decreasing function (softplus) of a convex
    function is convex. The hidden-to-hidden weights `U_k` and `u_L` are therefore kept
    non-negative by the reparametrisation `U = softplus(U_raw)` — valid after every optimizer step,
    with no projection to remember. The passthrough weights `W_k` act on `x` directly and are
    unconstrained; they give the network the expressiveness that non-negative `U_k` take away.

    The non-negative weights start near `U(0, 2/fan_in)`, so each layer averages the previous one
    and activations neither explode nor vanish with depth.

    Args:
        in_features: the dimension of `x`.
        hidden: widths of the hidden layers (at least one).

    Shape:
        `(B, in_features) -> (B,)`.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (64, 64), *, device=None, dtype=None) -> None:
        super().__init__()
        hidden = tuple(hidden)
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"ICNN: in_features must be a positive integer, got {in_features!r}.")
        if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"ICNN: hidden must be a non-empty sequence of positive integers, got {hidden!r}.")
        self.in_features = in_features
        self.hidden = hidden
        factory = {"device": device, "dtype": dtype}
        widths = hidden + (1,)
        # Passthrough x -> layer k (k = 0 is the first layer), unconstrained, with the biases.
        self.passthrough = nn.ModuleList(nn.Linear(in_features, w, **factory) for w in widths)
        # Hidden-to-hidden weights, stored raw; softplus makes them non-negative.
        self.raw_hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(w_out, w_in, **factory)) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.passthrough:
            layer.reset_parameters()
        _init_nonnegative(self.raw_hidden_weights)

    @property
    def hidden_weights(self) -> list[torch.Tensor]:
        """The effective non-negative hidden-to-hidden weights `U_k` (the last is `u_L`, shape `(1, h_L)`)."""
        return [F.softplus(raw) for raw in self.raw_hidden_weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ICNN: expected input of shape (B, {self.in_features}), got {tuple(x.shape)}.")
        z = F.softplus(self.passthrough[0](x))
        for k, raw in enumerate(self.raw_hidden_weights, start=1):
            pre = F.linear(z, F.softplus(raw)) + self.passthrough[k](x)
            z = pre if k == len(self.raw_hidden_weights) else F.softplus(pre)
        return z.squeeze(-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}"



class PICNN(nn.Module):
    """A scalar network `g(y, x)` that is convex in `y` for every `x` (partially input-convex, smooth).

    The context `x` runs through an ordinary network; the convex path in `y` is an
    [`ICNN`][implicitlayers.nn.ICNN] whose biases and passthrough weights the context sets:

    ```
    h_0     = x,            h_{k+1} = softplus(A_k h_k + a_k)                 (context path, any sign)
    z_1     = softplus(W_0 y + C_0 h_0)
    z_{k+1} = softplus(U_k z_k + W_k (y ⊙ (D_k h_k + 1)) + C_k h_k)        k = 1, ..., L−1
    g(y, x) = u_L · z_L + w_L · (y ⊙ (D_L h_L + 1)) + C_L h_L
    ```

    For a fixed `x`, each pre-activation is a non-negative combination (`U_k = softplus(U_raw) ≥ 0`)
    of convex functions of `y` plus a function affine in `y`, so every `z_k` and `g` are convex in
    `y` (Amos, Xu & Kolter, 2017, the partially input-convex network); `g` need not be convex in `x`.
    The `+ 1` starts the `y`-passthrough as in a plain ICNN (`D_k` starts at zero).

    Args:
        in_features: the dimension of the convex input `y`.
        context_features: the dimension of the context `x`.
        hidden: widths of the hidden layers (at least one); the context path has the same widths.

    Shape:
        `y`: `(B, in_features)`, `x`: `(B, context_features)` -> `(B,)`.
    """

    def __init__(
        self, in_features: int, context_features: int, hidden: Sequence[int] = (64, 64), *, device=None, dtype=None
    ) -> None:
        super().__init__()
        hidden = tuple(hidden)
        for name, value in (("in_features", in_features), ("context_features", context_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PICNN: {name} must be a positive integer, got {value!r}.")
        if not hidden or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"PICNN: hidden must be a non-empty sequence of positive integers, got {hidden!r}.")
        self.in_features = in_features
        self.context_features = context_features
        self.hidden = hidden
        factory = {"device": device, "dtype": dtype}
        widths = hidden + (1,)
        contexts = (context_features,) + hidden  # width of h_k, k = 0..L
        self.context = nn.ModuleList(nn.Linear(c_in, c_out, **factory) for c_in, c_out in zip(contexts[:-1], contexts[1:]))
        self.passthrough = nn.ModuleList(nn.Linear(in_features, w, bias=False, **factory) for w in widths)
        self.context_bias = nn.ModuleList(nn.Linear(c, w, **factory) for c, w in zip(contexts, widths))
        # D_k (k ≥ 1): the context's multiplicative gate on y, zero at the start.
        self.gates = nn.ModuleList(nn.Linear(c, in_features, **factory) for c in contexts[1:])
        self.raw_hidden_weights = nn.ParameterList(
            nn.Parameter(torch.empty(w_out, w_in, **factory)) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (*self.context, *self.passthrough, *self.context_bias):
            layer.reset_parameters()
        for gate in self.gates:
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        _init_nonnegative(self.raw_hidden_weights)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 or y.shape[1] != self.in_features:
            raise ValueError(f"PICNN: expected y of shape (B, {self.in_features}), got {tuple(y.shape)}.")
        if x.dim() != 2 or x.shape != (y.shape[0], self.context_features):
            raise ValueError(f"PICNN: expected x of shape ({y.shape[0]}, {self.context_features}), got {tuple(x.shape)}.")
        h = x
        z = F.softplus(self.passthrough[0](y) + self.context_bias[0](h))
        for k, raw in enumerate(self.raw_hidden_weights, start=1):
            h = F.softplus(self.context[k - 1](h))
            gated = y * (self.gates[k - 1](h) + 1.0)
            pre = F.linear(z, F.softplus(raw)) + self.passthrough[k](gated) + self.context_bias[k](h)
            z = pre if k == len(self.raw_hidden_weights) else F.softplus(pre)
        return z.squeeze(-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, context_features={self.context_features}, hidden={self.hidden}"
