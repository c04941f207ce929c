"""Pipelines: schedules (costmodel.pipeline_time), the stage split DP (planner._stages) and
pipelined execution of a scan over layers on 8 CPU devices (runtime.pipeline_scan)."""
import doctest
import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshplan.costmodel import in_flight, in_flight_with_gradients, pipeline_time
from meshplan.planner._stages import split_stages
from meshplan.runtime import measure, pipeline_scan
from meshplan.runtime._pipeline import pipeline_value_and_grad, schedule_table


# ----------------------------------------------------------------------- schedule formulas

@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 32)])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bubble_is_p_minus_1_over_m(schedule, p, m):
    t = pipeline_time([0.3] * p, [0.7] * p, microbatches=m, schedule=schedule)
    assert t.bubble_fraction == pytest.approx((p - 1) / m)
    assert t.step_time == pytest.approx((m + p - 1) * 1.0)  # Megatron: (m + p - 1)(t_f + t_b)


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (4, 4, 16), (8, 3, 24)])
def test_interleaved_bubble_is_p_minus_1_over_v_m(p, v, m):
    t = pipeline_time([1.0] * p, [2.0] * p, microbatches=m, schedule="interleaved",
                      virtual_stages=v)
    assert t.bubble_fraction == pytest.approx((p - 1) / (v * m))
    assert t.hops_per_microbatch == v  # v times the point-to-point traffic
    plain = pipeline_time([1.0] * p, [2.0] * p, microbatches=m, schedule="1f1b")
    assert t.step_time < plain.step_time


@pytest.mark.parametrize("p, m", [(2, 1), (4, 2), (4, 4), (4, 64), (8, 7)])
def test_in_flight_activations(p, m):
    gpipe = pipeline_time([1.0] * p, [1.0] * p, m, "gpipe").in_flight
    one_f_one_b = pipeline_time([1.0] * p, [1.0] * p, m, "1f1b").in_flight
    assert gpipe == (m,) * p  # every forward runs before any backward
    assert max(one_f_one_b) <= p and max(one_f_one_b) <= m
    assert one_f_one_b[0] == min(p, m)  # the first stage waits longest for its backward
    assert list(one_f_one_b) == sorted(one_f_one_b, reverse=True)


def test_gpipe_runs_a_forward_then_a_backward_pipeline():
    # Stage 1 is slowest forward, stage 0 backward: 1F1B overlaps them, GPipe cannot.
    gpipe = pipeline_time([1.0, 3.0], [3.0, 1.0], microbatches=4, schedule="gpipe")
    one_f_one_b = pipeline_time([1.0, 3.0], [3.0, 1.0], microbatches=4, schedule="1f1b")
    assert gpipe.step_time == (1 + 3 + 3 * 3) + (3 + 1 + 3 * 3)
    assert one_f_one_b.step_time == 8 + 3 * 4
    assert gpipe.step_time > one_f_one_b.step_time


def test_interleaving_one_chunk_is_1f1b():
    assert in_flight(4, 8, "interleaved", 1) == in_flight(4, 8, "1f1b")
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        in_flight(4, 8, "zero-bubble")


def test_uneven_stages_wait_for_the_slowest():
    t = pipeline_time([1.0, 3.0], [1.0, 3.0], microbatches=4, schedule="1f1b")
    assert t.ideal == 4 * 6.0
    assert t.step_time == 2.0 + 6.0 + 3 * 6.0  # sum of stages + (m - 1) * slowest


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="zero-bubble"), "unknown pipeline schedule"),
    (dict(schedule="interleaved", virtual_stages=2, microbatches=6), "divisible by the 4"),
    (dict(schedule="1f1b", virtual_stages=2), "needs schedule='interleaved'"),
    (dict(microbatches=0), "positive integer"),
])
def test_bad_schedules_are_refused(kwargs, match):
    args = dict(forward=[1.0] * 4, backward=[1.0] * 4, microbatches=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipeline_time(**args)


# ----------------------------------------------------------------------------- stage DP

def _brute_force(num_layers, num_devices, cost, m, sizes, num_stages=None):
    """Every split into contiguous ranges with every size assignment."""
    best = None
    for cuts in range(num_layers):
        for bounds in itertools.combinations(range(1, num_layers), cuts):
            edges = (0,) + bounds + (num_layers,)
            ranges = list(zip(edges, edges[1:]))
            if num_stages is not None and len(ranges) != num_stages:
                continue
            for devs in itertools.product(sizes, repeat=len(ranges)):
                if sum(devs) != num_devices:
                    continue
                times = [cost(a, b, n) for (a, b), n in zip(ranges, devs)]
                if any(t is None for t in times):
                    continue
                step = sum(times) + (m - 1) * max(times)
                best = step if best is None else min(best, step)
    return best


def _random_cost(rng, num_layers, memory_cap=None):
    layer = [rng.uniform(0.5, 2.0) for _ in range(num_layers)]
    comm = rng.uniform(0.0, 0.3)

    def cost(first, last, n):
        if memory_cap is not None and (last - first) / n > memory_cap:
            return None  # too many layers per device: does not fit
        return sum(layer[first:last]) / n + comm * (n - 1)

    return cost


@pytest.mark.parametrize("seed", range(12))
def test_split_matches_brute_force(seed):
    rng = random.Random(seed)
    layers, devices = rng.randint(2, 6), rng.choice([2, 3, 4])
    m = rng.choice([1, 2, 4, 8])
    sizes = (1, 2) if devices < 4 else (1, 2, 4)
    cap = rng.choice([None, 2.0])
    cost = _random_cost(rng, layers, cap)
    pinned = rng.choice([None, min(2, layers, devices)])
    want = _brute_force(layers, devices, cost, m, sizes, pinned)
    if want is None:
        with pytest.raises(ValueError, match="no split"):
            split_stages(layers, devices, cost, m, sizes, pinned)
        return
    got = split_stages(layers, devices, cost, m, sizes, pinned)
    assert got.step_time == pytest.approx(want)
    # The split is a real one: contiguous, covering, using every device.
    assert got.stages[0].layers[0] == 0 and got.stages[-1].layers[1] == layers
    assert all(a.layers[1] == b.layers[0] for a, b in zip(got.stages, got.stages[1:]))
    assert sum(s.devices for s in got.stages) == devices


def test_a_heavier_embedding_layer_gets_a_lighter_stage():
    # Layer 0 (embedding + loss head) weighs three ordinary layers; 4 stages of 1 device.
    layer = [3.0] + [1.0] * 11
    cost = lambda a, b, n: sum(layer[a:b]) / n  # noqa: E731
    split = split_stages(12, 4, cost, microbatches=16, submesh_sizes=(1,), num_stages=4)
    counts = [s.layers[1] - s.layers[0] for s in split.stages]
    assert counts[0] < max(counts[1:])
    assert split.slowest == pytest.approx(4.0)  # 14 units over 4 whole-layer stages


def test_nothing_fits_says_so():
    with pytest.raises(ValueError, match="no split of 4 layers over 2 devices"):
        split_stages(4, 2, lambda a, b, n: None, microbatches=4, submesh_sizes=(1, 2))


def test_docstring_example():
    from meshplan.planner import _stages
    result = doctest.testmod(_stages)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------- pipelined execution

def _mesh(dp: int, pp: int):
    devices = np.array(jax.devices()[:dp * pp]).reshape(dp, pp)
    return jax.sharding.Mesh(devices, ("dp", "pp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _layer(h, w):
    kernel, bias = w
    return jnp.tanh(h @ kernel + bias)


@pytest.fixture(scope="module")
def stack():
    k = jax.random.split(jax.random.key(0), 4)
    params = (jax.random.normal(k[0], (8, 16, 16)) * 0.3,  # 8 layers
              jax.random.normal(k[1], (8, 16)) * 0.1)
    return params, jax.random.normal(k[2], (32, 16)), jax.random.normal(k[3], (32, 16))


def _loss(run):
    def loss(params, x, target):
        return jnp.mean((run(params, x) - target) ** 2)
    return loss


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("pp, dp, m", [(2, 1, 1), (2, 1, 4), (4, 1, 2), (4, 2, 4), (2, 4, 2),
                                       (8, 1, 8)])
def test_pipelined_scan_equals_the_plain_scan(stack, pp, dp, m):
    params, x, target = stack
    plain = _loss(lambda w, h: jax.lax.scan(lambda c, l: (_layer(c, l), None), h, w)[0])
    mesh = _mesh(dp, pp)
    piped = _loss(lambda w, h: pipeline_scan(_layer, w, h, mesh=mesh, microbatches=m,
                                             batch_axis="dp" if dp > 1 else None))
    want_loss, want_grads = jax.value_and_grad(plain)(params, x, target)
    loss, grads = jax.jit(jax.value_and_grad(piped))(params, x, target)
    assert _rel(loss, want_loss) < 1e-5
    for g, want in zip(grads, want_grads):
        assert _rel(g, want) < 1e-5


def test_stages_hand_microbatches_over_the_stage_links(stack):
    # One collective-permute of a microbatch per tick, m + p - 1 ticks (fill and drain).
    params, x, _ = stack
    pp, m = 4, 4
    mesh = _mesh(1, pp)
    run = jax.jit(lambda w, h: pipeline_scan(_layer, w, h, mesh=mesh, microbatches=m))
    sends = [c for c in measure(run.lower(params, x).compile()).collectives
             if c.kind == "collective-permute"]
    assert len(sends) == 1
    assert sends[0].nbytes == x.shape[0] // m * x.shape[1] * 4
    assert sends[0].count == m + pp - 1


@pytest.mark.parametrize("layers, batch, m, match", [
    (6, 32, 2, "do not split into 4 equal stages"),
    (8, 30, 4, "not divisible by 4 microbatches"),
])
def test_pipelined_scan_refuses_uneven_splits(layers, batch, m, match):
    params = (jnp.zeros((layers, 16, 16)), jnp.zeros((layers, 16)))
    with pytest.raises(ValueError, match=match):
        pipeline_scan(_layer, params, jnp.zeros((batch, 16)), mesh=_mesh(1, 4), microbatches=m)


def test_bubble_ticks_do_not_leak_nan_into_gradients():
    # An eps-free RMS norm has no derivative at 0: bubble ticks must not compute on zeros.
    def rms_layer(h, w):
        return (h / jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))) @ w

    w = jax.random.normal(jax.random.key(1), (4, 16, 16))
    x = jax.random.normal(jax.random.key(2), (8, 16))
    plain = jax.grad(lambda w: jnp.sum(jax.lax.scan(lambda c, l: (rms_layer(c, l), None),
                                                    x, w)[0]))(w)
    mesh = _mesh(1, 4)
    piped = jax.jit(jax.grad(lambda w: jnp.sum(
        pipeline_scan(rms_layer, w, x, mesh=mesh, microbatches=2))))(w)
    assert bool(jnp.all(jnp.isfinite(piped)))
    assert _rel(piped, plain) < 1e-5


@pytest.mark.parametrize("schedule, m, v, match", [
    ("interleaved", 5, 2, "divisible by the 4"),
    ("1f1b", 4, 2, "virtual_stages=2"),
    ("interleaved", 4, 0, "virtual_stages=0"),
])
def test_schedule_tables_refuse_what_the_cost_model_refuses(schedule, m, v, match):
    with pytest.raises(ValueError, match=match):
        schedule_table(4, m, schedule, v)


def test_pipelined_scan_needs_the_stage_axis():
    with pytest.raises(ValueError, match="pipeline axis 'stages' is not"):
        pipeline_scan(_layer, (jnp.zeros((4, 16, 16)), jnp.zeros((4, 16))), jnp.zeros((8, 16)),
                      mesh=_mesh(1, 2), axis="stages")


def test_runtime_docstring_example():
    from meshplan.runtime import _pipeline
    result = doctest.testmod(_pipeline)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------- schedules run op by op

def _table_in_flight(table, p, v, after_first_backward=False):
    """Per device, the most microbatch-chunks forwarded and not yet backwarded, / v (with
    `after_first_backward`: at a backward after the device's first, when its gradient
    sums exist)."""
    peaks = []
    for s in range(p):
        live, peak, backwards = set(), 0, 0
        for kind, i, c in table[:, s]:
            if kind == 1:
                live.add((i, c))
            if not after_first_backward or (kind == 2 and backwards > 0):
                peak = max(peak, len(live))
            if kind == 2:
                live.discard((i, c))
                backwards += 1
        peaks.append(peak / v)
    return tuple(peaks)


@pytest.mark.parametrize("schedule, p, m, v", [
    ("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("1f1b", 2, 5, 1),
    ("1f1b", 3, 1, 1), ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 2),
    ("interleaved", 4, 4, 3)])
def test_schedule_tables_agree_with_the_cost_model(schedule, p, m, v):
    table = schedule_table(p, m, schedule, v)
    ops = {(s, int(k), int(i), int(c)) for row in table for s, (k, i, c) in enumerate(row) if k}
    assert len(ops) == 2 * m * v * p  # every forward and backward of every chunk, once
    # Memory: the activations each device keeps, as the cost model counts them.
    assert _table_in_flight(table, p, v) == in_flight(p, m, schedule, v)
    assert _table_in_flight(table, p, v, after_first_backward=True) == \
        in_flight_with_gradients(p, m, schedule, v)
    # Time, with every op (a chunk's forward or backward) one slot: the bubble is the
    # cost model's (p - 1) / m, or (p - 1) / (v m) interleaved.
    full_ops = len(table) / v  # slots in units of a whole stage's op
    bubble = (full_ops - 2 * m) / (2 * m)
    model = pipeline_time([1.0] * p, [1.0] * p, m, schedule, v)
    assert bubble == pytest.approx(model.bubble_fraction)


@pytest.mark.parametrize("schedule, pp, dp, m, v", [
    ("gpipe", 2, 1, 2, 1), ("gpipe", 4, 2, 8, 1), ("1f1b", 2, 4, 2, 1), ("1f1b", 4, 1, 4, 1),
    ("1f1b", 4, 2, 4, 1), ("1f1b", 2, 1, 8, 1), ("interleaved", 2, 2, 4, 2),
    ("interleaved", 4, 1, 4, 2), ("interleaved", 2, 1, 8, 2)])
def test_each_schedule_gives_the_unpipelined_loss_and_gradient(stack, schedule, pp, dp, m, v):
    params, x, target = stack
    loss = lambda out, t: jnp.mean((out - t) ** 2)  # noqa: E731
    want_loss, want_grads = jax.value_and_grad(_loss(
        lambda w, h: jax.lax.scan(lambda c, l: (_layer(c, l), None), h, w)[0]))(params, x,
                                                                               target)
    mesh = _mesh(dp, pp)
    run = jax.jit(lambda w: pipeline_value_and_grad(
        _layer, loss, w, x, target, mesh=mesh, microbatches=m, schedule=schedule,
        virtual_stages=v, batch_axis="dp" if dp > 1 else None))
    got_loss, got_grads = run(params)
    assert _rel(got_loss, want_loss) < 1e-5
    for g, want in zip(got_grads, want_grads):
        assert _rel(g, want) < 1e-5


def test_1f1b_keeps_fewer_microbatches_than_gpipe():
    # Ring buffers sized by the schedule: 1F1B holds about p microbatches, GPipe all m.
    p, m, rows, width = 4, 16, 256, 64
    params = (jnp.full((8, width, width), 0.01), jnp.zeros((8, width)))
    x, target = jnp.ones((rows, width)), jnp.zeros((rows, width))
    loss = lambda out, t: jnp.mean((out - t) ** 2)  # noqa: E731
    mesh = _mesh(1, p)
    temp = {}
    for schedule in ("gpipe", "1f1b"):
        run = jax.jit(lambda w: pipeline_value_and_grad(_layer, loss, w, x, target, mesh=mesh,
                                                        microbatches=m, schedule=schedule))
        temp[schedule] = measure(run.lower(params).compile()).temp_bytes
    microbatch = rows // m * width * 4
    assert temp["gpipe"] - temp["1f1b"] >= (m - p) * microbatch
