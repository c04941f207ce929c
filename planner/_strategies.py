"""Sharding strategies: mesh axes assigned to an op's loop dimensions.

One rule serves every op (see meshplan.ir._dims): each mesh axis splits at most one loop
dimension; arrays are split along the dims that walk it; a split reduced loop leaves partial
sums, settled by an all-reduce or, when the output takes the axis on a free dim, a
reduce-scatter.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

from meshplan.ir import DimMap
from meshplan.planner._layout import Comm, Layout, legal, replicated, shards

LoopAxes = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class OpChoice:
    """Layouts an op needs and produces under one loop assignment, and its own collectives."""

    loop_axes: LoopAxes
    in_layouts: tuple[Layout, ...]
    out_layouts: tuple[Layout, ...]
    comms: tuple[Comm, ...]
    split: int  # how many devices share the op's work


def project(array_dims, loop_axes: LoopAxes) -> Layout | None:
    """The layout an array gets from a loop assignment, or None if it cannot be expressed."""
    out = []
    for group in array_dims:
        if not group:
            out.append(())
            continue
        if any(loop_axes[l] for l in group[1:]):
            return None  # only the major part of a merged dim may be split
        out.append(loop_axes[group[0]])
    return tuple(out)


@functools.lru_cache(maxsize=1 << 16)
def apply_loops(dims: DimMap, loop_axes: LoopAxes, in_shapes: Sequence[tuple[int, ...]],
                out_shapes: Sequence[tuple[int, ...]], out_nbytes: Sequence[float],
                mesh_shape: tuple[int, ...], scatter_dim: int | None = None) -> OpChoice | None:
    """Layouts and collectives of `dims` under `loop_axes`; None when illegal."""
    ins = []
    for arr, shape in zip(dims.operands, in_shapes):
        lay = replicated(len(shape)) if arr is None else project(arr, loop_axes)
        if lay is None or not legal(lay, shape, mesh_shape):
            return None
        ins.append(lay)
    outs = []
    for arr, shape in zip(dims.outputs, out_shapes):
        lay = project(arr, loop_axes)
        if lay is None or not legal(lay, shape, mesh_shape):
            return None
        outs.append(lay)
    partial = tuple(sorted(a for l in dims.reduced_loops for a in loop_axes[l]))
    comms: list[Comm] = []
    if partial:
        if dims.reduction is None:
            return None
        if scatter_dim is not None:
            lay = list(outs[0])
            lay[scatter_dim] = lay[scatter_dim] + partial
            lay = tuple(lay)
            if not legal(lay, out_shapes[0], mesh_shape):
                return None
            comms.append(Comm("reduce-scatter", out_nbytes[0] / shards(outs[0], mesh_shape),
                              partial))
            outs[0] = lay
            for k in range(1, len(outs)):
                comms.append(Comm("all-reduce", out_nbytes[k] / shards(outs[k], mesh_shape),
                                  partial))
        else:
            for k in range(len(outs)):
                comms.append(Comm("all-reduce", out_nbytes[k] / shards(outs[k], mesh_shape),
                                  partial))
    elif scatter_dim is not None:
        return None
    split = math.prod(mesh_shape[a] for axes in loop_axes for a in axes)
    return OpChoice(loop_axes, tuple(ins), tuple(outs), tuple(comms), split)


def _assignments(num_loops: int, num_axes: int):
    """Every map axis -> loop dim or None, as per-loop axis tuples (axes in mesh order)."""
    for choice in itertools.product(range(num_loops + 1), repeat=num_axes):
        loops: list[list[int]] = [[] for _ in range(num_loops)]
        for axis, loop in enumerate(choice):
            if loop < num_loops:
                loops[loop].append(axis)
        yield tuple(tuple(x) for x in loops)


def _walked(dims: DimMap) -> frozenset[int]:
    """Loop dims that splitting can change: walked as a major part by an array, or reduced."""
    major = {g[0] for arrs in (dims.operands, dims.outputs) for arr in arrs if arr
             for g in arr if g}
    return frozenset(major) | dims.reduced_loops


def leader_choices(dims: DimMap, in_shapes, out_shapes, out_nbytes,
                   mesh_shape: tuple[int, ...], allowed=None,
                   scatter_variants: bool = True) -> list[OpChoice]:
    """All legal strategies of a leader op, reduce-scatter variants included if asked.

    `allowed(loop, axis) -> bool` can forbid assignments (e.g. a pinned dp axis). Where the
    backend lowers a reduce-scatter to an all-reduce and a local slice (XLA:CPU), a
    reduce-scatter variant costs exactly its all-reduce twin plus a free slice that any
    consumer can take itself, so `scatter_variants=False` drops these dominated choices.
    """
    walked = _walked(dims)
    in_shapes, out_shapes, out_nbytes = tuple(in_shapes), tuple(out_shapes), tuple(out_nbytes)
    out = []
    for loop_axes in _assignments(len(dims.loop_sizes), len(mesh_shape)):
        # An axis on a loop no array walks splits nothing; "unassigned" dominates it.
        if any(axes and l not in walked for l, axes in enumerate(loop_axes)):
            continue
        if allowed is not None and not all(allowed(l, a) for l, axes in enumerate(loop_axes)
                                           for a in axes):
            continue
        base = apply_loops(dims, loop_axes, in_shapes, out_shapes, out_nbytes, mesh_shape)
        if base is None:
            continue
        out.append(base)
        if scatter_variants and base.comms and dims.outputs:
            for d in range(len(out_shapes[0])):
                rs = apply_loops(dims, loop_axes, in_shapes, out_shapes, out_nbytes,
                                 mesh_shape, scatter_dim=d)
                if rs is not None:
                    out.append(rs)
    return out


def follower_loops(dims: DimMap, main_layout: Layout) -> LoopAxes:
    """The loop assignment a follower inherits from its main operand's layout."""
    loops: list[tuple[int, ...]] = [() for _ in dims.loop_sizes]
    for group, axes in zip(dims.operands[dims.main], main_layout):
        if group and axes:
            loops[group[0]] = axes
    return tuple(loops)


def layout_choices(shape: tuple[int, ...], mesh_shape: tuple[int, ...],
                   allowed=None) -> list[Layout]:
    """All legal layouts of an array (each axis on one dim or unused)."""
    out = []
    for loop_axes in _assignments(len(shape), len(mesh_shape)):
        if allowed is not None and not all(allowed(d, a) for d, axes in enumerate(loop_axes)
                                           for a in axes):
            continue
        if legal(loop_axes, shape, mesh_shape):
            out.append(loop_axes)
    return out
