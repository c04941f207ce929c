"""Cluster presets: machines described from public datasheets (exposed as ``meshplan.clusters``).

The hardware need not be present: a plan for ``dgx_a100(nodes=4)`` can be made, and checked
on CPU-emulated devices, on a laptop.

Link numbers are per device and per direction:

- NVLink/NVSwitch: NVIDIA A100 datasheet, "NVLink: 600 GB/s" (bidirectional) -> 300e9 B/s
  per direction per GPU; NVIDIA H100 SXM datasheet, "NVLink: 900 GB/s" -> 450e9 B/s.
- InfiniBand: NVIDIA DGX A100 datasheet, 8x single-port ConnectX-6 VPI 200 Gb/s HDR
  InfiniBand for the compute fabric, one per GPU: 200e9 / 8 = 25e9 B/s per GPU. NVIDIA DGX
  H100 datasheet, 8x ConnectX-7 VPI 400 Gb/s: 400e9 / 8 = 50e9 B/s per GPU.
- Latency per message hop: NCCL's tuning model (NVIDIA/nccl src/graph/tuning.cc, table
  ``hwLat``) charges 0.47-3.4 us per ring step over NVLink and 2.7-9.6 us over the network,
  depending on the protocol (LL / LL128 / Simple). We take about 1 us for NVLink and 5 us for
  InfiniBand, inside those ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshplan.costmodel._cluster import Cluster, LinkTier
from meshplan.costmodel._device import (
    A100_40GB,
    A100_80GB,
    CPU,
    H100_80GB,
    V100_32GB,
    DeviceSpec,
    _check_int,
    _check_number,
)

__all__ = [
    "dgx_a100",
    "dgx_h100",
    "custom",
    "A100_80GB",
    "A100_40GB",
    "H100_80GB",
    "V100_32GB",
    "CPU",
]

# Named per-GPU link parameters (bytes/s per direction, seconds); sources in the module
# docstring. Plain floats in tuples: immutable.
A100_NVLINK = (300e9, 1e-6)
A100_INFINIBAND = (25e9, 5e-6)
H100_NVLINK = (450e9, 1e-6)
H100_INFINIBAND = (50e9, 5e-6)
GPUS_PER_DGX = 8  # DGX A100 and DGX H100 datasheets: 8 GPUs per system


def _dgx(nodes: int, device: DeviceSpec, nvlink, ib, name: str) -> Cluster:
    nodes = _check_int(nodes, f"{name}(nodes=...)", minimum=1)
    n = GPUS_PER_DGX * nodes
    return Cluster(
        devices=(device,) * n,
        node_of=tuple(i // GPUS_PER_DGX for i in range(n)),
        tiers=(LinkTier("nvlink", *nvlink), LinkTier("infiniband", *ib)),
        name=f"{name}x{nodes}",
    )


def dgx_a100(nodes: int = 1) -> Cluster:
    """`nodes` NVIDIA DGX A100 systems: 8 x A100 80GB each, NVSwitch inside, HDR IB between.

    Tiers: ``nvlink`` 300e9 B/s, 1 us; ``infiniband`` 25e9 B/s per GPU, 5 us (sources in the
    module docstring). Devices ``8k .. 8k+7`` are node ``k``.

    >>> c = dgx_a100(nodes=2)
    >>> c.num_devices, c.num_nodes, c.link(0, 8)
    (16, 2, (25000000000.0, 5e-06))
    """
    return _dgx(nodes, A100_80GB, A100_NVLINK, A100_INFINIBAND, "dgx_a100")


def dgx_h100(nodes: int = 1) -> Cluster:
    """`nodes` NVIDIA DGX H100 systems: 8 x H100 SXM 80GB each, NVLink 4 inside, NDR IB between.

    Tiers: ``nvlink`` 450e9 B/s, 1 us; ``infiniband`` 50e9 B/s per GPU, 5 us.

    >>> dgx_h100(nodes=1).link(0, 7)
    (450000000000.0, 1e-06)
    """
    return _dgx(nodes, H100_80GB, H100_NVLINK, H100_INFINIBAND, "dgx_h100")


def custom(
    node_of: Sequence[int],
    device: DeviceSpec | Sequence[DeviceSpec] = A100_80GB,
    intra: tuple[float, float] = A100_NVLINK,
    inter: tuple[float, float] = A100_INFINIBAND,
    pair_bandwidth=None,
    pair_latency=None,
    name: str = "custom",
) -> Cluster:
    """Any machine room: node membership by device id, device kinds, two link tiers.

    Args:
      node_of: node id of each device (ids 0..k-1); its length is the device count.
      device: one DeviceSpec for all devices, or a list of one per device.
      intra: ``(bytes/s per direction, latency s)`` between devices of one node.
      inter: the same between nodes.
      pair_bandwidth, pair_latency: optional ``[n, n]`` matrices (lists or numpy arrays)
        overriding single ordered pairs; ``None``/NaN entries keep the tier's value.
      name: a label.

    >>> c = custom(node_of=[0, 1, 0, 1], intra=(300e9, 1e-6), inter=(25e9, 5e-6))
    >>> c.devices_of_node(0), c.tier_of(0, 1)
    ((0, 2), 1)
    """
    node_of = tuple(node_of)
    if isinstance(device, DeviceSpec):
        devices = (device,) * len(node_of)
    else:
        devices = tuple(device)
        if len(devices) != len(node_of):
            raise ValueError(
                f"custom(): device lists {len(devices)} specs but node_of has {len(node_of)} "
                "entries; give one DeviceSpec per device, or a single DeviceSpec for all")

    def tier(name_, value, arg):
        try:
            bw, lat = value
        except (TypeError, ValueError):
            raise ValueError(
                f"custom({arg}=...) must be a (bytes/s, latency s) pair such as (300e9, 1e-6); "
                f"got {value!r}") from None
        return LinkTier(name_, _check_number(bw, f"custom({arg}=...) bandwidth", "bytes/s"),
                        _check_number(lat, f"custom({arg}=...) latency", "seconds",
                                      allow_zero=True))

    return Cluster(
        devices=devices,
        node_of=node_of,
        tiers=(tier("intra-node", intra, "intra"), tier("inter-node", inter, "inter")),
        pair_bandwidth=pair_bandwidth,
        pair_latency=pair_latency,
        name=name,
    )
