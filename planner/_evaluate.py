"""Exact cost of one chosen solution: what `plan.cost` reports and baselines are judged by."""
from __future__ import annotations

import dataclasses

from meshplan.planner._layout import Comm, Layout, reshard
from meshplan.planner._memory import Liveness, MemoryBreakdown, memory, plan_visits
from meshplan.planner._problem import Problem, on_xla_cpu, wire_bytes


@dataclasses.dataclass(frozen=True)
class Cost:
    """Predicted cost of a plan per device per step.

    Attributes:
      step_time: seconds, compute plus collectives (no overlap assumed).
      flops: FLOPs per device per step.
      comm_bytes: bytes each device sends per step (ring definition, see DESIGN.md).
      peak_memory: bytes per device: argument + output + temp - alias.
      breakdown: (name, seconds) pairs: "compute", then the collectives' time three ways,
        which overlap (do not sum them all): per collective kind ("all-reduce"), per
        mesh axis group it runs over ("axis:tp", "axis:dp+tp": an axis stands for its
        link tier, e.g. one spanning nodes runs over the inter-node links), and
        "reshard", the part spent on layout changes between ops. step_time is compute
        plus the per-kind entries. A pipelined plan's parts instead: "pipeline busy",
        "bubble" and "per-step work", which sum to step_time, and "p2p", the part
        of the busy time spent sending between stages.
      memory: (name, bytes) pairs: argument, output, temp, alias.
      comm_by_kind: (kind, bytes sent per device) pairs.
    """

    step_time: float
    flops: float
    comm_bytes: float
    peak_memory: float
    breakdown: tuple[tuple[str, float], ...] = ()
    memory: tuple[tuple[str, float], ...] = ()
    comm_by_kind: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict:
        return {"step_time": self.step_time, "flops": self.flops,
                "comm_bytes": self.comm_bytes, "peak_memory": self.peak_memory,
                "breakdown": dict(self.breakdown), "memory": dict(self.memory),
                "comm_by_kind": dict(self.comm_by_kind)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        return cls(float(d["step_time"]), float(d["flops"]), float(d["comm_bytes"]),
                   float(d["peak_memory"]), tuple(d.get("breakdown", {}).items()),
                   tuple(d.get("memory", {}).items()), tuple(d.get("comm_by_kind", {}).items()))


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Layouts of every value and of every op's operands under one solution."""

    value_layout: dict[int, Layout]
    op_layouts: dict[int, tuple[tuple[Layout, ...], tuple[Layout, ...]]]  # op id -> (ins, outs)


def assign(problem: Problem, choice) -> Assignment:
    """Spread each class's strategy to all its groups' values and ops."""
    value_layout: dict[int, Layout] = {}
    op_layouts = {}
    for c, (values, op_ids) in enumerate(problem.grouping.class_members):
        strat = problem.strategies[c][choice[c]]
        n = len(problem.classes[c])  # every group of the class repeats the same layouts
        value_layout.update(zip(values, strat.produced * n))
        op_layouts.update(zip(op_ids, strat.ops * n))
    return Assignment(value_layout, op_layouts)


def collectives(problem: Problem, choice, a: Assignment) -> list[tuple[Comm, float, str]]:
    """(collective, count, "collective" or "reshard") for every collective `choice` runs."""
    out: list[tuple[Comm, float, str]] = []
    for c, members in enumerate(problem.classes):
        strat = problem.strategies[c][choice[c]]
        out += [(x, len(members) * m, "collective") for x, m in strat.comms]
    seen: set = set()
    xla_cpu = on_xla_cpu(problem.comm)
    values = problem.view.values
    for v, want, dedup, mult in _reads(problem, choice):
        have = a.value_layout[v]
        # XLA computes a resharded value once however many ops read it.
        key = (v, want, dedup)
        if have == want or key in seen:
            continue
        seen.add(key)
        nbytes = wire_bytes(values[v].nbytes, values[v].dtype, xla_cpu)
        out += [(c, mult, "reshard") for c in reshard(nbytes, have, want,
                                                      problem.mesh_shape)]
    return out


def _reads(problem: Problem, choice):
    """(value, wanted layout, executions of the reading op, mult) of every group's reads
    that `choice` may move, in group and slot order: with the grouping's buckets, only
    those whose producer and slot layouts differ (a few of ~20k groups' at 96 layers)."""
    strategy = [problem.strategies[c][choice[c]] for c in range(len(choice))]
    buckets = problem.grouping.slot_reads
    if buckets is None:
        for g in problem.groups:
            for (mi, k, v, mult), want in zip(g.slots, strategy[g.cls].slots):
                yield v, want, g.members[mi].mult if k >= 0 else mult, mult
        return
    moving = sorted((read, strategy[gc].slots[si])
                    for (pc, gc, pi, si), rs in buckets.items()
                    if strategy[pc].produced[pi] != strategy[gc].slots[si] for read in rs)
    for (_, v, dedup, mult), want in moving:
        yield v, want, dedup, mult


def evaluate(problem: Problem, choice, live: Liveness | None, aliased: frozenset[int] = frozenset(),
             axis_names: tuple[str, ...] | None = None, ynn: bool | None = None
             ) -> tuple[Cost, Assignment]:
    """Cost of `choice`: strategies' own costs plus resharding, each distinct reshard once.

    `ynn`: count the broadcasts XLA:CPU's YNNPACK reductions read as buffers (default: when
    every device of the mesh is a CPU).
    """
    a = assign(problem, choice)
    mesh_shape = problem.mesh_shape
    comm = problem.comm
    names = axis_names or tuple(f"axis{i}" for i in range(len(mesh_shape)))
    compute = 0.0
    flops = 0.0
    # The groups of a class are identical: cost one, count it class_size times.
    for c, members in enumerate(problem.classes):
        strat = problem.strategies[c][choice[c]]
        n = len(members)
        flops += n * strat.flops
        own = sum(m * comm.time(x.kind, x.nbytes, x.axes) for x, m in strat.comms)
        compute += n * (strat.time - own)
    comms = collectives(problem, choice, a)
    breakdown: dict[str, float] = {"compute": compute}
    by_kind: dict[str, float] = {}
    sent = 0.0
    for c, mult, origin in comms:
        t = mult * comm.time(c.kind, c.nbytes, c.axes)
        b = mult * c.bytes_sent(mesh_shape)
        breakdown[c.kind] = breakdown.get(c.kind, 0.0) + t
        axis = "axis:" + "+".join(names[x] for x in c.axes)
        breakdown[axis] = breakdown.get(axis, 0.0) + t
        if origin == "reshard":
            breakdown["reshard"] = breakdown.get("reshard", 0.0) + t
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + b
        sent += b
    # XLA:CPU lowers reduce-scatter to all-reduce + slice; a plan whose collectives include
    # a real reduce-scatter was costed for a backend that has one.
    scatters = any(c.kind == "reduce-scatter" for c, _, _ in comms)
    if ynn is None:  # YNNPACK reductions, and the broadcasts they read, are XLA:CPU's
        ynn = on_xla_cpu(comm)
    # Without a liveness timeline (a pipeline stage's plan, whose memory is counted per
    # layer by the pipeline model) the whole-step memory is not computed.
    mem = MemoryBreakdown(0.0, 0.0, 0.0, 0.0) if live is None else \
        memory(problem.view, live, a.value_layout, mesh_shape, aliased, a.op_layouts, scatters,
               ynn, plan_visits(problem.grouping, problem.view, live,
                                [problem.strategies[c][x] for c, x in enumerate(choice)]))
    step = compute + sum(mult * comm.time(c.kind, c.nbytes, c.axes) for c, mult, _ in comms)
    cost = Cost(step, flops, sent, mem.peak, tuple(breakdown.items()),
                (("argument", mem.argument), ("output", mem.output), ("temp", mem.temp),
                 ("alias", mem.alias)), tuple(by_kind.items()))
    return cost, a
