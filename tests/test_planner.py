"""Planner: ILP against brute force, and the layouts a person would recognise."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshplan as mp
from meshplan import ir
from meshplan.costmodel import Efficiency
from meshplan.examples import abstract, make
from meshplan.planner import brute_force, solve
from meshplan.planner._ilp import (MemoryRow, _binding, _share_vector, _unique_rows,
                                   node_costs, objective_of, share_groups)
from meshplan.planner._mesh import CommModel, LogicalMesh
from meshplan.planner._ops import build_view
from meshplan.planner._problem import build_problem
from meshplan.planner._search import candidates

TINY = {
    "mlp2": (lambda w1, w2, x: jnp.tanh(x @ w1) @ w2,
             [(8, 16), (16, 8), (4, 8)]),
    "sum_of_matmul": (lambda w, x: jnp.sum(jnp.exp(x @ w), axis=0),
                      [(8, 8), (16, 8)]),
    "transpose_chain": (lambda w, x: (x @ w).T @ x,
                        [(8, 4), (16, 8)]),
}


def _tiny_problem(name, cluster):
    fn, shapes = TINY[name]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    g = ir.trace(fn, *args, roles=("param",) * (len(args) - 1) + ("data",))
    view = build_view(g)
    assert len(view.ops) <= 12
    mesh = LogicalMesh((2, 2), tuple(range(4)))
    return build_problem(view, CommModel(cluster, mesh), cluster.devices[0], Efficiency(),
                         tie=False)


UNEVEN = mp.clusters.custom(node_of=[0, 0, 1, 1], intra=(100e9, 1e-6), inter=(5e9, 2e-5))


@pytest.mark.parametrize("name", sorted(TINY))
def test_ilp_matches_brute_force(name):
    problem = _tiny_problem(name, UNEVEN)
    sizes = [len(s) for s in problem.strategies]
    assert np.prod(sizes) < 2e7, sizes
    best, best_obj = brute_force(problem)
    result = solve(problem, time_limit=30)
    assert result.status == "OPTIMAL"
    assert result.objective == pytest.approx(best_obj, rel=1e-6, abs=1e-12)


def test_ilp_matches_brute_force_under_a_memory_limit():
    problem = _tiny_problem("mlp2", UNEVEN)
    # Memory of each value produced by each class under each strategy, summed: a row that
    # makes the replicated optimum infeasible.
    coef = tuple(np.array([sum(np.prod(problem.view.values[v].shape) * 4 /
                               np.prod([problem.mesh_shape[a] for d in lay for a in d])
                               for v, lay in zip(problem.groups[m[0]].produced, s.produced))
                           for s in strats]) for m, strats in zip(problem.classes,
                                                                  problem.strategies))
    unconstrained, _ = brute_force(problem)
    used = sum(coef[c][s] for c, s in enumerate(unconstrained))
    row = MemoryRow(coef, 0.0, used * 0.6)
    best, best_obj = brute_force(problem, (row,))
    assert best is not None and best != unconstrained
    result = solve(problem, (row,), time_limit=30)
    assert result.objective == pytest.approx(best_obj, rel=1e-6, abs=1e-12)


def test_memory_rows_that_cannot_bind_are_left_out_and_change_nothing():
    problem = _tiny_problem("mlp2", UNEVEN)
    coef = tuple(np.array([float(len(s.produced)) for s in strats])
                 for strats in problem.strategies)
    most = sum(float(c.max()) for c in coef)
    loose, tight = MemoryRow(coef, 0.0, most), MemoryRow(coef, 0.0, most - 0.5)
    assert _binding((loose, tight)) == (tight,)
    assert solve(problem, (loose,), time_limit=30).objective == \
        pytest.approx(solve(problem, (), time_limit=30).objective)


def test_a_row_no_choice_can_meet_is_infeasible_without_a_solve():
    problem = _tiny_problem("mlp2", UNEVEN)
    coef = tuple(np.array([float(len(s.produced)) for s in strats])
                 for strats in problem.strategies)
    least = sum(float(c.min()) for c in coef)
    assert solve(problem, (MemoryRow(coef, 0.0, least),), time_limit=30).status == "OPTIMAL"
    result = solve(problem, (MemoryRow(coef, 0.0, least * 0.99),), time_limit=30)
    assert result.status == "INFEASIBLE" and result.wall_time < 0.5


def test_edge_compression_matches_numpy_unique():
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = rng.integers(0, 3, size=tuple(rng.integers(1, 8, size=2))) * rng.choice([1.0, 1e-3])
        _, first, inverse = np.unique(a, axis=0, return_index=True, return_inverse=True)
        got_first, got_inverse = _unique_rows(a)
        assert (got_first == first).all() and (got_inverse == inverse.reshape(-1)).all()


def test_refine_prices_strategies_as_the_exact_objective_does():
    """refine's per-class vectors equal the exact objective's shared reshard costs,
    strategy by strategy, on a real plan's problem (random choices of the other classes)."""
    ex = make("gpt", layers=2, hidden=64, heads=4, seq=32, batch=8, vocab=128)
    view = build_view(ir.trace(ex.train_step, *ex.args))
    cluster = mp.clusters.dgx_a100()
    problem = build_problem(view, CommModel(cluster, LogicalMesh((2, 4), tuple(range(8)))),
                            cluster.devices[0], Efficiency())
    rng = np.random.default_rng(0)
    checked = 0
    for members in share_groups(problem)[:400]:
        choice = [int(rng.integers(len(s))) for s in problem.strategies]
        edges = [problem.edges[k] for k in members]
        for c in {e.src for e in edges} | {e.dst for e in edges}:
            vec = _share_vector(problem, members, c, choice)
            if vec is None:
                continue
            exact = []
            for s in range(len(problem.strategies[c])):
                trial = list(choice)
                trial[c] = s
                only = dataclasses.replace(problem, edges=edges)
                exact.append(objective_of(only, trial) - sum(
                    float(x[trial[k]]) for k, x in enumerate(node_costs(only))))
            np.testing.assert_allclose(vec, exact, rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked > 100


def test_a_transposed_mesh_is_solved_once_on_uniform_links():
    ex = make("mlp", batch=16)
    cluster = mp.clusters.dgx_a100()
    shapes = [c.mesh.shape for c in candidates(cluster, mp.Constraints())]
    assert (2, 4) in shapes and (4, 2) not in shapes
    step = mp.auto_parallel(ex.train_step, cluster=cluster)
    cost = {s: step.plan(*ex.args, constraints=mp.Constraints(mesh_shape=s),
                         compare_baselines=False).cost.step_time for s in [(2, 4), (4, 2)]}
    assert cost[(2, 4)] == pytest.approx(cost[(4, 2)], rel=1e-9)
    # Two nodes: the axes differ (one crosses nodes), so both orders are candidates.
    shapes = [c.mesh.shape for c in candidates(mp.clusters.dgx_a100(nodes=2),
                                               mp.Constraints())]
    assert (2, 8) in shapes and (8, 2) in shapes


def _layouts(plan, prefix):
    return {p: l for p, l in zip(plan.input_paths, plan.in_layouts) if p.startswith(prefix)}


@pytest.mark.slow
def test_megatron_layout_found_with_tp8_on_a_dgx_a100_node():
    ex = make("gpt", layers=2, hidden=1024, heads=16, seq=512, batch=2, vocab=1024,
              abstract=True)
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(), time_limit=20)
    plan = step.plan(*ex.args, constraints=mp.Constraints(tp=8), compare_baselines=False)
    lay = _layouts(plan, "[0]['blocks'][0]")
    tp = plan.axis_names.index("tp")
    split = lambda dim: tuple((tp,) if d == dim else () for d in range(len(lay[key])))
    for key, dim in [("wq", 1), ("wk", 1), ("wv", 1),   # QKV: output (heads) split
                     ("wo", 0),                         # output projection: input (heads)
                     ("fc1", 1), ("fc2", 0)]:           # MLP: column then row parallel
        key = f"[0]['blocks'][0]['{key}']['kernel']"
        assert lay[key] == split(dim), (key, lay[key])


@pytest.mark.slow
def test_expert_parallelism_found_for_moe():
    ex = make("moe", batch=16, seq=64, hidden=512, experts=8, ffn=2048, layers=2)
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(), time_limit=20)
    plan = step.plan(*abstract(ex.args))
    for key in ("w_in", "w_out"):
        lay = _layouts(plan, f"[0]['layer_0']['{key}']")[f"[0]['layer_0']['{key}']"]
        # The expert dimension is split over every device: expert parallelism.
        assert sorted(lay[0]) == list(range(len(plan.mesh_shape))) and lay[1:] == ((), ())
    dp = [b for b in plan.baselines if b.name == "dp"][0]
    assert plan.cost.step_time < dp.cost.step_time


def test_constraints_errors_name_the_problem():
    with pytest.raises(ValueError, match="positive int"):
        mp.Constraints(tp=0)
    with pytest.raises(ValueError, match="schedule"):
        mp.Constraints(pp=2, schedule="round-robin")
    with pytest.raises(ValueError, match="positive int"):
        mp.Constraints(tp=True)
    # A mesh shape given as a list is kept as a tuple (constraints are hashed); a shape
    # that is not positive ints is refused.
    assert mp.Constraints(mesh_shape=[2, 4]).mesh_shape == (2, 4)
    hash(mp.Constraints(mesh_shape=[2, 4]))
    assert mp.Constraints(mesh_shape=np.array([2, 4])).mesh_shape == (2, 4)
    assert mp.Constraints(mesh_shape=(n for n in (2, 4))).mesh_shape == (2, 4)
    for bad in ([], [2, 0], "24", [2.5, 4], 8, np.array(8), [True, 8]):
        with pytest.raises(ValueError, match="mesh_shape"):
            mp.Constraints(mesh_shape=bad)
    with pytest.raises(ValueError, match="ZeRO stage"):
        mp.Constraints(zero=True)
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step)
    with pytest.raises(ValueError, match="cluster has 8"):
        step.plan(*ex.args, constraints=mp.Constraints(tp=4, dp=4))
    # A degree that does not divide the devices: named, with the degrees that would.
    for c, name in ((mp.Constraints(tp=3), "tp=3"), (mp.Constraints(tp=16), "tp=16"),
                    (mp.Constraints(dp=3, tp=2), "dp=3")):
        with pytest.raises(ValueError, match=rf"{name} does not divide the cluster's 8 "
                                             r"devices; choose \w+ among \[1, 2, 4, 8\]"):
            step.plan(*ex.args, constraints=c)
    assert step.plan(*ex.args, constraints=mp.Constraints(mesh_shape=[2, 4]),
                     compare_baselines=False).mesh_shape == (2, 4)


def test_plan_json_keeps_integer_dict_keys():
    from meshplan.planner._plan import _treedef_from, _treedef_json
    tree = {"blocks": {0: 1.0, 1: 2.0}, "head": [3.0, (4.0, None)]}
    treedef = jax.tree.structure(tree)
    assert _treedef_from(_treedef_json(treedef, treedef.num_leaves)) == treedef


def test_plan_json_round_trip_and_saved_plan_checks():
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = step.plan(*ex.args, constraints=mp.Constraints(tp=2, dp=4))
    back = mp.Plan.from_json(plan.to_json())
    assert back.in_layouts == plan.in_layouts and back.value_layouts == plan.value_layouts
    assert back.cost.comm_bytes == plan.cost.comm_bytes
    spec = lambda t: jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert spec(back.in_shardings) == spec(plan.in_shardings)
    # Applied to the same step: runs without solving, same result as the fresh plan, and
    # its shardings take the step's own tree again (optax states included).
    fixed = mp.auto_parallel(ex.train_step, plan=back)
    assert fixed.plan(*ex.args).in_shardings == plan.in_shardings
    out = fixed(*ex.args)
    ref = jax.jit(ex.train_step)(*ex.args)
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-5)
    # Checked once per argument signature: later calls reuse the plan and its program.
    assert fixed.plan(*ex.args) is fixed.plan(*ex.args)
    fixed(*ex.args)
    assert len(fixed._compiled) == 1
    # Asking the step for its cluster (mp.estimate does) does not make it "given": the
    # saved plan still runs on local devices.
    gpu = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(), time_limit=2)
    for_gpus = mp.Plan.from_json(gpu.plan(*ex.args, compare_baselines=False).to_json())
    again = mp.auto_parallel(ex.train_step, plan=for_gpus)
    mp.estimate(again, for_gpus, *ex.args)
    np.testing.assert_allclose(again(*ex.args)[2], ref[2], rtol=1e-5)
    # The plan's text is not a plan: refused with the remedy.
    with pytest.raises(TypeError, match="Plan.from_json"):
        mp.auto_parallel(ex.train_step, plan=plan.to_json())
    # Another model or other shapes: refused with the remedy.
    other = make("mlp", batch=64)
    with pytest.raises(ValueError, match="another model, other argument shapes or roles"):
        mp.auto_parallel(other.train_step, plan=back).plan(*other.args)
    with pytest.raises(ValueError, match="made for cluster"):
        mp.auto_parallel(ex.train_step, plan=back,
                         cluster=mp.clusters.dgx_a100()).plan(*ex.args)
    with pytest.raises(ValueError, match="malformed|format"):
        mp.Plan.from_json('{"format": 1}')
    # Device ids outside the mesh, or one id twice: refused when read, not when run.
    import json
    for order in ([0, 1, 2, 3, 4, 5, 6, 99], [0, 0, 1, 2, 3, 4, 5, 6]):
        doc = json.loads(plan.to_json())
        doc["device_order"] = order
        with pytest.raises(ValueError, match="not a permutation of the 8 device ids"):
            mp.Plan.from_json(json.dumps(doc))


def test_estimate_recosts_a_plan_on_another_cluster():
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = step.plan(*ex.args, constraints=mp.Constraints(dp=8), compare_baselines=False)
    same = mp.estimate(step, plan, *ex.args)
    assert same.comm_bytes == pytest.approx(plan.cost.comm_bytes)
    assert same.step_time == pytest.approx(plan.cost.step_time, rel=1e-6)
    slow = mp.clusters.custom(node_of=list(range(8)), device=mp.clusters.CPU,
                              intra=(10e9, 5e-6), inter=(1e8, 1e-3))
    assert mp.estimate(step, plan, *ex.args, cluster=slow).step_time > same.step_time
    # A plan made for other argument shapes is refused, not re-costed on the wrong graph.
    other = make("mlp", batch=64)
    with pytest.raises(ValueError, match="another model, other argument shapes or roles"):
        mp.estimate(other.train_step, plan, *other.args)


def test_summary_folds_repeated_layers_and_state_laid_out_as_its_parameter():
    from meshplan.planner._readable import layout_lines
    paths = ("[0]['b'][0]['w']", "[0]['b'][1]['w']", "[0]['b'][0]['v']", "[0]['b'][1]['v']",
             "[1].mu['b'][0]['w']", "[1].mu['b'][1]['w']", "[1].mu['b'][0]['v']",
             "[1].mu['b'][1]['v']", "[1].count", "[2]['w']")
    specs = ("P('tp',)", "P('tp',)", "P()", "P('tp',)",  # layer 1's v differs from layer 0's
             "P('tp',)", "P('tp',)", "P('dp',)", "P('tp',)", "P()", "P('dp',)")
    assert layout_lines(paths, specs) == [
        "[0]['b'][*]['w']: P('tp',)",
        "[0]['b'][0]['v']: P()", "[0]['b'][1]['v']: P('tp',)",
        "[1].mu: each other array as its parameter (3 arrays)",
        "[1].mu['b'][0]['v']: P('dp',)",
        "[1].count: P()",
        "[2]['w']: P('dp',)",  # a later argument never counts as a parameter
    ]
    # A layer pattern folds only when every array of it is on the line: here layer 0's
    # state is "as its parameter", so layers 1 and 2 are listed, not shown as [*].
    paths = tuple(f"[{a}]{m}['b'][{k}]['v']" for a, m in ((0, ""), (1, ".mu")) for k in range(3))
    assert layout_lines(paths, ("P('tp',)", "P()", "P()", "P('tp',)", "P('dp',)", "P('dp',)")) \
        == ["[0]['b'][0]['v']: P('tp',)", "[0]['b'][1]['v']: P()", "[0]['b'][2]['v']: P()",
            "[1].mu: each other array as its parameter (1 array)",
            "[1].mu['b'][1]['v']: P('dp',)", "[1].mu['b'][2]['v']: P('dp',)"]
    # On a real plan: every layer of the GPT alike, and the data arguments shown.
    ex = make("gpt")
    plan = mp.auto_parallel(ex.train_step, time_limit=2).plan(
        *ex.args, constraints=mp.Constraints(tp=4, dp=2), compare_baselines=False)
    text = plan.summary()
    assert "[0]['blocks'][*]['wq']['kernel']: P(None, 'tp')" in text
    assert "[2]['tokens']: P('dp',)" in text and "more lines" not in text


@pytest.mark.parametrize("constraints", [mp.Constraints(tp=8), mp.Constraints(dp=8)])
def test_bfloat16_collectives_cost_their_float32_bytes_on_cpu(constraints):
    # XLA:CPU converts bfloat16 values to float32 around every all-reduce and all-gather:
    # the collectives of the bfloat16 GPT move twice the bytes of its values (the model
    # predicted 0.52 of the measurement before it counted that).
    ex = make("gpt", dtype=jnp.bfloat16)
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = step.plan(*ex.args, constraints=constraints, compare_baselines=False)
    m = mp.measure(step.compile(*ex.args, plan=plan))
    assert m.comm_bytes > 0
    assert plan.cost.comm_bytes == pytest.approx(m.comm_bytes, rel=0.01)


def test_a_stack_gathered_for_two_loops_is_gathered_once():
    # FSDP of a scanned model with as many layers as devices shards the stacked weights on
    # their layer dim: the forward and the backward loop each slice the whole stack, and
    # XLA gathers it once for both. Counting a gather per loop over-predicted by 1.106.
    ex = make("transformer_scan", layers=8)
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = mp.baselines(step, *ex.args)["fsdp"]
    m = mp.measure(step.compile(*ex.args, plan=plan))
    assert dict(plan.cost.comm_by_kind)["all-gather"] == pytest.approx(
        m.by_kind()["all-gather"], rel=0.01)


def _gpt_problem(layers=3):
    """A small unrolled GPT's ILP data on a 2 x 4 mesh of a DGX A100 node (repeated
    layers: classes of several groups)."""
    from meshplan.planner._problem import group_view
    ex = make("gpt", layers=layers, abstract=True)
    t = mp.auto_parallel(ex.train_step).trace(*ex.args)
    view = build_view(t.graph, t.pairs)
    cluster = mp.clusters.dgx_a100(nodes=1)
    mesh = LogicalMesh((2, 4), tuple(range(8)))
    return build_problem(view, CommModel(cluster, mesh), cluster.devices[0], Efficiency(),
                         grouping=group_view(view, True))


def _random_choices(problem, n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(len(s))) for s in problem.strategies] for _ in range(n)]


def test_reshards_from_read_buckets_equal_a_walk_over_every_group():
    from meshplan.planner._evaluate import _reads, assign
    problem = _gpt_problem()
    assert problem.grouping.slot_reads is not None
    assert max(len(c) for c in problem.classes) >= 3  # the layers share classes
    moved = 0
    for choice in _random_choices(problem, 6):
        a = assign(problem, choice)
        want = []  # every group's reads, in order, that this plan moves
        for g in problem.groups:
            strat = problem.strategies[g.cls][choice[g.cls]]
            for (mi, k, v, mult), lay in zip(g.slots, strat.slots):
                if a.value_layout[v] != lay:
                    want.append((v, lay, g.members[mi].mult if k >= 0 else mult, mult))
        got = [r for r in _reads(problem, choice) if a.value_layout[r[0]] != r[1]]
        assert got == want
        moved += len(want)
    assert moved > 0  # random layouts do move values


def test_layout_sources_give_every_value_its_assigned_layout():
    from meshplan.planner._evaluate import assign
    from meshplan.planner._pipe import _layout_sources
    problem = _gpt_problem()
    made_by = {v: (op.id, k) for op in problem.view.ops for k, v in enumerate(op.outputs)}
    sources = _layout_sources(problem.grouping, made_by)
    values = sorted(problem.view.values)
    codes = sources.codes(values)
    assert (codes > 0).sum() > len(values) // 2
    for choice in _random_choices(problem, 3, seed=1):
        a = assign(problem, choice)
        for v, code in zip(values, codes.tolist()):
            if v in a.value_layout:
                want = a.value_layout[v]
            elif v in made_by and made_by[v][0] in a.op_layouts:
                want = a.op_layouts[made_by[v][0]][1][made_by[v][1]]
            else:
                want = None
            if code == 0:
                assert want is None, v
                continue
            c, member, j = sources.keys[code - 1]
            strat = problem.strategies[c][choice[c]]
            assert (strat.produced[j] if member < 0 else strat.ops[member][1][j]) == want, v


def test_collective_buffers_of_only_the_ops_plan_visits_marks_are_all_of_them():
    from meshplan.planner._evaluate import assign
    from meshplan.planner._memory import (_collective_buffers, liveness, memory,
                                          plan_visits)
    problem = _gpt_problem()
    live = liveness(problem.view)
    partial = 0
    for choice in _random_choices(problem, 4, seed=2):
        a = assign(problem, choice)
        visit = plan_visits(problem.grouping, problem.view, live,
                            [problem.strategies[c][x] for c, x in enumerate(choice)])
        assert 0 < visit.sum() < len(visit)
        got = []
        for v in (visit, None):
            sizes = np.zeros(len(live.temps))
            extra = ([], [], [])
            _collective_buffers(problem.view, live, a.value_layout, problem.mesh_shape,
                                a.op_layouts, False, sizes, *extra, v)
            got.append((sizes.tolist(), extra))
        assert got[0] == got[1]
        partial += sum(1 for s, e in zip(*got[0][1][1:]) if e == s + 1)
        args = (problem.view, live, a.value_layout, problem.mesh_shape, frozenset(),
                a.op_layouts)
        assert memory(*args, visit=visit) == memory(*args)
    assert partial > 0  # partial sums and moved operands both occur


def test_memory_rows_on_a_shared_grouping_equal_rows_built_afresh():
    """memory_rows keeps the bytes per slot on the grouping, for every mesh that shares
    it: rows on another mesh, and with donated buffers, equal rows from a new grouping."""
    from meshplan.planner._memory import liveness, memory_rows, peak_times
    from meshplan.planner._problem import group_view
    first = _gpt_problem()
    view, cluster = first.view, mp.clusters.dgx_a100(nodes=1)
    live = liveness(view)
    times = peak_times(live, np.array([view.values[v].nbytes for v in live.temps], float), 3)
    aliased = frozenset(live.temps[i] for t in times for i in live.live_at(t)
                        if live.is_out[i])
    assert aliased

    def rows(grouping, shape, donated):
        mesh = LogicalMesh(shape, tuple(range(8)))
        problem = build_problem(view, CommModel(cluster, mesh), cluster.devices[0],
                                Efficiency(), grouping=grouping)
        return [r.coef for r in memory_rows(problem, live, 1e12, times, donated)]

    def same(a, b):
        return len(a) == len(b) and all(len(ra) == len(rb) and all(
            np.array_equal(x, y) for x, y in zip(ra, rb)) for ra, rb in zip(a, b))

    before = rows(first.grouping, (2, 4), frozenset())  # fills the grouping's memo
    for shape, donated in [((4, 2), frozenset()), ((4, 2), aliased), ((8,), aliased)]:
        shared = rows(first.grouping, shape, donated)
        assert same(shared, rows(group_view(view, True), shape, donated))
        assert not same(shared, before)  # the mesh or the donation changes the rows
