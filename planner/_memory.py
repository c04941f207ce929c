"""Per-device memory: arguments, outputs, and temporaries over a modelled XLA schedule.

XLA reports `argument + output + temp - alias`; the model predicts the same four terms by
imitating, in simplified form, the compiler stages that decide them (XLA:CPU, jax 0.10.2;
checked buffer by buffer against XLA's buffer-assignment dumps of the example models):

1. Fusion decides which values are buffers at all. Element-wise ops, broadcasts and
   layout changes are fused into their consumers and never stored; their consumers read the
   buffers the fused chain starts from instead (so fusing a cheap op *extends* the life of
   its inputs: XLA recomputes `x + b` in the backward pass from the saved matmul result).
   A value is stored when it is a result of the step, when an op that cannot absorb a fused
   producer reads it (a matmul, a gather, a loop boundary; a large reduction, unless it
   is the value's only reader: `_tree_reduction`), or when it is expensive
   (exp, tanh, divide, ...) and more than one fusion would have to recompute it. A
   transpose of a weight gradient is thus not a second buffer.
2. Scheduling orders the stored values. XLA's default memory scheduler runs a greedy list
   scheduler (bytes freed minus bytes defined, scalars first) and a post-order, and keeps
   whichever needs less memory. The model runs the same greedy list scheduler on the
   graph of stored values (a scan is one unit, as XLA's `while` is) and compares it with
   program order: it is what moves each optimizer update next to its gradient, so
   gradients die early. An element-wise fusion writes its result over an operand of the
   same shape that dies there (XLA shares the buffer).
3. The plan adds buffers (`memory(..., op_layouts=...)`): a partial-sum result before its
   all-reduce (and the all-reduced result in full where a reduce-scatter is lowered to
   all-reduce + slice, as on XLA:CPU), each value moved to another layout (once per value
   and layout, from its first to its last reader there, as XLA CSEs the collectives; a
   parameter read by a loop is moved before the loop and kept for every loop that reads it
   so), a relayout copy next to a collective whose result is not in the target layout, a
   result computed in another layout than the one it is returned in, and on XLA:CPU a
   broadcast that a YNNPACK reduction reads as a buffer (`_ynn_broadcasts`: whether a
   reduction is big enough for YNNPACK depends on the layouts).
4. Buffer assignment packs them. Each result of the step gets its own allocation
   (`output`, plus the results tuple's pointers), and XLA reuses those allocations for
   temporaries that die before the result is written; what does not fit goes to one heap
   (`temp`). The model does the same: temporaries, largest first, go into a result
   allocation at least as large and free over their life, and the rest into the heap,
   whose size is the peak of their live bytes (XLA's heap adds some fragmentation).

A result that replaces an input (updated parameters and optimizer state) is pinned by the
runtime to that input's layout (`out_shardings`), so its bytes are counted in that layout.

The ILP sees the same timeline through linear rows: at a time t, arguments + results
written by t + temporaries live at t, each under the strategy of the class that lays it
out (a lower bound of what packing achieves, without the plan's collective buffers).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import heapq
import math
from itertools import chain

import numpy as np

from meshplan.ir._dims import ELEMENTWISE
from meshplan.planner._ilp import MemoryRow
from meshplan.planner._layout import Layout, reshard, shards
from meshplan.planner._ops import PlanningView, memo_of

# Ops that only change how an array is indexed: XLA turns them into bitcasts or folds them
# into the layout of the op that reads them, even when that op is a matmul.
_VIEW = frozenset({"reshape", "squeeze", "expand_dims", "transpose", "alias", "scan_slice",
                   "sharding_constraint", "stop_gradient", "optimization_barrier"})
# Ops XLA fuses into their consumers (loop fusion).
_FUSIBLE = ELEMENTWISE | _VIEW | {"broadcast_in_dim", "iota", "slice", "pad", "concatenate",
                                  "rev", "dynamic_slice", "select_n", "clamp"}
# Consumers that absorb fused producers: a reduction is the root of a loop fusion that
# computes its element-wise operand on the fly; stacking a scan output writes each layer's
# value straight into the stacked buffer (an in-place dynamic-update-slice fusion).
_ABSORBING = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                        "reduce_or", "argmax", "argmin", "scan_stack"})
# XLA's `InstructionFusion::IsExpensive` for floating point: a producer XLA will not
# duplicate into a second fusion, so it is stored when two fusions read it.
_EXPENSIVE = frozenset({"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt",
                        "rsqrt", "cbrt", "pow", "atan2", "erf", "erfc", "erf_inv", "div",
                        "rem", "lgamma", "digamma", "tan", "asin", "acos", "atan", "sinh",
                        "cosh", "asinh", "acosh", "atanh"})
# XLA:CPU (jax 0.10.2) hands a float sum/max/min reduction to YNNPACK when it or its
# operand has at least this many elements per device (`IsInstructionPreferredByYnn`,
# kMinElements, xla/backends/cpu/ynn_support.cc). Such a "ynn" fusion takes in only the
# operations YNNPACK has (below) and only those with no other reader: a broadcast that
# other fusions read too is written out whole as a buffer of its own and read by it. In
# the GPT's LayerNorm backward that is the scale and the 1/sigma broadcast to the
# activation's shape, four per block (seen in XLA's buffer assignment: under tp=8, on a
# 16-block GPT, they were the 0.26 MB per block the model had missed, pred/meas 0.70).
_YNN_MIN_ELEMENTS = 4096
_YNN_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
# Element-wise and layout operations a ynn fusion takes in (YNNPACK's unary and binary
# operator maps, reshape, transpose, broadcast), by their jaxpr names.
_YNN_ELEMENTWISE = frozenset(
    "add add_any sub mul div max min pow integer_pow square abs ceil convert_element_type "
    "cos erf exp expm1 floor log log1p logistic neg rsqrt sign sin sqrt tanh tan "
    "reshape squeeze expand_dims transpose broadcast_in_dim".split())
# Element types YNNPACK's element-wise ops take, and the ones its reductions read (the
# intersection of its sum and max/min lists that keeps the input type or widens to f32).
_YNN_ELEMENT_TYPES = frozenset({"float64", "float32", "bfloat16", "int8", "uint8"})
_YNN_REDUCE_TYPES = frozenset({"float64", "float32", "bfloat16"})
# Bytes per element of the tuple XLA returns the results in (a 64-bit pointer each):
# `output_size - sum of result bytes` is 8 x results on every example model (XLA:CPU).
_TUPLE_POINTER_BYTES = 8
# Allocations per block in `_assign`'s skip list (about the square root of a deep model's
# several thousand results).
_BLOCK = 32
_NEVER = 1 << 62  # a phase after every phase of a step


@dataclasses.dataclass(frozen=True)
class Liveness:
    """The stored values of the step and when each is live, on the modelled schedule.

    Times are phases of the schedule (two per scheduled op: read, then write; see
    `_timeline`). `temps` lists every stored value other than an argument, in order of
    definition, with `start`/`end` phases (inclusive). The step's results are among them
    (`is_out`), live from when they are written to the last phase; `pin` gives, per entry,
    the input whose layout a result is pinned to (-1: none). `op_first`/`op_last` are the
    first and last schedule slot at which each planning op (by index in `view.ops`) runs
    (a fused op runs inside the fusions that read it; -1: never).
    """

    temps: tuple[int, ...]
    start: np.ndarray
    end: np.ndarray
    args: tuple[int, ...]
    outputs: tuple[int, ...]
    is_out: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
    pin: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    n_phases: int = 0
    op_first: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    op_last: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    # Loops: per op the loop (index into `loop_span`, -1: top level) that runs it; per
    # loop its first and last slot; per value made inside a loop, that loop.
    op_loop: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    loop_span: tuple[tuple[int, int], ...] = ()
    value_loop: dict = dataclasses.field(default_factory=dict)
    # A loop's view of an outer value: inner value -> (outer value, True for a per-layer
    # slice of a stacked array, False for an alias of a loop constant).
    loop_view: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def arg_set(self) -> frozenset[int]:
        return frozenset(self.args)

    def live_at(self, t: int) -> np.ndarray:
        """Indices into `temps` of the values live at phase t."""
        return np.flatnonzero((self.start <= t) & (self.end >= t))


# ----------------------------------------------------------------------------------------
# 1. Fusion: which values are stored, and which stored values each op really reads.


def _stored_values(view: PlanningView, consumers: dict[int, list[int]], out_set: set[int],
                   arg_set: set[int]) -> set[int]:
    """Values XLA keeps in a buffer (arguments excluded)."""
    ops, values = view.ops, view.values
    producer: dict[int, int] = {v: i for i, op in enumerate(ops) for v in op.outputs}

    def is_view_of_buffer(v: int) -> bool:
        # A view (transpose, reshape, ...) of a stored value or argument costs nothing,
        # even for a matmul: XLA folds it into the matmul's operand layout.
        while True:
            if v in arg_set:
                return True
            p = producer.get(v)
            if p is None:
                return values[v].is_const
            op = ops[p]
            if op.prim not in _VIEW:
                return op.prim not in _FUSIBLE or op.kind != "op"
            v = op.inputs[0]

    stored: set[int] = set()
    # Backward pass: the fusions (stored roots) that would have to compute each value.
    # Two are enough to know it would be duplicated.
    roots: dict[int, tuple[int, ...]] = {}
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind == "input" and op.prim == "input":
            continue
        for v in op.outputs:
            if values[v].is_const:
                continue
            fusible = op.kind == "op" and op.prim in _FUSIBLE
            cons = consumers.get(v, ())
            keep = (not fusible or v in out_set or op.kind == "input")
            if not keep:
                shared = len(set(cons)) > 1
                for c in cons:
                    cop = ops[c]
                    hard = not (cop.kind == "op" and (cop.prim in _FUSIBLE or (
                        cop.prim in _ABSORBING and not (shared and _tree_reduction(cop)))))
                    if hard and not (op.prim in _VIEW and is_view_of_buffer(op.inputs[0])):
                        keep = True
                        break
            if not keep and op.prim in _EXPENSIVE:
                seen: set[int] = set()
                for c in cons:
                    for r in roots.get(c, (c,)):
                        seen.add(r)
                keep = len(seen) > 1
            if keep:
                stored.add(v)
                roots[i] = (i,)
            else:
                # This op is fused into the fusions of its consumers.
                seen = []
                for c in cons:
                    for r in roots.get(c, (c,)):
                        if r not in seen:
                            seen.append(r)
                    if len(seen) > 1:
                        break
                roots[i] = tuple(seen[:2]) if seen else (i,)
    return stored


# ----------------------------------------------------------------------------------------
# 2. Scheduling units: single ops at top level, whole loops as one unit.


def _tree_reduction(op) -> bool:
    """Whether XLA:CPU turns this reduction into a fusion that takes in only producers it
    alone reads: a YNNPACK fusion (`_YNN_MIN_ELEMENTS` or more elements; judged on the
    whole array, as this is plan-independent) or, with a reduced dimension over 32, a
    reduce-window + reduce (`TreeReductionRewriter`) that loop fusion does not enter. So a
    transformer's residual sum, read by a LayerNorm and by the next residual sum, is a
    buffer of its own (seen in the GPT's HLO at 2-32 blocks). Smaller reductions are
    loop fusions that compute a shared element-wise producer again."""
    if op.prim == "scan_stack" or op.dims is None or not op.dims.loop_sizes:
        return False  # a scan's stacking write is not a reduction
    loops = op.dims.loop_sizes
    if op.prim in _YNN_REDUCE and math.prod(loops) >= _YNN_MIN_ELEMENTS:
        return True
    return any(loops[l] > 32 for l in op.dims.reduced_loops)


def _units(view: PlanningView) -> list[list[int]]:
    """Op indices grouped into top-level units, in program order.

    A scan appears in the planning view as boundary ops (aliases, per-layer slices, carries)
    around a run of body ops with a larger multiplicity; XLA runs it as one `while`
    instruction, so the whole run and its boundary is one unit.
    """
    ops = view.ops
    units: list[list[int]] = []
    i, n = 0, len(ops)
    while i < n:
        op = ops[i]
        if op.mult == 1 or op.prim == "input":
            units.append([i])
            i += 1
            continue
        j = i
        while j < n and ops[j].mult != 1:
            j += 1
        body = list(range(i, j))
        inside = {v for k in body for v in ops[k].outputs}
        # Leading boundary: aliases of loop constants and per-layer slices of stacked inputs.
        lead = []
        while units and len(units[-1]) == 1 and ops[units[-1][0]].prim in ("alias", "scan_slice"):
            lead.insert(0, units.pop()[0])
        tail = []
        while j < n and ops[j].mult == 1 and ops[j].prim in ("alias", "scan_stack") and \
                all(v in inside for v in ops[j].inputs):
            tail.append(j)
            j += 1
        units.append(lead + body + tail)
        i = j
    return units


def _list_schedule(unit_reads: list[list[int]], unit_defs: list[list[int]],
                   size: dict[int, float], never_freed: set[int],
                   scalar: list[bool]) -> list[int]:
    """XLA's ListScheduler on units: ready unit that frees most bytes net, scalars first.

    Priority = (bytes of operands this unit is the last reader of) - (bytes it defines),
    then its number of readers; among equals the most recently readied unit goes first.
    """
    n = len(unit_reads)
    producer_unit: dict[int, int] = {}
    for u, defs in enumerate(unit_defs):
        for b in defs:
            producer_unit[b] = u
    readers: dict[int, set[int]] = {}
    waiting = [0] * n  # unscheduled producers of the unit's operands
    for u, reads in enumerate(unit_reads):
        for b in reads:
            readers.setdefault(b, set()).add(u)
            if b in producer_unit and producer_unit[b] != u:
                waiting[u] += 1
    remaining = {b: len(r) for b, r in readers.items()}
    n_readers = [sum(len(readers.get(b, ())) for b in defs) for defs in unit_defs]
    defined = [sum(size[b] for b in defs) for defs in unit_defs]
    big = float("inf")

    def priority(u: int) -> tuple[float, int]:
        if scalar[u]:
            return (big, big)
        freed = sum(size[b] for b in unit_reads[u]
                    if b not in never_freed and remaining.get(b, 0) == 1)
        return (freed - defined[u], n_readers[u])

    heap: list = []
    counter = 0
    version = [0] * n
    ready = [False] * n

    def push(u: int):
        nonlocal counter
        counter += 1
        p = priority(u)
        heapq.heappush(heap, (-p[0], -p[1], -counter, u, version[u]))

    for u in range(n):
        if waiting[u] == 0:
            ready[u] = True
            push(u)
    order: list[int] = []
    done = [False] * n
    while heap:
        _, _, _, u, ver = heapq.heappop(heap)
        if done[u] or ver != version[u]:
            continue
        done[u] = True
        order.append(u)
        for b in set(unit_reads[u]):
            if b in remaining:
                remaining[b] -= 1
                if remaining[b] == 1:
                    for w in readers[b]:
                        if not done[w] and ready[w]:
                            version[w] += 1
                            push(w)
        for b in unit_defs[u]:
            for w in readers.get(b, ()):
                if w != u and not done[w]:
                    waiting[w] -= 1
                    if waiting[w] == 0:
                        ready[w] = True
                        push(w)
    if len(order) != n:  # a cycle cannot happen in a dataflow graph; keep program order
        return list(range(n))
    return order


def _basics(view: PlanningView):
    """(arguments, result pins, consumers, results, stored values), memoised on the view."""
    if "basics" in view.memo:
        return view.memo["basics"]
    ops, values = view.ops, view.values
    args: list[int] = []
    pins: dict[int, int] = {}
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        if op.kind == "input" and op.prim == "input":
            args += op.outputs
            for s in op.slots:
                pins.setdefault(s.value, op.outputs[0])
        for v in op.inputs:
            consumers.setdefault(v, []).append(i)
    arg_set = set(args)
    outputs = tuple(dict.fromkeys(v for v in view.outputs if not values[v].is_const))
    out_set = set(outputs)
    stored = _stored_values(view, consumers, out_set, arg_set)
    stored |= out_set - arg_set
    view.memo["basics"] = (args, pins, consumers, outputs, stored)
    return view.memo["basics"]


def materialised(view: PlanningView) -> frozenset[int]:
    """Values that live in device memory: arguments and stored results. The others are
    computed inside a fusion and never read from or written to memory."""
    if "materialised" not in view.memo:
        args, _, _, _, stored = _basics(view)
        view.memo["materialised"] = frozenset(stored) | frozenset(args)
    return view.memo["materialised"]


def liveness(view: PlanningView) -> Liveness:
    """Stored values and their live phases on the modelled schedule (plan-independent)."""
    ops, values = view.ops, view.values
    args, pins, consumers, outputs, stored = _basics(view)
    arg_set = set(args)
    out_set = set(outputs)
    stored = set(stored)

    # Which stored values (or arguments) each op reads once fusion is applied.
    src: dict[int, tuple[int, ...]] = {v: (v,) for v in args}
    reads_of_op: list[tuple[int, ...]] = []
    for op in ops:
        ins = op.inputs
        # Carries also read their initial value (copied into the loop state) and the
        # body's new value (written back each iteration).
        if op.prim == "carry":
            ins = ins + tuple(s.value for s in op.slots)
        if len(ins) == 1:
            reads = src.get(ins[0], ())  # already an ordered set
        elif len(ins) == 2:  # most ops: a binary op, whose operands often read the same
            first, second = src.get(ins[0], ()), src.get(ins[1], ())
            reads = first if not second or second == first else second if not first else \
                tuple(dict.fromkeys(first + second))
        else:
            # An ordered set: fused chains can read hundreds of buffers.
            reads = tuple(dict.fromkeys(chain.from_iterable([src.get(v, ()) for v in ins])))
        reads_of_op.append(reads)
        for v in op.outputs:
            if v in arg_set:
                continue
            src[v] = (v,) if v in stored else reads

    units = _units(view)
    # A unit reads what its ops read from outside it and defines the stored values that
    # its ops produce.
    unit_defs: list[list[int]] = []
    unit_reads: list[list[int]] = []
    for members in units:
        if len(members) == 1:  # an op reads nothing it defines itself
            k = members[0]
            unit_defs.append([v for v in ops[k].outputs if v in stored])
            unit_reads.append(list(reads_of_op[k]))
            continue
        defs = [v for k in members for v in ops[k].outputs if v in stored]
        ds = set(defs)
        outside = dict.fromkeys(b for k in members for b in reads_of_op[k] if b not in ds)
        unit_defs.append(defs)
        unit_reads.append(list(outside))
    size = {v: float(values[v].nbytes) for v in stored | arg_set}
    never = arg_set | out_set
    scalar = [bool(defs) and all(len(values[b].shape) == 0 for b in defs) for defs in unit_defs]
    # Fused-away ops have nothing to schedule.
    active = [u for u in range(len(units)) if unit_defs[u] or len(units[u]) > 1]
    sub_reads = [unit_reads[u] for u in active]
    sub_defs = [unit_defs[u] for u in active]
    order = _list_schedule(sub_reads, sub_defs, size, never, [scalar[u] for u in active])
    best = None
    # XLA keeps the schedule that needs less memory: the list schedule or program order.
    flat_reads = _flat_reads(reads_of_op)
    for cand in (order, list(range(len(active)))):
        live = _timeline(view, units, [active[u] for u in cand], reads_of_op, flat_reads,
                         stored, args, outputs, pins, consumers)
        peak = _curve_peak(live, np.array([size[v] for v in live.temps]))
        if best is None or peak < best[0]:
            best = (peak, live)
    return best[1]


def _flat_reads(reads_of_op) -> tuple[np.ndarray, np.ndarray]:
    """(reading op, buffer) per read, as arrays."""
    lens = np.fromiter(map(len, reads_of_op), dtype=np.int64, count=len(reads_of_op))
    return (np.repeat(np.arange(len(reads_of_op)), lens),
            np.fromiter(chain.from_iterable(reads_of_op), dtype=np.int64,
                        count=int(lens.sum())))


def _last_reads(reads: tuple[np.ndarray, np.ndarray], slot, loop_of, loops, start: dict,
                end: dict) -> None:
    """Extend `end` to each stored value's last read, in arrays (a deep model has a few
    hundred thousand reads: fused chains read every buffer they start from).

    A read from inside a loop of a value made outside it keeps the value to the loop's
    end (every iteration reads it)."""
    read_op, buf = reads
    if not len(buf) or not start:
        return
    made = np.fromiter(start, dtype=np.int64, count=len(start))
    first_phase = np.full(int(max(made.max(), buf.max())) + 1, -1, dtype=np.int64)
    first_phase[made] = np.fromiter(start.values(), dtype=np.int64, count=len(start))
    s = np.asarray(slot, dtype=np.int64)[read_op]
    st = first_phase[buf]
    keep = (s >= 0) & (st >= 0)  # scheduled readers of stored values (not arguments)
    s, st, buf = s[keep], st[keep], buf[keep]
    lp = np.asarray(loop_of, dtype=np.int64)[read_op[keep]]
    if loops and (lp >= 0).any():
        span = np.asarray(loops, dtype=np.int64)
        inside = lp >= 0
        lo, hi = span[lp[inside], 0], span[lp[inside], 1]
        outside = ~((2 * lo + 1 <= st[inside]) & (st[inside] <= 2 * hi + 1))
        s[inside] = np.where(outside, hi, s[inside])
    last = np.full(len(first_phase), -1, dtype=np.int64)
    last[made] = np.fromiter((end[v] for v in start), dtype=np.int64, count=len(start))
    np.maximum.at(last, buf, 2 * s + 1)
    end.update(zip(start, last[made].tolist()))


def _timeline(view, units, order, reads_of_op, flat_reads, stored, args, outputs, pins,
              consumers) -> Liveness:
    """Phases for the units in `order`; each stored value live from definition to last read.

    Unit slot s has two phases: 2s, when its inputs are read (and a collective's input or
    a pre-reshard copy exists), and 2s+1, when its results are written. A value lives from
    the write phase of its producer to the write phase of its last reader (an op reads its
    inputs while it writes), or to the read phase when that reader is an element-wise
    fusion that writes its result over it (XLA shares an operand buffer with its user).
    """
    ops, values = view.ops, view.values
    n_ops = len(ops)
    arg_set, out_set = set(args), set(outputs)
    # Python lists while building (numpy element access from Python loops is slow);
    # arrays in the result.
    slot = [-1] * n_ops
    loop_of = [-1] * n_ops  # index into `loops`
    loops: list[tuple[int, int]] = []  # (first slot, last slot)
    state: set[int] = set()  # loop state: carries and stacked outputs
    t = 0
    for u in order:
        members = units[u]
        if len(members) == 1:
            slot[members[0]] = t
            t += 1
            continue
        body = [k for k in members if ops[k].mult != 1 or ops[k].prim == "carry"]
        last_body = body[-1] if body else -1
        first = t
        for k in members:
            op = ops[k]
            if k > last_body and op.prim in ("alias", "scan_stack"):
                continue
            if op.prim == "carry" or k not in body:
                slot[k] = first
                if op.prim == "carry":
                    state.update(op.outputs)
            elif any(v in stored for v in op.outputs):
                slot[k] = t
                t += 1
        last = max(t - 1, first)
        made_at = {v: int(slot[k]) for k in members if slot[k] >= 0 for v in ops[k].outputs}
        for k in members:
            op = ops[k]
            if k > last_body and op.prim in ("alias", "scan_stack"):
                # Each iteration writes its layer into the stacked result as soon as the
                # value exists (an in-place update fused with its producer).
                slot[k] = max([made_at.get(b, first) for b in reads_of_op[k]], default=last)
                state.update(op.outputs)
            loop_of[k] = len(loops)
        loops.append((first, last))
        t = last + 1
    n_slots = max(t, 1)
    # Fused ops run inside the fusions that read them: first and last of those.
    first_slot = list(slot)
    last_slot = list(slot)
    for k in range(n_ops - 1, -1, -1):
        if slot[k] >= 0:
            continue
        lo, hi = n_slots, -1
        for v in ops[k].outputs:
            for c in consumers.get(v, ()):
                f = first_slot[c]
                if f >= 0:  # (comparisons, not min/max: a deep step has 100k of these)
                    if f < lo:
                        lo = f
                    if last_slot[c] > hi:
                        hi = last_slot[c]
        if hi >= 0:
            first_slot[k], last_slot[k] = lo, hi
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    scheduled = [k for k in range(n_ops) if slot[k] >= 0]
    for k in scheduled:
        s = slot[k]
        lp = loop_of[k]
        for v in ops[k].outputs:
            if v in stored and v not in arg_set:
                s0 = loops[lp][0] if v in state else s
                start[v] = 2 * s0 + 1
                end[v] = max(end.get(v, -1), 2 * (loops[lp][1] if v in state else s) + 1)
    _last_reads(flat_reads, slot, loop_of, loops, start, end)
    # Element-wise fusions write over an operand of the same shape that dies with them.
    for k in scheduled:
        s = slot[k]
        op = ops[k]
        if loop_of[k] >= 0 or op.prim not in _FUSIBLE or op.kind != "op":
            continue
        for v in op.outputs:
            if v not in stored or v in out_set:
                continue
            for b in reads_of_op[k]:
                if (b in start and b not in out_set and b not in state
                        and end[b] == 2 * s + 1 and values[b].shape == values[v].shape
                        and values[b].dtype == values[v].dtype):
                    end[b] = 2 * s
                    break
    temps = sorted(start, key=start.__getitem__)
    last_phase = 2 * n_slots - 1
    st = np.array([start[v] for v in temps], dtype=np.int64)
    en = np.array([last_phase if v in out_set else end[v] for v in temps], dtype=np.int64)
    is_out = np.array([v in out_set for v in temps], dtype=bool)
    pin = np.array([pins.get(v, -1) for v in temps], dtype=np.int64)
    in_loops = [k for k in range(n_ops) if loop_of[k] >= 0] if loops else []
    value_loop = {v: loop_of[k] for k in in_loops for v in ops[k].outputs}
    loop_view = {ops[k].outputs[0]: (ops[k].inputs[0], ops[k].prim == "scan_slice")
                 for k in in_loops if ops[k].prim in ("scan_slice", "alias")
                 and ops[k].inputs and ops[k].outputs
                 and not values[ops[k].inputs[0]].is_const}
    return Liveness(tuple(temps), st, en, tuple(args), tuple(outputs), is_out, pin,
                    2 * n_slots, np.array(first_slot, dtype=np.int64),
                    np.array(last_slot, dtype=np.int64), np.array(loop_of, dtype=np.int64),
                    tuple(loops), value_loop, loop_view)


# ----------------------------------------------------------------------------------------
# 3. Sizes under a plan, and buffer assignment.


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


def _sizes(view, live: Liveness, layout_of, mesh_shape) -> np.ndarray:
    """Bytes per device of each timeline entry; a pinned result in its input's layout."""
    out = np.empty(len(live.temps))
    pins = live.pin.tolist() if len(live.pin) else [-1] * len(live.temps)
    for i, v in enumerate(live.temps):
        p = pins[i]
        lay = layout_of.get(p) if p >= 0 else None
        out[i] = _bytes(view, v, lay if lay is not None else layout_of[v], mesh_shape)
    return out


def memory(view: PlanningView, live: Liveness, layout_of: dict[int, Layout], mesh_shape,
           aliased: frozenset[int] = frozenset(),
           op_layouts: dict[int, tuple[tuple[Layout, ...], tuple[Layout, ...]]] | None = None,
           reduce_scatter: bool = False, ynn: bool = False,
           visit: np.ndarray | None = None) -> MemoryBreakdown:
    """Per-device memory under the chosen layouts; `aliased` results reuse donated buffers.

    With `op_layouts` (op id -> (input layouts, output layouts)), the buffers the plan's
    collectives add are counted too: a partial-sum result before its all-reduce, the
    all-reduced result in full when a reduce-scatter is lowered to all-reduce + slice
    (`reduce_scatter` False, as on XLA:CPU), and each value gathered or moved to another
    layout (once per value and layout, from its first to its last reader there). With
    `ynn` (XLA:CPU), the broadcasts that YNNPACK reductions read as buffers are counted
    too (see `_ynn_broadcasts`). `visit` (from `plan_visits`, for layouts that `assign`
    spread from class strategies): per scheduled op, whether its collectives can add a
    buffer; the others are not looked at.
    """
    arg = sum(_bytes(view, v, layout_of[v], mesh_shape) for v in live.args)
    sizes = _sizes(view, live, layout_of, mesh_shape)
    is_out = live.is_out if len(live.is_out) else np.zeros(len(sizes), bool)
    is_alias = np.array([v in aliased for v in live.temps], dtype=bool)
    # The results tuple holds one pointer per result, in the output allocation.
    table = _TUPLE_POINTER_BYTES * len(live.outputs) if len(live.outputs) > 1 else 0
    out = float(sizes[is_out].sum()) + table
    alias = float(sizes[is_out & is_alias].sum())
    ex_size: list[float] = []
    ex_start: list[int] = []
    ex_end: list[int] = []
    # A result computed in another layout than its pinned one is first stored as computed,
    # then moved into its own buffer.
    if len(live.pin):
        for i in np.flatnonzero(is_out & (live.pin >= 0)):
            v = live.temps[i]
            pinned = layout_of.get(int(live.pin[i]))
            if pinned is not None and layout_of[v] != pinned:
                ex_size.append(_bytes(view, v, layout_of[v], mesh_shape))
                ex_start.append(int(live.start[i]) - 1)
                ex_end.append(int(live.start[i]) - 1)
    if op_layouts is not None and len(live.op_first):
        _collective_buffers(view, live, layout_of, mesh_shape, op_layouts, reduce_scatter,
                            sizes, ex_size, ex_start, ex_end, visit)
    if ynn and len(live.op_first):
        _ynn_broadcast_buffers(view, live, layout_of, mesh_shape, ex_size, ex_start, ex_end)
    temp_mask = ~is_out
    t_sizes = np.concatenate([sizes[temp_mask], ex_size])
    t_start = np.concatenate([live.start[temp_mask], ex_start]).astype(np.int64)
    t_end = np.concatenate([live.end[temp_mask], ex_end]).astype(np.int64)
    own = is_out & ~is_alias  # results in allocations of their own
    heap = _assign(t_sizes, t_start, t_end, sizes[own], live.start[own])
    return MemoryBreakdown(arg, out, heap, alias)


def _ynn_broadcasts(view: PlanningView, live: Liveness) -> list[tuple]:
    """Implicit broadcasts a YNNPACK reduction may read as a buffer; memoised.

    An element-wise op whose operand has fewer elements than its result (a (B, S, 1)
    statistic times a (B, S, H) activation) broadcasts it; XLA makes one broadcast of each
    (operand, shape) for all its readers. When one reader's result goes, through ops a
    ynn fusion takes in and that have no other reader, into a float reduction, and the
    broadcast has other readers too, it is a buffer. Returns (broadcast number, operand, a
    reader's result (its shape and layout), the reduction's operand, first slot, last
    slot) per such broadcast and reduction; whether the reduction is big enough for
    YNNPACK depends on the layouts (see `_ynn_broadcast_buffers`).
    """
    def make():
        ops, values = view.ops, view.values
        _, _, consumers, _, stored = _basics(view)
        first, last = live.op_first.tolist(), live.op_last.tolist()

        def reduction_fed(v: int) -> int | None:
            # Follow single-reader ops a ynn fusion takes in, to a float reduction.
            for _ in range(len(ops)):
                readers = consumers.get(v, ())
                if len(readers) != 1 or v in stored:
                    return None
                op = ops[readers[0]]
                if op.kind != "op":
                    return None
                if op.prim in _YNN_REDUCE:
                    ok = np.dtype(values[op.inputs[0]].dtype).name in _YNN_REDUCE_TYPES
                    return readers[0] if ok else None
                if op.prim not in _YNN_ELEMENTWISE or len(op.outputs) != 1 or \
                        np.dtype(values[op.outputs[0]].dtype).name not in _YNN_ELEMENT_TYPES:
                    return None
                v = op.outputs[0]
            return None

        loop_of = live.op_loop.tolist() if len(live.op_loop) else [-1] * len(ops)
        # Per (operand, shape, loop): each loop body is a computation of its own, with its
        # own broadcasts.
        uses: dict[tuple, list[tuple[int, int | None]]] = {}
        for k, op in enumerate(ops):
            if op.kind != "op" or op.prim not in _YNN_ELEMENTWISE or len(op.outputs) != 1 \
                    or first[k] < 0:
                continue
            shape = values[op.outputs[0]].shape
            for u in dict.fromkeys(op.inputs):
                s = values[u].shape
                if values[u].is_const or len(s) != len(shape) or s == shape or \
                        math.prod(s) >= math.prod(shape):
                    continue
                uses.setdefault((u, shape, loop_of[k]), []).append(
                    (k, reduction_fed(op.outputs[0])))
        found = []
        for b, ((u, _, _), readers) in enumerate(uses.items()):
            if len(readers) < 2:
                continue  # a lone reader takes the broadcast into its own fusion
            s0 = min(first[k] for k, _ in readers)
            for k, r in readers:
                if r is not None:
                    found.append((b, u, ops[k].outputs[0], ops[r].inputs[0], s0, last[k]))
        return found
    return memo_of(view.memo, "ynn broadcasts", live, make)


def _ynn_broadcast_buffers(view, live, layout_of, mesh_shape, ex_size, ex_start,
                           ex_end) -> None:
    """Add the broadcasts YNNPACK reductions read as buffers (XLA:CPU) to the extra lists:
    one per broadcast, live from its first reader to its last reduction reader."""
    spans: dict[tuple, list] = {}
    for b, u, w, red, s0, s1 in _ynn_broadcasts(view, live):
        lay_r, lay_w = layout_of.get(red), layout_of.get(w)
        if lay_r is None or lay_w is None:
            continue
        if math.prod(view.values[red].shape) / shards(lay_r, mesh_shape) < _YNN_MIN_ELEMENTS:
            continue  # a small reduction stays an XLA loop fusion that computes it inline
        if shards(lay_w, mesh_shape) > 1:
            # Seen only for a broadcast whose result is whole on every device (tp=8): with
            # the batch split (dp=2 x tp=4, dp=4 x tp=2) XLA gives each ynn fusion a
            # broadcast of its own, taken in.
            continue
        key = (b, lay_w)
        ratio = np.dtype(view.values[u].dtype).itemsize / np.dtype(view.values[w].dtype).itemsize
        nbytes = _bytes(view, w, lay_w, mesh_shape) * ratio
        rec = spans.setdefault(key, [nbytes, s0, s1])
        rec[1], rec[2] = min(rec[1], s0), max(rec[2], s1)
    for nbytes, s0, s1 in spans.values():
        ex_size.append(nbytes)
        ex_start.append(2 * s0)
        ex_end.append(2 * s1 + 1)


def _partial_axes(op, ins) -> set[int]:
    """Mesh axes over which `op`'s result holds partial sums (a split reduced loop)."""
    dims = op.dims
    red = dims.reduced_loops
    if not red:
        return set()
    axes: set[int] = set()
    for arr, lay in zip(dims.operands, ins):
        if arr is None:
            continue
        for loops, split in zip(arr, lay):
            if split and loops and loops[0] in red:
                axes.update(split)
    return axes


def _collective_buffers(view, live, layout_of, mesh_shape, op_layouts, reduce_scatter,
                        sizes, ex_size, ex_start, ex_end, visit=None) -> None:
    """Add the buffers of the plan's collectives to `sizes` and the extra lists (looking
    only at the scheduled ops `visit` marks, when given)."""
    index = {v: i for i, v in enumerate(live.temps)}
    moved: dict[tuple[int, Layout], list] = {}
    # Lists: numpy element access from this per-op loop is several times slower.
    op_first, op_last, op_loop = (live.op_first.tolist(), live.op_last.tolist(),
                                  live.op_loop.tolist())
    scheduled = _scheduled_ops(view, live)
    if visit is not None:
        scheduled = [scheduled[s] for s in np.flatnonzero(visit).tolist()]
    for k, op, reduces, operands in scheduled:
        lays = op_layouts.get(op.id)
        if lays is None:
            continue
        ins, outs = lays
        s0, s1 = op_first[k], op_last[k]
        if reduces:
            partial = _partial_axes(op, ins)
            if partial:
                for v, lay in zip(op.outputs, outs):
                    scattered = [mesh_shape[a] for d in lay for a in d if a in partial]
                    pre = _bytes(view, v, lay, mesh_shape) * math.prod(scattered)
                    ex_size.append(pre)
                    ex_start.append(2 * s0)
                    ex_end.append(2 * s0 + 1)
                    i = index.get(v)
                    if not reduce_scatter and i is not None and not live.is_out[i]:
                        sizes[i] = max(sizes[i], pre)
        for i, u in operands:
            if i >= len(ins):
                break
            want = ins[i]
            have = layout_of.get(u)
            if have is None or have == want:
                continue
            comms = reshard(view.values[u].nbytes, have, want, mesh_shape)
            if not comms:
                continue  # a local slice: fused into the reader
            r0, r1 = s0, s1
            lp = op_loop[k]
            # XLA moves a parameter read by a loop as a whole, before the loop (the
            # per-layer slice of a stacked array takes the stacked array's layout): one
            # copy for all the loops that read it in that layout.
            hoisted = _hoist(live, u, want, lp)
            if hoisted is not None:
                u, want, (r0, r1) = hoisted[0], hoisted[1], (min(r0, hoisted[2]),
                                                            max(r1, hoisted[3]))
                lp = -1
            if lp >= 0 and live.value_loop.get(u, -1) != lp:
                # Moved once before the loop, read by every iteration.
                r0, r1 = min(r0, live.loop_span[lp][0]), max(r1, live.loop_span[lp][1])
            # XLA:CPU produces the target layout directly only with one all-gather along
            # the major dim; otherwise (a minor dim gathered, an all-to-all, a chain of
            # collectives) the collective's result is relaid out by a copy, so two buffers
            # exist at the first reader and none can be overwritten by the reader.
            direct = len(comms) == 1 and comms[0].kind == "all-gather" and \
                _major_gather(view.values[u].shape, have, want, mesh_shape)
            fusible = op.prim in _FUSIBLE
            shares = direct and fusible and any(
                view.values[v].shape == view.values[u].shape for v in op.outputs)
            if not direct and not fusible:
                ex_size.append(max(c.nbytes for c in comms))
                ex_start.append(2 * s0)
                ex_end.append(2 * s0 + 1)
            rec = moved.get((u, want))
            if rec is None:
                moved[(u, want)] = [_bytes(view, u, want, mesh_shape), r0, r1, shares]
            else:
                rec[1] = min(rec[1], r0)
                if r1 > rec[2]:
                    rec[2], rec[3] = r1, shares
                elif r1 == rec[2]:
                    rec[3] = rec[3] and shares
    for nbytes, s0, s1, shares in moved.values():
        ex_size.append(nbytes)
        ex_start.append(2 * s0)
        ex_end.append(2 * s1 + (0 if shares else 1))


def _scheduled_ops(view, live: Liveness) -> list[tuple[int, object, bool, tuple]]:
    """(index, op, whether it reduces a loop, its non-constant operands as (position,
    value)) of every scheduled op, the ones whose layouts can add buffers; memoised."""
    def make():
        first = live.op_first.tolist()
        values = view.values
        return [(k, op, bool(op.dims is not None and op.dims.reduced_loops),
                 tuple((i, u) for i, u in enumerate(op.inputs) if not values[u].is_const))
                for k, op in enumerate(view.ops) if first[k] >= 0 and op.kind == "op"]
    return memo_of(view.memo, "scheduled ops", live, make)


def plan_visits(grouping, view, live: Liveness, strategy) -> np.ndarray:
    """Per scheduled op (`_scheduled_ops`), whether its collectives can add a buffer under
    a plan that gives every group its class's strategy (`strategy`: class -> the chosen
    one), as `assign` spreads it: an op that reduces a loop (a partial sum), or one that
    reads another group's value in another layout than its producer's. An op whose
    operands all arrive as it reads them adds nothing, and at 96 layers that is all but a
    few thousand of ~50k."""
    reads = memo_of(grouping.memo, "scheduled reads", live,
                    lambda: _ScheduledReads(grouping, view, live))
    differs = np.array([strategy[c].produced[j] != strategy[oc].ops[m][0][i]
                        if i < len(strategy[oc].ops[m][0]) else False
                        for (c, j), (oc, m), i in reads.keys], dtype=bool)
    visit = reads.reduces.copy()
    visit[reads.pair_op[differs[reads.pair_key]]] = True
    return visit & reads.in_class


class _ScheduledReads:
    """The scheduled ops' reads of group-produced values, by where both layouts come from:
    keys (producer class, produced index), (reader class, member), operand position."""

    def __init__(self, grouping, view, live: Liveness):
        produced, member = grouping.strategy_positions
        scheduled = _scheduled_ops(view, live)
        self.reduces = np.array([r for _, _, r, _ in scheduled], dtype=bool)
        self.in_class = np.array([op.id in member for _, op, _, _ in scheduled], dtype=bool)
        key_of: dict[tuple, int] = {}
        pair_op, pair_key = [], []
        for s, (_, op, _, operands) in enumerate(scheduled):
            reader = member.get(op.id)
            if reader is None:
                continue
            for i, u in operands:
                src = produced.get(u)
                if src is not None:
                    pair_op.append(s)
                    pair_key.append(key_of.setdefault((src, reader, i), len(key_of)))
        self.keys = list(key_of)
        self.pair_op = np.array(pair_op, dtype=np.int64)
        self.pair_key = np.array(pair_key, dtype=np.int64)


def _major_gather(shape, have, want, mesh_shape) -> bool:
    """Whether every dim that loses tiles comes before any other dim of local size > 1."""
    local = [n // math.prod(mesh_shape[a] for a in lay) for n, lay in zip(shape, want)]
    for d, (h, w) in enumerate(zip(have, want)):
        if math.prod(mesh_shape[a] for a in h) > math.prod(mesh_shape[a] for a in w):
            if any(n > 1 for n in local[:d]):
                return False
    return True


def _hoist(live, u, want, lp):
    """(argument, its layout, first slot, last slot) when `u` is a loop's view of an argument."""
    r0, r1 = None, None
    while lp >= 0 and u in live.loop_view and live.value_loop.get(u, -1) == lp:
        outer, stacked = live.loop_view[u]
        if stacked:
            want = ((),) + want
        first, last = live.loop_span[lp]
        r0 = first if r0 is None else min(r0, first)
        r1 = last if r1 is None else max(r1, last)
        u = outer
        lp = live.value_loop.get(u, -1)
    if r0 is None or lp >= 0 or u not in live.arg_set:
        return None
    return u, want, r0, r1


def _assign(sizes, start, end, out_sizes, out_start) -> float:
    """XLA's buffer assignment, simplified: bytes of the temporary heap.

    Each result has an allocation of its own size; a temporary, largest first, reuses the
    first such allocation (by size, then by when its result is written) that is large
    enough and holds nothing over its life (the result itself is written at `out_start`).
    The rest share one heap whose size is the peak of their live bytes.
    """
    if not len(sizes):
        return 0.0
    order = np.lexsort((start, -sizes))
    n_slots = int(max(end.max(), out_start.max() if len(out_start) else 0)) + 1
    a_order = np.lexsort((out_start, out_sizes))
    a_sizes = out_sizes[a_order]
    allocations = _Allocations(a_sizes, out_start[a_order])
    # The first allocation large enough, per temporary (a_sizes is sorted).
    first_fit = np.searchsorted(a_sizes, sizes, side="left").tolist()
    first, last, size = start.tolist(), end.tolist(), sizes.tolist()
    n = len(a_sizes)
    heap = np.zeros(len(sizes), dtype=bool)
    for i in order.tolist():
        if size[i] <= 0:
            continue
        lo = first_fit[i]
        heap[i] = lo >= n or not allocations.reuse(first[i], last[i], lo)
    if not heap.any():
        return 0.0
    delta = np.zeros(n_slots + 1)
    np.add.at(delta, start[heap], sizes[heap])
    np.add.at(delta, end[heap] + 1, -sizes[heap])
    return float(np.cumsum(delta).max())


class _Allocations:
    """The results' allocations in first-fit order, the phases each is busy, and two skip
    structures that keep `reuse` from walking allocations one by one (a deep model has
    thousands, and a temporary that fits none, or only a late one, walked them all):

    - runs of one size, within which the result is written later and later: those free
      until after a phase b are a run's suffix, found by bisection;
    - blocks of `_BLOCK` allocations, each allocation represented by one of its busy
      intervals (its longest): when every allocation of a block has one and all of them
      meet [a, b], none can take a temporary live over [a, b] (nested activation
      lifetimes all meet each other).
    """

    def __init__(self, a_sizes: np.ndarray, free_until: np.ndarray):
        n = len(a_sizes)
        self.free_until = free_until.tolist()
        # Busy phases of each allocation: disjoint intervals sorted by start. (A bit mask
        # per allocation costs time in proportion to the phase number: slow for long steps.)
        self.busy_from: list[list[int]] = [[] for _ in range(n)]
        self.busy_to: list[list[int]] = [[] for _ in range(n)]
        # Run r is allocations bounds[r] to bounds[r + 1] - 1.
        self.bounds = [0] + (np.flatnonzero(np.diff(a_sizes)) + 1).tolist() + [n]
        self.run_of = np.repeat(np.arange(len(self.bounds) - 1), np.diff(self.bounds)).tolist()
        # Represented interval per allocation (empty: from > to) and, per block, the
        # latest start and earliest end among them, and how many are empty.
        self.rep_from, self.rep_to = [_NEVER] * n, [-_NEVER] * n
        n_blocks = (n + _BLOCK - 1) // _BLOCK
        self.block_from, self.block_to = [_NEVER] * n_blocks, [-_NEVER] * n_blocks
        self.block_empty = [min(_BLOCK, n - k * _BLOCK) for k in range(n_blocks)]

    def reuse(self, a: int, b: int, lo: int) -> bool:
        """Put the temporary live over [a, b] in the first allocation from `lo` on that is
        free then (marked busy); False if there is none."""
        busy_from, busy_to = self.busy_from, self.busy_to
        block_from, block_to = self.block_from, self.block_to
        bounds = self.bounds
        for r in range(self.run_of[lo], len(bounds) - 1):
            end = bounds[r + 1]
            c = max(lo, bisect.bisect_right(self.free_until, b, bounds[r], end))
            while c < end:
                blk = c // _BLOCK
                stop = min(end, (blk + 1) * _BLOCK)
                if block_from[blk] <= b and block_to[blk] >= a:
                    c = stop  # every allocation of the block is busy during [a, b]
                    continue
                for c in range(c, stop):
                    k = bisect.bisect_right(busy_from[c], b)
                    if k == 0 or busy_to[c][k - 1] < a:  # no busy interval meets [a, b]
                        busy_from[c].insert(k, a)
                        busy_to[c].insert(k, b)
                        if b - a > self.rep_to[c] - self.rep_from[c]:
                            self._represent(c, a, b)
                        return True
                c = stop
        return False

    def _represent(self, c: int, a: int, b: int) -> None:
        """Represent allocation c by its busy interval [a, b] (its longest so far)."""
        blk = c // _BLOCK
        if self.rep_to[c] < self.rep_from[c]:
            self.block_empty[blk] -= 1
        self.rep_from[c], self.rep_to[c] = a, b
        if self.block_empty[blk]:
            return  # an empty allocation in the block: it is never skipped
        lo, hi = blk * _BLOCK, min(len(self.rep_from), (blk + 1) * _BLOCK)
        self.block_from[blk] = max(self.rep_from[lo:hi])
        self.block_to[blk] = min(self.rep_to[lo:hi])


def _curve(live: Liveness, sizes: np.ndarray) -> np.ndarray:
    """Live bytes per slot: temporaries live then, plus results already written."""
    n = max(live.n_phases, int(live.end.max()) + 1 if len(live.end) else 1) + 1
    delta = np.zeros(n)
    np.add.at(delta, live.start, sizes)
    np.add.at(delta, live.end + 1, -sizes)
    return np.cumsum(delta)[:-1]


def _curve_peak(live: Liveness, sizes: np.ndarray) -> float:
    return float(_curve(live, sizes).max()) if len(sizes) else 0.0


def peak_times(live: Liveness, sizes: np.ndarray, k: int) -> list[int]:
    """The k slots with the most live bytes (for the ILP's memory rows)."""
    if not len(sizes):
        return []
    curve = _curve(live, sizes)
    return [int(t) for t in np.argsort(-curve, kind="stable")[:k]]


def memory_rows(problem, live: Liveness, limit: float, times: list[int],
                aliased: frozenset[int]) -> tuple[MemoryRow, ...]:
    """Linear memory constraints at the given slots, one per slot.

    Each row is arguments + results written by then (in their pinned layout; those reusing
    a donated buffer excluded) + temporaries live then, all under the strategy each class
    takes.
    """
    mesh_shape = problem.mesh_shape
    # Per (class, produced index): 1 / shards under each strategy. A value's bytes per
    # device are its size times that, so a row sums sizes per (class, index) first and
    # multiplies once: linear in live values, not in values x strategies.
    inverse: dict[tuple[int, int], np.ndarray] = {}
    for c, strats in enumerate(problem.strategies):
        for pi in range(len(strats[0].produced) if strats else 0):
            inverse[c, pi] = np.array([1.0 / shards(st.produced[pi], mesh_shape)
                                       for st in strats])
    rows = []
    for t in times:
        total = _row_bytes(problem.grouping, problem.view, live, t, aliased)
        coef = [np.zeros(len(st)) for st in problem.strategies]
        for (c, pi), b in total.items():
            coef[c] += b * inverse[c, pi]
        rows.append(MemoryRow(tuple(coef), 0.0, limit))
    return tuple(rows)


def _row_bytes(grouping, view, live: Liveness, t: int,
               aliased: frozenset[int]) -> dict[tuple[int, int], float]:
    """Bytes a memory row at slot `t` sums per (class, produced index) whose layout they
    take. It does not depend on the mesh, so every candidate mesh with rows at `t` shares
    it (memoised on the grouping: a pass over the values live then, ~10k at 96 layers)."""
    per_live = memo_of(grouping.memo, "row bytes", live, dict)
    if (t, aliased) in per_live:
        return per_live[t, aliased]
    where = grouping.produced_where
    values = view.values
    total: dict[tuple[int, int], float] = {}

    def add(v: int, laid_out_as: int):
        key = where.get(laid_out_as)
        if key is not None:
            total[key] = total.get(key, 0.0) + float(values[v].nbytes)

    for v in live.args:
        add(v, v)
    for i in live.live_at(t):
        v = live.temps[i]
        if len(live.is_out) and live.is_out[i]:
            if v in aliased:
                continue
            p = int(live.pin[i])
            add(v, p if p >= 0 and p in where else v)
        else:
            add(v, v)
    per_live[t, aliased] = total
    return total
