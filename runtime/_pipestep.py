"""Pipelined execution of a traced train step: stages on submeshes, microbatches in flight.

A pipelined plan splits the step's layers (embedding, blocks, head: see
`planner._layers`) into stages on disjoint submeshes. This executor runs the user's own
step that way, with no change to the step:

1. The step is traced again with the data's batch cut to one microbatch (B/m).
2. Its ops are labelled as in planning: pass (forward, backward, once-per-step update) and
   layer; a layer's stage comes from `plan.stages`. Each (pass, stage) becomes a program,
   jitted on that stage's submesh, with the stage's parameters laid out as the plan says
   (data and tensor parallelism inside the stage come from those layouts).
   With recomputation (`remat="full"`, or `"layers"` for some layers) a stage's backward
   program runs the forward ops of its recomputed layers again, so only their inputs are
   kept between a microbatch's passes. Without it, a backward program still rebuilds the
   residuals that cheap ops make from values it keeps anyway (a softmax's exponentials
   and quotient from its scores), as XLA's fusion does inside one program; likewise any
   program makes again the cheap values another stage would send it (a mask broadcast to
   the microbatch), and each stage's update computes the scalars it needs from Adam's step
   count itself.
3. The programs run in the order of the plan's schedule (`schedule_table`: GPipe, 1F1B or
   interleaved 1F1B): a forward program of stage k for microbatch i after stage k-1's,
   a backward after stage k+1's. Values crossing stages are sent to the receiving
   submesh (`jax.device_put`), keeping their layout.
4. What the backward pass hands to the optimizer (weight gradients: sums over the batch)
   and the step's other results (the loss) are accumulated over the microbatches as soon
   as the program that makes them has run, each weighted as it combines: a mean over the
   batch weighs each microbatch 1/m, a sum 1.
   Which one it is, is measured once per value: the step is evaluated on one microbatch
   and on that microbatch twice over (a mean stays, a sum doubles). The update programs
   then run once, on the accumulated gradients.

Results equal the unpipelined step up to the summation order of the gradients.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshplan.ir._dims import rebuildable
from meshplan.runtime._apply import Interpreter, read_value
from meshplan.runtime._pipeline import _BACKWARD, _FORWARD, schedule_table

__all__ = ["PipelinedStep"]

# Values this small (a few scalars) that the update computes from state alone are
# computed again by every stage that reads them, rather than sent between programs.
_TINY_BYTES = 64


@dataclasses.dataclass
class _Program:
    """Consecutive graph nodes of one (pass, virtual stage), jitted on its submesh."""

    kind: str  # "forward", "backward", "step"
    stage: int  # virtual stage
    nodes: list
    inputs: list[int] = dataclasses.field(default_factory=list)
    outputs: list[int] = dataclasses.field(default_factory=list)
    drop: list[int] = dataclasses.field(default_factory=list)  # inputs read last here
    handed: list[int] = dataclasses.field(default_factory=list)  # made here for the update
    release: list[int] = dataclasses.field(default_factory=list)  # of those, read no more
    fn: Any = None
    temp: int | None = None  # XLA's temporary bytes per device (when profiled)


class PipelinedStep:
    """Callable(*flat dynamic leaves) -> flat outputs, for a plan with stages."""

    def __init__(self, graph, labels, plan, out_values: tuple[int, ...], pairs,
                 data_values: list[int], microbatches: int, devices=None,
                 input_slices: dict[int, tuple[int, int, int]] | None = None,
                 output_pieces: dict[int, tuple[int, ...]] | None = None):
        self.graph, self.plan = graph, plan
        # Stage pieces of stacked step inputs (a scanned model's block weights): piece ->
        # (input, first, last + 1), and results assembled from the stages' pieces (the
        # updated stacked weights); see meshplan.runtime._scansplit.
        self.input_slices = input_slices or {}
        self.output_pieces = output_pieces or {}
        self.m = microbatches
        self.p = len(plan.stages) // plan.pipeline.virtual_stages
        self.v = plan.pipeline.virtual_stages
        devices = devices or jax.devices()
        if len(devices) < len(plan.device_order):
            raise ValueError(f"the plan needs {len(plan.device_order)} devices; "
                             f"{len(devices)} are available.")
        self.meshes = []
        for st in plan.stages[:self.p]:
            grid = np.array([devices[d] for d in st.device_ids], dtype=object)
            self.meshes.append(Mesh(grid.reshape(st.mesh_shape), plan.axis_names,
                                    axis_types=(jax.sharding.AxisType.Auto,) *
                                    len(st.mesh_shape)))
        self.out_values = out_values
        self.data_values = set(data_values)
        self.state_outputs = set(pairs.values())
        self._programs(labels)
        # Per accumulated value, its weight per microbatch: 1/m for a mean over the batch
        # (the default), 1 for a sum; set from a measurement by the caller.
        self.weights = {v: 1.0 / microbatches for v in self.accumulated}
        self._profile = None

    # ------------------------------------------------------------------ building

    def _stage_of_layer(self, layer: int) -> int:
        for k, st in enumerate(self.plan.stages):
            if st.layers[0] <= layer < st.layers[1]:
                return k
        raise ValueError(f"layer {layer} is in no stage of the plan {self.plan.stages}.")

    def _stages(self, labels) -> dict[int, tuple[str, int]]:
        """(pass, virtual stage) per node, consistent with the schedule's order.

        Forward values flow to the same or later stages and backward values to the same or
        earlier ones. The planner's labels put a few boundary ops (a norm's statistics
        computed where JAX's transpose emits them) one stage off; such an op moves to the
        stage that needs it.
        """
        g = self.graph
        where: dict[int, tuple[str, int]] = {}
        for node in g.nodes:
            kind, layer = labels.get(node.id, ("forward", 0))
            if layer < 0:
                raise ValueError(
                    f"{node.primitive} (node {node.id}) runs in every block of a scan that "
                    "the executor could not cut at the stage boundaries (see "
                    "meshplan.runtime._scansplit); unroll the layers, or plan with "
                    "Constraints(pp=1).")
            where[node.id] = (kind, self._stage_of_layer(layer))
        producer = {v: n for n in g.nodes for v in n.outputs}
        for node in g.nodes:  # forward: never before a forward producer's stage
            kind, k = where[node.id]
            if kind == "forward":
                for v in node.inputs:
                    src = producer.get(v)
                    if src is not None and where[src.id][0] == "forward":
                        k = max(k, where[src.id][1])
                where[node.id] = (kind, k)
        consumers: dict[int, list] = {}
        for n in g.nodes:
            for v in n.inputs:
                consumers.setdefault(v, []).append(n)
        for node in reversed(g.nodes):  # backward: never before a backward reader's stage
            kind, k = where[node.id]
            if kind == "backward":
                for v in node.outputs:
                    for c in consumers.get(v, ()):
                        if where[c.id][0] == "backward":
                            k = max(k, where[c.id][1])
                where[node.id] = (kind, k)
        return where

    def _cheap_residuals(self, fwd: _Program, bwd: _Program) -> set[int]:
        """Ids of forward nodes the backward program `bwd` runs again instead of keeping
        their results per microbatch: elementwise ops and broadcasts whose operands it
        keeps anyway (or rebuilds the same way, or are constants, state, or small values of
        the forward pass). XLA's fusion does the same inside one program (a softmax's exp and
        quotient are rebuilt from the scores, a mask broadcast from its iota), and the
        memory model, calibrated on XLA's whole-step program, expects it; separate
        programs would otherwise hand over every residual JAX's autodiff names."""
        g = self.graph
        made = {v: n for n in fwd.nodes for v in n.outputs}
        own = {v for n in bwd.nodes for v in n.outputs}
        kept = {v for n in bwd.nodes for v in n.inputs if v in made and v not in own}
        state = set(g.inputs) - self.data_values
        free = lambda u: g.values[u].is_const or u in state or u in kept
        memo = rebuildable(kept, {v: (n.primitive, n.inputs, len(n.outputs))
                                  for v, n in made.items()}, free, g.values)
        # Rebuilding needs the node's whole chain of rebuilt operands.
        rebuilt = {v: n for v, n in made.items() if memo.get(v)}
        return set(_operand_chain([rebuilt[v] for v in kept if v in rebuilt], rebuilt))

    def _rebuild_crossing(self, order: list[_Program]) -> None:
        """Let each per-microbatch program make again the cheap values it reads from
        another stage's programs (a mask broadcast to the microbatch, made from constants
        and small values), as XLA would inside one program: sent instead, such a value
        stays on its maker's devices until its last reader, maybe stages later, has run.
        At hand are constants, values the program reads anyway, and made values at most
        1/8 the size of what they rebuild (those are sent instead); state itself is never
        placed on another stage for this."""
        g = self.graph
        maker = {v: n for pr in order for n in pr.nodes for v in n.outputs}
        position = {n.id: i for i, n in enumerate(g.nodes)}
        for pr in order:
            own = {v for n in pr.nodes for v in n.outputs}
            reads = {v for n in pr.nodes for v in n.inputs if v in maker and v not in own}
            if not reads:
                continue
            free = lambda u: g.values[u].is_const or u in reads  # noqa: E731
            memo = rebuildable(reads, {v: (n.primitive, n.inputs, len(n.outputs))
                                       for v, n in maker.items()}, free, g.values)
            rebuilt = {v: maker[v] for v, ok in memo.items() if ok and v in maker}
            need = _operand_chain([rebuilt[v] for v in reads if v in rebuilt], rebuilt,
                                  skip={n.id for n in pr.nodes})
            if need:  # in the step's order (a rebuilt op may read this program's values)
                pr.nodes = sorted([*need.values(), *pr.nodes], key=lambda n: position[n.id])

    def _step_programs(self, nodes, where) -> list[_Program]:
        """The update's nodes as few programs as dependencies allow: one per stage and
        level, a level further each time a value crosses stages (a global gradient norm
        is summed over every stage's gradients before any stage's update reads it).

        Scalars computed from state and constants alone (Adam's step count and the bias
        corrections made from it) are computed again by each stage that reads them: that
        costs nothing, and each stage's update stays one program instead of two with
        parameter-sized values held between them."""
        g = self.graph
        state = set(g.inputs) - self.data_values
        tiny = lambda v: g.values[v].nbytes <= _TINY_BYTES  # noqa: E731
        scalars: dict[int, Any] = {}  # value -> the node computing it from state alone
        for node in nodes:
            if all(tiny(v) for v in node.outputs) and all(
                    tiny(u) and (u in state or g.values[u].is_const or u in scalars)
                    for u in node.inputs):
                scalars.update((v, node) for v in node.outputs)
        level: dict[int, int] = {}
        stage_of_value: dict[int, tuple[int, int]] = {}
        groups: dict[tuple[int, int], list] = {}
        for node in nodes:  # program order is a topological order
            k = where[node.id][1]
            lv = 0
            for v in node.inputs:
                if v in stage_of_value and v not in scalars:
                    src_stage, src_level = stage_of_value[v]
                    lv = max(lv, src_level + (src_stage != k))
            level[node.id] = lv
            for v in node.outputs:
                stage_of_value[v] = (k, lv)
            groups.setdefault((lv, k), []).append(node)
        position = {n.id: i for i, n in enumerate(nodes)}
        out = []
        for lv, k in sorted(groups):
            group = groups[lv, k]
            # The scalars this program reads, and what they are made from.
            need = _operand_chain([scalars[u] for n in group for u in n.inputs if u in scalars],
                                  scalars, skip={n.id for n in group})
            out.append(_Program("step", k, sorted([*need.values(), *group],
                                                  key=lambda n: position[n.id])))
        return out

    def _programs(self, labels) -> None:
        g = self.graph
        progs: list[_Program] = []
        where = self._stages(labels)
        for node in g.nodes:
            kind, k = where[node.id]
            if progs and progs[-1].kind == kind and progs[-1].stage == k:
                progs[-1].nodes.append(node)
            else:
                progs.append(_Program(kind, k, [node]))
        # Each (pass, stage) must be one program per microbatch: merge a pass's runs of the
        # same stage (the schedule runs a stage's forward as one unit).
        merged: dict[tuple, _Program] = {}
        order = []
        for pr in progs:
            if pr.kind == "step":
                continue
            key = (pr.kind, pr.stage)
            if key in merged:
                merged[key].nodes += pr.nodes
            else:
                merged[key] = pr
                order.append(pr)
        settings = self.plan.pipeline
        if settings.remat in ("full", "layers"):
            # Recomputation: a stage's backward program runs the forward ops of its
            # recomputed layers again first, so the forward program keeps only what other
            # programs still read (the stage's output, and the activations of layers that
            # are not recomputed), and a microbatch holds little more until its backward.
            again = None if settings.remat == "full" else set(settings.recompute)
            for pr in order:
                fwd = merged.get(("forward", pr.stage))
                if pr.kind == "backward" and fwd is not None:
                    redo = [n for n in fwd.nodes if again is None or
                            labels.get(n.id, ("forward", 0))[1] in again]
                    pr.nodes = redo + pr.nodes
        for pr in order:
            fwd = merged.get(("forward", pr.stage))
            if pr.kind == "backward" and fwd is not None:
                # Forward nodes run again (recomputed layers, rebuilt residuals) go first,
                # in the forward program's order.
                again = self._cheap_residuals(fwd, pr) | {n.id for n in pr.nodes}
                ids = {n.id for n in fwd.nodes}
                pr.nodes = [n for n in fwd.nodes if n.id in again] + \
                    [n for n in pr.nodes if n.id not in ids]
        self._rebuild_crossing(order)
        order += self._step_programs([n for pr in progs if pr.kind == "step" for n in pr.nodes],
                                     where)
        self.programs = order
        # A value's producer is the program that makes it first in a microbatch's run
        # (forward stages in order, then backward stages in reverse, then the update),
        # and only it hands the value on: a later one that makes it again (a recomputed
        # layer, a rebuilt residual such as a mask) keeps its copy to itself, or that copy
        # would replace the first among the microbatch's values and stay on its stage's
        # devices until the value's last reader, on another stage, had run.
        ranked = sorted((pr for pr in order if pr.kind != "step"), key=_run_rank)
        produced_by: dict[int, _Program] = {}
        for pr in ranked + [pr for pr in order if pr.kind == "step"]:
            for node in pr.nodes:
                for v in node.outputs:
                    produced_by.setdefault(v, pr)
        readers: dict[int, set[int]] = {}
        for i, pr in enumerate(order):
            made = {v for node in pr.nodes for v in node.outputs}
            seen: dict[int, None] = {}
            for node in pr.nodes:
                for v in node.inputs:
                    if v not in made and not g.values[v].is_const:
                        seen[v] = None
            pr.inputs = list(seen)
            for v in pr.inputs:
                readers.setdefault(v, set()).add(i)
        outs = set(self.out_values) | {u for ps in self.output_pieces.values() for u in ps}
        for i, pr in enumerate(order):
            pr.outputs = [v for node in pr.nodes for v in node.outputs if produced_by[v] is pr
                          and (v in outs or readers.get(v, set()) - {i})]
        self.produced_by = produced_by
        # Values handed from a per-microbatch pass to the update (or returned): those
        # computed from the data are accumulated over the microbatches; the others (index
        # arrays, masks) are the same for every microbatch and passed on once.
        from_data = set(self.data_values)
        for node in g.nodes:
            if any(v in from_data for v in node.inputs):
                from_data.update(node.outputs)
        handed = {v for pr in order if pr.kind == "step" for v in pr.inputs
                  if v in produced_by and produced_by[v].kind != "step"}
        handed |= {v for v in self.out_values
                   if v in produced_by and produced_by[v].kind != "step"}
        self.accumulated = handed & from_data
        self.passed = handed - from_data
        # A microbatch's value is dropped after the last of its per-microbatch readers has
        # run (forward stages in order, then backward stages in reverse): a stage's saved
        # activations go when its backward is done, as the schedule's memory model has it.
        last: dict[int, int] = {}
        for i, pr in enumerate(ranked):
            for v in pr.inputs:
                last[v] = i
        keep = handed | outs
        for i, pr in enumerate(ranked):
            # Inputs read here for the last time, and results no later program reads.
            pr.drop = [v for v in pr.inputs + pr.outputs
                       if last.get(v, -1) <= i and v not in keep]
            # What this program hands to the update, taken as soon as it is made (a
            # stage's weight gradients join the stage's sums after its own backward, not
            # after the microbatch's last backward); outputs are the producer's only.
            pr.handed = [v for v in pr.outputs if v in handed]
            pr.release = [v for v in pr.handed if last.get(v, -1) <= i]
        # The update's own intermediates (one stage's update program hands on to another,
        # or to its next level) go after their last reader, as in one XLA program; the
        # step's results stay (the gradient sums stay too: the step's sums hold them).
        updates = [pr for pr in order if pr.kind == "step"]
        last = {v: i for i, pr in enumerate(updates) for v in pr.inputs}
        made = {v for pr in updates for v in pr.outputs}
        for i, pr in enumerate(updates):
            pr.drop = [v for v in pr.inputs if v in made and last[v] <= i and v not in outs]
        self._axpy = jax.jit(lambda acc, xs, ws: [a + (w * x).astype(a.dtype)
                                                    for a, x, w in zip(acc, xs, ws)])
        interp = Interpreter(self.graph, dataclasses.replace(self.plan, value_layouts={},
                                                              op_inputs={}), None)
        for pr in order:
            pr.fn = jax.jit(_program_fn(interp, pr))

    # ------------------------------------------------------------------ running

    def _mesh(self, stage: int) -> Mesh:
        return self.meshes[stage % self.p]

    def _to(self, x, stage: int, layout=None):
        """x on the submesh of `stage`, keeping its layout (or taking `layout`)."""
        mesh = self._mesh(stage)
        if layout is not None:
            spec = _spec(layout, self.plan.axis_names)
        else:
            sh = getattr(x, "sharding", None)
            spec = sh.spec if isinstance(sh, NamedSharding) else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    def _state(self, v: int, x, stage: int):
        key = (v, stage % self.p)
        if key not in self._placed:
            self._placed[key] = self._to(x, stage, self.layouts.get(v))
        return self._placed[key]

    def _state_slice(self, v: int, inputs: dict, stage: int):
        """Piece v of a stacked step input, sliced before it is sent to its stage."""
        key = (v, stage % self.p)
        if key not in self._placed:
            src, a, b = self.input_slices[v]
            layout = self.layouts.get(src)
            if layout:  # a split of the layer dim that the piece cannot keep is dropped
                mesh = self._mesh(stage)
                n = math.prod(mesh.devices.shape[i] for i in layout[0])
                layout = layout if (b - a) % n == 0 else ((),) + tuple(layout[1:])
            self._placed[key] = self._to(inputs[src][a:b], stage, layout)
        return self._placed[key]

    def _run(self, pr: _Program, env: dict, stage_inputs: dict) -> None:
        args = []
        for v in pr.inputs:
            if v in env:
                x = env[v]
                if not _on(x, self._mesh(pr.stage)):
                    # Data takes its planned layout (batch over dp); stage outputs keep
                    # theirs on the next submesh.
                    x = self._to(x, pr.stage, self.layouts.get(v) if v in self.data_values
                                 else None)
                args.append(x)
            elif v in stage_inputs:
                args.append(self._state(v, stage_inputs[v], pr.stage))
            elif v in self.input_slices:
                args.append(self._state_slice(v, stage_inputs, pr.stage))
            else:
                raise RuntimeError(
                    f"program {pr.kind} of stage {pr.stage} reads value {v} before it exists: "
                    "the step's layers do not run in pipeline order.")
        for v, x in zip(pr.outputs, pr.fn(*args)):
            env[v] = x
        if self._profile is not None:
            self._sample(pr, args)
        for v in pr.drop:
            env.pop(v, None)

    def __call__(self, flat_inputs: dict[int, Any], data: dict[int, Any], layouts,
                 profile: dict | None = None):
        """Run one step. flat_inputs: graph input value -> array (state); data: graph input
        value -> the whole batch (split here into microbatches).

        profile: if a dict, it receives device id -> the most bytes that device held at
        once (see `_sample`).
        """
        self.layouts = layouts
        self._placed: dict = {}
        self._profile = profile
        m = self.m
        envs = [dict() for _ in range(m)]
        for v, x in data.items():
            b = x.shape[0] // m
            for i in range(m):
                envs[i][v] = x[i * b:(i + 1) * b]
        acc: dict[int, Any] = {}
        self._live = (envs, acc)
        # Every stage's state is on its devices for the whole step, as in a long run.
        for pr in self.programs:
            for v in pr.inputs:
                if v in flat_inputs and v not in self.data_values:
                    self._state(v, flat_inputs[v], pr.stage)
                elif v in self.input_slices:
                    self._state_slice(v, flat_inputs, pr.stage)
        per_micro = [p for p in self.programs if p.kind != "step"]
        by_key = {(p.kind, p.stage): p for p in per_micro}
        table = schedule_table(self.p, m, self.plan.pipeline.schedule, self.v)
        for row in table:
            for s, (kind, i, c) in enumerate(row.tolist()):
                if kind not in (_FORWARD, _BACKWARD):
                    continue
                k = c * self.p + s
                pr = by_key.get(("forward" if kind == _FORWARD else "backward", k))
                if pr is not None:
                    self._run(pr, envs[i], flat_inputs)
                    self._accumulate(acc, envs[i], pr)
                # Every pass of microbatch i is done after stage 0's backward (1F1B's
                # memory saving).
                if kind == _BACKWARD and k == 0:
                    envs[i] = {}
        env = dict(acc)
        envs.append(env)  # the update's values are live too (see `_sample`)
        for pr in self.programs:
            if pr.kind == "step":
                self._run(pr, env, flat_inputs)
        for v, pieces in self.output_pieces.items():
            env[v] = self._assemble([env.pop(u) for u in pieces])
        return [env[v] if v in env else flat_inputs[v] for v in self.out_values]

    def _assemble(self, pieces: list):
        """One array from its stages' row blocks: without a copy when each device stage
        holds one equal block (a sharding over a stage-major mesh), else concatenated on
        the first piece's devices."""
        shardings = [x.sharding for x in pieces]
        meshes = [sh.mesh for sh in shardings if isinstance(sh, NamedSharding)]
        if len(meshes) == len(pieces) == self.p and len({x.shape for x in pieces}) == 1 and \
                len({m.devices.shape for m in meshes}) == 1 and \
                len({sh.spec for sh in shardings}) == 1:
            names = tuple(meshes[0].axis_names)
            stage = "stage"
            while stage in names:
                stage += "_"
            mesh = Mesh(np.stack([m.devices for m in meshes]), (stage,) + names,
                        axis_types=(jax.sharding.AxisType.Auto,) * (len(names) + 1))
            spec = tuple(shardings[0].spec) or (None,)
            first = spec[0] if isinstance(spec[0], tuple) else (() if spec[0] is None
                                                                  else (spec[0],))
            shape = (sum(x.shape[0] for x in pieces),) + pieces[0].shape[1:]
            return jax.make_array_from_single_device_arrays(
                shape, NamedSharding(mesh, P((stage,) + first, *spec[1:])),
                [shard.data for x in pieces for shard in x.addressable_shards])
        # The first piece's devices, with the layer dim whole (the pieces may split it
        # differently, or not at all where their rows did not divide).
        first = shardings[0]
        home = NamedSharding(first.mesh, P(None, *tuple(first.spec)[1:])) \
            if isinstance(first, NamedSharding) else first
        whole = jax.numpy.concatenate([jax.device_put(x, home) for x in pieces])
        if self._profile is not None:  # held with its pieces, on the first stage
            self._sample_arrays(itertools.chain(pieces, [whole]), (), 0)
        return whole

    def _sample(self, pr: _Program, args) -> None:
        """Bytes per device just after `pr` ran: every array the step holds then (state,
        in-flight microbatches' values, accumulated gradients, the program's arguments
        and results), plus the temporaries XLA allocated for `pr` on its devices."""
        if pr.temp is None:
            pr.temp = pr.fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
        self._sample_arrays(args, self._mesh(pr.stage).devices.flat, pr.temp)

    def _sample_arrays(self, extra, devices, temp: int) -> None:
        """Records the bytes each device holds: the step's live arrays, `extra`, and
        `temp` more on each of `devices`."""
        envs, acc = self._live
        arrays = {id(x): x for x in itertools.chain(
            self._placed.values(), acc.values(), extra,
            (x for env in envs for x in env.values())) if hasattr(x, "addressable_shards")}
        held: dict[int, int] = {}
        for x in arrays.values():
            for shard in x.addressable_shards:
                held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
        for d in devices:
            held[d.id] = held.get(d.id, 0) + temp
        for d, b in held.items():
            self._profile[d] = max(self._profile.get(d, 0), b)

    def _accumulate(self, acc: dict, env: dict, pr: _Program) -> None:
        """Adds what `pr` made for the update to the step's sums (`acc`)."""
        for v in pr.handed:
            if v in self.passed:
                acc[v] = env[v]
        # One fused update per device set: acc += weight * x (dispatching op by op cost
        # more than the whole pipeline on small models).
        by_place: dict = {}
        for v in pr.handed:
            if v in self.accumulated:
                by_place.setdefault(_place(env[v]), []).append(v)
        for vs in by_place.values():
            xs = [env[v] for v in vs]
            ws = [self.weights[v] for v in vs]
            olds = [acc[v] if v in acc else
                    jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)  # no compile
                    for v, x in zip(vs, xs)]
            acc.update(zip(vs, self._axpy(olds, xs, ws)))
        for v in pr.release:
            env.pop(v, None)


def _operand_chain(roots, makers: dict, skip=frozenset()) -> dict:
    """Node id -> node, for the nodes `roots` and, transitively, the nodes of `makers`
    (value -> the node making it) that make their operands; nodes in `skip` (ids) are
    neither taken nor followed."""
    out, stack = {}, list(roots)
    while stack:
        n = stack.pop()
        if n.id not in out and n.id not in skip:
            out[n.id] = n
            stack += [makers[u] for u in n.inputs if u in makers]
    return out


def _run_rank(pr: _Program) -> tuple[bool, int]:
    """Where the per-microbatch program `pr` runs in a microbatch's passes: forward stages
    in order, then backward stages in reverse."""
    return pr.kind == "backward", -pr.stage if pr.kind == "backward" else pr.stage


def _program_fn(interp: Interpreter, pr: _Program):
    def fn(*args):
        env = dict(zip(pr.inputs, args))
        g = interp.graph
        for node in pr.nodes:
            outs = interp._eval(node, [read_value(g, env, v) for v in node.inputs])
            env.update(zip(node.outputs, outs))
        return tuple(env[v] for v in pr.outputs)
    return fn


def _on(x, mesh: Mesh) -> bool:
    sh = getattr(x, "sharding", None)
    return isinstance(sh, NamedSharding) and sh.mesh == mesh


def _place(x):
    """The device set an array lives on (arrays of one program's outputs share it)."""
    sh = getattr(x, "sharding", None)
    return sh.mesh if isinstance(sh, NamedSharding) else frozenset(getattr(sh, "device_set",
                                                                          ()))


def _spec(layout, axis_names):
    from meshplan.planner import spec_of
    return spec_of(layout, axis_names)
