"""Specification of the pytest plugin `implicitlayers.testing.plugin`: its fixtures run the checks (also
inside Hypothesis `@given` tests), it registers the CI profile without loading it, and loading it
imports neither torch nor Hypothesis."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from hypothesis import settings

pytest_plugins = ["pytester"]

# The in-process pytester runs drop the modules first imported inside them; the package's lazy names
# would then import torch's operator libraries a second time (torch refuses). Load them all here.
import implicitlayers as _il  # noqa: E402

for _name in _il.__all__:
    getattr(_il, _name)
import implicitlayers.testing.checks  # noqa: E402, F401

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "implicitlayers"

LAYER = """
import torch, implicitlayers as il

def make(solver):
    z, x = il.Variable("z"), il.Input("x")
    return il.ImplicitLayer(il.Problem([il.FixedPoint(z, lambda z_, x_: 0.5 * torch.tanh(z_) + x_, (z, x))]),
                            [x], [z], solver=solver, init={"z": torch.zeros(3)})
"""


@pytest.fixture
def restore_hypothesis_profile():
    name = settings.get_current_profile_name()
    yield
    settings.load_profile(name)


def test_fixtures_run_the_checks(pytester, restore_hypothesis_profile):
    pytester.makepyfile(
        LAYER
        + """
def test_good(il_check_solution, il_check_batch_independence, il_check_convergence, il_check_gradients):
    layer, x = make(il.Anderson(tol=1e-6)), torch.randn(2, 3)
    il_check_solution(layer, x)
    il_check_batch_independence(layer, x)
    il_check_convergence(layer, x, max_nfe=50)
    il_check_gradients(layer, x, wrt_parameters=False)

def test_early(il_check_solution):
    il_check_solution(make(il.Anderson(max_iter=1, on_failure="ignore")), torch.randn(2, 3))

def test_they_are_the_public_checks(il_check_solution, il_check_gradients, il_strategies):
    from implicitlayers import testing
    assert il_check_solution is testing.check_solution and il_check_gradients is testing.check_gradients
    assert il_strategies is testing.strategies

def test_strategies(il_strategies):
    from hypothesis import given, settings

    assert settings.get_current_profile_name() == "implicitlayers-ci"

    @given(il_strategies.problem_graphs())
    def check(graph):
        assert graph.problem.blocks

    check()
"""
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--hypothesis-profile=implicitlayers-ci")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*FixedPoint(z) in block 0 (z): 2/2 samples violate it*"])


def test_fixtures_work_inside_given_tests(pytester, restore_hypothesis_profile):
    # Hypothesis fails a @given test that uses a function-scoped fixture (its health check), and it
    # runs this one under the default profile, where that health check is on.
    pytester.makepyfile(
        LAYER
        + """
from hypothesis import given, settings, strategies as st

@settings(max_examples=3, deadline=None)
@given(batch=st.integers(2, 4), scale=st.floats(0.1, 2.0))
def test_drawn_inputs(il_check_solution, il_check_batch_independence, il_strategies, batch, scale):
    layer, x = make(il.Anderson(tol=1e-7, max_iter=100)), scale * torch.randn(batch, 3)
    il_check_solution(layer, x)
    il_check_batch_independence(layer, x)
"""
    )
    settings.load_profile("default")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_registers_the_ci_profile_without_loading_it(pytester, restore_hypothesis_profile):
    settings.load_profile("default")  # as in a run without --hypothesis-profile
    pytester.makepyfile(
        """
        from hypothesis import settings

        def test_profile():
            assert settings.get_current_profile_name() == "default"
            ci = settings.get_profile("implicitlayers-ci")
            assert ci.deadline is None and ci.derandomize and ci.max_examples == 20
        """
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def _import_cost(code: str) -> dict:
    """Run `code` in a fresh interpreter; returns which heavy modules it imported and the seconds it took."""
    probe = (
        "import sys, time, json\nstart = time.perf_counter()\n" + code + "\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, "
        "'loaded': sorted(m for m in ('torch', 'hypothesis', 'implicitlayers.layer') if m in sys.modules)}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_plugin_and_the_testing_package_import_neither_torch_nor_hypothesis():
    # The package root is replaced by a bare stand-in, so this measures what the plugin module and
    # `implicitlayers.testing` themselves import (the root's own imports are the next test's subject).
    cost = _import_cost(
        "import types\n"
        f"root = types.ModuleType('implicitlayers'); root.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['implicitlayers'] = root\n"
        "import implicitlayers.testing.plugin"
    )
    assert cost["loaded"] == []


def test_loading_the_plugin_entry_point_does_not_import_torch():
    cost = _import_cost("import implicitlayers.testing.plugin")
    assert "torch" not in cost["loaded"], f"loading the plugin imported torch ({cost['seconds']:.2f} s)"
