"""`torch.func` and forward-mode AD over implicit layers: what works is checked against torch.autograd in
float64; what does not work yet raises an error that names the transform (never a silent zero)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import implicitlayers as il


def _deq(second_order: bool = False) -> tuple[il.DEQ, torch.nn.Linear]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    deq = il.DEQ(lambda z, x: torch.tanh(lin(z) + x), solver=il.Anderson(tol=1e-12, max_iter=200),
                 backward=il.IFT(solver=il.Anderson(tol=1e-12, max_iter=200), second_order=second_order))
    return deq, lin


def _x() -> torch.Tensor:
    return torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _autograd_jacobian_product(deq, x, v):
    """J v by reverse mode, row by row (the reference for forward mode)."""
    x = x.clone().requires_grad_()
    z = deq(x)
    out = torch.zeros_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            (g,) = torch.autograd.grad(z[i, j], x, retain_graph=True)
            out[i, j] = (g * v).sum()
    return out


def test_func_grad_matches_autograd():
    deq, _ = _deq()
    x = _x()
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(deq(xr).pow(2).sum(), xr)
    got = torch.func.grad(lambda x: deq(x).pow(2).sum())(x)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


def _module_deq() -> il.DEQ:
    """A DEQ whose cell is an `nn.Module` (its parameters are the DEQ's), in float64."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    return il.DEQ(_Cell(lin), solver=il.Anderson(tol=1e-12, max_iter=200), backward=il.IFT(solver=il.Anderson(tol=1e-12, max_iter=200)))


def test_func_grad_over_parameters_with_functional_call():
    deq = _module_deq()
    x = _x()
    params = {k: v.detach() for k, v in deq.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(deq, p, (x,)).sum())(params)
    deq.zero_grad()
    deq(x).sum().backward()
    for name, p in deq.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-10)


class _Cell(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


# torch's own forward-mode decompositions script functions on first use (a torch-internal deprecation).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_func_jvp_and_forward_ad_match_reverse_mode():
    deq, _ = _deq()
    x, v = _x(), torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _autograd_jacobian_product(deq, x, v)
    _, tangent = torch.func.jvp(deq, (x,), (v,))
    torch.testing.assert_close(tangent, ref, rtol=1e-8, atol=1e-10)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(deq(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)


def test_vmap_forward_equals_the_batched_call():
    deq, _ = _deq()
    x = _x()
    with torch.no_grad():
        got = torch.func.vmap(lambda xi: deq(xi[None])[0])(x)
        torch.testing.assert_close(got, deq(x), rtol=1e-10, atol=1e-12)
    # also without no_grad, when nothing requires grad
    deq2 = il.DEQ(lambda z, x: torch.tanh(0.5 * z + x), solver=il.Anderson(tol=1e-12, max_iter=200))
    torch.testing.assert_close(torch.func.vmap(lambda xi: deq2(xi[None])[0])(x), deq2(x))


def _autograd_jacobian(deq, x):
    """dz*/dx by reverse mode, one output entry at a time (the reference for jacrev/jacfwd)."""
    x = x.clone().requires_grad_()
    z = deq(x)
    rows = [torch.autograd.grad(z.reshape(-1)[k], x, retain_graph=True)[0] for k in range(z.numel())]
    return torch.stack(rows).reshape(*z.shape, *x.shape)


@pytest.mark.parametrize("jacobian", [torch.func.jacrev, torch.func.jacfwd], ids=["jacrev", "jacfwd"])
def test_jacrev_and_jacfwd_match_autograd_and_finite_differences(jacobian):
    deq, _ = _deq()
    x = _x()
    got = jacobian(deq)(x)
    torch.testing.assert_close(got, _autograd_jacobian(deq, x), rtol=1e-9, atol=1e-11)
    fd = torch.autograd.functional.jacobian(lambda t: deq(t), x, strategy="reverse-mode")
    torch.testing.assert_close(got, fd, rtol=1e-9, atol=1e-11)
    # Samples never interact: the Jacobian is block-diagonal over the batch.
    assert got[0, :, 1].abs().max() == 0 and got[1, :, 0].abs().max() == 0
    eps = 1e-6
    e = torch.zeros_like(x)
    e[1, 2] = eps
    central = (deq(x + e) - deq(x - e)) / (2 * eps)
    torch.testing.assert_close(got[:, :, 1, 2], central, rtol=1e-6, atol=1e-8)


def test_jacrev_over_parameters_with_functional_call():
    deq = _module_deq()
    x = _x()
    params = dict(deq.named_parameters())
    got = torch.func.jacrev(lambda p: torch.func.functional_call(deq, p, (x,)))(params)
    z = deq(x)
    for name, p in params.items():
        rows = [torch.autograd.grad(z.reshape(-1)[k], p, retain_graph=True)[0] for k in range(z.numel())]
        torch.testing.assert_close(got[name], torch.stack(rows).reshape(*z.shape, *p.shape), rtol=1e-9, atol=1e-11)


def test_per_sample_gradients_with_respect_to_inputs_match_autograd():
    deq, _ = _deq()
    x = _x()
    got = torch.func.vmap(torch.func.grad(lambda xi: deq(xi[None]).pow(2).sum()))(x)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(deq(xr).pow(2).sum(), xr)  # samples are independent: row i is sample i's
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want.abs().max() > 0.1


def test_per_sample_gradients_with_respect_to_parameters_match_one_sample_backward():
    deq = _module_deq()
    x = _x()
    params = {k: v.detach() for k, v in deq.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(deq, p, (xi[None],)).pow(2).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        deq.zero_grad()
        deq(x[i : i + 1]).pow(2).sum().backward()
        for name, p in deq.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_gradients_through_a_forward_vmap_say_so():
    deq, _ = _deq()  # the cell's parameters require grad, and the vmapped forward records no graph to them
    with pytest.raises(NotImplementedError, match="vmap"):
        torch.func.vmap(lambda xi: deq(xi[None])[0])(_x())


def test_second_derivatives_through_func_need_second_order():
    deq, _ = _deq()
    with pytest.raises(NotImplementedError, match="second_order=True"):
        torch.func.grad(lambda x: torch.func.grad(lambda x: deq(x).sum())(x).sum())(_x())


def test_func_over_an_objective_block_says_so():
    y_, u_ = il.Input("y"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, y: ((u - y) ** 2).sum(1), (u_, y_), step_size=0.4)])
    layer = il.ImplicitLayer(problem, y_, u_, init={"u": torch.zeros(3)})
    with pytest.raises(NotImplementedError, match="Minimize/Maximize"):
        torch.func.grad(lambda y: layer(y).sum())(torch.ones(2, 3))


@pytest.mark.parametrize("second_order", [False, True])
def test_hessian_under_func_says_what_to_use(second_order):
    deq, _ = _deq(second_order=second_order)
    with pytest.raises(NotImplementedError, match="second_order=True|create_graph=True"):
        torch.func.hessian(lambda x: deq(x).sum())(_x())


def test_autograd_hessian_with_second_order_matches_finite_differences_of_the_gradient():
    deq, _ = _deq(second_order=True)
    x = _x()
    H = torch.autograd.functional.hessian(lambda t: deq(t).sum(), x)

    def grad_at(t):
        t = t.clone().requires_grad_()
        return torch.autograd.grad(deq(t).sum(), t)[0]

    eps = 1e-6
    e = torch.zeros_like(x)
    e[0, 1] = eps
    torch.testing.assert_close(H[:, :, 0, 1], (grad_at(x + e) - grad_at(x - e)) / (2 * eps), rtol=1e-5, atol=1e-7)
