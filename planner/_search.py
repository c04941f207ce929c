"""The search: logical meshes x device placements, an ILP on each, the best plan kept."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time as _time
from typing import Callable

import numpy as np

from meshplan.costmodel import Cluster, Efficiency
from meshplan.ir import Graph
from meshplan.ir._util import paused_gc
from meshplan.planner._evaluate import Cost, evaluate
from meshplan.planner._ilp import SolveResult, refine, solve
from meshplan.planner._memory import liveness, memory_rows, peak_times
from meshplan.planner._mesh import CommModel, LogicalMesh, factorizations
from meshplan.planner._ops import POp, batch_dims, build_view
from meshplan.planner._plan import Alternative, Constraints, Plan
from meshplan.planner._problem import Restrictions, build_problem, group_view

# The ILP's memory rows are placed at the liveness peaks of the unsharded program; when the
# decoded plan peaks elsewhere, that time is added and the ILP solved again, at most this
# often (each round adds the true peak of the previous answer, which converges fast).
_MEMORY_ROUNDS = 3
_PEAKS_PER_ROW_SET = 3


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Knobs of the search.

    Attributes:
      memory_limit: bytes per device; default: the smallest device memory in the cluster.
      time_limit: seconds for each ILP solve (LP relaxation first, MIP with what is left).
        3 s by default: the relaxation of a layer-tied problem usually solves in well under a
        second; a mesh whose solve runs out keeps its best fallback, and says so in status.
      efficiency: attained fractions of peak (compute model).
      tie_layers: share one decision among structurally identical layers.
    """

    memory_limit: float | None = None
    time_limit: float = 3.0
    efficiency: Efficiency = Efficiency()
    tie_layers: bool = True


@dataclasses.dataclass(frozen=True)
class MeshCandidate:
    """A logical mesh to try, with the role names its axes are pinned to (if any)."""

    mesh: LogicalMesh
    names: tuple[str, ...] | None
    label: str


@dataclasses.dataclass
class Solved:
    candidate: MeshCandidate
    axis_names: tuple[str, ...]
    cost: Cost
    assignment: object
    result: SolveResult
    problem: object


def device_order(cluster: Cluster) -> tuple[int, ...]:
    """Devices grouped by node (then id): consecutive ids share the fastest links."""
    return tuple(sorted(range(cluster.num_devices), key=lambda i: (cluster.node_of[i], i)))


def candidates(cluster: Cluster, c: Constraints) -> list[MeshCandidate]:
    """Logical meshes allowed by the constraints; the last axis lies inside nodes."""
    n = cluster.num_devices
    order = device_order(cluster)
    if c.tp is not None or c.dp is not None:
        tp = c.tp or (n // (c.dp or 1))
        dp = c.dp or (n // tp)
        if tp * dp != n:
            raise ValueError(f"Constraints tp={c.tp} x dp={c.dp} needs {tp * dp} devices but the "
                             f"cluster has {n}; choose degrees whose product is {n}.")
        shape, names = [], []
        for size, name in ((dp, "dp"), (tp, "tp")):
            if size > 1:
                shape.append(size)
                names.append(name)
        if not shape:
            shape, names = [1], ["dp"]
        if c.mesh_shape is not None and tuple(c.mesh_shape) != tuple(shape):
            raise ValueError(f"Constraints.mesh_shape={c.mesh_shape} disagrees with "
                             f"dp={dp}, tp={tp} (mesh {tuple(shape)}); give one or the other.")
        return [MeshCandidate(LogicalMesh(tuple(shape), order), tuple(names),
                              "x".join(f"{a}{s}" for a, s in zip(names, shape)))]
    shapes = [tuple(c.mesh_shape)] if c.mesh_shape is not None else factorizations(n)
    for s in shapes:
        if math.prod(s) != n:
            raise ValueError(f"mesh_shape {s} has {math.prod(s)} devices; the cluster has {n}.")
    return [MeshCandidate(LogicalMesh(s, order), None, "x".join(map(str, s))) for s in shapes]


def _restrictions(names: tuple[str, ...] | None, c: Constraints,
                  mesh_shape: tuple[int, ...], view) -> Restrictions:
    """Turn axis roles and ZeRO/Megatron pins into what each input and op may take."""
    if names is None:
        return Restrictions()
    dp = names.index("dp") if "dp" in names else None
    tp = names.index("tp") if "tp" in names else None
    value_batch, loop_batch = batch_dims(view)

    def loop(op: POp, l: int, axis: int) -> bool:
        # A pinned tp axis never splits the batch: that would be data parallelism.
        return not (axis == tp and l in loop_batch.get(op.id, ()))

    def input_layout(op: POp, dim: int, axis: int) -> bool:
        if axis == tp and dim in value_batch.get(op.outputs[0], ()):
            return False
        if op.role == "data":
            # The batch (dim 0) is split over dp; nothing else of the data is split.
            return axis == dp and dim == 0
        if axis == dp and op.role == "param" and c.zero is not None and c.zero < 3:
            return False
        if axis == dp and op.role == "opt_state" and c.zero == 0:
            return False
        return True

    def input_required(op: POp, shape) -> list | None:
        from meshplan.planner._strategies import layout_choices
        allowed = lambda d, a: input_layout(op, d, a)
        lays = layout_choices(shape, mesh_shape, allowed)
        if op.role == "data" and dp is not None and shape and shape[0] % mesh_shape[dp] == 0:
            lays = [l for l in lays if dp in l[0]]
        needs_dp = (op.role == "opt_state" and c.zero in (1, 3)) or \
                   (op.role == "param" and c.zero == 3)
        if needs_dp and dp is not None:
            with_dp = [l for l in lays if any(dp in axes for axes in l)]
            lays = with_dp or lays  # too small to split (e.g. a scalar count): replicate
        if c.tp_params and tp is not None and op.role in ("param", "opt_state") and \
                len(shape) >= 2:
            with_tp = [l for l in lays if any(tp in axes for axes in l)]
            lays = with_tp or lays
        return lays

    return Restrictions(input_layout=input_layout, input_required=input_required, loop=loop)


def _role_names(problem, assignment, shape) -> tuple[str, ...]:
    """Name axes by what they do: "dp" if it splits the data's batch (dim 0), else "tp"."""
    data_axes = set()
    for g in problem.groups:
        lead = g.leader
        if lead.kind == "input" and lead.role == "data":
            lay = assignment.value_layout[lead.outputs[0]]
            if lay:
                data_axes.update(lay[0])
    names = []
    for a in range(len(shape)):
        base = "dp" if a in data_axes else "tp"
        name = base if base not in names else f"{base}{sum(n.startswith(base) for n in names) + 1}"
        names.append(name)
    return tuple(names)


def _slowest(cluster: Cluster, ids):
    return min((cluster.devices[i] for i in ids), key=lambda d: d.flops_per_second("bfloat16"))


def solve_candidate(graph_view, live, cluster: Cluster, cand: MeshCandidate, c: Constraints,
                    opts: SearchOptions, aliased: frozenset[int], limit: float,
                    grouping=None) -> Solved:
    """Build and solve the ILP for one mesh candidate; re-solve if memory peaks elsewhere."""
    comm = CommModel(cluster, cand.mesh)
    restrict = _restrictions(cand.names, c, cand.mesh.shape, graph_view)
    device = _slowest(cluster, cand.mesh.device_ids)
    rs_as_ar = all(cluster.devices[i].kind == "cpu" for i in cand.mesh.device_ids)
    problem = build_problem(graph_view, comm, device, opts.efficiency, restrict,
                            opts.tie_layers, rs_as_ar, grouping)
    sizes = np.array([graph_view.values[v].nbytes for v in live.temps], dtype=float)
    times = peak_times(live, sizes, _PEAKS_PER_ROW_SET)
    result = None
    for _ in range(_MEMORY_ROUNDS):
        rows = memory_rows(problem, live, limit, times, aliased)
        result = solve(problem, rows, opts.time_limit)
        refined, _ = refine(problem, result.choice, rows)
        result = dataclasses.replace(result, choice=refined)
        names = cand.names or tuple(f"a{i}" for i in range(len(cand.mesh.shape)))
        cost, assignment = evaluate(problem, result.choice, live, aliased, names)
        if cost.peak_memory <= limit or result.status == "INFEASIBLE":
            break
        lay = assignment.value_layout
        sizes_now = np.array([graph_view.values[v].nbytes /
                              math.prod(cand.mesh.shape[a] for d in lay[v] for a in d)
                              for v in live.temps], dtype=float)
        extra = [t for t in peak_times(live, sizes_now, 1) if t not in times]
        if not extra:
            break
        times = times + extra
    if cand.names is None:  # name axes by role, and relabel the per-axis breakdown
        names = _role_names(problem, assignment, cand.mesh.shape)
        rename = {f"axis:{'+'.join(f'a{i}' for i in axes)}": "axis:" + "+".join(
            names[i] for i in axes) for axes in _axis_subsets(len(names))}
        cost = dataclasses.replace(cost, breakdown=tuple((rename.get(k, k), v)
                                                         for k, v in cost.breakdown))
    return Solved(cand, names, cost, assignment, result, problem)


def _axis_subsets(n: int) -> list[tuple[int, ...]]:
    """Non-empty sorted subsets of range(n): the axis groups a collective can span."""
    return [tuple(i for i in range(n) if m >> i & 1) for m in range(1, 1 << n)]


def graph_fingerprint(graph: Graph) -> str:
    """A hash of the traced program's structure: same step and shapes -> same fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    for n, m in graph.walk():
        h.update(repr((n.primitive, m, n.inputs, n.outputs)).encode())
    h.update(repr([(i.path, i.role, graph.values[i.value].shape, str(graph.values[i.value].dtype))
                   for i in graph.input_info]).encode())
    return h.hexdigest()


@paused_gc()
def search(graph: Graph, cluster: Cluster, constraints: Constraints = Constraints(),
           options: SearchOptions = SearchOptions(), *, pairs: dict[int, int] | None = None,
           donated: frozenset[int] = frozenset(), out_values: tuple[int, ...] = (),
           in_treedef=None, out_treedef=None, baselines: dict[str, Constraints] | None = None,
           progress: Callable[[str], None] | None = None) -> Plan:
    """Plan `graph` on `cluster`: the cheapest (mesh, placement, layouts) that fits memory."""
    t0 = _time.perf_counter()
    if graph.inputs and len(graph.inputs) != len(graph.input_info):
        raise ValueError("graph inputs are not tagged; build graphs with meshplan.ir.trace.")
    pairs = pairs or {}
    view = build_view(graph, pairs)
    live = liveness(view)
    aliased = frozenset(pairs[v] for v in donated if v in pairs)
    limit = options.memory_limit or min(d.memory_bytes for d in cluster.devices)
    grouping = group_view(view, options.tie_layers)
    runs: list[tuple[str, Solved]] = []
    for cand in candidates(cluster, constraints):
        solved = solve_candidate(view, live, cluster, cand, constraints, options, aliased, limit,
                                 grouping)
        runs.append((cand.label, solved))
        if progress:
            progress(f"mesh {cand.label}: {solved.cost.step_time * 1e3:.3f} ms "
                     f"({solved.result.status}, {solved.result.wall_time:.2f} s)")
    base_runs: list[tuple[str, Solved]] = []
    for name, bc in (baselines or {}).items():
        for cand in candidates(cluster, bc):
            base_runs.append((name, solve_candidate(view, live, cluster, cand, bc, options,
                                                    aliased, limit, grouping)))
    fits = [(l, s) for l, s in runs if s.cost.peak_memory <= limit]
    # Hand rules are points of the planner's own search space: if the ILP stopped short of
    # one of them (time limit), that point is the better plan and is taken.
    fits += [("rule:" + l, s) for l, s in base_runs if s.cost.peak_memory <= limit
             and constraints == Constraints()]
    if not fits:
        need = min(s.cost.peak_memory for _, s in runs)
        raise MemoryError(
            f"no plan fits {limit / 2**30:.2f} GiB per device; the smallest found needs "
            f"{need / 2**30:.2f} GiB. Use more devices, a smaller batch, or raise memory_limit.")
    fits.sort(key=lambda ls: ls[1].cost.step_time)
    label, best = fits[0]
    plan = _to_plan(graph, cluster, best, view, out_values, in_treedef, out_treedef, pairs,
                    time_spent=_time.perf_counter() - t0)
    alts = tuple(Alternative(f"mesh {l}", s.candidate.mesh.shape, s.axis_names, s.cost)
                 for l, s in sorted(runs, key=lambda ls: ls[1].cost.step_time)
                 if s is not best)
    bases = tuple(Alternative(l, s.candidate.mesh.shape, s.axis_names, s.cost)
                  for l, s in base_runs)
    notes = ()
    if label.startswith("rule:"):
        own = min((s for _, s in runs), key=lambda s: s.cost.step_time)
        notes = (f"the hand rule {label[5:]!r} costs less than the solver's best answer "
                 f"({own.cost.step_time * 1e3:.3f} ms, {own.result.status}), so it is taken: "
                 "a longer time_limit may let the solver find it or better",)
    return dataclasses.replace(plan, alternatives=alts, baselines=bases, notes=notes)


def _to_plan(graph, cluster, best: Solved, view, out_values, in_treedef, out_treedef, pairs,
             time_spent) -> Plan:
    a = best.assignment
    in_layouts = tuple(a.value_layout[v] for v in graph.inputs)
    inv_pairs = {o: i for i, o in pairs.items()}
    out_layouts = []
    for v in out_values:
        if v in inv_pairs:
            out_layouts.append(a.value_layout[inv_pairs[v]])
        elif v in a.value_layout:
            out_layouts.append(a.value_layout[v])
        else:  # a constant output
            out_layouts.append(((),) * len(view.values[v].shape))
    op_inputs = {}
    for op in view.ops:
        if op.node is None or op.id not in a.op_layouts:
            continue
        ins, _ = a.op_layouts[op.id]
        if any(k < len(ins) and v in a.value_layout and ins[k] != a.value_layout[v]
               for k, v in enumerate(op.inputs)):
            op_inputs[op.node.id] = tuple(ins)
    r = best.result
    problem = best.problem
    solver = (("status", r.status), ("gap", r.gap), ("ilp_seconds", r.wall_time),
              ("plan_seconds", time_spent), ("classes", len(problem.classes)),
              ("groups", len(problem.groups)))
    return Plan(
        mesh_shape=best.candidate.mesh.shape, axis_names=best.axis_names,
        device_order=best.candidate.mesh.device_ids, in_layouts=in_layouts,
        out_layouts=tuple(out_layouts), in_treedef=in_treedef, out_treedef=out_treedef,
        cost=best.cost, value_layouts=dict(a.value_layout), op_inputs=op_inputs,
        graph_fingerprint=graph_fingerprint(graph), cluster_fingerprint=cluster.fingerprint(),
        cluster_name=cluster.name, solver=solver,
        unknown_primitives=graph.unknown_primitives,
        input_paths=tuple(i.path for i in graph.input_info))


@paused_gc()
def estimate_plan(graph: Graph, plan: Plan, cluster: Cluster,
                  options: SearchOptions = SearchOptions(), *, pairs=None,
                  donated: frozenset[int] = frozenset()) -> Cost:
    """Cost of a fixed plan's mesh, placement and layouts on `cluster` (any device count)."""
    if cluster.num_devices != math.prod(plan.mesh_shape):
        raise ValueError(f"the plan uses {math.prod(plan.mesh_shape)} devices; cluster "
                         f"{cluster.name!r} has {cluster.num_devices}. Re-plan for it instead.")
    pairs = pairs or {}
    view = build_view(graph, pairs)
    live = liveness(view)
    mesh = LogicalMesh(plan.mesh_shape, plan.device_order)
    device = _slowest(cluster, mesh.device_ids)
    rs_as_ar = all(cluster.devices[i].kind == "cpu" for i in mesh.device_ids)
    problem = build_problem(view, CommModel(cluster, mesh), device, options.efficiency,
                            Restrictions(), tie=False, rs_as_ar=rs_as_ar)
    choice = []
    for c, members in enumerate(problem.classes):
        g = problem.groups[members[0]]
        want = [plan.value_layouts.get(v) for v in g.produced]
        want_slots = []
        for mi, k, v, _ in g.slots:
            node = g.members[mi].node
            pinned = plan.op_inputs.get(node.id) if node is not None and k >= 0 else None
            want_slots.append(pinned[k] if pinned is not None else
                              plan.value_layouts.get(g.members[mi].outputs[0] if k < 0 else v))
        # The strategy that reproduces the plan's layouts (ties: the cheaper one).
        scores = [(sum(w == lay for w, lay in zip(want, s.produced)) +
                   sum(w == lay for w, lay in zip(want_slots, s.slots)), -s.time)
                  for s in problem.strategies[c]]
        choice.append(max(range(len(scores)), key=scores.__getitem__))
    aliased = frozenset(pairs[v] for v in donated if v in pairs)
    cost, _ = evaluate(problem, tuple(choice), live, aliased, plan.axis_names)
    return cost
