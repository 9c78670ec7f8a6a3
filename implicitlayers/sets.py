"""Constraint sets with per-sample Euclidean projections, for constrained `Minimize`/`Maximize`.

Every projection acts on each sample of a `(B, ...)` tensor separately (over its flattened trailing
dimensions), so samples never interact.

Each set also computes the *natural residual* `v − Π(v − s)` of a step `s` without cancellation
(`natural_residual`): written as a difference, it rounds to exactly 0 once `|v| ≫ |s| / eps` along an
unbounded direction, which would report a point far from the solution as converged.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["ConstraintSet", "Box", "L2Ball", "LInfBall"]


def _like(value: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | float:
    """`value` as a tensor of `like`'s dtype and device (`None`, an absent centre, is 0)."""
    if value is None:
        return 0.0
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _check_bound(owner: str, what: str, value: object, *, allow_inf: int = 0) -> None:
    """Reject NaN bounds (and infinite ones of the wrong sign: `allow_inf` is −1, +1, or 0 for none)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{owner}: {what} must be a number or a tensor, got {type(value).__name__}.")
    t = torch.as_tensor(value, dtype=torch.float64) if not isinstance(value, torch.Tensor) else value.detach()
    if t.is_floating_point() and t.device.type != "meta":
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{owner}: {what} contains NaN.")
        bad = torch.isinf(t) & ~((t > 0) if allow_inf > 0 else (t < 0) if allow_inf < 0 else torch.zeros_like(t, dtype=torch.bool))
        if bool(bad.any()):
            sign = {1: "+inf", -1: "-inf", 0: "no infinity"}[allow_inf]
            raise ValueError(f"{owner}: {what} must be finite (it may be {sign}), got an infinite value.")


class ConstraintSet:
    """A closed convex set `C` with a per-sample Euclidean projection `project(v)`."""

    def project(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """The nearest point of the set to each sample of `v`."""
        raise NotImplementedError

    def natural_residual(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """`v − Π(v − step)`, computed without cancellation where the set allows it.

        The default is the plain difference; sets whose projection is known in closed form override it.
        """
        return v - self.project(v - step)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set's tensor-valued parameters by name (bounds, centres), for shape checks."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}  # type: ignore[arg-type]

    def check_shape(self, shape: tuple[int, ...], owner: str) -> None:
        """Raise a `ValueError` naming `owner` when a tensor parameter does not broadcast to one sample of `shape`."""
        for name, t in self.tensors().items():
            try:
                ok = torch.broadcast_shapes(tuple(t.shape), shape) == tuple(shape)
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{owner}: the {type(self).__name__}'s {name} has shape {tuple(t.shape)}, which does not broadcast to one "
                    f"sample of the variable, shape {tuple(shape)}; give it that shape (or one that broadcasts to it)."
                )

    def contains(self, v: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
        """Per-sample `(B,)` bool: whether each sample lies in the set (up to `atol`)."""
        gap = (v - self.project(v)).reshape(v.shape[0], -1).abs().amax(1)
        return gap <= atol


@dataclasses.dataclass(frozen=True)
class Box(ConstraintSet):
    """`lower ≤ v ≤ upper` elementwise; bounds are floats or tensors broadcastable to `v`.

    `lower` may be `-inf` and `upper` `+inf` (unbounded sides); NaN bounds and an empty box
    (`lower > upper` anywhere) are errors.
    """

    lower: float | torch.Tensor = float("-inf")
    upper: float | torch.Tensor = float("inf")

    def __post_init__(self) -> None:
        _check_bound("Box", "lower", self.lower, allow_inf=-1)
        _check_bound("Box", "upper", self.upper, allow_inf=1)
        lo = torch.as_tensor(self.lower, dtype=torch.float64) if not isinstance(self.lower, torch.Tensor) else self.lower.detach()
        hi = torch.as_tensor(self.upper, dtype=torch.float64) if not isinstance(self.upper, torch.Tensor) else self.upper.detach()
        if "meta" in (lo.device.type, hi.device.type):
            return
        try:
            shape = torch.broadcast_shapes(lo.shape, hi.shape)
        except RuntimeError as err:
            raise ValueError(
                f"Box: lower {tuple(lo.shape)} and upper {tuple(hi.shape)} do not broadcast against each other."
            ) from err
        lo, hi = lo.to(hi.device, torch.float64).broadcast_to(shape), hi.to(torch.float64).broadcast_to(shape)
        empty = lo > hi
        if bool(empty.any()):
            where = tuple(int(i) for i in empty.nonzero()[0]) if empty.dim() else ()
            raise ValueError(
                f"Box: the set is empty: lower > upper (first at index {where}: {float(lo[where]):g} > {float(hi[where]):g}); "
                "lower must not exceed upper anywhere."
            )

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(v, min=_like(self.lower, v), max=_like(self.upper, v))

    def natural_residual(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # v − clamp(v − s, l, u) = clamp(s, v − u, v − l) exactly: no difference of two huge numbers.
        return torch.clamp(step, min=v - _like(self.upper, v), max=v - _like(self.lower, v))


def _check_radius(name: str, radius: float) -> None:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"{name}: radius must be a non-negative number, finite, got {radius!r}.")


def _check_center(name: str, center: object) -> None:
    if center is not None:
        _check_bound(name, "center", center)


@dataclasses.dataclass(frozen=True)
class L2Ball(ConstraintSet):
    """`‖v − center‖₂ ≤ radius` per sample (norm over all trailing dimensions)."""

    radius: float
    center: torch.Tensor | float | None = None

    def __post_init__(self) -> None:
        _check_radius("L2Ball", self.radius)
        _check_center("L2Ball", self.center)

    def _scale(self, d: torch.Tensor) -> torch.Tensor:
        """Per-sample factor `min(1, r/‖d‖)`, shaped to broadcast against `d`."""
        norm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1).reshape((-1,) + (1,) * (d.dim() - 1))
        return torch.clamp(self.radius / norm.clamp_min(torch.finfo(d.dtype).tiny), max=1.0)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        c = _like(self.center, v)
        d = v - c
        return c + d * self._scale(d)

    def natural_residual(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # Centred: u − Π(u − s) = s when u − s lies in the ball (exact), else u − r (u − s)/‖u − s‖.
        u = v - _like(self.center, v)
        d = u - step
        scale = self._scale(d)
        inside = scale >= 1.0
        return torch.where(inside, step, u - d * scale)


@dataclasses.dataclass(frozen=True)
class LInfBall(ConstraintSet):
    """`‖v − center‖∞ ≤ radius` per sample."""

    radius: float
    center: torch.Tensor | float | None = None

    def __post_init__(self) -> None:
        _check_radius("LInfBall", self.radius)
        _check_center("LInfBall", self.center)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        c = _like(self.center, v)
        return c + (v - c).clamp(-self.radius, self.radius)

    def natural_residual(self, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # A box around the centre: the same exact clamp as `Box.natural_residual`.
        u = v - _like(self.center, v)
        return torch.clamp(step, min=u - self.radius, max=u + self.radius)
