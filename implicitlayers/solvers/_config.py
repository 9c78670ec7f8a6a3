"""The options every solver shares, validated once."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

__all__ = ["SolverConfig", "check_int", "check_real"]

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
        check_real(self, "tol", "a positive number (finite)", lambda v: 0 < v < math.inf)
        check_int(self, "max_iter", low=1)
        if self.stop not in _STOPS:
            raise ValueError(f"{type(self).__name__}: stop must be one of {_STOPS}, got {self.stop!r}.")
        if self.on_failure not in _POLICIES:
            raise ValueError(f"{type(self).__name__}: on_failure must be one of {_POLICIES}, got {self.on_failure!r}.")
        if self.check_every is not None:
            check_int(self, "check_every", low=1, also="None or ")
        if not isinstance(self.trace, bool):
            raise ValueError(f"{type(self).__name__}: trace must be a bool, got {self.trace!r}.")

    def replace(self, **changes) -> "SolverConfig":
        """A copy with some options changed (configs are immutable)."""
        return dataclasses.replace(self, **changes)


def check_int(config: object, name: str, *, low: int, also: str = "") -> None:
    """Raise `ValueError` unless the option `name` is an integer >= `low` (a bool is not an integer here)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{type(config).__name__}: {name} must be {also}an integer >= {low}, got {value!r}.")


def check_real(config: object, name: str, valid: str, accept: Callable[[float], bool]) -> None:
    """Raise `ValueError` unless the option `name` is a real number (not a bool) that `accept`s; NaN never passes.

    `valid` describes the valid range for the message (e.g. `"a number in (0, 1]"`).
    """
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not accept(float(value)):
        raise ValueError(f"{type(config).__name__}: {name} must be {valid}, got {value!r}.")
