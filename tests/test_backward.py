"""Backward modes (IFT, Unroll, Phantom) on linear fixed points, whose gradients have closed forms.

The oracle for `z = A z + B x` is `z* = (I − A)⁻¹ B x`, so `∂⟨g, z*⟩/∂x = Bᵀ (I − A)⁻ᵀ g`; parameters
(captured in closures or owned by modules) are checked against autograd through a dense
`torch.linalg.solve`, which differentiates the same closed form.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import implicitlayers as il

D, N, BATCH = 5, 3, 4
TIGHT = il.Anderson(tol=1e-12, max_iter=300)


def _contractive(d: int, norm: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return norm * a / torch.linalg.matrix_norm(a, 2)


def _linear_problem(A: torch.Tensor, Bm: torch.Tensor):
    x, z = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z, lambda z, x: z @ A.T + x @ Bm.T, (z, x))])
    return problem, x, z


def _layer(backward, A=None, Bm=None, solver=TIGHT) -> il.ImplicitLayer:
    A = _contractive(D) if A is None else A
    Bm = torch.randn(D, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) if Bm is None else Bm
    problem, x, z = _linear_problem(A, Bm)
    return il.ImplicitLayer(problem, [x], [z], solver=solver, backward=backward, init={"z": torch.zeros(D)})


def _closed_form(A: torch.Tensor, Bm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """z* = (I − A)⁻¹ B x per sample (differentiable in A, B and x)."""
    return torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A, (x @ Bm.T).T).T


def _input_grad(layer: il.ImplicitLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (z,) = layer(x)
    return torch.autograd.grad((z * g).sum(), x)[0]


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(2)
    A = _contractive(D)
    Bm = torch.randn(D, N, dtype=torch.float64, generator=gen)
    x = torch.randn(BATCH, N, dtype=torch.float64, generator=gen)
    g = torch.randn(BATCH, D, dtype=torch.float64, generator=gen)
    return A, Bm, x, g


def _exact_input_grad(A, Bm, g):
    # ∂⟨g, (I − A)⁻¹ B x⟩/∂x = Bᵀ (I − A)⁻ᵀ g, per sample.
    lam = torch.linalg.solve((torch.eye(D, dtype=A.dtype) - A).T, g.T).T
    return lam @ Bm


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll()], ids=["IFT", "Unroll"])
def test_linear_fixed_point_value_and_input_gradient_match_closed_form(data, backward):
    A, Bm, x, g = data
    layer = _layer(backward, A, Bm)
    (z,) = layer(x)
    torch.testing.assert_close(z.detach(), _closed_form(A, Bm, x), atol=1e-10, rtol=0)
    torch.testing.assert_close(_input_grad(layer, x, g), _exact_input_grad(A, Bm, g), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "make_solver",
    [
        lambda: il.Anderson(tol=1e-12, max_iter=200),
        lambda: il.Broyden(tol=1e-12, max_iter=100),
        lambda: il.FixedPointIteration(tol=1e-12, max_iter=500),
        lambda: il.linear.GMRES(tol=1e-12),
        lambda: il.linear.Neumann(tol=1e-12, max_iter=500),
        lambda: il.linear.Dense(),
    ],
    ids=["Anderson", "Broyden", "Picard", "GMRES", "Neumann", "Dense"],
)
def test_ift_with_each_adjoint_solver_matches_closed_form(data, make_solver):
    A, Bm, x, g = data
    layer = _layer(il.IFT(solver=make_solver()), A, Bm)
    torch.testing.assert_close(_input_grad(layer, x, g), _exact_input_grad(A, Bm, g), atol=1e-9, rtol=0)


def test_phantom_gradient_error_decreases_with_k(data):
    A, Bm, x, g = data
    exact = _exact_input_grad(A, Bm, g)
    errors = [
        float((_input_grad(_layer(il.Phantom(k=k, damping=0.5), A, Bm), x, g) - exact).abs().max())
        for k in (1, 4, 16, 64)
    ]
    # The damped map 0.5·I + 0.5·A has norm ≤ 0.75, so the error shrinks geometrically in k.
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 < errors[0], errors


def test_phantom_k1_is_jacobian_free_backprop(data):
    A, Bm, x, g = data
    # One damped step from the detached solution: ∂z/∂x = damping · B.
    got = _input_grad(_layer(il.Phantom(k=1, damping=0.5), A, Bm), x, g)
    torch.testing.assert_close(got, 0.5 * g @ Bm, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "backward", [il.IFT(), il.Unroll(), il.Phantom(k=120, damping=1.0)], ids=["IFT", "Unroll", "Phantom-k120"]
)
def test_gradcheck_linear_fixed_point(backward):
    layer = _layer(backward)
    x = torch.randn(2, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), atol=1e-6)


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll()], ids=["IFT", "Unroll"])
def test_gradcheck_nonlinear_tanh_cell(backward):
    gen = torch.Generator().manual_seed(3)
    W = _contractive(D, 0.6, seed=4)
    U = torch.randn(D, N, dtype=torch.float64, generator=gen)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: torch.tanh(z @ W.T + x @ U.T), (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, backward=backward, init={"z": torch.zeros(D)})
    x = torch.randn(2, N, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), atol=1e-6)


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll()], ids=["IFT", "Unroll"])
def test_gradient_reaches_parameters_captured_in_closure(data, backward):
    A0, Bm0, x, g = data
    A = A0.clone().requires_grad_()
    Bm = Bm0.clone().requires_grad_()
    problem, x_, z_ = _linear_problem(A, Bm)
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, backward=backward, init={"z": torch.zeros(D)})
    (z,) = layer(x)
    got = torch.autograd.grad((z * g).sum(), (A, Bm))
    want = torch.autograd.grad((_closed_form(A, Bm, x) * g).sum(), (A, Bm))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


class _LinearCell(nn.Module):
    """z ↦ W z + U x, with W kept contractive at initialisation."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(_contractive(D, 0.5, seed=5))
        self.U = nn.Parameter(torch.randn(D, N, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + x @ self.U.T


@pytest.mark.parametrize("backward", [il.IFT(), il.Unroll(), il.Phantom(k=150, damping=1.0)], ids=["IFT", "Unroll", "Phantom"])
def test_gradient_reaches_module_parameters_and_they_are_registered(data, backward):
    _, _, x, g = data
    cell = _LinearCell()
    x_, z_ = il.Input("x"), il.Variable("z")
    layer = il.ImplicitLayer(
        il.Problem([il.FixedPoint(z_, cell, (z_, x_))]), [x_], [z_], solver=TIGHT, backward=backward, init={"z": torch.zeros(D)}
    )
    assert {id(p) for p in layer.parameters()} == {id(cell.W), id(cell.U)}
    (z,) = layer(x)
    (z * g).sum().backward()
    want = torch.autograd.grad((_closed_form(cell.W, cell.U, x) * g).sum(), (cell.W, cell.U))
    torch.testing.assert_close(cell.W.grad, want[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(cell.U.grad, want[1], atol=1e-9, rtol=0)


def test_no_graph_under_no_grad(data):
    A, Bm, x, _ = data
    with torch.no_grad():
        (z,) = _layer(il.IFT(), A, Bm)(x.requires_grad_())
    assert not z.requires_grad


# ---------------------------------------------------------------------------------- failure policy
def test_ift_backward_nonconvergence_raises_naming_the_block(data):
    A, Bm, x, g = data
    layer = _layer(il.IFT(solver=il.Anderson(max_iter=1, tol=1e-12, on_failure="raise")), A, Bm)
    x = x.clone().requires_grad_()
    (z,) = layer(x)
    with pytest.raises(il.ConvergenceError, match=r"IFT backward of block 0 \(z\).*max_iter=1"):
        (z * g).sum().backward()


def test_ift_backward_nonconvergence_warns(data):
    A, Bm, x, g = data
    layer = _layer(il.IFT(solver=il.Anderson(max_iter=1, tol=1e-12, on_failure="warn")), A, Bm)
    x = x.clone().requires_grad_()
    (z,) = layer(x)
    with pytest.warns(il.ConvergenceWarning, match=r"IFT backward of block 0 \(z\)"):
        (z * g).sum().backward()


def test_ift_rejects_a_solver_that_cannot_solve_linear_systems():
    with pytest.raises(TypeError, match="IFT: solver must be"):
        il.IFT(solver="cg")


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must be an integer"), ({"damping": 1.5}, "damping must lie")])
def test_phantom_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        il.Phantom(**kwargs)


# ---------------------------------------------------------------------------------- memory
def _graph_size(out: torch.Tensor) -> int:
    """Number of autograd nodes reachable from `out.grad_fn` (what a backward pass would keep alive)."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


def _step_footprint(backward, max_iter: int) -> tuple[int, int]:
    """(graph nodes, bytes of tensors saved for backward) of one forward pass of a tanh DEQ."""
    gen = torch.Generator().manual_seed(7)
    W = nn.Parameter(_contractive(16, 0.9, seed=8))
    U = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: torch.tanh(z @ W.T + x @ U.T), (z_, x_))])
    # tol far below reach: every forward runs exactly max_iter iterations.
    solver = il.Anderson(tol=1e-300, max_iter=max_iter, on_failure="ignore")
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=solver, backward=backward, init={"z": torch.zeros(16)})
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (z,) = layer(torch.randn(4, 8, dtype=torch.float64, generator=gen))
    return _graph_size(z), sum(saved)


def test_ift_training_memory_does_not_grow_with_max_iter_but_unroll_does():
    ift = [_step_footprint(il.IFT(), n) for n in (5, 15, 40)]
    unroll = [_step_footprint(il.Unroll(), n) for n in (5, 15, 40)]
    assert ift[0] == ift[1] == ift[2], ift
    assert unroll[0][0] < unroll[1][0] < unroll[2][0], unroll
    assert unroll[0][1] < unroll[1][1] < unroll[2][1], unroll
    assert unroll[2][1] > 5 * ift[2][1]


# ---------------------------------------------------------------------------------- double backward
def test_gradient_penalty_through_second_order_ift_matches_closed_form(data):
    A0, Bm, x, g = data
    A = A0.clone().requires_grad_()
    problem, x_, z_ = _linear_problem(A, Bm)
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, backward=il.IFT(second_order=True), init={"z": torch.zeros(D)})

    def penalty_grad(z_of_x):
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((z_of_x(xx) * g).sum(), xx, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), A)[0]

    # ‖Bᵀ(I − A)⁻ᵀ g‖² depends on A only through the IFT Jacobian: a second-order check of the IFT.
    got = penalty_grad(lambda xx: layer(xx)[0])
    want = penalty_grad(lambda xx: _closed_form(A, Bm, xx))
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("backward", [il.IFT(second_order=True), il.Unroll()], ids=["IFT-second-order", "Unroll"])
def test_gradgradcheck_tanh_cell(backward):
    gen = torch.Generator().manual_seed(10)
    W = _contractive(3, 0.6, seed=11)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: torch.tanh(z @ W.T + x), (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, backward=backward, init={"z": torch.zeros(3)})
    x = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: layer(x)[0], (x,), atol=1e-6)


def test_double_backward_without_second_order_raises_rather_than_being_wrong(data):
    A, Bm, x, g = data
    layer = _layer(il.IFT(), A, Bm)
    x = x.clone().requires_grad_()
    (z,) = layer(x)
    with pytest.raises(NotImplementedError, match=r"block 0 \(z\).*second_order=True"):
        torch.autograd.grad((z * g).sum(), x, create_graph=True)


# ---------------------------------------------------------------------------------- non-flat variables
def test_matrix_shaped_variable_matches_kronecker_closed_form():
    # Z = A Z C + X per sample, Z of shape (2, 3): row-major vec(A Z C) = (A ⊗ Cᵀ) vec(Z).
    gen = torch.Generator().manual_seed(12)
    A = _contractive(2, 0.7, seed=13)
    C = _contractive(3, 0.7, seed=14)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: A @ z @ C + x, (z_, x_))])
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, init={"z": torch.zeros(2, 3)})
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    (z,) = layer(x)
    assert z.shape == (4, 2, 3)
    op = torch.eye(6, dtype=torch.float64) - torch.kron(A, C.T.contiguous())
    want = torch.linalg.solve(op, x.reshape(4, 6).T).T.reshape(4, 2, 3)
    torch.testing.assert_close(z, want, atol=1e-10, rtol=0)
    g = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(
        torch.autograd.grad((z * g).sum(), x)[0], torch.autograd.grad((want * g).sum(), x)[0], atol=1e-9, rtol=0
    )


def test_cyclic_block_of_two_variables_with_different_shapes():
    # a = 0.5 b[:, :2] + x,  b = 0.3 [a, a₀] − 0.2 b + 1 — solved jointly as one block.
    x_, a_, b_ = il.Input("x"), il.Variable("a"), il.Variable("b")
    problem = il.Problem(
        [
            il.FixedPoint(a_, lambda b, x: 0.5 * b[:, :2] + x, (b_, x_)),
            il.FixedPoint(b_, lambda a, b: 0.3 * torch.cat([a, a[:, :1]], 1) - 0.2 * b + 1.0, (a_, b_)),
        ]
    )
    assert problem.blocks == [["a", "b"]]
    layer = il.ImplicitLayer(problem, [x_], [a_, b_], solver=TIGHT, init={"a": torch.zeros(2), "b": torch.zeros(3)})
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(15), requires_grad=True)
    a, b = layer(x)
    # Dense: unknown [a; b] ∈ R⁵, (I − T) w = [x; 1, 1, 1].
    T = torch.zeros(5, 5, dtype=torch.float64)
    T[0, 2], T[1, 3] = 0.5, 0.5
    T[2, 0], T[3, 1], T[4, 0] = 0.3, 0.3, 0.3
    T[2:, 2:] -= 0.2 * torch.eye(3, dtype=torch.float64)
    rhs = torch.cat([x, torch.ones(3, 3, dtype=torch.float64)], 1)
    w = torch.linalg.solve(torch.eye(5, dtype=torch.float64) - T, rhs.T).T
    torch.testing.assert_close(torch.cat([a, b], 1), w, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda x: torch.cat(layer(x), 1), (x[:2].detach().requires_grad_(),), atol=1e-6)


# ------------------------------------------------------------------- the default adjoint solver
def test_default_ift_solves_a_small_block_exactly_with_one_batched_vjp(data):
    """D ≤ 16 with IFT(solver=None): Aᵀ from one batched VJP and a dense solve (one step, D products)."""
    A, Bm, x, g = data
    layer = _layer(il.IFT(), A, Bm)
    torch.testing.assert_close(_input_grad(layer, x, g), _exact_input_grad(A, Bm, g), rtol=1e-12, atol=1e-13)
    (info,) = layer.backward_info.values()
    assert info is not None and info.nfe == D and bool((info.nstep == 1).all()) and info.all_converged


def test_default_ift_solves_a_large_block_iteratively():
    d = 20
    A = _contractive(d)
    Bm = torch.randn(d, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    problem, x_, z_ = _linear_problem(A, Bm)
    layer = il.ImplicitLayer(problem, [x_], [z_], solver=TIGHT, backward=il.IFT(), init={"z": torch.zeros(d)})
    x = torch.randn(BATCH, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    g = torch.randn(BATCH, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (z,) = layer(x)
    (grad,) = torch.autograd.grad((z * g).sum(), x)
    lam = torch.linalg.solve((torch.eye(d, dtype=A.dtype) - A).T, g.T).T
    torch.testing.assert_close(grad, lam @ Bm, rtol=1e-9, atol=1e-10)
    (info,) = layer.backward_info.values()
    assert info is not None and bool((info.nstep > 1).all())


def test_default_ift_reports_a_singular_small_block_and_zeroes_its_gradient():
    """R(z) = a z − b: sample 0 has a = 0 (every z is a root, ∂R/∂z = 0 is singular): its dense adjoint solve is
    reported failed and its gradient is the documented zero; sample 1 gets the exact dz/d(a, b) = (−z/a, 1/a)."""
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.Root(z_, lambda z, x: x[:, :1] * z - x[:, 1:], (z_, x_))])
    layer = il.ImplicitLayer(problem, x_, z_, solver=il.Broyden(tol=1e-12, max_iter=50),
                             backward=il.IFT(), init={"z": torch.zeros(1)})
    x = torch.tensor([[0.0, 0.0], [2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    z = layer(x)
    with pytest.warns(il.ConvergenceWarning, match="IFT backward"):
        (grad,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(grad[0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(grad[1], torch.tensor([-1.0, 0.5], dtype=torch.float64), rtol=1e-10, atol=1e-12)


class _ScaleWithHostBackward(torch.autograd.Function):
    """`0.5 z`, whose backward reads the incoming gradient on the host (`.item()`): vmap cannot batch it."""

    @staticmethod
    def forward(ctx, z):
        return 0.5 * z

    @staticmethod
    def backward(ctx, g):
        return g * (0.5 + 0.0 * g.sum().item())


def test_default_ift_falls_back_to_an_iterative_solve_when_the_vjp_cannot_be_batched():
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: _ScaleWithHostBackward.apply(z) + x, (z_, x_))])
    layer = il.ImplicitLayer(problem, x_, z_, solver=TIGHT, backward=il.IFT(), init={"z": torch.zeros(3)})
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0), rtol=1e-9, atol=1e-10)  # z* = 2x
    (info,) = layer.backward_info.values()
    assert info is not None and bool((info.nstep > 1).all())  # iterative, not the one-step dense solve
