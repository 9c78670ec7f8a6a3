"""Constraint sets: per-sample projections (Hypothesis) and constrained problems against them.

For `u* = argmin_{u ∈ C} ½ Σ_i q_i (u_i − b_i)²` with `C` a box, the solution is the clip of `b`;
for `q ≡ 1` and any set, it is the projection `Π_C(b)`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il

SETS = [il.sets.Box(-0.5, 0.3), il.sets.L2Ball(1.0), il.sets.LInfBall(0.4), il.sets.L2Ball(0.5, center=0.2)]
IDS = ["box", "l2", "linf", "l2-centred"]


def _reference_projection(s, v: torch.Tensor) -> torch.Tensor:
    """One sample at a time, written from the definitions."""
    out = []
    for row in v:
        if isinstance(s, il.sets.Box):
            out.append(torch.minimum(torch.maximum(row, torch.tensor(s.lower, dtype=row.dtype)), torch.tensor(s.upper, dtype=row.dtype)))
        else:
            c = 0.0 if s.center is None else s.center
            d = row - c
            if isinstance(s, il.sets.L2Ball):
                n = float(torch.linalg.vector_norm(d))
                out.append(c + (d if n <= s.radius else d * (s.radius / n)))
            else:
                out.append(c + d.clamp(-s.radius, s.radius))
    return torch.stack(out)


batches = st.integers(1, 5).flatmap(
    lambda b: st.tuples(st.just(b), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1), st.floats(0.1, 5.0))
)


@pytest.mark.parametrize("s", SETS, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(spec=batches)
def test_projection_is_per_sample_idempotent_and_feasible(s, spec):
    batch, d1, d2, seed, scale = spec
    v = scale * torch.randn(batch, d1, d2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p = s.project(v)
    assert p.shape == v.shape
    torch.testing.assert_close(p.reshape(batch, -1), _reference_projection(s, v.reshape(batch, -1)), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.project(p), p, atol=1e-12, rtol=0)
    assert bool(s.contains(p).all())
    # A sample's projection does not depend on the other samples of the batch.
    for i in range(batch):
        torch.testing.assert_close(s.project(v[i : i + 1]), p[i : i + 1], atol=1e-14, rtol=0)


def test_l2_ball_projects_by_the_norm_over_all_trailing_dimensions():
    v = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[0.1, 0.0], [0.0, 0.1]]], dtype=torch.float64)
    p = il.sets.L2Ball(1.0).project(v)
    torch.testing.assert_close(p[0], v[0] / 5.0)
    torch.testing.assert_close(p[1], v[1])  # inside: unchanged


def test_contains_is_per_sample():
    s = il.sets.LInfBall(1.0)
    v = torch.tensor([[0.5, -0.9], [1.5, 0.0]], dtype=torch.float64)
    assert s.contains(v).tolist() == [True, False]


def test_box_accepts_tensor_bounds():
    lower = torch.tensor([0.0, -1.0], dtype=torch.float64)
    s = il.sets.Box(lower, 2.0)
    v = torch.tensor([[-1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(s.project(v), torch.tensor([[0.0, -1.0], [2.0, 0.5]], dtype=torch.float64))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: il.sets.Box(1.0, 0.0), "lower .* must not exceed upper"),
        (lambda: il.sets.L2Ball(-1.0), "radius must be a non-negative number"),
        (lambda: il.sets.LInfBall("1"), "radius must be a non-negative number"),
    ],
)
def test_invalid_sets_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------- constrained problems
def _projection_layer(s, step_size: float, q: torch.Tensor | None = None):
    b_, u_ = il.Input("b"), il.Variable("u")
    weights = torch.ones(4, dtype=torch.float64) if q is None else q

    def objective(u, b):
        return 0.5 * (weights * (u - b) ** 2).sum(1)

    problem = il.Problem([il.Minimize(u_, objective, (u_, b_), constraint=s, step_size=step_size)])
    return il.ImplicitLayer(problem, [b_], [u_], solver=il.Anderson(tol=1e-12, max_iter=300), init={"u": torch.zeros(4)})


@pytest.mark.parametrize("s", SETS, ids=IDS)
def test_constrained_minimize_is_the_projection_and_feasible(s):
    layer = _projection_layer(s, step_size=0.5)  # 0.5 < 1: a genuine iteration, not a one-step projection
    b = 2 * torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b.requires_grad_()
    (u,) = layer(b)
    torch.testing.assert_close(u.detach(), s.project(b.detach()), atol=1e-10, rtol=0)
    assert bool(s.contains(u.detach(), atol=1e-12).all())
    # The IFT through the natural residual gives the derivative of the projection (where it exists).
    g = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((u * g).sum(), b)[0]
    want = torch.autograd.grad((s.project(b) * g).sum(), b)[0]
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_box_constrained_weighted_quadratic_clips_the_unconstrained_optimum():
    q = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    box = il.sets.Box(-0.5, 0.3)
    layer = _projection_layer(box, step_size=0.2, q=q)
    b = 2 * torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (u,) = layer(b)
    torch.testing.assert_close(u.detach(), b.clamp(-0.5, 0.3), atol=1e-10, rtol=0)
    # Anderson returns an affine (extrapolated) mix of projected points: feasible up to rounding only.
    assert bool(box.contains(u.detach(), atol=1e-14).all())


def test_projected_gradient_iteration_is_exactly_feasible():
    # Every Picard iterate of the constrained map is a projection, so the constraint holds exactly.
    q = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    box = il.sets.Box(-0.5, 0.3)
    b_, u_ = il.Input("b"), il.Variable("u")
    problem = il.Problem([il.Minimize(u_, lambda u, b: 0.5 * (q * (u - b) ** 2).sum(1), (u_, b_), constraint=box, step_size=0.2)])
    layer = il.ImplicitLayer(problem, [b_], [u_], solver=il.FixedPointIteration(tol=1e-12, max_iter=3000), init={"u": torch.zeros(4)})
    b = 2 * torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (u,) = layer(b)
    torch.testing.assert_close(u.detach(), b.clamp(-0.5, 0.3), atol=1e-10, rtol=0)
    assert bool(((u >= -0.5) & (u <= 0.3)).all())


def test_maximize_over_a_ball_of_a_concave_quadratic():
    # argmax −½‖u − b‖² over ‖u‖ ≤ r is the projection of b.
    b_, u_ = il.Input("b"), il.Variable("u")
    ball = il.sets.L2Ball(0.7)
    problem = il.Problem([il.Maximize(u_, lambda u, b: -0.5 * ((u - b) ** 2).sum(1), (u_, b_), constraint=ball, step_size=0.5)])
    layer = il.ImplicitLayer(problem, [b_], [u_], solver=il.Anderson(tol=1e-12, max_iter=300), init={"u": torch.zeros(3)})
    b = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (u,) = layer(b)
    torch.testing.assert_close(u, ball.project(b), atol=1e-10, rtol=0)
