"""Specification of `WeightTied` with distinct sparse masks: the masks, the masked unrolling, its gradients,
its limit (the DEQ), norms, errors, and the benchmark and example in fast mode."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import implicitlayers as il
from implicitlayers.models.weight_tied import WeightTied

ROOT = pathlib.Path(__file__).resolve().parent.parent


class TanhCell(nn.Module):
    """`f(z, x) = tanh(W z + b + x)`, with `‖W‖₂ = norm` when `norm` is given."""

    def __init__(self, dim: int, seed: int = 0, norm: float | None = None, dtype=torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(dim, dim, dtype=dtype)
        if norm is not None:
            with torch.no_grad():
                self.linear.weight.mul_(norm / torch.linalg.matrix_norm(self.linear.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + x)


class LinearCell(nn.Module):
    """`f(z, x) = linear(z) + x` around a given linear layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(z) + x


class TwoLayerCell(nn.Module):
    """`f(z, x) = tanh(W₂ relu(W₁ z + x))`: two maskable weights."""

    def __init__(self, dim: int, dtype=torch.float64) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(dim, dim, dtype=dtype)
        self.outer = nn.Linear(dim, dim, bias=False, dtype=dtype)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.outer(torch.relu(self.inner(z) + x)))


class ConvCell(nn.Module):
    """`f(z, x) = relu(GroupNorm(conv(z)) + x)` on `(B, C, H, W)` maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64)
        self.norm = nn.GroupNorm(2, channels, dtype=torch.float64)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(z)) + x)


def unrolled(cell: TanhCell, masks: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The oracle: `z_{l+1} = tanh((W ⊙ M_l) z_l + b + x)` written out."""
    z = torch.zeros_like(x)
    for mask in masks:
        z = torch.tanh(z @ (cell.linear.weight * mask).T + cell.linear.bias + x)
    return z


# ---------------------------------------------------------------- the masks


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    depth=st.integers(1, 8),
    density=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masks_have_the_requested_density_and_differ_across_applications(rows, cols, depth, density, seed):
    cell = nn.Linear(cols, rows)
    wt = WeightTied(LinearCell(cell), depth, masks="random", density=density, seed=seed)
    stack = torch.stack([wt.mask(step)["linear"] for step in range(depth)])
    assert stack.dtype == torch.bool and stack.shape == (depth, rows, cols)
    ones = max(1, round(density * rows * cols))
    assert (stack.flatten(1).sum(1) == ones).all()
    if math.comb(rows * cols, ones) >= depth:
        assert len({bytes(m.flatten().numpy()) for m in stack}) == depth


def test_random_masks_are_reproducible_from_the_seed_and_change_with_it():
    def masks(seed: int) -> torch.Tensor:
        return WeightTied(TanhCell(16, seed=5), 6, masks="random", density=0.5, seed=seed).mask_linear

    assert torch.equal(masks(3), masks(3))
    assert not torch.equal(masks(3), masks(4))


def test_every_weight_has_its_own_masks_and_biases_stay_dense():
    cell = TwoLayerCell(10)
    wt = WeightTied(cell, 4, masks="random", density=0.25, seed=0)
    names = {name for name, _ in wt.named_buffers()}
    assert names == {"mask_inner", "mask_outer"}
    assert not torch.equal(wt.mask_inner, wt.mask_outer)
    assert wt.mask(2)["inner"].shape == cell.inner.weight.shape


def test_masks_are_saved_in_the_state_dict_and_loaded_back():
    x = torch.randn(3, 16)
    source = WeightTied(TanhCell(16), 5, masks="random", density=0.25, seed=1)
    target = WeightTied(TanhCell(16, seed=9), 5, masks="random", density=0.25, seed=2)
    assert not torch.equal(source(x), target(x))
    state = source.state_dict()
    assert torch.equal(state["mask_linear"], source.mask_linear)
    target.load_state_dict(state)
    assert torch.equal(target.mask_linear, source.mask_linear)
    assert torch.equal(target(x), source(x))


# ---------------------------------------------------------------- the forward map


def test_all_ones_masks_equal_plain_unrolling():
    cell, x = TanhCell(12), torch.randn(4, 12)
    plain = WeightTied(cell, 7)(x)
    ones = WeightTied(cell, 7, masks=[torch.ones(12, 12)] * 7)(x)
    assert torch.equal(WeightTied(cell, 7, masks=torch.ones(7, 12, 12))(x), ones)  # a stacked tensor is the list of its slices
    dense_random = WeightTied(cell, 7, masks="random", density=1.0)(x)
    manual = x.new_zeros(x.shape)
    for _ in range(7):
        manual = cell(manual, x)
    assert torch.equal(ones, plain) and torch.equal(dense_random, plain)
    torch.testing.assert_close(plain, manual, rtol=0, atol=0)


def test_masked_unrolling_matches_the_written_out_oracle():
    cell, x = TanhCell(12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    wt = WeightTied(cell, 6, masks="random", density=0.5, seed=7)
    masks = [wt.mask(step)["linear"] for step in range(6)]
    torch.testing.assert_close(wt(x), unrolled(cell, masks, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(wt(x), WeightTied(cell, 6)(x))


def test_given_masks_by_module_name_are_used_step_by_step():
    cell = TwoLayerCell(6)
    g = torch.Generator().manual_seed(0)
    masks = [{"inner": torch.rand(6, 6, generator=g) < 0.5, "outer": torch.rand(6, 6, generator=g) < 0.5} for _ in range(3)]
    x = torch.randn(2, 6, dtype=torch.float64)
    z = torch.zeros_like(x)
    for m in masks:
        hidden = torch.relu(z @ (cell.inner.weight * m["inner"]).T + cell.inner.bias + x)
        z = torch.tanh(hidden @ (cell.outer.weight * m["outer"]).T)
    torch.testing.assert_close(WeightTied(cell, 3, masks=masks)(x), z, rtol=1e-12, atol=1e-12)


def test_conv_weights_are_masked_and_the_norm_layer_stays_dense():
    cell = ConvCell(4)
    wt = WeightTied(cell, 3, masks="random", density=0.5, seed=0)
    assert set(wt.mask(0)) == {"conv"} and wt.mask(0)["conv"].shape == (4, 4, 3, 3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    z = torch.zeros_like(x)
    for step in range(3):
        conv = torch.nn.functional.conv2d(z, cell.conv.weight * wt.mask(step)["conv"], cell.conv.bias, padding=1)
        z = torch.relu(cell.norm(conv) + x)
    torch.testing.assert_close(wt(x), z, rtol=1e-12, atol=1e-12)


def test_the_cell_is_left_dense_after_a_forward_even_one_that_fails():
    cell = TanhCell(8)
    wt = WeightTied(cell, 3, masks="random", density=0.25)
    x = torch.randn(2, 8)
    wt(x)
    with pytest.raises(RuntimeError):
        wt(torch.randn(2, 5))  # shape mismatch inside the cell
    assert "forward" not in vars(cell.linear)
    torch.testing.assert_close(cell(x, x), torch.tanh(x @ cell.linear.weight.T + cell.linear.bias + x))


# ---------------------------------------------------------------- gradients


def test_masked_gradients_match_autograd_in_float64_gradcheck():
    cell = TwoLayerCell(4)
    wt = WeightTied(cell, 3, masks="random", density=0.5, seed=0)
    names = ["cell.inner.weight", "cell.inner.bias", "cell.outer.weight"]
    params = [dict(wt.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *tensors):
        return torch.func.functional_call(wt, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradients_of_a_weight_sum_its_masked_step_gradients():
    # dL/dW = Σ_l M_l ⊙ dL/d(W ⊙ M_l): entries no mask keeps get exactly zero gradient.
    cell = TanhCell(10, dtype=torch.float64)
    masks = [torch.zeros(10, 10, dtype=torch.bool) for _ in range(2)]
    masks[0][:, :3] = True
    masks[1][:, 2:5] = True
    WeightTied(cell, 2, masks=masks)(torch.randn(3, 10, dtype=torch.float64)).square().sum().backward()
    grad = cell.linear.weight.grad
    assert (grad[:, 5:] == 0).all() and (grad[:, :5] != 0).any()


def test_spectral_norm_is_applied_before_the_mask_and_reaches_the_raw_weight():
    cell = TanhCell(8, dtype=torch.float64)
    il.nn.spectral_norm(cell.linear, bound=0.5)
    wt = WeightTied(cell, 4, masks="random", density=0.5, seed=0).eval()  # eval: the power iteration stays put
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = unrolled(cell, [wt.mask(step)["linear"] for step in range(4)], x)  # cell.linear.weight is normalised
    torch.testing.assert_close(wt(x), expected, rtol=1e-12, atol=1e-12)
    raw = cell.linear.parametrizations.weight.original
    wt(x).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    name = "cell.linear.parametrizations.weight.original"
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(wt, {name: w}, (x,)), (raw.detach().clone().requires_grad_(),))


def test_weight_norm_with_masks_trains_g_and_v():
    cell = il.nn.weight_norm(TanhCell(8).linear)
    wt = WeightTied(LinearCell(cell), 4, masks="random", density=0.75)
    wt(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (cell.parametrizations.weight.original0, cell.parametrizations.weight.original1))


def test_a_contractive_weight_tied_model_tends_to_the_deq_with_depth():
    cell = TanhCell(6, norm=0.6, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    tight = il.Anderson(memory=5, lam=1e-12, tol=1e-13, max_iter=300)
    deq = il.DEQ(cell, solver=tight, backward=il.IFT(solver=tight))
    z_star = deq(x)
    (g_star,) = torch.autograd.grad(z_star.square().sum(), cell.linear.weight)
    errors, grad_errors = [], []
    for depth in (2, 4, 8, 16, 32):
        z = WeightTied(cell, depth)(x)
        (g,) = torch.autograd.grad(z.square().sum(), cell.linear.weight)
        errors.append(float((z - z_star).detach().norm()))
        grad_errors.append(float((g - g_star).norm() / g_star.norm()))
    # The state error contracts at least like 0.6^depth; the gradient error shrinks too.
    assert all(b < a * 0.6**2 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6 and grad_errors[-1] < 1e-5
    assert all(b < a for a, b in zip(grad_errors, grad_errors[1:]))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(density=0.5), ValueError, "masks='random' only"),
        (dict(seed=1), ValueError, "masks='random' only"),
        (dict(masks="sparse"), ValueError, "None, 'random' or a list"),
        (dict(masks="random", density=0.0), ValueError, r"density must be a number in \(0, 1\]"),
        (dict(masks="random", density=1.5), ValueError, r"density must be a number in \(0, 1\]"),
        (dict(masks="random", seed=1.5), TypeError, "seed must be an integer"),
        (dict(masks=[torch.ones(4, 4)] * 2), ValueError, "list of depth=3 masks"),
        (dict(masks=torch.ones(2, 4, 4)), ValueError, "list of depth=3 masks"),
        (dict(masks=3), ValueError, "list of depth=3 masks.*got int"),
        (dict(masks=[torch.ones(4, 5)] * 3), ValueError, r"has shape \(4, 5\), the weight \(4, 4\)"),
        (dict(masks=[2 * torch.ones(4, 4)] * 3), ValueError, "only 0 and 1"),
        (dict(masks=[{"other": torch.ones(4, 4)}] * 3), ValueError, r"a mask for each of \['linear'\]"),
        (dict(masks=[torch.ones(4, 4)] * 2 + [torch.ones(4, 4)], density=0.5), ValueError, "not to given masks"),
    ],
)
def test_bad_mask_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightTied(TanhCell(4), 3, **kwargs)


def test_cells_that_cannot_be_masked_are_clear_errors():
    with pytest.raises(TypeError, match="need the cell to be an nn.Module"):
        WeightTied(lambda z, x: z + x, 2, masks="random")
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv1d/2d/3d"):
        WeightTied(nn.Sequential(nn.Tanh()), 2, masks="random")

    class Custom(nn.Linear):
        def forward(self, input):
            return super().forward(input) * 2

    with pytest.raises(TypeError, match="overrides Linear.forward"):
        WeightTied(LinearCell(Custom(3, 3)), 2, masks="random")
    with pytest.raises(ValueError, match="has 2 maskable weights"):
        WeightTied(TwoLayerCell(3), 2, masks=[torch.ones(3, 3)] * 2)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        WeightTied(TanhCell(3), 0, masks="random")
    with pytest.raises(IndexError, match="step must be in"):
        WeightTied(TanhCell(3), 2, masks="random").mask(2)


# ---------------------------------------------------------------- benchmark and example


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"_test_weight_tied_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_example_compares_models_of_equal_size_in_fast_mode(tmp_path):
    module = _load(ROOT / "examples" / "weight_tied_vs_deq.py")
    threads = torch.get_num_threads()
    results = module.main(["--fast", "--sweep", "--out", str(tmp_path), "--no-progress"])
    assert torch.get_num_threads() == threads
    comparison = results["comparison"]
    assert [key.rsplit(" h=", 1)[0] for key in comparison] == [spec.label for spec in module.COMPARISON]
    assert len({row["parameters"] for row in comparison.values()}) == 1  # equal parameter counts
    for key, row in comparison.items():
        assert 0.0 <= row["test_accuracy"]["mean"] <= 1.0 and row["seconds_per_epoch"]["mean"] > 0
        if key.startswith("WT"):
            assert row["forward_nfe"]["mean"] == int(key.split("L=")[1].split()[0]) and row["nonconverged"]["mean"] == 0
        else:
            assert row["forward_nfe"]["mean"] >= 1 and 0.0 <= row["nonconverged"]["mean"] <= 1.0
    assert comparison["WT L=8 h=16"]["test_accuracy"]["mean"] > 0.15  # two epochs already learn (chance: 10 %)
    assert len(results["sweep"]) == 4
    assert all(path.exists() and path.stat().st_size > 0 for path in results["plots"])
    assert (tmp_path / "weight_tied_vs_deq.json").exists()


def test_the_benchmark_times_the_masked_kernels_and_the_training_steps_in_fast_mode():
    module = _load(ROOT / "benchmarks" / "implicit_models.py")
    results = module.main(["--fast"])
    for table in results["kernels"].values():
        assert set(table) == {0.05, 0.25, 0.5, 0.75}
        assert all(set(t) == {"dense", "coo", "csr"} and min(t.values()) > 0 for t in table.values())
    steps = results["steps"]
    assert set(steps) == {spec.label for spec in module.example.COMPARISON}
    assert steps["WT L=16"]["nfe"] == 16 and steps["DEQ (IFT)"]["nfe"] >= 1
    # Unrolling keeps every step's activations: more depth, more saved memory.
    assert steps["WT L=16"]["saved"] > steps["WT L=4"]["saved"]


def test_the_example_conv_models_mask_the_convolution_kernel_and_keep_equal_parameters():
    module = _load(ROOT / "examples" / "weight_tied_vs_deq.py")
    masked = module.Classifier(module.Spec(depth=3, density=0.5), 4, seed=0, cell="conv")
    deq = module.Classifier(module.Spec(), 4, seed=0, cell="conv")
    assert set(masked.body.mask(0)) == {"conv"} and masked.body.mask(0)["conv"].shape == (4, 4, 3, 3)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(masked) == count(deq)
    assert masked(torch.rand(5, 64)).shape == (5, 10) and deq(torch.rand(5, 64)).shape == (5, 10)
