"""Inner optimisation: quadratic `Minimize`/`Maximize`, and the total (KKT) and partial (Nash) semantics
of a linear cell with a quadratic objective, all against closed forms.

The KKT oracle: with `z = A z + B u + c` and `u = argmin ½‖z − t‖² + λ/2‖u‖²` (total), writing
`M = (I − A)⁻¹` and `K = M B`,

    u* = (KᵀK + λI)⁻¹ Kᵀ (t − M c),   z* = M (B u* + c),   μ* = Mᵀ (z* − t)

(`μ` is the adjoint of the equation, the DEQ backward variable at the optimum).
"""

from __future__ import annotations

import pytest
import torch

import implicitlayers as il

D, P, LAM, BATCH = 5, 3, 0.5, 4
TIGHT = il.Anderson(tol=1e-11, max_iter=500)


def _quadratic_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, dtype=torch.float64, generator=g)
    return a @ a.T / n + torch.eye(n, dtype=torch.float64)


# ---------------------------------------------------------------------------------- a lone objective
@pytest.mark.parametrize("kind", ["minimize", "maximize"])
def test_quadratic_objective_solution_and_gradient_are_inverse_hessian(kind):
    Q = _quadratic_spd(4, seed=0)
    step = float(1 / torch.linalg.eigvalsh(Q).max())
    b_, u_ = il.Input("b"), il.Variable("u")
    if kind == "minimize":
        cond = il.Minimize(u_, lambda u, b: 0.5 * ((u @ Q) * u).sum(1) - (b * u).sum(1), (u_, b_), step_size=step)
    else:  # the same optimum as the argmax of the concave −½uᵀQu + bᵀu
        cond = il.Maximize(u_, lambda u, b: -0.5 * ((u @ Q) * u).sum(1) + (b * u).sum(1), (u_, b_), step_size=step)
    layer = il.ImplicitLayer(il.Problem([cond]), [b_], [u_], solver=TIGHT, init={"u": torch.zeros(4)})
    b = torch.randn(3, 4, dtype=torch.float64)
    (u,) = layer(b)
    torch.testing.assert_close(u.detach(), torch.linalg.solve(Q, b.T).T, atol=1e-10, rtol=0)
    # ∂u*/∂b = Q⁻¹ for every sample.
    jac = torch.autograd.functional.jacobian(lambda b: layer(b)[0].sum(0), b[:1])[:, 0]
    torch.testing.assert_close(jac, torch.linalg.inv(Q), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------- the KKT block
@pytest.fixture(scope="module")
def kkt():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(D, D, dtype=torch.float64, generator=g)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    Bm = 0.5 * torch.randn(D, P, dtype=torch.float64, generator=g)
    M = torch.linalg.inv(torch.eye(D, dtype=torch.float64) - A)
    K = M @ Bm
    S = torch.linalg.solve(K.T @ K + LAM * torch.eye(P, dtype=torch.float64), K.T)
    c = torch.randn(BATCH, D, dtype=torch.float64, generator=g)
    t = torch.randn(BATCH, D, dtype=torch.float64, generator=g)
    return dict(A=A, B=Bm, M=M, S=S, c=c, t=t)


def _cell(A, Bm):
    return lambda z, u, c: z @ A.T + u @ Bm.T + c


def _objective(z, u, t):
    return 0.5 * ((z - t) ** 2).sum(1) + 0.5 * LAM * (u**2).sum(1)


def _kkt_layer(A, Bm, objective=_objective, *, total=True, backward=None, solver=TIGHT):
    c_, t_, z_, u_ = il.Input("c"), il.Input("t"), il.Variable("z"), il.Variable("u")
    problem = il.Problem(
        [il.FixedPoint(z_, _cell(A, Bm), (z_, u_, c_)), il.Minimize(u_, objective, (z_, u_, t_), step_size=0.5, total=total)]
    )
    return il.ImplicitLayer(
        problem, [c_, t_], [u_, z_], solver=solver, backward=backward, init={"z": torch.zeros(D), "u": torch.zeros(P)}
    )


def _kkt_closed_form(k, c, t):
    u = (t - c @ k["M"].T) @ k["S"].T
    z = (u @ k["B"].T + c) @ k["M"].T
    return u, z


def test_kkt_block_is_one_block_with_an_adjoint(kkt):
    layer = _kkt_layer(kkt["A"], kkt["B"])
    assert layer.problem.blocks == [["z", "u"]]
    solution = layer.solve(kkt["c"], kkt["t"])
    assert list(solution.duals) == ["mu[u|z]"]
    assert solution.info["block 0 (z, u)"].all_converged


def test_kkt_block_solution_and_dual_match_closed_form(kkt):
    solution = _kkt_layer(kkt["A"], kkt["B"]).solve(kkt["c"], kkt["t"])
    u, z = _kkt_closed_form(kkt, kkt["c"], kkt["t"])
    torch.testing.assert_close(solution["u"].detach(), u, atol=1e-9, rtol=0)
    torch.testing.assert_close(solution["z"].detach(), z, atol=1e-9, rtol=0)
    torch.testing.assert_close(solution.duals["mu[u|z]"], (z - kkt["t"]) @ kkt["M"], atol=1e-9, rtol=0)


def test_kkt_block_exact_ift_gradients_match_closed_form(kkt):
    layer = _kkt_layer(kkt["A"], kkt["B"])
    c, t = kkt["c"].clone().requires_grad_(), kkt["t"].clone().requires_grad_()
    gen = torch.Generator().manual_seed(2)
    gu = torch.randn(BATCH, P, dtype=torch.float64, generator=gen)
    gz = torch.randn(BATCH, D, dtype=torch.float64, generator=gen)
    u, z = layer(c, t)
    got = torch.autograd.grad((u * gu).sum() + (z * gz).sum(), (c, t))
    u_ref, z_ref = _kkt_closed_form(kkt, c, t)
    want = torch.autograd.grad((u_ref * gu).sum() + (z_ref * gz).sum(), (c, t))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_kkt_block_gradcheck(kkt):
    layer = _kkt_layer(kkt["A"], kkt["B"])
    c = kkt["c"][:2].clone().requires_grad_()
    t = kkt["t"][:2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, t: layer(c, t), (c, t), atol=1e-6, fast_mode=True)


def test_kkt_first_order_ift_gives_zero_gradient_through_u_and_the_deq_gradient_for_z(kkt):
    layer = _kkt_layer(kkt["A"], kkt["B"], backward=il.IFT(first_order=True))
    c, t = kkt["c"].clone().requires_grad_(), kkt["t"].clone().requires_grad_()
    u, z = layer(c, t)
    u_ref, z_ref = _kkt_closed_form(kkt, kkt["c"], kkt["t"])
    torch.testing.assert_close(u.detach(), u_ref, atol=1e-9, rtol=0)  # the forward is the exact optimum
    grads_u = torch.autograd.grad(u.sum(), (c, t), allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads_u)
    # With u held fixed, z = M (B u + c): ∂⟨g, z⟩/∂c = Mᵀ g and z does not read t.
    g = torch.randn(BATCH, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gc, gt = torch.autograd.grad((z * g).sum(), (c, t), allow_unused=True)
    torch.testing.assert_close(gc, g @ kkt["M"], atol=1e-9, rtol=0)
    assert gt is None or not gt.any()


# ---------------------------------------------------------------------------------- partial semantics
def test_partial_semantics_solve_the_stacked_nash_system(kkt):
    # L(z, u, t) = ½‖z − t‖² + λ/2‖u‖² + uᵀ C z: with z held fixed the stationarity is λu + Cz = 0,
    # jointly with (I − A) z − B u = c — one linear system in (z, u) per sample.
    C = 0.3 * torch.randn(P, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def objective(z, u, t):
        return _objective(z, u, t) + (u * (z @ C.T)).sum(1)

    layer = _kkt_layer(kkt["A"], kkt["B"], objective, total=False)
    solution = layer.solve(kkt["c"], kkt["t"])
    assert solution.duals == {}  # the partial semantics add no adjoint
    eye = torch.eye
    big = torch.cat(
        [torch.cat([eye(D, dtype=torch.float64) - kkt["A"], -kkt["B"]], 1), torch.cat([C, LAM * eye(P, dtype=torch.float64)], 1)], 0
    )

    def nash(c):
        w = torch.linalg.solve(big, torch.cat([c, c.new_zeros(c.shape[0], P)], 1).T).T
        return w[:, :D], w[:, D:]

    z_ref, u_ref = nash(kkt["c"])
    torch.testing.assert_close(solution["z"].detach(), z_ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(solution["u"].detach(), u_ref, atol=1e-8, rtol=0)
    c = kkt["c"].clone().requires_grad_()
    u, z = layer(c, kkt["t"])
    g = torch.randn(BATCH, D + P, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((torch.cat([z, u], 1) * g).sum(), c)[0]
    want = torch.autograd.grad((torch.cat(nash(c), 1) * g).sum(), c)[0]
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


def test_partial_and_total_semantics_differ(kkt):
    # The brief's objective, partially: u only sees λ/2‖u‖², so u = 0 and z = M c — not the total optimum.
    solution = _kkt_layer(kkt["A"], kkt["B"], total=False).solve(kkt["c"], kkt["t"])
    torch.testing.assert_close(solution["u"], torch.zeros(BATCH, P, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(solution["z"], kkt["c"] @ kkt["M"].T, atol=1e-9, rtol=0)
    u_total, _ = _kkt_closed_form(kkt, kkt["c"], kkt["t"])
    assert (u_total.abs() > 1e-3).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size": 0.0}, "step_size must be positive"),
        ({"adjoint_damping": 2.0}, "adjoint_damping must be positive and at most 1"),
        ({"constraint": "box"}, "constraint must be an il.sets set"),
    ],
)
def test_minimize_rejects_bad_options(kwargs, match):
    u = il.Variable("u")
    with pytest.raises((ValueError, TypeError), match=match):
        il.Minimize(u, lambda u: (u**2).sum(1), (u,), **kwargs)


def test_kkt_gradient_penalty_through_second_order_ift_matches_closed_form(kkt):
    # ‖∂⟨g, u*⟩/∂t‖² = ‖Sᵀ g‖² depends on the cell matrix A through S = (KᵀK + λI)⁻¹Kᵀ: its gradient
    # in A needs the exact second-order IFT of the KKT block (third derivatives of cell and objective).
    A = kkt["A"].clone().requires_grad_()
    Bm, c = kkt["B"], kkt["c"]
    g = torch.randn(BATCH, P, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def closed_form_u(t):
        M = torch.linalg.inv(torch.eye(D, dtype=torch.float64) - A)
        K = M @ Bm
        S = torch.linalg.solve(K.T @ K + LAM * torch.eye(P, dtype=torch.float64), K.T)
        return (t - c @ M.T) @ S.T

    def penalty_grad(u_of_t):
        t = kkt["t"].clone().requires_grad_()
        (gt,) = torch.autograd.grad((u_of_t(t) * g).sum(), t, create_graph=True)
        return torch.autograd.grad((gt**2).sum(), A)[0]

    layer = _kkt_layer(A, Bm, backward=il.IFT(second_order=True))
    got = penalty_grad(lambda t: layer(c, t)[0])
    torch.testing.assert_close(got, penalty_grad(closed_form_u), atol=1e-9, rtol=0)


def test_box_constrained_kkt_block_matches_the_active_set_solution(kkt):
    # Total objective over a box: u* = argmin_{u ∈ box} ½uᵀHu − fᵀu with H = KᵀK + λI, f = Kᵀ(t − Mc).
    # On the free coordinates F the IFT gives H_FF u_F = f_F − H_FA u_A, with the active u_A constant.
    A, Bm, M = kkt["A"], kkt["B"], kkt["M"]
    K = M @ Bm
    H = K.T @ K + LAM * torch.eye(P, dtype=torch.float64)
    box = il.sets.Box(-0.3, 0.3)
    c_, t_, z_, u_ = il.Input("c"), il.Input("t"), il.Variable("z"), il.Variable("u")
    problem = il.Problem(
        [il.FixedPoint(z_, _cell(A, Bm), (z_, u_, c_)), il.Minimize(u_, _objective, (z_, u_, t_), constraint=box, step_size=0.5)]
    )
    layer = il.ImplicitLayer(problem, [c_, t_], [u_, z_], solver=TIGHT, init={"z": torch.zeros(D), "u": torch.zeros(P)})
    c, t = kkt["c"].clone().requires_grad_(), (2 * kkt["t"]).requires_grad_()
    u, z = layer(c, t)

    # Reference optimum by dense projected gradient (independent of the library's solver and system).
    f = ((t - c @ M.T) @ K).detach()
    ref = torch.zeros(BATCH, P, dtype=torch.float64)
    step = 1 / float(torch.linalg.eigvalsh(H).max())
    for _ in range(5000):
        ref = box.project(ref - step * (ref @ H - f))
    torch.testing.assert_close(u.detach(), ref, atol=1e-9, rtol=0)
    active = (ref.abs() - 0.3).abs() < 1e-9
    assert active.any() and (~active).any()  # the test exercises both kinds of coordinate

    g = torch.randn(BATCH, P, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad((u * g).sum(), (c, t))
    f = (t - c @ M.T) @ K
    rows = []
    for i in range(BATCH):
        free, act = ~active[i], active[i]
        u_i = ref[i].clone()
        rhs = f[i, free] - H[free][:, act] @ ref[i, act]
        rows.append(u_i.masked_scatter(free, torch.linalg.solve(H[free][:, free], rhs)))
    want = torch.autograd.grad((torch.stack(rows) * g).sum(), (c, t))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_kkt_block_with_a_chain_of_two_equations_gets_one_adjoint_each():
    # z1 = A z1 + B u + c, z2 = ½ z2 + C z1, u = argmin ½‖z2 − t‖² + λ/2‖u‖² (total): z2 = K u + N c with
    # K = M2 C M1 B, N = M2 C M1, so u* = (KᵀK + λI)⁻¹ Kᵀ (t − N c).
    gen = torch.Generator().manual_seed(8)
    d1, d2 = 4, 3
    A = torch.randn(d1, d1, dtype=torch.float64, generator=gen)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    Bm = 0.5 * torch.randn(d1, P, dtype=torch.float64, generator=gen)
    C = 0.5 * torch.randn(d2, d1, dtype=torch.float64, generator=gen)
    N = 2 * C @ torch.linalg.inv(torch.eye(d1, dtype=torch.float64) - A)
    K = N @ Bm
    S = torch.linalg.solve(K.T @ K + LAM * torch.eye(P, dtype=torch.float64), K.T)
    c_, t_, z1_, z2_, u_ = il.Input("c"), il.Input("t"), il.Variable("z1"), il.Variable("z2"), il.Variable("u")
    problem = il.Problem(
        [
            il.FixedPoint(z1_, lambda z1, u, c: z1 @ A.T + u @ Bm.T + c, (z1_, u_, c_)),
            il.FixedPoint(z2_, lambda z2, z1: 0.5 * z2 + z1 @ C.T, (z2_, z1_)),
            il.Minimize(u_, lambda z2, u, t: 0.5 * ((z2 - t) ** 2).sum(1) + 0.5 * LAM * (u**2).sum(1), (z2_, u_, t_), step_size=0.5),
        ]
    )
    init = {"z1": torch.zeros(d1), "z2": torch.zeros(d2), "u": torch.zeros(P)}
    layer = il.ImplicitLayer(problem, [c_, t_], [u_], solver=il.Anderson(tol=1e-11, max_iter=1000), init=init)
    c = torch.randn(3, d1, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, d2, dtype=torch.float64, generator=gen, requires_grad=True)
    solution = layer.solve(c, t)
    assert problem.blocks == [["z1", "z2", "u"]]
    assert sorted(solution.duals) == ["mu[u|z1]", "mu[u|z2]"]
    u_ref = (t - c @ N.T) @ S.T
    torch.testing.assert_close(solution["u"].detach(), u_ref.detach(), atol=1e-9, rtol=0)
    g = torch.randn(3, P, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((solution["u"] * g).sum(), (c, t))
    want = torch.autograd.grad((u_ref * g).sum(), (c, t))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_kkt_block_with_a_root_equation_matches_the_closed_form_with_anderson_and_broyden():
    # The same linear-cell problem declared as Root(g = z − Az − Bu − c): the adjoint uses (∂g/∂z)ᵀμ.
    torch.manual_seed(0)
    dt, d, k, lam = torch.float64, 5, 3, 0.5
    A = torch.randn(d, d, dtype=dt)
    A = 0.4 * A / torch.linalg.matrix_norm(A, 2)
    B, c = 0.5 * torch.randn(d, k, dtype=dt), torch.randn(d, dtype=dt)
    t_, z_, u_ = il.Input("t"), il.Variable("z"), il.Variable("u")
    problem = il.Problem([
        il.Root(z_, lambda z, u: z - (z @ A.T + u @ B.T + c), (z_, u_)),
        il.Minimize(u_, lambda z, u, t: 0.5 * ((z - t) ** 2).sum(1) + 0.5 * lam * (u**2).sum(1), (z_, u_, t_), step_size=0.3),
    ])
    M = torch.linalg.inv(torch.eye(d, dtype=dt) - A)
    K = M @ B
    t = torch.randn(4, d, dtype=dt, requires_grad=True)
    u_exact = torch.linalg.solve(K.T @ K + lam * torch.eye(k, dtype=dt), K.T @ (t - M @ c).T).T
    (g_exact,) = torch.autograd.grad(u_exact.sum(), t)
    for solver in (il.Anderson(tol=1e-11, max_iter=500), il.Broyden(tol=1e-11, max_iter=300, memory=60)):
        layer = il.ImplicitLayer(problem, [t_], [u_], solver=solver, init={"z": torch.zeros(d, dtype=dt), "u": torch.zeros(k, dtype=dt)})
        (u,) = layer(t)
        torch.testing.assert_close(u, u_exact, atol=1e-9, rtol=0)
        (g,) = torch.autograd.grad(u.sum(), t)
        torch.testing.assert_close(g, g_exact, atol=1e-9, rtol=0)
