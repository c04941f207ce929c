"""Placement: which physical devices form each mesh axis and each pipeline stage.

A logical mesh lays device ids out row-major, so its last axis runs over consecutive entries
of the order, and a pipeline's stages are consecutive slices of it. Placement is therefore
the choice of one device order, made in two steps:

1. `topology_order`: a seed that follows the links, not the id numbering: sites, then
   alike nodes (same device kinds, so a pipeline stage holds one generation), then nodes,
   then devices. With measured pair matrices, nodes (and the devices inside a node) are
   chained by agglomerative clustering on their attained bandwidth, so islands of
   well-connected nodes come out contiguous and each neighbour in the chain is reached
   over a good link.
2. `improve_order`: local search on the traffic of a solved plan. Each assignment of mesh
   axes to link speeds is tried first, then orders that swap two devices, the collectives
   the plan runs (kind, bytes, mesh axes, count) re-timed on the cluster for each; the
   best order found is kept. Ring collectives are as slow as their slowest link, so this
   moves the worst pairs out of the busiest rings.

Both are deterministic; neither depends on how device ids happen to be numbered, except in
how exact ties between equally good orders are broken.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from meshplan.costmodel import Cluster
from meshplan.planner._evaluate import assign, collectives
from meshplan.planner._mesh import CommModel, LogicalMesh

__all__ = ["Traffic", "axis_layouts", "improve_order", "order_cost", "plan_traffic",
           "topology_order"]


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kind of collective a plan runs: `count` times `kind` of `nbytes` over `axes`."""

    kind: str
    nbytes: float
    axes: tuple[int, ...]
    count: float


def _bandwidths(cluster: Cluster) -> np.ndarray:
    """[n, n] bytes/s of each pair, the slower direction of the two (rings go both ways)."""
    n = cluster.num_devices
    src, dst = np.divmod(np.arange(n * n), n)
    bw, _ = cluster._link_arrays(src, dst)
    bw = bw.reshape(n, n)
    return np.minimum(bw, bw.T)


def _chain(units: list[list[int]], bw: np.ndarray) -> list[int]:
    """Concatenate `units` (lists of device ids) into one chain, fastest-linked first.

    Average-linkage agglomeration: repeatedly join the two chains with the highest mean
    bandwidth between their devices, oriented so that the devices at the seam share the
    best link. Islands of fast links finish joining before any slow link is crossed.
    """
    chains = [list(u) for u in units]
    if len(chains) <= 1:
        return [d for c in chains for d in c]
    k = len(chains)
    # Sum of bandwidth between every pair of chains, and their sizes, kept up to date.
    member = np.zeros((k, bw.shape[0]))
    for i, c in enumerate(chains):
        member[i, c] = 1.0
    total = member @ np.where(np.isfinite(bw), bw, 0.0) @ member.T
    size = member.sum(axis=1)
    alive = np.ones(k, dtype=bool)
    while alive.sum() > 1:
        mean = total / np.outer(size, size)
        mean[~alive, :] = -np.inf
        mean[:, ~alive] = -np.inf
        np.fill_diagonal(mean, -np.inf)
        a, b = divmod(int(np.argmax(mean)), k)
        a, b = min(a, b), max(a, b)
        chains[a] = _join(chains[a], chains[b], bw)
        total[a, :] += total[b, :]
        total[:, a] += total[:, b]
        size[a] += size[b]
        alive[b] = False
    return chains[int(np.flatnonzero(alive)[0])]


def _join(x: list[int], y: list[int], bw: np.ndarray) -> list[int]:
    """x then y, each possibly reversed, so that the seam is the fastest link."""
    options = [(x, y), (x, y[::-1]), (x[::-1], y), (x[::-1], y[::-1])]
    a, b = max(options, key=lambda o: bw[o[0][-1], o[1][0]])
    return a + b


def topology_order(cluster: Cluster, ids: Sequence[int] | None = None) -> tuple[int, ...]:
    """Devices ordered so that neighbours share the fastest links (see module docstring).

    >>> from meshplan.costmodel import custom
    >>> topology_order(custom(node_of=[1, 0, 1, 0]))   # nodes contiguous, whatever the ids
    (1, 3, 0, 2)
    """
    ids = list(range(cluster.num_devices)) if ids is None else list(ids)
    site = cluster.site_of or (0,) * cluster.num_devices
    nodes: dict[int, list[int]] = {}
    for i in sorted(ids, key=lambda i: (cluster.node_of[i], i)):
        nodes.setdefault(cluster.node_of[i], []).append(i)
    # Alike nodes side by side, sites first: pipeline stages are consecutive slices of
    # this order, so a stage holds one device generation rather than the slowest of two,
    # whatever the node numbering.
    groups: dict[tuple, list[list[int]]] = {}
    for devs in nodes.values():
        kinds = tuple(sorted(cluster.devices[d].kind for d in devs))
        groups.setdefault((site[devs[0]], kinds), []).append(devs)
    ordered = [groups[k] for k in sorted(groups)]
    if cluster.pair_bandwidth is None:
        # Tiers only: every node of a group looks alike, every device of a node too.
        return tuple(d for g in ordered for devs in g for d in devs)
    bw = _bandwidths(cluster)
    chains = [_chain([_chain([[d] for d in devs], bw) for devs in g], bw) for g in ordered]
    return _oriented(_chain(chains, bw), cluster)


def _oriented(chain: list[int], cluster: Cluster) -> tuple[int, ...]:
    """The chain or its reverse, whichever has the faster links in its own direction
    (links may be asymmetric): a rule on the links, not on the ids."""
    if len(chain) < 2:
        return tuple(chain)
    a, b = np.asarray(chain[:-1]), np.asarray(chain[1:])
    forward, _ = cluster._link_arrays(a, b)
    backward, _ = cluster._link_arrays(b, a)
    return tuple(chain[::-1] if backward.sum() > forward.sum() else chain)


def axis_layouts(order: Sequence[int], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """`order` laid out with each permutation of the mesh axes taking the innermost
    (fastest-linked) positions in turn: which axis gets the fast links is a choice."""
    base = np.asarray(order)
    out = []
    for perm in itertools.permutations(range(len(shape))):
        grid = base.reshape([shape[a] for a in perm]).transpose(np.argsort(perm))
        flat = tuple(int(d) for d in grid.reshape(-1))
        if flat not in out:
            out.append(flat)
    return out


def order_cost(cluster: Cluster, shape: tuple[int, ...], order: Sequence[int],
               traffic: Sequence[Traffic], shared: dict | None = None) -> float:
    """Seconds the collectives in `traffic` take on the mesh `shape` laid over `order`."""
    comm = CommModel(cluster, LogicalMesh(tuple(shape), tuple(order)), shared)
    return sum(t.count * comm.time(t.kind, t.nbytes, t.axes) for t in traffic)


def improve_order(cluster: Cluster, shape: tuple[int, ...], order: Sequence[int],
                  traffic: Sequence[Traffic], max_evaluations: int = 200
                  ) -> tuple[tuple[int, ...], float]:
    """First-improvement pair swaps on `order` for `traffic`; (best order, its seconds).

    Swaps are tried position pair by position pair, in a fixed order, until a whole pass
    finds nothing better or `max_evaluations` orders have been timed (each timing re-fits
    every axis's collectives, so the budget bounds the search on large clusters;
    deterministic, unlike a wall-clock limit).
    """
    shared: dict = {}  # group times by group: swaps leave most groups unchanged
    # Start from the best assignment of axes to link speeds (a swap search cannot move a
    # whole axis from the slow links to the fast ones: no single swap improves a ring
    # whose slowest link stays in it).
    seeds = [(order_cost(cluster, shape, o, traffic, shared), o)
             for o in axis_layouts(order, shape)]
    best, start = min(seeds, key=lambda s: s[0])
    order = list(start)
    evals = len(seeds)
    n = len(order)
    improved = True
    while improved and evals < max_evaluations:
        improved = False
        for i in range(n):
            for j in range(i + 1, n):
                if evals >= max_evaluations:
                    break
                order[i], order[j] = order[j], order[i]
                t = order_cost(cluster, shape, order, traffic, shared)
                evals += 1
                if t < best * (1 - 1e-9):
                    best, improved = t, True
                else:
                    order[i], order[j] = order[j], order[i]
    return tuple(order), best


def plan_traffic(problem, choice) -> list[Traffic]:
    """The collectives a solved plan runs, merged by (kind, bytes, axes): its own
    collectives and its reshards, as `evaluate` counts them."""
    counts: dict[tuple, float] = {}
    for c, mult, _ in collectives(problem, choice, assign(problem, choice)):
        key = (c.kind, float(c.nbytes), tuple(c.axes))
        counts[key] = counts.get(key, 0.0) + mult
    return [Traffic(k, b, ax, m) for (k, b, ax), m in counts.items() if ax]

