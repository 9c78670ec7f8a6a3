"""Declaring problems: validation at declaration, the graph, its blocks, and multi-block solves.

Multi-block problems use linear cells, so the oracle is dense linear algebra block by block:
`z_i = (I − A_i)⁻¹ (B_i x + Σ_j C_ij z_j)` over earlier blocks `j`.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitlayers as il

TIGHT = il.Anderson(tol=1e-12, max_iter=300)


def _contractive(d: int, norm: float, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, dtype=torch.float64, generator=gen)
    return norm * a / torch.linalg.matrix_norm(a, 2)


def _identity(z, x):
    return z


# ---------------------------------------------------------------------------------- validation
def test_a_variable_with_two_conditions_is_rejected():
    x, z = il.Input("x"), il.Variable("z")
    with pytest.raises(ValueError, match=r"variable 'z' has two conditions .*exactly one"):
        il.Problem([il.FixedPoint(z, _identity, (z, x)), il.Root(z, _identity, (z, x))])


def test_a_variable_read_without_a_condition_is_rejected():
    z, w = il.Variable("z"), il.Variable("w")
    with pytest.raises(ValueError, match=r"\['w'\] are read but have no defining condition.*il.Input"):
        il.Problem([il.FixedPoint(z, lambda z, w: z + w, (z, w))])


@pytest.mark.parametrize("other", [il.Input("z"), il.Variable("z")], ids=["input", "variable"])
def test_two_nodes_with_one_name_are_rejected(other):
    z, x, y = il.Variable("z"), il.Input("x"), il.Variable("y")
    with pytest.raises(ValueError, match=r"two different nodes are named 'z'.*unique"):
        il.Problem([il.FixedPoint(z, _identity, (z, x)), il.FixedPoint(y, lambda y, o: y, (y, other))])


def test_duplicate_names_across_conditions_are_rejected():
    x = il.Input("x")
    z1, z2 = il.Variable("z"), il.Variable("z")
    with pytest.raises(ValueError, match=r"two different nodes are named 'z'"):
        il.Problem([il.FixedPoint(z1, _identity, (z1, x)), il.FixedPoint(z2, _identity, (z2, x))])


def test_arity_mismatch_names_the_condition_and_the_nodes():
    z = il.Variable("z")
    with pytest.raises(TypeError, match=r"FixedPoint\(z\): fn takes \(z, x\) but args lists 1 nodes \(z\)"):
        il.FixedPoint(z, lambda z, x: z, (z,))


def test_varargs_functions_pass_the_arity_check():
    x, z = il.Input("x"), il.Variable("z")
    il.FixedPoint(z, lambda *a: a[0], (z, x))


def test_non_node_arguments_are_rejected():
    z = il.Variable("z")
    with pytest.raises(TypeError, match=r"FixedPoint\(z\): every argument must be an il.Input or il.Variable"):
        il.FixedPoint(z, lambda z, x: z, (z, torch.zeros(3)))


def test_the_defined_node_must_be_a_variable():
    x = il.Input("x")
    with pytest.raises(TypeError, match="the first argument must be an il.Variable"):
        il.FixedPoint(x, lambda x: x, (x,))


def test_the_function_must_be_callable():
    z = il.Variable("z")
    with pytest.raises(TypeError, match=r"FixedPoint\(z\): fn must be callable"):
        il.FixedPoint(z, 3.0, (z,))


@pytest.mark.parametrize("name", ["", "1z", "a b", 3])
def test_node_names_must_be_identifiers(name):
    with pytest.raises(ValueError, match="must be a Python identifier"):
        il.Variable(name)


def test_empty_problem_and_non_conditions_are_rejected():
    with pytest.raises(ValueError, match="at least one condition"):
        il.Problem([])
    with pytest.raises(TypeError, match="every entry must be a condition"):
        il.Problem([il.Variable("z")])


@pytest.mark.parametrize("damping", [0.0, 1.5])
def test_fixed_point_damping_must_lie_in_unit_interval(damping):
    z = il.Variable("z")
    with pytest.raises(ValueError, match=r"FixedPoint\(z\): damping must be positive and at most 1"):
        il.FixedPoint(z, lambda z: z, (z,), damping=damping)


def test_block_of_unknown_variable_lists_the_variables():
    x, z = il.Input("x"), il.Variable("z")
    problem = il.Problem([il.FixedPoint(z, _identity, (z, x))])
    assert problem.block_of("z") == 0
    with pytest.raises(KeyError, match=r"no variable named 'q'; variables are \['z'\]"):
        problem.block_of("q")


# ---------------------------------------------------------------------------------- graph and blocks
def test_graph_has_an_edge_from_each_argument_and_cycles_form_one_block():
    x, a, b, c = il.Input("x"), il.Variable("a"), il.Variable("b"), il.Variable("c")
    problem = il.Problem(
        [
            il.FixedPoint(c, lambda c, b: c + b, (c, b)),
            il.FixedPoint(b, lambda a, x: a + x, (a, x)),
            il.FixedPoint(a, lambda b: b, (b,)),
        ]
    )
    assert set(problem.graph.edges) == {("c", "c"), ("b", "c"), ("a", "b"), ("x", "b"), ("b", "a")}
    assert [sorted(block) for block in problem.blocks] == [["a", "b"], ["c"]]
    assert set(problem.inputs) == {"x"} and set(problem.variables) == {"a", "b", "c"}


def test_two_block_dag_is_ordered_and_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    d1, d2, n = 4, 3, 2
    A1, A2 = _contractive(d1, 0.5, gen), _contractive(d2, 0.5, gen)
    B1 = torch.randn(d1, n, dtype=torch.float64, generator=gen)
    C = torch.randn(d2, d1, dtype=torch.float64, generator=gen)
    x_, z1, z2 = il.Input("x"), il.Variable("z1"), il.Variable("z2")
    # Declared downstream-first: the block order must come from the graph, not the list.
    problem = il.Problem(
        [
            il.FixedPoint(z2, lambda z2, z1: z2 @ A2.T + z1 @ C.T, (z2, z1)),
            il.FixedPoint(z1, lambda z1, x: z1 @ A1.T + x @ B1.T, (z1, x_)),
        ]
    )
    assert problem.blocks == [["z1"], ["z2"]]
    layer = il.ImplicitLayer(problem, [x_], [z2, z1], solver=TIGHT, init={"z1": torch.zeros(d1), "z2": torch.zeros(d2)})
    x = torch.randn(3, n, dtype=torch.float64, generator=gen, requires_grad=True)
    solution = layer.solve(x)
    assert list(solution.info) == ["block 0 (z1)", "block 1 (z2)"]
    M1 = torch.linalg.inv(torch.eye(d1, dtype=torch.float64) - A1)
    M2 = torch.linalg.inv(torch.eye(d2, dtype=torch.float64) - A2)
    z1_ref = x @ (M1 @ B1).T
    z2_ref = z1_ref @ (M2 @ C).T
    torch.testing.assert_close(solution["z1"], z1_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(solution["z2"], z2_ref, atol=1e-10, rtol=0)
    out2, out1 = layer(x)
    g2 = torch.randn(3, d2, dtype=torch.float64, generator=gen)
    g1 = torch.randn(3, d1, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((out2 * g2).sum() + (out1 * g1).sum(), x)[0]
    want = g2 @ (M2 @ C @ M1 @ B1) + g1 @ (M1 @ B1)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------- random DAGs
@st.composite
def linear_dags(draw):
    """1–3 blocks of 1 or 2 variables. Each variable reads every variable of its block (so a 2-variable
    block is a cycle), the input, and a random subset of the variables of earlier blocks."""
    n_blocks = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 2)) for _ in range(n_blocks)]
    names = [[f"z{b}_{j}" for j in range(k)] for b, k in enumerate(sizes)]
    dims = {n: draw(st.integers(1, 3)) for block in names for n in block}
    earlier = lambda b: [n for block in names[:b] for n in block]  # noqa: E731
    reads = {n: sorted(draw(st.sets(st.sampled_from(earlier(b))))) if b else [] for b, block in enumerate(names) for n in block}
    order = draw(st.permutations([n for block in names for n in block]))  # declaration order, unrelated to the topology
    return names, dims, reads, list(order), draw(st.integers(1, 4)), draw(st.integers(0, 2**31 - 1))


def _make_cell(own: list[torch.Tensor], Bx: torch.Tensor, Cs: list[torch.Tensor]):
    """`(block variables..., x, earlier variables...) ↦ Σ A_l z_l + B x + Σ C_e z_e` (arity fixed per call)."""
    k = len(own)

    def cell(*args):
        out = args[k] @ Bx.T
        for A, z in zip(own, args[:k]):
            out = out + z @ A.T
        for C, e in zip(Cs, args[k + 1 :]):
            out = out + e @ C.T
        return out

    return cell


@settings(max_examples=10, deadline=None)
@given(spec=linear_dags())
def test_random_linear_dags_match_dense_solution_and_blocks_are_topological(spec):
    names, dims, reads, order, batch, seed = spec
    gen = torch.Generator().manual_seed(seed)
    n_in = 2
    x_ = il.Input("x")
    nodes = {n: il.Variable(n) for block in names for n in block}
    conditions, blocks = {}, []
    for block in names:
        size = sum(dims[n] for n in block)
        T = _contractive(size, 0.6, gen)  # the block's joint linear map: a contraction
        offsets = [sum(dims[m] for m in block[:j]) for j in range(len(block) + 1)]
        rows = {}
        for j, n in enumerate(block):
            own = [T[offsets[j] : offsets[j + 1], offsets[k] : offsets[k + 1]] for k in range(len(block))]
            Bx = torch.randn(dims[n], n_in, dtype=torch.float64, generator=gen)
            Cs = [0.5 * torch.randn(dims[n], dims[e], dtype=torch.float64, generator=gen) for e in reads[n]]
            rows[n] = (Bx, Cs)
            args = (*(nodes[m] for m in block), x_, *(nodes[e] for e in reads[n]))
            conditions[n] = il.FixedPoint(nodes[n], _make_cell(own, Bx, Cs), args)
        blocks.append((block, T, offsets, rows))
    problem = il.Problem([conditions[n] for n in order])

    # Blocks are the condensation's nodes (the strongly connected components), in a topological order.
    variable_graph = problem.graph.subgraph(problem.variables)
    assert sorted(map(sorted, problem.blocks)) == sorted(sorted(b) for b in names)
    assert sorted(map(sorted, problem.blocks)) == sorted(sorted(c) for c in nx.strongly_connected_components(variable_graph))
    position = {name: k for k, block in enumerate(problem.blocks) for name in block}
    assert all(position[u] <= position[v] for u, v in variable_graph.edges)

    outputs = [nodes[n] for block in names for n in block]
    layer = il.ImplicitLayer(problem, [x_], outputs, solver=TIGHT, init={n: torch.zeros(d) for n, d in dims.items()})
    x = torch.randn(batch, n_in, dtype=torch.float64, generator=gen, requires_grad=True)
    got = dict(zip((o.name for o in outputs), layer(x)))

    dense: dict[str, torch.Tensor] = {}  # block by block: (I − T) w = [B_j x + Σ C_je z_e]_j
    for block, T, offsets, rows in blocks:
        rhs = torch.cat([x @ Bx.T + sum((dense[e] @ C.T for C, e in zip(Cs, reads[n])), torch.zeros(batch, dims[n], dtype=torch.float64))
                         for n, (Bx, Cs) in rows.items()], 1)
        w = torch.linalg.solve(torch.eye(T.shape[0], dtype=torch.float64) - T, rhs.T).T
        dense.update({n: w[:, offsets[j] : offsets[j + 1]] for j, n in enumerate(block)})
    for n in dense:
        torch.testing.assert_close(got[n].detach(), dense[n].detach(), atol=1e-9, rtol=0)
    g = {n: torch.randn_like(w) for n, w in dense.items()}
    grad = torch.autograd.grad(sum((got[n] * g[n]).sum() for n in g), x)[0]
    want = torch.autograd.grad(sum((dense[n] * g[n]).sum() for n in g), x)[0]
    torch.testing.assert_close(grad, want, atol=1e-8, rtol=0)
