"""Cluster presets and device specs: `mp.clusters.dgx_a100(nodes=4)`, `mp.clusters.A100_80GB`."""
from meshplan.costmodel._device import A100_40GB, A100_80GB, CPU, H100_80GB, V100_32GB
from meshplan.costmodel._presets import custom, dgx_a100, dgx_h100

__all__ = ["A100_40GB", "A100_80GB", "CPU", "H100_80GB", "V100_32GB", "custom", "dgx_a100",
           "dgx_h100"]
