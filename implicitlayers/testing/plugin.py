"""The pytest plugin of `implicitlayers` (entry point `pytest11`), loaded by every pytest run once the
package is installed.

It adds fixtures only (none is autouse, so no other test changes behaviour) and registers the
Hypothesis profile `"implicitlayers-ci"` without loading it: choose it with
`pytest --hypothesis-profile=implicitlayers-ci`.

Loading the plugin is cheap: this module imports only pytest, and torch, the checks and Hypothesis
are imported when a test first asks for a fixture. The fixtures are session-scoped (each returns a
function or a module, which holds no state), so they also work in Hypothesis `@given` tests, whose
health check rejects function-scoped fixtures.

Fixtures: `il_check_solution`, `il_check_gradients`, `il_check_batch_independence`,
`il_check_convergence` (the functions of `implicitlayers.testing`) and `il_strategies` (the strategies
module; skips the test if Hypothesis is missing).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis's own plugin loads `--hypothesis-profile` in its pytest_configure, so the profile
    # must exist by then (tryfirst). Import Hypothesis only when it is asked for or already loaded:
    # plain pytest runs stay as cheap as without this plugin.
    try:
        wanted = config.getoption("hypothesis_profile", default=None)
    except ValueError:
        wanted = None
    if not (wanted or "hypothesis" in sys.modules) or importlib.util.find_spec("hypothesis") is None:
        return
    from implicitlayers.testing import register_profiles

    register_profiles()


def _check(name: str) -> Callable[..., Any]:
    from implicitlayers import testing

    return getattr(testing, name)


@pytest.fixture(scope="session")
def il_check_solution() -> Callable[..., Any]:
    """`implicitlayers.testing.check_solution`: every condition holds at the returned solution."""
    return _check("check_solution")


@pytest.fixture(scope="session")
def il_check_gradients() -> Callable[..., Any]:
    """`implicitlayers.testing.check_gradients`: gradients against float64 finite differences and unrolling."""
    return _check("check_gradients")


@pytest.fixture(scope="session")
def il_check_batch_independence() -> Callable[..., Any]:
    """`implicitlayers.testing.check_batch_independence`: a batch solves like its samples one by one."""
    return _check("check_batch_independence")


@pytest.fixture(scope="session")
def il_check_convergence() -> Callable[..., Any]:
    """`implicitlayers.testing.check_convergence`: NFE and residual statistics within bounds."""
    return _check("check_convergence")


@pytest.fixture(scope="session")
def il_strategies() -> ModuleType:
    """The module `implicitlayers.testing.strategies` (Hypothesis strategies; skips if Hypothesis is missing)."""
    pytest.importorskip("hypothesis")
    return importlib.import_module("implicitlayers.testing.strategies")
