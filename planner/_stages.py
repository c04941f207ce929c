"""Inter-operator planning: split a stack of layers into pipeline stages on submeshes.

Stages are contiguous layer ranges, each on its own submesh; their device counts add up to
the cluster's. With GPipe or 1F1B the step takes ``sum_i t_i + (m - 1) * max_i t_i``
(``t_i``: stage i's seconds per microbatch, forward and backward; see
`costmodel.pipeline_time`), which is not a sum over stages, so one dynamic program cannot
minimise it directly. As in Alpa (Zheng et al., OSDI 2022, section 5.2), the slowest stage
time is enumerated instead: for each candidate bound B, a DP over (first layer, devices
left) finds the smallest sum of stage times with every stage at most B, and the step time
is that sum plus (m - 1) * B. Bounds are tried in increasing order and the search stops
once (m - 1) * B alone exceeds the best step found.

The stage cost is a callable, so this module knows nothing of graphs. It handles stages of
different submesh sizes; the search's pipelines have equal stages, for which the sum of stage
times is fixed and `planner._pipe.split` (a min-max split by bisection over the bound, also
memory-aware) is exact and faster. This DP is kept for uneven stages (mixed device kinds),
where the sum varies with the split.

>>> layer = [1.0] * 8                     # 8 equal layers; t = layers / devices
>>> cost = lambda first, last, n: sum(layer[first:last]) / n
>>> split = split_stages(8, 4, cost, microbatches=4, submesh_sizes=(1, 2, 4), num_stages=2)
>>> [(s.layers, s.devices) for s in split.stages], split.step_time
([((0, 4), 2), ((4, 8), 2)], 10.0)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

__all__ = ["StageChoice", "StageSplit", "split_stages"]

# Relative slack when comparing a stage time with the bound B (both are sums of floats).
_BOUND_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class StageChoice:
    """One stage: layers [first, last), its number of devices, seconds per microbatch."""

    layers: tuple[int, int]
    devices: int
    time: float


@dataclasses.dataclass(frozen=True)
class StageSplit:
    """The chosen stages in pipeline order and the step time they give."""

    stages: tuple[StageChoice, ...]
    step_time: float
    microbatches: int

    @property
    def slowest(self) -> float:
        return max(s.time for s in self.stages)


StageCost = Callable[[int, int, int], "float | None"]


def _cost_table(num_layers: int, sizes: Sequence[int], stage_time: StageCost
                ) -> dict[tuple[int, int, int], float]:
    """(first, last, devices) -> seconds per microbatch, for every range that fits."""
    table = {}
    for first in range(num_layers):
        for last in range(first + 1, num_layers + 1):
            for n in sizes:
                t = stage_time(first, last, n)
                if t is not None and t < 0:
                    raise ValueError(f"stage_time({first}, {last}, {n}) = {t}: stage times "
                                     "must be >= 0 seconds.")
                if t is not None and math.isfinite(t):
                    table[first, last, n] = float(t)
    return table


def _best_sum(num_layers: int, num_devices: int, sizes: Sequence[int],
              table: dict, bound: float, num_stages: int | None):
    """Smallest sum of stage times with every stage <= bound: (sum, stages) or None.

    State: (first layer still to place, devices still free, stages still to make or None).
    """
    memo: dict[tuple, tuple[float, tuple] | None] = {}

    def best(first: int, devices: int, stages_left: int | None):
        if first == num_layers:
            return (0.0, ()) if devices == 0 and stages_left in (None, 0) else None
        if devices <= 0 or stages_left == 0:
            return None
        key = (first, devices, stages_left)
        if key in memo:
            return memo[key]
        found = None
        for last in range(first + 1, num_layers + 1):
            for n in sizes:
                t = table.get((first, last, n))
                if t is None or n > devices or t > bound * (1 + _BOUND_TOLERANCE):
                    continue
                rest = best(last, devices - n,
                            None if stages_left is None else stages_left - 1)
                if rest is None:
                    continue
                total = t + rest[0]
                if found is None or total < found[0]:
                    found = (total, (StageChoice((first, last), n, t),) + rest[1])
        memo[key] = found
        return found

    return best(0, num_devices, num_stages)


def split_stages(num_layers: int, num_devices: int, stage_time: StageCost, microbatches: int,
                 submesh_sizes: Sequence[int], num_stages: int | None = None) -> StageSplit:
    """Stage boundaries and submesh sizes minimising sum_i t_i + (m - 1) * max_i t_i.

    Args:
      num_layers: layers in pipeline order (embedding and output layers included: a stage
        that holds them is simply slower, and the split accounts for it).
      num_devices: devices to use, all of them.
      stage_time: (first, last, devices) -> seconds per microbatch (forward + backward) of
        layers [first, last) on a submesh of that many devices, or None if it does not fit.
      microbatches: m.
      submesh_sizes: device counts a stage may take (for example 1, 2, 4, 8 inside a node
        and whole nodes beyond).
      num_stages: pin the number of stages p; None lets the DP choose.

    Raises:
      ValueError: when no split fits, naming what was tried.
    """
    if num_layers < 1 or num_devices < 1 or microbatches < 1:
        raise ValueError(f"need at least one layer, device and microbatch; got layers="
                         f"{num_layers}, devices={num_devices}, microbatches={microbatches}.")
    if num_stages is not None and not 1 <= num_stages <= min(num_layers, num_devices):
        raise ValueError(f"num_stages={num_stages} must be between 1 and min(layers="
                         f"{num_layers}, devices={num_devices}).")
    if any(int(n) != n for n in submesh_sizes):
        raise ValueError(f"submesh sizes must be whole device counts; got {submesh_sizes}.")
    sizes = sorted({int(n) for n in submesh_sizes if 0 < n <= num_devices})
    table = _cost_table(num_layers, sizes, stage_time)
    best: StageSplit | None = None
    for bound in sorted(set(table.values())):
        if best is not None and (microbatches - 1) * bound >= best.step_time:
            break  # the slowest stage alone already costs more than the best split
        found = _best_sum(num_layers, num_devices, sizes, table, bound, num_stages)
        if found is None:
            continue
        total, stages = found
        step = total + (microbatches - 1) * max(s.time for s in stages)
        if best is None or step < best.step_time:
            best = StageSplit(stages, step, microbatches)
    if best is None:
        pinned = f" in exactly {num_stages} stages" if num_stages else ""
        raise ValueError(
            f"no split of {num_layers} layers over {num_devices} devices{pinned} with stage "
            f"sizes {tuple(sizes)} fits: every candidate stage was reported as not fitting "
            "or the sizes cannot add up to the device count. Allow other submesh sizes, more "
            "stages, or more memory per device.")
    return best
