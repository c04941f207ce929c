"""From a planning view to an optimisation problem: groups, classes, strategies, edges.

* A *group* is a leader (an input, a matmul/conv/gather/scatter, or an op that cannot
  follow) plus its followers: elementwise, reshape, reduction ... ops whose layout is
  decided by their main operand. Only leaders carry decision variables.
* A *class* is a set of structurally identical groups (the same op sequence, shapes and
  neighbourhood: the same sublayer in repeated layers). A class is costed once and shares
  one choice: a 96-layer model has about as many classes as a 2-layer one.
* An *edge* joins a producer class to a consumer class: resharding cost for every pair of
  their strategies.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import numpy as np

from meshplan.costmodel import Efficiency, op_time
from meshplan.planner._layout import Comm, Layout, replicated, reshard, shards
from meshplan.planner._mesh import CommModel
from meshplan.planner._ops import LEADER_PRIMITIVES, POp, PlanningView, batch_free
from meshplan.planner._strategies import (OpChoice, apply_loops, follower_loops,
                                          layout_choices, leader_choices)

_MATMUL = frozenset({"dot_general", "conv_general_dilated"})


@dataclasses.dataclass(eq=False)
class Group:
    """A leader and its followers; `produced` values get their layout from this group."""

    id: int
    kind: str  # "input", "leader", "fixed"
    members: list[POp]
    produced: list[int] = dataclasses.field(default_factory=list)
    # External reads: (member index, operand index or -1 for an input's slot, value, mult).
    slots: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    cls: int = -1

    @property
    def leader(self) -> POp:
        return self.members[0]


@dataclasses.dataclass(frozen=True)
class GroupStrategy:
    """One choice for a group: layouts of produced values and of external reads, costs."""

    produced: tuple[Layout, ...]
    slots: tuple[Layout, ...]
    ops: tuple[tuple[tuple[Layout, ...], tuple[Layout, ...]], ...]  # per member (ins, outs)
    time: float  # seconds per step: compute and own collectives, times multiplicity
    flops: float  # per device per step
    comms: tuple[tuple[Comm, int], ...]  # (collective, executions per step)


@dataclasses.dataclass
class Edge:
    """Resharding cost between two classes for one value slot.

    The cost only depends on the producer's layout of the value and the layout the consumer
    wants, so it is stored over layout ids (small) with a strategy -> layout-id map per side.
    """

    src: int
    dst: int
    src_keys: np.ndarray  # src strategy -> layout id
    dst_keys: np.ndarray  # dst strategy -> layout id
    cost: np.ndarray  # [src layout id, dst layout id], seconds per step
    dst_layouts: tuple = ()  # layout id -> the Layout the consumer wants
    # Edges reading the same produced value share its reshards: XLA converts a value to a
    # given layout once, however many ops read it there. (producer class, produced index)
    share: tuple = ()

    def matrix(self) -> np.ndarray:
        """[src strategy, dst strategy] -> seconds."""
        return self.cost[np.ix_(self.src_keys, self.dst_keys)]


@dataclasses.dataclass(eq=False)
class Grouping:
    """The mesh-independent part of a problem: groups, value -> group id, classes, and
    facts derived from them once, which every candidate mesh and pipeline stage shares
    (each is a pass over every group: a 96-layer model has ~20k)."""

    groups: list[Group]
    group_of_value: dict[int, int]
    classes: list[list[int]]  # class id -> group ids
    # Derived facts keyed by what else they depend on (the pipeline's layers: `_pipe`).
    memo: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def slot_mults(self) -> dict[tuple[int, int, int, int], int]:
        """(producer class, reader class, produced index, slot index) -> executions per
        step of that read, summed over the groups of the reader class."""
        groups, group_of_value = self.groups, self.group_of_value
        where = self.produced_where
        mults: dict[tuple[int, int, int, int], int] = {}
        for g in groups:
            for si, (mi, k, v, mult) in enumerate(g.slots):
                key = (groups[group_of_value[v]].cls, g.cls, where[v][1], si)
                mults[key] = mults.get(key, 0) + mult
        return mults

    @functools.cached_property
    def slot_reads(self) -> dict[tuple[int, int, int, int], list[tuple]] | None:
        """The reads `slot_mults` counts, listed: bucket -> [(order, value, executions of
        the reading op, mult)], `order` running over every group's slots in turn. Every
        group of a class takes the class's strategy, so a plan moves a bucket's values
        only when its producer layout differs from its slot layout. None when a value is
        produced by two groups (then the bucket does not tell its producer layout)."""
        groups, group_of_value = self.groups, self.group_of_value
        where = self.produced_where
        if len(where) != sum(len(g.produced) for g in groups):
            return None
        reads: dict[tuple[int, int, int, int], list[tuple]] = {}
        order = 0
        for g in groups:
            for si, (mi, k, v, mult) in enumerate(g.slots):
                key = (groups[group_of_value[v]].cls, g.cls, where[v][1], si)
                reads.setdefault(key, []).append(
                    (order, v, g.members[mi].mult if k >= 0 else mult, mult))
                order += 1
        return reads

    @functools.cached_property
    def produced_where(self) -> dict[int, tuple[int, int]]:
        """Value -> (class of the group producing it, index in its `produced`); where two
        groups produce a value, the later group's entry."""
        return {v: (g.cls, pi) for g in self.groups for pi, v in enumerate(g.produced)}

    @functools.cached_property
    def strategy_positions(self) -> tuple[dict[int, tuple[int, int]],
                                          dict[int, tuple[int, int]]]:
        """Where `assign` takes each layout from in a class's strategy: value -> (class,
        index in its `produced`), op id -> (class, index in its `ops`); as there, a later
        class's entry wins."""
        produced: dict[int, tuple[int, int]] = {}
        member: dict[int, tuple[int, int]] = {}
        for c, (values, op_ids) in enumerate(self.class_members):
            g = self.groups[self.classes[c][0]]
            for i, v in enumerate(values):
                produced[v] = (c, i % len(g.produced))
            for i, op_id in enumerate(op_ids):
                member[op_id] = (c, i % len(g.members))
        return produced, member

    @functools.cached_property
    def class_members(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per class: the values its groups produce and their ops' ids, group after group
        (each group of a class lists them in the same order as its strategies do)."""
        out = []
        for members in self.classes:
            gs = [self.groups[i] for i in members]
            values = tuple(v for g in gs for v in g.produced)
            ops = tuple(op.id for g in gs for op in g.members)
            # Groups of a class have one shape (its key says so, up to a 64-bit hash).
            if len(values) != len(gs) * len(gs[0].produced) or \
                    len(ops) != len(gs) * len(gs[0].members):
                raise AssertionError("groups of one class differ in shape (a 64-bit hash "
                                     "collision in group_classes): a bug, please report it.")
            out.append((values, ops))
        return out


@dataclasses.dataclass
class Problem:
    grouping: Grouping
    strategies: list[list[GroupStrategy]]  # class id -> strategies
    edges: list[Edge]
    self_cost: list[np.ndarray]  # class id -> extra cost on the diagonal (self edges)
    view: PlanningView
    mesh_shape: tuple[int, ...]
    comm: CommModel

    @property
    def groups(self) -> list[Group]:
        return self.grouping.groups

    @property
    def classes(self) -> list[list[int]]:
        """Class id -> group ids."""
        return self.grouping.classes

    @property
    def group_of_value(self) -> dict[int, int]:
        return self.grouping.group_of_value

    def class_size(self, c: int) -> int:
        return len(self.classes[c])


# --------------------------------------------------------------------------- grouping


def _is_const(view: PlanningView, v: int) -> bool:
    return view.values[v].is_const


def build_groups(view: PlanningView) -> tuple[list[Group], dict[int, int]]:
    """Assign every op to a group; followers join the group of their main operand."""
    groups: list[Group] = []
    group_of_value: dict[int, int] = {}

    def new_group(kind, op) -> Group:
        g = Group(len(groups), kind, [op])
        groups.append(g)
        return g

    for op in view.ops:
        main = _main_operand(op, view, groups, group_of_value)
        if op.kind == "input":
            g = new_group("input", op)
        elif op.kind == "opaque":
            g = new_group("fixed", op)
        elif op.prim in LEADER_PRIMITIVES:
            g = new_group("leader", op)
        elif main is None:
            # A source (iota, a broadcast of a constant or of a small value) may be
            # produced in any layout: one that adds dimensions to its input leads a group
            # of its own (a causal mask broadcast to [batch, heads, seq, seq] must not be
            # materialised whole); the others (masks, index vectors) stay replicated,
            # which keeps the ILP small.
            grows = op.kind == "op" and op.dims is not None and op.outputs and any(
                len(view.values[v].shape) > max([len(view.values[u].shape)
                                                 for u in op.inputs] or [0]) + 1
                for v in op.outputs)
            g = new_group("leader" if grows else "fixed", op)
        elif _joins(op, main, view, groups, group_of_value):
            if main != op.dims.main:
                op.dims = dataclasses.replace(op.dims, main=main)
            g = new_group("leader", op)
        else:
            g = groups[group_of_value[op.inputs[main]]]
            if main != op.dims.main:
                op.dims = dataclasses.replace(op.dims, main=main)
            g.members.append(op)
        for v in op.outputs:
            group_of_value[v] = g.id
            g.produced.append(v)
    values = view.values
    for g in groups:
        home = g.id
        for mi, op in enumerate(g.members):
            if op.kind == "input":
                # Even when the slot's value is made inside this group (a parameter's update
                # follows the parameter), its layout may differ: a self edge charges that.
                g.slots += [(mi, -1, s.value, s.mult) for s in op.slots
                            if not _is_const(view, s.value)]
                continue
            for k, v in enumerate(op.inputs):
                if group_of_value.get(v, home) == home or values[v].const is not None:
                    continue
                g.slots.append((mi, k, v, op.mult))
    return groups, group_of_value


def _joins(op: POp, main: int, view, groups, group_of_value) -> bool:
    """Whether an op merges two streams (a residual add, a gradient sum): it leads a group.

    Were it to follow its first operand, the residual stream of every layer would chain
    into one group: one layout for all layers, and no repeated layers left to tie.
    """
    home = group_of_value[op.inputs[main]]
    for i, arr in enumerate(op.dims.operands):
        v = op.inputs[i]
        if i == main or arr is None or _is_const(view, v) or v not in group_of_value:
            continue
        other = groups[group_of_value[v]]
        if other.id != home and other.kind != "fixed" and \
                len(view.values[v].shape) == len(view.values[op.inputs[main]].shape):
            return True
    return False


def _main_operand(op: POp, view, groups, group_of_value) -> int | None:
    """The operand a follower inherits its layout from: prefer one that is not fixed."""
    if op.kind != "op" or op.dims is None or op.dims.main is None:
        return None
    # Most often the declared main operand is already a fine one.
    m = op.dims.main
    u = op.inputs[m]
    if u in group_of_value and groups[group_of_value[u]].kind != "fixed" and \
            not _is_const(view, u) and \
            len(view.values[u].shape) == len(op.dims.operands[m] or ()):
        return m
    candidates = [op.dims.main] + [i for i, arr in enumerate(op.dims.operands)
                                   if arr is not None and i != op.dims.main]
    candidates = [i for i in candidates if not _is_const(view, op.inputs[i])
                  and op.inputs[i] in group_of_value
                  and len(view.values[op.inputs[i]].shape) == len(op.dims.operands[i] or ())]
    for i in candidates:
        if groups[group_of_value[op.inputs[i]]].kind != "fixed":
            return i
    return candidates[0] if candidates else None


# --------------------------------------------------------------------------- classes


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer mixer (splitmix64's finaliser), applied elementwise."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _wl_hashes(view: PlanningView, rounds: int = 3) -> list[int]:
    """Weisfeiler-Lehman hashes of ops (indexed by op id): equal for the same sublayer in
    repeated layers.

    Each round mixes an op's hash with its producers' hashes in operand order and with the
    multiset of its consumers' hashes, in 64-bit integer arithmetic over arrays (a
    Python-tuple version took a second at 96 layers). Hashes only need to agree within
    one planning run.
    """
    ops = view.ops
    n = len(ops)
    made_by = {v: i for i, op in enumerate(ops) for v in op.outputs}
    # Operands in order: the op reading (in_of), the producing op (in_op; -1: a constant or
    # graph input) and the position.
    lens = np.fromiter(map(len, (op.inputs for op in ops)), dtype=np.int64, count=n)
    in_op = np.fromiter((made_by.get(v, -1) for op in ops for v in op.inputs),
                        dtype=np.int64, count=int(lens.sum()))
    in_of = np.repeat(np.arange(n, dtype=np.int64), lens)
    in_pos = np.arange(len(in_op), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    position = _mix(in_pos.astype(np.uint64) + np.uint64(1))
    # Consumers: (producer op, consuming op) per operand use.
    used = in_op >= 0
    use_src, use_dst = in_op[used], in_of[used]
    h = np.array([hash(op.sig) for op in ops], dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            producer = np.where(in_op >= 0, h[np.maximum(in_op, 0)], np.uint64(0))
            ins = np.zeros(n, dtype=np.uint64)
            np.add.at(ins, in_of, _mix(producer ^ position))  # order-sensitive
            outs = np.zeros(n, dtype=np.uint64)
            np.add.at(outs, use_src, _mix(h[use_dst] + np.uint64(0x9E3779B97F4A7C15)))
            h = _mix(_mix(h ^ np.uint64(0x2545F4914F6CDD1D)) + ins * np.uint64(3) + outs)
    by_id = [0] * (max((op.id for op in ops), default=-1) + 1)
    for i, op in enumerate(ops):
        by_id[op.id] = int(h[i])
    return by_id


def group_classes(groups: list[Group], view: PlanningView, tie: bool) -> list[list[int]]:
    """Partition groups into classes of identical structure (singletons when tie=False)."""
    if not tie:
        for g in groups:
            g.cls = g.id
        return [[g.id] for g in groups]
    h = _wl_hashes(view)
    keys: dict[tuple, int] = {}
    classes: list[list[int]] = []
    for g in groups:
        pos = {v: i for i, v in enumerate(g.produced)}
        wiring = tuple((h[m.id], tuple(pos.get(v, -1) for v in m.inputs), m.mult)
                       for m in g.members)
        key = (g.kind, wiring, tuple((k, s[1], s[3]) for k, s in enumerate(g.slots)))
        if key not in keys:
            keys[key] = len(classes)
            classes.append([])
        g.cls = keys[key]
        classes[g.cls].append(g.id)
    return classes


# --------------------------------------------------------------------------- strategies


@dataclasses.dataclass(frozen=True)
class Restrictions:
    """What constraints forbid: `allowed(op, dim_or_loop, axis) -> bool` for leaders/inputs."""

    input_layout: Callable[[POp, int, int], bool] | None = None
    input_required: Callable[[POp, tuple[int, ...]], list[Layout] | None] | None = None
    loop: Callable[[POp, int, int], bool] | None = None


def _shape(view, v):
    return view.values[v].shape


def _nbytes(view, v):
    return float(view.values[v].nbytes)


def on_xla_cpu(comm: CommModel) -> bool:
    """Whether every device of the mesh is a CPU (XLA:CPU lowers collectives its own way)."""
    c = comm.cluster
    return all(c.devices[i].kind == "cpu" for i in comm.mesh.device_ids)


def wire_bytes(nbytes: float, dtype, xla_cpu: bool) -> float:
    """Bytes a collective moves for a value of `nbytes` and `dtype`.

    XLA:CPU runs the collectives of bfloat16 values in float32, converting before and
    after, twice the bytes of the value (jax 0.10.2: every all-reduce and all-gather of
    the bfloat16 GPT's compiled program is f32, and so are a bfloat16 all-to-all and
    collective-permute).
    """
    return 2.0 * nbytes if xla_cpu and np.dtype(dtype).name == "bfloat16" else nbytes


def _wire_nbytes(view, v, xla_cpu: bool) -> float:
    return wire_bytes(_nbytes(view, v), view.values[v].dtype, xla_cpu)


@dataclasses.dataclass(frozen=True)
class _OpFacts:
    """What costing an op needs from the view, whatever the mesh: gathered once per op."""

    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]
    out_nbytes: tuple[float, ...]
    traffic: float  # bytes read and written from memory, unsplit (materialised values only)
    dtype: Any
    matmul: bool


def _facts(view, op: POp) -> _OpFacts:
    """The op's `_OpFacts`, memoised on the view (every candidate mesh asks again)."""
    memo = view.memo.setdefault("op_facts", {})
    facts = memo.get(op.id)
    if facts is None:
        # Memory traffic: only values that live in memory; a value fused into its readers
        # is neither written nor read back (XLA's loop fusion, Megatron-LM's fused kernels).
        kept = view.memo["materialised"]
        facts = _OpFacts(tuple(_shape(view, v) for v in op.inputs),
                         tuple(_shape(view, v) for v in op.outputs),
                         tuple(_nbytes(view, v) for v in op.outputs),
                         sum(_nbytes(view, v) for v in op.inputs + op.outputs if v in kept),
                         view.values[op.outputs[0]].dtype if op.outputs else np.float32,
                         op.prim in _MATMUL)
        memo[op.id] = facts
    return facts


def _op_cost(op: POp, choice: OpChoice, view, comm: CommModel, device, eff,
             xla_cpu: bool) -> tuple[float, float, list[Comm]]:
    """(seconds, per-device FLOPs, collectives) of one execution of an op under a choice."""
    facts = _facts(view, op)
    flops = op.flops / choice.split
    nbytes = facts.traffic / choice.split
    t = _roofline(flops, nbytes, device, facts.dtype, facts.matmul, eff) \
        if flops or nbytes else 0.0
    comms = [_lowered(c, xla_cpu, facts.dtype) for c in choice.comms]
    t += sum(comm.time(c.kind, c.nbytes, c.axes) for c in comms)
    return t, flops, comms


@functools.lru_cache(maxsize=4096)
def _unit_times(device, dtype, is_matmul: bool, eff) -> tuple[float, float]:
    """(seconds per FLOP, seconds per byte): op_time at 1 FLOP and at 1 byte, memoised."""
    return (op_time(1.0, 0.0, device, dtype, is_matmul, eff),
            op_time(0.0, 1.0, device, dtype, is_matmul, eff))


def _roofline(flops, nbytes, device, dtype, is_matmul, eff) -> float:
    """costmodel.op_time (a roofline: linear in each term), without per-call validation."""
    per_flop, per_byte = _unit_times(device, dtype, is_matmul, eff)
    return max(flops * per_flop, nbytes * per_byte)


def _lowered(c: Comm, xla_cpu: bool, dtype) -> Comm:
    """A collective of an op's result as XLA:CPU runs it (`xla_cpu`: every device is a
    CPU): a reduce-scatter as an all-reduce plus a local slice (measured), bfloat16 in
    float32 (`wire_bytes`)."""
    if not xla_cpu:
        return c
    kind = "all-reduce" if c.kind == "reduce-scatter" else c.kind
    return Comm(kind, wire_bytes(c.nbytes, dtype, True), c.axes)


def _fixed_choice(op: POp, view) -> OpChoice:
    ins = tuple(replicated(len(_shape(view, v))) for v in op.inputs)
    outs = tuple(replicated(len(_shape(view, v))) for v in op.outputs)
    loops = tuple(() for _ in (op.dims.loop_sizes if op.dims else ()))
    return OpChoice(loops, ins, outs, (), 1)


def _choice(op: POp, loops, view, mesh_shape, scatter=None) -> OpChoice | None:
    # Tuples, so that apply_loops can be memoised: repeated sublayers ask the same thing.
    facts = _facts(view, op)
    return apply_loops(op.dims, loops, facts.in_shapes, facts.out_shapes, facts.out_nbytes,
                       mesh_shape, scatter)


def group_strategies(g: Group, view: PlanningView, comm: CommModel, mesh_shape, device,
                     eff: Efficiency, restrict: Restrictions, xla_cpu: bool,
                     one_program: bool = True) -> list[GroupStrategy]:
    """Every strategy of a group: the leader's choices, followers propagated through each.

    `one_program`: the step is one XLA program (not a pipeline stage's forward and
    backward programs), so a value its ops read in one other layout is moved once."""
    lead = g.leader
    if g.kind == "input":
        v = lead.outputs[0]
        pinned = restrict.input_required(lead, _shape(view, v)) if restrict.input_required \
            else None
        allowed = (lambda d, a: restrict.input_layout(lead, d, a)) if restrict.input_layout \
            else None
        layouts = pinned if pinned is not None else layout_choices(_shape(view, v), mesh_shape,
                                                                   allowed)
        heads = [OpChoice((), (), (lay,), (), 1) for lay in layouts]
    elif g.kind == "fixed":
        heads = [_fixed_choice(lead, view)]
    else:
        allowed = (lambda l, a: restrict.loop(lead, l, a)) if restrict.loop else None
        heads = leader_choices(lead.dims, [_shape(view, v) for v in lead.inputs],
                               [_shape(view, v) for v in lead.outputs],
                               [_nbytes(view, v) for v in lead.outputs], mesh_shape, allowed,
                               scatter_variants=not xla_cpu)
        if not heads:
            heads = [_fixed_choice(lead, view)]
    return [_propagate(g, head, view, comm, device, eff, xla_cpu, mesh_shape, one_program)
            for head in heads]


def _propagate(g: Group, head: OpChoice, view, comm, device, eff, xla_cpu, mesh_shape,
               one_program: bool = True) -> GroupStrategy:
    layout: dict[int, Layout] = {}
    ops = []
    time = flops = 0.0
    comms: list[tuple[Comm, int]] = []
    # In one program XLA moves a value to a layout once however many ops of the group read
    # it so (CSE): the forward and backward loops of a scanned model slice one gathered
    # stack. A pipeline stage's passes are programs of their own, each moving it.
    moved: set[tuple[int, Layout, int]] = set()
    for mi, op in enumerate(g.members):
        if mi == 0:
            choice = head
        else:
            loops = follower_loops(op.dims, layout[op.inputs[op.dims.main]])
            choice = _choice(op, loops, view, mesh_shape)
            if choice is None:  # e.g. a merge that would split a minor dim: gather first
                choice = _choice(op, tuple(() for _ in op.dims.loop_sizes), view, mesh_shape)
        for k, v in enumerate(op.inputs):
            if v in layout and choice.in_layouts[k] != layout[v] and \
                    (v, choice.in_layouts[k], op.mult) not in moved:
                if one_program:
                    moved.add((v, choice.in_layouts[k], op.mult))
                for c in reshard(_wire_nbytes(view, v, xla_cpu), layout[v],
                                 choice.in_layouts[k], mesh_shape):
                    time += op.mult * comm.time(c.kind, c.nbytes, c.axes)
                    comms.append((c, op.mult))
        if op.kind != "input":
            t, f, cs = _op_cost(op, choice, view, comm, device, eff, xla_cpu)
            time += op.mult * t
            flops += op.mult * f
            comms += [(c, op.mult) for c in cs]
        for v, lay in zip(op.outputs, choice.out_layouts):
            layout[v] = lay
        ops.append((choice.in_layouts, choice.out_layouts))
    slots = []
    for mi, k, v, _ in g.slots:
        slots.append(ops[mi][1][0] if k < 0 else ops[mi][0][k])
    return GroupStrategy(tuple(layout[v] for v in g.produced), tuple(slots), tuple(ops), time,
                         flops, tuple(comms))


# --------------------------------------------------------------------------- problem


def group_view(view: PlanningView, tie: bool = True) -> Grouping:
    """Groups, value -> group id and classes: the mesh-independent part of a problem."""
    groups, group_of_value = build_groups(view)
    return Grouping(groups, group_of_value, group_classes(groups, view, tie))


def build_problem(view: PlanningView, comm: CommModel, device, eff: Efficiency,
                  restrict: Restrictions = Restrictions(), tie: bool = True,
                  xla_cpu: bool = False, grouping=None, weight_moves: float = 1.0,
                  one_program: bool = True) -> Problem:
    """Groups, classes, per-class strategies and resharding edges for one logical mesh.

    `grouping` = `group_view(view, tie)`, which does not depend on the mesh, can be passed
    to share it between candidate meshes. `weight_moves` multiplies the resharding of
    values that do not scale with the batch (weights): a pipeline stage with m microbatches
    moves them m times per step, its activations once in total. `xla_cpu`: every device
    is a CPU, whose collectives XLA:CPU lowers its own way (`_lowered`, `wire_bytes`).
    """
    from meshplan.planner._memory import materialised  # (a cycle at import time)
    materialised(view)  # memoised on the view for _op_cost
    mesh_shape = comm.mesh.shape
    grouping = grouping or group_view(view, tie)
    groups, classes = grouping.groups, grouping.classes
    strategies = [group_strategies(groups[members[0]], view, comm, mesh_shape, device, eff,
                                   restrict, xla_cpu, one_program) for members in classes]
    self_cost = [np.zeros(len(s)) for s in strategies]
    edges = []
    for (pc, gc, pi, si), mult in grouping.slot_mults.items():
        v_rep = groups[classes[pc][0]].produced[pi]
        if weight_moves != 1.0 and batch_free(view, v_rep):
            mult = mult * weight_moves
        edge = _edge(pc, gc, strategies[pc], strategies[gc], pi, si,
                     _wire_nbytes(view, v_rep, xla_cpu), mult, comm, mesh_shape)
        if pc == gc:  # consecutive repeated layers: both ends take the same strategy
            self_cost[gc] = self_cost[gc] + np.diag(edge.matrix())
        elif edge.cost.any():
            edges.append(edge)
    return Problem(grouping, strategies, edges, self_cost, view, mesh_shape, comm)


def reshard_time(nbytes: float, src: Layout, dst: Layout, comm: CommModel,
                 mesh_shape) -> float:
    """Seconds to reshard, memoised on the CommModel (one per mesh)."""
    key = (nbytes, src, dst)
    memo = comm.reshard_memo
    if key not in memo:
        memo[key] = sum(comm.time(c.kind, c.nbytes, c.axes)
                        for c in reshard(nbytes, src, dst, mesh_shape))
    return memo[key]


def _edge(pc, gc, src_strats, dst_strats, produced_index, slot_index, nbytes, mult, comm,
          mesh_shape) -> Edge:
    """Resharding costs of one value slot between two classes, over distinct layouts."""
    src_ids: dict[Layout, int] = {}
    dst_ids: dict[Layout, int] = {}
    src_keys = np.array([src_ids.setdefault(s.produced[produced_index], len(src_ids))
                         for s in src_strats], dtype=np.int64)
    dst_keys = np.array([dst_ids.setdefault(d.slots[slot_index], len(dst_ids))
                         for d in dst_strats], dtype=np.int64)
    # Many class pairs move same-sized values between the same layouts (the sublayers of
    # a transformer block): their matrices are computed once per mesh.
    key = (nbytes, tuple(src_ids), tuple(dst_ids))
    base = comm.edge_memo.get(key)
    if base is None:
        base = np.array([[reshard_time(nbytes, a, b, comm, mesh_shape) for b in dst_ids]
                         for a in src_ids]).reshape(len(src_ids), len(dst_ids))
        comm.edge_memo[key] = base
    return Edge(pc, gc, src_keys, dst_keys, mult * base, tuple(dst_ids), (pc, produced_index))
