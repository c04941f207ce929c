"""Pipeline layers of a traced train step: which layer each op belongs to, and when it runs.

A pipeline splits a model into contiguous layer ranges. meshplan finds the layers in the
traced program itself, so the user's step needs no annotation:

* Repeated blocks. In an unrolled model, parameters whose pytree paths differ only in one
  integer (``['blocks'][3]['fc1']``) belong to block 3. In a scanned model the scan over
  the stacked blocks is the block loop: its body runs once per block.
* Embedding and output layers: ops before the first block (in the forward pass) form the
  "pre" layer, ops after the last block (the final norm, the head, the loss) the "post"
  layer. A stage holding them is heavier, and the stage split accounts for it.
* Passes. Forward ops lead to the loss; backward ops carry the batch back from it; the
  rest (the optimizer update, no batch dimension anywhere) runs once per step, not once
  per microbatch.

Layer indices: 0 is "pre", 1..L the blocks, L + 1 "post". An op of a scanned body belongs
to every block equally (`SPREAD`).

>>> import re; _ints("[0]['blocks'][12]['wq']['kernel']")
[0, 12]
"""
from __future__ import annotations

import dataclasses
import re

from meshplan.ir._graph import split_path
from meshplan.planner._ops import PlanningView, batch_dims

__all__ = ["Layers", "SPREAD", "find_layers"]

SPREAD = -1  # an op of a scanned block body: 1/L of it in each block
_INT = re.compile(r"\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Layers:
    """Pipeline layers found in a planning view.

    Attributes:
      num_blocks: L, the repeated blocks.
      scanned: the blocks are one scan's iterations (op layers are SPREAD inside it).
      op_layer: op id -> layer (0 pre, 1..L blocks, L + 1 post, or SPREAD).
      op_pass: op id -> "forward", "backward" (both once per microbatch) or "step" (once
        per step: the optimizer update).
      input_layers: parameter / optimizer-state input value -> the layers that hold it
        (SPREAD for a stacked block parameter of a scanned model).
    """

    num_blocks: int
    scanned: bool
    op_layer: dict[int, int]
    op_pass: dict[int, str]
    input_layers: dict[int, tuple[int, ...]]

    @property
    def num_layers(self) -> int:
        """Pipeline layers: pre, the blocks, post."""
        return self.num_blocks + 2

    def name(self, layer: int) -> str:
        if layer == 0:
            return "pre"
        if layer == self.num_blocks + 1:
            return "post"
        return f"block {layer - 1}"


def _ints(path: str) -> list[int]:
    return [int(m) for m in _INT.findall(path)]


def _block_of_paths(paths: dict[int, str]) -> dict[int, int]:
    """value -> block number (0-based) from pytree paths that differ in one integer."""
    seen: dict[tuple[str, int], set[int]] = {}
    parts = {v: _INT.split(p) for v, p in paths.items()}
    for v, p in paths.items():
        ints = _ints(p)
        for j in range(len(ints)):
            template = _template(parts[v], j)
            seen.setdefault((template, j), set()).add(ints[j])
    blocks: dict[int, int] = {}
    for v, p in paths.items():
        ints = _ints(p)
        for j in range(len(ints)):
            if len(seen[_template(parts[v], j), j]) > 1:  # the first varying integer
                blocks[v] = ints[j]
                break
    return blocks


def _blocks_of_state(state, twin: dict[int, int]) -> dict[int, int]:
    """State input value -> block number, from the parameters' paths; an optimizer-state
    array takes the block of its parameter (`twin`).

    Only parameter paths are compared: optimizer state holds integers of its own (optax's
    chain positions, `[1][0].count` next to `[1][2].count` with a learning-rate
    schedule), which are not blocks.
    """
    blocks = _block_of_paths({op.outputs[0]: op.path for op in state if op.role == "param"})
    for v, param in twin.items():
        if param in blocks:
            blocks[v] = blocks[param]
    return blocks


def _twins(state, values) -> dict[int, int]:
    """Optimizer-state value -> its parameter: the one whose path (argument position
    stripped) its own ends with (`[1][0].mu['blocks'][3]['w']` ends with
    `[0]['blocks'][3]['w']`'s `['blocks'][3]['w']`), longest ending first; of the same
    shape if one is (Adam's moments), else through a dict key (Adafactor's factored
    moments, `...v_row['blocks'][3]['w']`). A bare index is not enough: a scalar step
    count at `[1][0]` is no twin of a parameter `[0][0]`."""
    params = {split_path(op.path)[1]: op.outputs[0] for op in state if op.role == "param"}
    out: dict[int, int] = {}
    for op in state:
        if op.role != "opt_state":
            continue
        v, rest = op.outputs[0], split_path(op.path)[1]
        starts = [i for i, ch in enumerate(rest) if ch in "[." and rest[i:] in params]
        same = [i for i in starts if values[params[rest[i:]]].shape == values[v].shape]
        keyed = [i for i in starts if "['" in rest[i:]]
        if same or keyed:  # starts are in order: the longest ending first
            out[v] = params[rest[(same or keyed)[0]:]]
    return out


def _template(split: list[str], j: int) -> str:
    """The path with its j-th integer replaced by '*' (split: text, int, text, int, ...)."""
    out = list(split)
    out[2 * j + 1] = "*"
    return "".join(out)


def find_layers(view: PlanningView, pairs: dict[int, int] | None = None) -> Layers | None:
    """The pipeline layers of `view`, or None when it has no repeated blocks to split."""
    ops = view.ops
    state = [op for op in ops if op.kind == "input" and op.role in ("param", "opt_state")]
    twin = _twins(state, view.values)
    block_of_value = _blocks_of_state(state, twin)
    numbers = sorted(set(block_of_value.values()))
    rank = {b: i for i, b in enumerate(numbers)}
    scan_trip = _block_scan(view)
    if len(numbers) >= 2:
        num_blocks, scanned = len(numbers), False
    elif scan_trip:
        num_blocks, scanned = scan_trip, True
    else:
        return None

    # Passes: forward ops lead to a non-state output (the loss); of the others, those with
    # no batch dimension anywhere run once per step.
    producer = {v: i for i, op in enumerate(ops) for v in op.outputs}
    state_out = set((pairs or {}).values())
    losses = [v for v in view.outputs if v not in state_out and v in producer]
    if not pairs:
        losses = [v for v in losses if not view.values[v].shape] or losses
    forward = set()
    stack = [producer[v] for v in losses]
    while stack:
        i = stack.pop()
        if i in forward:
            continue
        forward.add(i)
        # A loop carry is fed by its initial value and by the body's new value.
        reads = ops[i].inputs
        if ops[i].prim == "carry":
            reads += tuple(s.value for s in ops[i].slots)
        stack += [producer[u] for u in reads if u in producer]
    vdims, _ = batch_dims(view)
    op_pass: dict[int, str] = {}
    for i, op in enumerate(ops):
        if op.kind == "input" and op.prim == "input":
            continue
        if i in forward:
            op_pass[op.id] = "forward"
        elif op.mult > 1 or any(vdims.get(v) for v in op.inputs + op.outputs):
            op_pass[op.id] = "backward"
        else:
            op_pass[op.id] = "step"

    # A batch-free op that feeds the backward pass (a constant broadcast for a select, a
    # weight transposed for a backward matmul) runs in the backward pass, per microbatch.
    per_microbatch = {"forward", "backward"}
    read_per_microbatch: set[int] = set()  # values a forward or backward op reads
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        phase = op_pass.get(op.id)
        if phase == "step" and any(v in read_per_microbatch for v in op.outputs):
            op_pass[op.id] = phase = "backward"
        if phase in per_microbatch:
            read_per_microbatch.update(op.inputs)

    # Block labels of parameter-derived values (casts, transposes of one block's weights).
    label: dict[int, int] = {v: rank[b] + 1 for v, b in block_of_value.items()}
    for op in ops:
        if op.kind == "input" or op_pass.get(op.id) == "step" or \
                any(vdims.get(v) for v in op.inputs):
            continue
        found = {label[v] for v in op.inputs if v in label}
        if len(found) == 1:
            block = found.pop()
            label.update((v, block) for v in op.outputs)

    op_layer: dict[int, int] = {}
    post = num_blocks + 1
    body = (lambda op: op.mult == scan_trip) if scanned else (lambda op: False)
    # Anchors: ops of a block for sure: they read its weights, or run in its scan body;
    # a backward op also belongs to the layer whose forward activations it reads.
    def anchor(op) -> int | None:
        if body(op):
            return SPREAD
        found = {label[v] for v in op.inputs if v in label}
        if len(found) == 1:
            return found.pop()
        if op_pass.get(op.id) == "backward":
            acts = [op_layer[ops[producer[u]].id] for u in op.inputs
                    if u in producer and op_pass.get(ops[producer[u]].id) == "forward"]
            acts = [a for a in acts if a != SPREAD]
            if acts:
                return max(acts)
        return None

    _label_forward(ops, op_pass, op_layer, anchor, post)
    _label_backward(ops, op_pass, op_layer, anchor, post)

    # The layers reading each state input that no block owns (embedding, head).
    shared = {op.outputs[0] for op in state} - block_of_value.keys()
    readers: dict[int, set[int]] = {}
    for op in ops:
        layer = op_layer.get(op.id)
        if layer is not None:
            for v in op.inputs:
                if v in shared:
                    readers.setdefault(v, set()).add(layer)
    stacked = {op.inputs[0] for op in ops if op.prim == "scan_slice" and op.inputs}
    input_layers: dict[int, tuple[int, ...]] = {}
    for op in state:
        v = op.outputs[0]
        if v in block_of_value:
            input_layers[v] = (rank[block_of_value[v]] + 1,)
        elif scanned and (v in stacked or twin.get(v) in stacked):
            input_layers[v] = (SPREAD,)  # a stacked block weight, or its optimizer state
        else:
            # Embedding and head weights: held by each layer that reads them (a tied
            # embedding lives on the first and the last stage, as in Megatron-LM).
            held = sorted(l for l in readers.get(v, ()) if l != SPREAD) or [0]
            input_layers[v] = tuple(dict.fromkeys(held))

    # The optimizer update of a weight belongs to the layer holding the weight.
    constant = _constant_ops(ops, producer, op_pass)
    for op in ops:
        if op_pass.get(op.id) != "step" or op.id in constant:
            continue
        found = {input_layers[v][-1] for v in op.inputs if v in input_layers}
        found |= {label[v] for v in op.inputs if v in label}
        if len(found) == 1:
            op_layer[op.id] = found.pop()
        else:
            # Reading no weight: the layer that made its largest operand. A scalar operand
            # (a gradient-clipping factor, a scheduled learning rate) is made once for all
            # layers and says nothing of where the op runs, nor does a constant (labelled
            # below, by its readers); ties keep the operand order.
            made = [u for u in op.inputs if u in producer
                    and op_layer.get(ops[producer[u]].id) is not None]
            src = sorted([u for u in made if ops[producer[u]].id not in constant] or made,
                         key=lambda u: -view.values[u].nbytes)
            op_layer[op.id] = op_layer[ops[producer[src[0]]].id] if src else 0
    _constants_where_read(ops, constant, op_layer)
    return Layers(num_blocks, scanned, op_layer, op_pass, input_layers)


def _constant_ops(ops, producer, op_pass) -> set[int]:
    """Ids of once-per-step ops computed from constants only (optax's squared norm adds the
    square of a real array's zero imaginary part)."""
    constant: set[int] = set()
    for op in ops:
        if op_pass.get(op.id) == "step" and op.kind != "input" and all(
                u not in producer or ops[producer[u]].id in constant for u in op.inputs):
            constant.add(op.id)
    return constant


def _constants_where_read(ops, constant: set[int], op_layer) -> None:
    """A constant op runs in the layer of its readers when they all run in one (made in
    layer 0, a weight-sized array of zeros would be sent to that layer's stage); else in
    layer 0."""
    readers: dict[int, list[int]] = {}
    for op in ops:
        for u in op.inputs:
            readers.setdefault(u, []).append(op.id)
    for op in reversed(ops):  # readers first, so a chain of such ops moves together
        if op.id in constant:
            read = {op_layer.get(r, 0) for v in op.outputs for r in readers.get(v, ())}
            op_layer[op.id] = read.pop() if len(read) == 1 else 0


def _label_forward(ops, op_pass, op_layer, anchor, post) -> None:
    """Forward ops in program order: the block whose weights were read last; before the
    first such read (the embedding) "pre", after the last (final norm, head, loss) "post".
    What only a scanned body feeds (its stacked outputs) belongs to the body too."""
    current, since_last = 0, []
    made: dict[int, int] = {}
    for op in ops:
        if op_pass.get(op.id) != "forward":
            continue
        a = anchor(op)
        if a is None and op.prim in ("scan_stack", "alias") and op.inputs and \
                all(made.get(v) == SPREAD for v in op.inputs):
            a = SPREAD
            op_layer[op.id] = a
            made.update((v, a) for v in op.outputs)
            continue
        if a is not None:
            current, since_last = a, []
        else:
            since_last.append(op.id)
        op_layer[op.id] = current
        made.update((v, current) for v in op.outputs)
    if current != 0:
        for k in since_last:
            op_layer[k] = post


def _label_backward(ops, op_pass, op_layer, anchor, post) -> None:
    """Backward ops, which run the blocks in reverse: the block whose weights are read
    next; before the first such read (the loss's and the head's gradients) "post", after
    the last (the embedding's gradient) "pre"."""
    nxt = 0
    for op in reversed(ops):
        if op_pass.get(op.id) != "backward":
            continue
        a = anchor(op)
        if a is not None:
            nxt = a
        op_layer[op.id] = nxt
    for op in ops:
        if op_pass.get(op.id) != "backward":
            continue
        if anchor(op) is not None:
            break
        op_layer[op.id] = post


def _block_scan(view: PlanningView) -> int:
    """Trip count of the loop holding most of the FLOPs, if that loop runs > 1 times."""
    flops: dict[int, float] = {}
    for op in view.ops:
        flops[op.mult] = flops.get(op.mult, 0.0) + op.flops * op.mult
    if not flops:
        return 0
    best = max(flops, key=flops.get)
    return best if best > 1 else 0
