"""The decorator users touch: `auto_parallel`, and the helpers around a planned step."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshplan.costmodel import Cluster
from meshplan.ir import Graph, default_roles, trace
from meshplan.ir._util import paused_gc
from meshplan.planner import Constraints, Cost, Plan, SearchOptions, search
from meshplan.planner._search import estimate_plan, graph_fingerprint

# The hand rules every plan is compared with (and `baselines` returns), as constraints of
# the same search: each fixes the mesh and the argument layouts the rule prescribes, and
# the solver only propagates layouts through the step as the rule would.
def baseline_constraints(cluster: Cluster) -> dict[str, Constraints]:
    """dp, fsdp and megatron (tp inside a node, dp across) for `cluster`."""
    n = cluster.num_devices
    per_node = max(len(cluster.devices_of_node(k)) for k in range(cluster.num_nodes))
    tp = int(np.gcd(n, per_node))
    return {
        "dp": Constraints(dp=n, zero=0),
        "fsdp": Constraints(dp=n, zero=3),
        "megatron": Constraints(tp=tp, dp=n // tp, zero=0, tp_params=True),
    }


def _check_same_step(plan: Plan, graph: Graph) -> None:
    """Refuse a plan made for another model or other argument shapes than `graph`'s."""
    fp = graph_fingerprint(graph)
    if fp != plan.graph_fingerprint:
        raise ValueError(
            "this plan was made for another model, other argument shapes or roles (graph "
            f"fingerprint {plan.graph_fingerprint[:12]}..., this step traces to "
            f"{fp[:12]}...); plan again with train_step.plan(*args).")
    if len(graph.inputs) != len(plan.in_layouts):
        raise ValueError(f"this plan has {len(plan.in_layouts)} argument layouts but the "
                         f"step takes {len(graph.inputs)} arrays; plan again.")


@dataclasses.dataclass
class _Traced:
    graph: Graph
    in_treedef: Any
    out_treedef: Any
    pairs: dict[int, int]
    donated: frozenset[int]


def _signature(args) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    # dtype objects hash and compare by value (str() of one costs a microsecond); a Python
    # scalar is tagged apart, as np.dtype("bool") == bool holds.
    return (treedef, tuple((tuple(np.shape(x)), ("array", x.dtype) if hasattr(x, "dtype")
                            else ("python", type(x))) for x in leaves))


def _pairs(graph: Graph, args, out_shape, roles) -> dict[int, int]:
    """Input value -> output value that replaces it (same subtree shapes, e.g. new params)."""
    outs = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)
    offsets, k = [], 0
    for o in outs:
        offsets.append(k)
        k += len(jax.tree_util.tree_leaves(o))
    in_offsets, k = [], 0
    for a in args:
        in_offsets.append(k)
        k += len(jax.tree_util.tree_leaves(a))
    pairs: dict[int, int] = {}
    used = set()
    for oi, o in enumerate(outs):
        sig = _signature(o)
        for ai, a in enumerate(args):
            if ai in used or roles[ai] == "data" or _signature(a) != sig:
                continue
            used.add(ai)
            n = len(jax.tree_util.tree_leaves(o))
            for j in range(n):
                pairs[graph.inputs[in_offsets[ai] + j]] = graph.outputs[offsets[oi] + j]
            break
    return pairs


class AutoParallel:
    """A step function that plans itself on first call (per argument signature).

    Made by `auto_parallel`; see there for an example.
    """

    def __init__(self, fn: Callable, *, cluster: Cluster | None = None,
                 donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = (),
                 memory_limit: float | None = None, constraints: Constraints | None = None,
                 plan: Plan | None = None, roles: Sequence[str] | None = None,
                 time_limit: float = 3.0, stage_patience: int | None = 2,
                 workers: int | None = None):
        self.fn = fn
        self._cluster = cluster
        self._local: Cluster | None = None
        self.donate_argnums = tuple(donate_argnums)
        self.static_argnums = tuple(static_argnums)
        self.constraints = constraints or Constraints()
        self.options = SearchOptions(memory_limit=memory_limit, time_limit=time_limit,
                                     stage_patience=stage_patience, workers=workers)
        self.roles = roles
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan= takes a meshplan Plan, not {type(plan).__name__}; load a "
                            "saved plan with mp.Plan.from_json(text) first.")
        self._fixed_plan = plan
        self._traced: dict[tuple, _Traced] = {}
        self._plans: dict[tuple, Plan] = {}
        self._compiled: dict[tuple, Any] = {}
        self._weights: dict[tuple, dict] = {}  # pipelines: per-value microbatch weights
        functools.update_wrapper(self, fn)

    @property
    def cluster(self) -> Cluster:
        # The local cluster is made when first needed and kept apart from `_cluster`,
        # which says whether the user named one (a saved plan is checked against that).
        if self._cluster is not None:
            return self._cluster
        if self._local is None:
            self._local = Cluster.local()
        return self._local

    # ------------------------------------------------------------------ tracing

    def _split(self, args):
        """(dynamic args, bound function) with static arguments closed over."""
        if not self.static_argnums:
            return tuple(args), self.fn
        static = {i: args[i] for i in self.static_argnums}
        dyn = tuple(a for i, a in enumerate(args) if i not in static)

        def bound(*d):
            it = iter(d)
            full = [static[i] if i in static else next(it) for i in range(len(args))]
            return self.fn(*full)

        return dyn, bound

    def _key(self, args) -> tuple:
        static = tuple(repr(args[i]) for i in self.static_argnums)
        dyn, _ = self._split(args)
        return (_signature(dyn), static)

    @paused_gc()  # one bulk-allocation phase, as in `search` (see `paused_gc`)
    def trace(self, *args) -> _Traced:
        """The traced Graph of the step for these arguments (cached per signature)."""
        return self._trace(self._key(args), args)

    def _trace(self, key, args) -> _Traced:
        if key not in self._traced:
            dyn, fn = self._split(args)
            roles = tuple(self.roles) if self.roles else default_roles(len(dyn))
            graph = trace(fn, *dyn, roles=roles)
            out_shape = graph.out_shape
            pairs = _pairs(graph, dyn, out_shape, roles)
            dyn_donate = self._dynamic_donate(len(args))
            donated = frozenset(i.value for i in graph.input_info if i.arg_index in dyn_donate)
            self._traced[key] = _Traced(graph, jax.tree_util.tree_structure(dyn),
                                        jax.tree_util.tree_structure(out_shape), pairs, donated)
        return self._traced[key]

    def _dynamic_donate(self, nargs: int) -> set[int]:
        """Donated argument positions counted among the dynamic arguments."""
        dyn_index = [i for i in range(nargs) if i not in self.static_argnums]
        return {dyn_index.index(i) for i in self.donate_argnums if i in dyn_index}

    # ------------------------------------------------------------------ planning

    @paused_gc()  # tracing and planning: one bulk-allocation phase (see `paused_gc`)
    def plan(self, *args, constraints: Constraints | None = None, cluster: Cluster | None = None,
             compare_baselines: bool = True, progress: Callable[[str], None] | None = None
             ) -> Plan:
        """Plan the step for these arguments (arrays or ShapeDtypeStructs) without running it.

        >>> # plan = train_step.plan(params, opt_state, batch, constraints=mp.Constraints(tp=4))
        """
        arg_key = self._key(args)
        if self._fixed_plan is not None and constraints is None and cluster is None:
            # Checked once per argument signature: the same Plan object each call, so the
            # program compiled for it is reused.
            if (arg_key, "fixed") not in self._plans:
                self._plans[(arg_key, "fixed")] = self._check_fixed(args)
            return self._plans[(arg_key, "fixed")]
        t = self._trace(arg_key, args)
        cluster = cluster or self.cluster
        c = constraints or self.constraints
        key = (arg_key, c, cluster.fingerprint(), compare_baselines)
        if key not in self._plans:
            bases = baseline_constraints(cluster) if compare_baselines else None
            self._plans[key] = search(t.graph, cluster, c, self.options, pairs=t.pairs,
                                      donated=t.donated, out_values=t.graph.outputs,
                                      in_treedef=t.in_treedef, out_treedef=t.out_treedef,
                                      baselines=bases, progress=progress)
        return self._plans[key]

    def _check_fixed(self, args) -> Plan:
        """Refuse a saved plan made for another model, other shapes or another cluster."""
        plan = self._fixed_plan
        t = self.trace(*args)
        _check_same_step(plan, t.graph)
        if self._cluster is not None and self._cluster.fingerprint() != plan.cluster_fingerprint:
            raise ValueError(
                f"this plan was made for cluster {plan.cluster_name!r} (fingerprint "
                f"{plan.cluster_fingerprint[:12]}...), not for the given cluster "
                f"{self._cluster.name!r}; plan again for this cluster, or leave cluster= unset "
                "to run the plan on local devices of the same count.")
        # JSON keeps the argument tree's leaf order, not every node type: take the step's.
        return dataclasses.replace(plan, in_treedef=t.in_treedef, out_treedef=t.out_treedef)

    # ------------------------------------------------------------------ running

    def compile(self, *args, plan: Plan | None = None):
        """The step compiled under its plan: a `jax.stages.Compiled`."""
        plan = plan or self.plan(*args)
        if plan.stages:
            raise ValueError("a pipelined plan runs as one program per stage and pass, not as "
                             "one compiled program; call the step to run it, or plan with "
                             "Constraints(pp=1) to get one program to compile and measure.")
        return self._jitted(args, plan).lower(*self._split(args)[0]).compile()

    def _pipelined(self, args, plan: Plan):
        """The step run as `plan`'s pipeline (see meshplan.runtime._pipestep)."""
        from meshplan.planner._layers import find_layers
        from meshplan.planner._ops import build_view
        from meshplan.runtime._pipestep import PipelinedStep
        from meshplan.runtime._scansplit import split_block_scans
        m = plan.pipeline.microbatches
        t = self.trace(*args)
        data = [i for i in t.graph.input_info if i.role == "data"]
        full = {i.value: t.graph.values[i.value].shape for i in data}
        bad = [i.path for i in data if not full[i.value] or full[i.value][0] % m]
        if not data or bad:
            raise ValueError(f"a pipeline of {m} microbatches splits dim 0 of every data "
                             f"argument by {m}; {bad or 'no data argument'} cannot be split. "
                             "Choose num_microbatches dividing the batch.")
        micro_args, double_args = _batch_resized(args, self, data, m)
        tm = self.trace(*micro_args)
        view = build_view(tm.graph, tm.pairs)
        layers = find_layers(view, tm.pairs)
        if layers is None:
            raise ValueError("this step has no repeated layers to split into stages.")
        labels = {op.node.id: (layers.op_pass[op.id], layers.op_layer[op.id])
                  for op in view.ops if op.node is not None and op.id in layers.op_pass
                  and op.mult == 1}
        graph, origin, input_slices, output_pieces = tm.graph, {}, {}, {}
        if layers.scanned:  # one scan per stage (see meshplan.runtime._scansplit)
            cut = split_block_scans(graph, labels, _scan_passes(graph, view, layers),
                                    [s.layers for s in plan.stages], layers.num_blocks)
            graph, labels, origin = cut.graph, cut.labels, cut.origin
            input_slices, output_pieces = cut.input_slices, cut.output_pieces
        micro_data = frozenset(i.value for i in tm.graph.input_info if i.role == "data")
        runner = PipelinedStep(graph, labels, plan, tm.graph.outputs, tm.pairs,
                               sorted(micro_data), m, input_slices=input_slices,
                               output_pieces=output_pieces)
        # Measured once per step signature and microbatch count (plans differ in stages);
        # a stacked value's pieces weigh as the whole.
        wanted = sorted({origin.get(v, v) for v in runner.accumulated})
        wkey = (self._key(micro_args), tuple(wanted))
        if wkey not in self._weights:
            self._weights[wkey] = _microbatch_weights(self, args, micro_args, double_args, tm,
                                                      wanted, m)
        runner.weights = {v: self._weights[wkey][origin.get(v, v)] for v in runner.accumulated}
        layouts = dict(zip(tm.graph.inputs, plan.in_layouts))
        out_treedef = tm.out_treedef

        def split(dyn) -> tuple[dict, dict]:
            """The step's arguments as (state, batch): graph input -> array."""
            leaves = jax.tree_util.tree_leaves(dyn)
            state = {v: x for v, x in zip(graph.inputs, leaves) if v not in micro_data}
            batch = {v: x for v, x in zip(graph.inputs, leaves) if v in micro_data}
            return state, batch

        def step(*dyn):
            return jax.tree_util.tree_unflatten(out_treedef, runner(*split(dyn), layouts))

        def memory_peaks(*dyn) -> dict[int, int]:
            """Runs one step; device id -> the most bytes it held at once (arrays the step
            holds plus XLA's temporaries of the program running)."""
            peaks: dict[int, int] = {}
            runner(*split(dyn), layouts, profile=peaks)
            return peaks

        step.runner = runner  # the programs, for inspection
        step.memory_peaks = memory_peaks
        return step

    def _jitted(self, args, plan: Plan | None = None):
        from meshplan.runtime import build_mesh, interpret
        plan = plan or self.plan(*args)
        # Keyed by the plan's id; the entry holds the plan, so that id cannot be reused by
        # another plan while the entry exists.
        key = (self._key(args), id(plan))
        if key not in self._compiled and plan.stages:
            self._compiled[key] = (plan, self._pipelined(args, plan))
        if key not in self._compiled:
            t = self.trace(*args)
            mesh = build_mesh(plan)
            run = interpret(t.graph, plan, mesh)
            sh = lambda lay: jax.sharding.NamedSharding(mesh, _spec(lay, plan))
            in_sh = jax.tree_util.tree_unflatten(t.in_treedef, [sh(l) for l in plan.in_layouts])
            out_sh = jax.tree_util.tree_unflatten(t.out_treedef,
                                                  [sh(l) for l in plan.out_layouts])
            out_treedef = t.out_treedef

            def step(*dyn):
                outs = run(*jax.tree_util.tree_leaves(dyn))
                return jax.tree_util.tree_unflatten(out_treedef, outs)

            self._compiled[key] = (plan, jax.jit(step, in_shardings=tuple(in_sh),
                                                 out_shardings=out_sh,
                                                 donate_argnums=tuple(sorted(
                                                     self._dynamic_donate(len(args))))))
        return self._compiled[key][1]

    def __call__(self, *args):
        dyn, _ = self._split(args)
        return self._jitted(args)(*dyn)


def _batch_resized(args, step, data, m):
    """The arguments with every data leaf's batch cut to B/m, and to 2B/m."""
    dyn, _ = step._split(args)
    paths = {i.path for i in data}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(dyn)

    def resized(factor):
        out = []
        for path, x in leaves:
            key = f"[{path[0].idx}]" + jax.tree_util.keystr(path[1:])
            if key in paths:
                shape = (x.shape[0] * factor // m,) + tuple(x.shape[1:])
                out.append(jax.ShapeDtypeStruct(shape, x.dtype))
            else:
                out.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype))
        return _with_static(args, step, jax.tree_util.tree_unflatten(treedef, out))
    return resized(1), resized(2)


def _with_static(args, step, dyn):
    """Full argument tuple: `dyn` in the dynamic positions, the static ones kept."""
    it = iter(dyn)
    return tuple(args[i] if i in step.static_argnums else next(it) for i in range(len(args)))


def _scan_passes(graph, view, layers) -> dict[int, str]:
    """Top-level scan node id -> the pass it runs in: "forward" if any op of its body leads
    to the loss, else "backward"."""
    parent = {bn.id: n.id for n in graph.nodes if n.primitive == "scan"
              for bn, _ in n.bodies[0].walk()}
    out: dict[int, str] = {}
    for op in view.ops:
        scan = parent.get(op.node.id) if op.node is not None else None
        if scan is not None and op.id in layers.op_pass:
            if layers.op_pass[op.id] == "forward" or out.get(scan) == "forward":
                out[scan] = "forward"
            else:
                out[scan] = "backward"
    return out


def _microbatch_weights(step, args, micro_args, double_args, tm, wanted, m) -> dict:
    """Per value combined over microbatches: 1/m if it averages over the batch, 1 if it
    sums. Measured: the step runs on two microbatches, each alone and both together; a
    mean of the two is a mean, their sum a sum. A value zero on both is probed on the
    next pair. Anything else (a loss divided by a data-dependent count, such as a masked
    mean) is refused: a pipeline cannot combine it from its microbatches."""
    if not wanted:
        return {}
    if m == 1:  # one microbatch: nothing to combine
        return {v: 1.0 for v in wanted}
    td = step.trace(*double_args)
    gm, gd = tm.graph, td.graph
    if len(gm.nodes) != len(gd.nodes):
        raise ValueError("the step traces to different programs for different batch sizes; "
                         "a pipeline cannot split its batch. Plan with Constraints(pp=1).")
    # The same value in the doubled program: same node, same output position.
    twin = {v: w for a, b in zip(gm.nodes, gd.nodes) for v, w in zip(a.outputs, b.outputs)}
    leaves = jax.tree_util.tree_leaves(step._split(args)[0])
    micro = jax.tree_util.tree_leaves(step._split(micro_args)[0])
    data = [info.role == "data" for info in gm.input_info]
    b = next(x.shape[0] for x, d in zip(micro, data) if d)
    run_one, run_two = _value_runner(gm), _value_runner(gd)
    # Rounding is not a third way of combining: a value computed in a narrow float
    # anywhere in the step (bfloat16 activations under float32 weights) carries its
    # error. The example GPT's bfloat16 gradients are off the mean by up to 0.018.
    eps = max([float(jnp.finfo(val.dtype).eps) for val in gm.values.values()
               if jnp.issubdtype(val.dtype, jnp.floating)] or [0.0])
    tol = max(_COMBINE_TOLERANCE, 8 * eps)

    def pick(first: int, end: int) -> list:
        """The arguments with the data cut to microbatches first..end-1."""
        return [x[first * b:end * b] if d else x for x, d in zip(leaves, data)]

    out: dict[int, float] = {}
    for k in range(0, m - 1, 2):  # microbatches k and k+1, while some value is undecided
        left = [v for v in wanted if v not in out]
        if not left:
            break
        one = run_one(left, pick(k, k + 1))
        other = run_one(left, pick(k + 1, k + 2))
        two = run_two([twin[v] for v in left], pick(k, k + 2))
        for v, x, y, z in zip(left, one, other, two):
            if np.any(z):
                out[v] = _combining_weight(v, x, y, z, m, tol, gm, tm.graph.outputs)
    # Zero on every pair probed: any weight combines it to zero.
    return {v: out.get(v, 1.0 / m) for v in wanted}


def _value_runner(graph):
    """run(ids, inputs) -> the float64 values of `ids` when `graph` runs on `inputs`
    (unsharded, one program per set of ids)."""
    from meshplan.runtime import Interpreter
    from meshplan.runtime._apply import read_value
    it = Interpreter(graph, _Bare(), None)
    cache: dict[tuple, Callable] = {}

    def run(ids, ins):
        key = tuple(ids)
        if key not in cache:
            def values(*a):
                env = dict(zip(graph.inputs, a))
                for node in graph.nodes:
                    env.update(zip(node.outputs, it._eval(
                        node, [read_value(graph, env, v) for v in node.inputs])))
                return [env[v] for v in ids]
            cache[key] = jax.jit(values)
        return [np.asarray(o, np.float64) for o in cache[key](*ins)]
    return run


def _combining_weight(v, x, y, z, m, tol, graph, outputs) -> float:
    """1/m if `z` (two microbatches together) is the mean of `x` and `y` (each alone), 1 if
    their sum; else a ValueError naming the value and the likely cause."""
    size = float(np.linalg.norm(z))
    off_mean = float(np.linalg.norm(z - (x + y) / 2)) / size
    off_sum = float(np.linalg.norm(z - (x + y))) / size
    if off_mean < tol and off_mean <= off_sum:
        return 1.0 / m
    if off_sum < tol:
        return 1.0
    what = (f"the step's result #{outputs.index(v)} (in jax.tree.leaves order)"
            if v in outputs else
            f"a value of shape {graph.values[v].shape} the backward pass hands to the update "
            "(a gradient)")
    raise ValueError(
        f"{what} is neither the mean nor the sum of its values on the microbatches (off "
        f"the mean by {off_mean:.3g}, off the sum by {off_sum:.3g}, relative): it depends "
        "on the batch as a whole, as a loss divided by a data-dependent count (a masked "
        "mean) or a term not scaled by the batch (a regularizer added to a summed loss) "
        "does, and a pipeline cannot combine it from its microbatches. Divide by a count "
        "that does not depend on the data (e.g. the batch's token count), scale such terms "
        "with the batch, or plan with Constraints(pp=1).")


# Relative error (in norm) below which a value counts as the mean or the sum of its
# microbatches' values, for float32 and wider (a step computing in narrower floats: 8
# times their epsilon): rounding of a gradient summed in another order stays well below
# it; a masked mean over unevenly padded microbatches is off by tens of %.
_COMBINE_TOLERANCE = 1e-3


class _Bare:
    """A stand-in plan for running a graph without layout pins."""

    value_layouts: dict = {}
    op_inputs: dict = {}
    axis_names: tuple = ()


def _spec(layout, plan: Plan):
    from meshplan.planner import spec_of
    return spec_of(layout, plan.axis_names)


def auto_parallel(fn: Callable | None = None, **kwargs):
    """Decorate a step so meshplan plans and applies its parallelisation.

    Keyword arguments: cluster (default `Cluster.local()`), donate_argnums, static_argnums,
    memory_limit (bytes per device), constraints (`Constraints`), plan (a saved `Plan` to
    apply without solving), roles (role per argument: "param", "opt_state", "data"),
    time_limit (seconds per ILP solve), stage_patience (pipelines: stop adding stages after
    this many stage counts in a row no faster than the best, passing over counts whose
    best plan recomputes or uses ZeRO-3 unpinned; None tries every count), workers
    (candidate meshes' ILPs solved at once, in threads; default one per CPU).

    Example:
        >>> import meshplan as mp
        >>> @mp.auto_parallel
        ... def train_step(params, opt_state, batch):
        ...     ...
        >>> # plan = train_step.plan(params, opt_state, batch); print(plan.summary())
        >>> # params, opt_state, loss = train_step(params, opt_state, batch)
    """
    if fn is None:
        return lambda f: AutoParallel(f, **kwargs)
    return AutoParallel(fn, **kwargs)


def _as_step(step) -> AutoParallel:
    return step if isinstance(step, AutoParallel) else AutoParallel(step)


def baselines(step, *args, cluster: Cluster | None = None) -> dict[str, Plan]:
    """The hand rules (dp, fsdp, megatron) as plans, costed by the same model.

    >>> # {name: p.cost.step_time for name, p in mp.baselines(train_step, *args).items()}
    """
    step = _as_step(step)
    cluster = cluster or step.cluster
    return {name: step.plan(*args, constraints=c, cluster=cluster, compare_baselines=False)
            for name, c in baseline_constraints(cluster).items()}


def estimate(step, plan: Plan, *args, cluster: Cluster | None = None) -> Cost:
    """Re-cost a fixed plan (same mesh, placement and layouts) on another cluster.

    >>> # mp.estimate(train_step, plan, *args, cluster=mp.clusters.dgx_h100()).step_time
    """
    step = _as_step(step)
    t = step.trace(*args)
    _check_same_step(plan, t.graph)
    return estimate_plan(t.graph, plan, cluster or step.cluster, step.options, pairs=t.pairs,
                         donated=t.donated)
