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

    def __init__(self, cluster: Cluster, mesh: LogicalMesh):
        self.cluster = cluster
        self.mesh = mesh
        self._fits: dict[tuple[str, Axes], _LinearTime] = {}
        self.reshard_memo: dict[tuple, float] = {}  # (bytes, src, dst) -> seconds

    def _fit(self, kind: str, axes: Axes) -> _LinearTime:
        key = (kind, axes)
        if key not in self._fits:
            probe = 1 << 30  # 1 GiB: large enough that the bandwidth term is well resolved
            per_group = []
            for group in self.mesh.groups(axes):
                t0 = collective_algorithms(kind, 0.0, group, self.cluster)
                t1 = collective_algorithms(kind, float(probe), group, self.cluster)
                per_group.append((t0, t1))
            names = list(per_group[0][0])
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
