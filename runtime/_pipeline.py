"""Pipelined execution of a scan over layers: stages on a mesh axis, microbatches in flight.

`pipeline_scan(layer, stacked, x, mesh=..., axis="pp", microbatches=m)` computes what
`lax.scan(lambda h, w: (layer(h, w), None), x, stacked)[0]` computes, with the layers split
into p equal stages along mesh axis `axis` (stage s holds layers [s L/p, (s+1) L/p)) and
the batch split into m microbatches that flow through the stages (GPipe's schedule, Huang
et al. 2019): at tick t stage s runs microbatch t - s, then hands its result to stage s+1
with `jax.lax.ppermute`. After m + p - 1 ticks the last stage holds every result.

It is differentiable: `jax.grad` through it runs the backward pass as the mirror-image
pipeline (the transpose of each `ppermute` sends cotangents back a stage), which is
GPipe's backward. Stages idle in the bubble run their layers on real microbatches whose
results are never used (not on zeros: a layer whose derivative is undefined at 0, such as
an eps-free RMS norm, would leak 0 * inf = NaN into the gradients); that costs time, the
bubble the cost model charges, and no accuracy.

Other mesh axes may split the batch (`batch_axis`, data parallelism inside each stage).

`pipeline_value_and_grad(layer, loss, stacked, x, targets, ..., schedule=...)` runs a
training step's forward and backward op by op in the order of a schedule ("gpipe",
"1f1b", or "interleaved" with v chunks per device) from `schedule_table`, keeping each
in-flight microbatch's stage input and recomputing the stage in its backward. With every
op one slot long, the tables reproduce the cost model's bubble and in-flight activations
exactly (tests check both).

>>> import jax, jax.numpy as jnp
>>> mesh = jax.make_mesh((2,), ("pp",), axis_types=(jax.sharding.AxisType.Auto,),
...                      devices=jax.devices()[:2])
>>> w = jnp.stack([jnp.eye(4) * (i + 1) for i in range(4)])          # 4 layers
>>> x = jnp.ones((8, 4))
>>> y = pipeline_scan(lambda h, w: h @ w, w, x, mesh=mesh, microbatches=4)
>>> bool(jnp.allclose(y, x * 24.0))                                  # 1 * 2 * 3 * 4
True
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from meshplan.costmodel._pipeline import check_schedule

__all__ = ["pipeline_scan", "pipeline_value_and_grad", "schedule_table"]


def _check(stacked, x, mesh, axis: str, microbatches: int, batch_axis) -> tuple[int, int]:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; the pipeline axis {axis!r} is not "
                         "one of them. Build the mesh with a stage axis.")
    if batch_axis is not None and batch_axis not in mesh.axis_names:
        raise ValueError(f"batch_axis {batch_axis!r} is not an axis of the mesh "
                         f"{mesh.axis_names}.")
    p = mesh.shape[axis]
    layers = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
    if len(layers) != 1:
        raise ValueError(f"every stacked parameter needs the same leading (layer) dimension; "
                         f"got {sorted(layers)}.")
    n_layers = layers.pop()
    if n_layers % p:
        raise ValueError(f"{n_layers} layers do not split into {p} equal stages; use a stage "
                         f"count that divides {n_layers}.")
    d = mesh.shape[batch_axis] if batch_axis is not None else 1
    if x.shape[0] % (microbatches * d):
        raise ValueError(f"batch {x.shape[0]} is not divisible by {microbatches} microbatches"
                         f"{f' x {d} data-parallel shards' if d > 1 else ''}; choose a "
                         "microbatch count that divides it.")
    return p, n_layers // p


def pipeline_scan(layer: Callable[[jax.Array, Any], jax.Array], stacked: Any, x: jax.Array, *,
                  mesh, axis: str = "pp", microbatches: int = 1,
                  batch_axis: str | None = None) -> jax.Array:
    """`lax.scan` of `layer` over the leading dim of `stacked`, pipelined over `axis`.

    Args:
      layer: (activations, one layer's parameters) -> activations of the same shape. It
        must treat batch rows independently (as transformer layers do): microbatches are
        slices of the batch.
      stacked: pytree of parameters with a leading layer dimension L (divisible by p).
      x: activations [batch, ...]; batch divisible by microbatches (x data shards).
      mesh: a `jax.sharding.Mesh` with the stage axis.
      axis: the stage axis; p = mesh.shape[axis].
      microbatches: m.
      batch_axis: a mesh axis splitting each microbatch's batch (data parallelism), or None.

    Returns:
      activations after all L layers, shaped like x, replicated over the stage axis.
    """
    p, _ = _check(stacked, x, mesh, axis, microbatches, batch_axis)
    m = microbatches
    chunks = x.reshape((m, x.shape[0] // m) + x.shape[1:])
    shift = [(s, s + 1) for s in range(p - 1)]  # stage s hands its result to s + 1

    def stage_layers(h, local):
        return jax.lax.scan(lambda c, w: (layer(c, w), None), h, local)[0]

    def per_stage_program(local, chunks):
        stage = jax.lax.axis_index(axis)

        def tick(carry, t):
            received, results = carry
            # Stage 0 reads microbatch t from the input (a repeat in the drain ticks, whose
            # results are dropped).
            h = stage_layers(jnp.where(stage == 0, chunks[t % m], received), local)
            # The last stage finishes microbatch t - (p - 1) at tick t.
            done = t - (p - 1)
            keep = (stage == p - 1) & (done >= 0)
            slot = jnp.clip(done, 0, m - 1)
            results = results.at[slot].set(jnp.where(keep, h, results[slot]))
            return (jax.lax.ppermute(h, axis, shift), results), None

        # The carry differs per stage ("varying" over the stage axis, in shard_map's terms).
        start = jax.lax.pcast((chunks[0], jnp.zeros_like(chunks)), (axis,), to="varying")
        (_, results), _ = jax.lax.scan(tick, start, jnp.arange(m + p - 1))
        # Only the last stage holds results; the sum over stages hands them to every stage.
        return jax.lax.psum(jnp.where(stage == p - 1, results, 0.0), axis)

    param_spec = jax.tree.map(lambda _: P(axis), stacked)
    data_spec = P(None, batch_axis)
    run = jax.shard_map(per_stage_program, mesh=mesh, in_specs=(param_spec, data_spec),
                        out_specs=data_spec)
    return run(stacked, chunks).reshape(x.shape)


# --------------------------------------------------------------------------------------
# Schedules as tables, and a step that runs one (forward and backward, microbatch by
# microbatch, in the schedule's order)
# --------------------------------------------------------------------------------------

_IDLE, _FORWARD, _BACKWARD = 0, 1, 2


def _device_order(s: int, p: int, m: int, schedule: str, v: int) -> list[tuple[int, int, int]]:
    """The (kind, microbatch, chunk) ops device s runs, in its order.

    gpipe: every forward, then every backward (last microbatch first). 1f1b: p - 1 - s
    warm-up forwards, then one forward and one backward in turn, then the remaining
    backwards (PipeDream-Flush / Megatron-LM's non-interleaved order). interleaved: the
    same with v chunks per device; forwards go through microbatches in groups of p, chunk
    by chunk, with (p - s - 1) * 2 + (v - 1) * p warm-up forwards (Megatron-LM's order).
    """
    if schedule == "gpipe":
        return ([(_FORWARD, i, 0) for i in range(m)] +
                [(_BACKWARD, i, 0) for i in reversed(range(m))])
    forwards = [(_FORWARD, g + j, c) for g in range(0, m, p) for c in range(v)
                for j in range(min(p, m - g))]
    backwards = [(_BACKWARD, g + j, c) for g in range(0, m, p) for c in reversed(range(v))
                 for j in range(min(p, m - g))]
    warm = (p - 1 - s) if v == 1 else (p - s - 1) * 2 + (v - 1) * p
    warm = min(warm, len(forwards))
    order = forwards[:warm]
    rest_f, rest_b = forwards[warm:], backwards
    while rest_f or rest_b:
        if rest_f:
            order.append(rest_f.pop(0))
        if rest_b:
            order.append(rest_b.pop(0))
    return order


def schedule_table(p: int, m: int, schedule: str = "1f1b", v: int = 1):
    """Slots of a pipeline schedule: int arrays [slots, p] of (kind, microbatch, chunk).

    Each device runs its ops in its order (`_device_order`), one per slot, as soon as the
    op's input has arrived: a forward needs the previous virtual stage's forward of the
    microbatch, a backward the next virtual stage's backward (the last one: its own
    forward). Virtual stage k = chunk * p + device.
    """
    check_schedule(p, m, schedule, v)  # the cost model's rules, the same errors
    last = p * v - 1
    orders = [_device_order(s, p, m, schedule, v) for s in range(p)]
    done: dict[tuple[int, int, int], int] = {}  # (kind, microbatch, virtual stage) -> slot
    slots: list[list[tuple[int, int, int]]] = []
    position = [0] * p
    while any(position[s] < len(orders[s]) for s in range(p)):
        t = len(slots)
        row = []
        for s in range(p):
            op = orders[s][position[s]] if position[s] < len(orders[s]) else None
            if op is not None:
                kind, i, c = op
                k = c * p + s
                if kind == _FORWARD:
                    need = None if k == 0 else (_FORWARD, i, k - 1)
                else:
                    need = (_FORWARD, i, k) if k == last else (_BACKWARD, i, k + 1)
                if need is None or done.get(need, t) < t:
                    row.append(op)
                    continue
            row.append((_IDLE, 0, 0))
        for s, (kind, i, c) in enumerate(row):
            if kind != _IDLE:
                done[kind, i, c * p + s] = t
                position[s] += 1
        if all(kind == _IDLE for kind, _, _ in row):
            raise RuntimeError(f"schedule {schedule!r} deadlocks for p={p}, m={m}, v={v}")
        slots.append(row)
    return np.array(slots, dtype=np.int32)  # [slots, p, 3]


def _buffer_windows(table, p: int, v: int) -> tuple[int, int]:
    """Slots a device needs per chunk for received activations and for cotangents.

    A microbatch's activation is kept from its arrival until its backward; its cotangent
    from its arrival (or, on the last virtual stage, its forward) until that backward.
    Microbatch i uses slot i mod K, which is safe when the microbatches kept at once never
    span more than K consecutive indices: K is that span, read off the schedule.
    """
    last = p * v - 1
    when = {}
    for t, row in enumerate(table.tolist()):
        for s, (kind, i, c) in enumerate(row):
            if kind != _IDLE:
                when[kind, i, c * p + s] = t
    spans: tuple[dict, dict] = ({}, {})
    for (kind, i, k), t in when.items():
        if kind != _BACKWARD:
            continue
        if k > 0:  # virtual stage 0 reads the input, not a received activation
            spans[0].setdefault(k, []).append((i, when[_FORWARD, i, k - 1], t))
        arrives = when[_FORWARD, i, k] if k == last else when[_BACKWARD, i, k + 1]
        spans[1].setdefault(k, []).append((i, arrives, t))

    def widest(by_stage: dict) -> int:
        width = 1
        for kept in by_stage.values():
            for t in range(len(table)):
                live = [i for i, first, last_t in kept if first <= t <= last_t]
                if live:
                    width = max(width, max(live) - min(live) + 1)
        return width

    return widest(spans[0]), widest(spans[1])


def pipeline_value_and_grad(layer: Callable[[jax.Array, Any], jax.Array],
                            loss: Callable[[jax.Array, jax.Array], jax.Array], stacked: Any,
                            x: jax.Array, targets: jax.Array, *, mesh, axis: str = "pp",
                            microbatches: int = 1, schedule: str = "1f1b",
                            virtual_stages: int = 1, batch_axis: str | None = None):
    """Mean loss and its gradient w.r.t. `stacked`, run as a pipeline schedule.

    Computes what `jax.value_and_grad(lambda w: loss(scan(layer)(x, w), targets))` computes
    when `loss` is a mean over batch rows, microbatch by microbatch in the order of
    `schedule_table`: each device keeps the inputs of its microbatches and recomputes its
    layers' forward in their backward (`jax.vjp`), as pipelined training systems do.
    Layers are placed as the schedule wants: stage s holds layers [s L/p, (s+1) L/p), or
    with v chunks, chunk c of device s holds block c p + s of p v.

    Each device keeps received activations and cotangents in ring buffers sized by the
    schedule (`_buffer_windows`): about p microbatches per chunk for 1F1B, m for GPipe.
    Every device evaluates the loss in each forward and keeps it only on the last virtual
    stage.

    Returns:
      (loss, gradient pytree shaped like `stacked`).
    """
    p, _ = _check(stacked, x, mesh, axis, microbatches, batch_axis)
    m, v = microbatches, virtual_stages
    plan = schedule_table(p, m, schedule, v)  # validates the schedule first
    # Ring buffers sized by the schedule: 1F1B keeps about p microbatches, GPipe all m.
    n_act, n_cot = _buffer_windows(plan, p, v)
    table = jnp.asarray(plan)
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    if n_layers % (p * v):
        raise ValueError(f"{n_layers} layers do not split into {p} stages x {v} chunks.")
    last = p * v - 1
    per = n_layers // (p * v)
    # [L, ...] -> [v, p, per, ...]: block c * p + s is chunk c of device s.
    blocks = jax.tree.map(lambda a: a.reshape((v, p, per) + a.shape[1:]), stacked)
    chunks = x.reshape((m, x.shape[0] // m) + x.shape[1:])
    goals = targets.reshape((m, targets.shape[0] // m) + targets.shape[1:])
    ahead = [(s, (s + 1) % p) for s in range(p)]  # activations to the next device
    back = [(s, (s - 1) % p) for s in range(p)]   # cotangents to the previous one

    def run_layers(h, local):
        return jax.lax.scan(lambda c, w: (layer(c, w), None), h, local)[0]

    def program(blocks, chunks, goals):
        s = jax.lax.axis_index(axis)
        local = jax.tree.map(lambda a: a[:, 0], blocks)  # [v, per, ...] on this device
        if batch_axis is not None:
            # Each data shard differentiates its own copy of the layers; their gradients
            # are averaged explicitly at the end (pmean), not summed implicitly by vjp.
            local = jax.lax.pcast(local, (batch_axis,), to="varying")
        zeros = jax.lax.pcast(jnp.zeros_like(chunks[0]), (axis,), to="varying")

        def chunk_params(c):
            return jax.tree.map(lambda a: a[c], local)

        def forward(state, i, c):
            acts, cots, grads, total = state
            k = c * p + s
            h_in = jnp.where(k == 0, chunks[i], acts[c, i % n_act])
            out = run_layers(h_in, chunk_params(c))
            value, d_out = jax.value_and_grad(loss)(out, goals[i])
            is_last = k == last
            cots = cots.at[c, i % n_cot].set(jnp.where(is_last, d_out, cots[c, i % n_cot]))
            total = total + jnp.where(is_last, value, 0.0)
            return (acts, cots, grads, total), out, zeros

        def backward(state, i, c):
            acts, cots, grads, total = state
            k = c * p + s
            h_in = jnp.where(k == 0, chunks[i], acts[c, i % n_act])
            _, pullback = jax.vjp(run_layers, h_in, chunk_params(c))
            d_in, d_w = pullback(cots[c, i % n_cot])
            grads = jax.tree.map(lambda g, d: g.at[c].add(d), grads, d_w)
            return (acts, cots, grads, total), zeros, d_in

        def idle(state, i, c):
            return state, zeros, zeros

        def slot(state, t):
            kind, i, c = table[t, s, 0], table[t, s, 1], table[t, s, 2]
            state, send_act, send_cot = jax.lax.switch(kind, (idle, forward, backward),
                                                       state, i, c)
            got_act = jax.lax.ppermute(send_act, axis, ahead)
            got_cot = jax.lax.ppermute(send_cot, axis, back)
            acts, cots, grads, total = state
            # What arrived is known from the table: the sender's op this slot.
            src = (s - 1) % p
            k_src = table[t, src, 2] * p + src
            into = jnp.where(table[t, src, 0] == _FORWARD, k_src + 1, -1)
            ok = (into >= 0) & (into <= last)
            c_to, i_to = jnp.clip(into // p, 0, v - 1), table[t, src, 1] % n_act
            acts = acts.at[c_to, i_to].set(jnp.where(ok, got_act, acts[c_to, i_to]))
            src = (s + 1) % p
            k_src = table[t, src, 2] * p + src
            into = jnp.where(table[t, src, 0] == _BACKWARD, k_src - 1, -1)
            ok = into >= 0
            c_to, i_to = jnp.clip(into // p, 0, v - 1), table[t, src, 1] % n_cot
            cots = cots.at[c_to, i_to].set(jnp.where(ok, got_cot, cots[c_to, i_to]))
            return (acts, cots, grads, total), None

        # Buffers and the loss differ per device ("varying" in shard_map's terms); the
        # gradients start from zeros shaped like the device's own layers, varying already.
        varying = (axis,) if batch_axis is None else (axis, batch_axis)
        shape = chunks.shape[1:]
        acts, cots, total = jax.lax.pcast(
            (jnp.zeros((v, n_act) + shape, chunks.dtype),
             jnp.zeros((v, n_cot) + shape, chunks.dtype), jnp.zeros(())), varying, to="varying")
        state = (acts, cots, jax.tree.map(jnp.zeros_like, local), total)
        (_, _, grads, total), _ = jax.lax.scan(slot, state, jnp.arange(table.shape[0]))
        # Each microbatch's loss is a mean over its rows: the step's loss is their mean.
        value = jax.lax.psum(total, axis) / m
        grads = jax.tree.map(lambda g: g[:, None] / m, grads)
        if batch_axis is not None:
            value = jax.lax.pmean(value, batch_axis)
            grads = jax.tree.map(lambda g: jax.lax.pmean(g, batch_axis), grads)
        return value, grads

    spec = jax.tree.map(lambda _: P(None, axis), blocks)
    run = jax.shard_map(program, mesh=mesh,
                        in_specs=(spec, P(None, batch_axis), P(None, batch_axis)),
                        out_specs=(P(), spec))
    value, grads = run(blocks, chunks, goals)
    return value, jax.tree.map(lambda g: g.reshape((n_layers,) + g.shape[3:]), grads)
