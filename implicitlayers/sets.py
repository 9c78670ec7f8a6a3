"""Constraint sets with per-sample Euclidean projections, for constrained `Minimize`/`Maximize`.

Every projection acts on each sample of a `(B, ...)` tensor separately (over its flattened trailing
dimensions), so samples never interact.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ConstraintSet", "Box", "L2Ball", "LInfBall"]


def _like(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | float:
    """`value` as a tensor of `like`'s dtype and device (`None`, an absent centre, is 0)."""
    if value is None:
        return 0.0
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


class ConstraintSet:
    """A closed convex set `C` with a per-sample Euclidean projection `project(v)`."""

    def project(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """The nearest point of the set to each sample of `v`."""
        raise NotImplementedError

    def contains(self, v: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
        """Per-sample `(B,)` bool: whether each sample lies in the set (up to `atol`)."""
        gap = (v - self.project(v)).reshape(v.shape[0], -1).abs().amax(1)
        return gap <= atol


@dataclasses.dataclass(frozen=True)
class Box(ConstraintSet):
    """`lower ≤ v ≤ upper` elementwise; bounds are floats or tensors broadcastable to `v`."""

    lower: float | torch.Tensor = float("-inf")
    upper: float | torch.Tensor = float("inf")

    def __post_init__(self) -> None:
        if isinstance(self.lower, (int, float)) and isinstance(self.upper, (int, float)) and self.lower > self.upper:
            raise ValueError(f"Box: lower ({self.lower}) must not exceed upper ({self.upper}).")

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(v, min=_like(self.lower, v), max=_like(self.upper, v))


def _check_radius(name: str, radius: float) -> None:
    if not isinstance(radius, (int, float)) or radius < 0:
        raise ValueError(f"{name}: radius must be a non-negative number, got {radius!r}.")


@dataclasses.dataclass(frozen=True)
class L2Ball(ConstraintSet):
    """`‖v − center‖₂ ≤ radius` per sample (norm over all trailing dimensions)."""

    radius: float
    center: torch.Tensor | float | None = None

    def __post_init__(self) -> None:
        _check_radius("L2Ball", self.radius)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        c = _like(self.center, v)
        d = v - c
        norm = torch.linalg.vector_norm(d.reshape(v.shape[0], -1), dim=1).reshape((-1,) + (1,) * (v.dim() - 1))
        scale = torch.clamp(self.radius / norm.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)
        return c + d * scale


@dataclasses.dataclass(frozen=True)
class LInfBall(ConstraintSet):
    """`‖v − center‖∞ ≤ radius` per sample."""

    radius: float
    center: torch.Tensor | float | None = None

    def __post_init__(self) -> None:
        _check_radius("LInfBall", self.radius)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        c = _like(self.center, v)
        return c + (v - c).clamp(-self.radius, self.radius)
