"""Specification of `il.DEQ`: closed-form equilibria and gradients, gradcheck, starts, errors, the example."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from implicitlayers.models.weight_tied import WeightTied

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIGHT = il.Anderson(memory=5, lam=1e-12, tol=1e-12, max_iter=300)


def contraction(dim: int, norm: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=dtype)
    return norm * A / torch.linalg.matrix_norm(A, ord=2)


class LinearCell(nn.Module):
    """`f(z, x) = A z + x`: the equilibrium is `(I − A)⁻¹ x`."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + x


class TanhCell(nn.Module):
    def __init__(self, dim: int, seed: int = 0, dtype=torch.float32) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.copy_(contraction(dim, 0.7, seed, dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


# ---------------------------------------------------------------- closed form


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 5), dim=st.integers(1, 6), norm=st.floats(0.1, 0.8), seed=st.integers(0, 1000))
def test_linear_cell_equilibrium_and_gradients_match_the_closed_form(batch, dim, norm, seed) -> None:
    A = contraction(dim, norm, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    deq = il.DEQ(LinearCell(A), solver=TIGHT, backward=il.IFT(solver=TIGHT))
    z = deq(x)
    M = torch.eye(dim, dtype=torch.float64) - A
    z_exact = torch.linalg.solve(M, x.detach().T).T
    torch.testing.assert_close(z, z_exact, rtol=1e-9, atol=1e-10)
    (z * c).sum().backward()
    lam = torch.linalg.solve(M.T, c.T).T  # (I − A)⁻ᵀ c per sample
    torch.testing.assert_close(x.grad, lam, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(deq.cell.A.grad, lam.T @ z_exact, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("backward", [il.IFT(solver=TIGHT), il.Unroll()], ids=["IFT", "Unroll"])
def test_gradcheck_in_float64(backward) -> None:
    W0 = contraction(4, 0.6, 3)
    U0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def equilibrium(x, W, U):
        # z has a different shape (B, 4) from x (B, 3): the start comes from z_init.
        deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x @ U.T), solver=TIGHT, backward=backward, z_init=torch.zeros(4))
        return deq(x)

    inputs = tuple(t.clone().requires_grad_() for t in (x, W0, U0))
    assert torch.autograd.gradcheck(equilibrium, inputs, eps=1e-6, atol=1e-6)


def test_phantom_gradient_approaches_the_ift_with_many_steps() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    grads = {}
    for name, backward in {"ift": il.IFT(solver=TIGHT), "phantom": il.Phantom(k=60, damping=1.0)}.items():
        torch.manual_seed(1)  # the same cell (bias included) for both modes
        deq = il.DEQ(TanhCell(5, dtype=torch.float64), solver=TIGHT, backward=backward)
        deq(x).square().sum().backward()
        grads[name] = deq.cell.linear.weight.grad
    torch.testing.assert_close(grads["phantom"], grads["ift"], rtol=1e-6, atol=1e-8)


def test_weight_tied_network_tends_to_the_deq_with_depth() -> None:
    torch.manual_seed(0)
    cell = TanhCell(5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    grads = []
    for model in (il.DEQ(cell, solver=TIGHT, backward=il.IFT(solver=TIGHT)), WeightTied(cell, 80)):
        cell.zero_grad()
        z = model(x)
        z.square().sum().backward()
        grads.append((z.detach(), cell.linear.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-8, atol=1e-9)
    assert not torch.allclose(WeightTied(cell, 2)(x), grads[0][0], atol=1e-3)  # shallow is not yet there


def test_weight_tied_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        WeightTied(TanhCell(2), 0)


# ---------------------------------------------------------------- module behaviour


def test_module_cell_parameters_are_listed_once() -> None:
    deq = il.DEQ(TanhCell(4))
    names = [n for n, _ in deq.named_parameters()]
    assert names == ["cell.linear.weight", "cell.linear.bias"]


def test_default_solver_and_backward() -> None:
    deq = il.DEQ(TanhCell(4))
    assert isinstance(deq.solver, il.Anderson) and deq.solver.tol == 1e-4 and deq.solver.max_iter == 50
    assert isinstance(deq.backward_mode, il.IFT)


def test_solver_info_of_the_last_call() -> None:
    deq = il.DEQ(TanhCell(6))
    assert deq.last_info is None and deq.nfe == 0
    z = deq(torch.randn(5, 6))
    info = deq.last_info
    assert isinstance(info, il.SolveInfo)
    assert info.converged.shape == (5,) and bool(info.converged.all())
    assert bool((info.residual <= 1e-4).all())
    assert deq.nfe == info.nfe and deq.nfe == int(info.nstep.max()) + 1
    assert not deq.last_solution.values["z"].requires_grad and z.requires_grad


def test_no_graph_under_no_grad() -> None:
    deq = il.DEQ(TanhCell(4))
    with torch.no_grad():
        z = deq(torch.randn(2, 4))
    assert not z.requires_grad


def test_training_step_reaches_cell_parameters() -> None:
    torch.manual_seed(0)
    deq = il.DEQ(TanhCell(6))
    x = torch.randn(4, 6, requires_grad=True)
    deq(x).square().sum().backward()
    assert deq.cell.linear.weight.grad is not None and deq.cell.linear.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deepcopy_and_state_dict_after_a_call() -> None:
    deq = il.DEQ(TanhCell(4), z_init=torch.zeros(4))
    x = torch.randn(3, 4)
    deq(x).sum().backward()
    twin = copy.deepcopy(deq)
    torch.testing.assert_close(twin(x), deq(x))
    assert "z_init" in deq.state_dict()


# ---------------------------------------------------------------- starts


def _z_star(cell: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return il.DEQ(cell, solver=TIGHT)(x)


@pytest.mark.parametrize("form", ["one sample", "batched", "callable"])
def test_z_init_forms_start_the_solver_there(form) -> None:
    cell = TanhCell(4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    z_star = _z_star(cell, x)
    start = {
        "one sample": lambda: _z_star(cell, x[:1])[0],  # every sample starts at sample 0's equilibrium
        "batched": lambda: z_star,
        "callable": lambda: (lambda inp: _z_star(cell, inp)),
    }[form]()
    deq = il.DEQ(cell, solver=il.Anderson(tol=1e-8, max_iter=100), z_init=start)
    with torch.no_grad():
        deq(x)
    nstep = deq.last_info.nstep
    if form == "one sample":
        assert int(nstep[0]) == 0 and bool((nstep[1:] > 0).all())
    else:
        assert bool((nstep == 0).all()) and deq.nfe == 1


def test_default_start_is_zeros_like_x() -> None:
    seen = []

    def cell(z, x):
        seen.append(z.clone())
        return 0.5 * z + x

    il.DEQ(cell, solver=il.FixedPointIteration(tol=1e-6, max_iter=60))(torch.ones(2, 3))
    assert torch.equal(seen[0], torch.zeros(2, 3))


def test_z_of_a_different_shape_than_x() -> None:
    W = contraction(3, 0.5, 0, torch.float32)
    U = torch.randn(3, 5)
    deq = il.DEQ(lambda z, x: torch.tanh(z @ W.T + x @ U.T), z_init=lambda x: x.new_zeros(x.shape[0], 3))
    x = torch.randn(4, 5)
    z = deq(x)
    assert z.shape == (4, 3)
    torch.testing.assert_close(z, torch.tanh(z @ W.T + x @ U.T), rtol=0, atol=1e-3)


def test_z_init_buffer_follows_dtype_moves() -> None:
    deq = il.DEQ(TanhCell(4, dtype=torch.float64), z_init=torch.zeros(4)).double()
    assert deq.z_init.dtype == torch.float64
    assert deq(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------- errors


def test_cell_must_be_callable() -> None:
    with pytest.raises(TypeError, match="cell must be a callable"):
        il.DEQ(3)


def test_z_init_of_a_wrong_type() -> None:
    with pytest.raises(TypeError, match="z_init must be None"):
        il.DEQ(TanhCell(2), z_init=[0.0, 0.0])
    with pytest.raises(TypeError, match="floating point"):
        il.DEQ(TanhCell(2), z_init=torch.zeros(2, dtype=torch.long))


def test_x_must_be_a_batched_tensor() -> None:
    deq = il.DEQ(TanhCell(2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        deq([[1.0, 2.0]])
    with pytest.raises(ValueError, match="leading batch dimension"):
        deq(torch.tensor(1.0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        deq(torch.tensor([[float("nan"), 0.0]]))


def test_cell_returning_a_wrong_shape_names_the_variable() -> None:
    deq = il.DEQ(lambda z, x: torch.cat([z, x], 1))
    with pytest.raises(ValueError, match=r"FixedPoint\(z\).*shaped like z"):
        deq(torch.randn(2, 3))


def test_cell_arity_is_checked_at_declaration() -> None:
    with pytest.raises(TypeError, match="fn takes"):
        il.DEQ(lambda z: z)


def test_non_convergence_warns_by_default() -> None:
    deq = il.DEQ(lambda z, x: 1.5 * z + x, solver=il.Anderson(memory=1, max_iter=5))
    with pytest.warns(il.ConvergenceWarning, match="block 0"):
        with torch.no_grad():
            deq(torch.randn(2, 3))


# ---------------------------------------------------------------- normalisation


def test_spectral_norm_weight_is_computed_once_per_forward() -> None:
    linear = il.nn.spectral_norm(nn.Linear(6, 6), bound=0.9)
    parametrization = linear.parametrizations.weight[0]
    calls = []
    compute = parametrization.compute
    parametrization.compute = lambda *a: calls.append(1) or compute(*a)

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, z, x):
            return torch.tanh(self.linear(z) + x)

    deq = il.DEQ(Cell())
    z = deq(torch.randn(4, 6))
    assert deq.nfe > 3 and len(calls) == 1
    z.sum().backward()  # gradients reach the raw weight through the cached one
    assert linear.parametrizations.weight.original.grad.abs().sum() > 0


# ---------------------------------------------------------------- the example


def test_digits_example_runs_in_fast_mode(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("deq_digits", ROOT / "examples" / "deq_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    results = module.main(["--fast", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert results["plot"].exists() and results["plot"].stat().st_size > 0
    for label in ("plain", "jacobian"):
        run = results[label]
        assert len(run["history"]["loss"]) == 2 and all(n >= 1 for n in run["history"]["train_nfe"])
        assert 0.0 <= run["test_accuracy"] <= 1.0
    # Two epochs on 256 samples already learn something (chance is 10%).
    assert results["plain"]["test_accuracy"] > 0.15


# Dynamo itself reads `.grad` of non-leaf tensors while it wraps them (a torch-internal warning).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_compiled_model_breaks_the_graph_at_the_implicit_layer_and_matches_eager():
    # `torch.compile(model)` must not trace the solver loop: the layer's solve is a compiler boundary.
    torch.manual_seed(0)
    inject, weight, head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 3)
    torch.nn.init.normal_(weight.weight, std=0.3 / 4)
    deq = il.DEQ(lambda z, u: torch.tanh(weight(z) + u), solver=il.Anderson(tol=1e-6, max_iter=100))

    def model(x):
        return head(deq(inject(x)))

    x = torch.randn(4, 8)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), weight.weight)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")(x)
    # One graph before the layer (the injection) and one after it (the head); tracing into the solver
    # loop instead gives dozens (35 measured without the boundary).
    assert counters["stats"]["unique_graphs"] <= 3
    (g_compiled,) = torch.autograd.grad(compiled.sum(), weight.weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
