"""Solver history kept between solves (`implicitlayers.solvers._workspace`): reuse must never change a
result, never share a buffer between solves running at once, and stay within its limits."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers.solvers import _workspace

SOLVERS = {
    "anderson": lambda: il.Anderson(memory=4, tol=1e-10, max_iter=60, on_failure="ignore"),
    "broyden": lambda: il.Broyden(memory=5, tol=1e-10, max_iter=60, on_failure="ignore"),
}


@pytest.fixture(autouse=True)
def _fresh_workspace():
    _workspace.clear_workspace()
    yield
    _workspace.set_workspace_limit(256 * 2**20)
    _workspace.clear_workspace()


def _contractive_map(batch: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=g, dtype=dtype)
    A = 0.8 * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(batch, dim, generator=g, dtype=dtype)
    return lambda z: torch.tanh(torch.bmm(A, z[..., None])[..., 0] + b)


def _without_workspace(f, z0, solver):
    """The solve with freshly allocated buffers (limit 0 frees everything kept, and keeps nothing)."""
    limit = _workspace._state["limit"]
    _workspace.set_workspace_limit(0)
    try:
        return il.fixed_point(f, z0, solver=solver)
    finally:
        _workspace.set_workspace_limit(limit)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_repeated_solves_reuse_the_history_and_give_identical_results(name):
    solver, f = SOLVERS[name](), _contractive_map(3, 7, seed=0)
    z0 = torch.zeros(3, 7, dtype=torch.float64)
    first = il.fixed_point(f, z0, solver=solver)
    kept = _workspace.workspace_bytes()
    assert kept > 0
    again = il.fixed_point(f, z0, solver=solver)
    assert _workspace.workspace_bytes() == kept  # the same object went out and came back
    fresh = _without_workspace(f, z0, solver)  # limit 0 frees what is kept: these buffers are new
    for other in (again, fresh):
        assert torch.equal(first.value, other.value)
        assert torch.equal(first.info.nstep, other.info.nstep)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(SOLVERS)),
    seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4),
    batch=st.integers(1, 4),
    dim=st.integers(1, 9),
)
def test_what_an_earlier_solve_left_in_the_history_never_leaks_into_the_next(name, seeds, batch, dim):
    solver = SOLVERS[name]()
    z0 = torch.zeros(batch, dim, dtype=torch.float64)
    for seed in seeds:  # different problems of one shape, one after another through the same buffers
        f = _contractive_map(batch, dim, seed)
        reused = il.fixed_point(f, z0, solver=solver)
        fresh = _without_workspace(f, z0, solver)
        assert torch.equal(reused.value, fresh.value)
        assert torch.equal(reused.info.residual, fresh.info.residual)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_solve_nested_in_another_of_the_same_shape_gets_its_own_buffers(name):
    solver, inner = SOLVERS[name](), _contractive_map(2, 5, seed=1)
    z0 = torch.zeros(2, 5, dtype=torch.float64)

    def outer(z):  # each evaluation runs a whole solve of the same shape with the same solver
        return 0.5 * torch.tanh(z + il.fixed_point(inner, z, solver=solver).value)

    nested = il.fixed_point(outer, z0, solver=solver)
    _workspace.set_workspace_limit(0)
    reference = il.fixed_point(outer, z0, solver=solver)
    assert torch.equal(nested.value, reference.value)
    assert bool(nested.info.converged.all())


def test_a_solve_that_raises_hands_its_history_back():
    solver, f = SOLVERS["anderson"](), _contractive_map(2, 4, seed=2)
    z0 = torch.zeros(2, 4, dtype=torch.float64)
    calls = []

    def breaks(z):
        calls.append(None)
        if len(calls) == 4:
            raise RuntimeError("the map broke")
        return f(z)

    with pytest.raises(RuntimeError, match="the map broke"):
        il.fixed_point(breaks, z0, solver=solver)
    assert _workspace.workspace_bytes() > 0
    torch.testing.assert_close(il.fixed_point(f, z0, solver=solver).value, _without_workspace(f, z0, solver).value, rtol=0, atol=0)


def test_the_limits_hold_and_lowering_the_limit_frees():
    solver = SOLVERS["anderson"]()
    for dim in range(1, 41):  # 40 shapes: more objects than the count limit
        il.fixed_point(_contractive_map(1, dim, seed=dim), torch.zeros(1, dim, dtype=torch.float64), solver=solver)
    assert _workspace._state["objects"] == _workspace._MAX_OBJECTS
    kept = _workspace.workspace_bytes()
    _workspace.set_workspace_limit(kept // 2)
    assert 0 < _workspace.workspace_bytes() <= kept // 2
    _workspace.set_workspace_limit(0)
    assert _workspace.workspace_bytes() == 0 and _workspace._state["objects"] == 0
    il.fixed_point(_contractive_map(1, 3, seed=0), torch.zeros(1, 3, dtype=torch.float64), solver=solver)
    assert _workspace.workspace_bytes() == 0
    _workspace.set_workspace_limit(2**20)
    il.fixed_point(_contractive_map(1, 3, seed=0), torch.zeros(1, 3, dtype=torch.float64), solver=solver)
    assert _workspace.workspace_bytes() > 0
    il.solvers.clear_workspace()
    assert il.solvers.workspace_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1MB"])
def test_a_bad_limit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="nbytes must be an integer >= 0"):
        il.solvers.set_workspace_limit(bad)


def test_concurrent_solves_in_threads_agree_with_solves_alone():
    solver = SOLVERS["anderson"]()
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    maps = [_contractive_map(3, 6, seed=s) for s in range(4)]
    expected = [_without_workspace(f, z0, solver).value for f in maps]
    errors: list[str] = []

    def work(index: int) -> None:
        for _ in range(25):
            got = il.fixed_point(maps[index], z0, solver=solver).value
            if not torch.equal(got, expected[index]):
                errors.append(f"thread {index} got a different solution")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solves_in_and_out_of_inference_mode_do_not_share_buffers(name):
    # Tensors made under inference_mode cannot be written in place outside it, and the other way round
    # must work too: alternate, with the same shape, and compare with fresh solves.
    solver, f = SOLVERS[name](), _contractive_map(2, 5, seed=3)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    expected = _without_workspace(f, z0, solver).value
    for inference in (True, False, True, False):
        with torch.inference_mode(inference):
            assert torch.equal(il.fixed_point(f, z0, solver=solver).value, expected)
