"""Per-device memory: arguments, outputs, and temporaries over the liveness timeline.

XLA reports `argument + output + temp - alias`; the model predicts the same four terms.
Temporaries are the values XLA materialises in buffers: results of matmuls, reductions,
gathers and region boundaries, and any value that outlives its neighbourhood (activations
saved for the backward pass). Short chains of elementwise ops are fused and never stored.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from meshplan.ir._dims import ELEMENTWISE
from meshplan.planner._ilp import MemoryRow
from meshplan.planner._layout import Layout, shards
from meshplan.planner._ops import PlanningView

# Ops XLA fuses into their consumers (loop fusion): their results are not buffers unless
# they must outlive the fusion.
_FUSIBLE = ELEMENTWISE | {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose",
                          "iota", "alias", "slice", "pad", "concatenate", "rev",
                          "dynamic_slice"}
# A value read more than this many ops after it is made is kept in a buffer: fusion in
# XLA does not reach that far (measured on the example models, see benchmarks/fidelity.py).
_FUSION_REACH = 8


@dataclasses.dataclass(frozen=True)
class Liveness:
    """Which values are temporaries, and when each is live (op indices, inclusive)."""

    temps: tuple[int, ...]
    start: np.ndarray
    end: np.ndarray
    args: tuple[int, ...]
    outputs: tuple[int, ...]

    def live_at(self, t: int) -> np.ndarray:
        """Indices into `temps` of the values live at op index t."""
        return np.flatnonzero((self.start <= t) & (self.end >= t))


def liveness(view: PlanningView) -> Liveness:
    """Temporaries and their live ranges in program order."""
    producer_index: dict[int, int] = {}
    last_use: dict[int, int] = {}
    consumers: dict[int, list] = {}
    args = []
    for i, op in enumerate(view.ops):
        if op.kind == "input" and op.prim == "input":
            args += op.outputs
        for v in op.outputs:
            producer_index[v] = i
        for v in op.inputs:
            last_use[v] = i
            consumers.setdefault(v, []).append(op)
    outputs = tuple(v for v in view.outputs if not view.values[v].is_const)
    temps, start, end = [], [], []
    arg_set, out_set = set(args), set(outputs)
    for i, op in enumerate(view.ops):
        if op.kind == "input" and op.prim == "input":
            continue
        for v in op.outputs:
            if v in out_set or v in arg_set or view.values[v].is_const:
                continue
            last = last_use.get(v, i)
            kept = (op.prim not in _FUSIBLE
                    or any(c.prim not in _FUSIBLE for c in consumers.get(v, ()))
                    or last - i > _FUSION_REACH)
            if kept:
                temps.append(v)
                start.append(i)
                end.append(last)
    return Liveness(tuple(temps), np.array(start, dtype=np.int64), np.array(end, dtype=np.int64),
                    tuple(args), outputs)


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device, in XLA's terms."""

    argument: float
    output: float
    temp: float
    alias: float

    @property
    def peak(self) -> float:
        return self.argument + self.output + self.temp - self.alias


def _bytes(view, v, layout: Layout, mesh_shape) -> float:
    return view.values[v].nbytes / shards(layout, mesh_shape)


def memory(view: PlanningView, live: Liveness, layout_of: dict[int, Layout], mesh_shape,
           aliased: frozenset[int] = frozenset()) -> MemoryBreakdown:
    """Per-device memory under the chosen layouts; `aliased` outputs reuse donated buffers."""
    arg = sum(_bytes(view, v, layout_of[v], mesh_shape) for v in live.args)
    out = sum(_bytes(view, v, layout_of[v], mesh_shape) for v in live.outputs)
    sizes = np.array([_bytes(view, v, layout_of[v], mesh_shape) for v in live.temps])
    temp = _peak(live, sizes)
    alias = sum(_bytes(view, v, layout_of[v], mesh_shape) for v in live.outputs if v in aliased)
    return MemoryBreakdown(arg, out, temp, alias)


def _peak(live: Liveness, sizes: np.ndarray) -> float:
    """Largest sum of live temporaries over time (sweep over start/end events)."""
    if not len(sizes):
        return 0.0
    n = int(max(live.end.max(), live.start.max())) + 2
    delta = np.zeros(n)
    np.add.at(delta, live.start, sizes)
    np.add.at(delta, live.end + 1, -sizes)
    return float(np.cumsum(delta).max())


def peak_times(live: Liveness, sizes: np.ndarray, k: int) -> list[int]:
    """The k op indices with the most live bytes (for the ILP's memory rows)."""
    if not len(sizes):
        return []
    n = int(max(live.end.max(), live.start.max())) + 2
    delta = np.zeros(n)
    np.add.at(delta, live.start, sizes)
    np.add.at(delta, live.end + 1, -sizes)
    curve = np.cumsum(delta)
    return [int(t) for t in np.argsort(-curve)[:k]]


def memory_rows(problem, live: Liveness, limit: float, times: list[int],
                aliased: frozenset[int]) -> tuple[MemoryRow, ...]:
    """Linear memory constraints at the given op indices, one per index.

    Each row is arguments + outputs that do not reuse a donated buffer + temporaries live
    at that time, all under the strategy each class takes.
    """
    rows = []
    mesh_shape = problem.mesh_shape
    always = set(live.args) | (set(live.outputs) - aliased)
    for t in times:
        coef = [np.zeros(len(s)) for s in problem.strategies]
        counted = always | {live.temps[i] for i in live.live_at(t)}
        for g in problem.groups:
            strats = problem.strategies[g.cls]
            for pi, v in enumerate(g.produced):
                if v in counted:
                    for s, strat in enumerate(strats):
                        coef[g.cls][s] += _bytes(problem.view, v, strat.produced[pi],
                                                 mesh_shape)
        rows.append(MemoryRow(tuple(coef), 0.0, limit))
    return tuple(rows)
