"""Layers under PyTorch's machinery, probed adversarially: every backward mode (`il.IFT()`,
`il.IFT(second_order=True)`, `il.IFT(first_order=True)`, `il.Phantom`, `il.Unroll`) against closed forms
(linear fixed points `z = Wz + x`, quadratics) and finite differences.

Covered here and not in `test_backward.py` / `test_func.py` / `test_trust.py`: double backward and
`gradgradcheck` with respect to inputs, closure tensors and `nn.Module` parameters (through
`functional_call`) for every mode and for two chained blocks; `backward()` twice, `.grad` accumulation
across calls and hooks on the output; grad-mode contexts (`no_grad`, `inference_mode`, `enable_grad`
inside `no_grad`, `requires_grad_` toggles); forward-mode AD against closed forms and finite
differences; dtypes, mixed dtypes and autocast (a float64 model keeps float64 accuracy); copies,
pickling, `state_dict`, `.to(float64)` and `train()/eval()` after a float32 call; `torch.compile(backend="eager")`;
per-sample independence of values and gradients (inputs and shared parameters) when a NaN, divergent
or huge sample is inserted and the batch reordered; the same for a `Minimize` block, JIIO and iMAML.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

import implicitlayers as il

F64 = torch.float64
D = 3
TIGHT = {"tol": 1e-12, "max_iter": 300}


def _modes() -> dict[str, il.backward.BackwardMode]:
    return {
        "IFT": il.IFT(solver=il.Anderson(**TIGHT)),
        "IFT-second-order": il.IFT(second_order=True),
        "IFT-first-order": il.IFT(first_order=True),
        "Phantom": il.Phantom(k=50, damping=1.0),  # the maps here contract (spectral radius ≤ 0.53): 50 steps are exact
        "Unroll": il.Unroll(),
    }


MODES = sorted(_modes())

pytestmark = [
    # torch's own: its forward-mode decompositions are scripted on first use, and Dynamo reads `.grad`
    # of non-leaf tensors while it wraps them.
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"),
]
SECOND_ORDER = ["IFT-second-order", "Phantom", "Unroll"]
FIRST_ORDER_ONLY = ["IFT", "IFT-first-order"]


def _w() -> torch.Tensor:
    return torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.3


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, D, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _closed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`z = (I − W)⁻¹ x` for each row of `x`: the fixed point of `z = z Wᵀ + x`."""
    return torch.linalg.solve(torch.eye(D, dtype=x.dtype) - w, x.T).T


def _linear(mode: str) -> tuple[il.ImplicitLayer, torch.Tensor]:
    """`z = z Wᵀ + x` with `W` a leaf captured in the closure (not registered anywhere)."""
    w = _w().requires_grad_()
    z_, x_ = il.Variable("z"), il.Input("x")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: z @ w.T + x, [z_, x_])])
    layer = il.ImplicitLayer(problem, x_, z_, solver=il.Anderson(**TIGHT), backward=_modes()[mode],
                             init={"z": torch.zeros(D, dtype=F64)})
    return layer, w


class _Cell(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = F64, bias: bool = False, nonlinear: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D, bias=bias, dtype=dtype)
        self.nonlinear = nonlinear
        with torch.no_grad():
            self.lin.weight.copy_(_w())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(z) + x
        return torch.tanh(out) if self.nonlinear else out


def _deq(mode: str, dtype: torch.dtype = F64, **solver) -> il.DEQ:
    return il.DEQ(_Cell(dtype), solver=il.Anderson(**(solver or TIGHT)), backward=_modes()[mode])


# ============================================================================ reverse mode, first order


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_inputs_and_closure_tensors_exactly(mode):
    layer, w = _linear(mode)
    x = _x().requires_grad_()
    assert torch.autograd.gradcheck(layer, (_x(2).requires_grad_(),), atol=1e-6)
    gw, gx = torch.autograd.grad(layer(x).pow(2).sum(), (w, x))
    w_ref, x_ref = w.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    gw_ref, gx_ref = torch.autograd.grad(_closed(x_ref, w_ref).pow(2).sum(), (w_ref, x_ref))
    torch.testing.assert_close(gw, gw_ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_backward_twice_accumulation_and_hooks(mode):
    layer, w = _linear(mode)
    x = _x().requires_grad_()
    loss = layer(x).pow(2).sum()
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()  # the same graph a second time: the gradient doubles
    torch.testing.assert_close(w.grad, 2 * once, rtol=1e-12, atol=0)
    layer(x).pow(2).sum().backward()  # a new call accumulates into .grad
    torch.testing.assert_close(w.grad, 3 * once, rtol=1e-12, atol=0)
    # A hook on the output sees the cotangent once and its replacement is what the IFT propagates.
    x.grad, seen = None, []
    z = layer(x)
    z.register_hook(lambda g: seen.append(g) or 2 * g)
    z.sum().backward()
    assert len(seen) == 1
    expected = 2 * torch.linalg.solve((torch.eye(D, dtype=F64) - w.detach()).T, torch.ones(D, dtype=F64))
    torch.testing.assert_close(x.grad, expected.expand(4, D), rtol=1e-8, atol=1e-9)


# ============================================================================ double backward


@pytest.mark.parametrize("mode", SECOND_ORDER)
def test_gradgradcheck_and_a_gradient_penalty_on_a_closure_tensor(mode):
    layer, w = _linear(mode)
    x = _x(2)
    assert torch.autograd.gradgradcheck(lambda x: layer(x).pow(2), (x.clone().requires_grad_(),), atol=1e-6)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xr).pow(2).sum(), xr, create_graph=True)
    (gw,) = torch.autograd.grad(gx.pow(2).sum(), w)
    w_ref, x_ref = w.detach().clone().requires_grad_(), x.clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(_closed(x_ref, w_ref).pow(2).sum(), x_ref, create_graph=True)
    (gw_ref,) = torch.autograd.grad(gx_ref.pow(2).sum(), w_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", FIRST_ORDER_ONLY)
def test_double_backward_without_second_order_raises_for_every_first_order_ift(mode):
    layer, _ = _linear(mode)
    x = _x().requires_grad_()
    loss = layer(x).pow(2).sum()
    with pytest.raises(NotImplementedError, match=r"block 0 \(z\).*second_order=True"):
        torch.autograd.grad(loss, x, create_graph=True)  # refused when the graph is asked for, not later


@pytest.mark.parametrize("mode", ["IFT-second-order", "Phantom", "Unroll"])
def test_gradgradcheck_over_module_parameters_with_functional_call(mode):
    deq = il.DEQ(_NonlinearCell(), solver=il.Anderson(tol=1e-13, max_iter=300), backward=_modes()[mode])
    names = [n for n, _ in deq.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in deq.parameters())
    x = _x(1)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(deq, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params)


class _NonlinearCell(_Cell):
    def __init__(self) -> None:
        super().__init__(bias=True, nonlinear=True)


def _two_blocks(mode: str) -> tuple[il.ImplicitLayer, Callable[[torch.Tensor], torch.Tensor]]:
    """`z = A z + x`, then `u = B u + z²` (two blocks, the second reads the first)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(D, D, dtype=F64, generator=g) * 0.3, torch.randn(D, D, dtype=F64, generator=g) * 0.3
    z_, u_, x_ = il.Variable("z"), il.Variable("u"), il.Input("x")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: z @ a.T + x, [z_, x_]),
                          il.FixedPoint(u_, lambda u, z: u @ b.T + z * z, [u_, z_])])
    layer = il.ImplicitLayer(problem, x_, [z_, u_], solver=il.Anderson(tol=1e-13, max_iter=200), backward=_modes()[mode],
                             init={"z": torch.zeros(D, dtype=F64), "u": torch.zeros(D, dtype=F64)})
    eye = torch.eye(D, dtype=F64)

    def closed(x: torch.Tensor) -> torch.Tensor:
        z = torch.linalg.solve(eye - a, x.T).T
        return torch.linalg.solve(eye - b, (z * z).T).T

    return layer, closed


@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Phantom", "Unroll"])
def test_two_chained_blocks_reverse_forward_and_second_order(mode):
    layer, closed = _two_blocks(mode)
    x, v = _x(2), _x(2, seed=5)
    assert torch.autograd.gradcheck(lambda x: layer(x)[1], (x.clone().requires_grad_(),))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))[1]).tangent
    _, expected = torch.func.jvp(closed, (x,), (v,))
    torch.testing.assert_close(tangent.detach(), expected, rtol=1e-8, atol=1e-9)
    got = torch.func.grad(lambda x: layer(x)[1].pow(2).sum())(x)
    torch.testing.assert_close(got, torch.func.grad(lambda x: closed(x).pow(2).sum())(x), rtol=1e-8, atol=1e-9)
    if mode == "IFT":
        with pytest.raises(NotImplementedError, match=r"block 1 \(u\).*second_order=True"):
            torch.autograd.gradgradcheck(lambda x: layer(x)[1], (x.clone().requires_grad_(),))
    else:
        assert torch.autograd.gradgradcheck(lambda x: layer(x)[1], (x[:1].clone().requires_grad_(),))


# ============================================================================ grad modes


@pytest.mark.parametrize("mode", MODES)
def test_grad_mode_contexts_and_requires_grad_toggles(mode):
    deq = _deq(mode)
    weight = deq.cell.lin.weight
    x = _x()
    expected = _closed(x, weight.detach())
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad
    torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-10)
    with torch.inference_mode():
        z = deq(x)
    assert z.is_inference() and not z.requires_grad
    torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-10)
    with torch.no_grad(), torch.enable_grad():  # enable_grad inside no_grad differentiates again
        xr = x.clone().requires_grad_()
        deq(xr).sum().backward()
    assert xr.grad is not None and weight.grad is not None
    weight.requires_grad_(False)  # frozen parameters and a constant input: a plain tensor, no graph
    assert not deq(x).requires_grad
    weight.requires_grad_(True)
    weight.grad = None
    deq(x).sum().backward()
    w_ref = weight.detach().clone().requires_grad_()
    _closed(x, w_ref).sum().backward()
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-8, atol=1e-9)


# ============================================================================ forward mode


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_matches_the_closed_form_and_finite_differences(mode):
    deq = _deq(mode)
    x, v = _x(), _x(seed=7)
    expected = _closed(v, deq.cell.lin.weight.detach())
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(deq(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent.detach(), expected, rtol=1e-8, atol=1e-9)
    _, tangent = torch.func.jvp(deq, (x,), (v,))
    torch.testing.assert_close(tangent, expected, rtol=1e-8, atol=1e-9)
    # A tangent on the parameter, against central differences.
    (name, weight), = deq.named_parameters()
    dw = torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(3))
    _, tangent = torch.func.jvp(lambda w: functional_call(deq, {name: w}, (x,)), (weight.detach(),), (dw,))
    eps = 1e-6
    with torch.no_grad():
        plus = functional_call(deq, {name: weight + eps * dw}, (x,))
        minus = functional_call(deq, {name: weight - eps * dw}, (x,))
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)


# ============================================================================ dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Phantom", "Unroll"])
def test_low_precision_solves_and_gradients_stay_in_their_dtype(mode, dtype):
    tol = {torch.float32: 1e-5, torch.float16: 1e-3}.get(dtype, 1e-2)
    backward = {"IFT": il.IFT(), "Phantom": il.Phantom()}.get(mode, _modes()[mode])  # adjoint at the solver's tol
    deq = il.DEQ(_Cell(dtype), solver=il.Anderson(tol=tol, max_iter=100), backward=backward)
    x = _x().to(dtype).requires_grad_()
    z = deq(x)
    z.float().pow(2).sum().backward()
    assert z.dtype == x.grad.dtype == deq.cell.lin.weight.grad.dtype == dtype
    exact = _closed(x.detach().double(), deq.cell.lin.weight.detach().double())
    torch.testing.assert_close(z.double(), exact, rtol=0, atol={torch.float32: 1e-4}.get(dtype, 3e-2))


@pytest.mark.parametrize("mode", ["IFT", "Phantom", "Unroll"])
def test_mixed_dtypes_are_refused_by_name_never_silently_cast(mode):
    w = torch.full((D,), 0.5, dtype=F64, requires_grad=True)  # float64 closure tensor, float32 input
    deq = il.DEQ(lambda z, x: z * w + x, solver=il.Anderson(tol=1e-10, max_iter=100), backward=_modes()[mode])
    with pytest.raises(TypeError, match=r"returned torch.float64 but z is torch.float32"):
        deq(_x().float())
    deq32 = il.DEQ(_Cell(torch.float32), backward=_modes()[mode])  # float32 module, float64 input
    with pytest.raises(RuntimeError, match=r"FixedPoint\(z\) in block 0 \(z\).*same dtype"):
        deq32(_x())
    # A float32 closure tensor inside a float64 problem promotes to float64: the result is float64 and exact.
    # Its gradient is the float64 one, rounded once.
    x = _x()
    grads = []
    for dtype in (torch.float32, F64):
        w = torch.full((D,), 0.5, dtype=dtype, requires_grad=True)
        deq = il.DEQ(lambda z, x: z * w + x, solver=il.Anderson(tol=1e-12, max_iter=100), backward=_modes()[mode])
        z = deq(x)
        assert z.dtype == F64
        torch.testing.assert_close(z, 2 * x, rtol=0, atol=1e-10)
        z.sum().backward()
        assert w.grad.dtype == dtype
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1].float(), rtol=1e-6, atol=1e-6)
    if mode != "Unroll":  # (Unroll's gradient is Anderson's trajectory's, not dz*/dw: see the lead's report)
        torch.testing.assert_close(grads[1], (4 * x).sum(0), rtol=1e-8, atol=1e-8)  # dz*/dw = z/(1 − w)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Unroll"])
def test_autocast_leaves_a_float64_model_at_float64_accuracy(mode, autocast_dtype):
    deq = il.DEQ(_Cell(), solver=il.Anderson(tol=1e-10, max_iter=100), backward=_modes()[mode])
    x = _x().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        z = deq(x)
    z.sum().backward()
    weight = deq.cell.lin.weight.detach()
    assert z.dtype == F64 and bool(deq.last_info.converged.all())
    torch.testing.assert_close(z.detach(), _closed(x.detach(), weight), rtol=0, atol=1e-8)
    expected = torch.linalg.solve((torch.eye(D, dtype=F64) - weight).T, torch.ones(D, dtype=F64))
    torch.testing.assert_close(x.grad, expected.expand(4, D), rtol=0, atol=1e-7)


# ============================================================================ copies and conversions


def _torch_save_load(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Phantom", "Unroll"])
def test_a_float32_deq_converted_to_float64_copies_and_reloads_exactly(mode):
    deq = _deq(mode, torch.float32, tol=1e-5, max_iter=100)
    deq(_x().float())  # compiled blocks and caches from a float32 call must not leak into float64
    deq.to(F64)
    deq.solver = il.Anderson(**TIGHT)
    x = _x()
    z = deq(x.clone().requires_grad_())
    weight = deq.cell.lin.weight
    torch.testing.assert_close(z.detach(), _closed(x, weight.detach()), rtol=0, atol=1e-10)
    z.sum().backward()
    grad = weight.grad.clone()
    weight.grad = None
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load):
        twin = copy_of(deq)
        assert twin.backward_mode == deq.backward_mode
        out = twin(x.clone().requires_grad_())
        out.sum().backward()
        torch.testing.assert_close(out.detach(), z.detach(), rtol=0, atol=0)
        torch.testing.assert_close(twin.cell.lin.weight.grad, grad, rtol=0, atol=0)
        assert weight.grad is None  # the copy's parameters are its own
    fresh = il.DEQ(_Cell(), solver=il.Anderson(**TIGHT), backward=_modes()[mode])
    with torch.no_grad():
        fresh.cell.lin.weight.zero_()
    fresh.load_state_dict(deq.state_dict())
    assert list(deq.state_dict()) == ["cell.lin.weight"]
    torch.testing.assert_close(fresh(x), z.detach(), rtol=0, atol=0)
    deq.eval()
    torch.testing.assert_close(deq(x), z.detach(), rtol=0, atol=0)
    deq.train()
    assert deq.cell.training


# ============================================================================ torch.compile


class _Model(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(D, D, dtype=F64)
        self.lin = torch.nn.Linear(D, D, bias=False, dtype=F64)
        with torch.no_grad():
            self.lin.weight.copy_(_w())
        self.deq = il.DEQ(lambda z, x: torch.tanh(self.lin(z) + x), solver=il.Anderson(**TIGHT), backward=_modes()[mode])
        self.out = torch.nn.Linear(D, 1, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.deq(torch.relu(self.inp(x)))).sum()


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_eager_gives_the_eager_values_and_gradients(mode):
    model = _Model(mode)

    def run(f):
        model.zero_grad()
        x = _x().requires_grad_()
        loss = f(x)
        loss.backward()
        return [loss.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]

    eager = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):  # the second call reuses the compiled graph
        for got, want in zip(run(compiled), eager, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ============================================================================ per-sample independence


def _scaled_layer(mode: str) -> tuple[il.ImplicitLayer, torch.Tensor]:
    """`z = s · w ⊙ z + x + 0 · log(s − 0.3)`: `s = 1` contracts (`z = 2x`), `s = 2` has no fixed point
    (`w = 1/2`), `s = 0.25` makes the map NaN; `w` is a shared closure tensor."""
    w = torch.full((D,), 0.5, dtype=F64, requires_grad=True)
    z_, x_, s_ = il.Variable("z"), il.Input("x"), il.Input("s")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x, s: s * w * z + x + 0 * torch.log(s - 0.3), [z_, x_, s_])])
    modes = _modes() | {"Phantom": il.Phantom(k=60, damping=1.0)}
    layer = il.ImplicitLayer(problem, [x_, s_], z_, solver=il.Anderson(tol=1e-12, max_iter=100), backward=modes[mode],
                             init={"z": torch.zeros(D, dtype=F64)})
    return layer, w


@pytest.mark.parametrize("bad", ["nan", "divergent", "huge"])
@pytest.mark.parametrize("mode", MODES)
def test_a_pathological_sample_changes_no_other_value_or_gradient(mode, bad):
    layer, w = _scaled_layer(mode)
    x, s = _x(3), torch.ones(3, 1, dtype=F64)

    def run(x, s, rows):
        x = x.clone().requires_grad_()
        w.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z = layer(x, s)
            z[rows].pow(2).sum().backward()
        return z.detach()[rows], x.grad[rows], w.grad.clone(), caught

    z0, gx0, gw0, caught = run(x, s, slice(None))
    assert not caught
    torch.testing.assert_close(z0, 2 * x, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw0, (2 * 4 * 2 * x * x).sum(0), rtol=1e-8, atol=1e-8)  # d/dw Σ(x/(1-w))²
    x_bad, s_bad = {"nan": (1.0, 0.25), "divergent": (1.0, 2.0), "huge": (1e200, 1.9)}[bad]
    order = torch.tensor([2, 0, 1])
    x2 = torch.cat([x[order][:1], torch.full((1, D), x_bad, dtype=F64), x[order][1:]])
    s2 = torch.cat([s[:1], torch.full((1, 1), s_bad, dtype=F64), s[1:]])
    rows = torch.tensor([0, 2, 3])
    z1, gx1, gw1, caught = run(x2, s2, rows)
    assert any(issubclass(c.category, il.ConvergenceWarning) for c in caught)  # the bad sample is reported
    torch.testing.assert_close(z1, z0[order], rtol=0, atol=1e-12)
    torch.testing.assert_close(gx1, gx0[order], rtol=0, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-12, atol=1e-12)


_Q = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]], dtype=F64)


def _quadratic(mode: str) -> tuple[il.ImplicitLayer, torch.Tensor]:
    """`v = argmin ½ s vᵀQv − yᵀv` (`v = Q_sym⁻¹ y / s` for `s > 0`; for `s < 0` only a maximum exists)."""
    q = _Q.clone().requires_grad_()
    v_, y_, s_ = il.Variable("v"), il.Input("y"), il.Input("s")
    objective = il.Minimize(v_, lambda v, y, s: 0.5 * s[:, 0] * ((v @ q) * v).sum(1) - (y * v).sum(1), [v_, y_, s_],
                            step_size=0.6 if mode == "Phantom" else "auto")  # |1 − 0.6 λ(Q)| ≤ 0.45
    layer = il.ImplicitLayer(il.Problem([objective]), [y_, s_], v_, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=300),
                             backward=_modes()[mode], init={"v": torch.zeros(D, dtype=F64)})
    return layer, q


@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Phantom", "Unroll"])
def test_a_quadratic_minimum_its_gradients_and_a_maximum_in_the_batch(mode):
    layer, q = _quadratic(mode)
    y, s = _x(3), torch.ones(3, 1, dtype=F64)
    yr = y.clone().requires_grad_()
    v = layer(yr, s)
    v.pow(2).sum().backward()
    q_ref, y_ref = _Q.clone().requires_grad_(), y.clone().requires_grad_()
    torch.linalg.solve((q_ref + q_ref.T) / 2, y_ref.T).T.pow(2).sum().backward()
    torch.testing.assert_close(v.detach(), torch.linalg.solve(_Q, y.T).T, rtol=0, atol=1e-10)
    torch.testing.assert_close(yr.grad, y_ref.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-8, atol=1e-9)
    if mode != "IFT":
        assert torch.autograd.gradgradcheck(lambda y: layer(y, s[:2]), (y[:2].clone().requires_grad_(),))
    # A sample whose only stationary point is a maximum (s = −1) changes nothing for the others.
    y3 = torch.cat([y[:1], torch.ones(1, D, dtype=F64), y[1:]]).requires_grad_()
    s3 = torch.cat([s[:1], -torch.ones(1, 1, dtype=F64), s[1:]])
    q.grad = None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        v3 = layer(y3, s3)
        v3[[0, 2, 3]].pow(2).sum().backward()
    torch.testing.assert_close(v3.detach()[[0, 2, 3]], v.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y3.grad[[0, 2, 3]], yr.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.grad, q_ref.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", ["IFT", "Phantom", "Unroll"])
def test_a_maximum_found_by_the_solver_is_reported_not_optimal(mode):
    layer, _ = _quadratic(mode)
    with pytest.warns(il.ConvergenceWarning):
        layer(_x(1).requires_grad_(), -torch.ones(1, 1, dtype=F64))
    (info,) = layer.last_solution.info.values()
    assert info.status.tolist() == [int(il.Status.NOT_OPTIMAL)]


# ============================================================================ JIIO and iMAML


def _jiio(mode: str) -> il.JIIO:
    # z = 0.5 z + x, L = ‖z − y‖² + 0.5 ‖x‖²: x* = 2y / 4.5, z* = 4y / 4.5.
    return il.JIIO(cell=lambda z, x: 0.5 * z + x, head=lambda z: z,
                   objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1,
                   solver=il.Anderson(tol=1e-12, stop="abs", max_iter=500), backward=_modes()[mode])


@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Unroll"])
def test_jiio_gradients_second_order_and_forward_mode_match_the_closed_form(mode):
    jiio = _jiio(mode)
    y = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=F64)
    yr = y.clone().requires_grad_()
    x_star, z_star = jiio(yr)
    weights = torch.arange(3.0, dtype=F64)
    (grad,) = torch.autograd.grad(x_star.pow(2).sum() + (z_star * weights).sum(), yr)
    torch.testing.assert_close(grad, 2 * (2 * y / 4.5) * 2 / 4.5 + weights * 4 / 4.5, rtol=1e-9, atol=1e-10)
    v = torch.randn_like(y, generator=torch.Generator().manual_seed(4))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(jiio(fwAD.make_dual(y, v))[0]).tangent
    torch.testing.assert_close(tangent.detach(), 2 * v / 4.5, rtol=1e-9, atol=1e-10)
    if mode == "IFT":
        with pytest.raises(NotImplementedError, match=r"block 0 \(z, x\).*second_order=True"):
            torch.autograd.gradgradcheck(lambda y: jiio(y)[0] ** 2, (y.clone().requires_grad_(),))
    else:
        assert torch.autograd.gradgradcheck(lambda y: jiio(y)[0] ** 2, (y.clone().requires_grad_(),))


def _imaml_exact(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """argmin mean((X φ − y)²) + ½‖φ − θ‖² per task: `(2XᵀX/N + I) φ = 2Xᵀy/N + θ`."""
    n = x.shape[1]
    eye = torch.eye(x.shape[2], dtype=F64)
    return torch.stack([torch.linalg.solve(2 * x[t].T @ x[t] / n + eye, 2 * x[t].T @ y[t, :, 0] / n + theta) for t in range(x.shape[0])])


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2).mean()


@pytest.mark.parametrize("mode", ["IFT", "IFT-second-order", "Phantom", "Unroll"])
def test_imaml_meta_gradient_its_second_order_and_copies(mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False, dtype=F64)
    backward = {"IFT": None, "IFT-second-order": il.IFT(solver=il.linear.CG(tol=1e-12, max_iter=100), second_order=True),
                "Phantom": il.Phantom(k=200, damping=0.5), "Unroll": il.Unroll()}[mode]
    kw = {"backward": backward} if backward is not None else {}
    imaml = il.IMAML(model, _mse, lam=1.0, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=500),
                     step_size=0.3 if mode == "Phantom" else "auto", **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 2, dtype=F64, generator=g), torch.randn(3, 5, 1, dtype=F64, generator=g)
    phi = imaml(x, y)["weight"][:, 0, :]
    theta = model.weight.detach()[0].clone().requires_grad_()
    exact = _imaml_exact(x, y, theta)
    torch.testing.assert_close(phi.detach(), exact.detach(), rtol=0, atol=1e-10)
    (got,) = torch.autograd.grad(phi.pow(2).sum(), model.weight, create_graph=mode != "IFT")
    (want,) = torch.autograd.grad(exact.pow(2).sum(), theta, create_graph=True)
    torch.testing.assert_close(got[0], want, rtol=1e-9, atol=1e-10)
    if mode == "IFT":
        phi = imaml(x, y)["weight"]
        with pytest.raises(NotImplementedError, match=r"block 0 \(phi\).*second_order=True"):
            torch.autograd.grad(phi.pow(2).sum(), model.weight, create_graph=True)
    else:
        (hess,) = torch.autograd.grad(got.pow(2).sum(), model.weight)
        (hess_ref,) = torch.autograd.grad(want.pow(2).sum(), theta)
        torch.testing.assert_close(hess[0], hess_ref, rtol=1e-8, atol=1e-9)
    for twin in (copy.deepcopy(imaml), pickle.loads(pickle.dumps(imaml))):
        torch.testing.assert_close(twin(x, y)["weight"][:, 0, :].detach(), exact.detach(), rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(imaml(x, y)["weight"][:, 0, :], exact.detach(), rtol=0, atol=1e-10)


# ============================================================================ in-place edits between forward and backward


@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_edited_in_place_before_backward_is_refused_and_an_edited_input_is_not_read(mode):
    w0 = _w()
    x0 = _x()
    w_ref, x_ref = w0.clone().requires_grad_(), x0.clone().requires_grad_()
    reference = il.DEQ(lambda z, x: torch.tanh(z @ w_ref.T + x), solver=il.Anderson(tol=1e-13, max_iter=200))
    reference(x_ref).pow(2).sum().backward()
    w = w0.clone().requires_grad_()
    deq = il.DEQ(lambda z, x: torch.tanh(z @ w.T + x), solver=il.Anderson(tol=1e-13, max_iter=200), backward=_modes()[mode])
    loss = deq(x0.clone().requires_grad_()).pow(2).sum()
    with torch.no_grad():
        w.add_(0.3)  # an optimizer step between forward and backward: the IFT must not use the new weights
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # The input edited in place after the forward: the gradient is still the one at the forward's input.
    w = w0.clone().requires_grad_()
    leaf = x0.clone().requires_grad_()
    x = leaf * 1.0
    loss = deq(x).pow(2).sum()
    with torch.no_grad():
        x.add_(1.0)
    loss.backward()
    torch.testing.assert_close(leaf.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)


def test_forward_mode_tangents_of_the_good_samples_ignore_a_divergent_or_nan_sample():
    for mode in ["IFT", "IFT-second-order", "Phantom", "Unroll"]:
        layer, _ = _scaled_layer(mode)
        x, v = _x(3), _x(3, seed=9)
        for s_bad in (2.0, 0.25):
            x2 = torch.cat([x[:1], torch.ones(1, D, dtype=F64), x[1:]])
            v2 = torch.cat([v[:1], torch.ones(1, D, dtype=F64), v[1:]])
            s2 = torch.ones(4, 1, dtype=F64)
            s2[1] = s_bad
            with pytest.warns(il.ConvergenceWarning), fwAD.dual_level():
                tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x2, v2), s2)).tangent
            torch.testing.assert_close(tangent.detach()[[0, 2, 3]], 2 * v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["IFT", "Unroll"])
def test_torch_compile_around_jiio_gives_the_eager_values_and_gradients(mode):
    jiio = _jiio(mode)
    y = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]], dtype=F64)

    def loss(y: torch.Tensor) -> torch.Tensor:
        return jiio(y)[0].pow(2).sum()

    y_eager, y_compiled = y.clone().requires_grad_(), y.clone().requires_grad_()
    eager = loss(y_eager)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager")(y_compiled)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_compiled.grad, y_eager.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_eager.grad, 2 * (2 * y / 4.5) * 2 / 4.5, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_func_grad_over_module_parameters_matches_the_closed_form(mode):
    deq = _deq(mode)
    x = _x()
    params = {k: v.detach() for k, v in deq.named_parameters()}
    got = torch.func.grad(lambda p: functional_call(deq, p, (x,)).pow(2).sum())(params)["cell.lin.weight"]
    w_ref = _w().requires_grad_()
    _closed(x, w_ref).pow(2).sum().backward()
    torch.testing.assert_close(got, w_ref.grad, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", SECOND_ORDER)
def test_a_gradient_penalty_under_bfloat16_autocast_stays_near_float32(mode):
    penalties = []
    for autocast in (False, True):
        deq = il.DEQ(_Cell(torch.float32), solver=il.Anderson(tol=1e-2, max_iter=100), backward=_modes()[mode])
        x = _x().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = deq(x)
        (gx,) = torch.autograd.grad(z.float().pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        assert bool(deq.last_info.converged.all())
        penalties.append(deq.cell.lin.weight.grad)
    scale = penalties[0].abs().max()
    assert float((penalties[1] - penalties[0]).abs().max() / scale) < 2e-2  # bfloat16 rounding (measured 0.3-0.5%)


def test_jiio_and_imaml_converted_to_float64_after_a_float32_call_solve_in_float64():
    class Head(torch.nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return z

    jiio = il.JIIO(cell=_Cell(torch.float32), head=Head(), objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.5 * (x**2).sum(1),
                   input_shape=3, state_shape=3, step_size=0.1, solver=il.Anderson(tol=1e-10, stop="abs", max_iter=500))
    y = _x(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)  # float32 cannot reach 1e-10
        jiio(y.float())
    jiio.double()
    x_star, z_star = jiio(y)
    assert x_star.dtype == z_star.dtype == F64
    # z = W z + x and x minimises ‖z − y‖² + ½‖x‖²: with M = (I − W)⁻¹, x* = (MᵀM + ½ I)⁻¹ Mᵀ y.
    m = torch.linalg.inv(torch.eye(D, dtype=F64) - _w())
    exact = torch.linalg.solve(m.T @ m + 0.5 * torch.eye(D, dtype=F64), (y @ m).T).T
    torch.testing.assert_close(x_star, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(z_star, x_star @ m.T, rtol=0, atol=1e-8)
    model = torch.nn.Linear(2, 1, bias=False)
    imaml = il.IMAML(model, _mse, lam=1.0, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=500))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 5, 2, dtype=F64, generator=g), torch.randn(3, 5, 1, dtype=F64, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", il.ConvergenceWarning)
        imaml(x.float(), t.float())
    imaml.double()
    phi = imaml(x, t)["weight"][:, 0, :]
    torch.testing.assert_close(phi, _imaml_exact(x, t, model.weight.detach()[0]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_jacobians_checkpointing_and_module_backward_hooks(mode):
    deq = _deq(mode)
    x = _x(2)
    expected = torch.linalg.inv(torch.eye(D, dtype=F64) - deq.cell.lin.weight.detach())
    # The IFT's batched backward (vectorize=True, is_grads_batched) is reported to the lead separately.
    for vectorize in (False, True) if mode in ("Phantom", "Unroll") else (False,):
        jac = torch.autograd.functional.jacobian(deq, x, vectorize=vectorize)
        for b in range(2):
            torch.testing.assert_close(jac[b, :, b, :], expected, rtol=1e-8, atol=1e-9)
        assert float(jac[0, :, 1, :].abs().max()) == 0.0  # samples do not interact
    xr = x.clone().requires_grad_()
    torch.utils.checkpoint.checkpoint(deq, xr, use_reentrant=False).pow(2).sum().backward()
    x_plain = x.clone().requires_grad_()
    deq(x_plain).pow(2).sum().backward()
    torch.testing.assert_close(xr.grad, x_plain.grad, rtol=0, atol=0)
    seen = []
    handle = deq.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_in[0]))
    x_hooked = x.clone().requires_grad_()
    deq(x_hooked).sum().backward()
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], x_hooked.grad, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["IFT", "Unroll"])
def test_imaml_tasks_keep_their_values_and_meta_gradient_beside_a_task_of_huge_curvature(mode):
    # iMAML sets one step size for the meta-batch from the largest curvature: a task 10⁸ times stiffer
    # than the others may fail (reported), but the others' adapted parameters and meta-gradient are exact.
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False, dtype=F64)
    kw = {"backward": il.Unroll()} if mode == "Unroll" else {}
    imaml = il.IMAML(model, _mse, lam=1.0, solver=il.Anderson(tol=1e-12, stop="abs", max_iter=100), **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 2, dtype=F64, generator=g), torch.randn(3, 5, 1, dtype=F64, generator=g)
    x_batch, y_batch = torch.cat([x[:1], x[1:2] * 1e4, x[1:]]), torch.cat([y[:1], y[1:2], y[1:]])
    with pytest.warns(il.ConvergenceWarning, match="1/4 samples did not converge"):
        phi = imaml(x_batch, y_batch)["weight"][:, 0, :]
    good = [0, 2, 3]
    (got,) = torch.autograd.grad(phi[good].pow(2).sum(), model.weight)
    theta = model.weight.detach()[0].clone().requires_grad_()
    exact = _imaml_exact(x, y, theta)
    (want,) = torch.autograd.grad(exact.pow(2).sum(), theta)
    torch.testing.assert_close(phi.detach()[good], exact.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(got[0], want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_starts_that_carry_a_graph_add_nothing_to_the_gradient(mode):
    w = _w()
    expected = torch.linalg.solve((torch.eye(D, dtype=F64) - w).T, torch.ones(D, dtype=F64)).expand(4, D)
    # A start computed from the input (z_init callable): the solution does not depend on it.
    deq = il.DEQ(lambda z, x: z @ w.T + x, solver=il.Anderson(**TIGHT), backward=_modes()[mode], z_init=lambda x: 3 * x)
    x = _x().requires_grad_()
    deq(x).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-8, atol=1e-9)
    # A warm start from the previous call's output, graph and all: no gradient leaks into that call.
    x1, x2 = _x().requires_grad_(), (_x() + 1).requires_grad_()
    previous = deq(x1)
    deq.layer.solve(x2, init={"z": previous})["z"].sum().backward()
    assert x1.grad is None
    torch.testing.assert_close(x2.grad, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_with_forward_ad_checks(mode):
    layer, _ = _linear(mode)
    assert torch.autograd.gradcheck(layer, (_x(2).requires_grad_(),), check_forward_ad=True, check_backward_ad=False)


@pytest.mark.parametrize("mode", ["IFT", "Phantom", "Unroll"])
def test_dropout_in_train_mode_is_reported_and_eval_mode_converges(mode):
    class DropCell(_Cell):
        def __init__(self) -> None:
            super().__init__(nonlinear=True)
            self.drop = torch.nn.Dropout(0.2)

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.drop(super().forward(z, x))

    torch.manual_seed(0)
    deq = il.DEQ(DropCell(), solver=il.Anderson(tol=1e-6, max_iter=50), backward=_modes()[mode])
    x = torch.randn(4, D, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3  # dropout moves every sample
    with pytest.warns(il.ConvergenceWarning):  # a new mask at every evaluation: no fixed point to converge to
        deq(x.clone().requires_grad_())
    deq.eval()
    deq(x)
    assert bool(deq.last_info.converged.all())


@pytest.mark.parametrize("mode", MODES)
def test_an_input_made_under_inference_mode_still_trains_the_parameters(mode):
    with torch.inference_mode():
        x = _x()
    deq = _deq(mode)
    deq(x).sum().backward()
    w_ref = _w().requires_grad_()
    _closed(x.clone(), w_ref).sum().backward()
    torch.testing.assert_close(deq.cell.lin.weight.grad, w_ref.grad, rtol=1e-8, atol=1e-9)
