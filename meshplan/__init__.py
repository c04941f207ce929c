"""meshplan: an auto-parallelism planner for JAX.

Trace a training step, cost it on a described cluster, solve for the parallel plan, and
apply it with JAX sharding annotations.

>>> import meshplan as mp
>>> cluster = mp.clusters.dgx_a100(nodes=1)
>>> # @mp.auto_parallel(cluster=cluster)
>>> # def train_step(params, opt_state, batch): ...
"""
from meshplan import clusters
from meshplan._api import AutoParallel, auto_parallel, baselines, estimate
from meshplan.costmodel import Cluster, DeviceSpec, Efficiency, LinkTier
from meshplan.planner import Alternative, Constraints, Cost, Plan, Stage
from meshplan.runtime import Measured, measure

__all__ = ["Alternative", "AutoParallel", "Cluster", "Constraints", "Cost", "DeviceSpec",
           "Efficiency", "LinkTier", "Measured", "Plan", "Stage", "auto_parallel", "baselines",
           "clusters", "estimate", "measure"]
