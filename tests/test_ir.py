"""Tracing: inlining, regions, roles, op semantics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshplan as mp
from meshplan import ir


def test_nested_jit_and_custom_jvp_are_inlined_and_roles_tagged():
    @jax.jit
    def inner(x, w):
        return jax.nn.relu(x @ w)  # relu is a custom_jvp

    def f(params, batch):
        return jnp.sum(inner(batch["x"], params["w"]))

    g = ir.trace(f, {"w": jnp.ones((4, 8))}, {"x": jnp.ones((2, 4))})
    prims = [n.primitive for n in g.nodes]
    assert "jit" not in prims and "custom_jvp_call" not in prims
    assert prims[0] == "dot_general"
    roles = {i.path: i.role for i in g.input_info}
    assert roles == {"[0]['w']": "param", "[1]['x']": "data"}


def test_scan_is_a_region_with_trip_count_and_flops_counted_per_iteration():
    def f(ws, x):
        y, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)
        return y

    g = ir.trace(f, jnp.ones((5, 8, 8)), jnp.ones((4, 8)))
    scan = [n for n in g.nodes if n.primitive == "scan"][0]
    assert scan.trip_count == 5
    assert g.flops == pytest.approx(5 * (2 * 4 * 8 * 8) + 5 * 0)  # tanh is transcendental


def test_dot_general_dim_map_is_einsum_like():
    g = ir.trace(lambda a, b: jnp.einsum("bik,bkj->bij", a, b),
                 jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)))
    d = g.nodes[0].dims
    assert d.loop_sizes == (2, 3, 5, 4)  # batch, lhs free, rhs free, contracting
    assert d.reduced_loops == frozenset({3}) and d.reduction == "sum"
    assert g.nodes[0].flops == 2 * 2 * 3 * 4 * 5


def test_reshape_split_maps_to_major_part():
    g = ir.trace(lambda x: x.reshape(8, 4, 16), jnp.ones((8, 64)))
    d = g.nodes[0].dims
    assert d.operands[0] == ((0,), (1, 2))  # 64 -> (4, 16): a split of 64 lands on the 4


def test_unknown_primitive_is_reported_and_planning_replicates_it():
    def f(params, x):
        a = x.T @ x + 8.0 * jnp.eye(8)
        return jnp.sum(jnp.linalg.cholesky(a) @ params)

    args = (jnp.ones((8, 8)), jnp.ones((16, 8)))
    g = ir.trace(f, *args)
    assert "cholesky" in g.unknown_primitives
    step = mp.auto_parallel(f, time_limit=2)
    plan = step.plan(*args, compare_baselines=False)
    assert "cholesky" in plan.summary()
    np.testing.assert_allclose(step(*args), jax.jit(f)(*args), rtol=1e-5)


def test_bad_roles_are_refused_with_the_remedy():
    with pytest.raises(ValueError, match="one role per positional argument"):
        ir.trace(lambda x: x, jnp.ones(3), roles=("param", "data"))


def test_batched_gather_and_its_scatter_walk_the_batch_dims():
    """take_along_axis (a cross-entropy's label pick) and its gradient: batch dims of the
    operand, indices and output are one loop each, so the planner may split them."""
    def loss(logits, labels):
        picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)
        return -jnp.sum(picked)

    logits, labels = jnp.ones((4, 6, 10)), jnp.zeros((4, 6), jnp.int32)
    g = ir.trace(jax.grad(loss), logits, labels)
    assert g.unknown_primitives == ()
    scatter = [n for n in g.nodes if n.primitive == "scatter-add"][0]
    d = scatter.dims
    # operand [4, 6, 10]: batch dims 0, 1 are loops 0, 1 and are not summed; only the
    # vocab dim is inserted (kept whole).
    assert d.operands[0] == ((0,), (1,), ())
    assert d.operands[2][:2] == ((0,), (1,))  # updates walk the same loops
    assert not {0, 1} & d.reduced_loops
    gather = ir.trace(loss, logits, labels).nodes
    gd = [n for n in gather if n.primitive == "gather"][0].dims
    assert gd.operands[0][:2] == ((0,), (1,)) and gd.operands[0][2] == ()


def test_semantics_ids_are_equal_exactly_for_equal_primitive_params_and_types():
    # Two identical layers, then one of another width: the planner reuses one signature
    # per semantics id, so an id shared by different ops would merge unlike layers.
    def step(w1, w2, w3, x):
        h = jnp.tanh(x @ w1)
        h = jnp.tanh(h @ w2)
        return jnp.sum(jnp.tanh(h @ w3))

    g = ir.trace(step, jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.ones((8, 4)),
                 jnp.ones((2, 8)), roles=("param", "param", "param", "data"))
    by_id: dict[int, set] = {}
    for n in g.nodes:
        assert n.semantics >= 0  # every op here has hashable parameters
        types = tuple((g.values[v].shape, g.values[v].dtype, g.values[v].is_const)
                      for v in n.inputs + n.outputs)
        by_id.setdefault(n.semantics, set()).add(
            (n.primitive, tuple(sorted(map(repr, n.eqn.params.items()))), types))
    assert all(len(kinds) == 1 for kinds in by_id.values())
    dots = [n for n in g.nodes if n.primitive == "dot_general"]
    assert dots[0].semantics == dots[1].semantics != dots[2].semantics
    tanhs = [n for n in g.nodes if n.primitive == "tanh"]
    assert tanhs[0].semantics == tanhs[1].semantics != tanhs[2].semantics
