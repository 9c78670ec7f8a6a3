"""`ImplicitLayer`: calling conventions, init semantics, batch semantics, validation and failure policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il

D = 3
TIGHT = il.Anderson(tol=1e-12, max_iter=200)
W = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, 0.0], [-0.1, 0.2, 0.6]], dtype=torch.float64)


def _tanh_cell(z, x):
    return torch.tanh(z @ W.T + x)


def _deq(init=None, solver=TIGHT, **kwargs):
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, _tanh_cell, (z_, x_))])
    return il.ImplicitLayer(problem, [x_], [z_], solver=solver, init=init or {"z": torch.zeros(D)}, **kwargs)


def _x(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _residual(z: torch.Tensor, x: torch.Tensor) -> float:
    return float((z - _tanh_cell(z, x)).abs().max())


# ---------------------------------------------------------------------------------- calling
def test_forward_returns_a_tuple_in_output_order_and_solve_a_solution():
    x_, a_, b_ = il.Input("x"), il.Variable("a"), il.Variable("b")
    problem = il.Problem([il.FixedPoint(a_, _tanh_cell, (a_, x_)), il.FixedPoint(b_, lambda b, a: 0.5 * b + a, (b_, a_))])
    layer = il.ImplicitLayer(problem, [x_], [b_, a_], solver=TIGHT, init={"a": torch.zeros(D), "b": torch.zeros(D)})
    x = _x(4)
    out = layer(x)
    assert isinstance(out, tuple) and len(out) == 2
    b, a = out
    assert _residual(a, x) < 1e-10
    torch.testing.assert_close(b, 2 * a, atol=1e-10, rtol=0)
    solution = layer.solve(x)
    assert isinstance(solution, il.Solution)
    assert set(solution.values) == {"a", "b"} and solution.duals == {}
    assert list(solution.info) == ["block 0 (a)", "block 1 (b)"]
    info = solution.info["block 0 (a)"]
    assert isinstance(info, il.SolveInfo) and info.converged.shape == (4,) and info.all_converged
    last = layer.last_solution
    assert last.info is solution.info and all(not v.requires_grad for v in last.values.values())
    torch.testing.assert_close(last.values["a"], solution.values["a"])


def test_root_condition_with_broyden():
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.Root(z_, lambda z, x: z - _tanh_cell(z, x), (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=il.Broyden(tol=1e-12, max_iter=100), init={"z": torch.zeros(D)})
    x = _x(3).requires_grad_()
    (z,) = layer(x)
    assert _residual(z.detach(), x.detach()) < 1e-10
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x[:2].detach().requires_grad_(),), atol=1e-6)


# ---------------------------------------------------------------------------------- init and batch semantics
@pytest.mark.parametrize(
    "init",
    [
        {"z": lambda x: 0.1 * x},  # a callable of the inputs
        {"z": torch.full((D,), 0.2, dtype=torch.float64)},  # one sample's shape, broadcast
        {"z": torch.full((5, D), 0.2, dtype=torch.float64)},  # batched (B = 5)
    ],
    ids=["callable", "one-sample", "batched"],
)
def test_every_init_form_reaches_the_fixed_point(init):
    x = _x(5)
    (z,) = _deq(init)(x)
    assert z.shape == (5, D)
    assert _residual(z, x) < 1e-10


def test_callable_init_receives_the_inputs_in_order():
    seen = []
    x_, y_, z_ = il.Input("x"), il.Input("y"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x, y: torch.tanh(z @ W.T + x - y), (z_, x_, y_))])

    def init(x, y):
        seen.append((x, y))
        return torch.zeros_like(x)

    layer = il.ImplicitLayer(problem, [y_, x_], [z_], solver=TIGHT, init={"z": init})
    x, y = _x(2, seed=1), _x(2, seed=2)
    layer(y, x)
    assert seen[0][0] is y and seen[0][1] is x


def test_one_sample_init_is_cast_to_the_input_dtype():
    (z,) = _deq({"z": torch.zeros(D, dtype=torch.float32)})(_x(2))
    assert z.dtype == torch.float64


def test_one_sample_matrix_init_works_when_the_batch_size_equals_its_first_dimension():
    A = torch.tensor([[0.5, 0.1], [0.0, 0.4]], dtype=torch.float64)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: A @ z + x, (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, init={"z": torch.zeros(2, 3)})
    for batch in (4, 2):
        (z,) = layer(torch.randn(batch, 2, 3, dtype=torch.float64))
        assert z.shape == (batch, 2, 3)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 9))
def test_a_layer_works_for_any_batch_size(batch):
    layer = _deq({"z": lambda x: torch.zeros_like(x)})
    x = _x(batch, seed=batch)
    (z,) = layer(x)
    assert z.shape == (batch, D) and _residual(z, x) < 1e-10


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll(), il.Phantom(k=10)], ids=["IFT", "Unroll", "Phantom"])
def test_batch_result_equals_per_sample_results(backward):
    layer = _deq(backward=backward)
    x = 3 * _x(6)  # spread out so that samples need different numbers of iterations
    x.requires_grad_()
    (z,) = layer(x)
    g = torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grad = torch.autograd.grad((z * g).sum(), x)[0]
    nsteps = layer.solve(x.detach()).info["block 0 (z)"].nstep
    assert len(set(nsteps.tolist())) > 1  # the batch really mixes fast and slow samples
    for i in range(6):
        xi = x[i : i + 1].detach().requires_grad_()
        (zi,) = layer(xi)
        torch.testing.assert_close(zi.detach(), z[i : i + 1].detach(), atol=1e-11, rtol=0)
        gi = torch.autograd.grad((zi * g[i : i + 1]).sum(), xi)[0]
        torch.testing.assert_close(gi, grad[i : i + 1], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------- validation at construction
def _problem():
    x_, y_, z_ = il.Input("x"), il.Input("y"), il.Variable("z")
    return il.Problem([il.FixedPoint(z_, lambda z, x, y: z, (z_, x_, y_))]), x_, y_, z_


_Z0 = {"z": torch.zeros(D)}

# (id, keyword changes to a valid ImplicitLayer(problem, inputs=[x, y], outputs=[z], init=_Z0), error, message)
CONSTRUCTION_ERRORS = [
    ("missing-input", lambda x, y, z: {"inputs": [x]}, ValueError, r"reads input\(s\) \['y'\] that are not in inputs="),
    ("unknown-input", lambda x, y, z: {"inputs": [x, y, il.Input("w")]}, ValueError, r"input\(s\) \['w'\] are not read by any condition"),
    ("duplicate-input", lambda x, y, z: {"inputs": [x, y, x]}, ValueError, "listed twice"),
    ("non-input", lambda x, y, z: {"inputs": [x, z]}, TypeError, "inputs must be il.Input nodes"),
    ("no-input", lambda x, y, z: {"inputs": [], "problem": il.Problem([il.FixedPoint(z, lambda z: 0.5 * z, (z,))])},
     ValueError, "give at least one input"),
    ("unknown-output", lambda x, y, z: {"outputs": [il.Variable("q")]},
     ValueError, r"output Variable\('q'\) is not a variable of the problem; variables are \['z'\]"),
    ("no-output", lambda x, y, z: {"outputs": []}, ValueError, "at least one variable"),
    ("missing-init", lambda x, y, z: {"init": None}, ValueError, r"no init for variable\(s\) \['z'\]"),
    ("unknown-init", lambda x, y, z: {"init": {**_Z0, "q": torch.zeros(D)}}, ValueError, r"init names unknown variable\(s\) \['q'\]"),
    ("bad-backward", lambda x, y, z: {"backward": "ift"}, TypeError, "backward must be il.IFT"),
    ("bad-solver", lambda x, y, z: {"solver": "anderson"}, TypeError, "solver must be an implicitlayers solver"),
    ("not-a-problem", lambda x, y, z: {"problem": "problem"}, TypeError, "problem must be an il.Problem"),
]


@pytest.mark.parametrize("changes, error, match", [c[1:] for c in CONSTRUCTION_ERRORS], ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_construction_errors_name_the_problem(changes, error, match):
    problem, x, y, z = _problem()
    kwargs = {"problem": problem, "inputs": [x, y], "outputs": [z], "init": _Z0, **changes(x, y, z)}
    with pytest.raises(error, match=match):
        il.ImplicitLayer(**kwargs)


# ---------------------------------------------------------------------------------- validation at call
def _two_input_layer():
    p, x, y, z = _problem()
    return il.ImplicitLayer(p, [x, y], [z], init={"z": torch.zeros(D)})


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((_x(2),), TypeError, r"expected 2 input tensor\(s\) \(x, y\), got 1"),
        ((_x(2), _x(3)), ValueError, r"disagree on the batch size: 'x' has 2, 'y' has 3"),
        ((_x(2), _x(2).float()), TypeError, r"input 'y' is torch.float32 but 'x' is torch.float64"),
        ((_x(2), torch.full((2, D), float("nan"), dtype=torch.float64)), ValueError, "input 'y' contains NaN or Inf"),
        ((_x(2), torch.full((2, D), float("inf"), dtype=torch.float64)), ValueError, "input 'y' contains NaN or Inf"),
        ((_x(2), [[0.0] * D] * 2), TypeError, "input 'y' must be a torch.Tensor, got list"),
        ((torch.zeros(2, D, dtype=torch.long),) * 2, TypeError, "at least one input must be a floating-point tensor"),
        ((torch.tensor(1.0), _x(2)), ValueError, "input 'x' must have a leading batch dimension"),
    ],
    ids=["count", "batch-size", "dtype", "nan", "inf", "non-tensor", "all-integer", "scalar"],
)
def test_call_errors_name_the_input(args, error, match):
    with pytest.raises(error, match=match):
        _two_input_layer()(*args)


def test_cell_returning_the_wrong_shape_names_the_variable_and_block():
    x_, z_ = il.Input("x"), il.Variable("z")
    layer = il.ImplicitLayer(il.Problem([il.FixedPoint(z_, lambda z, x: z[:, :2], (z_, x_))]), [x_], [z_], init={"z": torch.zeros(D)})
    with pytest.raises(ValueError, match=r"FixedPoint\(z\) in block 0 \(z\): the function returned \(2, 2\) but z has shape \(2, 3\)"):
        layer(_x(2))


def test_objective_returning_the_wrong_shape_says_to_reduce():
    x_, u_ = il.Input("x"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, x: (u - x) ** 2, (u_, x_))])  # forgot .sum(1)
    layer = il.ImplicitLayer(problem, [x_], [u_], init={"u": torch.zeros(D)})
    message = r"Minimize\(u\) in block 0 \(u\): the objective returned \(2, 3\); it must return one value per sample, shape \(2,\)"
    with pytest.raises(ValueError, match=message):
        layer(_x(2))


def test_init_callable_must_return_a_tensor():
    with pytest.raises(TypeError, match="init for 'z' must be a tensor or return one, got list"):
        _deq({"z": lambda x: [0.0] * D})(_x(2))


# ---------------------------------------------------------------------------------- failure policy
def test_forward_nonconvergence_raises_naming_the_block():
    layer = _deq(solver=il.Anderson(max_iter=2, tol=1e-12, on_failure="raise"))
    with pytest.raises(il.ConvergenceError, match=r"block 0 \(z\): 2/2 samples did not converge within max_iter=2 .*Try:"):
        layer(_x(2))


def test_forward_nonconvergence_warns_naming_the_block():
    layer = _deq(solver=il.Anderson(max_iter=2, tol=1e-12, on_failure="warn"))
    with pytest.warns(il.ConvergenceWarning, match=r"block 0 \(z\): .*max_iter=2"):
        (z,) = layer(_x(2))
    assert z.shape == (2, D)


def test_forward_nonconvergence_can_be_ignored_and_is_reported_in_info():
    layer = _deq(solver=il.Anderson(max_iter=2, tol=1e-12, on_failure="ignore"))
    info = layer.solve(_x(2)).info["block 0 (z)"]
    assert not bool(info.converged.any()) and info.nstep.tolist() == [2, 2]


def test_integer_inputs_are_allowed_beside_a_floating_one():
    x_, k_, z_ = il.Input("x"), il.Input("k"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x, k: torch.tanh(z @ W.T + x + k), (z_, x_, k_))])
    layer = il.ImplicitLayer(problem, [k_, x_], [z_], solver=TIGHT, init={"z": torch.zeros(D)})
    k = torch.ones(2, 1, dtype=torch.long)
    (z,) = layer(k, _x(2))
    assert z.dtype == torch.float64  # the start takes the floating input's dtype, not the integer one's
    assert _residual(z, _x(2) + 1) < 1e-10


def test_a_start_of_another_shape_than_the_known_sample_shape_is_an_error():
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: 0.5 * z + x, (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], init={"z": torch.zeros(5, 3)}, solver=il.Anderson(tol=1e-4))
    layer(torch.randn(5, 3))  # batched start: the sample shape is (3,)
    with pytest.raises(ValueError, match=r"init for 'z' has shape \(5, 3\), which is neither one sample \(3,\)"):
        layer(torch.randn(1, 3))
