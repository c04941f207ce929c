"""Logical meshes over physical devices, and how fast collectives run along their axes."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

from meshplan.costmodel import Cluster, collective_algorithms

Axes = tuple[int, ...]  # mesh axis indices


@dataclasses.dataclass(frozen=True)
class LogicalMesh:
    """A mesh shape and the physical device ids laid out in it (row-major)."""

    shape: tuple[int, ...]
    device_ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def ids(self) -> np.ndarray:
        return np.asarray(self.device_ids).reshape(self.shape)

    def groups(self, axes: Axes) -> list[tuple[int, ...]]:
        """The device groups a collective over `axes` runs in (one per other-axes index)."""
        ids = self.ids()
        rest = [a for a in range(len(self.shape)) if a not in axes]
        moved = np.transpose(ids, rest + list(axes)).reshape(-1, math.prod(self.shape[a] for a in axes))
        return [tuple(int(d) for d in row) for row in moved]

    def axes_size(self, axes: Axes) -> int:
        return math.prod(self.shape[a] for a in axes)


def factorizations(n: int, max_axes: int = 2) -> list[tuple[int, ...]]:
    """Ordered factorizations of n into at most `max_axes` factors > 1, e.g. 8 -> (8,), (2,4)."""
    out = [(n,)] if n > 1 else [(1,)]
    if max_axes >= 2:
        out += [(a, n // a) for a in range(2, n) if n % a == 0]
    return out


@dataclasses.dataclass(frozen=True)
class _LinearTime:
    """A collective's time as min over algorithms of alpha + beta * bytes."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]

    def __call__(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return min(a + b * nbytes for a, b in zip(self.alphas, self.betas))


class CommModel:
    """Collective times along the axes of one logical mesh on one cluster.

    Every algorithm in costmodel is alpha-beta (linear in bytes), so each (kind, axes) is
    fitted once from two sizes and then evaluated in O(#algorithms): the planner asks for
    hundreds of thousands of reshard costs.
    """

    def __init__(self, cluster: Cluster, mesh: LogicalMesh, shared: dict | None = None):
        self.cluster = cluster
        self.mesh = mesh
        self._fits: dict[tuple[str, Axes], _LinearTime] = {}
        self.reshard_memo: dict[tuple, float] = {}  # (bytes, src, dst) -> seconds
        self.edge_memo: dict[tuple, np.ndarray] = {}  # (bytes, src layouts, dst layouts)
        # Group times by link structure, shareable between the meshes of one search (a
        # 1024-device mesh has 128 groups per axis; without pair overrides they are alike).
        self._group_times = shared if shared is not None else {}

    def _group_key(self, kind: str, group: tuple[int, ...]):
        c = self.cluster
        if c.pair_bandwidth is not None or c.pair_latency is not None:
            # Measured links: every group is its own. The memo keeps the cluster alive so
            # that its id is not reused by another cluster while the memo lives.
            self._group_times.setdefault(("cluster", id(c)), c)
            return (kind, id(c), group)
        nodes: dict[int, int] = {}
        sites: dict[int, int] = {}
        shape = tuple(nodes.setdefault(c.node_of[d], len(nodes)) for d in group)
        where = () if c.site_of is None else \
            tuple(sites.setdefault(c.site_of[d], len(sites)) for d in group)
        return (kind, shape, where, c.tiers)

    def _group_time(self, kind: str, group: tuple[int, ...]):
        key = self._group_key(kind, group)
        if key not in self._group_times:
            probe = 1 << 30  # 1 GiB: large enough that the bandwidth term is well resolved
            self._group_times[key] = (collective_algorithms(kind, 0.0, group, self.cluster),
                                      collective_algorithms(kind, float(probe), group,
                                                            self.cluster), probe)
        return self._group_times[key]

    def _fit(self, kind: str, axes: Axes) -> _LinearTime:
        key = (kind, axes)
        if key not in self._fits:
            per_group = [self._group_time(kind, tuple(g)) for g in self.mesh.groups(axes)]
            probe = per_group[0][2]
            # Algorithms every group can run (hierarchical needs even nodes, which a
            # placement may give some groups and not others).
            names = [a for a in per_group[0][0] if all(a in g[0] for g in per_group)]
            # The slowest group sets the pace: collectives over an axis run in lockstep.
            alphas = tuple(max(g[0][n] for g in per_group) for n in names)
            betas = tuple(max((g[1][n] - g[0][n]) / probe for g in per_group) for n in names)
            self._fits[key] = _LinearTime(alphas, betas)
        return self._fits[key]

    def time(self, kind: str, nbytes: float, axes: Axes) -> float:
        """Seconds for one collective of `kind` over `axes` moving S=`nbytes` (DESIGN.md's S)."""
        if not axes or self.mesh.axes_size(axes) == 1:
            return 0.0
        return self._fit(kind, tuple(sorted(axes)))(nbytes)

    def p2p(self, nbytes: float, src: Sequence[int], dst: Sequence[int]) -> float:
        """Seconds to send nbytes from each device of src to its peer in dst, in parallel."""
        worst = 0.0
        for a, b in zip(src, dst):
            bw, lat = self.cluster.link(a, b)
            worst = max(worst, lat + nbytes / bw)
        return worst
