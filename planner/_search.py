"""The search: logical meshes x device placements, an ILP on each, the best plan kept."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import numbers
import os
import time as _time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from meshplan.costmodel import SCHEDULES, Cluster, Efficiency
from meshplan.ir import Graph
from meshplan.ir._util import paused_gc
from meshplan.planner._evaluate import Cost, assign, evaluate
from meshplan.planner._ilp import SolveResult, refine, solve
from meshplan.planner._memory import liveness, memory_rows, peak_times
from meshplan.planner._mesh import CommModel, LogicalMesh, factorizations
from meshplan.planner._ops import POp, batch_dims, build_view, memo_of
from meshplan.planner._layers import find_layers
from meshplan.planner._pipe import (PipelineChoice, Setting, _recomputed, best_pipeline,
                                    evaluate_split, layer_costs)
from meshplan.planner._placement import improve_order, plan_traffic, topology_order
from meshplan.planner._plan import Alternative, Constraints, PipelineSettings, Plan, Stage
from meshplan.planner._problem import Restrictions, build_problem, group_view, on_xla_cpu

# How a pinned pipeline that fits nowhere is reported in the search's reasons; the final
# error offers memory remedies when a reason carries it.
_LEAST_MEMORY = "the least memory found"
# The ILP's memory rows are placed at the liveness peaks of the unsharded program; when the
# decoded plan peaks elsewhere, that time is added and the ILP solved again, at most this
# often (each round adds the true peak of the previous answer, which converges fast).
_MEMORY_ROUNDS = 3
# Above this many nodes the mesh search keeps its inner axis inside a node (see candidates).
_SMALL_CLUSTER_NODES = 4
# Pipelines: a tp degree whose stage plan is this much slower than the best at one stage
# count is dropped for larger ones (see _pipelined).
_TP_PRUNE_MARGIN = 1.25
_PEAKS_PER_ROW_SET = 3
# With measured pair links, this many of the fastest meshes get a placement search.
_PLACEMENT_SEARCHES = 2
# Distinct stage submeshes re-costed per pipeline candidate (see _pipelined).
_MAX_STAGE_KINDS = 4
# What a pipeline stage's ILP is held to (see _pipelined): weights and optimizer state
# whole over the stage's dp axis and split over tp.
_STAGE_RULES = Constraints(zero=0, tp_params=True)
# Solver statuses that are final whatever the machine's speed; the others (FEASIBLE,
# LP-ROUNDED, GREEDY) mean a solve ran out of its time limit or fell back.
_PROVEN = ("OPTIMAL", "INFEASIBLE")


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
      stage_patience: pipelines are tried with more and more stages; the search stops
        after this many stage counts in a row whose best plan is no faster than the best
        found so far (None: every stage count is tried). Passed over, neither counted nor
        breaking the row: stage counts where nothing fits, and those whose best plan
        trades speed for memory (recomputation or ZeRO-3, unless pinned by the
        constraints), as more stages relieve memory. Past the fewest stages that fit,
        more stages mostly add bubble and transfers (Narayanan et al., SC 2021, takeaway
        2: model-parallel size just large enough to fit), and each stage count costs an
        ILP per stage mesh.
      workers: how many candidate meshes' ILPs are built and solved at once, in threads
        (HiGHS releases the GIL while it solves, so one mesh's LP runs beside the Python
        that builds the next). None: the CPUs this process may use (its cgroup's quota
        included). The plan does not depend on it: a solve cut short by `time_limit`
        beside others is solved again alone (see `_concurrently`).
    """

    memory_limit: float | None = None
    time_limit: float = 3.0
    efficiency: Efficiency = Efficiency()
    tie_layers: bool = True
    stage_patience: int | None = 2
    workers: int | None = None

    def __post_init__(self):
        p = self.stage_patience
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Integral)
                              or p < 1):
            raise ValueError(f"stage_patience={p!r}: give a whole number of stage counts "
                             ">= 1, or None to try every stage count.")
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Integral)
                              or w < 1):
            raise ValueError(f"workers={w!r}: give a whole number of threads >= 1 (1 solves "
                             "one mesh at a time), or None for one per CPU.")

    def thread_count(self) -> int:
        """`workers`, or the CPUs this process may use."""
        return int(self.workers) if self.workers is not None else _usable_cpus()


def _usable_cpus() -> int:
    """The CPUs this process may run on, capped by its cgroup's CPU quota (a container
    limited to 2 CPUs of a 64-core host sees all 64 in its affinity mask)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_cpus() -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`); None when unlimited or unreadable."""
    root = "/sys/fs/cgroup"
    try:
        with open(f"{root}/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{root}/cpu/cpu.cfs_quota_us") as f, \
                open(f"{root}/cpu/cpu.cfs_period_us") as g:
            quota, period = int(f.read()), int(g.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


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
    pipeline: PipelineChoice | None = None  # set for pipelined plans (mesh: one stage's)
    stage_order: tuple[int, ...] = ()  # all devices, stage by stage
    # Some solve stopped short of a proven answer (its time limit, or a fallback), so the
    # plan may depend on how fast the machine was meanwhile (see _concurrently).
    cut_short: bool = False


def candidates(cluster: Cluster, c: Constraints) -> list[MeshCandidate]:
    """Logical meshes allowed by the constraints; the last axis lies inside nodes."""
    n = cluster.num_devices
    order = topology_order(cluster)
    if c.tp is not None or c.dp is not None:
        for name, degree in (("tp", c.tp), ("dp", c.dp)):
            if degree is not None and n % degree:
                raise ValueError(
                    f"Constraints {name}={degree} does not divide the cluster's {n} devices; "
                    f"choose {name} among {[k for k in range(1, n + 1) if n % k == 0]}.")
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
    if c.mesh_shape is None and cluster.num_nodes > _SMALL_CLUSTER_NODES:
        # On many nodes, an inner axis wider than a node would run its tensor-parallel
        # traffic over the slow tier: Megatron-LM keeps tp inside a node (Narayanan et al.,
        # SC'21, section 3.3), so these shapes are not worth an ILP each.
        per_node = len(cluster.devices_of_node(cluster.node_of[0]))
        shapes = [s for s in shapes if len(s) == 1 or s[-1] <= per_node]
    for s in shapes:
        if math.prod(s) != n:
            raise ValueError(f"mesh_shape {s} has {math.prod(s)} devices; the cluster has {n}.")
    if c.mesh_shape is None and _uniform_links(cluster):
        # Every pair of devices is linked alike, so a mesh and its transpose are one problem
        # with the axes renamed (the ILP picks what each axis does): solve one of them.
        shapes = [s for k, s in enumerate(shapes) if tuple(sorted(s)) not in
                  {tuple(sorted(t)) for t in shapes[:k]}]
    return [MeshCandidate(LogicalMesh(s, order), None, "x".join(map(str, s))) for s in shapes]


def _uniform_links(cluster: Cluster) -> bool:
    """One node of one device kind, no measured pair links: every pair is linked alike."""
    return (cluster.num_nodes == 1 and cluster.pair_bandwidth is None
            and cluster.pair_latency is None and len(set(cluster.devices)) == 1)


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
    """Name axes by what they do: "dp" if it splits the data's batch (dim 0), "rep" if it
    splits nothing (its devices all compute the same: cheaper than any communication on
    very slow links), else "tp"."""
    used = {a for lay in assignment.value_layout.values() for dim in lay for a in dim}
    data_axes = set()
    for g in problem.groups:
        lead = g.leader
        if lead.kind == "input" and lead.role == "data":
            lay = assignment.value_layout[lead.outputs[0]]
            if lay:
                data_axes.update(lay[0])
    names = []
    for a in range(len(shape)):
        base = "dp" if a in data_axes else "tp" if a in used or shape[a] == 1 else "rep"
        name = base if base not in names else f"{base}{sum(n.startswith(base) for n in names) + 1}"
        names.append(name)
    return tuple(names)


def _slowest(cluster: Cluster, ids):
    return min((cluster.devices[i] for i in ids), key=lambda d: d.flops_per_second("bfloat16"))


def _problem(view, cluster: Cluster, cand: MeshCandidate, c: Constraints,
             opts: SearchOptions, grouping, shared, weight_moves: float = 1.0,
             one_program: bool = True):
    """The ILP data for one mesh candidate on `cluster` (strategies, edges, costs)."""
    comm = CommModel(cluster, cand.mesh, shared)
    restrict = _restrictions(cand.names, c, cand.mesh.shape, view)
    device = _slowest(cluster, cand.mesh.device_ids)
    return build_problem(view, comm, device, opts.efficiency, restrict, opts.tie_layers,
                         on_xla_cpu(comm), grouping, weight_moves, one_program)


def solve_candidate(graph_view, live, cluster: Cluster, cand: MeshCandidate, c: Constraints,
                    opts: SearchOptions, aliased: frozenset[int], limit: float,
                    grouping=None, shared: dict | None = None, exact_memory: bool = True,
                    weight_moves: float = 1.0, one_program: bool = True) -> Solved:
    """Build and solve the ILP for one mesh candidate; re-solve if memory peaks elsewhere.

    `shared` memoises collective times by link structure across the candidates of a search.
    """
    problem = _problem(graph_view, cluster, cand, c, opts, grouping, shared, weight_moves,
                       one_program)
    # No limit (a pipeline stage's plan, whose memory is the split's to check): no rows,
    # and no need for the slots where the unsharded step peaks.
    times = _unsharded_peaks(graph_view, live) if math.isfinite(limit) else []
    result, cut_short = None, False
    for _ in range(_MEMORY_ROUNDS):
        rows = memory_rows(problem, live, limit, times, aliased) if math.isfinite(limit) \
            else ()
        result = solve(problem, rows, opts.time_limit)
        cut_short |= result.status not in _PROVEN
        refined, _ = refine(problem, result.choice, rows)
        result = dataclasses.replace(result, choice=refined)
        names = cand.names or tuple(f"a{i}" for i in range(len(cand.mesh.shape)))
        if not exact_memory:  # a pipeline stage's plan: its layers are costed by the caller
            assignment = assign(problem, result.choice)
            cost = Cost(result.objective, 0.0, 0.0, 0.0)
            break
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
    return Solved(cand, names, cost, assignment, result, problem, cut_short=cut_short)


def _concurrently(calls: list[Callable[[], Solved]], workers: int) -> Iterator[Solved]:
    """The results of `calls`, in order, computed up to `workers` at a time in threads.

    Each call is a candidate mesh's ILP (independent of the others): HiGHS solves without
    the GIL, so on two CPUs one LP runs while the next candidate's problem is built. The
    memos the calls share (collective times, strategy tables) are filled the same whoever
    fills them first. Yields each result as soon as it and all before it are done.

    Solves running side by side each take longer, and the time limit is wall-clock time:
    a solve that finishes alone may run out beside others. So from the first result that
    was cut short on, the pool is drained, and each later call whose result was cut short
    runs again, alone (as do the calls that had not started): the plan is then the one a
    search of one call at a time finds.
    """
    if workers <= 1 or len(calls) <= 1:
        yield from (call() for call in calls)
        return
    pool = ThreadPoolExecutor(max_workers=min(workers, len(calls)))
    alone_from = len(calls) - 1  # the last result is handed over once the pool is joined
    try:
        futures = [pool.submit(call) for call in calls]
        for k, f in enumerate(futures[:-1]):
            if f.result().cut_short:
                alone_from = k
                break
            yield f.result()
    finally:  # done, cut short, a call raised, or the caller stopped: start no more calls
        pool.shutdown(wait=True, cancel_futures=True)
    for k in range(alone_from, len(calls)):
        f = futures[k]
        got = None if f.cancelled() else f.result()
        yield calls[k]() if got is None or got.cut_short else got


def _unsharded_peaks(view, live) -> list[int]:
    """The slots where the unsharded step holds the most bytes (memoised: every mesh
    candidate with a memory limit starts its rows there)."""
    return memo_of(view.memo, "unsharded peaks", live, lambda: peak_times(
        live, np.array([view.values[v].nbytes for v in live.temps], dtype=float),
        _PEAKS_PER_ROW_SET))


def _improve_placement(solved: Solved, view, live, cluster: Cluster, c: Constraints,
                       opts: SearchOptions, aliased, limit: float, grouping, shared,
                       progress) -> Solved:
    """With measured pair links, move devices between mesh positions to speed up the
    solved plan's collectives, and re-solve on the better placement (the layouts may then
    change too); the faster of the two plans is kept. Tier-only clusters are symmetric
    inside each tier, so the topology order is already as good as any."""
    if cluster.pair_bandwidth is None and cluster.pair_latency is None:
        return solved
    cand = solved.candidate
    traffic = plan_traffic(solved.problem, solved.result.choice)
    if not traffic:
        return solved
    order, _ = improve_order(cluster, cand.mesh.shape, cand.mesh.device_ids, traffic)
    if order == cand.mesh.device_ids:
        return solved
    moved = dataclasses.replace(cand, mesh=LogicalMesh(cand.mesh.shape, order))
    again = solve_candidate(view, live, cluster, moved, c, opts, aliased, limit, grouping,
                            shared)
    if progress:
        progress(f"mesh {cand.label}: placement search {solved.cost.step_time * 1e3:.3f} -> "
                 f"{again.cost.step_time * 1e3:.3f} ms")
    return again if again.cost.step_time < solved.cost.step_time else solved


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def pipeline_degrees(n: int, num_layers: int, c: Constraints, per_node: int) -> list[int]:
    """Stage counts to try: divisors of the device count up to the number of layers, whose
    stages can hold the pinned tp x dp, and (unless pp is pinned) whose stages are whole
    nodes: pipelines cross the slow links, tensor and data parallelism stay on the fast
    ones (Alpa's submesh rule, Zheng et al., OSDI 2022, section 5.2, and Megatron-LM's
    placement)."""
    if c.pp is not None:
        if c.pp == 1:
            return []
        def holds(s: int) -> bool:  # a stage of s devices holds the pinned tp x dp
            return not ((c.tp and s % c.tp) or (c.dp and s % c.dp) or
                        (c.tp and c.dp and c.tp * c.dp != s))

        if n % c.pp or not holds(n // c.pp):
            fits = [k for k in range(2, min(n, num_layers) + 1)
                    if n % k == 0 and holds(n // k)]
            raise ValueError(f"Constraints(pp={c.pp}, tp={c.tp}, dp={c.dp}) does not fit "
                             f"{n} devices: pp x tp x dp must equal the device count ("
                             + (f"pp among {fits}" if fits else "no pp does with this tp/dp")
                             + ").")
        if c.pp > num_layers:
            raise ValueError(f"Constraints(pp={c.pp}) asks for more stages than the "
                             f"{num_layers} layers found (embedding, blocks, head).")
        if c.virtual_stages and c.pp * c.virtual_stages > num_layers:
            raise ValueError(
                f"Constraints(pp={c.pp}, virtual_stages={c.virtual_stages}) asks for "
                f"{c.pp * c.virtual_stages} stage chunks, more than the {num_layers} layers "
                "found (embedding, blocks, head); use fewer virtual stages or stages.")
        return [c.pp]
    if c.mesh_shape is not None:
        return []  # a pinned mesh shape describes the whole, unpipelined mesh
    out = []
    for p in range(2, min(n, num_layers) + 1):
        s = n // p
        if n % p or s % per_node or (c.tp and s % c.tp) or (c.dp and s % c.dp) or \
                (c.tp and c.dp and c.tp * c.dp != s):
            continue
        out.append(p)
    return out


def stage_candidates(sub: Cluster, c: Constraints) -> list[MeshCandidate]:
    """Meshes for one stage: "dp" x "tp" with tp inside a node (Megatron's placement)."""
    if c.tp is not None or c.dp is not None:
        return candidates(sub, Constraints(tp=c.tp, dp=c.dp))
    s = sub.num_devices
    per_node = len(sub.devices_of_node(sub.node_of[0]))
    out = []
    for tp in (t for t in range(1, s + 1) if s % t == 0 and per_node % t == 0):
        out += candidates(sub, Constraints(tp=tp, dp=s // tp))
    return out


def _hop(cluster: Cluster, chunks: list[tuple[int, ...]]):
    """Seconds to send nbytes per device from each stage to the next: device i of a stage
    sends to device i of the next (the same position in both stage meshes, whichever
    order the meshes use), so a hop takes as long as its slowest such pair."""
    pairs = [cluster.link(a[i], b[i]) for a, b in zip(chunks, chunks[1:])
             for i in range(min(len(a), len(b)))]
    bw = np.array([x[0] for x in pairs], dtype=float)
    lat = np.array([x[1] for x in pairs], dtype=float)

    def hop(nbytes: float) -> float:
        return float((lat + nbytes / bw).max()) if nbytes > 0 and len(pairs) else 0.0
    return hop


def _pipelined(view, live, cluster: Cluster, c: Constraints, opts: SearchOptions, aliased,
               limit: float, grouping, pairs, progress, shared, why: list[str]
               ) -> list[tuple[str, Solved]]:
    """Pipelined plans: for each stage count, each stage mesh's intra-op plan, cut into
    layers, with the best split, microbatches, schedule, remat and ZeRO stage."""
    n = cluster.num_devices
    per_node = len(cluster.devices_of_node(cluster.node_of[0]))
    pinned = c.pipeline_only()
    if c.pp is None and not pipeline_degrees(n, n, c, per_node):
        if pinned:
            why.append(f"{', '.join(pinned)} appl{'ies' if len(pinned) == 1 else 'y'} to "
                       "pipelines only, and with pp unset each stage must be whole nodes "
                       f"holding the pinned tp x dp, which no stage count of {n} devices on "
                       f"{cluster.num_nodes} node(s) gives; pin pp (e.g. pp=2)")
        return []  # e.g. one node: no stage count fits, so no need to find the layers
    layers = find_layers(view, pairs) if c.pp != 1 else None
    if layers is None:
        if c.pp is None and pinned:
            why.append(f"{', '.join(pinned)} need a pipeline, and this step has "
                       "no repeated layers to split into stages (no parameters that differ "
                       "only in a layer index, no scan over layers)")
        if c.pp not in (None, 1):
            raise ValueError(f"Constraints(pp={c.pp}) needs repeated layers to split into "
                             "stages, and none were found in this step (no parameters that "
                             "differ only in a layer index, no scan over layers); leave pp "
                             "unset.")
        return []
    order = topology_order(cluster)
    in_place = frozenset(v for v, out in pairs.items() if out in aliased)
    act_scale: dict[int, float] = {}
    dropped: set[int] = set()
    runs = []
    best_time, slower = math.inf, 0  # the fastest pipeline so far; stage counts since
    for p in pipeline_degrees(n, layers.num_layers, c, per_node):
        if opts.stage_patience is not None and slower >= opts.stage_patience:
            if progress:
                progress(f"pp{p} and more stages not tried: the last {slower} stage "
                         f"count{'s were' if slower > 1 else ' was'} no faster than the best "
                         "(stage_patience)")
            break
        tried = len(runs)
        size = n // p
        chunks = [tuple(order[i * size:(i + 1) * size]) for i in range(p)]
        subs = [cluster.subset(ch) for ch in chunks]
        sub = subs[0]
        kinds = _stage_kinds(subs)
        limits = [opts.memory_limit or min(d.memory_bytes for d in s.devices) for s in subs]
        hop = _hop(cluster, chunks)
        at_p: dict[int, float] = {}  # tp degree -> its stage plan's own time with p stages
        # On mixed devices the stage plan is solved on each generation's stage in turn
        # (the layouts that suit an H100 stage may not suit an A100 one, and every stage
        # runs the same layouts), and the best pipeline kept.
        generations = [tuple(sorted(d.kind for d in s.devices)) for s in subs]
        leads = [generations.index(g) for g in dict.fromkeys(generations)]
        # With measured links, the stage plan solved on the first stage's own links may
        # suit the other stages' links worse than one solved on the tiers alone (every
        # stage runs the same layouts): both are tried, each costed on every stage's links.
        measured = cluster.pair_bandwidth is not None or cluster.pair_latency is not None
        tries = [(lead, False) for lead in leads] + ([(leads[0], True)] if measured else [])
        cands = [cand for cand in stage_candidates(sub, c) if _tp_size(cand) not in dropped]
        # Every (stage mesh, try) ILP of this stage count, solved a few at a time; what
        # follows each (costing layers, splitting) runs in order, as it shares act_scale.
        moves = [_typical_microbatches(view, cand, p) for cand in cands]
        ilps = [functools.partial(_stage_ilp, view, live, cand, subs[lead], blind, m, opts,
                                  aliased, grouping, shared)
                for cand, m in zip(cands, moves) for lead, blind in tries]
        with contextlib.closing(_concurrently(ilps, opts.thread_count())) as stage_plans:
            for cand, m in zip(cands, moves):
                tp_size = _tp_size(cand)
                label = f"pp{p} {cand.label}"
                best, ruled_out, least = None, False, math.inf
                for lead, blind in tries:
                    own, got = _stage_pipeline(view, live, cluster, c, opts, aliased, grouping,
                                               shared, layers, in_place, act_scale, cand, p,
                                               chunks, subs, kinds, lead, limits, hop, why,
                                               next(stage_plans), m, blind=blind)
                    at_p[tp_size] = min(at_p.get(tp_size, math.inf), own)
                    ruled_out = got == "ruled out"
                    if isinstance(got, float):  # nothing fits: the least memory found
                        least = min(least, got)
                    if isinstance(got, Solved) and (
                            best is None or got.pipeline.step_time < best.pipeline.step_time):
                        best = got
                if ruled_out:
                    continue  # the constraints cannot hold on this stage mesh (in `why`)
                if progress:
                    progress(f"{label}: " + ("no split fits" if best is None else
                                             f"{best.pipeline.step_time * 1e3:.3f} ms "
                                             f"(remat={best.pipeline.remat} "
                                             f"ZeRO-{best.pipeline.zero})"))
                if best is None:
                    why.append(f"{label}: no split of the layers fits {_bytes(limit)} per device"
                               + (f" ({_LEAST_MEMORY}: {_bytes(least)})"
                                  if math.isfinite(least) else ""))
                    continue
                runs.append((label, best))
        # A tensor-parallel degree whose stage plan is slower (compute and collectives,
        # memory aside) than the best by more than this margin with p stages is not tried
        # with more: that trade-off between tp and dp inside a stage changes little with
        # the stage count, and each try is an ILP. (Memory does change with p, so the
        # pipelines' step times are not what is compared.)
        if at_p:
            best = min(at_p.values())
            dropped |= {t for t, x in at_p.items() if x > _TP_PRUNE_MARGIN * best}
        here = min((s.pipeline for _, s in runs[tried:]), key=lambda x: x.step_time,
                   default=None)
        slower, best_time = _patience_count(slower, best_time, here, c)
    return runs


def _patience_count(slower: int, best_time: float, here: PipelineChoice | None,
                    c: Constraints) -> tuple[int, float]:
    """(stage counts in a row no faster than the best, the best step time) after a stage
    count whose fastest pipeline is `here` (None: nothing fit, passed over)."""
    if here is None:
        return slower, best_time
    if here.step_time < best_time:
        return 0, here.step_time
    return (slower if _memory_bound(here, c) else slower + 1), best_time


def _memory_bound(pipe: PipelineChoice, c: Constraints) -> bool:
    """Whether a pipeline trades speed for memory (recomputation, ZeRO-3 weight gathers):
    more stages relieve that, so such a stage count being slower is no sign that more
    stages are. GPT 1T on 3072 GPUs: up to 24 stages fit only with ZeRO-3 (243-442 s a
    step), 32 stages with ZeRO-1 take 97 s; with a slightly smaller activation estimate
    (tried, reverted) 2 stages fit with ZeRO-3 in 174 s, 3 and 4 were slower, and the
    search had stopped there. A setting pinned by the constraints was not chosen for
    memory, and does not count."""
    return (c.remat is None and pipe.remat != "none") or (c.zero is None and pipe.zero >= 3)


def _tp_size(cand: MeshCandidate) -> int:
    """The tensor-parallel degree of a stage mesh (its axes named "tp")."""
    return math.prod(sz for a, sz in zip(cand.names, cand.mesh.shape) if a == "tp")


def _stage_ilp(view, live, cand: MeshCandidate, stage: Cluster, blind: bool, moves: float,
               opts: SearchOptions, aliased, grouping, shared) -> Solved:
    """The intra-op plan every stage of a pipeline runs, solved on `stage`'s devices
    (`blind`: on their tiers, without the measured pair links), weight moves priced for
    `moves` microbatches (`_typical_microbatches`)."""
    # The stage ILP has no memory rows (its whole-step, whole-batch memory is not a
    # stage's), so memory is kept in check by rule, as Megatron-LM does: weights and
    # optimizer state whole over the stage's dp axis (ZeRO over dp is chosen by the
    # pipeline model) and split over tp; weights moved between layouts are priced once per
    # microbatch, for a typical count. The stage's own memory is checked per layer range.
    on = stage.tiers_only() if blind else stage
    return solve_candidate(view, live, on, cand, _STAGE_RULES, opts, aliased, float("inf"),
                           grouping, shared, exact_memory=False, weight_moves=moves,
                           one_program=False)


def _stage_pipeline(view, live, cluster: Cluster, c: Constraints, opts: SearchOptions,
                    aliased, grouping, shared, layers, in_place, act_scale: dict,
                    cand: MeshCandidate, p: int, chunks, subs, kinds, lead: int, limits, hop,
                    why: list[str], solved: Solved, moves: float, blind: bool = False):
    """The best pipeline of p stages whose shared intra-op plan `solved` was solved on
    stage `lead`'s devices (`blind`: on their tiers, without the measured pair links),
    weight moves priced for `moves` microbatches (see `_stage_ilp`): (the stage plan's
    own time, the Solved with its pipeline), with the least memory found (bytes per
    device) instead of the Solved if no split fits, "ruled out" if the constraints cannot
    hold on this stage mesh (the reason appended to `why`)."""
    dp_axes = tuple(i for i, a in enumerate(solved.axis_names) if a.startswith("dp"))
    if blind:  # the stage plan costed on the stage's own links
        problem, assignment = _on_devices(view, subs[lead], solved, opts, grouping, shared,
                                          moves)
        solved = dataclasses.replace(solved, problem=problem, assignment=assignment)
    costs = layer_costs(solved.problem, solved.result.choice, solved.assignment, layers, live,
                        dp_axes, in_place)
    # Calibrate the per-layer activation bytes once per tensor-parallel degree against
    # the whole-step memory model (one memory pass, not one per stage).
    tp = math.prod(s for a, s in zip(solved.axis_names, cand.mesh.shape)
                   if not a.startswith("dp"))
    if tp not in act_scale:
        # Without the broadcasts YNNPACK reductions read as buffers on XLA:CPU: held from a
        # layer's forward to its backward only when it is not recomputed, they are no
        # part of the activations this scale applies to under every remat choice.
        exact, _ = evaluate(solved.problem, solved.result.choice, live, aliased, ynn=False)
        act_scale[tp] = costs.calibrated(exact.peak_memory).act_scale
    costs = dataclasses.replace(costs, act_scale=act_scale[tp])
    per_stage = _stage_costs(costs, solved, view, live, subs, kinds, kinds[lead], layers,
                             dp_axes, in_place, opts, grouping, shared, moves)
    # The stage plan's own speed (compute and collectives of all layers, memory aside):
    # what the tp degree is compared on for pruning.
    own = float(costs.forward.sum() + costs.backward.sum() + costs.step.sum())
    dp = costs.dp_size
    per_replica = costs.batch // dp
    if c.num_microbatches and (costs.batch % dp or per_replica % c.num_microbatches):
        if blind:  # said once, by the try on the stage's own links
            return own, "ruled out"
        why.append(f"num_microbatches={c.num_microbatches} does not divide the "
                   f"{per_replica} samples each of dp={dp} replicas gets from the "
                   f"batch of {costs.batch}")
        return own, "ruled out"
    # On mixed devices, which generation runs the first stages (the embedding's) and
    # which the last (the head's and the loss's) changes the split: both orders are tried,
    # on the same per-stage costs (no new ILP).
    orders = [tuple(range(p))] + ([tuple(range(p - 1, -1, -1))] if len(set(kinds)) > 1
                                  else [])
    tried = []
    for seq in orders:
        got = best_pipeline(
            [per_stage[i] for i in seq], p, [limits[i] for i in seq],
            hop if seq == orders[0] else _hop(cluster, [chunks[i] for i in seq]),
            **_pipeline_settings(c, dp))
        # Interleaved chunks can overfill a device: such a split is never returned.
        if got is not None and all(m <= limits[i] * (1 + 1e-9)
                                   for m, i in zip(got.stage_memory, seq)):
            tried.append((got.step_time, seq, got))
    if not tried:
        return own, _least_memory(per_stage, p, c, dp, hop)
    _, seq, choice = min(tried, key=lambda t: t[0])
    choice = dataclasses.replace(choice, act_scale=costs.act_scale)
    return own, dataclasses.replace(
        solved, cost=_pipeline_cost(costs, choice), pipeline=choice,
        stage_order=tuple(d for i in seq for d in _stage_ids(cand.mesh.device_ids, chunks[i])))


def _pipeline_settings(c: Constraints, dp: int, least_memory: bool = False) -> dict:
    """`best_pipeline`'s choices of schedule, recomputation, ZeRO stage, microbatches and
    virtual stages: the pinned one, else all of them (`least_memory`: only every layer
    recomputed and the highest ZeRO stage)."""
    remats = ("full",) if least_memory else ("none", "full", "layers")
    zeros = ((3,) if least_memory else (0, 1, 3)) if dp > 1 else (0,)
    return dict(schedules=(c.schedule,) if c.schedule else SCHEDULES,
                remats=(c.remat,) if c.remat else remats,
                zeros=(c.zero,) if c.zero is not None else zeros,
                microbatches=c.num_microbatches,
                virtual=(c.virtual_stages,) if c.virtual_stages else (2,))


def _least_memory(per_stage, p: int, c: Constraints, dp: int, hop) -> float:
    """Bytes per device of the least-memory pipeline found when none fits: the pinned
    settings, else every layer recomputed and the highest ZeRO stage, split with no
    memory limit (so the split balances time; a memory-balanced one may need a little
    less). Told to the user, who then knows how far off the memory is."""
    got = best_pipeline(per_stage, p, math.inf, hop,
                        **_pipeline_settings(c, dp, least_memory=True))
    return got.peak_memory if got is not None else math.inf


def _stage_kinds(subs: list[Cluster]) -> list[str]:
    """Which stages cost their layers alike. Stages on devices (or links) unlike the first
    stage's cost their layers anew; with measured links every stage differs a little, and
    past a few kinds only the devices and tiers tell stages apart (each kind is an
    ILP-sized re-costing)."""
    kinds = [s.fingerprint() for s in subs]
    if len(set(kinds)) > _MAX_STAGE_KINDS:
        kinds = [s.tiers_only().fingerprint() for s in subs]
    return kinds


def _stage_costs(costs, solved: Solved, view, live, subs, kinds, base, layers, dp_axes,
                 in_place, opts: SearchOptions, grouping, shared, weight_moves) -> list:
    """Per-stage layer costs: the plan solved on a stage of kind `base` (same layouts on
    every stage, as the runtime applies one plan to all) re-costed on each unlike stage's
    devices and links, e.g. an older GPU generation: its layers take longer, so the split
    gives it fewer."""
    by_kind = {base: costs}
    for sub, kind in zip(subs, kinds):
        if kind in by_kind:
            continue
        problem, assignment = _on_devices(view, sub, solved, opts, grouping, shared,
                                          weight_moves)
        other = layer_costs(problem, solved.result.choice, assignment, layers, live, dp_axes,
                            in_place)
        by_kind[kind] = dataclasses.replace(other, act_scale=costs.act_scale)
    return [by_kind[k] for k in kinds]


def _on_devices(view, sub: Cluster, solved: Solved, opts: SearchOptions, grouping, shared,
                weight_moves) -> tuple:
    """(problem, assignment) of the solved stage plan on the devices and links of `sub`."""
    problem = _problem(view, sub, solved.candidate, _STAGE_RULES, opts, grouping, shared,
                       weight_moves, one_program=False)
    # Strategies are enumerated from the mesh shape and the graph alone, so the solved
    # choice indexes the same strategies on any devices.
    assert [len(x) for x in problem.strategies] == \
        [len(x) for x in solved.problem.strategies]
    return problem, assign(problem, solved.result.choice)


def _typical_microbatches(view, cand: MeshCandidate, p: int) -> float:
    """The microbatch count a stage's ILP prices weight moves for: 4p (Megatron-LM's
    guidance that m well above p keeps the bubble small), at most one sample per
    data-parallel replica and microbatch."""
    dp = math.prod(sz for a, sz in zip(cand.names, cand.mesh.shape) if a == "dp")
    data = [op for op in view.ops if op.kind == "input" and op.role == "data"]
    batch = view.values[data[0].outputs[0]].shape[0] if data else 1
    return float(max(1, min(4 * p, batch // max(dp, 1))))


def _stage_ids(positions, chunk) -> tuple[int, ...]:
    """A stage's devices in its mesh's order: the stage mesh was solved on the submesh
    `cluster.subset(chunks[0])`, whose device ids are positions in a chunk."""
    return tuple(chunk[k] for k in positions)


def _pipeline_cost(costs, pc: PipelineChoice) -> Cost:
    """The Cost record of a pipelined plan (per device of the busiest stage)."""
    p = len(pc.stages) // pc.virtual_stages
    per_device_flops, per_device_sent = [0.0] * p, [0.0] * p
    again = _recomputed(Setting(p, pc.microbatches, pc.schedule, pc.virtual_stages,
                                pc.remat, pc.zero, pc.recompute), len(costs.flops))
    for k, (a, z) in enumerate(pc.stages):  # chunk k runs on stage k mod p's devices
        per_device_flops[k % p] += float(costs.flops[a:z].sum()) + \
            float(costs.forward_flops[a:z][again[a:z]].sum())
        per_device_sent[k % p] += float(costs.sent[a:z].sum())
    flops = max(per_device_flops)
    busy = pc.step_time - pc.bubble - pc.step_work
    sent = max(per_device_sent) + pc.p2p_bytes
    # busy + bubble + per-step work = step time; p2p is the part of busy spent sending.
    breakdown = (("pipeline busy", busy), ("bubble", pc.bubble), ("p2p", pc.p2p),
                 ("per-step work", pc.step_work))
    memory = tuple((f"stage {i}", m) for i, m in enumerate(pc.stage_memory))
    return Cost(pc.step_time, flops, sent, pc.peak_memory, breakdown, memory, ())


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
    shared: dict = {}  # collective times by link structure, for every mesh below
    runs: list[tuple[str, Solved]] = []
    # Pipeline settings pinned (microbatches, schedule, recomputation): only pipelines.
    flat = constraints.pp == 1 or (constraints.pp is None and not constraints.pipeline_only())
    why: list[str] = []  # why pipeline candidates were dropped, for the error below
    pipes = None
    if not flat:  # only pipelines: a pinned pp that cannot be met is said before any ILP
        pipes = _pipelined(view, live, cluster, constraints, options, aliased, limit,
                           grouping, pairs, progress, shared, why)
    # The meshes' ILPs and the baselines' (each a constrained ILP) are independent: they
    # are solved together, a few at a time.
    tasks = [("", cand, constraints) for cand in
             (candidates(cluster, constraints) if flat else [])]
    tasks += [(name, cand, bc) for name, bc in (baselines or {}).items()
              for cand in candidates(cluster, bc)]
    base_runs: list[tuple[str, Solved]] = []
    ilps = [functools.partial(solve_candidate, view, live, cluster, cand, cc, options,
                              aliased, limit, grouping, shared) for _, cand, cc in tasks]
    with contextlib.closing(_concurrently(ilps, options.thread_count())) as solving:
        for (name, cand, _), solved in zip(tasks, solving):
            if name:
                base_runs.append((name, solved))
                continue
            runs.append((cand.label, solved))
            if progress:
                progress(f"mesh {cand.label}: {solved.cost.step_time * 1e3:.3f} ms "
                         f"({solved.result.status}, {solved.result.wall_time:.2f} s)")
    # Placement search on the most promising meshes only: it re-times every collective per
    # swap tried and re-solves the ILP, and a slow mesh seldom overtakes the best by
    # placement alone.
    ranked = sorted((k for k in range(len(runs)) if runs[k][1].cost.peak_memory <= limit),
                    key=lambda k: runs[k][1].cost.step_time)
    for k in ranked[:_PLACEMENT_SEARCHES]:
        runs[k] = (runs[k][0], _improve_placement(runs[k][1], view, live, cluster,
                                                  constraints, options, aliased, limit,
                                                  grouping, shared, progress))
    if pipes is None:
        pipes = _pipelined(view, live, cluster, constraints, options, aliased, limit,
                           grouping, pairs, progress, shared, why)
    fits = [(l, s) for l, s in runs if s.cost.peak_memory <= limit]
    fits += pipes  # each stage already fits its own devices' memory (_pipelined)
    # Hand rules are points of the planner's own search space: if the ILP stopped short of
    # one of them (time limit), that point is the better plan and is taken.
    fits += [("rule:" + l, s) for l, s in base_runs if s.cost.peak_memory <= limit
             and constraints == Constraints()]
    if not fits:
        if not runs and not pipes:
            memory = any(_LEAST_MEMORY in w for w in why)
            raise ValueError(f"no plan matches {constraints}: " + "; ".join(why[:3]) + (
                ". Pin fewer settings (more stages, recomputation and ZeRO save memory), use "
                "more devices, a smaller batch, or raise memory_limit." if memory else
                ". Relax the constraints."))
        need = min(s.cost.peak_memory for _, s in runs + pipes)
        raise MemoryError(
            f"no plan fits {_bytes(limit)} per device; the smallest found needs "
            f"{_bytes(need)}. Use more devices, a smaller batch, or raise memory_limit.")
    fits.sort(key=lambda ls: ls[1].cost.step_time)
    label, best = fits[0]
    plan = _to_plan(graph, cluster, best, view, out_values, in_treedef, out_treedef, pairs,
                    time_spent=_time.perf_counter() - t0)

    alts = tuple(Alternative(l if l.startswith("pp") else f"mesh {l}",
                             s.candidate.mesh.shape, s.axis_names, s.cost)
                 for l, s in sorted(runs + pipes, key=lambda ls: ls[1].cost.step_time)
                 if s is not best)
    bases = tuple(Alternative(l, s.candidate.mesh.shape, s.axis_names, s.cost)
                  for l, s in base_runs)
    notes = ()
    if label.startswith("rule:"):
        own = min((s for _, s in runs + pipes), key=lambda s: s.cost.step_time)
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
    have = a.value_layout
    for op in view.ops:
        lays = a.op_layouts.get(op.id) if op.node is not None else None
        if lays is None:
            continue
        ins = lays[0]
        # An operand read in another layout than it has (values without one: constants).
        if any(want != have.get(v, want) for v, want in zip(op.inputs, ins)):
            op_inputs[op.node.id] = tuple(ins)
    r = best.result
    problem = best.problem
    stages, settings, order = (), None, best.candidate.mesh.device_ids
    if best.pipeline is not None:
        pc = best.pipeline
        order = best.stage_order
        p = len(pc.stages) // pc.virtual_stages
        chunk = len(order) // p
        # Interleaved: p * v virtual stages, the k-th on the devices of stage k mod p.
        stages = tuple(Stage(layers, tuple(order[(k % p) * chunk:(k % p + 1) * chunk]),
                             best.candidate.mesh.shape) for k, layers in enumerate(pc.stages))
        settings = PipelineSettings(pc.microbatches, pc.schedule, pc.virtual_stages, pc.remat,
                                    pc.zero, tuple(i for i, r in enumerate(pc.recompute) if r),
                                    pc.act_scale)
    solver = (("status", r.status), ("gap", r.gap), ("ilp_seconds", r.wall_time),
              ("plan_seconds", time_spent), ("classes", len(problem.classes)),
              ("groups", len(problem.groups)))
    return Plan(
        mesh_shape=best.candidate.mesh.shape, axis_names=best.axis_names,
        device_order=tuple(order), in_layouts=in_layouts, stages=stages, pipeline=settings,
        out_layouts=tuple(out_layouts), in_treedef=in_treedef, out_treedef=out_treedef,
        cost=best.cost, value_layouts=dict(sorted(a.value_layout.items())), op_inputs=op_inputs,
        graph_fingerprint=graph_fingerprint(graph), cluster_fingerprint=cluster.fingerprint(),
        cluster_name=cluster.name, solver=solver,
        unknown_primitives=graph.unknown_primitives,
        input_paths=tuple(i.path for i in graph.input_info))


@paused_gc()
def estimate_plan(graph: Graph, plan: Plan, cluster: Cluster,
                  options: SearchOptions = SearchOptions(), *, pairs=None,
                  donated: frozenset[int] = frozenset()) -> Cost:
    """Cost of a fixed plan's mesh, placement and layouts on `cluster` (same device count)."""
    if cluster.num_devices != len(plan.device_order):
        raise ValueError(f"the plan uses {len(plan.device_order)} devices; cluster "
                         f"{cluster.name!r} has {cluster.num_devices}. Re-plan for it instead.")
    pairs = pairs or {}
    view = build_view(graph, pairs)
    live = liveness(view)
    aliased = frozenset(pairs[v] for v in donated if v in pairs)
    if plan.stages:
        return _estimate_pipelined(view, live, plan, cluster, options, pairs, aliased)
    mesh = LogicalMesh(plan.mesh_shape, plan.device_order)
    problem = _fixed_problem(view, cluster, mesh, options)
    cost, _ = evaluate(problem, _plan_choice(problem, plan), live, aliased, plan.axis_names)
    return cost


def _fixed_problem(view, cluster: Cluster, mesh: LogicalMesh, options: SearchOptions,
                   weight_moves: float = 1.0, one_program: bool = True):
    """The ILP data of `mesh` with one class per group: a fixed plan's layouts are read
    group by group, as the plan may give identical layers different layouts."""
    return _problem(view, cluster, MeshCandidate(mesh, None, "fixed"), Constraints(),
                    dataclasses.replace(options, tie_layers=False), None, None, weight_moves,
                    one_program)


def _plan_choice(problem, plan: Plan) -> tuple[int, ...]:
    """Per class, the strategy that reproduces the plan's layouts (ties: the cheaper)."""
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
        scores = [(sum(w == lay for w, lay in zip(want, s.produced)) +
                   sum(w == lay for w, lay in zip(want_slots, s.slots)), -s.time)
                  for s in problem.strategies[c]]
        choice.append(max(range(len(scores)), key=scores.__getitem__))
    return tuple(choice)


def _estimate_pipelined(view, live, plan: Plan, cluster: Cluster, options: SearchOptions,
                        pairs, aliased) -> Cost:
    """A pipelined plan re-costed on `cluster`: each stage's layouts on its own devices,
    cut into layers, under the plan's split, schedule, microbatches and memory choices."""
    ps = plan.pipeline
    p = len(plan.stages) // ps.virtual_stages
    chunks = [plan.stages[k].device_ids for k in range(p)]
    layers = find_layers(view, pairs)
    if layers is None or layers.num_layers != plan.stages[-1].layers[1]:
        raise ValueError("the plan's pipeline stages do not match this step's layers; "
                         "re-plan it for this step.")
    subs = [cluster.subset(ch) for ch in chunks]
    mesh = LogicalMesh(plan.mesh_shape, tuple(range(len(chunks[0]))))
    dp_axes = tuple(i for i, a in enumerate(plan.axis_names) if a.startswith("dp"))
    in_place = frozenset(v for v, out in pairs.items() if out in aliased)
    by_kind: dict[str, object] = {}
    per_stage = []
    for sub, kind in zip(subs, _stage_kinds(subs)):
        if kind not in by_kind:
            problem = _fixed_problem(view, sub, mesh, options, float(ps.microbatches),
                                     one_program=False)
            choice = _plan_choice(problem, plan)
            costs = layer_costs(problem, choice, assign(problem, choice), layers, live,
                                dp_axes, in_place)
            # The activation calibration of planning, not a new one: planning calibrates
            # once per tensor-parallel degree, on one stage mesh and generation.
            by_kind[kind] = dataclasses.replace(costs, act_scale=ps.act_scale)
        per_stage.append(by_kind[kind])
    n = layers.num_layers
    setting = Setting(p, ps.microbatches, ps.schedule, ps.virtual_stages, ps.remat, ps.zero,
                      tuple(i in ps.recompute for i in range(n)) if ps.remat == "layers" else ())
    pc = evaluate_split(per_stage, setting, [s.layers for s in plan.stages],
                        _hop(cluster, chunks))
    return _pipeline_cost(per_stage[0], pc)
