"""Collective communication: bytes sent per device, and time per algorithm (alpha-beta).

Conventions, for a group of ``n`` devices and an operand of ``S`` bytes:

- ``S`` means what :func:`comm_bytes` means by it: the all-reduce buffer; the *gathered*
  all-gather result; the full, un-scattered reduce-scatter operand; the full all-to-all
  operand of one device; the bytes each device sends in a collective-permute.
- A step in which several pairs exchange messages of ``b`` bytes at once takes
  ``alpha + b / beta`` with ``alpha`` the *largest* latency and ``beta`` the *smallest*
  bandwidth among the step's pairs: a synchronous step is as slow as its slowest link.
  Bandwidths are per direction, so the two directions of an exchange do not compete.
- A group is an ordered sequence of device ids; rings follow that order (the planner's
  placement chooses it).

Algorithms (keys of :func:`collective_algorithms`; AR all-reduce, AG all-gather, RS
reduce-scatter, A2A all-to-all, CP collective-permute):

==================  ==========================================================  ============
key                 what                                                        kinds
==================  ==========================================================  ============
ring                bandwidth-optimal ring (Patarasuk & Yuan 2009)              AR, AG, RS
halving_doubling    Rabenseifner: recursive-halving RS + recursive-doubling AG  AR
recursive_doubling  recursive doubling, whole buffer each step                  AR
bruck               Bruck et al. 1997 dissemination, ceil(log2 n) steps         AG, RS, A2A
pairwise            pairwise exchange, n-1 steps of S/n                         A2A
hierarchical        inside nodes on the fast tier, across nodes on S/m          AR, AG, RS
star                gather to a root, then send out: two latency hops           AR, AG, RS, A2A
direct              every pair at once                                          CP
==================  ==========================================================  ============

The tree-like, latency-optimal family of the design notes is ``recursive_doubling``,
``halving_doubling`` and ``bruck``. Main reference: R. Thakur, R. Rabenseifner, W. Gropp,
"Optimization of Collective Communication Operations in MPICH", IJHPCA 19(1), 2005.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meshplan.costmodel._cluster import Cluster
from meshplan.costmodel._device import _check_int, _check_number

__all__ = ["comm_bytes", "collective_time", "collective_algorithms", "p2p_time",
           "COLLECTIVE_KINDS"]

# The HLO names of the collectives (an immutable tuple).
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute")

# Star's root is searched over every member up to this group size; above it, over the first
# member of each node only (a cost bound, O(n * roots) link lookups; with uniform tiers every
# member of a node is an equivalent root anyway).
_STAR_ALL_ROOTS_MAX = 512


def _check_kind(kind: Any) -> str:
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(
            f"unknown collective kind {kind!r}; expected one of {list(COLLECTIVE_KINDS)} "
            "(the HLO op names)")
    return kind


def comm_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes one device sends for a collective over `n` devices, run as a ring.

    The definition shared by prediction and measurement (DESIGN.md, "comm_bytes"):
    all-reduce ``2(n-1)/n*S``; all-gather ``(n-1)/n*S`` with S the gathered result;
    reduce-scatter and all-to-all ``(n-1)/n*S`` with S the full operand; collective-permute
    ``S``. A group of one device sends nothing.

    >>> comm_bytes("all-reduce", 1000, 8)
    1750.0
    >>> comm_bytes("all-gather", 1000, 8), comm_bytes("collective-permute", 1000, 8)
    (875.0, 1000.0)
    >>> comm_bytes("all-reduce", 1000, 1)
    0.0
    """
    _check_kind(kind)
    s = _check_number(nbytes, "nbytes", "bytes", allow_zero=True)
    n = _check_int(n, "n (the group size)", minimum=1)
    if n == 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * s
    if kind == "collective-permute":
        return s
    return (n - 1) / n * s


# ----------------------------------------------------------------------------------------
# Inputs


def _as_group(group: Any, cluster: Cluster) -> np.ndarray:
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a meshplan Cluster; got {type(cluster).__name__}")
    if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
        raise ValueError(f"group must be a sequence of device ids; got {group!r}")
    ids = [cluster._check_device(i, "group member") for i in group]
    if not ids:
        raise ValueError("group is empty; pass the device ids taking part (at least one)")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"group {list(ids)} lists devices {dup} more than once; list each once")
    return np.array(ids, dtype=np.int64)


def _as_pairs(group: Any, cluster: Cluster) -> tuple[np.ndarray, np.ndarray]:
    """collective-permute: explicit (source, target) pairs, or ids shifted cyclically."""
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a meshplan Cluster; got {type(cluster).__name__}")
    items = list(group) if isinstance(group, (Sequence, np.ndarray)) else None
    if items and all(isinstance(p, (tuple, list, np.ndarray)) for p in items):
        src, dst = [], []
        for k, p in enumerate(items):
            if len(p) != 2:
                raise ValueError(f"collective-permute pair {k} must be (source, target); got {p!r}")
            src.append(cluster._check_device(p[0], f"pair {k} source"))
            dst.append(cluster._check_device(p[1], f"pair {k} target"))
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
    g = _as_group(group, cluster)
    return g, np.roll(g, -1)


# ----------------------------------------------------------------------------------------
# Building blocks


def _step(cluster: Cluster, src: np.ndarray, dst: np.ndarray, nbytes: float) -> float:
    """One synchronous step: every (src[k] -> dst[k]) sends `nbytes` at once.

    alpha = max latency, beta = min bandwidth over the step's pairs (slowest link rule).
    """
    keep = src != dst
    if not keep.any():
        return 0.0
    bw, lat = cluster._link_arrays(src[keep], dst[keep])
    return float(lat.max() + nbytes / bw.min())


def _ring_links(cluster: Cluster, g: np.ndarray) -> tuple[float, float]:
    """(alpha, beta) of the ring g[0] -> g[1] -> ... -> g[n-1] -> g[0]."""
    bw, lat = cluster._link_arrays(g, np.roll(g, -1))
    return float(lat.max()), float(bw.min())


def _ring(kind: str, s: float, g: np.ndarray, cluster: Cluster) -> float:
    """Ring (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
    workstations", JPDC 69(2); Thakur et al. 2005 §4.1).

    With alpha the largest latency and beta the smallest bandwidth among the ring's n links
    (wrap-around included):

    - all-reduce: ``2(n-1) * alpha + 2(n-1)/n * S / beta`` (reduce-scatter then all-gather).
    - all-gather, reduce-scatter: ``(n-1) * alpha + (n-1)/n * S / beta``.
    """
    n = len(g)
    alpha, beta = _ring_links(cluster, g)
    steps = 2 * (n - 1) if kind == "all-reduce" else n - 1
    return steps * alpha + steps * (s / n) / beta


def _fold(n: int) -> tuple[int, int]:
    """(p, r): the largest power of two p <= n, and r = n - p extra members."""
    p = 1 << (n.bit_length() - 1)
    return p, n - p


def _butterfly_steps(g: np.ndarray, cluster: Cluster, sizes: Sequence[tuple[int, float]],
                     s: float) -> float:
    """Sum of steps in which member i < p exchanges with i XOR d (d, bytes) per step.

    Non-power-of-two groups first fold the r = n - p extra members into the first r
    (member p+i sends its S bytes to member i) and send the result back at the end, as
    MPICH's recursive doubling does (Thakur et al. 2005 §4.4).
    """
    n = len(g)
    p, r = _fold(n)
    idx = np.arange(p)
    total = 0.0
    if r:
        total += _step(cluster, g[p:], g[:r], s) + _step(cluster, g[:r], g[p:], s)
    for d, b in sizes:
        total += _step(cluster, g[idx], g[idx ^ d], b)
    return total


def _recursive_doubling(s: float, g: np.ndarray, cluster: Cluster) -> float:
    """All-reduce by recursive doubling (Thakur et al. 2005 §4.4, short messages).

    ``log2(p)`` steps, in step k members at distance ``2^k`` exchange and combine the whole
    buffer: ``log2(p) * (alpha + S / beta)``, plus ``2 (alpha + S / beta)`` to fold in the
    ``n - p`` extra members when n is not a power of two (p = largest power of two <= n).
    Latency-optimal, ``log2(n) * S`` bytes: wins for small messages.
    """
    p, _ = _fold(len(g))
    sizes = [(1 << k, s) for k in range(p.bit_length() - 1)]
    return _butterfly_steps(g, cluster, sizes, s)


def _halving_doubling(s: float, g: np.ndarray, cluster: Cluster) -> float:
    """All-reduce by Rabenseifner's algorithm (Thakur et al. 2005 §4.4, long messages).

    Reduce-scatter by recursive halving, then all-gather by recursive doubling. Step k of the
    halving exchanges ``S / 2^(k+1)`` bytes with the member at distance ``2^k`` (nearest
    first, so the largest messages stay on the fastest links of a node-ordered group); the
    doubling mirrors it: ``2 log2(p) * alpha + 2 (p-1)/p * S / beta`` on uniform links, plus
    ``2 (alpha + S / beta)`` to fold in extra members when n is not a power of two.
    """
    p, _ = _fold(len(g))
    logp = p.bit_length() - 1
    halving = [(1 << k, s / (1 << (k + 1))) for k in range(logp)]
    return _butterfly_steps(g, cluster, halving + halving[::-1], s)


def _bruck(kind: str, s: float, g: np.ndarray, cluster: Cluster) -> float:
    """Bruck et al. 1997 ("Efficient algorithms for all-to-all communications in multiport
    message-passing systems", IEEE TPDS 8(11)); Thakur et al. 2005 §3 and §4.

    ``K = ceil(log2 n)`` steps; in step k member i sends to member ``i -+ 2^k (mod n)``:

    - all-gather: ``min(2^k, n - 2^k)`` blocks of ``S/n`` in step k, in all
      ``K * alpha + (n-1)/n * S / beta`` on uniform links, for any n.
    - reduce-scatter: the same steps in reverse order and direction (the transpose of the
      all-gather), the same cost.
    - all-to-all: in step k the blocks whose index has bit k set, about ``S/2`` bytes:
      ``K * alpha + K * S/2 / beta``. Latency-optimal; wins for small messages.
    """
    n = len(g)
    steps = (n - 1).bit_length()  # ceil(log2 n)
    idx = np.arange(n)
    total = 0.0
    for k in range(steps):
        d = 1 << k
        if kind == "all-to-all":
            blocks = sum(1 for j in range(1, n) if j & d)
            total += _step(cluster, g, g[(idx + d) % n], blocks * s / n)
        elif kind == "all-gather":
            total += _step(cluster, g, g[(idx - d) % n], min(d, n - d) * s / n)
        else:  # reduce-scatter: the all-gather reversed; order does not change a sum
            total += _step(cluster, g, g[(idx + d) % n], min(d, n - d) * s / n)
    return total


def _group_matrix(cluster: Cluster, g: np.ndarray, roots: np.ndarray):
    """Links from every member to each root and back: arrays of shape [len(roots), n]."""
    n = len(g)
    src = np.repeat(g[None, :], len(roots), axis=0).ravel()
    dst = np.repeat(g[roots], n)
    bw_in, lat_in = cluster._link_arrays(src, dst)
    bw_out, lat_out = cluster._link_arrays(dst, src)
    shape = (len(roots), n)
    return (bw_in.reshape(shape), lat_in.reshape(shape),
            bw_out.reshape(shape), lat_out.reshape(shape))


def _pairwise(s: float, g: np.ndarray, cluster: Cluster) -> float:
    """All-to-all by pairwise exchange (Thakur et al. 2005 §3, long messages).

    ``n - 1`` steps; in step k member i sends its block of ``S/n`` bytes for member
    ``i + k (mod n)``: ``sum_k (alpha_k + S/n / beta_k)``, i.e. ``(n-1) * alpha +
    (n-1)/n * S / beta`` on uniform links. Bandwidth-optimal; every pair is used once, so
    the slowest pair of the group limits one step.
    """
    n = len(g)
    idx = np.arange(n)
    total = 0.0
    for k in range(1, n):
        total += _step(cluster, g, g[(idx + k) % n], s / n)
    return total


def _star(kind: str, s: float, g: np.ndarray, cluster: Cluster) -> float:
    """Gather everything at one root, then send each member its result.

    Two latency hops; the root's link carries every message in turn, so with ``b_in`` bytes
    from each member and ``b_out`` bytes to each:
    ``max alpha + sum_members b_in / beta(member->root) + max alpha + sum_members b_out /
    beta(root->member)``, i.e. ``2 alpha + (n-1)(b_in + b_out) / beta`` on uniform links,
    minimised over the root. ``b_in, b_out``: all-reduce ``S, S``; all-gather
    ``S/n, (n-1)/n S``; reduce-scatter ``S, S/n``; all-to-all ``(n-1)/n S`` both ways. Wins
    only when latency dominates (small messages on slow, high-latency links).
    """
    n = len(g)
    b_in, b_out = {
        "all-reduce": (s, s),
        "all-gather": (s / n, (n - 1) / n * s),
        "reduce-scatter": (s, s / n),
        "all-to-all": ((n - 1) / n * s, (n - 1) / n * s),
    }[kind]
    if n <= _STAR_ALL_ROOTS_MAX:
        roots = np.arange(n)
    else:
        node = np.asarray(cluster.node_of)[g]
        _, roots = np.unique(node, return_index=True)
    bw_in, lat_in, bw_out, lat_out = _group_matrix(cluster, g, roots)
    # A member's own (infinite-bandwidth, zero-latency) entry adds nothing.
    t = (lat_in.max(axis=1) + (b_in / bw_in).sum(axis=1)
         + lat_out.max(axis=1) + (b_out / bw_out).sum(axis=1))
    return float(t.min())


# ----------------------------------------------------------------------------------------
# Hierarchical: fast tier inside nodes, slow tier across, on 1/m of the data.


def _nodes_of_group(g: np.ndarray, cluster: Cluster) -> list[np.ndarray] | None:
    """Members per node (group order kept), if the group spans >= 2 nodes with the same
    number m >= 2 of members on each; else None (hierarchical does not apply)."""
    members: dict[int, list[int]] = {}
    for dev in g.tolist():
        members.setdefault(cluster.node_of[dev], []).append(dev)
    sizes = {len(v) for v in members.values()}
    if len(members) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return None
    return [np.array(v, dtype=np.int64) for v in members.values()]


def _phase(kind: str, s: float, groups: Sequence[np.ndarray], cluster: Cluster) -> float:
    """Concurrent collectives over disjoint `groups`: one flat algorithm for all, the best."""
    per_algo: dict[str, float] = {}
    for grp in groups:
        for name, t in _flat(kind, s, grp, cluster).items():
            per_algo[name] = max(per_algo.get(name, 0.0), t)
    return min(per_algo.values())


def _hierarchical(kind: str, s: float, nodes: list[np.ndarray], cluster: Cluster) -> float:
    """Two-level collective over k nodes with m group members each.

    The inner groups are the members of one node (fast tier); the outer groups are the l-th
    members of every node (m such groups run at once, one per local rank, each over its own
    per-device inter-node link). Each phase uses the best flat algorithm for it:

    - all-reduce: reduce-scatter S inside nodes, all-reduce S/m across nodes, all-gather S
      inside nodes (NCCL's and Horovod's hierarchical all-reduce; with rings
      ``2[(m-1) alpha_f + (m-1)/m S / beta_f] + 2(k-1) alpha_s + 2(k-1)/k S/m / beta_s``).
    - all-gather: all-gather S/m across nodes, then S inside nodes.
    - reduce-scatter: reduce-scatter S inside nodes, then S/m across nodes.

    Only the slow tier's share shrinks by m; that is why it beats a flat ring whose
    slowest (inter-node) link carries the full ``(n-1)/n`` share.
    """
    m = len(nodes[0])
    inner = nodes
    outer = [np.array([nd[l] for nd in nodes], dtype=np.int64) for l in range(m)]
    if kind == "all-reduce":
        return (_phase("reduce-scatter", s, inner, cluster)
                + _phase("all-reduce", s / m, outer, cluster)
                + _phase("all-gather", s, inner, cluster))
    if kind == "all-gather":
        return _phase("all-gather", s / m, outer, cluster) + _phase("all-gather", s, inner,
                                                                     cluster)
    return (_phase("reduce-scatter", s, inner, cluster)
            + _phase("reduce-scatter", s / m, outer, cluster))


def _flat(kind: str, s: float, g: np.ndarray, cluster: Cluster) -> dict[str, float]:
    """Single-level algorithms for a group of n >= 2."""
    if len(g) == 1:
        return {"local": 0.0}
    if kind == "all-reduce":
        return {"ring": _ring(kind, s, g, cluster),
                "recursive_doubling": _recursive_doubling(s, g, cluster),
                "halving_doubling": _halving_doubling(s, g, cluster),
                "star": _star(kind, s, g, cluster)}
    if kind in ("all-gather", "reduce-scatter"):
        return {"ring": _ring(kind, s, g, cluster),
                "bruck": _bruck(kind, s, g, cluster),
                "star": _star(kind, s, g, cluster)}
    # all-to-all
    return {"pairwise": _pairwise(s, g, cluster),
            "bruck": _bruck(kind, s, g, cluster),
            "star": _star(kind, s, g, cluster)}


# ----------------------------------------------------------------------------------------
# Public entry points


def collective_algorithms(kind: str, nbytes: float, group: Sequence[int],
                          cluster: Cluster) -> dict[str, float]:
    """Time in seconds of each applicable algorithm for one collective.

    Args:
      kind: an HLO collective name: ``"all-reduce"``, ``"all-gather"``,
        ``"reduce-scatter"``, ``"all-to-all"``, ``"collective-permute"``.
      nbytes: S in bytes, as :func:`comm_bytes` defines it for `kind`.
      group: the ordered device ids taking part. For ``"collective-permute"`` either a list
        of ``(source, target)`` pairs, or device ids of which each sends to the next
        (cyclically).
      cluster: the :class:`Cluster` giving the links.

    Returns:
      ``{algorithm: seconds}``; keys are listed in the module docstring. A group of one
      device gives ``{"local": 0.0}``; collective-permute gives ``{"direct": t}`` with
      ``t = max over pairs (alpha + S / beta)``. ``hierarchical`` appears only when the
      group spans at least two nodes with the same number (at least 2) of members on each.

    >>> from meshplan.costmodel import dgx_a100
    >>> t = collective_algorithms("all-reduce", 1e9, range(16), dgx_a100(nodes=2))
    >>> sorted(t)
    ['halving_doubling', 'hierarchical', 'recursive_doubling', 'ring', 'star']
    >>> t["hierarchical"] < t["ring"]
    True
    """
    _check_kind(kind)
    s = _check_number(nbytes, "nbytes", "bytes", allow_zero=True)
    if kind == "collective-permute":
        src, dst = _as_pairs(group, cluster)
        keep = src != dst
        if not keep.any():
            return {"local": 0.0}
        bw, lat = cluster._link_arrays(src[keep], dst[keep])
        return {"direct": float((lat + s / bw).max())}
    g = _as_group(group, cluster)
    out = _flat(kind, s, g, cluster)
    if kind != "all-to-all" and len(g) > 1:
        nodes = _nodes_of_group(g, cluster)
        if nodes is not None:
            out["hierarchical"] = _hierarchical(kind, s, nodes, cluster)
    return out


def collective_time(kind: str, nbytes: float, group: Sequence[int], cluster: Cluster) -> float:
    """Seconds for one collective: the fastest of :func:`collective_algorithms`.

    >>> from meshplan.costmodel import custom
    >>> c = custom(node_of=[0] * 4, intra=(100e9, 1e-6))
    >>> t = collective_algorithms("all-gather", 4e6, [0, 1, 2, 3], c)
    >>> abs(t["ring"] - (3 * 1e-6 + 3 / 4 * 4e6 / 100e9)) < 1e-15   # the closed form
    True
    >>> collective_time("all-gather", 4e6, [0, 1, 2, 3], c) == min(t.values())
    True
    >>> collective_time("all-reduce", 1e6, [2], c)
    0.0
    """
    return min(collective_algorithms(kind, nbytes, group, cluster).values())


def p2p_time(nbytes: float, src: int, dst: int, cluster: Cluster) -> float:
    """Seconds to send `nbytes` from device `src` to device `dst`: ``alpha + S / beta``.

    >>> from meshplan.costmodel import dgx_a100
    >>> p2p_time(25e9, 0, 8, dgx_a100(nodes=2))   # 1 s over IB plus 5 us
    1.000005
    >>> p2p_time(1e9, 3, 3, dgx_a100())
    0.0
    """
    s = _check_number(nbytes, "nbytes", "bytes", allow_zero=True)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a meshplan Cluster; got {type(cluster).__name__}")
    bw, lat = cluster.link(src, dst)
    return 0.0 if src == dst else lat + s / bw
