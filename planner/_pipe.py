"""Pipeline plans: per-layer costs under an intra-op plan, stage splits, schedules, memory.

The intra-operator ILP plans the whole step on one stage's submesh (repeated layers tie, so
this costs about as much at 96 layers as at 4). Its solution is then cut into pipeline
layers (`_layers.find_layers`): per layer, the seconds of its forward and backward work,
of its once-per-step work (optimizer update, gradient collectives), and the bytes of its
weights, optimizer state, gradients and saved activations. From those tables:

* A microbatch of B/m samples takes 1/m of each per-microbatch quantity (compute and
  activation collectives are linear in the batch; link latencies are not scaled down,
  which overstates tiny microbatches slightly).
* The stage split minimises the slowest stage (all stages have equal submeshes, so the
  sum of stage times is fixed and ``sum + (m - 1) * max`` is smallest when ``max`` is),
  under each stage's memory limit: whether a bound on the slowest stage fits is decided
  exactly, and bounds are bisected. A greedy fill (each stage as many layers as fit)
  decides it while every stage can hold its first layer; where one cannot (stages that
  differ in speed or room, and room depends on position too: 1F1B's later stages hold
  fewer microbatches) the set of reachable cuts is carried stage by stage. Interleaved
  chunks are filled by time, and each device's memory is checked on the split found.
* Memory of stage i: weights + optimizer state of its layers, plus the larger of two
  phases. While microbatches run: its saved activations for ``in_flight(i)`` microbatches
  at its first backward pass, or for ``in_flight_with_gradients(i)`` beside the gradient
  sums at the later ones (the sums exist from the first backward on: GPipe's peak is
  m - 1 microbatches and the sums, or all m without them); full recomputation keeps only
  each layer's input, and re-runs the forward pass during the backward. Beside those, one
  microbatch's weight gradients and the residuals its backward program rebuilds (the
  pipelined executor writes them whole), and one layer's temporaries (the most live at
  once of the values made and last read inside one pass of the layer, on the whole-step
  memory model's schedule). During the update, after the last backward: the gradient
  sums and new copies of the state that is not updated in place.
* ZeRO over the stage's data-parallel axis: optimizer state (stage 1) or also weights and
  gradients (stage 3) split over it; stage 3 gathers each layer's weights once per
  microbatch in the forward and again in the backward pass (Rajbhandari et al., "ZeRO",
  SC'20: 1.5x the data-parallel traffic).
* Point-to-point: each stage boundary sends the activations crossing it forward and their
  gradients back, per microbatch, over the link between the two stages' devices; the
  interleaved schedule sends v times as often.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import NamedTuple

import numpy as np

from meshplan.costmodel import in_flight, in_flight_with_gradients, pipeline_time
from meshplan.ir._dims import rebuildable
from meshplan.planner._layers import SPREAD, Layers
from meshplan.planner._layout import reshard, shards
from meshplan.planner._ops import batch_dims, batch_free, memo_of

__all__ = ["LayerCosts", "PipelineChoice", "layer_costs", "best_pipeline"]


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """Per pipeline layer (pre, blocks, post), per device, for the whole batch of a step.

    Attributes (arrays of num_layers):
      forward, backward: seconds of per-microbatch work, summed over all microbatches.
      forward_fixed, backward_fixed: seconds each microbatch pays whatever its size: moving
        weights (batch-free values) between layouts, e.g. gathering sharded weights.
      step: seconds of once-per-step work (optimizer update, gradient collectives).
      weights, opt_state: bytes of the layer's parameters and optimizer state.
      saved: bytes of forward activations the backward pass reads (whole batch).
      inputs: bytes of the activations entering the layer (whole batch): all a layer keeps
        under full recomputation.
      transient: bytes of the layer's temporaries (whole batch): the most live at once of
        the values that are made and die inside its forward pass, or inside its backward
        pass, on the whole-step memory model's schedule.
      rebuilt: bytes of the saved activations that the pipelined backward program makes
        again from others instead of keeping (whole batch; see `_rebuilt`).
      weights_dp, opt_state_dp: the part of weights / optimizer state not yet split over
        the data-parallel axes (what ZeRO would split).
      gather: seconds to all-gather the layer's weights over the data-parallel axes once.
      outputs: bytes of the updated weights and optimizer state written to new buffers
        (state the step does not donate is not updated in place). They exist only while
        the update runs, after the last backward pass, when no activations are held.
      sent: bytes each device sends per step for the layer's collectives and reshards.
      forward_flops: the forward pass's share of `flops` (what full recomputation adds).
      cut: cut[c] = bytes crossing from layers <= c to layers > c in the forward pass.
      flops: FLOPs per device.
      dp_size: devices of the stage mesh that split the batch (microbatches divide B/dp).
      batch: the global batch (dim 0 of the data).
      act_scale: factor on activation, working and rebuilt-residual bytes (see
        `calibrated`).
      in_scan: which layers are blocks of one scan over layers: a stage's recomputed
        blocks are then recomputed by one scan, which stacks all their saved activations
        before the backward scan starts (None: no scan).
    """

    forward: np.ndarray
    backward: np.ndarray
    step: np.ndarray
    weights: np.ndarray
    opt_state: np.ndarray
    saved: np.ndarray
    inputs: np.ndarray
    transient: np.ndarray
    cut: np.ndarray
    flops: np.ndarray
    weights_dp: np.ndarray
    opt_state_dp: np.ndarray
    gather: np.ndarray
    sent: np.ndarray
    forward_flops: np.ndarray
    outputs: np.ndarray
    dp_size: int
    batch: int
    forward_fixed: np.ndarray | None = None
    backward_fixed: np.ndarray | None = None
    act_scale: float = 1.0
    rebuilt: np.ndarray | None = None
    in_scan: np.ndarray | None = None  # the blocks of a scan over layers (bool per layer)
    # _tables per (m, remat, zero, recomputed layers): the split search asks for the same
    # few hundred times, once per stage (a copy made by dataclasses.replace starts empty).
    tables_memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                          compare=False)

    def calibrated(self, exact_peak: float) -> "LayerCosts":
        """The same tables with activations scaled so that, for one stage holding every
        layer with one microbatch, state + new copies of it + activations + working set
        come to `exact_peak` (the whole-step memory model's answer for the same plan,
        checked against XLA, whose one program writes the new state while activations
        are live): XLA's buffers beyond the saved activations (loop-state copies, stacked
        gradients of a scan) scale with them. Never scaled down."""
        t = _tables(self, Setting(1, 1, "1f1b", 1, "none", 0))
        base = float(t.act.sum() + t.work.max())
        if base <= 0:
            return self
        # The whole step writes its updated state while activations are still live (its
        # scheduler moves each update next to its gradient), so all of it is counted here.
        scale = max(1.0, (exact_peak - float((t.state + t.grads + t.update).sum())) / base)
        return dataclasses.replace(self, act_scale=scale)

    @property
    def num_layers(self) -> int:
        return len(self.forward)


def _spread(layers: Layers, layer: int, amount: float, out: np.ndarray) -> None:
    """Add `amount` to `layer`, or evenly to every block for a scanned body's SPREAD."""
    if layer == SPREAD:
        out[1:layers.num_blocks + 1] += amount / layers.num_blocks
    else:
        out[layer] += amount


def _weights(layers: Layers, layer_list) -> np.ndarray:
    """Per layer, how many of `layer_list` fall in it (a SPREAD counts 1/L per block)."""
    out = np.zeros(layers.num_layers)
    plain = [l for l in layer_list if l != SPREAD]
    np.add.at(out, np.asarray(plain, dtype=np.int64), 1.0)
    spread = len(layer_list) - len(plain)
    if spread:
        out[1:layers.num_blocks + 1] += spread / layers.num_blocks
    return out


@dataclasses.dataclass(frozen=True)
class _GroupIndex:
    """Where each group of a grouping runs, gathered once per step and grouping (every
    stage mesh cuts its plan into layers with it).

    classes: (class, pass, once per step) -> per layer, how many of its groups run there.
    reads: (producer class, reader class, produced index, slot index), as in
      `Grouping.slot_mults` -> the groups' reads of such a value: [(order, pass, layer,
      value, dedup mult, mult, batch-free)].
      Every group of a class takes the class's strategy, so a read needs a reshard
      exactly when its bucket's producer layout differs from the wanted one.
    """

    classes: dict[tuple[int, str, bool], np.ndarray]
    reads: dict[tuple[int, int, int, int], list[tuple[int, str, int, int, int, int, bool]]]


def _group_index(view, layers: Layers, grouping) -> _GroupIndex:
    """The `_GroupIndex` of a grouping cut into these layers, kept with the grouping."""
    return memo_of(grouping.memo, "group index", layers,
                   lambda: _make_group_index(view, layers, grouping))


def _make_group_index(view, layers: Layers, grouping) -> _GroupIndex:
    groups, group_of_value = grouping.groups, grouping.group_of_value
    position = {v: i for g in groups for i, v in enumerate(g.produced)}
    vdims, _ = batch_dims(view)
    by_class: dict[tuple[int, str, bool], list[int]] = {}
    reads: dict[tuple[int, int, int, int], list] = {}
    n_reads = 0
    for g in groups:
        if g.leader.kind == "input" and g.leader.prim == "input":
            continue
        op_id = g.leader.id
        phase, layer = layers.op_pass.get(op_id, "step"), layers.op_layer.get(op_id, 0)
        batchless = not any(vdims.get(v) for v in g.produced)
        by_class.setdefault((g.cls, phase, phase != "step" and batchless), []).append(layer)
        for si, (mi, k, v, mult) in enumerate(g.slots):
            bucket = (groups[group_of_value[v]].cls, g.cls, position[v], si)
            reads.setdefault(bucket, []).append(
                (n_reads, phase, layer, v, g.members[mi].mult if k >= 0 else mult, mult,
                 batch_free(view, v)))
            n_reads += 1
    return _GroupIndex({k: _weights(layers, ls) for k, ls in by_class.items()}, reads)


def layer_costs(problem, choice, assignment, layers: Layers, live, dp_axes,
                in_place: frozenset[int] = frozenset()) -> LayerCosts:
    """Cut one solved intra-op plan into per-layer tables (see `LayerCosts`).

    in_place: state inputs whose updated value reuses their buffer (donated).
    """
    view, mesh_shape, comm = problem.view, problem.mesh_shape, problem.comm
    n = layers.num_layers
    z = lambda: np.zeros(n)
    fwd, bwd, step, flops, sent, fflops = z(), z(), z(), z(), z(), z()
    fwd_fixed, bwd_fixed = z(), z()
    weights, opt, saved, inputs, transient = z(), z(), z(), z(), z()
    index = _activation_index(view, layers, live)
    groups = _group_index(view, layers, problem.grouping)
    value_layout, op_layouts = assignment.value_layout, assignment.op_layouts
    by_pass = {"forward": fwd, "backward": bwd, "step": step}

    def layout(v):
        if v in value_layout:
            return value_layout[v]
        made = index.made_by.get(v)  # a value inside a group (a follower's result)
        if made is not None and made[0] in op_layouts:
            return op_layouts[made[0]][1][made[1]]
        return None

    pieces: dict[int, int] = {}  # id(layout) -> shards: layouts are shared tuples

    def cut_into(lay) -> int:
        if lay is None:
            return 1
        k = pieces.get(id(lay))
        if k is None:
            k = pieces[id(lay)] = shards(lay, mesh_shape)
        return k

    def per_device(v) -> float:
        return view.values[v].nbytes / cut_into(layout(v))

    sources = _layout_sources(problem.grouping, index.made_by)
    # Per source (a class's produced value or op result): the layout this plan gives it.
    source_layout = [None] + [
        (st.produced[j] if op < 0 else st.ops[op][1][j])
        for st, op, j in ((problem.strategies[c][choice[c]], op, j)
                          for c, op, j in sources.keys)]
    source_shards = np.array([cut_into(lay) for lay in source_layout], dtype=float)

    def per_device_all(vs: list[int], nbytes: np.ndarray) -> np.ndarray:
        return nbytes / source_shards[sources.codes(vs)]

    # Groups of one class run one strategy: its costs are worked out once per class and
    # pass, and spread over the layers its groups run in (a 96-layer model has ~100
    # groups per class).
    for (cls, phase, per_step), where in groups.classes.items():
        strat = problem.strategies[cls][choice[cls]]
        own = sum(m * comm.time(x.kind, x.nbytes, x.axes) for x, m in strat.comms)
        sent += where * sum(m * x.bytes_sent(mesh_shape) for x, m in strat.comms)
        if per_step:
            # A weight gradient's sum over the data-parallel devices: once per step,
            # on the gradients accumulated over all microbatches.
            step += where * own
        by_pass[phase] += where * (strat.time - (own if per_step else 0.0))
        flops += where * strat.flops
        if phase == "forward":
            fflops += where * strat.flops
    # Reshards, each once per (value, wanted layout), and each distinct one costed once.
    # Only the reads whose producer class lays the value out otherwise than the reader's
    # class wants it are visited, in group order (which read of a value is charged).
    strategy = [problem.strategies[c][choice[c]] for c in range(len(choice))]
    moving = sorted(r for (pc, gc, pi, si), rs in groups.reads.items()
                    if strategy[pc].produced[pi] != strategy[gc].slots[si]
                    for r in ((x, strategy[gc].slots[si]) for x in rs))
    seen_reshard: set = set()
    moved: dict[tuple, tuple[float, float]] = {}
    for (_, phase, layer, v, dedup, mult, weight), want in moving:
        have = value_layout.get(v)
        if have is None or have == want or (v, want, dedup) in seen_reshard:
            continue
        seen_reshard.add((v, want, dedup))
        nbytes = view.values[v].nbytes
        if (nbytes, have, want) not in moved:
            moves = reshard(nbytes, have, want, mesh_shape)
            moved[nbytes, have, want] = (
                sum(comm.time(c.kind, c.nbytes, c.axes) for c in moves),
                sum(c.bytes_sent(mesh_shape) for c in moves))
        t, b = moved[nbytes, have, want]
        t *= mult
        _spread(layers, layer, mult * b, sent)
        if phase != "step" and weight:
            # A weight moved for this pass: every microbatch moves it again.
            _spread(layers, layer, t, fwd_fixed if phase == "forward" else bwd_fixed)
        else:
            _spread(layers, layer, t, by_pass[phase])

    weights_dp, opt_dp, gather, outputs = z(), z(), z(), z()
    # State inputs, one row per (value, layer holding it).
    held = _held_state(view, layers)
    dp_set = set(dp_axes)
    whole_over_dp = {}  # id(layout) -> not split over a data-parallel axis

    def dp_free(lay) -> bool:
        k = id(lay)
        if k not in whole_over_dp:
            whole_over_dp[k] = not (dp_set & {a for d in (lay or ()) for a in d})
        return whole_over_dp[k]

    b = per_device_all(held.values, held.nbytes)[held.row]
    free = np.array([dp_free(lay) for lay in source_layout], dtype=bool)[
        sources.codes(held.values)][held.row]
    param = held.param[held.row]
    kept = ~np.array([v in in_place for v in held.values], dtype=bool)[held.row]
    layer = held.layer
    _spread_all(layers, layer[param], b[param], weights)
    _spread_all(layers, layer[~param], b[~param], opt)
    _spread_all(layers, layer[kept], b[kept], outputs)
    _spread_all(layers, layer[free & param], b[free & param], weights_dp)
    _spread_all(layers, layer[free & ~param], b[free & ~param], opt_dp)
    if dp_axes:
        gathered = free & param
        sizes = b[gathered].tolist()
        times = {x: comm.time("all-gather", x, tuple(dp_axes)) for x in set(sizes)}
        _spread_all(layers, layer[gathered], np.array([times[x] for x in sizes], dtype=float),
                    gather)

    # Activations: stored forward values read by the backward pass, by producing layer;
    # cut sizes from forward values read by later layers.
    sv = index.saved
    _spread_all(layers, sv.layer, per_device_all(sv.values, sv.nbytes) * sv.copies, saved)
    rb = index.rebuilt
    rebuilt = z()
    _spread_all(layers, rb.layer, per_device_all(rb.values, rb.nbytes) * rb.copies, rebuilt)
    fv = index.forward
    b = per_device_all(fv.values, fv.nbytes)
    crosses = fv.last > fv.first  # read by a later layer: crosses every cut between them
    cut = np.zeros(n + 1)
    np.add.at(cut, fv.first[crosses], b[crosses])
    np.add.at(cut, fv.last[crosses], -b[crosses])
    cut = np.cumsum(cut)[:n]
    carry_bytes = sum(per_device(v) for v in index.carries)
    if layers.scanned:
        cut[1:layers.num_blocks] += carry_bytes  # the scan's carry between blocks
    inputs[1:] = cut[:-1]
    inputs[0] = 0.0
    tv = _transient_index(view, layers, live)
    if tv.values:
        peaks = tv.peaks(per_device_all(tv.values, tv.nbytes))
        _spread_max_all(layers, tv.layer, peaks, transient)
    dp_size = math.prod(mesh_shape[a] for a in dp_axes) if dp_axes else 1
    in_scan = np.zeros(n, dtype=bool)
    in_scan[1:layers.num_blocks + 1] = layers.scanned
    return LayerCosts(fwd, bwd, step, weights, opt, saved, inputs, transient, cut, flops,
                      weights_dp, opt_dp, gather, sent, fflops, outputs, dp_size,
                      _global_batch(view), fwd_fixed, bwd_fixed, rebuilt=rebuilt,
                      in_scan=in_scan)


class _LayoutSources:
    """Where each value's layout comes from in any plan of a grouping: every group of a
    class takes the class's strategy, so a value's layout is the strategy's layout of
    one of the class's produced values, or of one of its ops' results (a follower's). A
    plan's layouts of many values are then one array index (`layer_costs` asks for tens
    of thousands per stage mesh), not a lookup each."""

    def __init__(self, grouping, made_by: dict[int, tuple[int, int]]):
        self.keys: list[tuple[int, int, int]] = []  # (class, member or -1, index)
        self._code: dict[int, int] = {}  # value -> 1 + its key's position; 0: no layout
        self._lists: dict[int, tuple[list, np.ndarray]] = {}
        key_code: dict[tuple[int, int, int], int] = {}

        def code(key) -> int:
            if key not in key_code:
                self.keys.append(key)
                key_code[key] = len(self.keys)
            return key_code[key]

        produced, op_source = grouping.strategy_positions
        for v, (c, j) in produced.items():
            self._code[v] = code((c, -1, j))
        for v, (op_id, k) in made_by.items():  # a result inside a group
            if v not in self._code and op_id in op_source:
                self._code[v] = code(op_source[op_id] + (k,))

    def codes(self, values: list[int]) -> np.ndarray:
        """Per value, 1 + its source's position in `keys` (0: no layout, unsharded)."""
        got = self._lists.get(id(values))
        if got is None or got[0] is not values:
            got = self._lists[id(values)] = (values, np.array(
                [self._code.get(v, 0) for v in values], dtype=np.int64))
        return got[1]


def _layout_sources(grouping, made_by) -> _LayoutSources:
    """The `_LayoutSources` of a grouping, kept with it."""
    return memo_of(grouping.memo, "layout sources", made_by,
                   lambda: _LayoutSources(grouping, made_by))


@dataclasses.dataclass(frozen=True)
class _TransientIndex:
    """The temporaries of each layer's forward and of its backward pass: stored values
    made and last read inside that pass of that layer on the whole-step schedule
    (`Liveness`), as events sorted per (layer, pass) by phase, so that a plan's sizes
    give each pass's most bytes live at once in a few array operations."""

    values: list[int]  # the temporaries
    nbytes: np.ndarray  # per value
    event_value: np.ndarray  # per event: index into values
    event_sign: np.ndarray  # per event: +1 made, -1 freed
    group_start: np.ndarray  # per (layer, pass) group: its first event
    layer: np.ndarray  # per group: the layer (SPREAD: a scanned body's)

    def peaks(self, sizes: np.ndarray) -> np.ndarray:
        """Per group, the most bytes live at once, for per-value sizes."""
        # Each group's events sum to zero, so one running sum serves every group.
        running = np.cumsum(sizes[self.event_value] * self.event_sign)
        return np.maximum.reduceat(running, self.group_start)


def _transient_index(view, layers: Layers, live) -> _TransientIndex:
    return memo_of(view.memo, "transients", layers,
                   lambda: _make_transient_index(view, layers, live))


def _make_transient_index(view, layers: Layers, live) -> _TransientIndex:
    group_of_op, span = {}, {}  # op index -> (layer, pass); (layer, pass) -> phases
    for k, op in enumerate(view.ops):
        phase = layers.op_pass.get(op.id, "step")
        if phase == "step" or live.op_first[k] < 0:
            continue
        g = (layers.op_layer.get(op.id, 0), phase)
        group_of_op[k] = g
        lo, hi = span.get(g, (math.inf, -1))
        span[g] = (min(lo, 2 * int(live.op_first[k])), max(hi, 2 * int(live.op_last[k]) + 1))
    made_in = {v: group_of_op[k] for k, op in enumerate(view.ops) if k in group_of_op
               for v in op.outputs}
    rows = []  # (group, phase, sign, value index)
    values: list[int] = []
    for v, a, b, out in zip(live.temps, live.start.tolist(), live.end.tolist(),
                            live.is_out.tolist()):
        g = made_in.get(v)
        if g is None or out or b > span[g][1]:
            continue  # not made in a layer's pass, or outlives it
        rows.append((g, a, 1, len(values)))
        rows.append((g, b + 1, -1, len(values)))  # freed after its last phase
        values.append(v)
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # frees before makes at the same phase
    groups = [r[0] for r in rows]
    starts = [i for i in range(len(rows)) if i == 0 or groups[i] != groups[i - 1]]
    return _TransientIndex(
        values, np.array([float(view.values[v].nbytes) for v in values]),
        np.array([r[3] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=float),
        np.array(starts, dtype=np.int64),
        np.array([groups[i][0] for i in starts], dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class _HeldState:
    """Parameter and optimizer-state inputs, with one row per (value, layer holding it)."""

    values: list[int]
    nbytes: np.ndarray  # per value
    param: np.ndarray  # per value: a parameter (else optimizer state)
    row: np.ndarray  # per row: index into values
    layer: np.ndarray  # per row: the layer (SPREAD: every block)


def _held_state(view, layers: Layers) -> _HeldState:
    """The `_HeldState` of these layers, memoised on the view."""
    return memo_of(view.memo, "held state", layers, lambda: _make_held_state(view, layers))


def _make_held_state(view, layers: Layers) -> _HeldState:
    role_of = _input_roles(view)
    values = list(layers.input_layers)
    rows = [(i, l) for i, v in enumerate(values) for l in layers.input_layers[v]]
    return _HeldState(values, np.array([float(view.values[v].nbytes) for v in values]),
                      np.array([role_of.get(v) == "param" for v in values], dtype=bool),
                      np.array([r[0] for r in rows], dtype=np.int64),
                      np.array([r[1] for r in rows], dtype=np.int64))


def _input_roles(view) -> dict[int, str]:
    """Input value -> its role (param, opt_state, data, ...), memoised on the view."""
    if "input_roles" not in view.memo:
        view.memo["input_roles"] = {op.outputs[0]: op.role for op in view.ops
                                    if op.kind == "input" and op.outputs}
    return view.memo["input_roles"]


def _global_batch(view) -> int:
    """Dim 0 of the first data input (1 without one), memoised on the view."""
    if "global_batch" not in view.memo:
        data = [op for op in view.ops if op.kind == "input" and op.role == "data"]
        shape = view.values[data[0].outputs[0]].shape if data else ()
        view.memo["global_batch"] = int(shape[0]) if shape else 1
    return view.memo["global_batch"]


@dataclasses.dataclass(frozen=True)
class _Values:
    """Values with the layer each is made in (SPREAD: a scanned body's) and facts per
    value, as arrays: the per-plan costing reads them in a few array operations."""

    values: list[int]
    layer: np.ndarray
    nbytes: np.ndarray
    copies: np.ndarray  # how many of it the layer keeps (a scan body's: one per trip)
    # For forward values: the layer it is made in (a scanned body's: the last block) and
    # the last forward layer that reads it (-1: none).
    first: np.ndarray
    last: np.ndarray

    @classmethod
    def of(cls, view, rows: list[tuple[int, ...]]) -> "_Values":
        """From (value, layer, copies[, first, last]) rows."""
        cols = list(zip(*rows)) or [()] * 5
        arr = lambda k: np.array(cols[k] if k < len(cols) else (), dtype=np.int64)
        return cls(list(cols[0]), arr(1),
                   np.array([float(view.values[v].nbytes) for v in cols[0]]),
                   arr(2), arr(3), arr(4))


@dataclasses.dataclass(frozen=True)
class _ActivationIndex:
    """Plan-independent facts of the forward pass, gathered once per step."""

    made_by: dict[int, tuple[int, int]]  # value -> (op id, output position)
    saved: _Values  # stored forward values read by the backward pass
    rebuilt: _Values  # of those, the ones the pipelined backward program makes again
    forward: _Values  # every forward value, with the last layer that reads it
    carries: list[int]  # a scan's forward carries (the activations between its blocks)


def _activation_index(view, layers: Layers, live) -> _ActivationIndex:
    """The `_ActivationIndex` of these layers, memoised on the view (one liveness per view)."""
    return memo_of(view.memo, "activations", layers,
                   lambda: _make_activation_index(view, layers, live))


def _make_activation_index(view, layers: Layers, live) -> _ActivationIndex:
    where = lambda op_id: (layers.op_pass.get(op_id, "step"), layers.op_layer.get(op_id, 0))
    made_by = {v: (op.id, k) for op in view.ops for k, v in enumerate(op.outputs)}
    stored = set(live.temps)
    backward_read: set[int] = set()
    last_reader: dict[int, int] = {}
    for op in view.ops:
        phase, layer = where(op.id)
        for v in op.inputs:
            if phase == "backward":
                backward_read.add(v)
            elif phase == "forward" and layer != SPREAD:
                last_reader[v] = max(last_reader.get(v, -1), layer)
    # A scan keeps the body values its backward reads as its stacked outputs, which the
    # pipelined executor holds between the passes, fused or not: every one, whichever
    # pass the body op that makes it belongs to (JAX's linearisation computes some
    # derivative factors, such as 1 - tanh^2, inside the forward scan's body and stacks
    # them), and no other (a body value read by such a factor is used up in its trip).
    # Only forward scans' (a loop with forward ops in its body): a backward scan's stacked
    # results (the gradients of its xs) are no activations.
    forward_loops = {live.value_loop[v] for op in view.ops if where(op.id) == ("forward", SPREAD)
                     for v in op.outputs if v in live.value_loop}
    stacked = {op.inputs[0] for op in view.ops
               if op.prim == "scan_stack" and op.outputs[0] in backward_read
               and live.value_loop.get(op.inputs[0], -1) in forward_loops}
    saved, forward, carries = [], [], []
    for op in view.ops:
        phase, layer = where(op.id)
        if op.prim == "carry" and phase == "forward":
            carries += op.outputs
        if op.kind == "input":
            continue
        for v in op.outputs:
            if layer == SPREAD and v in stacked:
                saved.append((v, layer, op.mult))
            if phase != "forward":
                continue
            if layer != SPREAD and v in stored and v in backward_read:
                saved.append((v, layer, 1))
            lo = layers.num_blocks if layer == SPREAD else layer
            forward.append((v, layer, 1, lo, last_reader.get(v, -1)))
    rebuilt = _rebuilt(view, {s[0] for s in saved}, where)
    again = [s for s in saved if s[0] in rebuilt]
    saved = [s for s in saved if s[0] not in rebuilt]
    return _ActivationIndex(made_by, _Values.of(view, saved), _Values.of(view, again),
                            _Values.of(view, forward), carries)


def _rebuilt(view, saved: set[int], where) -> set[int]:
    """Saved values the backward pass rebuilds instead of keeping, by the pipelined
    executor's rule (`ir._dims.rebuildable`), from the ops of unrolled layers: a scan's
    residuals are its stacked outputs and stay."""
    made = {}
    for op in view.ops:
        phase, layer = where(op.id)
        if phase == "forward" and op.kind != "input" and layer != SPREAD:
            made.update((v, (op.prim, op.inputs, len(op.outputs))) for v in op.outputs)
    state = {op.outputs[0] for op in view.ops
             if op.kind == "input" and op.role in ("param", "opt_state")}
    values = view.values
    free = lambda u: values[u].is_const or u in state or u in saved
    memo = rebuildable(saved, made, free, values)
    return {v for v in saved if memo[v]}


def _spread_all(layers: Layers, layer: np.ndarray, amount: np.ndarray, out: np.ndarray):
    """`_spread` of many amounts at once (in the same order, so the same sums)."""
    body = layer == SPREAD
    np.add.at(out, layer[~body], amount[~body])
    blocks = out[1:layers.num_blocks + 1]
    for share in (amount[body] / layers.num_blocks).tolist():  # a scan body's few values
        blocks += share


def _spread_max_all(layers: Layers, layer: np.ndarray, amount: np.ndarray, out: np.ndarray):
    """Per layer, the largest of the amounts made there (a scan body's: in every block)."""
    body = layer == SPREAD
    np.maximum.at(out, layer[~body], amount[~body])
    if body.any():
        sl = out[1:layers.num_blocks + 1]
        np.maximum(sl, amount[body].max(), out=sl)


@dataclasses.dataclass(frozen=True)
class PipelineChoice:
    """One pipelined plan: stages, schedule and memory choices, predicted cost."""

    stages: tuple[tuple[int, int], ...]  # layer ranges [first, last); p * v if interleaved
    microbatches: int
    schedule: str
    virtual_stages: int
    remat: str
    zero: int
    step_time: float
    bubble: float
    p2p: float
    step_work: float  # once-per-step seconds (the slowest stage's)
    p2p_bytes: float  # bytes the busiest sender sends to its neighbours per step
    stage_memory: tuple[float, ...]  # per device of each of the p stages
    stage_time: tuple[float, ...]  # per stage, seconds per microbatch (forward + backward)
    recompute: tuple[bool, ...] = ()  # remat="layers": per layer, whether it is recomputed
    act_scale: float = 1.0  # the activation calibration of the costs it was chosen on

    @property
    def peak_memory(self) -> float:
        return max(self.stage_memory)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The pipeline knobs searched for one intra-op plan."""

    p: int
    m: int
    schedule: str
    v: int
    remat: str
    zero: int
    recompute: tuple[bool, ...] = ()  # remat="layers": per layer, whether it is recomputed


def _recomputed(s: Setting, n: int) -> np.ndarray:
    """Per layer, whether its forward pass is recomputed in the backward under `s`."""
    if s.remat == "full":
        return np.ones(n, dtype=bool)
    if s.remat == "layers":
        return np.asarray(s.recompute, dtype=bool)
    return np.zeros(n, dtype=bool)


def _tables(c: LayerCosts, s: Setting):
    """The `_Tables` of `c` under `s` (memoised on `c`; the arrays are shared, never
    written)."""
    key = (s.m, s.remat, s.zero, s.recompute if s.remat == "layers" else ())
    if key not in c.tables_memo:
        c.tables_memo[key] = _compute_tables(c, s)
    return c.tables_memo[key]


class _Tables(NamedTuple):
    """Per layer under one setting (see `_tables`)."""

    f: np.ndarray  # seconds of forward work per microbatch
    b: np.ndarray  # seconds of backward work per microbatch (recomputation included)
    step: np.ndarray  # seconds of once-per-step work
    state: np.ndarray  # bytes held for the whole step: weights, optimizer state
    grads: np.ndarray  # bytes of the gradient sums, from the stage's first backward on
    act: np.ndarray  # bytes saved per in-flight microbatch
    work: np.ndarray  # bytes of one microbatch's temporaries while the layer runs
    update: np.ndarray  # bytes of new state buffers, while the update runs
    fresh: np.ndarray  # bytes of one microbatch's weight gradients and rebuilt residuals


def _stage_peak(state: float, grads: float, first: float, later: float, fresh: float,
                work: float, update: float) -> float:
    """A stage's peak bytes: its state, plus the larger of the forward/backward phase and
    the update phase, which follows the last backward pass. While microbatches run, the
    in-flight activations are the most at the stage's first backward pass (`first`); the
    gradient sums exist from then on, beside the activations of later backward passes
    (`later`); each backward pass also holds its own weight gradients before they join the
    sums and the residuals it rebuilds (`fresh`), and one layer's temporaries (`work`).
    The update holds the sums and the new copies of state not updated in place."""
    return state + max(max(first, later + grads) + fresh + work, grads + update)


def _compute_tables(c: LayerCosts, s: Setting) -> _Tables:
    dp = c.dp_size
    f = c.forward / s.m + (c.forward_fixed if c.forward_fixed is not None else 0.0)
    b = c.backward / s.m + (c.backward_fixed if c.backward_fixed is not None else 0.0)
    rm = _recomputed(s, c.num_layers)
    b = b + np.where(rm, f, 0.0)  # the forward pass again, inside the backward
    weights = c.weights - (c.weights_dp * (1 - 1 / dp) if s.zero >= 3 else 0.0)
    opt = c.opt_state - (c.opt_state_dp * (1 - 1 / dp) if s.zero >= 1 else 0.0)
    if s.zero >= 3 and dp > 1:
        f = f + c.gather  # weights gathered before each microbatch's forward ...
        b = b + c.gather  # ... and again before its backward
    # Weights, their gradients (laid out alike) and optimizer state; new copies of the
    # state the step does not update in place exist only during the update.
    update = c.outputs * (weights + opt).sum() / max((c.weights + c.opt_state).sum(), 1.0)
    state = weights + opt
    act = c.act_scale * np.where(rm, c.inputs, c.saved) / s.m
    # A layer's temporaries; a recomputed layer also rebuilds its saved activations while
    # its backward runs (one layer at a time, unless it is a block of a scan: see below).
    in_scan = c.in_scan if c.in_scan is not None else np.zeros(c.num_layers, dtype=bool)
    work = c.act_scale * np.where(rm & ~in_scan, c.transient + c.saved, c.transient) / s.m
    # The pipelined executor's backward program rebuilds cheap residuals of all its
    # layers first, and adds each microbatch's weight gradients to the step's sums after
    # the program has written them out whole. Recomputed blocks of a scan are recomputed
    # by one scan over all of the stage's blocks, whose stacked residuals are all live
    # when the backward scan starts.
    fresh = weights + c.act_scale * np.where(rm & in_scan, c.saved, 0.0) / s.m
    if c.rebuilt is not None:
        fresh = fresh + c.act_scale * np.where(rm, 0.0, c.rebuilt) / s.m
    return _Tables(f, b, c.step, state, weights, act, work, update, fresh)


def _per_stage(x, p: int) -> tuple:
    """One value per stage from one for all or a list of p: LayerCosts (stages on
    different devices cost their layers differently) or memory limits."""
    return tuple(x) if isinstance(x, (list, tuple)) else (x,) * p


def _stage_tables(cs: tuple[LayerCosts, ...], s: Setting) -> list:
    return [_tables(c, s) for c in cs]  # stages on alike devices share one (memoised)


class _Cumulative:
    """Running sums of one stage's `_Tables` from layer 0, which `split` bisects: a piece
    [a, b) holds cum[b] - cum[a]. Memoised beside the tables: the split search asks for
    the same ones hundreds of times (every stage count, schedule and microbatch count)."""

    def __init__(self, t: "_Tables"):
        def cum(a):
            return np.concatenate([[0.0], np.cumsum(a)])
        self.time = cum(t.f + t.b).tolist()
        self.state, self.grads, self.act = cum(t.state), cum(t.grads), cum(t.act)
        self.update, self.fresh = cum(t.update), cum(t.fresh)
        # Per layer, with the next layer whose working set is larger: a piece holds its
        # layers' largest (one at a time), which is its first's up to that layer.
        self.work = (t.work.tolist(), _next_larger(t.work.tolist()))
        self._memory: dict = {}

    def memory(self, phase: str, in_flight: int = 0) -> list:
        """`_stage_peak`'s running tables: the first backward pass's ("first": state,
        in-flight activations, rebuilt residuals), a later one's ("later": the gradient
        sums too) and the update's ("update": state, sums and new copies)."""
        key = (phase, in_flight)
        if key not in self._memory:
            self._memory[key] = (
                self.state + in_flight * self.act + self.fresh if phase == "first" else
                self.state + self.grads + in_flight * self.act + self.fresh
                if phase == "later" else self.state + self.grads + self.update).tolist()
        return self._memory[key]


def _cumulative(c: LayerCosts, s: Setting) -> _Cumulative:
    """The `_Cumulative` of `c`'s tables under `s` (memoised on `c`)."""
    key = ("cumulative", s.m, s.remat, s.zero, s.recompute if s.remat == "layers" else ())
    if key not in c.tables_memo:
        c.tables_memo[key] = _Cumulative(_tables(c, s))
    return c.tables_memo[key]


def split(c, s: Setting, limit):
    """The memory-feasible split minimising the slowest piece; None if none fits.

    c: one LayerCosts, or one per stage (stages on slower devices take their layers
    longer, so they get fewer). limit: bytes per device, one number or one per stage.
    Pieces: p stages, or p * v chunks for the interleaved schedule (chunk k on device
    k mod p); interleaved chunks are balanced by time, then each device's memory (the sum
    of its chunks) is checked.
    """
    cs = _per_stage(c, s.p)
    limits = _per_stage(limit, s.p)
    tabs = _stage_tables(cs, s)
    pieces = s.p * s.v
    n = cs[0].num_layers
    if n < pieces:
        return None
    flight = in_flight(s.p, s.m, s.schedule, s.v)
    later = in_flight_with_gradients(s.p, s.m, s.schedule, s.v)
    sums = [_cumulative(c, s) for c in cs]
    times = [t.f + t.b for t in tabs]
    sms, gms, ams, ums, fms = ([getattr(u, name) for u in sums]
                               for name in ("state", "grads", "act", "update", "fresh"))
    tm_d = [u.time for u in sums]
    first_d = [u.memory("first", flight[d]) for d, u in enumerate(sums)]
    later_d = [u.memory("later", later[d]) for d, u in enumerate(sums)]
    upd_d = [u.memory("update") for u in sums]
    tms = [tm_d[k % s.p] for k in range(pieces)]
    work_d = [u.work for u in sums]

    def phases(d: int) -> list:
        """Stage d's memory tables (`_stage_peak`), each with its room and the per-layer
        working sets a piece adds the largest of (None: none): the later backward passes
        (beside the gradient sums), the first one where it holds more microbatches
        (GPipe; no more microbatches than stages), and the update."""
        first = [(first_d[d], limits[d], work_d[d])] if later[d] < flight[d] else []
        return [(later_d[d], limits[d], work_d[d])] + first + [(upd_d[d], limits[d], None)]

    # A device of the interleaved schedule holds v chunks from all over the model: the
    # greedy fill balances time only, and each device's total is checked below.
    per_stage = [phases(d) if s.v == 1 else [] for d in range(s.p)]
    mems = [[m for m, _, _ in per_stage[k % s.p]] for k in range(pieces)]
    rooms = [[r for _, r, _ in per_stage[k % s.p]] for k in range(pieces)]
    works = [[w for _, _, w in per_stage[k % s.p]] for k in range(pieces)]

    exact = _ExactFill(tms, mems, rooms, works)

    def greedy(bound):
        got, stuck = _greedy(tms, mems, pieces, bound, rooms, works)
        # Stuck: a piece's first layer alone overflows its stage, where an earlier cut
        # might have worked; the exact search over cuts answers then. Not for interleaved
        # chunks, whose memory is checked after the bisection, on the split it ends
        # with: a split with a lower bound there can hold more on some device.
        return exact(bound) if stuck and s.v == 1 else got

    # The slowest piece takes at least an even share of the fastest stage's total, and at
    # least any one layer on the stage that runs it fastest.
    fastest = np.min(np.stack(times), axis=0)
    lo = max(float(fastest.sum()) / pieces, float(fastest.max()))
    hi = max(tm[-1] for tm in tms)
    best = greedy(hi)
    if best is None:
        return None
    # Bisect the bound on the slowest piece down to 1e-6 of it. A fixed 30 halvings
    # stopped short where a slow stage's total (hi) is ~1000x the answer; 100 reach
    # 1e-6 from any start under 2^80 times it, and end when lo stays 0.
    for _ in range(100):
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-6 * hi:
            break
    if s.v > 1 and best is not None:
        state, grads, acts, fresh, updates, work = ([0.0] * s.p for _ in range(6))
        for k, (a, b) in enumerate(best):
            d = k % s.p
            work[d] = max(work[d], max(work_d[d][0][a:b]))
            state[d] += sms[d][b] - sms[d][a]
            grads[d] += gms[d][b] - gms[d][a]
            acts[d] += ams[d][b] - ams[d][a]
            fresh[d] = max(fresh[d], fms[d][b] - fms[d][a])  # one chunk's program at a time
            updates[d] += ums[d][b] - ums[d][a]
        if any(_stage_peak(state[d], grads[d], flight[d] * acts[d], later[d] * acts[d],
                           fresh[d], work[d], updates[d]) > limits[d] for d in range(s.p)):
            return None
    return best


def _greedy(tms, mems, pieces, bound, rooms, works):
    """Fill pieces left to right, each as long as time <= bound and each of its memory
    tables (cumulative, one per phase) plus the largest of its layers' working sets
    (`works`: per layer, or None) <= its room allow, leaving a layer for each later piece.
    Returns (pieces or None, stuck). A piece [a, b) fits when each table's value at b is
    at most its value at a plus the allowance, in that one form everywhere (`_reach`'s,
    `_another_stage_holds`' and `_ExactFill`'s), so that they agree to the bit.

    Each piece ends at the furthest cut any split can reach (the furthest cut from a
    start never moves back as the start moves on), so a last piece that overflows from
    there overflows from every start: None, not stuck. Stuck: a piece cannot hold even
    its first layer, where earlier cuts may still have worked (stages that differ in
    speed, or in room: a stage's in-flight activations depend on its position), so the
    caller asks `_ExactFill`; unless no later piece could hold that layer either.
    """
    n = len(tms[0]) - 1
    out = []
    first = 0
    for k in range(pieces):
        end = n - (pieces - k - 1)  # > first: each earlier piece stopped a layer short
        tm = tms[k]
        phases = list(zip(mems[k], rooms[k], works[k]))
        if k == pieces - 1:
            last = n
            if tm[n] > tm[first] + bound * (1 + 1e-9) or any(
                    mem[n] > mem[first] + (room - (max(work[0][first:]) if work else 0.0))
                    for mem, room, work in phases):
                return None, False
        else:
            last = bisect.bisect_right(tm, tm[first] + bound * (1 + 1e-9), first + 1,
                                       end + 1) - 1
            for mem, room, work in phases:
                last = min(last, _reach(mem, room, work, first, end))
            if last <= first:
                return None, _another_stage_holds(tms, mems, rooms, works, k, first, bound)
        out.append((first, last))
        first = last
    return out, False


def _next_larger(work: list) -> list:
    """Per layer, the next layer whose working set is larger (len(work) if none)."""
    out, stack = [len(work)] * len(work), []
    for i, w in enumerate(work):
        while stack and work[stack[-1]] < w:
            out[stack.pop()] = i
        stack.append(i)
    return out


def _reach(mem, room: float, work, a: int, end: int) -> int:
    """The furthest cut b <= end from start a with mem[b] <= mem[a] + (room - the largest
    of the working sets work[0][a:b]) (work None: none); a if not even a + 1.

    Up to the next larger one (work[1]), the largest is the start's; then that layer's,
    and so on. The left side only grows with b, so the first stretch that stops short
    of its end holds the answer."""
    if work is None:
        return bisect.bisect_right(mem, mem[a] + room, a + 1, end + 1) - 1
    values, next_larger = work
    best, r = a, a
    while r < end:
        top = min(next_larger[r], end)  # cuts (r, top] hold work[0][r] as their largest
        b = bisect.bisect_right(mem, mem[a] + (room - values[r]), r + 1, top + 1) - 1
        if b <= r:
            return best
        best = b
        if b < top:
            return best
        r = top
    return best


def _another_stage_holds(tms, mems, rooms, works, k: int, g: int, bound: float) -> bool:
    """Whether some piece after k could hold layer g alone, where piece k cannot: a
    split's first k pieces end at or before g (the furthest cut they can reach), so
    layer g lies in piece k or later, and piece k cannot hold it (a piece holding it
    holds [g, g + 1) too). Piece j holds it only if the j pieces before it and the ones
    after it each keep a layer. If none can, no split fits this bound."""
    pieces, n = len(tms), len(tms[0]) - 1
    for j in range(max(k + 1, pieces - (n - g)), min(g, pieces - 1) + 1):
        tm = tms[j]
        if tm[g + 1] <= tm[g] + bound * (1 + 1e-9) and all(
                mem[g + 1] <= mem[g] + (room - (work[0][g] if work else 0.0))
                for mem, room, work in zip(mems[j], rooms[j], works[j])):
            return True
    return False


class _ExactFill:
    """`_greedy`'s question answered exactly: the cuts each piece can end at form a set,
    carried piece by piece (cut b is reachable if a reachable start a < b of the piece
    reaches b or further); the pieces are then read back from the end, each starting as
    late as it can. None if no split fits. How far each start reaches within the memory
    rooms does not depend on the bound: it is found once per `split`, on first use."""

    def __init__(self, tms, mems, rooms, works):
        self.tms, self.mems, self.rooms, self.works = tms, mems, rooms, works
        self.n = len(tms[0]) - 1
        self.pos = np.arange(self.n + 1)
        self._room_far = None

    def _reach_in_room(self) -> list[np.ndarray]:
        """Per piece: the furthest cut from each start that every memory table allows,
        leaving a layer for each later piece."""
        if self._room_far is None:
            pieces, self._room_far = len(self.tms), []
            for k in range(pieces):
                end = self.n - (pieces - k - 1)
                far = np.full(self.n + 1, end)
                for mem, room, work in zip(self.mems[k], self.rooms[k], self.works[k]):
                    far = np.minimum(far, self._reach_all(mem, room, work, end))
                self._room_far.append(far)
        return self._room_far

    def _reach_all(self, mem, room: float, work, end: int) -> np.ndarray:
        """`_reach` from every start."""
        if work is None:
            mem = np.asarray(mem)
            return np.searchsorted(mem, mem + room, "right") - 1
        return np.array([_reach(mem, room, work, a, end) for a in range(self.n + 1)])

    def __call__(self, bound: float):
        n, pos = self.n, self.pos
        in_time: dict[int, np.ndarray] = {}  # pieces on one stage share its time table
        can_start = pos == 0
        furthest = []  # per piece: the furthest cut from each start it can take, else -1
        for k, (tm, room_far) in enumerate(zip(self.tms, self._reach_in_room())):
            if id(tm) not in in_time:
                t = np.asarray(tm)
                in_time[id(tm)] = np.searchsorted(t, t + bound * (1 + 1e-9), "right") - 1
            far = np.minimum(in_time[id(tm)], room_far)
            if k == len(self.tms) - 1:
                far = np.where(far == n, n, -1)  # the last piece runs to the end
            far = np.where(can_start & (far > pos), far, -1)
            furthest.append(far)
            can_start = np.maximum.accumulate(np.concatenate([[-1], far[:-1]])) >= pos
        if not can_start[n]:
            return None
        out, b = [], n
        for far in reversed(furthest):
            a = int(np.flatnonzero((far >= b) & (pos < b))[-1])
            out.append((a, b))
            b = a
        return out[::-1]


def evaluate_split(c, s: Setting, pieces, hop) -> PipelineChoice:
    """Step time, bubble, p2p and per-device memory of one split under setting `s`.

    c: one LayerCosts, or one per stage. pieces: p stages, or p * v chunks (chunk k on
    device k mod p) when interleaved. hop(nbytes) -> seconds to send nbytes per device to
    the next stage.
    """
    cs = _per_stage(c, s.p)
    tabs = _stage_tables(cs, s)
    flight = in_flight(s.p, s.m, s.schedule, s.v)
    later = in_flight_with_gradients(s.p, s.m, s.schedule, s.v)
    fwd, bwd = [0.0] * s.p, [0.0] * s.p
    state, grads, acts, works, once = ([0.0] * s.p for _ in range(5))
    updates, fresh = [0.0] * s.p, [0.0] * s.p
    sends, sent_bytes = [0.0] * s.p, [0.0] * s.p
    n = cs[0].num_layers
    for k, (first, last) in enumerate(pieces):
        d = k % s.p
        t = tabs[d]
        f, b, step, act, work = t.f, t.b, t.step, t.act, t.work
        cut = cs[d].cut
        out = cut[last - 1] if last < n else 0.0  # activations sent on
        back = cut[first - 1] if first > 0 else 0.0  # their gradients sent back
        send_f, send_b = hop(out / s.m), hop(back / s.m)
        fwd[d] += float(f[first:last].sum()) + send_f
        bwd[d] += float(b[first:last].sum()) + send_b
        sends[d] += send_f + send_b
        sent_bytes[d] += out + back
        state[d] += float(t.state[first:last].sum())
        grads[d] += float(t.grads[first:last].sum())
        acts[d] += float(act[first:last].sum())
        works[d] = max(works[d], float(work[first:last].max()))
        updates[d] += float(t.update[first:last].sum())
        # One backward program's gradients and rebuilt residuals at a time: a device's
        # interleaved chunks are separate programs, each summed into the step's sums.
        fresh[d] = max(fresh[d], float(t.fresh[first:last].sum()))
        once[d] += float(step[first:last].sum())
    mem = tuple(_stage_peak(state[d], grads[d], flight[d] * acts[d], later[d] * acts[d],
                            fresh[d], works[d], updates[d]) for d in range(s.p))
    pt = pipeline_time(fwd, bwd, s.m, s.schedule, s.v)
    slow = max(range(s.p), key=lambda d: fwd[d] + bwd[d])
    return PipelineChoice(tuple(pieces), s.m, s.schedule, s.v, s.remat, s.zero,
                          pt.step_time + max(once), pt.bubble, sends[slow] * s.m, max(once),
                          max(sent_bytes), mem, tuple(x + y for x, y in zip(fwd, bwd)),
                          s.recompute)


def selective(c, s: Setting, pieces, limit, uniform: bool = False) -> Setting | None:
    """Per-layer recomputation for a split that fits with every layer recomputed: keep the
    activations of the layers whose recomputation costs the most time per byte saved, in
    that order, as long as each device's memory allows (Korthikanti et al., "Reducing Activation
    Recomputation in Large Transformer Models", 2022, recompute selectively for the same
    reason). None when that is every layer or none (the "full" and "none" settings),
    unless `uniform` (remat="layers" pinned: then it says which, as a "layers" setting)."""
    cs = _per_stage(c, s.p)
    limits = _per_stage(limit, s.p)
    n = cs[0].num_layers
    full = dataclasses.replace(s, remat="full", recompute=())
    none = dataclasses.replace(s, remat="none", recompute=())
    flight = in_flight(s.p, s.m, s.schedule, s.v)
    later = in_flight_with_gradients(s.p, s.m, s.schedule, s.v)
    rm = np.ones(n, dtype=bool)
    for d in range(s.p):
        mine = [l for k, (a, b) in enumerate(pieces) if k % s.p == d for l in range(a, b)]
        t_none, t_full = _tables(cs[d], none), _tables(cs[d], full)
        b_none, act_none, work_none = t_none.b, t_none.act, t_none.work
        b_full, act_full, work_full = t_full.b, t_full.act, t_full.work
        gain = b_full - b_none  # seconds per microbatch saved by keeping the activations
        extra = flight[d] * (act_none - act_full)  # bytes that keeping them costs
        order = np.array(sorted(mine, key=lambda l: -gain[l] / max(extra[l], 1.0)), int)
        # Keep the activations of the first k layers in that order: the device's memory
        # for every k at once (activations grow with k; the largest working set is the
        # largest of the kept layers' and the recomputed ones'), the longest prefix that
        # fits is taken.
        acts = act_full[order].sum() + np.concatenate(
            [[0.0], np.cumsum(act_none[order] - act_full[order])])  # one microbatch's
        kept_work = np.concatenate([[0.0], np.maximum.accumulate(work_none[order])])
        left_work = np.concatenate([np.maximum.accumulate(work_full[order][::-1])[::-1],
                                    [0.0]])
        # A kept layer's backward rebuilds its cheap residuals (in `fresh`); a recomputed
        # one's makes them with its forward pass again (in its `work`).
        fresh = t_full.fresh[order].sum() + np.concatenate(
            [[0.0], np.cumsum(t_none.fresh[order] - t_full.fresh[order])])
        grads = float(t_none.grads[order].sum())
        mem = float(t_none.state[order].sum()) + np.maximum(
            np.maximum(flight[d] * acts, later[d] * acts + grads) + fresh +
            np.maximum(kept_work, left_work), grads + float(t_none.update[order].sum()))
        over = np.flatnonzero(mem > limits[d])
        k = int(over[0]) - 1 if len(over) else len(order)
        rm[order[:max(k, 0)]] = False
    if not uniform and (rm.all() or not rm.any()):
        return None
    return dataclasses.replace(s, remat="layers", recompute=tuple(bool(x) for x in rm))


def microbatch_counts(per_replica: int, p: int, limit: int = 6) -> list[int]:
    """Divisors of the per-replica batch to try: near p, 2p, 4p, ... and the largest."""
    divs = [d for d in range(1, per_replica + 1) if per_replica % d == 0]
    want = [p * 2 ** k for k in range(8)] + [per_replica, 1]
    picked = sorted({min(divs, key=lambda d: (abs(math.log(d / w)), d)) for w in want})
    return picked if len(picked) <= limit + 2 else picked[:limit] + picked[-2:]


def best_pipeline(c, p: int, limit, hop, *, schedules, remats, zeros,
                  microbatches=None, virtual=(2,)) -> PipelineChoice | None:
    """The fastest feasible (split, m, schedule, v, remat, zero) for p stages.

    c, limit: as for `split` (one for all stages, or one per stage).
    """
    c0 = _per_stage(c, p)[0]
    per_replica = max(c0.batch // max(c0.dp_size, 1), 1)
    ms = [microbatches] if microbatches else microbatch_counts(per_replica, p)
    best = None
    for m in ms:
        if per_replica % m:
            continue
        for sched in schedules:
            vs = virtual if sched == "interleaved" else (1,)
            for v in vs:
                if sched == "interleaved" and (m % p or v < 2 or c0.num_layers < p * v):
                    continue
                for zero in zeros:
                    splits: dict[str, list | None] = {}
                    for remat in sorted(remats, key=_REMAT_ORDER.index):
                        s = Setting(p, m, sched, v, remat, zero)
                        if remat == "layers":
                            # Only when keeping every activation does not fit: the split
                            # that fits with every layer recomputed, then the layers whose
                            # activations still fit are kept.
                            if splits.get("none") is not None:
                                continue
                            s = dataclasses.replace(s, remat="full")
                            stages = splits["full"] if "full" in splits else split(c, s, limit)
                            # Recomputing fewer layers than all is no faster than none.
                            if stages is None or _cannot_beat(
                                    best, c, dataclasses.replace(s, remat="none"), stages):
                                continue
                            s = selective(c, s, stages, limit,
                                          uniform=tuple(remats) == ("layers",))
                            if not s:
                                continue
                        else:
                            stages = splits[remat] = split(c, s, limit)
                        if stages is None or _cannot_beat(best, c, s, stages):
                            continue
                        got = evaluate_split(c, s, stages, hop)
                        if best is None or got.step_time < best.step_time:
                            best = got
    return best


def _cannot_beat(best: PipelineChoice | None, c, s: Setting, pieces) -> bool:
    """Whether `pieces` under `s` are surely no faster than `best`, from a lower bound of
    `evaluate_split`'s step time without its sums: every schedule keeps the busiest device
    computing for m microbatches (`pipeline_time`); sends and once-per-step work only
    add. The bound is read from running sums, so it is lowered by far more than their
    rounding before it rules a split out."""
    if best is None:
        return False
    times = [_cumulative(x, s).time for x in _per_stage(c, s.p)]
    busy = [0.0] * s.p
    for k, (first, last) in enumerate(pieces):
        tm = times[k % s.p]
        busy[k % s.p] += tm[last] - tm[first]
    return s.m * max(busy) * (1 - 1e-9) >= best.step_time


_REMAT_ORDER = ("none", "full", "layers")  # "layers" is tried knowing whether the others fit
