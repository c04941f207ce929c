"""Clusters: devices plus a topology of link tiers, with optional measured pair overrides.

A :class:`Cluster` says, for every ordered pair of devices, how fast and how far apart they
are: the pair's tier (inside a node, between nodes, between sites) gives a bandwidth and a
latency, and an optional per-pair matrix overrides single pairs with measured values.

Cluster files are JSON (never pickle); :meth:`Cluster.load` validates every field and names
the one at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meshplan.costmodel._device import (
    CPU,
    DeviceSpec,
    _check_int,
    _check_number,
    _check_str,
    _device_from_dict,
    _presets_by_kind,
)

__all__ = ["LinkTier", "Cluster"]

_FORMAT = "meshplan.cluster"
_VERSION = 1
_TOP_KEYS = ("format", "version", "name", "devices", "node_of", "site_of", "tiers",
             "pair_bandwidth", "pair_latency")
_TIER_KEYS = ("name", "bandwidth", "latency")


@dataclasses.dataclass(frozen=True)
class LinkTier:
    """One kind of link, e.g. NVLink inside a node or InfiniBand between nodes.

    Attributes:
      name: a label such as ``"nvlink"``; shown in cost breakdowns.
      bandwidth: bytes/s per direction per device (what one device can send while it also
        receives as much), e.g. 300e9 for A100 NVLink.
      latency: seconds per message hop (the alpha of the alpha-beta model), e.g. 1e-6.

    >>> LinkTier("infiniband", 25e9, 5e-6)
    LinkTier(name='infiniband', bandwidth=25000000000.0, latency=5e-06)
    """

    name: str
    bandwidth: float
    latency: float

    def __post_init__(self):
        _check_str(self.name, "LinkTier.name")
        object.__setattr__(self, "bandwidth", _check_number(
            self.bandwidth, f"LinkTier.bandwidth of {self.name!r}", "bytes/s per direction"))
        object.__setattr__(self, "latency", _check_number(
            self.latency, f"LinkTier.latency of {self.name!r}", "seconds", allow_zero=True))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bandwidth": self.bandwidth, "latency": self.latency}


def _dense_ids(ids: tuple[int, ...], field: str) -> int:
    """Check that ids are exactly 0..k-1 (each used); return k."""
    k = max(ids) + 1
    unused = sorted(set(range(k)) - set(ids))
    if unused:
        raise ValueError(
            f"Cluster.{field} uses ids {sorted(set(ids))} but skips {unused}; ids must be "
            f"0..{len(set(ids)) - 1} with no gaps: renumber them")
    return k


def _as_matrix(value: Any, n: int, field: str, *, allow_zero: bool) -> tuple:
    """Normalise an [n, n] override matrix: rows of float | None (None = use the tier).

    NaN also means "no override". Diagonal entries are ignored (a device reaches itself for
    free) and stored as None.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"Cluster.{field} must be an [{n}, {n}] matrix (one row per device, None for no "
            f"override); got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(
            f"Cluster.{field} has {len(value)} rows; expected {n} (one per device): give an "
            f"[{n}, {n}] matrix")
    rows = []
    what = "seconds" if allow_zero else "bytes/s per direction"
    for i, row in enumerate(value):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != n:
            got = len(row) if isinstance(row, Sequence) else type(row).__name__
            raise ValueError(
                f"Cluster.{field}[{i}] must be a row of {n} entries (one per device); got "
                f"{got}: give an [{n}, {n}] matrix")
        out = []
        for j, x in enumerate(row):
            if i == j or x is None or (isinstance(x, float) and math.isnan(x)):
                out.append(None)
            else:
                out.append(_check_number(x, f"Cluster.{field}[{i}][{j}]", what,
                                         allow_zero=allow_zero))
        rows.append(tuple(out))
    return tuple(rows)


def _matrix_array(matrix: tuple | None) -> np.ndarray | None:
    """Float array of an override matrix, NaN where the tier applies; read-only."""
    if matrix is None:
        return None
    arr = np.array([[np.nan if x is None else x for x in row] for row in matrix], dtype=float)
    arr.flags.writeable = False
    return arr


@dataclasses.dataclass(frozen=True, repr=False)
class Cluster:
    """Devices and the links between them.

    Attributes:
      devices: one :class:`DeviceSpec` per device; device ``i`` is ``devices[i]``. Kinds may
        be mixed.
      node_of: node id of each device, ids ``0..num_nodes-1`` without gaps.
      tiers: ``tiers[0]`` links devices of one node, ``tiers[1]`` devices of different nodes
        (required when there are several nodes), ``tiers[2]`` devices of different sites
        (given exactly when ``site_of`` is).
      site_of: optional site id of each device (ids without gaps; a node lies in one site).
      pair_bandwidth: optional ``[n, n]`` bytes/s per direction for the ordered pair
        ``(i, j)``; ``None`` (or NaN) entries keep the tier's value, so single measured pairs
        can be overridden. The diagonal is ignored. Rows may differ from columns (links can
        be asymmetric).
      pair_latency: the same for latency, seconds.
      name: a label; it does not change any cost and is left out of :meth:`fingerprint`.

    Lists and numpy arrays are accepted and stored as tuples, so clusters are hashable and
    compare by value.

    Example:

    >>> from meshplan.costmodel import A100_80GB
    >>> c = Cluster(devices=(A100_80GB,) * 4, node_of=(0, 0, 1, 1),
    ...             tiers=(LinkTier("nvlink", 300e9, 1e-6), LinkTier("ib", 25e9, 5e-6)))
    >>> c.num_devices, c.num_nodes, c.devices_of_node(1)
    (4, 2, (2, 3))
    >>> c.link(0, 1), c.link(1, 2), c.tier_of(1, 2)
    ((300000000000.0, 1e-06), (25000000000.0, 5e-06), 1)
    >>> Cluster.from_json(c.to_json()) == c
    True
    """

    devices: tuple[DeviceSpec, ...]
    node_of: tuple[int, ...]
    tiers: tuple[LinkTier, ...]
    site_of: tuple[int, ...] | None = None
    pair_bandwidth: tuple[tuple[float | None, ...], ...] | None = None
    pair_latency: tuple[tuple[float | None, ...], ...] | None = None
    name: str = "custom"

    # -- validation ------------------------------------------------------------------------

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        _check_str(self.name, "Cluster.name")
        devices = tuple(self.devices)
        if not devices:
            raise ValueError("Cluster.devices is empty; a cluster needs at least one device")
        for k, d in enumerate(devices):
            if not isinstance(d, DeviceSpec):
                raise TypeError(
                    f"Cluster.devices[{k}] must be a DeviceSpec (e.g. A100_80GB); got {d!r}")
        set_("devices", devices)
        n = len(devices)

        node_of = tuple(_check_int(x, f"Cluster.node_of[{k}]") for k, x in enumerate(
            self._seq(self.node_of, "node_of")))
        if len(node_of) != n:
            raise ValueError(
                f"Cluster.node_of has {len(node_of)} entries but there are {n} devices; give "
                "one node id per device")
        num_nodes = _dense_ids(node_of, "node_of")
        set_("node_of", node_of)

        tiers = tuple(self._seq(self.tiers, "tiers"))
        for k, t in enumerate(tiers):
            if not isinstance(t, LinkTier):
                raise TypeError(f"Cluster.tiers[{k}] must be a LinkTier; got {t!r}")
        if not 1 <= len(tiers) <= 3:
            raise ValueError(
                f"Cluster.tiers has {len(tiers)} entries; expected 1 to 3 (intra-node, "
                "inter-node, inter-site)")
        if num_nodes > 1 and len(tiers) < 2:
            raise ValueError(
                f"Cluster.tiers has 1 entry but node_of puts devices on {num_nodes} nodes; "
                "add the inter-node link as tiers[1]")
        set_("tiers", tiers)

        if self.site_of is None:
            if len(tiers) == 3:
                raise ValueError(
                    "Cluster.tiers has an inter-site tier (tiers[2]) but site_of is None; give "
                    "site_of (one site id per device) or drop tiers[2]")
        else:
            site_of = tuple(_check_int(x, f"Cluster.site_of[{k}]") for k, x in enumerate(
                self._seq(self.site_of, "site_of")))
            if len(site_of) != n:
                raise ValueError(
                    f"Cluster.site_of has {len(site_of)} entries but there are {n} devices; "
                    "give one site id per device")
            _dense_ids(site_of, "site_of")
            if len(tiers) != 3:
                raise ValueError(
                    f"Cluster.site_of is given but tiers has {len(tiers)} entries; give three "
                    "tiers (intra-node, inter-node, inter-site)")
            site_of_node: dict[int, int] = {}
            for dev, (node, site) in enumerate(zip(node_of, site_of)):
                if site_of_node.setdefault(node, site) != site:
                    raise ValueError(
                        f"Cluster.site_of puts node {node} in sites {site_of_node[node]} and "
                        f"{site} (device {dev}); all devices of a node must share a site")
            set_("site_of", site_of)

        if self.pair_bandwidth is not None:
            set_("pair_bandwidth", _as_matrix(self.pair_bandwidth, n, "pair_bandwidth",
                                              allow_zero=False))
        if self.pair_latency is not None:
            set_("pair_latency", _as_matrix(self.pair_latency, n, "pair_latency",
                                            allow_zero=True))

    @staticmethod
    def _seq(value: Any, field: str) -> Sequence:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ValueError(f"Cluster.{field} must be a list; got {value!r}")
        return value

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for d in self.devices:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        devs = ", ".join(f"{k} x{v}" for k, v in kinds.items())
        tiers = ", ".join(f"{t.name} {t.bandwidth / 1e9:g} GB/s {t.latency * 1e6:g} us"
                          for t in self.tiers)
        extra = " + pair overrides" if (self.pair_bandwidth or self.pair_latency) else ""
        return (f"Cluster(name={self.name!r}, {self.num_devices} devices ({devs}), "
                f"{self.num_nodes} nodes, tiers: {tiers}{extra})")

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        """Number of devices."""
        return len(self.devices)

    @property
    def num_nodes(self) -> int:
        """Number of nodes (node ids are 0..num_nodes-1)."""
        return max(self.node_of) + 1

    def _check_device(self, i: Any, what: str = "device id") -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not (
                0 <= i < self.num_devices):
            raise ValueError(
                f"{what} {i!r} is not a device of cluster {self.name!r}; expected an integer "
                f"in 0..{self.num_devices - 1}")
        return int(i)

    def devices_of_node(self, node: int) -> tuple[int, ...]:
        """Device ids on `node`, ascending.

        >>> from meshplan.costmodel import dgx_a100
        >>> dgx_a100(nodes=2).devices_of_node(1)
        (8, 9, 10, 11, 12, 13, 14, 15)
        """
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or not (
                0 <= node < self.num_nodes):
            raise ValueError(
                f"node {node!r} is not a node of cluster {self.name!r}; expected an integer "
                f"in 0..{self.num_nodes - 1}")
        return tuple(i for i, m in enumerate(self.node_of) if m == node)

    def tier_of(self, i: int, j: int) -> int:
        """Index into :attr:`tiers` of the link from device `i` to device `j`.

        0 inside a node (and for ``i == j``), 1 between nodes, 2 between sites.
        """
        i, j = self._check_device(i), self._check_device(j)
        if self.site_of is not None and self.site_of[i] != self.site_of[j]:
            return 2
        return 0 if self.node_of[i] == self.node_of[j] else 1

    def link(self, i: int, j: int) -> tuple[float, float]:
        """``(bandwidth bytes/s, latency s)`` from device `i` to device `j`.

        A pair matrix entry, when given, overrides the tier; ``i == j`` gives ``(inf, 0)``.
        """
        t = self.tiers[self.tier_of(i, j)]
        if i == j:
            return math.inf, 0.0
        bw, lat = t.bandwidth, t.latency
        if self.pair_bandwidth is not None and self.pair_bandwidth[i][j] is not None:
            bw = self.pair_bandwidth[i][j]
        if self.pair_latency is not None and self.pair_latency[i][j] is not None:
            lat = self.pair_latency[i][j]
        return bw, lat

    def memory_bytes(self, i: int) -> float:
        """Memory of device `i`, bytes."""
        return self.devices[self._check_device(i)].memory_bytes

    # Vectorised link lookup for the collective formulas. The arrays are derived from the
    # immutable fields once per instance (cached on the instance, not in a global).
    @functools.cached_property
    def _arrays(self) -> dict[str, np.ndarray | None]:
        def ro(a):
            a = np.asarray(a)
            a.flags.writeable = False
            return a
        return {
            "node": ro(np.array(self.node_of, dtype=np.int64)),
            "site": None if self.site_of is None else ro(np.array(self.site_of, np.int64)),
            "tier_bw": ro(np.array([t.bandwidth for t in self.tiers], dtype=float)),
            "tier_lat": ro(np.array([t.latency for t in self.tiers], dtype=float)),
            "pair_bw": _matrix_array(self.pair_bandwidth),
            "pair_lat": _matrix_array(self.pair_latency),
        }

    def _link_arrays(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bandwidths and latencies of the ordered pairs ``(src[k], dst[k])`` (ids trusted).

        Same-device pairs get ``(inf, 0)``.
        """
        a = self._arrays
        tier = (a["node"][src] != a["node"][dst]).astype(np.int64)
        if a["site"] is not None:
            tier = np.where(a["site"][src] != a["site"][dst], 2, tier)
        bw = a["tier_bw"][tier]
        lat = a["tier_lat"][tier]
        if a["pair_bw"] is not None:
            over = a["pair_bw"][src, dst]
            bw = np.where(np.isnan(over), bw, over)
        if a["pair_lat"] is not None:
            over = a["pair_lat"][src, dst]
            lat = np.where(np.isnan(over), lat, over)
        same = src == dst
        return np.where(same, np.inf, bw), np.where(same, 0.0, lat)

    # -- derived clusters ------------------------------------------------------------------

    def subset(self, device_ids: Sequence[int], name: str | None = None) -> Cluster:
        """The cluster made of `device_ids` (in that order), e.g. after losing devices.

        Node and site ids are renumbered densely in order of first appearance; pair
        overrides are kept for the remaining pairs.

        >>> from meshplan.costmodel import dgx_a100
        >>> c = dgx_a100(nodes=2).subset([8, 9, 0])
        >>> c.node_of, c.link(0, 2) == dgx_a100(nodes=2).link(8, 0)
        ((0, 0, 1), True)
        """
        ids = [self._check_device(i) for i in device_ids]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"subset lists devices {dup} more than once; list each once")

        def renumber(values):
            seen: dict[int, int] = {}
            return tuple(seen.setdefault(values[i], len(seen)) for i in ids)

        def sub(matrix):
            if matrix is None:
                return None
            return tuple(tuple(matrix[i][j] for j in ids) for i in ids)

        return Cluster(
            devices=tuple(self.devices[i] for i in ids),
            node_of=renumber(self.node_of),
            tiers=self.tiers,
            site_of=None if self.site_of is None else renumber(self.site_of),
            pair_bandwidth=sub(self.pair_bandwidth),
            pair_latency=sub(self.pair_latency),
            name=self.name if name is None else name,
        )

    def tiers_only(self) -> Cluster:
        """This cluster as a planner that knows one bandwidth per tier would see it.

        Measured pair overrides are dropped and sites are merged (links between sites get
        the inter-node tier); devices and nodes are kept. For comparisons: a plan made for
        this view and re-costed on the real cluster shows what link awareness is worth.

        >>> from meshplan.costmodel import dgx_a100
        >>> c = dgx_a100(nodes=2)
        >>> c.tiers_only() == c
        True
        """
        return Cluster(devices=self.devices, node_of=self.node_of, tiers=self.tiers[:2],
                       name=self.name)

    @classmethod
    def local(cls) -> Cluster:
        """This process's ``jax.devices()``, described with rough CPU-emulation numbers.

        Every device gets the generic :data:`CPU` spec, all on node 0, joined by one tier
        ``LinkTier("local", 10e9, 5e-6)``. These are rough placeholders for CPU-emulated
        devices, which exchange data through host-memory copies (a few GB/s to tens of GB/s
        per copy stream) and pay microseconds of dispatch per collective; calibration is to
        replace them with measured values (also on GPU hosts, where they are far off).

        >>> import jax
        >>> Cluster.local().num_devices == len(jax.devices())
        True
        """
        import jax  # lazily: describing clusters must not start a JAX backend

        n = len(jax.devices())
        return cls(devices=(CPU,) * n, node_of=(0,) * n,
                   tiers=(LinkTier("local", 10e9, 5e-6),), name="local")

    @classmethod
    def calibrate(cls, devices: Sequence[Any] | None = None, **options: Any) -> Cluster:
        """This process's devices (default ``jax.devices()``), measured instead of assumed.

        Times copies between every ordered pair of devices (fitted to latency and
        bandwidth, stored as per-pair overrides with their medians as the one tier), each
        device's matmul rate and memory bandwidth, and reads its memory size. Keyword
        options (``sizes``, ``repeats``, ``matmul_size``, ``stream_bytes``, ``quick``,
        ``name``, ``progress``) and what each number means are documented on
        :func:`meshplan.costmodel._calibrate.calibrate`. ``meshplan calibrate`` does the
        same from the command line and saves the file; ``Cluster.load`` reads it back.
        """
        from meshplan.costmodel._calibrate import calibrate  # lazily: it imports jax

        return calibrate(devices, **options)

    # -- JSON ------------------------------------------------------------------------------

    def _doc(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "name": self.name,
            "devices": [d.to_dict() for d in self.devices],
            "node_of": list(self.node_of),
            "site_of": None if self.site_of is None else list(self.site_of),
            "tiers": [t.to_dict() for t in self.tiers],
            "pair_bandwidth": None if self.pair_bandwidth is None else [
                list(r) for r in self.pair_bandwidth],
            "pair_latency": None if self.pair_latency is None else [
                list(r) for r in self.pair_latency],
        }

    def to_json(self) -> str:
        """The cluster as JSON text (one device, tier or matrix row per line).

        >>> from meshplan.costmodel import dgx_h100
        >>> Cluster.from_json(dgx_h100().to_json()) == dgx_h100()
        True
        """
        def dump(v):
            return json.dumps(v, sort_keys=True, allow_nan=False)

        parts = []
        for key, value in self._doc().items():
            if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
                inner = ",\n    ".join(dump(v) for v in value)
                parts.append(f"  {json.dumps(key)}: [\n    {inner}\n  ]")
            else:
                parts.append(f"  {json.dumps(key)}: {dump(value)}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        """Parse and validate :meth:`to_json` output; ValueError names the bad field.

        A device may also be given as the kind string of a preset (e.g.
        ``"H100-SXM5-80GB"``) instead of a full object.

        >>> Cluster.from_json('{"devices": ["cpu"], "node_of": [0], '
        ...                   '"tiers": [{"name": "x", "bandwidth": -1, "latency": 0}]}')
        Traceback (most recent call last):
        ...
        ValueError: tiers[0].bandwidth must be a finite number > 0 (bytes/s); got -1
        """
        def no_constant(c):
            raise ValueError(f"cluster JSON contains {c}; only finite numbers are allowed")

        try:
            doc = json.loads(text, parse_constant=no_constant)
        except json.JSONDecodeError as e:
            raise ValueError(f"cluster JSON is not valid JSON: {e}") from None
        return _cluster_from_doc(doc)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Cluster:
        """Read a cluster file written by :meth:`save` (or by hand), validating every field.

        >>> import os, tempfile
        >>> from meshplan.costmodel import dgx_a100
        >>> path = os.path.join(tempfile.mkdtemp(), "c.json")
        >>> dgx_a100(nodes=2).save(path)
        >>> Cluster.load(path) == dgx_a100(nodes=2)
        True
        """
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"cluster file {os.fspath(path)!r}: {e}") from None

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of the cluster's canonical JSON, without ``name``.

        Plans record it, so a plan made for another cluster can be refused. Renaming a
        cluster keeps its fingerprint; changing any device, node, tier or pair value
        changes it.

        >>> from meshplan.costmodel import dgx_a100
        >>> dgx_a100(nodes=1).fingerprint() == dgx_a100(nodes=1).fingerprint()
        True
        >>> dgx_a100(nodes=1).fingerprint() == dgx_a100(nodes=2).fingerprint()
        False
        """
        doc = self._doc()
        del doc["name"]
        canon = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------
# Parsing a JSON document. Each check names the JSON path of the field at fault.


def _list(value: Any, where: str, expected: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be {expected}; got {value!r}")
    return value


def _cluster_from_doc(doc: Any) -> Cluster:
    if not isinstance(doc, dict):
        raise ValueError(f"cluster JSON must be an object with keys {list(_TOP_KEYS)}; got "
                         f"{type(doc).__name__}")
    extra = sorted(set(doc) - set(_TOP_KEYS))
    if extra:
        raise ValueError(f"cluster JSON has unknown keys {extra}; allowed: {list(_TOP_KEYS)}")
    if doc.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"format must be {_FORMAT!r}; got {doc['format']!r}")
    if doc.get("version", _VERSION) != _VERSION:
        raise ValueError(f"version must be {_VERSION} (the only version this meshplan reads); "
                         f"got {doc['version']!r}")
    for key in ("devices", "node_of", "tiers"):
        if key not in doc:
            raise ValueError(f"{key} is missing; a cluster file needs devices, node_of and tiers")

    presets = _presets_by_kind()
    devices = []
    for k, d in enumerate(_list(doc["devices"], "devices", "a list of device objects")):
        if isinstance(d, str):
            if d not in presets:
                raise ValueError(
                    f"devices[{k}] names unknown device kind {d!r}; known kinds: "
                    f"{sorted(presets)}; otherwise give an object with keys kind, peak_flops, "
                    "memory_bytes, memory_bandwidth")
            devices.append(presets[d])
        else:
            devices.append(_device_from_dict(d, f"devices[{k}]"))

    node_of = [_check_int(x, f"node_of[{k}]") for k, x in enumerate(
        _list(doc["node_of"], "node_of", "a list of node ids, one per device"))]
    site_of = doc.get("site_of")
    if site_of is not None:
        site_of = [_check_int(x, f"site_of[{k}]") for k, x in enumerate(
            _list(site_of, "site_of", "null or a list of site ids, one per device"))]

    tiers = []
    for k, t in enumerate(_list(doc["tiers"], "tiers", "a list of tier objects")):
        where = f"tiers[{k}]"
        if not isinstance(t, dict):
            raise ValueError(f"{where} must be an object with keys {list(_TIER_KEYS)}; got {t!r}")
        missing = [key for key in _TIER_KEYS if key not in t]
        extra = sorted(set(t) - set(_TIER_KEYS))
        if missing or extra:
            raise ValueError(f"{where} must have exactly the keys {list(_TIER_KEYS)}; missing "
                             f"{missing}, unknown {extra}")
        tiers.append(LinkTier(
            name=_check_str(t["name"], f"{where}.name"),
            bandwidth=_check_number(t["bandwidth"], f"{where}.bandwidth", "bytes/s"),
            latency=_check_number(t["latency"], f"{where}.latency", "seconds",
                                  allow_zero=True)))

    matrices = {}
    for key in ("pair_bandwidth", "pair_latency"):
        m = doc.get(key)
        if m is not None:
            n = len(devices)
            rows = _list(m, key, f"null or an [{n}, {n}] list of rows (null = use the tier)")
            for i, row in enumerate(rows):
                _list(row, f"{key}[{i}]", f"a list of {n} numbers or nulls")
        matrices[key] = m

    name = doc.get("name", "custom")
    try:
        return Cluster(devices=tuple(devices), node_of=tuple(node_of), tiers=tuple(tiers),
                       site_of=None if site_of is None else tuple(site_of),
                       pair_bandwidth=matrices["pair_bandwidth"],
                       pair_latency=matrices["pair_latency"], name=name)
    except TypeError as e:  # cannot happen for parsed JSON, but keep load's promise
        raise ValueError(str(e)) from None
