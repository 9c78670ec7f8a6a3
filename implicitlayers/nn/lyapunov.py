"""Learned convex, positive-definite Lyapunov candidates (Kolter & Manek, 2019), for LyaDEQ."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .icnn import ICNN, PICNN

__all__ = ["ConditionalLyapunovFunction", "LyapunovFunction", "smooth_relu"]


def smooth_relu(x: torch.Tensor, d: float = 0.1) -> torch.Tensor:
    """A twice continuously differentiable ReLU: zero for `x ≤ 0`, `x − d/2` for `x ≥ d`.

    Its second derivative is the triangle that rises linearly from 0 at `x = 0` to `2/d` at `x = d/2`
    and falls back to 0 at `x = d`, so the function is convex, non-decreasing and C². In between it
    is cubic: `2x³/(3d²)` on `[0, d/2]` and `d/2 − s + 2s³/(3d²)` with `s = d − x` on `[d/2, d]`.
    Kolter & Manek's rectified Huber unit (quadratic on `[0, d]`) is only C¹; the extra smoothness
    keeps the Hessian of V continuous, which the IFT of a projected DEQ differentiates through.
    """
    if not d > 0:
        raise ValueError(f"smooth_relu: d must be positive, got {d!r}.")
    low = 2.0 * x.pow(3) / (3.0 * d * d)
    s = d - x
    high = 0.5 * d - s + 2.0 * s.pow(3) / (3.0 * d * d)
    middle = torch.where(x <= 0.5 * d, low, high)
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x >= d, x - 0.5 * d, middle))


def _candidate(gap: torch.Tensor, offset: torch.Tensor, eps: float, smoothing: float) -> torch.Tensor:
    """`σ(gap) + eps ‖offset‖²`: convex and zero at the centre when `gap` is convex and zero there."""
    return smooth_relu(gap, smoothing) + eps * offset.pow(2).sum(dim=1)


def _check_options(who: str, eps: float, smoothing: float) -> None:
    if not eps > 0:
        raise ValueError(f"{who}: eps must be positive (it makes V positive definite), got {eps!r}.")
    if not smoothing > 0:
        raise ValueError(f"{who}: smoothing must be positive, got {smoothing!r}.")


def _value_and_grad(value: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(V(z), ∇_z V(z))` of a per-sample `V`, by `torch.func` (usable under `no_grad` and inside transforms).

    Samples do not interact, so the gradient of the batch sum is each sample's gradient.
    """

    def total(z_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = value(z_)
        return values.sum(), values

    grad, (_, values) = torch.func.grad_and_value(total, has_aux=True)(z)
    return values, grad


class LyapunovFunction(nn.Module):
    """`V(z) = σ(g(z) − g(z_ref)) + eps · ‖z − z_ref‖²` with `g` an [`ICNN`][implicitlayers.nn.ICNN].

    The construction of Kolter & Manek (2019, "Learning stable deep dynamics models"), centred at a
    reference point `z_ref` (the origin by default) instead of at 0, with `σ` =
    `smooth_relu` (in `implicitlayers.nn.lyapunov`):

    - **zero at the reference**: `σ(0) = 0` and the quadratic vanishes, so `V(z_ref) = 0`;
    - **positive definite**: `σ ≥ 0`, so `V(z) ≥ eps · ‖z − z_ref‖² > 0` for `z ≠ z_ref`, and V is
      radially unbounded;
    - **convex in z**: `g(z) − g(z_ref)` is convex, `σ` is convex and non-decreasing, and adding a
      convex quadratic keeps convexity; so V has no local minima other than `z_ref`;
    - **C²**: softplus ICNN and the C² `σ`, so `∇V` (for the stable-dynamics projection) can itself
      be differentiated.

    For a DEQ, pass an input-dependent `z_ref` (e.g. a learned map of the input): a V whose minimum
    is the same point for every input makes every input converge to the same equilibrium.

    Args:
        dim: the dimension of `z`.
        hidden: the ICNN's hidden widths.
        eps: weight of the quadratic term (> 0).
        smoothing: the width `d` of `σ`'s smoothed region (> 0).

    Shape:
        `z`: `(B, dim)`; `z_ref`: `(B, dim)`, `(dim,)` or `None` (zeros); output `(B,)`.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        *,
        eps: float = 1e-2,
        smoothing: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_options("LyapunovFunction", eps, smoothing)
        self.dim = dim
        self.eps = eps
        self.smoothing = smoothing
        self.icnn = ICNN(dim, hidden, device=device, dtype=dtype)

    def forward(self, z: torch.Tensor, z_ref: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"LyapunovFunction: expected z of shape (B, {self.dim}), got {tuple(z.shape)}.")
        if z_ref is not None and (z_ref.dim() > 2 or z_ref.shape[-1:] != z.shape[-1:]):
            raise ValueError(
                f"LyapunovFunction: z_ref must be one point ({self.dim},) or one per sample (B, {self.dim}), got {tuple(z_ref.shape)}."
            )
        z_ref = torch.zeros_like(z) if z_ref is None else z_ref.expand_as(z)
        gap = self.icnn(z) - self.icnn(z_ref)
        return _candidate(gap, z - z_ref, self.eps, self.smoothing)

    def value_and_grad(self, z: torch.Tensor, z_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(V(z), ∇_z V(z))`, shapes `(B,)` and `(B, dim)`.

        Computed with `torch.func.grad_and_value`, so it works inside the solver's `no_grad` loop,
        inside `torch.func` transforms (the IFT's `vjp`), and stays differentiable with respect to
        `z`, `z_ref` and the parameters under ordinary autograd (double backward included).
        """
        return _value_and_grad(lambda z_: self(z_, z_ref), z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, smoothing={self.smoothing}"


class ConditionalLyapunovFunction(nn.Module):
    """`V(z; x) = σ(g(z, x) − g(c(x), x)) + eps · ‖z − c(x)‖²`: convex in `z`, minimal at a learned `c(x)`.

    `g` is a [`PICNN`][implicitlayers.nn.PICNN] (convex in `z` for each context `x`) and `c` a learned
    affine map of the context, so for every `x` the function has the properties of
    [`LyapunovFunction`][implicitlayers.nn.LyapunovFunction] centred at `c(x)`: `V(c(x); x) = 0`,
    `V ≥ eps ‖z − c(x)‖²`, convex and C² in `z`.

    Args:
        dim: the dimension of `z`.
        context_features: the dimension of the context `x`.
        hidden: the PICNN's hidden widths.
        eps: weight of the quadratic term (> 0).
        smoothing: the width `d` of `σ`'s smoothed region (> 0).

    Shape:
        `z`: `(B, dim)`; `x`: `(B, context_features)`; output `(B,)`.
    """

    def __init__(
        self,
        dim: int,
        context_features: int,
        hidden: Sequence[int] = (64, 64),
        *,
        eps: float = 1e-2,
        smoothing: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_options("ConditionalLyapunovFunction", eps, smoothing)
        self.dim = dim
        self.context_features = context_features
        self.eps = eps
        self.smoothing = smoothing
        self.picnn = PICNN(dim, context_features, hidden, device=device, dtype=dtype)
        self.centre_map = nn.Linear(context_features, dim, device=device, dtype=dtype)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The minimiser `c(x)`, shape `(B, dim)`."""
        return self.centre_map(x)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"ConditionalLyapunovFunction: expected z of shape (B, {self.dim}), got {tuple(z.shape)}.")
        centre = self.centre(x)
        gap = self.picnn(z, x) - self.picnn(centre, x)
        return _candidate(gap, z - centre, self.eps, self.smoothing)

    def value_and_grad(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(V(z; x), ∇_z V(z; x))`, shapes `(B,)` and `(B, dim)`, differentiable like `LyapunovFunction`'s."""
        return _value_and_grad(lambda z_: self(z_, x), z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_features={self.context_features}, eps={self.eps}, smoothing={self.smoothing}"
