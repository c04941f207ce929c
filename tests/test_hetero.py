"""Heterogeneous clusters: placement, uneven links, islands, mixed device generations."""
import dataclasses

import numpy as np
import pytest

import meshplan as mp
from meshplan.costmodel import collective_algorithms
from meshplan.examples import make
from meshplan.planner._placement import Traffic, improve_order, order_cost, topology_order

NVLINK = mp.LinkTier("nvlink", 300e9, 1e-6)
IB = mp.LinkTier("infiniband", 25e9, 5e-6)


def _gpt(**kw):
    base = dict(layers=4, hidden=512, heads=8, seq=256, batch=16, vocab=1024, abstract=True,
                dtype="bfloat16")
    return make("gpt", **{**base, **kw})


def _scrambled(cluster: mp.Cluster, seed: int):
    """The same machine with device ids shuffled: device k of `cluster` is perm[k] here."""
    perm = np.random.default_rng(seed).permutation(cluster.num_devices)
    inv = np.argsort(perm)
    sub = lambda m: None if m is None else np.asarray(m, dtype=float)[np.ix_(inv, inv)]
    return mp.Cluster(devices=[cluster.devices[i] for i in inv],
                      node_of=[cluster.node_of[i] for i in inv], tiers=cluster.tiers,
                      pair_bandwidth=sub(cluster.pair_bandwidth), name="scrambled"), perm


def _uneven(nodes=2, per=4, seed=0):
    n = nodes * per
    node_of = [i // per for i in range(n)]
    bw = np.where(np.equal.outer(node_of, node_of), NVLINK.bandwidth, IB.bandwidth)
    bw = bw * np.random.default_rng(seed).uniform(0.7, 1.0, (n, n))
    return mp.Cluster(devices=(mp.clusters.A100_80GB,) * n, node_of=node_of,
                      tiers=(NVLINK, IB), pair_bandwidth=bw, name="uneven")


def _plan(ex, cluster, **kw):
    return mp.auto_parallel(ex.train_step, cluster=cluster, time_limit=2).plan(*ex.args, **kw)


# -- placement ---------------------------------------------------------------------------


def test_topology_order_finds_islands_from_measured_bandwidth_alone():
    # Eight devices, each its own node, two islands of four visible only in the matrix.
    island = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    bw = np.where(np.equal.outer(island, island), 100e9, 1e9)
    c = mp.clusters.custom(node_of=range(8), pair_bandwidth=bw)
    order = topology_order(c)
    assert sorted(order) == list(range(8))
    assert len({island[d] for d in order[:4]}) == 1 and len({island[d] for d in order[4:]}) == 1


def test_topology_order_does_not_depend_on_how_ids_are_numbered():
    c = _uneven()
    s, perm = _scrambled(c, seed=3)
    assert tuple(int(perm[d]) for d in topology_order(c)) == topology_order(s)


def test_swap_search_takes_the_worst_pair_out_of_the_ring():
    # Four devices in one node; the link 0 <-> 1 is ten times slower than the others.
    bw = np.full((4, 4), 100e9)
    bw[0, 1] = bw[1, 0] = 10e9
    c = mp.clusters.custom(node_of=[0] * 4, pair_bandwidth=bw)
    traffic = [Traffic("all-reduce", 1e9, (0,), 1.0)]
    start = (0, 1, 2, 3)  # the ring 0 -> 1 -> 2 -> 3 -> 0 uses the slow link
    before = order_cost(c, (4,), start, traffic)
    order, after = improve_order(c, (4,), start, traffic)
    # Some order keeps the slow pair out of every exchange (a ring 0-2-1-3, or pairings
    # that never match 0 with 1): as fast as if the slow link were not there.
    fast = mp.clusters.custom(node_of=[0] * 4, pair_bandwidth=np.full((4, 4), 100e9))
    assert after == pytest.approx(order_cost(fast, (4,), start, traffic), rel=1e-3)
    assert after < before / 2


def test_swap_search_moves_the_busy_axis_onto_the_fast_links():
    # 2 nodes x 4: a mesh (4, 2) laid over the topology order puts axis 1 inside nodes; when
    # axis 0 carries the traffic, the search gives axis 0 the nodes instead.
    c = mp.clusters.dgx_a100(nodes=2).subset([0, 1, 2, 3, 8, 9, 10, 11])
    c = mp.Cluster(devices=c.devices, node_of=c.node_of, tiers=c.tiers,
                   pair_bandwidth=np.where(np.equal.outer(c.node_of, c.node_of), 300e9, 25e9))
    traffic = [Traffic("all-reduce", 1e9, (0,), 1.0)]
    order, t = improve_order(c, (4, 2), topology_order(c), traffic)
    groups = np.asarray(order).reshape(4, 2).T  # the groups along axis 0
    assert all(len({c.node_of[d] for d in g}) == 1 for g in groups)


def test_scrambled_ids_cost_the_same_and_pinned_tp_stays_inside_nodes():
    ex = _gpt()
    plain = mp.clusters.dgx_a100(nodes=2).subset([0, 1, 2, 3, 8, 9, 10, 11])
    scrambled, _ = _scrambled(plain, seed=1)
    # The scramble is real: consecutive ids straddle nodes.
    assert scrambled.node_of[:4] != (scrambled.node_of[0],) * 4
    a = _plan(ex, plain, constraints=mp.Constraints(tp=4))
    b = _plan(ex, scrambled, constraints=mp.Constraints(tp=4))
    assert b.cost.step_time == pytest.approx(a.cost.step_time, rel=1e-9)
    # device_ids: the mesh, with a leading stage axis when pipelined.
    ids = np.asarray(b.device_ids).reshape((-1,) + tuple(b.mesh_shape))
    groups = np.moveaxis(ids, 1 + b.axis_names.index("tp"), -1).reshape(-1, 4)
    assert all(len({scrambled.node_of[d] for d in g}) == 1 for g in groups)
    # Free search: the same cost too.
    assert _plan(ex, scrambled).cost.step_time == pytest.approx(
        _plan(ex, plain).cost.step_time, rel=1e-9)


def test_scrambled_ids_with_measured_links_cost_the_same():
    ex = _gpt(layers=2)
    c = _uneven()
    s, _ = _scrambled(c, seed=2)
    cons = mp.Constraints(pp=1)
    assert _plan(ex, s, constraints=cons).cost.step_time == pytest.approx(
        _plan(ex, c, constraints=cons).cost.step_time, rel=1e-6)


def test_measured_links_plan_is_no_slower_than_the_link_blind_plan_on_them():
    ex = _gpt(layers=2)
    c = _uneven(seed=5)
    step = mp.auto_parallel(ex.train_step, cluster=c.tiers_only(), time_limit=2)
    blind = step.plan(*ex.args, constraints=mp.Constraints(pp=1))
    aware = _plan(ex, c, constraints=mp.Constraints(pp=1))
    on_true = mp.estimate(step, blind, *ex.args, cluster=c).step_time
    assert aware.cost.step_time <= on_true * (1 + 1e-9)


# -- links of different kinds ------------------------------------------------------------


def test_high_latency_links_pick_latency_optimal_algorithms_for_small_messages():
    edge = mp.Cluster(devices=(mp.clusters.CPU,) * 8, node_of=range(8),
                      tiers=(NVLINK, mp.LinkTier("1GbE", 125e6, 1e-3)))
    small = collective_algorithms("all-reduce", 1e3, range(8), edge)
    large = collective_algorithms("all-reduce", 1e9, range(8), edge)
    # 1 kB: a ring's 14 latency hops cost 14 ms; star or recursive doubling take 2 or 3.
    assert min(small, key=small.get) in ("star", "recursive_doubling")
    assert min(small.values()) < small["ring"] / 4
    # 1 GB: a bandwidth-optimal algorithm (ring, or halving-doubling with fewer hops),
    # 2 (n-1)/n S / bandwidth, as in Patarasuk & Yuan (2009).
    assert min(large, key=large.get) in ("ring", "halving_doubling")
    assert min(large.values()) == pytest.approx(2 * 7 / 8 * 1e9 / 125e6, rel=0.01)


def test_islands_joined_by_ethernet_pipeline_across_and_beat_the_link_blind_plan():
    ex = _gpt(layers=4, hidden=1024, heads=16, seq=128, batch=16)
    node_of = [i // 2 for i in range(8)]
    c = mp.Cluster(devices=(mp.clusters.A100_80GB,) * 8, node_of=node_of,
                   site_of=[n % 2 for n in node_of],  # nodes alternate between the sites
                   tiers=(NVLINK, IB, mp.LinkTier("ethernet", 1.25e9, 30e-6)))
    aware = _plan(ex, c)
    step = mp.auto_parallel(ex.train_step, cluster=c.tiers_only(), time_limit=2)
    blind = mp.estimate(step, step.plan(*ex.args), *ex.args, cluster=c)
    assert blind.step_time >= 1.25 * aware.cost.step_time
    # A pipeline across the islands keeps each stage on one site.
    pinned = _plan(ex, c, constraints=mp.Constraints(pp=2))
    for s in pinned.stages:
        assert len({c.site_of[d] for d in s.device_ids}) == 1


# -- mixed device generations -------------------------------------------------------------


def test_stages_on_the_slower_generation_hold_fewer_layers():
    ex = _gpt(layers=6)
    devices = (mp.clusters.H100_80GB,) * 4 + (mp.clusters.A100_80GB,) * 4
    c = mp.Cluster(devices=devices, node_of=[i // 2 for i in range(8)], tiers=(NVLINK, IB))
    plan = _plan(ex, c, constraints=mp.Constraints(pp=2))
    kinds = [c.devices[s.device_ids[0]].kind for s in plan.stages]
    held = {k: s.layers[1] - s.layers[0] for k, s in zip(kinds, plan.stages)}
    assert set(held) == {"H100-SXM5-80GB", "A100-SXM4-80GB"}
    assert held["A100-SXM4-80GB"] < held["H100-SXM5-80GB"]
    # The same split costed as if every device were an H100 is balanced the other way round.
    same = mp.Cluster(devices=(mp.clusters.H100_80GB,) * 8, node_of=c.node_of, tiers=c.tiers)
    even = _plan(ex, same, constraints=mp.Constraints(pp=2))
    assert [s.layers for s in even.stages] != [s.layers for s in plan.stages]


def test_mixed_generations_numbered_alternately_plan_the_same():
    # Nodes of two generations numbered H100, A100, H100, A100: stages still hold one
    # generation each, and the plan costs what it does with the generations numbered apart.
    ex = _gpt(layers=6)
    H, A = mp.clusters.H100_80GB, mp.clusters.A100_80GB
    apart = mp.Cluster(devices=(H,) * 4 + (A,) * 4, node_of=[i // 2 for i in range(8)],
                       tiers=(NVLINK, IB))
    mixed = mp.Cluster(devices=(H, H, A, A) * 2, node_of=[i // 2 for i in range(8)],
                       tiers=(NVLINK, IB))
    a = _plan(ex, apart, constraints=mp.Constraints(pp=2))
    b = _plan(ex, mixed, constraints=mp.Constraints(pp=2))
    assert b.cost.step_time == pytest.approx(a.cost.step_time, rel=1e-9)
    for s in b.stages:
        assert len({mixed.devices[d].kind for d in s.device_ids}) == 1


def test_which_generation_runs_the_first_stage_is_chosen_by_cost():
    # The first stage holds the embedding, the last the head and the loss, so which
    # generation goes first changes the split. The topology order puts the generations in
    # the order of their names; renaming the H100 so that it sorts first must not change
    # the plan's cost: both orders are tried. (This model's 2-stage plan is faster with
    # the H100s first.)
    ex = _gpt(layers=6)
    H, A = mp.clusters.H100_80GB, mp.clusters.A100_80GB
    renamed = dataclasses.replace(H, kind="0-" + H.kind)
    node_of = [i // 2 for i in range(8)]
    cost, first = {}, {}
    for h in (H, renamed):
        c = mp.Cluster(devices=(h,) * 4 + (A,) * 4, node_of=node_of, tiers=(NVLINK, IB))
        plan = _plan(ex, c, constraints=mp.Constraints(pp=2))
        cost[h.kind] = plan.cost.step_time
        first[h.kind] = c.devices[plan.stages[0].device_ids[0]] is h
    assert cost[renamed.kind] == pytest.approx(cost[H.kind], rel=1e-9)
    assert first[H.kind] == first[renamed.kind]


def test_estimate_of_a_pipelined_plan_on_its_own_cluster_is_its_cost():
    ex = _gpt(layers=4)
    devices = (mp.clusters.H100_80GB,) * 4 + (mp.clusters.A100_80GB,) * 4
    c = mp.Cluster(devices=devices, node_of=[i // 2 for i in range(8)], tiers=(NVLINK, IB))
    step = mp.auto_parallel(ex.train_step, cluster=c, time_limit=2)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2))
    got = mp.estimate(step, plan, *ex.args)
    assert got.step_time == pytest.approx(plan.cost.step_time, rel=1e-6)
    assert got.peak_memory == pytest.approx(plan.cost.peak_memory, rel=1e-6)
    # On a cluster of all-A100 the same plan is slower (its first stage lost its H100s).
    slow = mp.Cluster(devices=(mp.clusters.A100_80GB,) * 8, node_of=c.node_of, tiers=c.tiers)
    assert mp.estimate(step, plan, *ex.args, cluster=slow).step_time > plan.cost.step_time


def test_estimate_of_a_pipelined_plan_on_measured_links_is_its_cost():
    """Every pair of devices linked differently: the search and `estimate` price the
    stages' hops over the same device pairs, whatever order each stage mesh uses."""
    ex = _gpt(layers=4)
    c = _uneven()
    step = mp.auto_parallel(ex.train_step, cluster=c, time_limit=2)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=4))  # stages of two devices
    got = mp.estimate(step, plan, *ex.args)
    assert dict(got.breakdown)["p2p"] > 0
    assert got.step_time == pytest.approx(plan.cost.step_time, rel=1e-9)


def test_per_stage_speed_and_memory_limits_shape_the_split():
    from test_pipeline_planner import _uniform

    from meshplan.planner._pipe import Setting, split

    c = _uniform(n_blocks=10)  # 12 equal layers, 5 bytes held each
    s = Setting(2, 4, "1f1b", 1, "none", 0)
    assert split(c, s, limit=1e9) == [(0, 6), (6, 12)]
    # A stage twice as slow gets a third of the layers.
    slow = dataclasses.replace(c, forward=2 * c.forward, backward=2 * c.backward)
    assert split([c, slow], s, limit=1e9) == [(0, 8), (8, 12)]
    # A stage with little memory gets fewer layers, whatever its speed; none fits if the
    # limits are too small for any split.
    one = split(c, s, limit=[1e9, 0.0])  # sizes the room per stage
    assert one is None
    per_layer = split(c, s, limit=1e9)
    f, b = per_layer[1]
    got = split(c, s, limit=[1e9, 40.0])  # room for fewer than 6 layers on stage 1
    assert got is not None and got[1][1] - got[1][0] < b - f
