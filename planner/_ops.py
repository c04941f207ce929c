"""The planning view of a Graph: one flat list of operations, regions unrolled into it.

A scan's body appears once, with its operations marked to run `trip_count` times; the
values crossing the region boundary are joined by small synthetic ops (an alias, a per-layer
slice of stacked weights, a stack of per-layer outputs), so one rule set plans bodies and
top level alike. A scan carry becomes an input-like leader whose layout is loop-invariant.
"""
from __future__ import annotations

import dataclasses
import functools

from meshplan.ir import DimMap, Graph, Node

LEADER_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated", "gather", "scatter-add"})


@dataclasses.dataclass(frozen=True)
class Slot:
    """A value an input-like leader must receive in its own layout (carry init / carry out)."""

    value: int
    mult: int


@dataclasses.dataclass(eq=False)
class POp:
    """One operation to plan. kind: "op" (has DimMap), "input" (layout is free), "opaque"."""

    id: int
    kind: str
    prim: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    dims: DimMap | None
    flops: float
    mult: int
    node: Node | None = None
    slots: tuple[Slot, ...] = ()
    role: str = "other"  # for inputs: param / opt_state / data / other / carry
    path: str = ""
    sig: tuple = ()


def _identity_map(rank: int) -> DimMap:
    ident = tuple((d,) for d in range(rank))
    return DimMap(tuple(range(rank)), (ident,), (ident,), None, 0)


def _slice_map(shape: tuple[int, ...]) -> DimMap:
    """Stacked [L, ...] -> one layer's [...]: the layer dim must not be split."""
    ident = tuple((d,) for d in range(1, len(shape)))
    return DimMap(shape, (((),) + ident,), (ident,), None, 0)


def _stack_map(shape: tuple[int, ...]) -> DimMap:
    """One layer's [...] -> stacked [L, ...]: the new layer dim is not split."""
    body = tuple((d,) for d in range(len(shape) - 1))
    return DimMap(shape[1:], (body,), (((),) + body,), None, 0)


@dataclasses.dataclass
class PlanningView:
    """Flat ops, all values (top level and bodies), and the top-level graph's outputs."""

    ops: list[POp]
    values: dict
    outputs: tuple[int, ...]
    # Plan-independent facts derived from the ops, computed once (see batch_dims).
    memo: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def producer(self) -> dict[int, POp]:
        return {v: op for op in self.ops for v in op.outputs}


def memo_of(memo: dict, name: str, of, make):
    """`make()`, kept in `memo` under (name, id(of)). The entry holds `of` too, so no other
    object can take its id while the entry lives."""
    key = (name, id(of))
    if key not in memo:
        memo[key] = (of, make())
    return memo[key][1]


def build_view(graph: Graph, pairs: dict[int, int] | None = None) -> PlanningView:
    """Flatten `graph` (and its scan/remat bodies) into planning ops.

    `pairs` maps an input value to the output that replaces it (updated parameters and
    optimizer state): the output is pinned to the input's layout, so the next step can
    take it as is, and a donated input's buffer can hold it.
    """
    pairs = pairs or {}
    ops: list[POp] = []
    values = dict(graph.values)
    counter = [0]

    def new_id() -> int:
        counter[0] += 1
        return counter[0] - 1

    # Nodes of equal `semantics` have equal primitive, parameters and operand and result
    # types, so equal signatures: made once per kind (repeated layers repeat them).
    by_kind: dict[int, tuple] = {}

    def sig_of(prim, node, ins, outs, extra=()):
        known = node is not None and node.semantics >= 0
        if known:
            base = by_kind.get(node.semantics)
            if base is not None:
                return base + (extra,)
        params = ()
        if node is not None and node.eqn is not None:
            params = tuple(sorted((k, _short(v)) for k, v in node.eqn.params.items()))
        # dtype objects hash and compare by value; str(dtype) costs a microsecond per call.
        base = (prim, tuple((values[v].shape, values[v].dtype, values[v].is_const)
                            for v in ins),
                tuple((values[v].shape, values[v].dtype) for v in outs), params)
        if known:
            by_kind[node.semantics] = base
        return base + (extra,)

    def add(kind, prim, ins, outs, dims, flops, mult, node=None, slots=(), role="other", path=""):
        ops.append(POp(new_id(), kind, prim, tuple(ins), tuple(outs), dims, flops, mult, node,
                       tuple(slots), role, path, sig_of(prim, node, ins, outs, (kind, role))))

    info = {i.value: i for i in graph.input_info}
    for v in graph.inputs:
        i = info.get(v)
        slots = (Slot(pairs[v], 1),) if v in pairs else ()
        add("input", "input", (), (v,), None, 0.0, 1, slots=slots,
            role=i.role if i else "other", path=i.path if i else "")

    def walk(g: Graph, mult: int):
        for n in g.nodes:
            if n.primitive == "scan":
                _scan(n, mult)
            elif n.primitive in ("remat2", "checkpoint", "remat"):
                _remat(n, mult)
            elif n.is_region or n.dims is None:
                flops = sum(b.flops for b in n.bodies) * n.trip_count if n.is_region else 0.0
                add("opaque", n.primitive, n.inputs, n.outputs, None, flops, mult, n)
            else:
                add("op", n.primitive, n.inputs, n.outputs, n.dims, n.flops, mult, n)

    def _remat(n: Node, mult: int):
        body = n.bodies[0]
        values.update(body.values)
        for outer, inner in zip(n.inputs, body.inputs):
            add("op", "alias", (outer,), (inner,), _identity_map(len(values[outer].shape)),
                0.0, mult)
        walk(body, mult)
        for inner, outer in zip(body.outputs, n.outputs):
            add("op", "alias", (inner,), (outer,), _identity_map(len(values[outer].shape)),
                0.0, mult)

    def _scan(n: Node, mult: int):
        body = n.bodies[0]
        values.update(body.values)
        p = n.eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        trip = n.trip_count
        consts, carries, xs = (n.inputs[:nc], n.inputs[nc:nc + nk], n.inputs[nc + nk:])
        b_consts, b_carry, b_xs = (body.inputs[:nc], body.inputs[nc:nc + nk],
                                   body.inputs[nc + nk:])
        for outer, inner in zip(consts, b_consts):
            add("op", "alias", (outer,), (inner,), _identity_map(len(values[outer].shape)),
                0.0, mult)
        for outer, inner in zip(xs, b_xs):
            add("op", "scan_slice", (outer,), (inner,), _slice_map(values[outer].shape),
                0.0, mult)
        b_carry_out = body.outputs[:nk]
        for init, inner, out in zip(carries, b_carry, b_carry_out):
            add("input", "carry", (), (inner,), None, 0.0, mult * trip,
                slots=(Slot(init, mult), Slot(out, mult * trip)), role="carry")
        walk(body, mult * trip)
        for inner, outer in zip(b_carry, n.outputs[:nk]):
            add("op", "alias", (inner,), (outer,), _identity_map(len(values[outer].shape)),
                0.0, mult)
        for inner, outer in zip(body.outputs[nk:], n.outputs[nk:]):
            add("op", "scan_stack", (inner,), (outer,), _stack_map(values[outer].shape),
                0.0, mult)

    walk(graph, 1)
    return PlanningView(ops, values, graph.outputs)


def _short(v) -> str:
    """A bounded, structure-only rendering of an equation parameter for signatures."""
    if hasattr(v, "jaxpr") or type(v).__name__ in ("Jaxpr", "ClosedJaxpr"):
        return "<jaxpr>"
    try:
        return _short_hashable(v)
    except TypeError:  # unhashable parameter values are rare: render them each time
        s = repr(v)
        return s if len(s) < 200 else s[:200]


@functools.lru_cache(maxsize=4096)
def _short_hashable(v) -> str:
    # Repeated layers repeat the same parameter values: render each once.
    s = repr(v)
    return s if len(s) < 200 else s[:200]


def batch_dims(view: PlanningView) -> tuple[dict[int, frozenset[int]], dict[int, frozenset[int]]]:
    """Where the data's batch flows: (value -> its batch dims, op -> its batch loop dims).

    The batch starts as dim 0 of every "data" input and follows each op's DimMap: a loop
    walked by a batch dim is a batch loop, and an output dim walking a batch loop is a batch
    dim. A reduced batch loop is a weight gradient's sum over the batch. Pinning tensor
    parallelism means its axis splits none of these (it would otherwise be data parallelism
    under another name).
    """
    if "batch_dims" not in view.memo:  # asked once per candidate mesh; the same each time
        view.memo["batch_dims"] = _batch_dims(view)
    return view.memo["batch_dims"]


def batch_free(view: PlanningView, v: int) -> bool:
    """Whether value `v` keeps its size when the batch shrinks: no batch dim by data flow,
    and no leading dim of the batch's size (a mask broadcast to the batch has one)."""
    if batch_dims(view)[0].get(v):
        return False
    if "batch" not in view.memo:
        data = [op for op in view.ops if op.kind == "input" and op.role == "data"]
        shapes = [view.values[op.outputs[0]].shape for op in data]
        view.memo["batch"] = next((s[0] for s in shapes if s), None)
    shape = view.values[v].shape
    return not (shape and view.memo["batch"] is not None and shape[0] == view.memo["batch"])


def _batch_dims(view: PlanningView):
    vdims: dict[int, frozenset[int]] = {}
    loops: dict[int, frozenset[int]] = {}
    for op in view.ops:
        if op.kind == "input":
            v = op.outputs[0]
            if op.role == "data" and view.values[v].shape:
                vdims[v] = frozenset({0})
            elif op.role == "carry" and op.slots:
                vdims[v] = vdims.get(op.slots[0].value, frozenset())
            continue
        if op.dims is None:
            continue
        found = set()
        for arr, v in zip(op.dims.operands, op.inputs):
            if arr is None:
                continue
            for d in vdims.get(v, ()):
                if d < len(arr) and arr[d]:
                    found.add(arr[d][0])
        loops[op.id] = frozenset(found)
        for arr, v in zip(op.dims.outputs, op.outputs):
            dims = frozenset(d for d, g in enumerate(arr) if any(l in found for l in g))
            if dims:
                vdims[v] = dims
    return vdims, loops
