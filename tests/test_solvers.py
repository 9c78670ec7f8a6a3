"""The batched nonlinear solvers (Picard, Anderson, Broyden): closed-form oracles first, then the
per-sample semantics (independence, freezing, NaN isolation, best iterate), the failure policy,
and every validation error."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il
from implicitlayers.solvers import WritesInto

SOLVERS = {
    "picard": lambda **kw: il.FixedPointIteration(**kw),
    "anderson": lambda **kw: il.Anderson(memory=5, **kw),
    "broyden": lambda **kw: il.Broyden(**kw),
    "broyden_line_search": lambda **kw: il.Broyden(line_search=True, **kw),
    "broyden_short_memory": lambda **kw: il.Broyden(memory=5, **kw),  # overwrites pairs for dim > 5
}
DTYPES = [torch.float32, torch.float64]


def _linear_map(batch: int, dim: int, dtype: torch.dtype, seed: int, norm: float = 0.7):
    """`f(z) = A z + b` per sample with ‖A‖₂ = norm, and its fixed point `(I − A)⁻¹ b`."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64)
    A = norm * A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - A, b)
    A, b = A.to(dtype), b.to(dtype)
    return (lambda z: torch.baddbmm(b[:, :, None], A, z[:, :, None])[:, :, 0]), exact.to(dtype)


def _tanh_cell(batch: int, dim: int, seed: int, rows: slice = slice(None)):
    """`f(z) = tanh(W z + x)`, a contractive nonlinear cell in float64 (for the samples `rows` of x)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, 2)
    x = 2 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)[rows]
    return lambda z: torch.tanh(z @ W.T + x)


# ------------------------------------------------------------------------------ closed-form oracles
@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(SOLVERS)),
    batch=st.integers(1, 5),
    dim=st.integers(1, 12),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_linear_fixed_point_matches_a_dense_solve(name, batch, dim, dtype, seed):
    f, exact = _linear_map(batch, dim, dtype, seed)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    sol = il.fixed_point(f, torch.zeros(batch, dim, dtype=dtype), solver=SOLVERS[name](tol=tol, max_iter=300))
    assert bool(sol.info.converged.all())
    assert sol.value.dtype == dtype and sol.value.shape == (batch, dim)
    # ‖z − z*‖ ≤ ‖(I − A)⁻¹‖ · tol · ‖z‖ ≤ tol ‖z‖ / 0.3
    bound = 5 * tol * (1 + float(exact.norm(dim=1).max()))
    torch.testing.assert_close(sol.value, exact, rtol=0, atol=bound)


@pytest.mark.parametrize(
    "solver",
    [il.Broyden(memory=50, tol=1e-12, max_iter=100), il.Broyden(line_search=True, tol=1e-12, max_iter=100),
     il.Anderson(tol=1e-12, max_iter=200)],
    ids=["broyden", "broyden_line_search", "anderson"],
)
def test_root_finds_per_sample_cube_roots(solver):
    a = torch.linspace(0.3, 6.0, 12, dtype=torch.float64).reshape(4, 3)
    if isinstance(solver, il.Anderson):  # Anderson iterates z ← z − g(z): scale g to a Newton-like step
        g = lambda z: (z**3 - a) / (3 * z.detach() ** 2 + 1)  # noqa: E731
    else:
        g = lambda z: z**3 - a  # noqa: E731
    sol = il.root(g, torch.ones_like(a), solver=solver)
    assert bool(sol.info.converged.all())
    torch.testing.assert_close(sol.value, a ** (1 / 3), rtol=1e-10, atol=0)
    assert len(set(sol.info.nstep.tolist())) > 1  # each sample stopped at its own step


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(["anderson", "broyden", "broyden_line_search"]), seed=st.integers(0, 2**16))
def test_agrees_with_scipy_on_random_smooth_systems(name, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    g = lambda z: z + 0.5 * torch.sin(torch.bmm(W, z[:, :, None])[:, :, 0]) - c  # noqa: E731  # unique root
    ours = il.root(g, torch.zeros_like(c), solver=SOLVERS[name](tol=1e-11, max_iter=200))
    ref = il.root(g, torch.zeros_like(c), solver=il.ScipyRoot(tol=1e-11))
    assert bool(ours.info.converged.all()) and bool(ref.info.converged.all())
    torch.testing.assert_close(ours.value, ref.value, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_diagonal_preconditioner_defines_the_map(name):
    # R(w) = s ⊙ (w − f(w)) with wildly scaled rows: P = 1/s turns the map back into w ← f(w).
    f, exact = _linear_map(3, 6, torch.float64, seed=1)
    s = torch.logspace(-3, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        w, info = SOLVERS[name](tol=1e-10, max_iter=200).solve(lambda w: s * (w - f(w)), torch.zeros(3, 6, dtype=torch.float64),
                                                              precond=1 / s)
    assert bool(info.converged.all())
    torch.testing.assert_close(w, exact, rtol=0, atol=1e-7)


def _smooth_residual(seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)[:, None, None]
    c = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    return lambda w: w - torch.tanh(torch.bmm(W, w[:, :, None])[:, :, 0] + c)


def _reference_broyden(R, w, memory: int, steps: int) -> list[torch.Tensor]:
    """Limited-memory type-II Broyden written densely: H rebuilt every step from I by the rank-one
    updates `H ← H + (s − H y) yᵀ / yᵀy` of the last `memory` pairs (s, y), oldest first."""
    eye = torch.eye(w.shape[1], dtype=w.dtype)
    pairs, r, norms = [], R(w), [R(w).norm(dim=1)]
    for _ in range(steps):
        H = eye.expand(w.shape[0], -1, -1)
        for s_, y_ in pairs:
            Hy = (H @ y_[:, :, None])[:, :, 0]
            H = H + (s_ - Hy)[:, :, None] * y_[:, None, :] / (y_ * y_).sum(1)[:, None, None]
        s = -(H @ r[:, :, None])[:, :, 0]
        r_new = R(w + s)
        pairs = (pairs + [(s, r_new - r)])[-memory:]
        w, r = w + s, r_new
        norms.append(r.norm(dim=1))
    return norms


def _reference_anderson(R, w, m: int, lam: float, steps: int) -> list[torch.Tensor]:
    """Anderson (type II) written plainly: the bordered least-squares system rebuilt from the last m points."""
    X, G, norms = [w], [-R(w)], [R(w).norm(dim=1)]
    for _ in range(steps):
        Xs, Gs = torch.stack(X[-m:], 1), torch.stack(G[-m:], 1)
        n = Xs.shape[1]
        H = Gs @ Gs.transpose(1, 2)
        H = H + lam * torch.diagonal(H, dim1=1, dim2=2).amax(1)[:, None, None] * torch.eye(n, dtype=w.dtype)
        K = torch.zeros(w.shape[0], n + 1, n + 1, dtype=w.dtype)
        K[:, 0, 1:], K[:, 1:, 0], K[:, 1:, 1:] = 1, 1, H
        rhs = torch.zeros(w.shape[0], n + 1, 1, dtype=w.dtype)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(K, rhs)[:, 1:, 0]
        w = ((Xs + Gs) * alpha[:, :, None]).sum(1)
        X.append(w)
        G.append(-R(w))
        norms.append(R(w).norm(dim=1))
    return norms


@pytest.mark.parametrize("grad", [False, True], ids=["buffers", "unrolled"])
@pytest.mark.parametrize("memory", [1, 2, 3, 30])
def test_broyden_steps_are_the_textbook_ones(memory, grad):
    # Its circular buffer, compact form and rolled triangle must reproduce the dense method, with a
    # full memory dropping its oldest pair exactly (as if restarted from H₀ on the pairs kept).
    R = _smooth_residual(seed=8)
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    solver = il.Broyden(memory=memory, stop="abs", tol=1e-300, max_iter=9, trace=True, on_failure="ignore")
    with torch.set_grad_enabled(grad):
        _, info = solver.solve(R, w0)
    torch.testing.assert_close(torch.stack(info.trace), torch.stack(_reference_broyden(R, w0, memory, 9)), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("grad", [False, True], ids=["buffers", "unrolled"])
@pytest.mark.parametrize("m", [1, 3])
def test_anderson_steps_are_the_textbook_ones(m, grad):
    # Its circular history and one-row Gram updates must reproduce the plainly written method.
    R = _smooth_residual(seed=9)
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    solver = il.Anderson(memory=m, lam=1e-4, stop="abs", tol=1e-300, max_iter=9, trace=True, on_failure="ignore")
    with torch.set_grad_enabled(grad):
        _, info = solver.solve(R, w0)
    torch.testing.assert_close(torch.stack(info.trace), torch.stack(_reference_anderson(R, w0, m, 1e-4, 9)), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_residual_that_writes_into_a_buffer_gives_the_same_steps(name):
    # A residual function wrapped in WritesInto may write into the solver's buffer (Anderson's history
    # slot); taking the offer must change nothing but where the numbers are stored.
    R = _smooth_residual(seed=9)
    offered = []

    def write(w, out=None):
        offered.append(out is not None)
        return R(w) if out is None else out.copy_(R(w))

    into = WritesInto(write)
    w0 = torch.zeros(3, 5, dtype=torch.float64)
    solver = SOLVERS[name](tol=1e-300, max_iter=12, trace=True, on_failure="ignore", stop="abs")
    with torch.no_grad():  # (under autograd Anderson keeps its history in lists, without buffers)
        plain, plain_info = solver.solve(R, w0)
        given_buffer, info = solver.solve(into, w0)
    assert torch.equal(plain, given_buffer)
    torch.testing.assert_close(torch.stack(info.trace), torch.stack(plain_info.trace), rtol=0, atol=0)
    assert any(offered) == (name == "anderson")  # only Anderson keeps residuals it could take directly


# ------------------------------------------------------------------------------ per-sample semantics
@pytest.mark.parametrize("size", [6, 12], ids=["small-batch", "large-batch"])  # host-side and device-side tests
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_batch_solves_like_its_samples_alone(name, dtype, size):
    f64 = _tanh_cell(size, 10, seed=3)

    def f(z: torch.Tensor) -> torch.Tensor:
        return f64(z.double()).to(dtype)

    z0 = torch.zeros(size, 10, dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    solver = SOLVERS[name](tol=tol, max_iter=100)
    batch = il.fixed_point(f, z0, solver=solver)
    for i in range(size):
        fi64 = _tanh_cell(size, 10, seed=3, rows=slice(i, i + 1))
        alone = il.fixed_point(lambda z: fi64(z.double()).to(dtype), z0[i : i + 1], solver=solver)
        torch.testing.assert_close(alone.value[0], batch.value[i], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
        assert int(alone.info.nstep[0]) == int(batch.info.nstep[i])


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_host_check_frequency_does_not_change_results(name):
    # Samples freeze on the device every step; check_every only changes when the loop notices.
    f = _tanh_cell(5, 8, seed=4)
    z0 = torch.randn(5, 8, dtype=torch.float64)
    a = il.fixed_point(f, z0, solver=SOLVERS[name](tol=1e-8, max_iter=80, check_every=1))
    b = il.fixed_point(f, z0, solver=SOLVERS[name](tol=1e-8, max_iter=80, check_every=7))
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=0)
    assert torch.equal(a.info.nstep, b.info.nstep)
    assert b.info.nfe >= a.info.nfe


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_sample_that_turns_nan_fails_alone(name):
    f, exact = _linear_map(4, 5, torch.float64, seed=2)
    calls = []

    def poisoned(z):
        calls.append(None)
        out = f(z)
        if len(calls) > 3:  # sample 1's map breaks after a few evaluations
            out = torch.cat([out[:1], out[1:2] * float("nan"), out[2:]])
        return out

    sol = il.fixed_point(poisoned, torch.zeros(4, 5, dtype=torch.float64),
                         solver=SOLVERS[name](tol=1e-10, max_iter=300, on_failure="ignore"))
    assert sol.info.converged.tolist() == [True, False, True, True]
    assert bool(torch.isfinite(sol.value).all()) and bool(torch.isfinite(sol.info.residual[1]))
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(sol.value[keep], exact[keep], rtol=0, atol=1e-8)


def test_a_nonfinite_start_is_failed_at_once():
    f, _ = _linear_map(2, 3, torch.float64, seed=0)
    z0 = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0]], dtype=torch.float64)
    sol = il.fixed_point(f, z0, solver=il.Anderson(tol=1e-8, on_failure="ignore"))
    assert sol.info.converged.tolist() == [True, False]
    assert int(sol.info.nstep[1]) == 0 and sol.info.residual[1] == float("inf")


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_returns_the_lowest_residual_iterate(name):
    # z − f(z) = −1 − z² has no zero and its norm is lowest at the start z = 0, so every later iterate
    # is worse: the solvers must hand back the start, not where they ended.
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    solver = SOLVERS[name](stop="abs", tol=1e-6, max_iter=5, on_failure="ignore")
    sol = il.fixed_point(lambda z: z + 1 + z**2, z0, solver=solver)
    assert not bool(sol.info.converged.any())
    torch.testing.assert_close(sol.value, z0, rtol=0, atol=0)
    torch.testing.assert_close(sol.info.residual, torch.full((2,), 3**0.5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_unrolled_solve_is_differentiable(name):
    # Under autograd the solvers keep lists instead of buffers; a tight solve's unrolled derivative
    # of sum(z*) with respect to b is (I − A)⁻ᵀ 1.
    f, exact = _linear_map(3, 4, torch.float64, seed=5)
    b = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    solver = SOLVERS[name](tol=1e-12, max_iter=300)
    with torch.enable_grad():
        w, info = solver.solve(lambda w: w - f(w) - b, torch.zeros(3, 4, dtype=torch.float64))
        (grad,) = torch.autograd.grad(w.sum(), b)
    with torch.no_grad():
        w_plain, _ = solver.solve(lambda w: w - f(w) - b, torch.zeros(3, 4, dtype=torch.float64))
    torch.testing.assert_close(w.detach(), w_plain, rtol=0, atol=1e-12)
    J_full = torch.autograd.functional.jacobian(f, torch.zeros(3, 4, dtype=torch.float64))  # (3, 4, 3, 4)
    J = torch.stack([J_full[i, :, i] for i in range(3)])
    expected = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - J.transpose(1, 2), torch.ones(3, 4, dtype=torch.float64))
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------ statistics and policy
def test_trace_records_every_iteration():
    f, _ = _linear_map(3, 4, torch.float64, seed=6)
    sol = il.fixed_point(f, torch.zeros(3, 4, dtype=torch.float64), solver=il.FixedPointIteration(tol=1e-8, trace=True, max_iter=200))
    trace = torch.stack(sol.info.trace)
    assert trace.shape == (int(sol.info.nstep.max()) + 1, 3)
    torch.testing.assert_close(trace.min(0).values, sol.info.residual)
    assert il.fixed_point(f, torch.zeros(3, 4, dtype=torch.float64), solver=il.FixedPointIteration(tol=1e-8, max_iter=200)).info.trace is None


def test_info_counts_steps_and_evaluations():
    f, _ = _linear_map(4, 4, torch.float64, seed=7)
    sol = il.fixed_point(f, torch.zeros(4, 4, dtype=torch.float64), solver=il.Anderson(tol=1e-9, max_iter=100))
    assert sol.info.nstep.dtype == torch.long and sol.info.converged.dtype == torch.bool
    assert sol.info.nfe == int(sol.info.nstep.max()) + 1  # one evaluation per step plus the start
    assert "converged=4/4" in repr(sol.info)


def _diverging(solver):
    # z − f(z) = −1 − 0.1 sin z never vanishes: no solver can converge.
    return il.fixed_point(lambda z: z + 1.0 + 0.1 * torch.sin(z), torch.zeros(2, 3), solver=solver)


def test_failure_warns_with_the_facts():
    with pytest.warns(il.ConvergenceWarning, match=r"fixed_point: 2/2 samples did not converge within max_iter=4 "
                                                    r"\(tol=0\.0001\); worst residual [0-9.e+]+ at sample \d\. Try: "):
        sol = _diverging(il.FixedPointIteration(max_iter=4))
    assert not bool(sol.info.converged.any())


def test_failure_raises_when_asked():
    with pytest.raises(il.ConvergenceError, match=r"max_iter=3.*worst residual.*Try: increase max_iter"):
        _diverging(il.Anderson(max_iter=3, on_failure="raise"))


def test_failure_is_silent_when_ignored():
    sol = _diverging(il.Broyden(max_iter=2, on_failure="ignore"))  # warnings are errors in this suite
    assert not bool(sol.info.converged.all())


def test_failure_message_names_the_block():
    with pytest.raises(il.ConvergenceError, match=re.escape("block 'z' (forward)")):
        il.Anderson(max_iter=2, on_failure="raise").solve(lambda w: 1 + w**2, torch.zeros(1, 2), name="block 'z' (forward)")


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls", [il.FixedPointIteration, il.Anderson, il.Broyden, il.ScipyRoot])
def test_unknown_options_are_a_type_error(cls):
    with pytest.raises(TypeError, match="tolerance"):
        cls(tolerance=1e-3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: il.Anderson(tol=0), "tol must be a positive number"),
        (lambda: il.Broyden(tol=-1e-3), "tol must be a positive number"),
        (lambda: il.FixedPointIteration(max_iter=0), "max_iter must be an integer >= 1"),
        (lambda: il.Anderson(memory=0), "memory must be an integer >= 1"),
        (lambda: il.Anderson(lam=-1.0), "lam must be a finite number >= 0"),
        (lambda: il.Broyden(memory=0), "memory must be an integer >= 1"),
        (lambda: il.Broyden(line_search="yes"), "line_search must be a bool"),
        (lambda: il.Anderson(damping=0.0), r"damping must be a number in \(0, 1\]"),
        (lambda: il.FixedPointIteration(damping=1.5), r"damping must be a number in \(0, 1\]"),
        (lambda: il.Anderson(stop="max"), "stop must be one of"),
        (lambda: il.Broyden(on_failure="explode"), "on_failure must be one of"),
        (lambda: il.Anderson(check_every=0), "check_every must be None or an integer >= 1"),
    ],
)
def test_invalid_options_are_a_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("entry", [il.fixed_point, il.root])
def test_a_function_of_the_wrong_shape_is_a_value_error(entry):
    with pytest.raises(ValueError, match=re.escape("returned (2, 4) for an input of shape (2, 3); it must return the same shape")):
        entry(lambda z: torch.zeros(2, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("z0", [[0.0, 1.0], 1.0, None])
def test_a_start_that_is_not_a_tensor_is_a_type_error(z0):
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor"):
        il.fixed_point(lambda z: z, z0)


def test_an_integer_start_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        il.root(lambda z: z, torch.zeros(2, 3, dtype=torch.long))


def test_configs_are_immutable_and_replaceable():
    solver = il.Anderson(memory=3)
    with pytest.raises(AttributeError):
        solver.m = 4
    assert solver.replace(m=4).m == 4 and solver.m == 3


def test_anderson_memory_is_one_name_with_broyden_and_m_is_its_alias():
    assert il.Anderson(m=3) == il.Anderson(memory=3) and il.Anderson(memory=3).m == 3
    assert il.Anderson(memory=3).replace(m=7).memory == 7
    assert il.Anderson(m=2, memory=2).memory == 2
    with pytest.raises(TypeError, match="m is an alias of memory"):
        il.Anderson(m=3, memory=4)
    with pytest.raises(ValueError, match="memory must be an integer >= 1"):
        il.Anderson(m=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        il.Anderson(history=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_anderson_with_a_long_history_solves_its_weights_by_cholesky_like_lu(dtype, monkeypatch):
    """From 8 slots the ridge-regularised weights system is solved by Cholesky: same iterates as LU (to
    rounding), and the linear fixed point is reached."""
    from implicitlayers.solvers import anderson

    gen = torch.Generator().manual_seed(7)
    A = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    A = (0.95 * A / torch.linalg.matrix_norm(A, 2)).to(dtype)
    b = torch.randn(5, 12, generator=gen, dtype=torch.float64).to(dtype)
    solver = il.Anderson(memory=12, tol=1e-10 if dtype == torch.float64 else 1e-5, max_iter=200)
    cholesky = il.fixed_point(lambda z: z @ A.T + b, torch.zeros_like(b), solver=solver)
    monkeypatch.setattr(anderson, "_CHOLESKY_FROM", 10**6)
    lu = il.fixed_point(lambda z: z @ A.T + b, torch.zeros_like(b), solver=solver)
    assert cholesky.info.all_converged and lu.info.all_converged
    exact = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - A.double(), b.double().T).T
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(cholesky.value.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(cholesky.value, lu.value, rtol=tol, atol=tol)
    assert abs(int(cholesky.info.nfe) - int(lu.info.nfe)) <= 2
