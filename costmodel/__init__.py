"""meshplan.costmodel: devices, links, collectives and compute, as pure functions.

What a cluster is and how long things take on it; nothing here knows about graphs,
solvers or JAX shardings (dependencies point one way: ir <- costmodel <- planner).

- :class:`DeviceSpec` and presets (:data:`A100_80GB`, :data:`A100_40GB`,
  :data:`H100_80GB`, :data:`V100_32GB`, :data:`CPU`): datasheet peaks.
- :class:`Cluster`, :class:`LinkTier`: devices plus link tiers and per-pair overrides;
  JSON files via ``save``/``load``; ``Cluster.local()`` for this process's devices.
- :func:`dgx_a100`, :func:`dgx_h100`, :func:`custom`: cluster presets
  (also ``meshplan.clusters``).
- :func:`comm_bytes`, :func:`collective_time`, :func:`collective_algorithms`,
  :func:`p2p_time`: communication, alpha-beta per algorithm.
- :class:`Efficiency`, :func:`op_time`, :func:`compute_time`: roofline compute time.
- :func:`pipeline_time`, :class:`PipelineTime`, :data:`SCHEDULES`: GPipe, 1F1B and
  interleaved 1F1B step time, bubble and in-flight activations from per-stage times.

>>> from meshplan import costmodel as cm
>>> c = cm.dgx_a100(nodes=2)
>>> round(cm.collective_time("all-reduce", 1e9, range(16), c) * 1e3, 1)   # ms
10.8
"""

from meshplan.costmodel._cluster import Cluster, LinkTier
from meshplan.costmodel._collectives import (
    COLLECTIVE_KINDS,
    collective_algorithms,
    collective_time,
    comm_bytes,
    p2p_time,
)
from meshplan.costmodel._compute import Efficiency, compute_time, op_time
from meshplan.costmodel._device import (
    A100_40GB,
    A100_80GB,
    CPU,
    H100_80GB,
    V100_32GB,
    DeviceSpec,
)
from meshplan.costmodel._pipeline import (SCHEDULES, PipelineTime, in_flight,
                                          in_flight_with_gradients, pipeline_time)
from meshplan.costmodel._presets import custom, dgx_a100, dgx_h100

__all__ = [
    "DeviceSpec",
    "A100_80GB",
    "A100_40GB",
    "H100_80GB",
    "V100_32GB",
    "CPU",
    "LinkTier",
    "Cluster",
    "dgx_a100",
    "dgx_h100",
    "custom",
    "COLLECTIVE_KINDS",
    "comm_bytes",
    "collective_time",
    "collective_algorithms",
    "p2p_time",
    "Efficiency",
    "op_time",
    "compute_time",
    "SCHEDULES",
    "PipelineTime",
    "in_flight",
    "in_flight_with_gradients",
    "pipeline_time",
]
