"""Pipeline planning: layers found in traced steps, stage splits, schedules, memory choices."""
import dataclasses
import functools
import itertools
import json
import math
import re
import threading
import time
import types

import jax
import numpy as np
import pytest

import meshplan as mp
from meshplan.examples import make
from meshplan.planner._layers import SPREAD, find_layers
from meshplan.planner._ops import build_view
from meshplan.planner._pipe import (LayerCosts, PipelineChoice, Setting, evaluate_split,
                                    split)
from meshplan.planner._search import _concurrently, _patience_count


def _view(name, **kw):
    ex = make(name, abstract=True, **kw) if name != "mlp" else make(name)
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(nodes=1))
    t = step.trace(*ex.args)
    return ex, step, build_view(t.graph, t.pairs), t.pairs


def _flops_by_layer(view, layers):
    out = {}
    for op in view.ops:
        if op.id in layers.op_layer:
            key = (layers.op_pass[op.id], layers.op_layer[op.id])
            out[key] = out.get(key, 0.0) + op.flops * op.mult
    return out


def test_layers_of_an_unrolled_gpt_are_its_blocks_with_embedding_and_head_around():
    _, _, view, pairs = _view("gpt", layers=4)
    layers = find_layers(view, pairs)
    assert layers.num_blocks == 4 and not layers.scanned and layers.num_layers == 6
    fl = _flops_by_layer(view, layers)
    fwd = [fl[("forward", b)] for b in range(1, 5)]
    bwd = [fl[("backward", b)] for b in range(1, 5)]
    # Every block does the same work; its backward pass is about twice its forward.
    assert max(fwd) / min(fwd) < 1.01 and max(bwd) / min(bwd) < 1.01
    assert 1.9 < bwd[0] / fwd[0] < 2.1
    # The head (a vocab-sized matmul) is the output layer, not part of the last block.
    assert fl[("forward", 5)] > 0.1 * fwd[0]
    assert 1.9 < fl[("backward", 5)] / fl[("forward", 5)] < 2.1
    # The tied embedding is held by the first and the last layer.
    held = {v: l for v, l in layers.input_layers.items() if len(l) > 1}
    assert set(held.values()) == {(0, 5)}


def test_a_scanned_gpt_has_the_same_layers_as_the_unrolled_one():
    _, _, view_u, pairs_u = _view("gpt", layers=4)
    _, _, view_s, pairs_s = _view("gpt_scan", layers=4)
    lu, ls = find_layers(view_u, pairs_u), find_layers(view_s, pairs_s)
    assert ls.scanned and ls.num_blocks == 4
    fu, fs = _flops_by_layer(view_u, lu), _flops_by_layer(view_s, ls)
    for phase in ("forward", "backward"):
        blocks_u = sum(fu[(phase, b)] for b in range(1, 5))
        assert fs[(phase, SPREAD)] == pytest.approx(blocks_u, rel=0.01)
        # Embedding and head: the same, up to the few element-wise ops at the block
        # boundary (under 1 % of a block).
        for edge in (0, 5):
            assert fs.get((phase, edge), 0.0) == pytest.approx(
                fu.get((phase, edge), 0.0), abs=0.01 * blocks_u / 4)


def _optax_step_layers(loss, tx, params):
    """find_layers of an optax step minimising loss(params, x), x of shape (4, 8), and
    the layers it gives each optimizer-state array that is not a scalar (by path)."""
    import optax

    def step(p, o, x):
        value, g = jax.value_and_grad(loss)(p, x)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    t = mp.auto_parallel(step).trace(params, tx.init(params), jax.numpy.ones((4, 8)))
    layers = find_layers(build_view(t.graph, t.pairs), t.pairs)
    state = {i.path: layers.input_layers[i.value] for i in t.graph.input_info
             if layers is not None and i.role == "opt_state" and t.graph.values[i.value].shape}
    return layers, state


def _block_of_path(path: str) -> tuple[int]:
    """The layer of block k, from the last index in the path: (k + 1,)."""
    return (int(re.findall(r"\[(\d)\]", path)[-1]) + 1,)


def test_optimizer_state_integers_are_not_layers():
    """optax's chain positions (`[1][0].count`, `[1][2].count` with a learning-rate
    schedule) differ in one integer too; only parameter paths name blocks."""
    import optax
    sched = optax.adamw(optax.cosine_decay_schedule(1e-3, 100))
    for name, blocks, scanned in (("gpt", 4, False), ("gpt_scan", 4, True),
                                  ("transformer_scan", 4, True)):
        ex = make(name, layers=4, tx=sched)
        t = mp.auto_parallel(ex.train_step).trace(*ex.args)
        layers = find_layers(build_view(t.graph, t.pairs), t.pairs)
        assert (layers.num_blocks, layers.scanned) == (blocks, scanned), name
        # Each block's optimizer state sits in the layer of its parameter.
        for info in t.graph.input_info:
            if info.role == "opt_state" and "['blocks'][2]" in info.path:
                assert layers.input_layers[info.value] == (3,), info.path
    # Parameters as a list of dicts or a tuple, state nested under dict keys: each
    # block's state sits with its parameter still.
    adam = optax.adam(1e-3)
    multi = optax.multi_transform({"a": adam}, lambda p: jax.tree.map(lambda _: "a", p))
    ws = [jax.numpy.full((8, 8), 0.1 * (i + 1)) for i in range(3)]

    def hidden(p, x):  # the blocks, each a tanh layer
        for blk in (p["blocks"] if isinstance(p, dict) else p):
            x = jax.numpy.tanh(x @ (blk["w"] if isinstance(blk, dict) else blk))
        return x

    for params, tx in (([{"w": w} for w in ws], adam), (tuple(ws), adam),
                       ({"blocks": [{"w": w} for w in ws]}, multi)):
        _, state = _optax_step_layers(lambda p, x: jax.numpy.sum(hidden(p, x)), tx, params)
        assert len(state) == 6 and all(lay == _block_of_path(path)
                                       for path, lay in state.items()), state
    # Adafactor's factored moments have other shapes than their parameter: still found
    # through the path's dict keys.
    fact = optax.adafactor(1e-3, min_dim_size_to_factor=4)
    params = {"embed": jax.numpy.ones((8, 8)), "blocks": [{"w": w} for w in ws],
              "head": jax.numpy.ones((8, 2))}

    _, state = _optax_step_layers(
        lambda p, x: jax.numpy.sum(hidden(p, x @ p["embed"]) @ p["head"]), fact, params)
    assert len(state) == 15
    for path, lay in state.items():
        if "blocks" in path:
            assert lay == _block_of_path(path), (path, lay)
    # Three distinct matrices and a scheduled Adam: no repeated layers at all.
    params = {k: jax.numpy.ones((8, 8)) for k in "abc"}
    layers, _ = _optax_step_layers(lambda p, x: jax.numpy.sum(x @ p["a"] @ p["b"] @ p["c"]),
                                   sched, params)
    assert layers is None


def test_a_model_without_repeated_layers_cannot_be_pipelined_and_says_so():
    ex, step, view, pairs = _view("mlp")
    assert find_layers(view, pairs) is None
    with pytest.raises(ValueError, match="repeated layers"):
        step.plan(*ex.args, constraints=mp.Constraints(pp=2), compare_baselines=False)


def _uniform(n_blocks=8, fwd=1.0, saved=10.0, held=5.0):
    n = n_blocks + 2
    z = np.zeros(n)
    f = np.full(n, fwd)
    return LayerCosts(forward=f, backward=2 * f, step=z.copy(), weights=np.full(n, held / 2),
                      opt_state=z.copy(), saved=np.full(n, saved), inputs=np.full(n, 1.0),
                      transient=z.copy(), cut=np.zeros(n), flops=z.copy(),
                      weights_dp=z.copy(), opt_state_dp=z.copy(), gather=z.copy(),
                      sent=z.copy(), forward_flops=z.copy(), outputs=z.copy(), dp_size=1,
                      batch=64)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_the_planner_prices_the_published_bubble(schedule, v):
    """Equal stages: bubble = (p-1)/m of the ideal time, (p-1)/(v m) interleaved."""
    c = _uniform(n_blocks=14)  # 16 layers of equal work
    p, m = 4, 8
    s = Setting(p, m, schedule, v, "none", 0)
    pieces = split(c, s, limit=math.inf)
    got = evaluate_split(c, s, pieces, hop=lambda b: 0.0)
    ideal = got.step_time - got.bubble
    assert got.bubble / ideal == pytest.approx((p - 1) / (v * m), rel=1e-9)


def test_1f1b_holds_at_most_p_microbatches_and_gpipe_all_of_them():
    c = _uniform(n_blocks=6)
    p, m = 4, 16
    mem = {}
    for sched in ("gpipe", "1f1b"):
        s = Setting(p, m, sched, 1, "none", 0)
        pieces = [(0, 2), (2, 4), (4, 6), (6, 8)]
        mem[sched] = evaluate_split(c, s, pieces, hop=lambda b: 0.0).stage_memory
    per_mb = 2 * 10.0 / m  # two layers per stage, 10 bytes saved each per whole batch
    state = 2 * 2.5  # two layers' weights (no optimizer state here)
    grads = 2 * 2.5  # their gradient sums, from the stage's first backward on
    fresh = 2 * 2.5  # one microbatch's gradients of them, before they join the sums
    for i in range(p):
        # GPipe: all m microbatches at the first backward, m - 1 beside the sums after it.
        assert mem["gpipe"][i] == pytest.approx(
            state + fresh + max(m * per_mb, (m - 1) * per_mb + grads))
        # 1F1B (m > p): p - i at every backward, the sums beside them from the second on.
        assert mem["1f1b"][i] == pytest.approx(state + fresh + (p - i) * per_mb + grads)


def test_new_copies_of_the_state_count_after_the_last_backward_not_beside_activations():
    """State not updated in place is written anew by the update, when no microbatch's
    activations are held any more: a stage needs the larger of the two phases."""
    p, m = 2, 4
    pieces = [(0, 4), (4, 8)]
    s = Setting(p, m, "gpipe", 1, "none", 0)
    base = _uniform(n_blocks=6)
    phases = {}
    for name, update in (("small", 1.0), ("large", 100.0)):
        c = dataclasses.replace(base, outputs=np.full(base.num_layers, update))
        phases[name] = evaluate_split(c, s, pieces, hop=lambda b: 0.0).stage_memory
    state, grads, fresh, per_mb = 4 * 2.5, 4 * 2.5, 4 * 2.5, 4 * 10.0 / m
    backward = state + fresh + max(m * per_mb, (m - 1) * per_mb + grads)
    for i in range(p):
        assert phases["small"][i] == pytest.approx(backward)
        assert phases["large"][i] == pytest.approx(state + grads + 4 * 100.0)  # update


def test_recomputed_blocks_of_a_scan_hold_all_their_saved_activations_at_once():
    """Recomputed unrolled layers rebuild their saved activations one layer at a time;
    a stage's recomputed blocks of a scan are recomputed by one scan, which stacks them
    all before the backward scan starts."""
    c = _uniform(n_blocks=6)  # layers: pre, 6 blocks, post; 10 bytes saved each (batch)
    pieces = [(0, 4), (4, 8)]  # stage 0: pre + blocks 1-3; stage 1: blocks 4-6 + post
    s = Setting(2, 4, "1f1b", 1, "full", 0)
    in_scan = np.array([False] + [True] * 6 + [False])
    plain = evaluate_split(c, s, pieces, lambda b: 0.0).stage_memory
    scanned = evaluate_split(dataclasses.replace(c, in_scan=in_scan), s, pieces,
                             lambda b: 0.0).stage_memory
    per_mb = 10.0 / 4  # one layer's saved activations, one microbatch
    # Unrolled: one layer's at a time; scanned: the three blocks' at once, besides one
    # layer's for the unscanned layer of each stage (embedding, head), also recomputed.
    for k in range(2):
        assert scanned[k] - plain[k] == pytest.approx(3 * per_mb)


def test_full_recomputation_trades_memory_for_a_second_forward_pass():
    c = _uniform(n_blocks=6)
    pieces = [(0, 4), (4, 8)]
    plain = evaluate_split(c, Setting(2, 4, "1f1b", 1, "none", 0), pieces, lambda b: 0.0)
    remat = evaluate_split(c, Setting(2, 4, "1f1b", 1, "full", 0), pieces, lambda b: 0.0)
    assert max(remat.stage_memory) < max(plain.stage_memory)
    # Forward 1 + backward 2 per layer becomes 1 + 3: 4/3 the time.
    assert remat.step_time == pytest.approx(plain.step_time * 4 / 3)


def test_stage_split_equals_brute_force_under_memory_limits():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n_blocks = int(rng.integers(3, 7))
        c = _uniform(n_blocks)
        n = c.num_layers
        t = rng.uniform(0.5, 3.0, n)
        held = rng.uniform(1.0, 10.0, n)
        # Both memory phases: new copies of state (the update's) on odd trials, and
        # residuals the backward programs rebuild.
        update = rng.uniform(0.0, 20.0, n) if trial % 2 else np.zeros(n)
        c = dataclasses.replace(c, forward=t, backward=2 * t, weights=held / 2,
                                outputs=update, rebuilt=rng.uniform(0.0, 8.0, n))
        p = int(rng.integers(2, 4))
        # GPipe, and 1F1B with no more microbatches than stages, peak either at a stage's
        # first backward pass or at the later ones beside the gradient sums.
        schedule, m = ("gpipe", 4) if trial % 3 == 2 else ("1f1b", (4, 2)[trial % 3])
        s = Setting(p, m, schedule, 1, "none", 0)
        _split_equals_enumeration(c, s, float(rng.uniform(15, 60)), trial)


def _split_equals_enumeration(c, s, limits, trial, rel=1e-6):
    """`split` finds a split that fits and is as fast as the fastest of every contiguous
    split that fits, or None if none does (c and limits: one, or one per stage)."""
    n = (c[0] if isinstance(c, list) else c).num_layers
    per_stage = limits if isinstance(limits, list) else [limits] * s.p

    def feasible(pieces):
        got = evaluate_split(c, s, pieces, lambda b: 0.0)
        ok = all(mem <= lim * (1 + 1e-9) for mem, lim in zip(got.stage_memory, per_stage))
        return got if ok else None

    best = None
    for cuts in itertools.combinations(range(1, n), s.p - 1):
        bounds = (0,) + cuts + (n,)
        got = feasible(list(zip(bounds, bounds[1:])))
        if got is not None and (best is None or max(got.stage_time) < best - 1e-12):
            best = max(got.stage_time)
    pieces = split(c, s, limits)
    if best is None:
        assert pieces is None, trial
        return
    assert pieces is not None, trial
    got = feasible(pieces)
    assert got is not None and max(got.stage_time) == pytest.approx(best, rel=rel), \
        (trial, max(got.stage_time), best)


@pytest.fixture(scope="module")
def gpt4():
    return make("gpt", layers=4, abstract=True)


def test_a_pinned_pipeline_is_planned_with_stages_schedule_and_bubble(gpt4):
    step = mp.auto_parallel(gpt4.train_step, cluster=mp.clusters.dgx_a100(nodes=1))
    c = mp.Constraints(pp=2, num_microbatches=4, schedule="gpipe")
    plan = step.plan(*gpt4.args, constraints=c, compare_baselines=False)
    assert len(plan.stages) == 2 and plan.pipeline.microbatches == 4
    assert plan.pipeline.schedule == "gpipe"
    # Contiguous layer ranges covering pre, the 4 blocks and post; disjoint device sets.
    assert plan.stages[0].layers[0] == 0 and plan.stages[-1].layers[1] == 6
    assert plan.stages[0].layers[1] == plan.stages[1].layers[0]
    ids = [set(s.device_ids) for s in plan.stages]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(8))
    parts = dict(plan.cost.breakdown)
    assert parts["bubble"] > 0 and parts["p2p"] > 0
    assert plan.device_ids.shape == (2,) + tuple(plan.mesh_shape)
    assert "2 stages, 4 microbatches, schedule gpipe" in plan.summary()
    back = mp.Plan.from_json(plan.to_json())
    assert back.stages == plan.stages and back.pipeline == plan.pipeline
    # A file whose stages do not hold the devices its device order gives them is refused.
    import json
    doc = json.loads(plan.to_json())
    doc["stages"][0]["device_ids"], doc["stages"][1]["device_ids"] = \
        doc["stages"][1]["device_ids"], doc["stages"][0]["device_ids"]
    with pytest.raises(ValueError, match="stage 0 lists devices"):
        mp.Plan.from_json(json.dumps(doc))
    doc = json.loads(plan.to_json())
    doc["device_order"] = doc["device_order"][:4]
    with pytest.raises(ValueError, match="not a permutation of the 8 device ids"):
        mp.Plan.from_json(json.dumps(doc))


def test_pipeline_constraints_are_checked_with_remedies():
    with pytest.raises(ValueError, match="choose one of"):
        mp.Constraints(pp=2, schedule="zigzag")
    with pytest.raises(ValueError, match="'none', 'full'"):
        mp.Constraints(remat="some")
    with pytest.raises(ValueError, match="interleaved"):
        mp.Constraints(pp=2, schedule="1f1b", virtual_stages=2)
    with pytest.raises(ValueError, match="pp=1"):
        mp.Constraints(pp=1, num_microbatches=4)
    with pytest.raises(ValueError, match="pp=1"):
        mp.Constraints(pp=1, remat="full")
    with pytest.raises(ValueError, match="virtual_stages >= 2"):
        mp.Constraints(schedule="interleaved", virtual_stages=1)
    with pytest.raises(ValueError, match="multiple of pp"):
        mp.Constraints(pp=2, schedule="interleaved", num_microbatches=3)
    with pytest.raises(ValueError, match="unpipelined mesh"):
        mp.Constraints(pp=2, mesh_shape=(8,))
    # Pipeline settings without pp on one node (stages must then be whole nodes): refused
    # with the remedy, not ignored by an unpipelined plan.
    ex = make("gpt", layers=4)
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    for c in (mp.Constraints(remat="full"), mp.Constraints(num_microbatches=4)):
        with pytest.raises(ValueError, match="to pipelines only.*pin pp"):
            step.plan(*ex.args, constraints=c, compare_baselines=False)
    # The 4-block GPT has 6 layers: 8 stages would not fit it either.
    with pytest.raises(ValueError, match=r"pp among \[2, 4\]\)"):
        step.plan(*ex.args, constraints=mp.Constraints(pp=3), compare_baselines=False)
    with pytest.raises(ValueError, match=r"pp among \[2\]\)"):
        step.plan(*ex.args, constraints=mp.Constraints(pp=8, tp=4), compare_baselines=False)
    # Trivial pipeline settings with pp=1 still plan the unpipelined mesh.
    assert not step.plan(*ex.args, constraints=mp.Constraints(pp=1, num_microbatches=1),
                         compare_baselines=False).stages
    # More stage chunks than layers: said as such, not as "nothing fits in memory".
    from meshplan.planner._search import pipeline_degrees
    pinned = mp.Constraints(pp=4, schedule="interleaved", virtual_stages=2)
    with pytest.raises(ValueError, match="8 stage chunks, more than the 6 layers"):
        pipeline_degrees(8, 6, pinned, 8)
    assert pipeline_degrees(8, 8, pinned, 8) == [4]


def test_a_pinned_pp_that_cannot_be_met_is_refused_before_any_ilp(monkeypatch):
    """The baselines' ILPs are solved beside the meshes'; a pinned pipeline is checked
    first, so its error does not wait for them."""
    import meshplan.planner._search as search

    ex = make("gpt", layers=4)
    solved = []
    real = search.solve_candidate
    monkeypatch.setattr(search, "solve_candidate",
                        lambda *a, **k: solved.append(1) or real(*a, **k))
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    with pytest.raises(ValueError, match=r"pp among \[2, 4\]\)"):
        step.plan(*ex.args, constraints=mp.Constraints(pp=3))  # baselines compared too
    assert solved == []
    step.plan(*ex.args, constraints=mp.Constraints(pp=2))
    assert solved  # the same search with a pp that fits solves ILPs


def test_when_nothing_fits_the_error_names_the_smallest_memory_that_would(gpt4):
    step = mp.auto_parallel(gpt4.train_step, cluster=mp.clusters.dgx_a100(nodes=1),
                            memory_limit=1e5)
    with pytest.raises(MemoryError, match=r"smallest found needs [0-9.]+ (GiB|MiB)"):
        step.plan(*gpt4.args, compare_baselines=False)


@pytest.mark.parametrize("rebuilt", [0.0, 20.0])
def test_per_layer_recomputation_fills_the_memory_between_none_and_full(rebuilt):
    from meshplan.planner._pipe import best_pipeline, selective

    c = _uniform(n_blocks=6, fwd=1.0, saved=10.0, held=5.0)
    # Residuals a kept layer's backward rebuilds count only while it is kept.
    c = dataclasses.replace(c, rebuilt=np.full(c.num_layers, rebuilt))
    s = Setting(2, 4, "1f1b", 1, "full", 0)
    pieces = split(c, s, limit=math.inf)
    mem = lambda remat, **kw: evaluate_split(c, dataclasses.replace(s, remat=remat, **kw),
                                             pieces, lambda b: 0.0)
    none, full = mem("none"), mem("full")
    limit = (none.peak_memory + full.peak_memory) / 2  # room for some activations
    got = selective(c, s, pieces, limit)
    assert got is not None and 0 < sum(got.recompute) < c.num_layers
    some = evaluate_split(c, got, pieces, lambda b: 0.0)
    assert some.peak_memory <= limit
    assert none.step_time < some.step_time < full.step_time
    # Nothing to gain when everything fits, or when nothing but full recomputation fits.
    assert selective(c, s, pieces, none.peak_memory) is None
    assert selective(c, s, pieces, full.peak_memory) is None
    # The search takes it when "none" does not fit and it beats "full".
    best = best_pipeline(c, 2, limit, lambda b: 0.0, schedules=("1f1b",),
                         remats=("none", "full", "layers"), zeros=(0,), microbatches=4)
    assert best.remat == "layers" and best.step_time < full.step_time


def test_the_stage_search_stops_after_stage_counts_that_only_got_slower():
    """With patience k, the search tries stage counts in increasing order and stops after k
    in a row whose best fitting plan is no faster than the best before and does not trade
    speed for memory; None tries all."""
    ex = make("gpt", layers=16, abstract=True)
    cluster = mp.clusters.dgx_a100(nodes=16)  # stage counts 2, 4, 8, 16 (whole nodes)

    def search(patience):
        said = []
        step = mp.auto_parallel(ex.train_step, cluster=cluster, stage_patience=patience)
        plan = step.plan(*ex.args, compare_baselines=False, progress=said.append)
        # stage count -> (ms, memory-bound) of its fastest fitting plan, as reported
        best: dict[int, tuple[float, bool]] = {}
        for m in said:
            if m.startswith("pp") and " ms (" in m:
                p = int(m.split()[0][2:])
                ms = float(m.split(" ms (")[0].split()[-1])
                bound = "remat=none" not in m or "ZeRO-3" in m
                best[p] = min(best.get(p, (math.inf, False)), (ms, bound))
        counts = sorted({int(m.split()[0][2:]) for m in said
                         if m.startswith("pp") and "not tried" not in m})
        return counts, best, plan, said

    every, best_all, full, _ = search(None)
    assert every == [2, 4, 8, 16]
    tried, best, short, said = search(1)
    assert tried == every[:len(tried)]
    # It stopped exactly after the first count no faster than all the counts before it
    # (one that fits only by recomputing or by ZeRO-3 is passed over).
    fastest = math.inf
    for k, p in enumerate(tried):
        ms, bound = best.get(p, (math.inf, True))
        slower = ms >= fastest and not bound
        assert slower == (k == len(tried) - 1 and len(tried) < len(every)), (p, best)
        fastest = min(fastest, ms)
    assert len(tried) < len(every) and any("not tried" in m for m in said)
    # This model's fastest pipeline is among the counts tried, so nothing was lost.
    assert min(best_all.values())[0] == pytest.approx(min(best.values())[0])
    assert short.cost.step_time == pytest.approx(full.cost.step_time)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="stage_patience"):
            mp.auto_parallel(ex.train_step, stage_patience=bad)


def _pipe_choice(step_time: float, remat: str = "none", zero: int = 1) -> PipelineChoice:
    return PipelineChoice(stages=((0, 1),), microbatches=1, schedule="1f1b", virtual_stages=1,
                          remat=remat, zero=zero, step_time=step_time, bubble=0.0, p2p=0.0,
                          step_work=0.0, p2p_bytes=0.0, stage_memory=(0.0,),
                          stage_time=(0.0,))


def test_stage_counts_that_fit_only_by_trading_speed_for_memory_do_not_end_the_search():
    """A slower stage count counts toward the patience only if its best plan neither
    recomputes nor uses ZeRO-3 (the counts below: GPT 1T on 3072 GPUs under a slightly
    smaller activation estimate, where 2 stages fit only with ZeRO-3, 3 and 4 were slower
    still, and 32 stages without ZeRO-3 took 95 s)."""
    count = lambda runs, c=mp.Constraints(): functools.reduce(
        lambda acc, pipe: _patience_count(*acc, pipe, c), runs, (0, math.inf))
    assert count([_pipe_choice(174.0, "layers", 3), _pipe_choice(182.0, "layers", 3),
                  _pipe_choice(180.0, "none", 3)]) == (0, 174.0)
    assert count([_pipe_choice(174.0, "layers", 3), _pipe_choice(182.0, "full", 1)]) \
        == (0, 174.0)
    # An unpressed slower count counts; nothing fitting (None) neither counts nor resets.
    assert count([_pipe_choice(20.0), _pipe_choice(21.0), None, _pipe_choice(20.0)]) \
        == (2, 20.0)
    # Recomputation or ZeRO-3 pinned by the constraints was not chosen for memory: counts.
    assert count([_pipe_choice(174.0, "full", 3), _pipe_choice(182.0, "full", 3)],
                 mp.Constraints(remat="full", zero=3)) == (1, 174.0)
    assert count([_pipe_choice(174.0, "full", 1), _pipe_choice(182.0, "full", 1)],
                 mp.Constraints(remat="full")) == (1, 174.0)
    assert count([_pipe_choice(174.0, "full", 3), _pipe_choice(182.0, "full", 3)],
                 mp.Constraints(remat="full")) == (0, 174.0)  # ZeRO-3 chosen: passed over
    # A faster count, pressed or not, is the new best and starts the row again.
    assert count([_pipe_choice(20.0), _pipe_choice(21.0), _pipe_choice(19.0, "layers", 3)]) \
        == (0, 19.0)


def test_update_ops_run_in_the_layer_of_their_weight_when_the_gradient_is_clipped():
    """With optax.clip_by_global_norm, a block's gradient is scaled by a scalar made from
    every layer (and optax adds the squares of zero imaginary parts): each update op whose
    result has a block weight's shape still belongs to a block, never to the embedding's
    layer 0 (its stage would compute it and send it on)."""
    import optax

    tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.1))
    ex = make("gpt", layers=4, tx=tx)
    t = mp.auto_parallel(ex.train_step).trace(*ex.args)
    view = build_view(t.graph, t.pairs)
    layers = find_layers(view, t.pairs)
    # The weight matrices' shapes (a vector's gradient, such as the first LayerNorm's
    # bias, can be summed in layer 0's backward pass).
    block_shapes = {np.shape(x) for x in jax.tree.leaves(ex.args[0]["blocks"][0])
                    if np.ndim(x) >= 2}
    block_shapes -= {np.shape(x) for x in jax.tree.leaves({k: v for k, v in ex.args[0].items()
                                                           if k != "blocks"})}
    where = [layers.op_layer[op.id] for op in view.ops if layers.op_pass.get(op.id) == "step"
             and any(view.values[v].shape in block_shapes for v in op.outputs)]
    assert where and all(1 <= l <= 4 for l in where), sorted(set(where))


def test_pinned_pipeline_that_does_not_fit_says_how_much_memory_it_needs():
    # With pp pinned and nothing fitting, the error names, per stage mesh tried, the least
    # memory a pipeline found needs, so the user knows how far off the limit is. It is
    # more than the limit, and a limit that large then plans.
    ex = make("gpt", layers=4)
    limit = 2e5
    step = mp.auto_parallel(ex.train_step, memory_limit=limit, time_limit=2,
                            constraints=mp.Constraints(pp=2))
    with pytest.raises(ValueError, match="least memory found") as err:
        step.plan(*ex.args, compare_baselines=False)
    found = [float(x) * {"MiB": 2**20, "GiB": 2**30}[u] for x, u in
             re.findall(r"least memory found: ([\d.]+) (MiB|GiB)", str(err.value))]
    assert found and min(found) > limit
    assert "raise memory_limit" in str(err.value)
    roomy = mp.auto_parallel(ex.train_step, memory_limit=min(found) * 1.02, time_limit=2,
                             constraints=mp.Constraints(pp=2))
    plan = roomy.plan(*ex.args, compare_baselines=False)
    assert plan.stages and plan.cost.peak_memory <= min(found) * 1.02


@pytest.mark.parametrize("name", ["gpt", "gpt_scan"])
def test_layer_temporaries_are_the_most_bytes_live_at_once_inside_one_pass(name):
    """The event sweep of `_TransientIndex` against a phase-by-phase count: per (layer,
    pass), the values made there and last read before the pass ends, live together."""
    from meshplan.planner._memory import liveness
    from meshplan.planner._pipe import _make_transient_index

    _, _, view, pairs = _view(name, layers=3)
    layers = find_layers(view, pairs)
    live = liveness(view)
    index = _make_transient_index(view, layers, live)
    rng = np.random.default_rng(0)
    sizes = rng.uniform(1.0, 100.0, len(index.values))  # any per-value sizes
    got = index.peaks(sizes)

    span, made_in = {}, {}
    for k, op in enumerate(view.ops):
        phase = layers.op_pass.get(op.id, "step")
        if phase != "step" and live.op_first[k] >= 0:
            g = (layers.op_layer.get(op.id, 0), phase)
            lo, hi = span.get(g, (math.inf, -1))
            span[g] = (min(lo, 2 * live.op_first[k]), max(hi, 2 * live.op_last[k] + 1))
            made_in.update((v, g) for v in op.outputs)
    size_of = dict(zip(index.values, sizes))
    expect = {}
    for v, a, b, out in zip(live.temps, live.start, live.end, live.is_out):
        g = made_in.get(v)
        if g is None or out or b > span[g][1]:
            continue
        assert v in size_of
        curve = expect.setdefault(g, np.zeros(span[g][1] + 2))
        curve[a:b + 1] += size_of[v]
    assert len(expect) == len(got) > 3
    want = [expect[g].max() for g in sorted(expect)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert list(index.layer) == [g[0] for g in sorted(expect)]


@pytest.mark.parametrize("name", ["gpt_scan", "transformer_scan"])
def test_a_scan_saves_exactly_the_residuals_jax_stacks_for_its_backward(name):
    """A scanned block's saved activations are the forward scan's stacked outputs, read
    back by the backward scan: counted from JAX's own jaxpr, their bytes per trip equal
    the planner's (derivative factors JAX computes in the forward body included, body
    values used up inside their trip excluded)."""
    from meshplan.planner._memory import liveness
    from meshplan.planner._pipe import _make_activation_index

    ex, _, view, pairs = _view(name, layers=4)
    layers = find_layers(view, pairs)
    index = _make_activation_index(view, layers, liveness(view))
    body = index.saved.layer == SPREAD
    planned = float((index.saved.nbytes[body] * index.saved.copies[body]).sum())

    def scans(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "scan":
                yield e
            for p in e.params.values():
                sub = getattr(p, "jaxpr", p)
                if hasattr(sub, "eqns"):
                    yield from scans(sub)

    forward, backward = list(scans(jax.make_jaxpr(ex.train_step)(*ex.args).jaxpr))[:2]
    read_back = {id(v) for v in backward.invars}
    ys = forward.outvars[forward.params["num_carry"]:]
    jax_bytes = sum(v.aval.size * v.aval.dtype.itemsize for v in ys if id(v) in read_back)
    assert len(ys) > 20 and planned == pytest.approx(jax_bytes, rel=1e-9)


def test_split_on_unlike_stages_equals_brute_force():
    """Stages on unlike devices (each its own layer times and memory room): the split
    is the memory-feasible one with the fastest slowest stage, as enumeration finds. A
    fill from the left can get stuck where one layer does not fit the next stage, though
    another cut before it would have worked."""
    rng = np.random.default_rng(3)
    for trial in range(160):
        base = _uniform(int(rng.integers(2, 6)))
        n = base.num_layers
        p = int(rng.integers(2, 5))
        schedule, m = ("gpipe", 4) if trial % 3 == 2 else ("1f1b", (4, 2)[trial % 3])
        # Full recomputation on every fourth: a layer's working set then holds its saved
        # activations too, so working sets differ between layers.
        s = Setting(p, m, schedule, 1, "full" if trial % 4 == 3 else "none", 0)
        stages = []
        for _ in range(p):
            t = rng.uniform(0.2, 3.0, n) * rng.uniform(0.5, 2.0)  # this device's speed
            stages.append(dataclasses.replace(base, forward=t, backward=2 * t,
                                              weights=rng.uniform(1.0, 10.0, n) / 2,
                                              saved=rng.uniform(0.0, 30.0, n),
                                              transient=rng.uniform(0.0, 10.0, n),
                                              rebuilt=rng.uniform(0.0, 8.0, n)))
        limits = [float(x) for x in rng.uniform(15, 60, p)]
        _split_equals_enumeration(stages, s, limits, trial, rel=1e-5)


def test_a_very_slow_stage_does_not_stop_the_bisection_short():
    """The bisection starts at the slowest stage's whole total; it runs to 1e-6 of the
    answer however far above that start is (30 halvings from 1e9 stopped at 4.0)."""
    base = _uniform(3)  # 5 layers

    def stage(times):
        t = np.array(times, dtype=float)
        return dataclasses.replace(base, forward=t / 3, backward=2 * t / 3)

    fast, slow = stage([1, 1, 1, 1e-5, 0]), stage([1e9, 1e9, 1e9, 1, 1.0002])
    s = Setting(2, 1, "1f1b", 1, "none", 0)
    pieces = split([fast, slow], s, math.inf)
    assert pieces == [(0, 3), (3, 5)]
    got = evaluate_split([fast, slow], s, pieces, lambda b: 0.0)
    assert max(got.stage_time) == pytest.approx(3.0, rel=1e-6)


def test_a_fill_stuck_on_alike_stages_under_1f1b_finds_the_split():
    """Alike stages differ in room: under 1F1B stage i holds p - i microbatches. The fill
    gives stage 0 two layers, and then stage 1 cannot hold layer 2's activations; giving
    stage 0 one layer lets layer 2 go to stage 2, which holds one microbatch."""
    z = np.zeros(4)
    c = dataclasses.replace(_uniform(2), weights=z, inputs=z, saved=np.array([0, 0, 30.0, 0]))
    s = Setting(3, 3, "1f1b", 1, "none", 0)
    pieces = split(c, s, 10.5)
    assert pieces == [(0, 1), (1, 2), (2, 4)]
    assert max(evaluate_split(c, s, pieces, lambda b: 0.0).stage_memory) <= 10.5


def test_a_stage_is_charged_the_working_set_of_its_own_layers():
    """Under full recomputation a layer's working set holds its saved activations: a
    stage holds the largest of its own layers', not of the whole model's."""
    z = np.zeros(4)
    c = dataclasses.replace(_uniform(2), weights=z, inputs=z, saved=np.array([100.0, 0, 0, 0]))
    s = Setting(2, 1, "1f1b", 1, "full", 0)
    pieces = split(c, s, [200.0, 50.0])
    assert pieces == [(0, 2), (2, 4)]  # even halves: stage 1 does not hold layer 0
    got = evaluate_split(c, s, pieces, lambda b: 0.0)
    assert got.stage_memory[0] <= 200.0 and got.stage_memory[1] <= 50.0


def test_reach_within_room_equals_a_scan():
    """`_reach`: the furthest cut whose memory plus the largest working set among its
    layers fits, as a scan over every cut finds (records of larger working sets in
    between, ties, and rooms too small for the first layer)."""
    from meshplan.planner._pipe import _next_larger, _reach
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        mem = np.concatenate([[0.0], np.cumsum(rng.integers(0, 4, n))]).tolist()
        work = rng.integers(0, 6, n).astype(float).tolist()
        room = float(rng.integers(0, 14))
        for a in range(n + 1):
            for end in range(a, n + 1):
                want = max([b for b in range(a + 1, end + 1)
                            if mem[b] <= mem[a] + (room - max(work[a:b]))], default=a)
                assert _reach(mem, room, (work, _next_larger(work)), a, end) == want


def _threaded_search(workers, layers=4):
    """A pipelined 4-node search's plan (solver timings aside), alternatives, baselines
    and progress messages (their solve seconds aside)."""
    ex = make("gpt", layers=layers, abstract=True)
    said = []
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(nodes=4),
                            workers=workers)
    plan = step.plan(*ex.args, progress=said.append)
    doc = json.loads(plan.to_json())
    doc.pop("solver")
    return (doc, [repr(a) for a in plan.alternatives + plan.baselines],
            [re.sub(r", [0-9.]+ s\)", ")", m) for m in said])


def test_solving_candidates_in_threads_gives_the_plan_of_one_at_a_time():
    """Meshes' and stage meshes' ILPs solved two at a time (threads) give the same plan,
    alternatives, baselines and progress messages, in the same order, as one at a time."""
    one, two = _threaded_search(1), _threaded_search(2)
    assert any(m.startswith("pp") for m in one[2])  # pipelines were searched too
    assert two == one
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="workers"):
            mp.auto_parallel(make("mlp").train_step, workers=bad)


def test_a_solve_cut_short_beside_others_is_solved_again_alone(monkeypatch):
    """Solves side by side take longer, and time limits are wall-clock: a solve that runs
    out beside others is solved again with nothing else running, so the plan is still the
    one-at-a-time plan. Here every solve run in a worker thread 'runs out' (answers with
    the greedy plan, status GREEDY)."""
    import meshplan.planner._ilp as ilp
    import meshplan.planner._search as search

    one = _threaded_search(1)
    real = search.solve

    def out_of_time_in_threads(problem, rows=(), time_limit=10.0):
        result = real(problem, rows, time_limit)
        if threading.current_thread() is threading.main_thread():
            return result
        choice = ilp.greedy(problem)
        return dataclasses.replace(result, choice=choice, status="GREEDY",
                                   objective=ilp.model_objective(problem, choice))

    monkeypatch.setattr(search, "solve", out_of_time_in_threads)
    assert _threaded_search(2) == one


def test_concurrent_results_keep_the_order_of_the_calls_and_raise_their_errors():
    def call(k, pause):
        time.sleep(pause)
        if k == "bad":
            raise RuntimeError("call failed")
        return types.SimpleNamespace(k=k, cut_short=False)

    before = threading.active_count()
    calls = [functools.partial(call, k, pause) for k, pause in
             enumerate([0.05, 0.0, 0.03, 0.0])]
    assert [r.k for r in _concurrently(calls, 3)] == [0, 1, 2, 3]
    assert [r.k for r in _concurrently(calls, 1)] == [0, 1, 2, 3]
    got = []
    with pytest.raises(RuntimeError, match="call failed"):
        for x in _concurrently(calls[:2] + [functools.partial(call, "bad", 0.01)], 2):
            got.append(x.k)
    assert got == [0, 1]
    # A consumer that stops early (closing the generator) joins the pool too.
    gen = _concurrently(calls, 2)
    assert next(gen).k == 0
    gen.close()
    assert threading.active_count() == before  # every pool was joined


def test_concurrent_calls_cut_short_run_again_with_nothing_else_running():
    """From the first result cut short on, each result cut short is recomputed alone."""
    running, runs = [0], []
    lock = threading.Lock()

    def call(k):
        with lock:
            running[0] += 1
        time.sleep(0.05)
        with lock:
            crowded = running[0] > 1
            running[0] -= 1
        runs.append(k)
        # Calls 1 and 3 "run out of time" whenever another call runs beside them.
        return types.SimpleNamespace(k=k, alone=not crowded, cut_short=crowded and k in (1, 3))

    got = list(_concurrently([functools.partial(call, k) for k in range(5)], 2))
    assert [r.k for r in got] == list(range(5))
    assert got[1].alone and got[3].alone and not any(r.cut_short for r in got)
    assert runs.count(1) == 2 and runs.count(0) == 1
