"""Errors and warnings raised when an implicit solve does not converge."""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "ConvergenceError"]


class ConvergenceWarning(UserWarning):
    """A forward or backward solve stopped before every sample reached its tolerance.

    The message names the block, the worst residual (and its sample), the iteration cap and
    what to try. Silence it with the solver's `on_failure="ignore"`; escalate with `"raise"`.
    """


class ConvergenceError(RuntimeError):
    """A solve with `on_failure="raise"` stopped before every sample reached its tolerance."""
