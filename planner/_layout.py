"""Array layouts on a logical mesh, and the collectives that move between layouts.

`reshard` predicts the collectives XLA's SPMD partitioner emits for
``with_sharding_constraint(with_sharding_constraint(x, src), dst)`` on a mesh of
`AxisType.Auto` axes (jax 0.10.2: Shardy exports both constraints as HLO shardings and
GSPMD's reshard logic, ``PartitionedHlo::ReshardNoCache``, turns one into the other).

XLA does not reason per mesh axis but per *tile assignment*: how many tiles each array dim
has, plus a trailing "replicated" dim for mesh axes that split nothing, and which device
holds which tile. Two layouts that differ only in the order of axes inside a dim have the
same tile counts but a different device order. So what XLA does is not a function of what
happens to each mesh axis (kept, moved, dropped, added): the same "one axis moves" can be
one all-to-all or a full gather. The rules it applies, in the order it tries them, are:

1. Same tile counts everywhere, different device order (``(0, 1)`` -> ``(1, 0)`` on one
   dim): one collective-permute of the local shard.
2. The tile counts of the changed dims (the replicated dim included) are the same multiset
   on both sides, e.g. an axis moves from one dim to another, or a dim's axes move to a
   dim that is unsplit: all-to-all. One all-to-all per pair of swapped dims (group = the
   ratio of their tile counts), or a single all-to-all over the product group when two or
   more disjoint pairs swap at once; a collective-permute follows if the resulting device
   order is not the target's (e.g. ``((0,), ())`` -> ``((), (1, 0))`` needs none but
   ``((0,), ())`` -> ``((), (0, 1))`` does on a 2x4 mesh).
3. Source partly replicated and the target splits every dim at least as finely (axes only
   added): a local dynamic-slice, free, unless the target's tiles are not inside the
   source's on each device; then XLA slices a compatible layout and collective-permutes
   the *target-sized* shard into place (``((), (0,))`` -> ``((), (1,))``: 1/4 of the
   array, not an all-gather).
4. Target partly replicated and the source splits every dim at least as finely (axes only
   dropped): one all-gather per dim that loses tiles, last dim first, each over just the
   dropped factor of that dim (after a collective-permute if the device order of the
   kept tiles differs, e.g. dropping the major axis of ``(0, 1)``).
5. Composite patterns (XLA's ``TryComplexReshardHandling``): split one dim's tiling in two
   so that rule 2 applies, then merge back; or first replicate one dim (rule 4) and go on;
   or, from a partly replicated source, first turn the replicated dim into a dim's tiling
   (rule 3) and go on. Every recursive step here must succeed without a full gather.
6. Dims whose tile count is unchanged are held fixed: the rest is resharded inside each
   group of devices sharing those tiles (smaller collectives), then a permute fixes the
   device order if needed.
7. Otherwise "Involuntary full rematerialization": all-gather every split dim (one
   all-gather per dim, last dim first) and slice the target locally. On a 2x4 mesh this is
   what happens when an axis moves to another dim while another is dropped
   (``((0, 1), ...)`` -> ``((), (1,), ...)``: a full all-gather, not an all-to-all), when
   one axis leaves a dim as another arrives elsewhere (``((0,), ())`` -> ``((), (1,))``),
   and when one dim's axes are spread over two other dims or two dims' axes are merged
   onto a third (``((), (), (0, 1))`` -> ``((0,), (1,), ())``).

Checked against compiled HLO (`tests/test_layout.py`; a harness compiled every pair of
layouts of rank 2-4 arrays on meshes (8,), (2, 4), (4, 2), 3311 pairs, and samples on
(2, 2, 2), (4, 4), (2, 8), (8, 2), (2, 2, 4), (4, 2, 2), 4378 more): every pair gives the
same collectives, each with the same S and group size. One pattern (three chained dim swaps
of a rank-4 array on a 3-axis mesh with unequal axes, about 0.2% of those pairs) makes
XLA's compiler crash; it is priced as a full gather (see `_all_to_all`).

The decision procedure is replayed on small tile-assignment arrays (numpy), so device
orders, group sizes and the permutes in between come out as XLA computes them; results
are memoised per (src, dst, mesh shape) as fractions of the array and scaled by `nbytes`.
It assumes every split dim divides evenly (what `legal` checks): XLA adds halo exchanges
and padding for uneven tiles, which are not modelled.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from meshplan.costmodel import comm_bytes

# Per array dimension, the mesh axes (indices) splitting it, major first; () = not split.
Layout = tuple[tuple[int, ...], ...]


def replicated(rank: int) -> Layout:
    return ((),) * rank


# Memoised: the memory model asks this for every value of every candidate plan, over a
# few dozen distinct layouts.
@functools.lru_cache(maxsize=4096)
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
    """One collective: kind (HLO name), S in bytes (DESIGN.md's definition) and its axes.

    `group` is the number of devices in one group when that is not the product of the
    axes' sizes: XLA sometimes runs a collective over part of a mesh axis (e.g. the devices
    0, 2 of a 4-device axis when a gather drops only the minor half of its tiling). `axes`
    are then the mesh axes the group spans, a superset used for timing; 0 = the product.
    """

    kind: str
    nbytes: float
    axes: tuple[int, ...]
    group: int = 0

    def group_size(self, mesh_shape: tuple[int, ...]) -> int:
        return self.group or math.prod(mesh_shape[a] for a in self.axes)

    def bytes_sent(self, mesh_shape: tuple[int, ...]) -> float:
        """Bytes each device sends, by the ring definition used for measurement too."""
        return comm_bytes(self.kind, self.nbytes, self.group_size(mesh_shape))


def reshard(nbytes: float, src: Layout, dst: Layout,
            mesh_shape: tuple[int, ...]) -> tuple[Comm, ...]:
    """Collectives that turn an array of `nbytes` laid out as `src` into `dst`.

    The collectives XLA emits, in order (module docstring). An empty tuple means the
    change is a local slice (or nothing).
    """
    if src == dst:
        return ()
    return tuple(Comm(kind, frac * nbytes, axes, group)
                 for kind, frac, axes, group in _plan(src, dst, tuple(mesh_shape)))


@functools.lru_cache(maxsize=None)
def _plan(src: Layout, dst: Layout,
          mesh_shape: tuple[int, ...]) -> tuple[tuple[str, float, tuple[int, ...], int], ...]:
    """(kind, S as a fraction of the array, axes, group size or 0) per collective."""
    try:
        emitted = _replay(src, dst, mesh_shape)
    except (_GaveUp, ValueError, IndexError, KeyError):
        return _full_gather(src, mesh_shape)
    out = []
    for kind, frac, devices in emitted:
        if kind == "collective-permute":
            out.append((kind, frac, _permute_axes(devices, mesh_shape), 0))
        else:
            axes, size = _group_axes(devices, mesh_shape)
            exact = math.prod(mesh_shape[a] for a in axes) == size
            out.append((kind, frac, axes, 0 if exact else size))
    return tuple(out)


def _full_gather(src: Layout, mesh_shape: tuple[int, ...]):
    """Rule 7's collectives, used where the replay gives up: one all-gather per split dim,
    last dim first. The only such case seen is one XLA itself cannot compile (see
    `_all_to_all`), so the most expensive reshard is the right signal for the planner."""
    out, frac = [], 1.0 / shards(src, mesh_shape)
    for axes in reversed(src):
        n = math.prod(mesh_shape[a] for a in axes)
        if n > 1:
            frac *= n
            out.append(("all-gather", frac, tuple(axes), 0))
    return tuple(out)


def _group_axes(groups: np.ndarray, mesh_shape) -> tuple[tuple[int, ...], int]:
    """The mesh axes a collective's device groups (rows) span, major first, and the
    group size."""
    coords = np.unravel_index(groups, mesh_shape)  # per axis: (groups, group size)
    varying = [a for a, c in enumerate(coords) if (c != c[:, :1]).any()]
    # The axis whose coordinate changes first along the group's order is the minor one.
    first = {a: int(np.argmax(coords[a][0] != coords[a][0, 0])) for a in varying}
    return tuple(sorted(varying, key=lambda a: -first[a])), groups.shape[1]


def _permute_axes(pairs: tuple[np.ndarray, np.ndarray], mesh_shape) -> tuple[int, ...]:
    """The mesh axes along which a collective-permute moves data."""
    src, dst = (np.unravel_index(ids, mesh_shape) for ids in pairs)
    return tuple(a for a in range(len(mesh_shape)) if (src[a] != dst[a]).any())


# -----------------------------------------------------------------------------------------
# Tile assignments (XLA's HloSharding, for the cases layouts produce)
# -----------------------------------------------------------------------------------------


class _GaveUp(Exception):
    """The replay met a case it does not model (it then falls back to `_full_gather`)."""


class _Tiling:
    """Which device holds which tile: `ta[i0, ..., i_{r-1}(, k)]` is a device id, with a
    trailing replicated dim when `partial`; `ta is None` means fully replicated. Device ids
    are positions inside the current device group (see `_Value.groups`)."""

    __slots__ = ("ta", "partial", "rank")

    def __init__(self, ta, partial: bool, rank: int):
        self.ta, self.partial, self.rank = ta, partial, rank

    @staticmethod
    def make(ta, partial: bool, rank: int) -> "_Tiling":
        """Canonical form, as XLA's constructors normalise: a replicated dim of 1 is
        dropped, no split data dim (or a single device) means replicated, and the devices
        sharing a tile are listed in increasing order (HloSharding::PartialTile sorts each
        replication group, so their order never asks for a permute)."""
        ta = np.asarray(ta)
        if partial:
            if ta.shape[-1] == 1:
                return _Tiling.make(ta.reshape(ta.shape[:-1]), False, rank)
            if all(s == 1 for s in ta.shape[:-1]):
                return _Tiling(None, False, rank)
            return _Tiling(np.sort(ta, axis=-1), True, rank)
        if ta.size == 1:
            return _Tiling(None, False, rank)
        return _Tiling(ta, False, rank)

    @property
    def replicated(self) -> bool:
        return self.ta is None

    def dims(self) -> tuple[int, ...]:
        return (1,) * self.rank if self.ta is None else self.ta.shape

    def dim(self, i: int) -> int:
        return 1 if self.ta is None else self.ta.shape[i]

    def ndims(self) -> int:
        return self.rank if self.ta is None else self.ta.ndim

    def tiles(self) -> int:
        """Pieces the array is cut into (the replicated dim does not cut)."""
        return math.prod(self.dim(i) for i in range(self.rank))

    def __eq__(self, other) -> bool:
        if self.replicated or other.replicated:
            return self.replicated and other.replicated
        return (self.partial == other.partial and self.ta.shape == other.ta.shape
                and bool((self.ta == other.ta).all()))

    def reshaped(self, shape, rank: int) -> "_Tiling":
        return _Tiling.make(self.ta.reshape(shape), self.partial, rank)


def _layout_tiling(layout: Layout, mesh_shape: tuple[int, ...]) -> _Tiling:
    """What JAX exports for a NamedSharding: mesh devices in row-major order, transposed to
    (axes of dim 0, major first, ..., axes of the last dim, unused axes in mesh order)."""
    ids = np.arange(math.prod(mesh_shape)).reshape(mesh_shape)
    used = [a for dim in layout for a in dim]
    unused = [a for a in range(len(mesh_shape)) if a not in used]
    shape = [math.prod(mesh_shape[a] for a in dim) for dim in layout]
    shape.append(math.prod(mesh_shape[a] for a in unused))
    return _Tiling.make(ids.transpose(used + unused).reshape(shape), True, len(layout))


def _rows(ta: np.ndarray, dim_factors: dict[int, int]) -> np.ndarray:
    """Device groups of a collective: devices that differ only in the minor `f` part of
    each tile dim `d` in `dim_factors` (one row per group, in tile order)."""
    shape, minor = [], []
    for d, s in enumerate(ta.shape):
        f = dim_factors.get(d)
        if f is None:
            shape.append(s)
        else:
            shape += [s // f, f]
            minor.append(len(shape) - 1)
    rest = [a for a in range(len(shape)) if a not in minor]
    return ta.reshape(shape).transpose(rest + minor).reshape(-1, math.prod(dim_factors.values()))


@dataclasses.dataclass(frozen=True)
class _Value:
    """A partitioned value: its tiling, the bytes of one device's buffer (as a fraction of
    the whole array), the device groups it is partitioned within (rows of global device
    ids; the tiling's ids index a row), and the collectives emitted so far."""

    tiling: _Tiling
    local: float
    groups: np.ndarray
    emitted: tuple = ()

    def to(self, tiling: _Tiling, *emitted, local: float | None = None) -> "_Value":
        return _Value(tiling, self.local if local is None else local, self.groups,
                      self.emitted + emitted)

    def sliced(self, tiling: _Tiling) -> "_Value":
        """A local dynamic-slice to a finer tiling: no communication."""
        return self.to(tiling, local=self.local * self.tiling.tiles() / tiling.tiles())

    def collective(self, kind: str, nbytes: float, rows: np.ndarray) -> tuple:
        """(kind, S, global device groups as rows) for groups `rows` of local ids."""
        return (kind, nbytes, self.groups[:, rows].reshape(-1, rows.shape[1]))


def _replay(src: Layout, dst: Layout, mesh_shape: tuple[int, ...]) -> tuple:
    source, target = _layout_tiling(src, mesh_shape), _layout_tiling(dst, mesh_shape)
    n = math.prod(mesh_shape)
    value = _Value(source, 1.0 / source.tiles(), np.arange(n).reshape(1, n))
    out = _reshard(value, target, True, 0)
    if not out.tiling == target:
        raise _GaveUp
    return out.emitted


# -----------------------------------------------------------------------------------------
# The decision procedure
# -----------------------------------------------------------------------------------------


def _reshard(v: _Value, t: _Tiling, allow_full_gather: bool, depth: int) -> _Value:
    """Rules 1-7 of the module docstring, tried in XLA's order. Without
    `allow_full_gather` (inside composite patterns) rule 7 returns `v` unchanged and the
    caller treats the attempt as failed; what a failed attempt emitted is dead code XLA
    removes, so it is dropped with the attempt."""
    if depth > 32:
        raise _GaveUp
    s = v.tiling
    if s == t:
        return v
    if _permutable(s, t):                                                    # rule 1
        return _permute(v, t)
    pairs = _swap_pairs(s, t)
    if pairs:                                                                # rule 2
        return _all_to_all(v, t, pairs)
    if s.partial and not t.replicated:                                       # rule 3
        r = _slice_from_partial(v, t)
        if r is None:
            r = _partial_all_to_all(v, t, depth)
        if r is not None:
            return r
    if not s.replicated and t.partial:                                       # rule 4
        r = _gather_to_partial(v, t)
        if r is None:
            r = _partial_all_to_all(v, t, depth)
        if r is not None:
            return r
    if s.replicated:  # replicated source: slice the target locally
        return v.sliced(t)
    if not t.replicated:
        r = _composite(v, t, depth)                                          # rule 5
        if r is not None:
            return r
        fixed = [d for d in range(s.rank) if s.dim(d) != 1 and t.dim(d) == s.dim(d)]
        if fixed:                                                            # rule 6
            return _within_groups(v, t, fixed, depth)
        if not allow_full_gather:
            return v
    full = v.to(_Tiling(None, False, s.rank), *_gather_dims(v, range(s.rank)),  # rule 7
                local=v.local * s.tiles())
    return _reshard(full, t, True, depth + 1)


def _permutable(s: _Tiling, t: _Tiling) -> bool:
    """Same tile counts (replicated dim included), different device order."""
    return (not s.replicated and not t.replicated and s.dims() == t.dims()
            and s.partial == t.partial and not s == t)


def _permute(v: _Value, t: _Tiling) -> _Value:
    """Each device sends its tile to the device that holds it in `t` (the shard's bytes);
    dropped if every device keeps its own."""
    src = v.groups[:, v.tiling.ta.ravel()].ravel()
    dst = v.groups[:, t.ta.ravel()].ravel()
    moving = src != dst
    if not moving.any():
        return v.to(t)
    return v.to(t, ("collective-permute", v.local, (src[moving], dst[moving])))


def _swap_pairs(s: _Tiling, t: _Tiling) -> list[tuple[int, int]] | None:
    """(source dim, target dim) swaps that turn s's tile counts into t's, one at a time
    (XLA's GetReshardAllToAllSourceTargetDims): the counts of the dims that differ must be
    the same multiset on both sides, the replicated dim counting as a dim."""
    if s.replicated or t.replicated or s.ndims() != t.ndims() or s.tiles() != t.tiles():
        return None
    by_src: dict[int, list[int]] = {}
    by_tgt: dict[int, list[int]] = {}
    for i in range(s.ndims()):
        if s.dim(i) != t.dim(i):
            by_src.setdefault(s.dim(i), []).append(i)
            by_tgt.setdefault(t.dim(i), []).append(i)
    if not by_src or sorted((k, len(v)) for k, v in by_src.items()) != \
            sorted((k, len(v)) for k, v in by_tgt.items()):
        return None

    def drop(table, size, dim):
        table[size] = [x for x in table[size] if x != dim]
        if not table[size]:
            del table[size]

    pairs = []
    while by_src:
        size = min(by_src)
        i = by_src[size][-1]  # a dim that has `size` tiles and must get t.dim(i)
        want = t.dim(i)
        if want == size:
            drop(by_src, size, i)
            drop(by_tgt, size, i)
            continue
        candidates = by_src.get(want)
        if not candidates:
            return None
        j = candidates[0]
        if size == 1:  # prefer a partner that stays split, so the 1 keeps being useful
            j = next((c for c in candidates if t.dim(c) != 1), candidates[-1])
        elif want % size == 0:  # prefer a partner that wants exactly `size`: one swap
            j = next((c for c in candidates if t.dim(c) == size), candidates[-1])
        else:
            return None
        pairs.append((j, i))
        drop(by_tgt, want, i)
        by_src[size][-1] = j
        drop(by_src, want, j)
    return pairs


def _swapped(ta: np.ndarray, sdims, tdims) -> np.ndarray:
    """Device order after all-to-alls moving the minor `s/t` factor of each source dim's
    tiling to the minor end of its target dim (XLA's GetAllToAllSharding)."""
    for sd, td in zip(sdims, tdims):
        shape, moved, hole = [], 0, 0
        for i, size in enumerate(ta.shape):
            if i == sd:
                shape += [ta.shape[td], size // ta.shape[td]]
                moved = len(shape) - 1
            elif i == td:
                shape += [size, 1]
                hole = len(shape) - 1
            else:
                shape.append(size)
        perm = list(range(len(shape)))
        perm[moved], perm[hole] = perm[hole], perm[moved]
        final = list(ta.shape)
        final[sd], final[td] = final[td], final[sd]
        ta = ta.reshape(shape).transpose(perm).reshape(final)
    return ta


def _all_to_all(v: _Value, t: _Tiling, pairs, combine: bool = True) -> _Value:
    """Rule 2: the all-to-alls for `pairs`, then a permute if the device order is off.
    S is the local shard (an all-to-all does not change its size)."""
    s = v.tiling
    if s == t:
        return v
    if not pairs:
        if not _permutable(s, t):
            raise _GaveUp
        return _permute(v, t)
    if combine:  # XLA merges disjoint swaps (sorted by target dim) into one all-to-all
        done, rest, seen = [], [], set()
        for sd, td in sorted(pairs, key=lambda p: p[1]):
            if sd in seen or td in seen:
                rest.append((sd, td))
            else:
                done.append((sd, td))
                seen |= {sd, td}
        if len(done) >= 2:
            if any(s.dim(sd) % s.dim(td) for sd, td in done):
                # The swaps were planned to run one after another; merged, a later one can
                # move a dim's tiling onto a finer one (2 -> 4). XLA's group size is then
                # 0 and the compiler dies of a division by zero (SIGFPE; jax 0.10.2, e.g.
                # ((0,), (), (2,), (1,)) -> ((2,), (1,), (0,), ()) on a 4x2x2 mesh).
                raise _GaveUp
            sdims, tdims = [p[0] for p in done], [p[1] for p in done]
            ta = _swapped(s.ta, sdims, tdims)
            factors = {td: s.dim(sd) // s.dim(td) for sd, td in done}
            step = v.to(_Tiling.make(ta, s.partial, s.rank),
                        v.collective("all-to-all", v.local, _rows(ta, factors)))
            return _all_to_all(step, t, rest, combine=False)
    sd, td = pairs[0]
    ta = _swapped(s.ta, [sd], [td])
    rows = _rows(ta, {td: s.dim(sd) // s.dim(td)})
    step = v.to(_Tiling.make(ta, s.partial, s.rank), v.collective("all-to-all", v.local, rows))
    return _all_to_all(step, t, pairs[1:])


def _tile_index(s: _Tiling) -> np.ndarray:
    """(device, data dim) -> index of the device's tile along that dim."""
    index = np.empty((s.ta.size, s.rank), dtype=np.int64)
    grid = np.indices(s.ta.shape).reshape(s.ta.ndim, -1)
    index[s.ta.ravel()] = grid[:s.rank].T
    return index


def _inside(fine: _Tiling, coarse: _Tiling) -> bool:
    """Every device's tile under `fine` lies inside its tile under `coarse`."""
    if coarse.replicated:
        return True
    if fine.replicated:
        return False
    f = np.array(fine.dims()[:fine.rank])
    c = np.array(coarse.dims()[:coarse.rank])
    if (f % c).any():
        return False
    return bool((_tile_index(fine) // (f // c) == _tile_index(coarse)).all())


def _refinement_of(partial: _Tiling, fine: _Tiling) -> _Tiling | None:
    """A tiling with `fine`'s tile counts that each device can reach from `partial` by a
    local slice (XLA's PartialReplicateReshardCompatibleSharding): `fine` itself if it
    already nests inside `partial`, else `partial`'s replicated dim dealt out to the dims
    that get finer (major part first, each as the minor factor of its dim)."""
    if not partial.partial or fine.replicated:
        return None
    r = partial.rank
    extra = []
    for d in range(r):
        if fine.dim(d) % partial.dim(d):
            return None
        extra.append(fine.dim(d) // partial.dim(d))
    if _inside(fine, partial):
        return fine
    grow = [d for d in range(r) if extra[d] > 1]
    shape = [partial.dim(d) for d in range(r)] + [extra[d] for d in grow]
    perm = []
    for d in range(r):
        perm.append(d)
        if extra[d] > 1:
            perm.append(r + grow.index(d))
    if fine.partial:
        shape.append(fine.dims()[-1])
        perm.append(len(shape) - 1)
    if math.prod(shape) != partial.ta.size:
        return None
    return _Tiling.make(partial.ta.reshape(shape).transpose(perm).reshape(fine.dims()),
                        fine.partial, r)


def _slice_from_partial(v: _Value, t: _Tiling) -> _Value | None:
    """Rule 3: slice locally to a compatible tiling, then permute the (target-sized)
    shard if its device order is not the target's."""
    mid = _refinement_of(v.tiling, t)
    if mid is None:
        return None
    w = v.sliced(mid)
    return _permute(w, t) if _permutable(mid, t) else w.to(t)


def _gather_dims(v: _Value, dims, factors: dict[int, int] | None = None) -> tuple:
    """One all-gather per dim, last dim first, each over the dim's minor `factor` (default
    the whole dim); S is the gathered result."""
    s, local, out = v.tiling, v.local, ()
    for d in sorted(dims, reverse=True):
        f = (factors or {}).get(d, s.dim(d))
        if f == 1:
            continue
        local *= f
        out += (v.collective("all-gather", local, _rows(s.ta, {d: f})),)
    return out


def _gather_to_partial(v: _Value, t: _Tiling) -> _Value | None:
    """Rule 4: XLA finds the tiling with the source's counts that nests in the target
    (`_refinement_of` the other way round), permutes into it if needed, then gathers the
    dropped factor of each dim."""
    s = v.tiling
    mid = _refinement_of(t, s)
    if mid is None:
        return None
    w = _permute(v, mid) if _permutable(s, mid) else v.to(mid)
    factors = {d: mid.dim(d) // t.dim(d) for d in range(s.rank) if mid.dim(d) > t.dim(d)}
    return w.to(t, *_gather_dims(w, factors, factors),
                local=w.local * math.prod(factors.values()))


def _partial_all_to_all(v: _Value, t: _Tiling, depth: int) -> _Value | None:
    """XLA's ReshardPartialReplicateWithAllToAll, a narrow case of rules 3/4: between
    [1, a.., n] replicated-n and [a.., n] with the same device order, via an all-to-all
    with the replicated dim."""
    s = v.tiling
    part, tile = (s, t) if s.partial else (t, s)
    if not part.partial or tile.partial or tile.replicated:
        return None
    n = part.dims()[-1]
    if tile.ndims() + 1 != part.ndims() or part.dim(0) != 1:
        return None
    dim = -1
    for i in range(tile.ndims() - 1, -1, -1):
        if tile.dim(i) > 1 and dim == -1:
            if tile.dim(i) != n:
                return None
            dim = i
        if tile.dim(i) != part.dim(i + 1):
            return None
    if dim == -1 or not (part.ta.reshape(tile.dims()) == tile.ta).all():
        return None
    shape = list(tile.dims())
    shape[dim] = 1
    mid = _Tiling.make(tile.ta.reshape(shape + [n]), True, s.rank)
    if s.partial:
        pairs = _swap_pairs(s, mid)
        if pairs is None:
            return None
        return _reshard(_all_to_all(v, mid, pairs), t, True, depth + 1)
    w = _reshard(v, mid, True, depth + 1)
    pairs = _swap_pairs(w.tiling, t)
    return None if pairs is None else _all_to_all(w, t, pairs)


def _split(s: _Tiling, dim: int, major: int) -> _Tiling:
    shape = list(s.dims())
    shape[dim:dim + 1] = [major, shape[dim] // major]
    return s.reshaped(shape, s.rank + 1)


def _merge(s: _Tiling, dim: int) -> _Tiling:
    shape = list(s.dims())
    shape[dim:dim + 2] = [shape[dim] * shape[dim + 1]]
    return s.reshaped(shape, s.rank - 1)


def _composite(v: _Value, t: _Tiling, depth: int) -> _Value | None:
    """Rule 5 (XLA's TryComplexReshardHandling). Each step after the first must reach its
    target without a full gather, or the whole pattern fails."""
    s = v.tiling
    # (a) [.., X, .., Y, ..] <-> [.., X*Y, .., 1, ..] and [.., X*Y, ..] -> [.., X, ..]:
    # split dim i as (min, rest) on both sides so the move becomes a swap, merge back.
    split = _split_pattern(s, t)
    if split is not None:
        s2, t2, i = split
        w = _reshard(_Value(s2, v.local, v.groups, v.emitted), t2, False, depth + 1)
        if not w.tiling == t2:
            return None
        w = _Value(_merge(w.tiling, i), w.local, v.groups, w.emitted)
        if not w.tiling == t:
            w = _reshard(w, t, False, depth + 1)
        return w if w.tiling == t else None
    # (b) the target replicates as many devices as one source dim times the source's
    # replication: gather that dim first (rule 4), then go on.
    if t.partial:
        rep = s.dims()[-1] if s.partial else 1
        for i in range(s.rank):
            if s.dim(i) != 1 and s.dim(i) * rep == t.dims()[-1]:
                mid = _replicate_dim(s, i)
                w = _reshard(v, mid, True, depth + 1) if not v.tiling == mid else v
                w = _reshard(w, t, False, depth + 1)
                return w if w.tiling == t else None
    # (c) partly replicated source, target splits an unsplit dim by a multiple of the
    # replication: swap the replicated dim into that dim (a local slice), then go on.
    if s.partial and not t.partial:
        rep = s.dims()[-1]
        for i in range(t.ndims()):
            if t.dim(i) != s.dim(i) and s.dim(i) == 1 and t.dim(i) % rep == 0:
                perm = list(range(s.ndims()))
                perm[i], perm[-1] = perm[-1], perm[i]
                mid = _Tiling.make(s.ta.transpose(perm), True, s.rank)
                w = _reshard(v, mid, True, depth + 1)
                w = _reshard(w, t, False, depth + 1)
                return w if w.tiling == t else None
    return None


def _split_pattern(s: _Tiling, t: _Tiling):
    """XLA's PatternMatchMergeOrSplitSharding on even shapes: (split source, split target,
    dim) or None."""
    if s.replicated or t.replicated or s.rank != t.rank or s.partial != t.partial or \
            (s.partial and s.dims()[-1] != t.dims()[-1]):
        return None
    one_side_unsplit, both_split = [], []
    for i in range(s.rank):
        a, b = s.dim(i), t.dim(i)
        if a == b:
            continue
        if min(a, b) == 1:
            one_side_unsplit.append(i)
        elif max(a, b) % min(a, b) == 0:
            both_split.append(i)
    for i in both_split:
        for j in one_side_unsplit:
            if s.dim(i) * s.dim(j) == t.dim(i) * t.dim(j):
                m = min(s.dim(i), t.dim(i))
                return _split(s, i, m), _split(t, i, m), i
    for i in both_split:
        if s.dim(i) > t.dim(i):
            return _split(s, i, t.dim(i)), _split(t, i, t.dim(i)), i
    return None


def _replicate_dim(s: _Tiling, i: int) -> _Tiling:
    """`s` with dim i's tiling moved into the replicated dim, as its major part."""
    perm = [d for d in range(s.rank) if d != i] + [i] + ([s.rank] if s.partial else [])
    shape = list(s.dims())
    shape[i] = 1
    if s.partial:
        shape[-1] *= s.dim(i)
    else:
        shape.append(s.dim(i))
    return _Tiling.make(s.ta.transpose(perm).reshape(shape), True, s.rank)


def _group(s: _Tiling, dims) -> tuple[np.ndarray, _Tiling, list[int]]:
    """Devices sharing the same tile on `dims` (rows, in tile order), the tiling of one
    group with those dims unsplit (ids = positions in the row), and the group counts."""
    ta = s.ta
    order = list(dims) + [d for d in range(ta.ndim) if d not in dims]
    rows = ta.transpose(order).reshape(math.prod(ta.shape[d] for d in dims), -1)
    inner = [1 if d in dims else n for d, n in enumerate(ta.shape)]
    if math.prod(inner) == 1 or (s.partial and math.prod(inner) == inner[-1]):
        return rows, _Tiling(None, False, s.rank), [ta.shape[d] for d in dims]
    return rows, _Tiling.make(np.arange(rows.shape[1]).reshape(inner), s.partial, s.rank), \
        [ta.shape[d] for d in dims]


def _within_groups(v: _Value, t: _Tiling, dims, depth: int) -> _Value:
    """Rule 6: reshard inside each group of devices that share their tiles on `dims`,
    with the target's groups matched to the source's (XLA's AlignGroupsWith), then
    reshard the regrouped result to `t` (a permute when the groups did not line up)."""
    s = v.tiling
    rows, inner_s, counts = _group(s, dims)
    t_rows, inner_t, _ = _group(t, dims)
    where = {int(d): g for g, row in enumerate(rows) for d in row}
    aligned = all({where[int(d)] for d in row} == {g} for g, row in enumerate(t_rows))
    if aligned and not inner_t.replicated:
        pos = {int(d): k for k, d in enumerate(rows[0])}
        renumber = np.array([pos[int(d)] for d in t_rows[0]])
        inner_t = _Tiling.make(renumber[inner_t.ta], inner_t.partial, inner_t.rank)
    sub = _Value(inner_s, v.local,
                 np.array([[g[x] for x in row] for g in v.groups for row in rows]), v.emitted)
    sub = _reshard(sub, inner_t, True, depth + 1)
    back = _Value(_ungroup(rows, inner_t, dims, counts, s.rank), sub.local, v.groups,
                  sub.emitted)
    return _reshard(back, t, True, depth + 1)


def _ungroup(rows: np.ndarray, inner: _Tiling, dims, counts, rank: int) -> _Tiling:
    """The whole tiling from one group's tiling: group index major on each grouped dim."""
    k = rows.shape[1]
    if inner.replicated:
        shape, partial = [1] * rank, k != 1
        if partial:
            shape.append(k)
        ta = np.arange(k).reshape(shape)
    else:
        ta, partial = inner.ta, inner.partial
    # Device of (group index, tile index in the group), then each grouped dim's group
    # index placed just before (major to) its in-group index.
    values = rows.reshape(*counts, k)[..., ta]
    order = []
    for j in range(ta.ndim):
        if j in dims:
            order.append(list(dims).index(j))
        order.append(len(dims) + j)
    full = [n * (counts[list(dims).index(j)] if j in dims else 1) for j, n in enumerate(ta.shape)]
    out = values.transpose(order).reshape(full)
    return _Tiling.make(out, partial, rank)
