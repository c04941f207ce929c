"""meshplan: an auto-parallelism planner for JAX.

Trace a training step, cost it on a described cluster, solve for the parallel plan, and
apply it with JAX sharding annotations.

>>> import meshplan as mp
>>> cluster = mp.clusters.dgx_a100(nodes=1)
>>> # @mp.auto_parallel(cluster=cluster)
>>> # def train_step(params, opt_state, batch): ...
"""
import os as _os

# In a source checkout the subpackages sit beside this folder (ir/, costmodel/, planner/,
# runtime/, examples/), mapped to meshplan.* by package-dir only when installed. With the
# repository root on sys.path (`python -m pytest`, a notebook kernel started there), Python
# finds this folder before any installed copy, so let the subpackages be found beside it.
# Installed, they live inside this folder and nothing changes.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "costmodel")) and _os.path.isfile(
        _os.path.join(_os.path.dirname(_here), "costmodel", "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (a package's __path__)
del _here

from meshplan import clusters  # noqa: E402
from meshplan._api import AutoParallel, auto_parallel, baselines, estimate
from meshplan.costmodel import Cluster, DeviceSpec, Efficiency, LinkTier
from meshplan.planner import Alternative, Constraints, Cost, PipelineSettings, Plan, Stage
from meshplan.runtime import Measured, measure

__all__ = ["Alternative", "AutoParallel", "Cluster", "Constraints", "Cost", "DeviceSpec",
           "Efficiency", "LinkTier", "Measured", "PipelineSettings", "Plan", "Stage",
           "auto_parallel", "baselines", "clusters", "estimate", "measure"]
