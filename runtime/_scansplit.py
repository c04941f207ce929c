"""Cut the scan over a model's stacked blocks into one scan per pipeline stage.

A scanned model (`lax.scan` or `nnx.scan` over stacked block weights) runs all its blocks
as one scan in the forward pass and one reversed scan in the backward pass. A pipeline
stage holds a contiguous range of blocks, so the pipelined executor needs each of those
scans cut at the stage boundaries:

* the scan over blocks [0, L) becomes scans over [a_k, b_k), one per stage, chained by
  their carry (the activations forward, their cotangent backward, where the reversed scan
  runs the last stage's blocks first);
* a stacked input of the scan (block weights, the forward pass's saved residuals) is read
  as its slice [a_k, b_k); the step's own stacked weights are sliced where they are
  placed, so a stage holds its own blocks' weights only; a residual stacked by stage k's
  forward scan and read by its backward scan is handed over as that piece, never whole;
* a stacked output read whole elsewhere (by an update op that is not elementwise, or
  returned from a pass per microbatch) is concatenated from its pieces where it is read.

The optimizer's update of the stacked weights is elementwise (Adam, SGD, their decays and
schedules), so each stage updates its own rows, and the updated stacked weights are
assembled from the stages' rows once per step. A sum, max or min of a stacked array (a
gradient norm over all layers, for clipping) runs on each stage's rows too: a reduction
that keeps the row dimension gives rows; one over it gives a partial result per stage,
combined (added, or the larger / smaller taken) on the stage of the first block, so only
the reduced values move; a scalar broadcast to the stacked shape (optax's zero imaginary
parts) is made by each stage for its rows. Any other update op reads the whole stack,
joined on the stage of the first block. Every piece runs the scan's own body, so results
equal the uncut scan (a sum's partial results are added in another order: equal up to
rounding).

>>> ranges = block_ranges([(0, 2), (2, 4), (4, 6)], num_blocks=4)  # pre+1 block, 2, 1+post
>>> ranges
((0, 1), (1, 3), (3, 4))
"""
from __future__ import annotations

import dataclasses
import itertools

import jax

from meshplan.ir import Graph, Node, Value
from meshplan.ir._dims import ELEMENTWISE

__all__ = ["SplitStep", "block_ranges", "split_block_scans"]

# A reduction over the stacked rows, cut per stage: how the stages' partial results combine.
_COMBINE = {"reduce_sum": jax.lax.add, "reduce_max": jax.lax.max, "reduce_min": jax.lax.min}

SPREAD = -1  # planner._layers.SPREAD: a label spread over every block of the scan


@dataclasses.dataclass(frozen=True)
class SplitStep:
    """The step's graph with its block scans cut per stage.

    graph: the new graph (same inputs and outputs); labels: node id -> (pass, layer) with
    no SPREAD left; origin: a piece's value id -> the stacked value it is a slice of;
    input_slices: pieces of the step's stacked weights and optimizer state, which no node
    computes: the executor places each stage's slice on that stage alone; output_pieces:
    results (the updated stacked weights) that the executor assembles from their pieces.
    """

    graph: Graph
    labels: dict[int, tuple[str, int]]
    origin: dict[int, int]
    input_slices: dict[int, tuple[int, int, int]]  # piece -> (step input, first, last + 1)
    output_pieces: dict[int, tuple[int, ...]]  # step output -> its pieces, stage by stage


def block_ranges(stage_layers, num_blocks: int) -> tuple[tuple[int, int], ...]:
    """Scan iterations [a, b) of each stage's blocks, for stages holding any block.

    Pipeline layer 0 is the embedding, 1..L the blocks (scan iterations 0..L-1), L + 1
    the head.
    """
    out = []
    for lo, hi in stage_layers:
        a, b = max(lo, 1) - 1, min(hi, num_blocks + 1) - 1
        if b > a:
            out.append((a, b))
    return tuple(out)


def split_block_scans(graph: Graph, labels: dict[int, tuple[str, int]],
                      scan_pass: dict[int, str], stage_layers,
                      num_blocks: int) -> SplitStep:
    """Cut every scan of `num_blocks` iterations in `scan_pass` (scan node id -> "forward"
    or "backward") at the stage boundaries of `stage_layers` (each stage's (first, last+1)
    pipeline layers). Labels of the step's other nodes are kept; SPREAD ones (the stacked
    weights' update) go to the stage of the first block."""
    ranges = block_ranges(stage_layers, num_blocks)
    if not ranges:
        raise ValueError(f"no stage of {list(stage_layers)} holds a block of the "
                         f"{num_blocks}-block scan; plan again.")
    return _Splitter(graph, labels, scan_pass, ranges).run()


class _Splitter:
    """One pass over the graph's nodes, emitting each block scan as its pieces."""

    def __init__(self, graph, labels, scan_pass, ranges):
        self.g, self.ranges = graph, ranges
        self.scan_pass = {k: v for k, v in scan_pass.items()}
        self.values = dict(graph.values)
        self.labels = {k: v for k, v in labels.items()}
        self.origin: dict[int, int] = {}
        self.input_slices: dict[int, tuple[int, int, int]] = {}
        self.state_inputs = {i.value for i in graph.input_info if i.role != "data"}
        self.pieces: dict[int, tuple[int, ...]] = {}  # stacked value -> its per-range pieces
        self.slices: dict[tuple[int, int, str], int] = {}
        self.nodes: list[Node] = []
        self._ids = itertools.count(max(itertools.chain(
            self.values, (n.id for n, _ in graph.walk()))) + 1)
        self.first_layer = ranges[0][0] + 1
        self.readers = graph.consumers()
        length = ranges[-1][1]
        self.cut = {n.id for n in graph.nodes if n.id in scan_pass and
                    n.eqn.params["length"] == length}
        self.rowwise = {n.id for n in graph.nodes if self._rowwise(n, length)}
        self.reductions = {n.id for n in graph.nodes if self._stacked_reduction(n, length)}
        self.fills = {n.id for n in graph.nodes if self._stacked_fill(n, length)}
        self.output_pieces: dict[int, tuple[int, ...]] = {}

    def run(self) -> SplitStep:
        for node in self.g.nodes:
            if node.id in self.cut:
                self._split(node)
            elif node.id in self.rowwise:
                self._split_rowwise(node)
            elif node.id in self.reductions:
                self._split_reduction(node)
            elif node.id in self.fills:
                self._split_fill(node)
            else:
                self.nodes.append(node)
        labels = {k: (kind, self.first_layer if layer == SPREAD else layer)
                  for k, (kind, layer) in self.labels.items()}
        _feed_forward(self.nodes, labels)
        graph = dataclasses.replace(self.g, values=self.values, nodes=self.nodes)
        return SplitStep(graph, labels, self.origin, self.input_slices, self.output_pieces)

    def _stack_update(self, node: Node) -> bool:
        """Whether the node is part of the stacked weights' update (once per step, spread
        over every block)."""
        return self.labels.get(node.id) == ("step", SPREAD)

    def _rowwise(self, node: Node, length: int) -> bool:
        """An update op of the stacked weights that works row by row (elementwise on
        arrays of the stacked shape, with scalars): it runs on each stage's rows."""
        if not self._stack_update(node) or node.primitive not in ELEMENTWISE:
            return False
        shapes = {self.values[v].shape for v in node.outputs}
        if len(shapes) != 1:
            return False
        (shape,) = shapes
        return bool(shape) and shape[0] == length and all(
            self.values[v].shape in ((), shape) for v in node.inputs)

    def _stacked_reduction(self, node: Node, length: int) -> bool:
        """A sum / max / min of one stacked array in the update (a gradient norm): it runs
        on each stage's rows."""
        if not self._stack_update(node) or node.primitive not in _COMBINE:
            return False
        (x,) = node.inputs
        shape = self.values[x].shape
        return bool(shape) and shape[0] == length

    def _stacked_fill(self, node: Node, length: int) -> bool:
        """A scalar broadcast to the stacked shape in the update (optax's zero imaginary
        part of each gradient): each stage makes its own rows."""
        if not self._stack_update(node) or node.primitive != "broadcast_in_dim":
            return False
        (x,), (y,) = node.inputs, node.outputs
        shape = self.values[y].shape
        return self.values[x].shape == () and bool(shape) and shape[0] == length

    # ------------------------------------------------------------------ pieces

    def _split(self, node: Node) -> None:
        p = node.eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        kind = self.scan_pass[node.id]
        consts, carry = list(node.inputs[:nc]), list(node.inputs[nc:nc + nk])
        xs, ys = node.inputs[nc + nk:], node.outputs[nk:]
        order = range(len(self.ranges))
        if p["reverse"]:  # a reversed scan runs its last blocks first
            order = reversed(order)
        y_pieces: dict[int, list] = {y: [None] * len(self.ranges) for y in ys}
        order = list(order)
        for step, k in enumerate(order):
            a, b = self.ranges[k]
            layer = a + 1
            ins = consts + carry + [self._piece(x, k, kind, layer) for x in xs]
            last = step == len(order) - 1
            carry_out = list(node.outputs[:nk]) if last else [self._new(v, None) for v in
                                                              node.outputs[:nk]]
            outs = []
            for y in ys:
                piece = self._new(y, b - a)
                y_pieces[y][k] = piece
                outs.append(piece)
            eqn = node.eqn.replace(params={**p, "length": b - a})
            self._emit(Node(next(self._ids), "scan", tuple(ins), tuple(carry_out + outs),
                            0.0, 0.0, None, eqn, node.bodies, b - a, node.recompute),
                       (kind, layer))
            carry = carry_out
        for y in ys:
            self.pieces[y] = tuple(y_pieces[y])
            self._join(y, kind)

    def _split_rowwise(self, node: Node) -> None:
        """One copy of the op per stage, on that stage's rows (the same equation: an
        elementwise op has no shape parameters)."""
        outs: dict[int, list[int]] = {y: [] for y in node.outputs}
        for k, (a, b) in enumerate(self.ranges):
            layer = a + 1
            ins = [v if not self.values[v].shape else self._piece(v, k, "step", layer)
                   for v in node.inputs]
            made = [self._new(y, b - a) for y in node.outputs]
            for y, piece in zip(node.outputs, made):
                outs[y].append(piece)
            self._emit(Node(next(self._ids), node.primitive, tuple(ins), tuple(made),
                            node.flops, node.bytes_accessed, None, node.eqn),
                       ("step", layer))
        for y in node.outputs:
            self.pieces[y] = tuple(outs[y])
            self._join(y, "step")

    def _split_reduction(self, node: Node) -> None:
        """The reduction on each stage's rows: rows of the result if the row dimension is
        kept, else a partial result per stage, combined on the stage of the first block."""
        (x,), (y,) = node.inputs, node.outputs
        over_rows = 0 in node.eqn.params["axes"]
        whole = over_rows and len(self.ranges) == 1  # one stage holds every block
        parts = []
        for k, (a, b) in enumerate(self.ranges):
            layer = a + 1
            part = y if whole else self._new(y, None if over_rows else b - a)
            share = (b - a) / self.ranges[-1][1]
            # The same equation: a reduction's parameters (its axes) hold for any rows.
            self._emit(Node(next(self._ids), node.primitive, (self._piece(x, k, "step", layer),),
                            (part,), node.flops * share, node.bytes_accessed * share, None,
                            node.eqn), ("step", layer))
            parts.append(part)
        if whole:
            return
        if not over_rows:
            self.pieces[y] = tuple(parts)
            self._join(y, "step")
            return
        combine = _COMBINE[node.primitive]
        acc = parts[0]
        for k, part in enumerate(parts[1:], 1):  # in stage order, on the first block's stage
            out = y if k == len(parts) - 1 else self._new(y, None)
            eqn = _eqn(combine, self.values[acc], self.values[part])
            self._emit(Node(next(self._ids), eqn.primitive.name, (acc, part), (out,), 0.0,
                            0.0, None, eqn), ("step", self.first_layer))
            acc = out

    def _split_fill(self, node: Node) -> None:
        """The broadcast once per stage, to that stage's rows."""
        (x,), (y,) = node.inputs, node.outputs
        shape, parts = self.values[y].shape, []
        for a, b in self.ranges:
            part = self._new(y, b - a)
            eqn = _eqn(lambda c: jax.lax.broadcast_in_dim(c, (b - a,) + shape[1:], ()),
                       self.values[x])
            self._emit(Node(next(self._ids), node.primitive, (x,), (part,), 0.0, 0.0, None,
                            eqn), ("step", a + 1))
            parts.append(part)
        self.pieces[y] = tuple(parts)
        self._join(y, "step")

    def _piece(self, x: int, k: int, kind: str, layer: int) -> int:
        """Stacked value x's slice for range k: a piece already made, or a new slice."""
        if x in self.pieces:
            return self.pieces[x][k]
        a, b = self.ranges[k]
        if x in self.state_inputs:  # one slice per stage, placed there by the executor
            key = (x, k, "state")
            if key not in self.slices:
                self.slices[key] = self._new(x, b - a)
                self.input_slices[self.slices[key]] = (x, a, b)
            return self.slices[key]
        key = (x, k, kind)
        if key not in self.slices:
            val = self.values[x]
            out = self._new(x, b - a)
            eqn = _eqn(lambda t: jax.lax.slice_in_dim(t, a, b, axis=0), val)
            self._emit(Node(next(self._ids), "slice", (x,), (out,), 0.0, 0.0, None, eqn),
                       (kind, layer))
            self.slices[key] = out
        return self.slices[key]

    def _join(self, y: int, kind: str) -> None:
        """Stacked output y, whole again where something other than a cut scan reads it
        (as a stacked input, a cut scan reads its pieces)."""
        readers = [n for n in self.readers.get(y, ()) if not self._reads_as_xs(n, y)
                   and n.id not in self.rowwise and n.id not in self.reductions]
        if not readers and y not in self.g.outputs:
            return
        if not readers and kind == "step":
            # A result of the row-wise update (the new stacked weights): the executor
            # assembles it from the stages' rows. A per-microbatch result is joined below,
            # so that it is accumulated over the microbatches as a whole.
            self.output_pieces[y] = self.pieces[y]
            return
        passes = {self.labels.get(n.id, (kind, 0))[0] for n in readers}
        # Weight gradients read only by the update are joined once per step, after each
        # piece was accumulated over the microbatches on its own stage.
        when = "step" if passes == {"step"} else kind
        pieces = self.pieces[y]
        eqn = _eqn(lambda *t: jax.lax.concatenate(t, 0), *[self.values[v] for v in pieces])
        layer = self.ranges[-1][0] + 1 if when == "forward" else self.first_layer
        self._emit(Node(next(self._ids), "concatenate", pieces, (y,), 0.0, 0.0, None, eqn),
                   (when, layer))

    def _reads_as_xs(self, node: Node, v: int) -> bool:
        if node.id not in self.cut:
            return False
        p = node.eqn.params
        return v in node.inputs[p["num_consts"] + p["num_carry"]:]

    def _new(self, like: int, length: int | None) -> int:
        """A new value shaped as `like` (with `length` leading rows if given)."""
        val = self.values[like]
        shape = val.shape if length is None else (length,) + val.shape[1:]
        v = next(self._ids)
        self.values[v] = Value(v, shape, val.dtype)
        if length is not None:
            self.origin[v] = self.origin.get(like, like)
        return v

    def _emit(self, node: Node, label: tuple[str, int]) -> None:
        self.nodes.append(node)
        self.labels[node.id] = label


def _feed_forward(nodes: list[Node], labels: dict) -> None:
    """Ops that a per-microbatch pass reads run in that pass, no later than its readers.

    Inside a block scan some ops only compute what the backward pass needs, so an input
    only they read (a zero constant for a select's derivative) is labelled backward in
    planning, and a constant the backward scan reads may be labelled as once-per-step
    work. A cut scan runs whole in its pass and needs them there: in the forward pass at
    the first stage reading them, in the backward pass at the first stage reading them
    (the backward pass runs the stages last to first).
    """
    readers: dict[int, list[int]] = {}
    for node in nodes:
        for v in node.inputs:
            readers.setdefault(v, []).append(node.id)
    for node in reversed(nodes):  # readers first, so a chain of such ops moves together
        kind, _ = labels.get(node.id, ("forward", 0))
        if kind == "forward":
            continue
        read = [labels[r] for v in node.outputs for r in readers.get(v, ()) if r in labels]
        fwd = [layer for k, layer in read if k == "forward"]
        bwd = [layer for k, layer in read if k == "backward"]
        if fwd:
            labels[node.id] = ("forward", min(fwd))
        elif kind == "step" and bwd:
            labels[node.id] = ("backward", max(bwd))


def _eqn(fn, *values: Value):
    """The one equation `fn` traces to on arrays shaped as `values`."""
    jaxpr = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values])
    (eqn,) = jaxpr.eqns
    return eqn
