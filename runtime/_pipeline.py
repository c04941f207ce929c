"""Pipelined execution of a scan over layers: stages on a mesh axis, microbatches in flight.

`pipeline_scan(layer, stacked, x, mesh=..., axis="pp", microbatches=m)` computes what
`lax.scan(lambda h, w: (layer(h, w), None), x, stacked)[0]` computes, with the layers split
into p equal stages along mesh axis `axis` (stage s holds layers [s L/p, (s+1) L/p)) and
the batch split into m microbatches that flow through the stages (GPipe's schedule, Huang
et al. 2019): at tick t stage s runs microbatch t - s, then hands its result to stage s+1
with `jax.lax.ppermute`. After m + p - 1 ticks the last stage holds every result.

It is differentiable: `jax.grad` through it runs the backward pass as the mirror-image
pipeline (the transpose of each `ppermute` sends cotangents back a stage), which is
GPipe's backward. Stages idle in the bubble run their layers on zeros whose results are
never used; that costs time, exactly the bubble the cost model charges, and no accuracy.

Other mesh axes may split the batch (`batch_axis`, data parallelism inside each stage).

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
from jax.sharding import PartitionSpec as P

__all__ = ["pipeline_scan"]


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
        zeros = jnp.zeros_like(chunks[0])

        def tick(carry, t):
            received, results = carry
            # Stage 0 reads microbatch t from the input (zeros in the drain ticks).
            fresh = jnp.where(t < m, chunks[jnp.minimum(t, m - 1)], zeros)
            h = stage_layers(jnp.where(stage == 0, fresh, received), local)
            # The last stage finishes microbatch t - (p - 1) at tick t.
            done = t - (p - 1)
            keep = (stage == p - 1) & (done >= 0)
            slot = jnp.clip(done, 0, m - 1)
            results = results.at[slot].set(jnp.where(keep, h, results[slot]))
            return (jax.lax.ppermute(h, axis, shift), results), None

        # The carry differs per stage ("varying" over the stage axis, in shard_map's terms).
        start = jax.lax.pcast((zeros, jnp.zeros_like(chunks)), (axis,), to="varying")
        (_, results), _ = jax.lax.scan(tick, start, jnp.arange(m + p - 1))
        # Only the last stage holds results; the sum over stages hands them to every stage.
        return jax.lax.psum(jnp.where(stage == p - 1, results, 0.0), axis)

    param_spec = jax.tree.map(lambda _: P(axis), stacked)
    data_spec = P(None, batch_axis)
    run = jax.shard_map(per_stage_program, mesh=mesh, in_specs=(param_spec, data_spec),
                        out_specs=data_spec)
    return run(stacked, chunks).reshape(x.shape)
