"""Regression tests of the trust issues in the core (layer, backward modes, system, sets, models).

Each test names the item it guards. All of them failed on `main` before the fix (commit messages say
how): a wrong number reported as right, a bare torch error, or state that did not survive real use.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch

import implicitlayers as il

# ----------------------------------------------------------------------------- helpers


def _box_lp(cost: torch.Tensor, start: float, solver, lower=0.0) -> il.ImplicitLayer:
    """`min Σ cost·x over x ≥ lower`, one sample per row of `cost`."""
    c, x = il.Input("c"), il.Variable("x")
    problem = il.Problem([il.Minimize(x, lambda x, c: (c * x).sum(1), (x, c), il.sets.Box(lower), step_size=0.5)])
    return il.ImplicitLayer(problem, c, x, solver=solver, init={"x": torch.full((cost.shape[1],), start, dtype=cost.dtype)})


class _Cell(torch.nn.Module):
    def __init__(self, d: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.linear.weight.copy_(0.3 * torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


# ----------------------------------------------------------------------------- item 1: constrained residual


@pytest.mark.parametrize(
    "solver",
    [
        il.Anderson(tol=1e-8, max_iter=30, stop="abs", on_failure="ignore"),
        il.Anderson(tol=1e-8, max_iter=30, stop="rel", on_failure="ignore"),
        il.Broyden(tol=1e-8, max_iter=30, on_failure="ignore"),
    ],
    ids=["anderson-abs", "anderson-rel", "broyden"],
)
def test_a_huge_start_along_an_unbounded_box_direction_is_not_reported_converged(solver):
    # min Σ c·x over x ≥ 0 (c > 0) has the solution 0; from 1e18 the old residual v − Π(v − αc) rounded to 0.
    cost = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    sol = _box_lp(cost, 1e18, solver).solve(cost)
    x, info = sol.values["x"], next(iter(sol.info.values()))
    correct = bool((x.abs() < 1e-6).all())
    assert correct or not info.converged.any(), f"x = {x} reported converged"


def test_an_unbounded_lp_is_reported_as_not_converged():
    cost = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # x₂ → ∞ lowers the objective without bound
    sol = _box_lp(cost, 0.0, il.Anderson(tol=1e-8, max_iter=40, on_failure="ignore")).solve(cost)
    assert not bool(next(iter(sol.info.values())).converged.any())


def test_natural_residual_of_each_set_equals_the_difference_where_no_cancellation_occurs():
    torch.manual_seed(0)
    v, s = 3 * torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for c in (il.sets.Box(-1.0, torch.linspace(0, 2, 5, dtype=torch.float64)), il.sets.L2Ball(1.5, center=0.3), il.sets.LInfBall(0.7)):
        torch.testing.assert_close(c.natural_residual(v, s), v - c.project(v - s))


def test_box_lp_solution_matches_closed_form_from_a_moderate_start():
    cost = torch.tensor([[1.0, 2.0], [0.5, 3.0]], dtype=torch.float64)
    sol = _box_lp(cost, 5.0, il.Anderson(tol=1e-10, max_iter=100), lower=torch.tensor([0.0, -1.0])).solve(cost)
    torch.testing.assert_close(sol.values["x"], torch.tensor([[0.0, -1.0], [0.0, -1.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------- item 2: Unroll


def _linear_fixed_point(backward, start):
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: 0.5 * z + x, (z_, x_))])
    return il.ImplicitLayer(problem, x_, z_, backward=backward, solver=il.Anderson(tol=1e-6, max_iter=50), init={"z": start})


def test_unroll_differentiates_samples_that_start_converged():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    start = (2 * x).detach()  # the exact fixed point z* = 2x of both samples
    z = _linear_fixed_point(il.Unroll(), lambda x: start)(x)
    assert z.grad_fn is not None, "a batch that starts converged lost its graph"
    (g,) = torch.autograd.grad(z.sum(), x)
    assert bool((g != 0).all()), "Unroll gave a zero gradient to samples that started at tolerance"
    torch.testing.assert_close(z, 2 * x)


def test_unroll_gives_nonzero_gradient_to_the_converged_sample_of_a_mixed_batch():
    x = torch.tensor([[1.0], [0.5]], dtype=torch.float64, requires_grad=True)
    start = torch.tensor([[2.0], [0.0]], dtype=torch.float64)  # sample 0 starts at z*, sample 1 does not
    z = _linear_fixed_point(il.Unroll(), lambda x: start)(x)
    (g,) = torch.autograd.grad(z.sum(), x)
    assert float(g[0]) != 0.0 and float(g[1]) > 1.5  # sample 1: ≈ dz*/dx = 2


# ----------------------------------------------------------------------------- item 3: functional_call


def test_deq_registers_its_cell_once_and_functional_call_leaves_parameters_untouched():
    deq = il.DEQ(_Cell(), solver=il.Anderson(tol=1e-8, max_iter=100))
    keys = list(deq.state_dict())
    assert keys == ["cell.linear.weight", "cell.linear.bias"], keys
    before = {k: v.clone() for k, v in deq.state_dict().items()}
    params = {k: torch.zeros_like(v) for k, v in deq.named_parameters()}
    x = torch.randn(3, 4)
    z = torch.func.functional_call(deq, params, (x,))
    torch.testing.assert_close(z, torch.tanh(x))  # zero weights: z* = tanh(0 + x)
    for k, v in deq.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was overwritten by functional_call"


# ----------------------------------------------------------------------------- item 4: JIIO threads


def test_jiio_concurrent_calls_use_their_own_start():
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4)
    jiio = il.JIIO(
        cell=lambda z, x: torch.tanh(z @ W.T + x), head=lambda z: z,
        objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.1 * (x**2).sum(1),
        input_shape=4, state_shape=4, step_size=0.5, solver=il.Anderson(tol=1e-3, max_iter=3, on_failure="ignore"),
    )
    target = 0.3 * torch.ones(2, 4)
    # max_iter=3: the result depends visibly on the start, so a start taken from another call shows.
    starts = [torch.full((4,), float(i)) for i in range(8)]
    with torch.no_grad():
        expected = [jiio(target, x0=s)[0] for s in starts]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(5):
            with torch.no_grad():
                results[i] = jiio(target, x0=starts[i])[0]
            if not torch.equal(results[i], expected[i]):
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(starts)):
        torch.testing.assert_close(results[i], expected[i])


# ----------------------------------------------------------------------------- item 5: empty boxes


def test_box_with_tensor_bounds_lower_above_upper_is_rejected():
    with pytest.raises(ValueError, match=r"Box: the set is empty.*index \(1,\)"):
        il.sets.Box(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))


# ----------------------------------------------------------------------------- item 10: requires_grad


def test_minimize_outputs_do_not_require_grad_when_nothing_does():
    y_, u_ = il.Input("y"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, y: ((u - y) ** 2).sum(1), (u_, y_), step_size=0.4)])
    layer = il.ImplicitLayer(problem, y_, u_, init={"u": torch.zeros(3)})
    u = layer(torch.ones(2, 3))
    assert not u.requires_grad
    torch.testing.assert_close(u, torch.ones(2, 3), atol=1e-3, rtol=0)
    # ... and they do when the input does.
    y = torch.ones(2, 3, requires_grad=True)
    (g,) = torch.autograd.grad(layer(y).sum(), y)
    torch.testing.assert_close(g, torch.ones(2, 3), atol=1e-3, rtol=0)


def test_minimize_outputs_require_grad_through_a_captured_parameter():
    w = torch.tensor(2.0, requires_grad=True)
    y_, u_ = il.Input("y"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, y: ((u - w * y) ** 2).sum(1), (u_, y_), step_size=0.4)])
    u = il.ImplicitLayer(problem, y_, u_, init={"u": torch.zeros(3)}, solver=il.Anderson(tol=1e-8, max_iter=100))(torch.ones(2, 3))
    (g,) = torch.autograd.grad(u.sum(), w)
    torch.testing.assert_close(g, torch.tensor(6.0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- item 11: backward policy


def _failing_backward(backward):
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: 0.9 * z + x, (z_, x_))])
    return il.ImplicitLayer(
        problem, x_, z_, solver=il.Anderson(tol=1e-8, max_iter=100, on_failure="ignore"), backward=backward,
        init={"z": torch.zeros(2)},
    )


def test_backward_failure_is_reported_even_when_the_forward_ignores_failures():
    layer = _failing_backward(il.IFT(solver=il.FixedPointIteration(max_iter=2, tol=1e-12)))
    x = torch.ones(3, 2, requires_grad=True)
    z = layer(x)
    with pytest.warns(il.ConvergenceWarning, match="IFT backward of block 0"):
        (g,) = torch.autograd.grad(z.sum(), x)
    assert torch.equal(g, torch.zeros_like(g)), "a failed sample's gradient must be the documented zero"


def test_backward_policy_raise_and_ignore():
    x = torch.ones(3, 2, requires_grad=True)
    layer = _failing_backward(il.IFT(solver=il.FixedPointIteration(max_iter=2, tol=1e-12), on_failure="raise"))
    with pytest.raises(il.ConvergenceError, match="IFT backward"):
        torch.autograd.grad(layer(x).sum(), x)
    layer = _failing_backward(il.IFT(solver=il.FixedPointIteration(max_iter=2, tol=1e-12), on_failure="ignore"))
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError, match="on_failure"):
        il.IFT(on_failure="loud")


# ----------------------------------------------------------------------------- issue 13: errors with context


def test_a_cell_that_fails_inside_the_solve_names_the_condition_and_shapes():
    deq = il.DEQ(lambda z, x: z @ torch.ones(5, 5) + x)  # the cell expects width 5, x has width 4
    with pytest.raises(RuntimeError, match=r"FixedPoint\(z\) in block 0 \(z\).*z: \(2, 4\), x: \(2, 4\)") as err:
        deq(torch.randn(2, 4))
    assert err.value.__cause__ is not None  # the original torch error is chained


def test_a_wrong_z_init_shape_is_named():
    deq = il.DEQ(_Cell(4), z_init=torch.zeros(6))
    with pytest.raises(RuntimeError, match=r"z: \(2, 6\).*per-sample shape \(6,\).*z_init"):
        deq(torch.randn(2, 4))


def test_an_objective_that_does_not_depend_on_its_variable_is_named():
    y_, u_ = il.Input("y"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, y: ((u.detach() - y) ** 2).sum(1), (u_, y_))])
    layer = il.ImplicitLayer(problem, y_, u_, init={"u": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"Minimize\(u\).*does not depend on u"):
        layer(torch.ones(2, 3))


def test_meta_inputs_are_refused_clearly():
    deq = il.DEQ(_Cell(4))
    with pytest.raises(NotImplementedError, match="'meta' device"):
        deq(torch.randn(2, 4, device="meta"))


def test_single_nodes_are_accepted_for_inputs_and_outputs():
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: 0.5 * z + x, (z_, x_))])
    z = il.ImplicitLayer(problem, inputs=x_, outputs=z_, init={"z": torch.zeros(2)}, solver=il.Anderson(tol=1e-8))(torch.ones(3, 2))
    assert isinstance(z, torch.Tensor)
    torch.testing.assert_close(z, 2 * torch.ones(3, 2))
    (z_tuple,) = il.ImplicitLayer(problem, inputs=[x_], outputs=[z_], init={"z": torch.zeros(2)})(torch.ones(3, 2))
    assert isinstance(z_tuple, torch.Tensor)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v: il.FixedPoint(v, lambda z: z, (v,), damping=float("nan")), "damping"),
        (lambda v: il.Root(v, lambda z: z, (v,), damping=float("inf")), "damping"),
        (lambda v: il.Minimize(v, lambda z: z.sum(1), (v,), step_size=float("nan")), "step_size"),
        (lambda v: il.sets.Box(float("nan"), 1.0), "lower contains NaN"),
        (lambda v: il.sets.Box(0.0, torch.tensor([1.0, float("nan")])), "upper contains NaN"),
        (lambda v: il.sets.L2Ball(float("nan")), "radius"),
        (lambda v: il.sets.LInfBall(float("inf")), "radius"),
        (lambda v: il.Phantom(k=True), "k must be an integer"),
        (lambda v: il.Phantom(damping=float("nan")), "damping"),
    ],
)
def test_non_finite_and_boolean_options_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make(il.Variable("v"))


# ----------------------------------------------------------------------------- issue 13: state


def test_torch_save_and_deepcopy_after_a_training_step():
    torch.manual_seed(0)
    deq = il.DEQ(_Cell(4), solver=il.Anderson(tol=1e-6, max_iter=50))
    opt = torch.optim.SGD(deq.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    deq(x).pow(2).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(deq, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(deq)
    pickle.loads(pickle.dumps(deq))
    with torch.no_grad():
        ref = deq(x)
        torch.testing.assert_close(loaded(x), ref)
        torch.testing.assert_close(copied(x), ref)


def test_jiio_pickles_after_a_call():
    torch.manual_seed(0)
    cell = _JiioCell()
    jiio = il.JIIO(cell=cell, head=torch.nn.Identity(), objective=_JiioObjective(), input_shape=4, state_shape=4, step_size=0.5)
    target = torch.randn(2, 4, requires_grad=True)
    x, _ = jiio(target)
    x.sum().backward()
    clone = pickle.loads(pickle.dumps(jiio))
    with torch.no_grad():
        torch.testing.assert_close(clone(target)[0], jiio(target)[0])


class _JiioCell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.linear(z) + x)


class _JiioObjective(torch.nn.Module):
    def forward(self, out, y, x):
        return ((out - y) ** 2).sum(1) + 0.1 * (x**2).sum(1)


def test_closures_over_tensors_follow_a_deepcopy():
    W = torch.full((2, 2), 0.25)
    x_, z_ = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z_, lambda z, x: z @ W.T + x, (z_, x_))])
    layer = il.ImplicitLayer(problem, x_, z_, init={"z": torch.zeros(2)}, solver=il.Anderson(tol=1e-10, max_iter=100))
    teacher = copy.deepcopy(layer)
    W.mul_(0.0)  # the original's weights change; the copy must keep its own
    x = torch.ones(1, 2)
    torch.testing.assert_close(teacher(x), torch.full((1, 2), 2.0))
    torch.testing.assert_close(layer(x), x)


def test_a_convolutional_deq_follows_new_image_sizes():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(0.1)
    deq = il.DEQ(lambda z, x: torch.tanh(conv(z) + x), solver=il.Anderson(tol=1e-6, max_iter=60))
    for size in (6, 9, 6):
        z = deq(torch.randn(2, 2, size, size))
        assert z.shape == (2, 2, size, size) and deq.last_info.all_converged


@pytest.mark.parametrize("norm", ["spectral", "weight"])
def test_normalised_cells_survive_concurrent_calls(norm):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    lin = il.nn.spectral_norm(lin, bound=0.5) if norm == "spectral" else il.nn.weight_norm(lin)
    if norm == "weight":
        with torch.no_grad():
            lin.parametrizations.weight.original0.mul_(0.3 / lin.parametrizations.weight.original0.norm(dim=1, keepdim=True))
    deq = il.DEQ(lambda z, x: torch.tanh(lin(z) + x), solver=il.Anderson(tol=1e-6, max_iter=100),
                 backward=il.IFT(solver=il.Anderson(tol=1e-6, max_iter=200))).eval()
    lin.eval()
    xs = [0.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def grads(x):
        deq.zero_grad(set_to_none=True)
        params = [p for p in lin.parameters()]
        return torch.autograd.grad(deq(x).pow(2).sum(), params)

    expected = [grads(x) for x in xs]
    errors: list[BaseException] = []
    got: dict[int, tuple] = {}

    def run(i):
        try:
            for _ in range(5):
                got[i] = grads(xs[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for a, b in zip(got[i], expected[i]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_jiio_closures_follow_a_deepcopy():
    W = torch.full((4, 4), 0.1)
    jiio = il.JIIO(
        cell=lambda z, x: torch.tanh(z @ W.T + x), head=lambda z: z,
        objective=lambda out, y, x: ((out - y) ** 2).sum(1) + 0.1 * (x**2).sum(1), input_shape=4, state_shape=4, step_size=0.5,
    )
    target = 0.3 * torch.ones(2, 4)
    ref = jiio(target)[0].detach()
    teacher = copy.deepcopy(jiio)
    W.mul_(0.0)
    torch.testing.assert_close(teacher(target)[0], ref)
    assert not torch.allclose(jiio(target)[0], ref)


def test_deq_solver_can_be_replaced():
    deq = il.DEQ(lambda z, x: 0.5 * z + x)
    deq.solver = deq.solver.replace(max_iter=3, on_failure="ignore")
    deq(torch.ones(2, 3))
    assert int(deq.last_info.nstep.max()) <= 3
    with pytest.raises(TypeError, match="DEQ: solver must be"):
        deq.solver = "anderson"


def test_autocast_training_through_a_deq_matches_float32():
    torch.manual_seed(0)
    inject, weight = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16, bias=False)
    torch.nn.init.normal_(weight.weight, std=0.3 / 4)
    # Tolerances at bfloat16's resolution (eps 8e-3): tighter ones stall, and say so.
    deq = il.DEQ(lambda z, u: torch.tanh(weight(z) + u), solver=il.Anderson(tol=1e-2, max_iter=50),
                 backward=il.IFT(solver=il.Anderson(tol=1e-2, max_iter=100)))
    x = torch.randn(4, 8)

    def grads(autocast: bool):
        weight.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = deq(inject(x))
        out.float().pow(2).sum().backward()  # the IFT backward runs after the autocast block has closed
        return weight.weight.grad.clone()

    reference, mixed = grads(False), grads(True)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, reference, rtol=0.1, atol=0.05)


def test_ift_gradients_through_functional_call_with_other_parameters():
    # The backward runs after functional_call has put the module's own parameters back: its linear solve
    # must use the parameters of the call (on main the bias gradient was 1.057 instead of 0.870).
    torch.manual_seed(0)
    solver = il.Anderson(tol=1e-12, max_iter=200)
    deq = il.DEQ(_Cell(3).double(), solver=solver, backward=il.IFT(solver=solver))
    ref = il.DEQ(_Cell(3).double(), solver=solver, backward=il.IFT(solver=solver))
    x = torch.randn(2, 3, dtype=torch.float64)
    params = {k: (v.detach() + 0.05).requires_grad_() for k, v in deq.named_parameters()}
    torch.func.functional_call(deq, params, (x,)).sum().backward()
    with torch.no_grad():
        for k, v in ref.named_parameters():
            v.copy_(params[k])
    ref(x).sum().backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(params[k].grad, v.grad, rtol=1e-9, atol=1e-12)
