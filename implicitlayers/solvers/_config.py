"""The options every solver shares, validated once."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["SolverConfig"]

_STOPS = ("rel", "abs")
_POLICIES = ("warn", "raise", "ignore")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverConfig:
    """Shared, immutable solver options.

    Args:
        tol: per-sample tolerance on the stopping measure.
        max_iter: iteration cap.
        stop: `"rel"` (‖R(w)‖ / (‖w‖ + 1e-8)) or `"abs"` (‖R(w)‖), per sample.
        on_failure: `"warn"` (default, `ConvergenceWarning`), `"raise"` (`ConvergenceError`) or `"ignore"`.
        check_every: test "every sample converged" on the host every k iterations; `None` picks 1 on
            CPU and 8 on CUDA, where each test is a device-to-host sync.
        trace: record every iteration's per-sample residual in `SolveInfo.trace`.

    Unknown keyword arguments raise `TypeError` (these are dataclasses); invalid values raise `ValueError`.
    """

    tol: float = 1e-4
    max_iter: int = 50
    stop: Literal["rel", "abs"] = "rel"
    on_failure: Literal["warn", "raise", "ignore"] = "warn"
    check_every: int | None = None
    trace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise ValueError(f"{type(self).__name__}: tol must be a positive number, got {self.tol!r}.")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"{type(self).__name__}: max_iter must be an integer >= 1, got {self.max_iter!r}.")
        if self.stop not in _STOPS:
            raise ValueError(f"{type(self).__name__}: stop must be one of {_STOPS}, got {self.stop!r}.")
        if self.on_failure not in _POLICIES:
            raise ValueError(f"{type(self).__name__}: on_failure must be one of {_POLICIES}, got {self.on_failure!r}.")
        if self.check_every is not None and (not isinstance(self.check_every, int) or self.check_every < 1):
            raise ValueError(f"{type(self).__name__}: check_every must be None or an integer >= 1, got {self.check_every!r}.")

    def replace(self, **changes) -> "SolverConfig":
        """A copy with some options changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)
