"""Array layouts on a logical mesh, and the collectives that move between layouts."""
from __future__ import annotations

import dataclasses
import functools
import math

from meshplan.costmodel import comm_bytes

# Per array dimension, the mesh axes (indices) splitting it, major first; () = not split.
Layout = tuple[tuple[int, ...], ...]


def replicated(rank: int) -> Layout:
    return ((),) * rank


def shards(layout: Layout, mesh_shape: tuple[int, ...]) -> int:
    """How many pieces the layout cuts an array into."""
    return math.prod(mesh_shape[a] for dim in layout for a in dim)


def used_axes(layout: Layout) -> frozenset[int]:
    return frozenset(a for dim in layout for a in dim)


def legal(layout: Layout, shape: tuple[int, ...], mesh_shape: tuple[int, ...]) -> bool:
    """Each axis used once, and each split dim divisible by its axes' product."""
    axes = [a for dim in layout for a in dim]
    if len(axes) != len(set(axes)):
        return False
    return all(size % math.prod(mesh_shape[a] for a in dim) == 0
               for size, dim in zip(shape, layout))


@dataclasses.dataclass(frozen=True)
class Comm:
    """One collective: kind (HLO name), S in bytes (DESIGN.md's definition) and its axes."""

    kind: str
    nbytes: float
    axes: tuple[int, ...]

    def bytes_sent(self, mesh_shape: tuple[int, ...]) -> float:
        """Bytes each device sends, by the ring definition used for measurement too."""
        n = math.prod(mesh_shape[a] for a in self.axes)
        return comm_bytes(self.kind, self.nbytes, n)


def _axis_dims(layout: Layout) -> dict[int, tuple[int, int]]:
    """axis -> (dim, position within the dim)."""
    return {a: (d, p) for d, dim in enumerate(layout) for p, a in enumerate(dim)}


@functools.lru_cache(maxsize=1 << 16)
def reshard(nbytes: float, src: Layout, dst: Layout,
            mesh_shape: tuple[int, ...]) -> tuple[Comm, ...]:
    """Collectives that turn an array of `nbytes` laid out as `src` into `dst`.

    Per mesh axis: kept on the same dim costs nothing; moved to another dim is an
    all-to-all; dropped is an all-gather (all dropped axes gathered at once, which sends
    the same bytes as gathering them one by one); added is a local slice, free.
    """
    if src == dst:
        return ()
    s, d = _axis_dims(src), _axis_dims(dst)
    src_pieces = shards(src, mesh_shape)
    comms: list[Comm] = []
    moved = [a for a in s if a in d and s[a][0] != d[a][0]]
    for a in moved:
        comms.append(Comm("all-to-all", nbytes / src_pieces, (a,)))
    # An axis whose position inside a dim changes must be gathered and re-sliced.
    dropped = tuple(sorted(a for a in s if a not in d or (s[a][0] == d[a][0] and s[a] != d[a])))
    if dropped:
        kept = math.prod(mesh_shape[a] for a in s if a not in dropped)
        comms.append(Comm("all-gather", nbytes / kept, dropped))
    return tuple(comms)
