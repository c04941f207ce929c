"""Plan, Constraints and Stage: the planner's typed, JSON-serialisable results."""
from __future__ import annotations

import dataclasses
import html
import json
import math
from typing import Any

import numpy as np

from meshplan.planner._evaluate import Cost
from meshplan.planner._layout import Layout
from meshplan.planner._readable import layout_lines

PLAN_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Pin any subset of the plan; the solver fills in the rest.

    Attributes:
      tp: tensor-parallel degree: a mesh axis "tp" that never splits the batch of the data.
      dp: data-parallel degree: a mesh axis "dp" that splits the batch of the data.
      mesh_shape: the logical mesh shape (with tp/dp, must agree with them).
      zero: ZeRO stage over the dp axis. 0: parameters and optimizer state replicated over
        dp; 1: optimizer state sharded over dp; 3: parameters too (FSDP).
      tp_params: every parameter of rank >= 2 must be split over "tp" (Megatron's rule).
      pp: pipeline stages (1: no pipeline).
      num_microbatches: microbatches per step in a pipeline (the global batch is fixed).
      schedule: "gpipe", "1f1b" or "interleaved"; virtual_stages: chunks per device for
        the interleaved schedule.
      remat: "none", "full" (each layer's forward pass recomputed in the backward, so
        only its input is kept) or "layers" (some layers recomputed: those whose
        activations do not fit); pipelines only.

    >>> Constraints(tp=4, dp=2)
    Constraints(tp=4, dp=2, mesh_shape=None, zero=None, tp_params=None, pp=None, num_microbatches=None, schedule=None, virtual_stages=None, remat=None)
    """

    tp: int | None = None
    dp: int | None = None
    mesh_shape: tuple[int, ...] | None = None
    zero: int | None = None
    tp_params: bool | None = None
    pp: int | None = None
    num_microbatches: int | None = None
    schedule: str | None = None
    virtual_stages: int | None = None
    remat: str | None = None

    def __post_init__(self):
        for name in ("tp", "dp", "pp", "num_microbatches", "virtual_stages"):
            v = getattr(self, name)
            if v is not None and not _positive_int(v):
                raise ValueError(f"Constraints.{name} must be a positive int; got {v!r}")
        if self.mesh_shape is not None:
            # A tuple of ints: constraints are hashed (plan caches) and compared.
            object.__setattr__(self, "mesh_shape", _shape_tuple(self.mesh_shape))
        if self.zero is not None and (isinstance(self.zero, bool) or self.zero not in (0, 1, 3)):
            raise ValueError(f"Constraints.zero must be 0, 1 or 3 (ZeRO stage); got {self.zero!r}")
        from meshplan.costmodel import SCHEDULES
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"Constraints.schedule={self.schedule!r}; choose one of {SCHEDULES}.")
        if self.remat not in (None, "none", "full", "layers"):
            raise ValueError(f"Constraints.remat={self.remat!r}; choose 'none', 'full' "
                             "(recompute each layer's forward pass in the backward) or "
                             "'layers' (recompute only the layers whose activations do not "
                             "fit).")
        if self.virtual_stages not in (None, 1) and self.schedule not in (None, "interleaved"):
            raise ValueError(f"Constraints.virtual_stages={self.virtual_stages} needs "
                             f"schedule='interleaved' (got {self.schedule!r}).")
        if self.pp == 1 and (self.num_microbatches not in (None, 1) or self.schedule
                             or self.virtual_stages not in (None, 1)
                             or self.remat in ("full", "layers")):
            raise ValueError("Constraints.pp=1 (no pipeline) cannot take num_microbatches, "
                             "schedule, virtual_stages or remat (recomputation is planned "
                             "for pipelines only); leave pp unset or give pp > 1.")
        if self.schedule == "interleaved" and self.virtual_stages == 1:
            raise ValueError("Constraints(schedule='interleaved') runs 2 or more chunks per "
                             "device; give virtual_stages >= 2 or leave it unset.")
        if self.schedule == "interleaved" and self.pp and self.num_microbatches and \
                self.num_microbatches % self.pp:
            raise ValueError(f"Constraints(schedule='interleaved', pp={self.pp}) needs "
                             f"num_microbatches a multiple of pp (Megatron-LM's interleaved "
                             f"schedule); got {self.num_microbatches}.")
        if self.mesh_shape is not None and (self.pp not in (None, 1) or self.pipeline_only()):
            raise ValueError(f"Constraints.mesh_shape={self.mesh_shape} is the whole, "
                             "unpipelined mesh; for a pipeline give each stage's tp and dp "
                             "instead of mesh_shape.")

    def pipeline_only(self) -> tuple[str, ...]:
        """The pinned settings that only a pipeline has (they make the search pipeline)."""
        pinned = (("num_microbatches", self.num_microbatches is not None),
                  ("schedule", self.schedule is not None),
                  ("virtual_stages", self.virtual_stages is not None),
                  ("remat", self.remat in ("full", "layers")))
        return tuple(name for name, on in pinned if on)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# The summary lists at most this many argument-layout lines (folded, see _readable).
_LAYOUT_LINES = 40


def _shape_tuple(shape) -> tuple[int, ...]:
    """`shape` as a non-empty tuple of positive ints, or a ValueError naming it."""
    items = None
    if not isinstance(shape, (str, bytes)):
        try:
            items = tuple(shape)
        except TypeError:  # not iterable (an int, a 0-d array)
            pass
    if not items or not all(_positive_int(n) for n in items):
        raise ValueError("Constraints.mesh_shape must be a non-empty sequence of positive "
                         f"ints, e.g. (2, 4); got {shape!r}")
    return tuple(int(n) for n in items)


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: layers [first, last+1), its devices and mesh shape."""

    layers: tuple[int, int]
    device_ids: tuple[int, ...]
    mesh_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """How a pipelined plan runs: microbatches, schedule, chunks per device, memory choices.

    zero: ZeRO stage over each stage's data-parallel axis (0 none, 1 optimizer state,
    3 weights and gradients too). remat: "none", "full" or "layers" (then `recompute`
    lists the layers whose forward pass is recomputed in the backward).
    """

    microbatches: int
    schedule: str
    virtual_stages: int = 1
    remat: str = "none"
    zero: int = 0
    recompute: tuple[int, ...] = ()  # remat="layers": the layers recomputed
    # The factor the per-layer activation bytes were calibrated by when planning (see
    # planner._pipe.LayerCosts.calibrated), so that `estimate` re-costs alike.
    act_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Alternative:
    """Another plan the search costed: its name, mesh and predicted cost."""

    name: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    cost: Cost


def spec_of(layout: Layout, axis_names: tuple[str, ...]):
    """A Layout as a jax.sharding.PartitionSpec with the mesh's axis names."""
    from jax.sharding import PartitionSpec

    entries = []
    for axes in layout:
        if not axes:
            entries.append(None)
        elif len(axes) == 1:
            entries.append(axis_names[axes[0]])
        else:
            entries.append(tuple(axis_names[a] for a in axes))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parallel plan: logical mesh, device placement, layouts, and its predicted cost.

    `value_layouts` and `op_inputs` are what the runtime pins (keyed by the ids of the traced
    graph, which tracing the same step with the same argument shapes reproduces);
    `in_shardings`/`out_shardings` are PartitionSpec pytrees shaped like the arguments and
    results.

    >>> # plan = train_step.plan(params, opt_state, batch)
    >>> # print(plan.summary()); plan.cost.step_time; plan.in_shardings
    """

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    device_order: tuple[int, ...]
    in_layouts: tuple[Layout, ...]  # per flattened argument leaf
    out_layouts: tuple[Layout, ...]  # per flattened result leaf
    in_treedef: Any
    out_treedef: Any
    cost: Cost
    value_layouts: dict[int, Layout]
    op_inputs: dict[int, tuple[Layout | None, ...]]
    graph_fingerprint: str
    cluster_fingerprint: str
    cluster_name: str
    stages: tuple[Stage, ...] = ()
    pipeline: PipelineSettings | None = None
    alternatives: tuple[Alternative, ...] = ()
    baselines: tuple[Alternative, ...] = ()
    solver: tuple[tuple[str, Any], ...] = ()
    unknown_primitives: tuple[str, ...] = ()
    input_paths: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def device_ids(self) -> np.ndarray:
        """Physical device ids laid out in the mesh's shape ([stages, *mesh] if pipelined)."""
        p = len(self.stages) // (self.pipeline.virtual_stages if self.pipeline else 1)
        shape = ((p,) if self.stages else ()) + tuple(self.mesh_shape)
        return np.asarray(self.device_order).reshape(shape)

    @property
    def in_shardings(self):
        """PartitionSpec pytree, same structure as the step's arguments."""
        import jax
        return jax.tree_util.tree_unflatten(
            self.in_treedef, [spec_of(l, self.axis_names) for l in self.in_layouts])

    @property
    def out_shardings(self):
        """PartitionSpec pytree, same structure as the step's results."""
        import jax
        return jax.tree_util.tree_unflatten(
            self.out_treedef, [spec_of(l, self.axis_names) for l in self.out_layouts])

    # ---------------------------------------------------------------- presentation

    def _rows(self):
        rows = [("meshplan (this plan)", self.mesh_shape, self.axis_names, self.cost)]
        rows += [(a.name, a.mesh_shape, a.axis_names, a.cost) for a in self.alternatives]
        rows += [("baseline: " + b.name, b.mesh_shape, b.axis_names, b.cost)
                 for b in self.baselines]
        return rows

    def summary(self) -> str:
        """A readable account: mesh, placement, argument layouts, cost, alternatives."""
        mesh = " x ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.mesh_shape))
        lines = [f"Plan on {self.cluster_name}: mesh {mesh}",
                 f"  devices: {self.device_ids.tolist()}",
                 f"  predicted step time {self.cost.step_time * 1e3:.3f} ms, "
                 f"{self.cost.flops:.3e} FLOPs/device, {self.cost.comm_bytes / 2**20:.2f} MiB "
                 f"sent/device, peak memory {self.cost.peak_memory / 2**20:.1f} MiB/device",
                 *_time_lines(dict(self.cost.breakdown))]
        if self.stages:
            pp = self.pipeline
            lines.append(f"  pipeline: {len(self.stages) // pp.virtual_stages} stages, "
                         f"{pp.microbatches} microbatches, "
                         f"schedule {pp.schedule}" +
                         (f" x{pp.virtual_stages} chunks" if pp.virtual_stages > 1 else "") +
                         f", remat {pp.remat}" +
                         (f" (layers {list(pp.recompute)})" if pp.remat == "layers" else "") +
                         f", ZeRO-{pp.zero}; layer 0 is the embedding "
                         "('pre'), the last the head and loss ('post')")
            for i, st in enumerate(self.stages):
                lines.append(f"    {'chunk' if pp.virtual_stages > 1 else 'stage'} {i}: "
                             f"layers [{st.layers[0]}, {st.layers[1]}) on "
                             f"devices {st.device_ids[0]}..{st.device_ids[-1]}")
        if self.solver:
            lines.append("  solver: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.solver))
        specs = tuple(str(spec_of(lay, self.axis_names)) for lay in self.in_layouts)
        shown = layout_lines(self.input_paths, specs) if self.input_paths else []
        lines.append(f"  argument layouts ({len(specs)} arrays; [*]: every layer alike):")
        lines += [f"    {line}" for line in shown[:_LAYOUT_LINES]]
        if len(shown) > _LAYOUT_LINES:
            lines.append(f"    ... {len(shown) - _LAYOUT_LINES} more lines (every array's "
                         "PartitionSpec: plan.in_shardings)")
        lines.append("  compared (predicted step time, comm, memory):")
        for name, shape, names, cost in self._rows():
            m = ",".join(f"{n}={s}" for n, s in zip(names, shape))
            lines.append(f"    {name:<28} {m:<12} {cost.step_time * 1e3:10.3f} ms "
                         f"{cost.comm_bytes / 2**20:10.2f} MiB {cost.peak_memory / 2**20:10.1f} MiB")
        if self.unknown_primitives:
            lines.append("  replicated, semantics unknown: " + ", ".join(self.unknown_primitives))
        lines += ["  note: " + n for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "<tr><th>plan</th><th>mesh</th><th>step time (ms)</th><th>comm (MiB)</th>" \
               "<th>peak memory (MiB)</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(dict(zip(names, shape))))}"
            f"</td><td>{cost.step_time * 1e3:.3f}</td><td>{cost.comm_bytes / 2**20:.2f}</td>"
            f"<td>{cost.peak_memory / 2**20:.1f}</td></tr>"
            for name, shape, names, cost in self._rows())
        return (f"<pre>{html.escape(self.summary())}</pre>"
                f"<table>{head}{body}</table>")

    def __repr__(self) -> str:
        return (f"Plan(mesh={dict(zip(self.axis_names, self.mesh_shape))}, "
                f"step_time={self.cost.step_time:.3e}s, cluster={self.cluster_name!r})")

    # ---------------------------------------------------------------- JSON

    def to_json(self) -> str:
        """The plan as JSON (never pickle); `Plan.from_json` reads it back.

        The argument tree is kept as dicts, lists and tuples with its leaf order; other pytree
        nodes (NamedTuples, optax states) come back as tuples. A plan applied to a step
        (`auto_parallel(fn, plan=...)`) takes the step's own tree again.
        """
        doc = {
            "format": PLAN_FORMAT,
            "mesh_shape": list(self.mesh_shape),
            "axis_names": list(self.axis_names),
            "device_order": list(self.device_order),
            "in_layouts": [_lay_json(l) for l in self.in_layouts],
            "out_layouts": [_lay_json(l) for l in self.out_layouts],
            "in_tree": _treedef_json(self.in_treedef, len(self.in_layouts)),
            "out_tree": _treedef_json(self.out_treedef, len(self.out_layouts)),
            "cost": self.cost.to_dict(),
            "value_layouts": {str(k): _lay_json(v) for k, v in self.value_layouts.items()},
            "op_inputs": {str(k): [None if l is None else _lay_json(l) for l in v]
                          for k, v in self.op_inputs.items()},
            "graph_fingerprint": self.graph_fingerprint,
            "cluster_fingerprint": self.cluster_fingerprint,
            "cluster_name": self.cluster_name,
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "pipeline": None if self.pipeline is None else dataclasses.asdict(self.pipeline),
            "alternatives": [_alt_json(a) for a in self.alternatives],
            "baselines": [_alt_json(a) for a in self.baselines],
            "solver": {k: _fmt(v) for k, v in self.solver},
            "unknown_primitives": list(self.unknown_primitives),
            "input_paths": list(self.input_paths),
            "notes": list(self.notes),
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Read a plan written by `to_json`; errors name the missing or malformed field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan file is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a meshplan plan file of format {PLAN_FORMAT} "
                             f"(got format={d.get('format') if isinstance(d, dict) else None!r})")
        try:
            plan = cls(
                mesh_shape=tuple(int(x) for x in d["mesh_shape"]),
                axis_names=tuple(str(x) for x in d["axis_names"]),
                device_order=tuple(int(x) for x in d["device_order"]),
                in_layouts=tuple(_lay_from(l) for l in d["in_layouts"]),
                out_layouts=tuple(_lay_from(l) for l in d["out_layouts"]),
                in_treedef=_treedef_from(d["in_tree"]),
                out_treedef=_treedef_from(d["out_tree"]),
                cost=Cost.from_dict(d["cost"]),
                value_layouts={int(k): _lay_from(v) for k, v in d["value_layouts"].items()},
                op_inputs={int(k): tuple(None if l is None else _lay_from(l) for l in v)
                           for k, v in d["op_inputs"].items()},
                graph_fingerprint=str(d["graph_fingerprint"]),
                cluster_fingerprint=str(d["cluster_fingerprint"]),
                cluster_name=str(d["cluster_name"]),
                stages=tuple(Stage(tuple(s["layers"]), tuple(s["device_ids"]),
                                   tuple(s["mesh_shape"])) for s in d.get("stages", [])),
                pipeline=None if d.get("pipeline") is None else
                _pipeline_from(d["pipeline"]),
                alternatives=tuple(_alt_from(a) for a in d.get("alternatives", [])),
                baselines=tuple(_alt_from(a) for a in d.get("baselines", [])),
                solver=tuple(d.get("solver", {}).items()),
                unknown_primitives=tuple(d.get("unknown_primitives", [])),
                input_paths=tuple(d.get("input_paths", [])),
                notes=tuple(d.get("notes", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"plan file has a missing or malformed field: {e!r}") from None
        order = plan.device_order
        v = plan.pipeline.virtual_stages if plan.pipeline else 1
        if bool(plan.stages) != (plan.pipeline is not None) or not _positive_int(v) or \
                len(plan.stages) % v:
            raise ValueError(f"plan file has {len(plan.stages)} stages and pipeline "
                             f"{d.get('pipeline')!r}: stages and pipeline settings come "
                             "together, and virtual_stages (a positive int) divides the "
                             "stage count; re-save the plan from Plan.to_json.")
        # Every device once: mesh positions map to physical ids (a pipeline lists every
        # stage's devices, stage after stage, a single mesh exactly its own).
        p = len(plan.stages) // v
        want = max(p, 1) * math.prod(plan.mesh_shape)
        if sorted(order) != list(range(want)):
            raise ValueError(f"plan file's device_order {list(order)} is not a permutation of "
                             f"the {want} device ids 0..{want - 1} its mesh "
                             f"{plan.mesh_shape}" + (f" times {p} stages" if plan.stages else "")
                             + " needs; re-save the plan from Plan.to_json.")
        for k, st in enumerate(plan.stages):
            chunk = order[(k % p) * len(order) // p:(k % p + 1) * len(order) // p]
            if tuple(st.device_ids) != tuple(chunk):
                raise ValueError(f"plan file's stage {k} lists devices {list(st.device_ids)} "
                                 f"but device_order gives it {list(chunk)}; re-save the plan "
                                 "from Plan.to_json.")
        return plan


def _fmt(v):
    return round(v, 6) if isinstance(v, float) else v


def _lay_json(layout: Layout) -> list:
    return [list(axes) for axes in layout]


def _lay_from(x) -> Layout:
    return tuple(tuple(int(a) for a in axes) for axes in x)


def _alt_json(a: Alternative) -> dict:
    return {"name": a.name, "mesh_shape": list(a.mesh_shape), "axis_names": list(a.axis_names),
            "cost": a.cost.to_dict()}


def _alt_from(d) -> Alternative:
    return Alternative(d["name"], tuple(d["mesh_shape"]), tuple(d["axis_names"]),
                       Cost.from_dict(d["cost"]))


def _time_lines(parts: dict[str, float]) -> list[str]:
    """Step time as compute + communication, and the communication split two ways (by
    collective kind, by mesh axis: each sums to the communication total, so they are
    shown apart), with the share spent resharding between ops."""
    ms = lambda v: f"{v * 1e3:.3f} ms"  # noqa: E731
    if "bubble" in parts:  # a pipeline
        return [f"  time: pipeline busy {ms(parts.get('pipeline busy', 0.0))} (of it p2p "
                f"{ms(parts.get('p2p', 0.0))}) + bubble {ms(parts['bubble'])} + per-step "
                f"work {ms(parts.get('per-step work', 0.0))}"]
    kinds = {k: v for k, v in parts.items()
             if k not in ("compute", "reshard") and not k.startswith("axis:")}
    axes = {k[len("axis:"):]: v for k, v in parts.items() if k.startswith("axis:")}
    comm = sum(kinds.values())
    lines = [f"  time: compute {ms(parts.get('compute', 0.0))} + communication {ms(comm)}"]
    if comm > 0:
        lines.append("    communication by collective: " + ", ".join(
            f"{k} {ms(v)}" for k, v in kinds.items() if v > 0))
        lines.append("    communication by mesh axis: " + ", ".join(
            f"{k} {ms(v)}" for k, v in axes.items() if v > 0) +
            f"; of it resharding between ops: {ms(parts.get('reshard', 0.0))}")
    return lines


def _treedef_json(treedef, n: int):
    """A treedef as a JSON skeleton: the pytree with leaf positions as integers."""
    import jax
    return _to_jsonable(jax.tree_util.tree_unflatten(treedef, list(range(n))))


def _to_jsonable(tree):
    if isinstance(tree, dict):
        # int keys stay ints (a list position, not a JSON object key), so the reloaded
        # tree matches the arguments' structure exactly; other keys become strings.
        return {"dict": [[k if isinstance(k, (int, str)) else str(k), _to_jsonable(v)]
                         for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return {"list" if isinstance(tree, list) else "tuple": [_to_jsonable(v) for v in tree]}
    if isinstance(tree, int):
        return tree
    if tree is None:
        return {"none": None}
    # Other pytree nodes (NamedTuples, optax states, nnx State): keep the leaf order only.
    import jax
    leaves = jax.tree_util.tree_leaves(tree)
    return {"opaque": [_to_jsonable(v) for v in leaves]}


def _from_jsonable(x):
    if isinstance(x, int):
        return x
    (kind, v), = x.items()
    if kind == "dict":
        return {k: _from_jsonable(e) for k, e in v}
    if kind == "list":
        return [_from_jsonable(e) for e in v]
    if kind == "tuple":
        return tuple(_from_jsonable(e) for e in v)
    if kind == "none":
        return None
    return tuple(_from_jsonable(e) for e in v)  # opaque: a flat tuple keeps the leaf order


def _treedef_from(x):
    import jax
    return jax.tree_util.tree_structure(_from_jsonable(x))


def _pipeline_from(d: dict) -> PipelineSettings:
    """PipelineSettings from JSON (lists back to tuples)."""
    return PipelineSettings(**{**d, "recompute": tuple(d.get("recompute", ()))})
