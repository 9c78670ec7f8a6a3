"""Property-test your own implicit layers: Hypothesis strategies, checks, and a pytest plugin.

The checks ([`check_solution`][implicitlayers.testing.check_solution],
[`check_gradients`][implicitlayers.testing.check_gradients],
[`check_batch_independence`][implicitlayers.testing.check_batch_independence],
[`check_convergence`][implicitlayers.testing.check_convergence]) need only torch and raise
`AssertionError` with a report. The strategies (`implicitlayers.testing.strategies`) need Hypothesis
(the `test` extra). Both load on first use: importing this package imports neither torch nor
Hypothesis.

Profiles: `register_profiles()` registers the Hypothesis profile `"implicitlayers-ci"` (few examples,
no deadline, derandomized); load it with `pytest --hypothesis-profile=implicitlayers-ci` or
`hypothesis.settings.load_profile("implicitlayers-ci")`. Registering never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checks import check_batch_independence as check_batch_independence
    from .checks import check_convergence as check_convergence
    from .checks import check_gradients as check_gradients
    from .checks import check_solution as check_solution

__all__ = [
    "check_solution",
    "check_gradients",
    "check_batch_independence",
    "check_convergence",
    "register_profiles",
    "CI_PROFILE",
]

CI_PROFILE = "implicitlayers-ci"


def register_profiles() -> None:
    """Register the Hypothesis profile `"implicitlayers-ci"` (without loading it).

    20 examples per test, no deadline (a solve's time varies with the drawn problem), derandomized
    (the same examples on every CI run), and no `too_slow` health check.
    """
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        CI_PROFILE,
        max_examples=20,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Loaded on first use (PEP 562), so that importing this package (the pytest plugin does, in every
# pytest run of an environment where implicitlayers is installed) imports neither torch nor Hypothesis.
_CHECKS = ("check_solution", "check_gradients", "check_batch_independence", "check_convergence")


def __getattr__(name: str) -> Any:
    if name in _CHECKS:
        value = getattr(importlib.import_module("implicitlayers.testing.checks"), name)
    elif name == "strategies":
        value = importlib.import_module("implicitlayers.testing.strategies")
    else:
        raise AttributeError(f"module 'implicitlayers.testing' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_CHECKS, "strategies"})
