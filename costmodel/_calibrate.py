"""Calibration: measure this process's devices and the links between them as a Cluster.

:func:`calibrate` (also ``Cluster.calibrate()`` and ``meshplan calibrate``) times, with
public JAX calls only:

- every ordered device pair: ``jax.device_put`` of a small and a large message, fitted to
  the alpha-beta model ``time = latency + bytes / bandwidth``;
- every device's attained float32 matmul rate (and bfloat16 on accelerators) and its
  memory bandwidth (an elementwise add over an array far larger than caches), with all
  devices of a kind busy at once, as they are when a sharded step runs.

The result is an ordinary :class:`Cluster`: save it with ``Cluster.save``, edit the JSON by
hand if you like, and ``Cluster.load`` validates it again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from meshplan.costmodel._cluster import Cluster, LinkTier
from meshplan.costmodel._device import CPU, DeviceSpec

__all__ = ["calibrate"]

# Message sizes for the two-point line fit. Measured for jax.device_put between CPU devices
# on a 2-core host: a fixed 50-150 us per copy and ~10 GB/s, so 4 KiB (one page) is almost
# all latency and 4 MiB (~0.4 ms of bytes) mostly bandwidth. Quick mode's 1 MiB is about
# as much bytes time as latency, so its bandwidth is noisier (seen: +-50 % between runs).
_SIZES_CPU = (4 * 2**10, 4 * 2**20)
_SIZES_CPU_QUICK = (4 * 2**10, 2**20)
# GPU links are 10-100x faster (NVLink 3/4: 300/450 GB/s per direction, A100/H100
# datasheets), so the large message must be larger to dominate ~10 us of latency.
_SIZES_ACCELERATOR = (4 * 2**10, 64 * 2**20)
_SIZES_ACCELERATOR_QUICK = (4 * 2**10, 16 * 2**20)
# Timed samples per measurement; the median is kept, so one preempted sample (a 2-core CI
# machine) does not move the result. Quick mode trades that robustness for time.
_REPEATS = 5
_QUICK_REPEATS = 3
# Matmul side n (2 n^3 FLOPs). On CPU, n = 1024 is 2.1 GFLOP: measured ~14 ms on one
# device alone and ~120 ms with 8 emulated devices sharing 2 cores, in the 50-200 ms range
# that timer noise and dispatch overhead cannot distort; 512 for quick mode. Accelerators
# need n = 4096 (137 GFLOP, a few ms on an A100/H100) to approach their attained peak.
_MATMUL_CPU = 1024
_MATMUL_CPU_QUICK = 512
_MATMUL_ACCELERATOR = 4096
# Bytes per array of the memory-bandwidth probe: beyond the last-level cache of most CPUs
# (tens of MiB) and of an H100 (50 MiB L2), so the add streams from memory; quick mode's
# 16 MiB may partly hit a large L3 and read high.
_STREAM_CPU = 64 * 2**20
_STREAM_CPU_QUICK = 16 * 2**20
_STREAM_ACCELERATOR = 256 * 2**20
# Each timed sample runs for at least this long (back-to-back calls when one is shorter),
# so perf_counter resolution and per-call dispatch (~10-50 us) stay below ~1 %.
_MIN_SAMPLE_SECONDS = 0.05
_MAX_CALLS_PER_SAMPLE = 1000
# Untimed copies into each device, per size, before the timed ones (see _measure_links):
# on CPU the first ~6-12 copies of a size into a device ran 2-5x slower than later ones
# (measured with 2 and 8 devices on a 2-core host).
_WARMUP_COPIES = 12
# The tier Cluster.local() uses; kept for a single device, which never communicates (a
# Cluster still needs one tier), so its value cannot change any plan.
_UNMEASURED_TIER = LinkTier("unmeasured", 10e9, 5e-6)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What to measure and how often (validated once, up front)."""

    sizes: tuple[int, ...]
    repeats: int
    matmul_size: int | None   # None: by platform (_MATMUL_CPU / _MATMUL_ACCELERATOR)
    stream_bytes: int | None  # None: by platform (_STREAM_CPU / _STREAM_ACCELERATOR)
    quick: bool


@dataclasses.dataclass(frozen=True)
class _Link:
    """One ordered pair's alpha-beta fit."""

    bandwidth: float  # bytes/s
    latency: float    # seconds


def calibrate(devices: Sequence[Any] | None = None, *,
              sizes: Sequence[int] | None = None,
              repeats: int | None = None,
              matmul_size: int | None = None,
              stream_bytes: int | None = None,
              quick: bool = False,
              name: str = "calibrated",
              progress: Callable[[str], None] | None = None) -> Cluster:
    """Measure `devices` and the links between them; return them as a :class:`Cluster`.

    Args:
      devices: JAX devices of this process, in the order plans number them (device ``i``
        of the cluster is ``devices[i]``); default ``jax.devices()``, the order the
        runtime uses.
      sizes: message sizes in bytes for the link fit, at least two distinct (default on
        CPU 4 KiB and 4 MiB, quick 4 KiB and 1 MiB; on accelerators 4 KiB and 64 MiB,
        quick 16 MiB). The smallest mostly measures latency, the largest bandwidth; with
        more than two, the line is a least-squares fit.
      repeats: timed samples per measurement, after untimed warm-ups; the median is kept
        (default 5; quick: 3).
      matmul_size: side ``n`` of the square matmuls timed for compute (default 1024 on
        CPU, 512 quick; 4096 on accelerators).
      stream_bytes: bytes of the array the memory-bandwidth probe adds to (default 64 MiB
        on CPU, 16 MiB quick; 256 MiB on accelerators).
      quick: smaller defaults for the above: about a second for 8 CPU devices on 2 cores
        instead of about three; for tests and a first look.
      name: the cluster's name.
      progress: called with a line of text as each measurement starts and ends.

    What is measured, and what it is stored as:

    - Links: for every ordered pair ``(i, j)``, the median time of
      ``jax.device_put(x_on_i, device_j).block_until_ready()`` for each size, one pair at a
      time, fitted to ``time = latency + bytes / bandwidth``. When noise gives the line a
      slope <= 0, bandwidth falls back to largest size / its time; when it gives an
      intercept <= 0, latency falls back to the smallest size's time (an upper bound).
      The values go into ``pair_bandwidth`` / ``pair_latency`` (diagonal ``None``), and
      their medians into the single tier ``LinkTier("measured", ...)``; every device is on
      node 0. Pairs are timed uncontended, so collectives where every device sends at once
      may run slower than the tier says when devices share a host (CPU emulation).
    - Compute: a jitted float32 matmul (``precision="highest"``, so accelerators do not
      substitute TF32) runs on all devices of one kind at once; a device's rate is
      ``2 n^3 / time``. Devices of one kind get the same value: concurrent runs finish
      together, and timing a device alone would overstate its rate up to n-fold where
      devices share hardware (emulated CPU devices share the host's cores). On
      accelerators a bfloat16 matmul is timed as well; on CPU it is not, because XLA:CPU
      computes bfloat16 through float32, so the float32 rate applies (as in the
      :data:`CPU` preset, the spec lists no ``bfloat16`` entry and falls back to float32).
    - The measured matmul rate is an *attained* rate, stored as ``peak_flops``. The cost
      model multiplies peaks by :class:`Efficiency` (0.7 for matmuls by default), so plans
      made from a calibrated cluster are somewhat pessimistic about compute unless you pass
      ``Efficiency(matmul=1.0)``; the balance between compute and communication, which is
      what a plan chooses by, is what calibration gets right.
    - Memory bandwidth: a jitted elementwise add over ``stream_bytes``, all devices at
      once; bytes read plus written, per second.
    - Memory size (not measured): on CPU the host's physical memory divided by the number
      of CPU devices in the process (they share it); elsewhere ``bytes_limit`` from
      ``device.memory_stats()``, what JAX's allocator may use (on GPUs by default 75 % of
      the memory: ``XLA_PYTHON_CLIENT_MEM_FRACTION``).

    The device kind is the JAX ``device_kind`` (``"cpu"`` for CPU devices, so the planner
    still predicts XLA:CPU's lowering of reduce-scatter as all-reduce plus slice); the
    cluster's ``name`` marks it as calibrated.

    Only devices this process can address can be measured (copies need both ends), so a
    calibrated cluster is one host; describe multi-host clusters with
    ``meshplan.clusters.custom`` and measured tiers.

    >>> import jax
    >>> c = calibrate(jax.devices()[:2], quick=True)   # the first two devices (or the one)
    >>> c.num_devices == min(2, len(jax.devices())), c.name
    (True, 'calibrated')
    >>> c.devices[0].kind == jax.devices()[0].device_kind
    True
    >>> c.devices[0].flops_per_second("float32") > 0 and c.tiers[0].bandwidth > 0
    True
    >>> # c.save("cluster.json"); mp.Cluster.load("cluster.json") == c
    """
    # JAX is imported lazily, here and in the helpers: importing meshplan.costmodel must not
    # start a JAX backend.
    if not isinstance(name, str) or not name:  # checked before measuring, not after
        raise ValueError(f"calibrate: name must be a non-empty string; got {name!r}")
    devices = _check_devices(devices)
    cpu = all(d.platform == "cpu" for d in devices)
    settings = _settings(sizes, repeats, matmul_size, stream_bytes, quick, cpu)
    say = progress or (lambda msg: None)
    n = len(devices)

    links = _measure_links(devices, settings, say)
    specs = _measure_devices(devices, settings, say)

    if n == 1:
        return Cluster(devices=tuple(specs), node_of=(0,), tiers=(_UNMEASURED_TIER,),
                       name=name)
    off = [links[i][j] for i in range(n) for j in range(n) if i != j]
    tier = LinkTier("measured", statistics.median(x.bandwidth for x in off),
                    statistics.median(x.latency for x in off))
    return Cluster(
        devices=tuple(specs), node_of=(0,) * n, tiers=(tier,),
        pair_bandwidth=[[None if i == j else links[i][j].bandwidth for j in range(n)]
                        for i in range(n)],
        pair_latency=[[None if i == j else links[i][j].latency for j in range(n)]
                      for i in range(n)],
        name=name)


# ----------------------------------------------------------------------------------------
# Arguments


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"calibrate: {what} must be a positive integer; got {value!r}")
    return int(value)


def _settings(sizes, repeats, matmul_size, stream_bytes, quick, cpu: bool) -> _Settings:
    if sizes is None:
        sizes = ((_SIZES_CPU_QUICK if quick else _SIZES_CPU) if cpu else
                 (_SIZES_ACCELERATOR_QUICK if quick else _SIZES_ACCELERATOR))
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ValueError(f"calibrate: sizes must be a list of byte counts; got {sizes!r}")
    sizes = tuple(sorted(_positive_int(s, "each of sizes") for s in sizes))
    if len(set(sizes)) < 2:
        raise ValueError(
            f"calibrate: sizes must hold at least two distinct byte counts (a small one for "
            f"latency, a large one for bandwidth); got {list(sizes)}")
    return _Settings(
        sizes=sizes,
        repeats=_positive_int(_QUICK_REPEATS if quick and repeats is None else
                              _REPEATS if repeats is None else repeats, "repeats"),
        matmul_size=None if matmul_size is None else _positive_int(matmul_size,
                                                                  "matmul_size"),
        stream_bytes=None if stream_bytes is None else _positive_int(stream_bytes,
                                                                     "stream_bytes"),
        quick=bool(quick))


def _check_devices(devices) -> list:
    import jax

    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError("calibrate: no devices given; pass at least one JAX device "
                         "(default: jax.devices())")
    for k, d in enumerate(devices):
        if not isinstance(d, jax.Device):
            raise TypeError(f"calibrate: devices[{k}] must be a jax.Device; got {d!r}")
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"calibrate: devices lists device ids {dup} more than once; list "
                         "each once")
    here = jax.process_index()
    for d in devices:
        if d.process_index != here:
            raise ValueError(
                f"calibrate: device {d} belongs to process {d.process_index}, not this "
                f"process ({here}); calibration copies between devices this process can "
                "address, so calibrate each host on its own (jax.local_devices())")
    return devices


# ----------------------------------------------------------------------------------------
# Links


def _measure_links(devices, s: _Settings, say) -> list[list[_Link | None]]:
    """Alpha-beta fit of every ordered pair; ``None`` on the diagonal."""
    import jax

    n = len(devices)
    links: list[list[_Link | None]] = [[None] * n for _ in range(n)]
    if n == 1:
        say("links: one device, nothing to measure")
        return links
    say(f"links: {n * (n - 1)} ordered pairs x {len(s.sizes)} sizes "
        f"({', '.join(_bytes(b) for b in s.sizes)}) x {s.repeats} repeats ...")
    t0 = time.perf_counter()
    # One source array per (device, size), made once; uint8 so a size is its byte count.
    sources = {(i, b): jax.device_put(np.ones(b, np.uint8), devices[i])
               for i in range(n) for b in s.sizes}
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    # Untimed passes over every pair, then the timed passes: the first copies into a device
    # pay for growing the host allocator (page faults of fresh memory) and a steady-state
    # step does not. Passes, rather than repeats pair by pair, spread a slow stretch of the
    # machine over all pairs; sizes go in separate runs of copies because timing a small
    # copy right after a large one also timed freeing the large one (latency ~2x, measured).
    warmup = math.ceil(_WARMUP_COPIES / (n - 1))  # a pass copies n - 1 times into a device
    samples: dict[tuple[int, int, int], list[float]] = {}
    for rep in range(warmup + s.repeats):
        for b in s.sizes:
            for i, j in pairs:
                dt = _copy_seconds(sources[i, b], devices[j])
                if rep >= warmup:
                    samples.setdefault((i, j, b), []).append(dt)
    for i, j in pairs:
        links[i][j] = _fit(s.sizes, [statistics.median(samples[i, j, b]) for b in s.sizes])
    for x in sources.values():
        x.delete()
    off = [links[i][j] for i in range(n) for j in range(n) if i != j]
    bws = [x.bandwidth for x in off]
    say(f"links: bandwidth median {statistics.median(bws) / 1e9:.3g} GB/s "
        f"(min {min(bws) / 1e9:.3g}, max {max(bws) / 1e9:.3g}), latency median "
        f"{statistics.median(x.latency for x in off) * 1e6:.3g} us "
        f"({time.perf_counter() - t0:.1f} s)")
    return links


def _copy_seconds(x, device) -> float:
    """Seconds of one blocking ``jax.device_put`` of `x` to `device`."""
    import jax

    t = time.perf_counter()
    y = jax.device_put(x, device)
    y.block_until_ready()
    dt = time.perf_counter() - t
    y.delete()  # free the copy now, not when the garbage collector gets to it
    return dt


def _fit(sizes: Sequence[int], times: Sequence[float]) -> _Link:
    """``time = latency + bytes / bandwidth`` through (sizes, times), with fallbacks.

    >>> link = _fit([1000, 3000], [2e-6, 4e-6])   # on the line of 1 GB/s and 1 us
    >>> round(link.bandwidth / 1e9, 9), round(link.latency * 1e6, 9)
    (1.0, 1.0)
    >>> link = _fit([1000, 3000], [5e-6, 4e-6])   # noise: slope < 0
    >>> round(link.bandwidth / 1e9, 9), round(link.latency * 1e6, 9)   # bytes/time, t_small
    (0.75, 5.0)
    """
    x = np.asarray(sizes, dtype=float)
    y = np.asarray(times, dtype=float)
    if len(x) == 2:  # the exact line, without least-squares rounding
        slope = (y[1] - y[0]) / (x[1] - x[0])
        intercept = y[0] - slope * x[0]
    else:
        slope, intercept = np.polyfit(x, y, 1)
    big = int(np.argmax(x))
    small = int(np.argmin(x))
    # A non-positive slope means the large copy was no slower than the small one (noise,
    # or caches favouring the large size): bytes / time of the largest still bounds it.
    bandwidth = 1.0 / slope if slope > 0 else x[big] / y[big]
    latency = intercept if intercept > 0 and slope > 0 else y[small]
    return _Link(float(bandwidth), float(latency))


# ----------------------------------------------------------------------------------------
# Devices


def _measure_devices(devices, s: _Settings, say) -> list[DeviceSpec]:
    """One DeviceSpec per device; devices of one (platform, kind) are measured together."""
    groups: dict[tuple[str, str], list[int]] = {}
    for k, d in enumerate(devices):
        groups.setdefault((d.platform, d.device_kind), []).append(k)
    specs: list[DeviceSpec | None] = [None] * len(devices)
    for (platform, kind), ids in groups.items():
        group = [devices[k] for k in ids]
        spec = _measure_kind(platform, kind, group, s, say)
        for k in ids:
            specs[k] = spec
    return specs


def _measure_kind(platform: str, kind: str, group, s: _Settings, say) -> DeviceSpec:
    cpu = platform == "cpu"
    n = s.matmul_size or (
        (_MATMUL_CPU_QUICK if s.quick else _MATMUL_CPU) if cpu else _MATMUL_ACCELERATOR)
    nbytes = s.stream_bytes or (
        (_STREAM_CPU_QUICK if s.quick else _STREAM_CPU) if cpu else _STREAM_ACCELERATOR)
    label = f"{len(group)} x {kind!r}"
    t0 = time.perf_counter()
    say(f"compute: {n}x{n} float32 matmuls on {label} at once ...")
    flops = {"float32": _matmul_rate(group, n, "float32", s.repeats)}
    if not cpu:  # XLA:CPU has no bfloat16 units: it computes bfloat16 through float32
        say(f"compute: {n}x{n} bfloat16 matmuls on {label} at once ...")
        flops["bfloat16"] = _matmul_rate(group, n, "bfloat16", s.repeats)
    say(f"memory: elementwise add over {_bytes(nbytes)} on {label} at once ...")
    bandwidth = _stream_rate(group, nbytes, s.repeats)
    memory = _memory_bytes(group[0])
    rates = ", ".join(f"{k} {v / 1e9:.3g} GFLOP/s" for k, v in flops.items())
    say(f"devices {label}: {rates}, memory {bandwidth / 1e9:.3g} GB/s, "
        f"{_bytes(memory)} each ({time.perf_counter() - t0:.1f} s)")
    return DeviceSpec(kind=kind, peak_flops=tuple(flops.items()), memory_bytes=memory,
                      memory_bandwidth=bandwidth)


def _matmul_rate(group, n: int, dtype: str, repeats: int) -> float:
    """FLOP/s per device of ``x @ w`` chained on every device of `group` at once."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    # w = 1/n everywhere keeps x (all ones) near ones through the chain: no overflow, no
    # denormals (slow on CPUs) however many calls the samples make.
    step = jax.jit(lambda x, w: jnp.matmul(x, w, precision="highest"), donate_argnums=0)
    states = [[jax.device_put(np.ones((n, n), dt), d),
               jax.device_put(np.full((n, n), 1.0 / n, dt), d)] for d in group]
    return 2.0 * n**3 / _seconds_per_call(step, states, repeats)


def _stream_rate(group, nbytes: int, repeats: int) -> float:
    """Bytes/s per device (read plus written) of ``x + c`` on every device at once."""
    import jax

    # c is an argument, not a literal, so XLA cannot fold the add away. x is donated, so
    # the sum overwrites it: a fresh output buffer would add the page faults of first
    # touching new memory, which doubled the time on CPU (measured), and compiled steps
    # do not pay them (XLA reuses its buffers). x holds ones, not np.zeros, whose untouched
    # pages the OS maps lazily: reading them faults too.
    step = jax.jit(lambda x, c: x + c, donate_argnums=0)
    count = max(1, nbytes // 4)
    states = [[jax.device_put(np.ones((count,), np.float32), d),
               jax.device_put(np.zeros((), np.float32), d)] for d in group]
    return 2.0 * 4 * count / _seconds_per_call(step, states, repeats)


def _seconds_per_call(step, states: list[list], repeats: int) -> float:
    """Median wall seconds per call when every device runs `step` at once.

    ``states`` holds ``[x, *rest]`` per device. Each call donates ``x`` and its output
    becomes the next ``x`` (written back into `states`), so back-to-back calls queue on
    each device without allocating.
    """
    def sample(calls: int) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            for st in states:
                st[0] = step(*st)
        for st in states:
            st[0].block_until_ready()
        return time.perf_counter() - t

    sample(1)  # warm-up: compiles once per device
    one = sample(1)
    calls = min(_MAX_CALLS_PER_SAMPLE, max(1, math.ceil(_MIN_SAMPLE_SECONDS / max(one, 1e-9))))
    seconds = statistics.median(sample(calls) for _ in range(repeats)) / calls
    for st in states:
        for x in st:
            x.delete()
    return seconds


def _memory_bytes(device) -> float:
    """Memory one device may use: a share of host RAM on CPU, else the allocator limit."""
    import jax

    if device.platform == "cpu":
        share = len(jax.local_devices(backend="cpu"))  # emulated devices share the host
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not POSIX, or no such sysconf name
            warnings.warn("calibrate: cannot read the host's memory size; using the CPU "
                          f"preset's {_bytes(CPU.memory_bytes)} per device; edit "
                          "memory_bytes in the cluster file if that is wrong", stacklevel=4)
            return CPU.memory_bytes
        return float(host) / share
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends raise various errors for "unsupported")
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        warnings.warn(
            f"calibrate: device {device} reports no memory size (memory_stats() has no "
            f"'bytes_limit'; keys: {sorted(stats)}); using {_bytes(CPU.memory_bytes)} per "
            "device: edit memory_bytes in the cluster file", stacklevel=4)
        return CPU.memory_bytes
    return float(limit)


def _bytes(x: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"
