"""The graph meshplan plans over: values, nodes, regions.

A `Graph` is a flattened jaxpr: nested jits, custom_jvp/custom_vjp calls and remat regions are
inlined, while `scan`/`while`/`cond` stay as region nodes holding their body graphs, because a
scanned body is a layer that is planned once and run many times.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from meshplan.ir._dims import DimMap

ROLES = ("param", "opt_state", "data", "other")


@dataclasses.dataclass(frozen=True)
class Value:
    """An array flowing between nodes: shape, dtype, and a constant payload if literal."""

    id: int
    shape: tuple[int, ...]
    dtype: np.dtype
    const: Any = None  # literal / closed-over constant, kept for re-interpretation

    @functools.cached_property
    def nbytes(self) -> int:
        """Size in bytes of the whole (unsharded) array."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclasses.dataclass(frozen=True)
class InputInfo:
    """Where a graph input came from: argument index, pytree path and role."""

    value: int
    arg_index: int
    path: str
    role: str


def split_path(path: str) -> tuple[int, str]:
    """An InputInfo path as (argument position, the rest): "[1][0].mu" -> (1, "[0].mu");
    (-1, path) for a path without the leading position."""
    if not path.startswith("[") or "]" not in path:
        return -1, path
    end = path.index("]")
    head = path[1:end]
    return (int(head), path[end + 1:]) if head.isdigit() else (-1, path)


@dataclasses.dataclass(eq=False)
class Node:
    """One operation. `dims` says how output dims relate to operand dims (None: opaque)."""

    id: int
    primitive: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    flops: float
    bytes_accessed: float
    dims: DimMap | None
    eqn: Any = None  # the jaxpr equation, re-bound by the runtime
    bodies: tuple["Graph", ...] = ()  # region bodies (scan: one; while: cond, body; cond: branches)
    trip_count: int = 1  # how often the body runs per execution of this node
    recompute: bool = False  # produced inside a remat region (recomputed in the backward pass)
    # Equal for two nodes of one trace with equal primitive, parameters and operand and
    # result types (constants marked); -1 when not known (regions, unhashable parameters).
    semantics: int = -1

    @property
    def is_region(self) -> bool:
        return bool(self.bodies)


@dataclasses.dataclass(eq=False)
class Graph:
    """Values and nodes in program order; `inputs`/`outputs` are value ids."""

    values: dict[int, Value]
    nodes: list[Node]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    input_info: tuple[InputInfo, ...] = ()
    unknown_primitives: tuple[str, ...] = ()
    out_shape: Any = None  # the traced function's result as a pytree of ShapeDtypeStructs

    def producers(self) -> dict[int, Node]:
        """value id -> the node that computes it."""
        return {v: n for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[int, list[Node]]:
        """value id -> nodes that read it, in program order."""
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def walk(self, multiplicity: int = 1):
        """Yield (node, times it runs per step), descending into region bodies."""
        for n in self.nodes:
            yield n, multiplicity
            for body in n.bodies:
                yield from body.walk(multiplicity * n.trip_count)

    @property
    def flops(self) -> float:
        """Total FLOPs of one step, region bodies counted once per iteration."""
        return sum(n.flops * m for n, m in self.walk() if not n.is_region)

    def num_nodes(self) -> int:
        return sum(1 for _ in self.walk())

    def summary(self) -> str:
        """A few lines: node count, FLOPs, inputs by role, unknown primitives."""
        roles: dict[str, int] = {}
        for info in self.input_info:
            roles[info.role] = roles.get(info.role, 0) + self.values[info.value].nbytes
        lines = [f"Graph: {self.num_nodes()} nodes, {self.flops:.3e} FLOPs per step"]
        lines += [f"  {r}: {b / 2**20:.2f} MiB" for r, b in roles.items()]
        if self.unknown_primitives:
            lines.append("  replicated (unknown primitives): " + ", ".join(self.unknown_primitives))
        return "\n".join(lines)
