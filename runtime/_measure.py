"""Read what XLA really compiled: FLOPs, memory and collective traffic.

`measure(compiled)` turns a `jax.stages.Compiled` into a `Measured` record whose
numbers use the same definitions as the planner's predictions (DESIGN.md, "Public
contract"), so a plan's `cost` and its measurement can be compared number to number:

* `flops` from `compiled.cost_analysis()["flops"]` (per device: the module is the
  SPMD-partitioned program one device runs), corrected for while loops: XLA's cost
  analysis counts a loop body once, not once per iteration, so every `dot` and
  `convolution` (fused or not) is re-counted from the HLO text with the trip counts
  of the loops around it, and element-wise work the cost analysis counts for elements
  a fusion never computes (upstream of a slice inside the fusion) is taken out (see
  `Measured.flops`); the uncorrected number is kept as `xla_flops`;
* memory from `compiled.memory_analysis()`;
* `comm_bytes` from the optimized HLO text (`compiled.as_text()`): every collective,
  its payload S, its group size n, and how many times per step it runs (the trip
  counts of the while loops around it, multiplied down nested loops). Per device and
  per execution, a collective sends (ring algorithms):

  ====================  =================  =====================================
  kind                  S                  bytes sent per device
  ====================  =================  =====================================
  all-reduce            result bytes       2 (n-1)/n * S
  all-gather            gathered result    (n-1)/n * S
  reduce-scatter        full operand       (n-1)/n * S   (operand = result * n)
  all-to-all            operand bytes      (n-1)/n * S
  collective-permute    operand bytes      S   (0 if every pair is a self-pair)
  ====================  =================  =====================================

What the optimized CPU HLO of jax 0.10.2 looks like (checked, not guessed):

* replica groups come in three spellings: explicit ``{{0,1,2,3},{4,5,6,7}}``; iota
  ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)`` ([number of groups, group size]); and the
  mesh-axes form ``mesh['axis_0'=2,'axis_1'=4] {'axis_1'}``, optionally with
  ``device_ids=([2,4]T(1,0))`` after the mesh and sub-axes written ``'x':(2)4``
  (pre-size 2, size 4). ``{}`` means every device.
* a `lax.scan` / `fori_loop` / `while_loop` with a static bound becomes a ``while``
  whose ``backend_config`` holds ``"known_trip_count":{"n":"4"}``; its condition
  computation compares the counter with ``constant(4)``, through a ``wrapped_compare``
  fusion. Both are read here; the backend_config wins.
* `cost_analysis()` counts a while body (fusions included) once, whatever its trip
  count: a 4-layer `lax.scan` of [32,128] @ [128,128] matmuls reports 1/4 of the
  unrolled FLOPs. Matmuls sit either as plain ``dot`` instructions or as the ROOT of a
  ``kind=kCustom`` fusion (``__ynn_fusion``); convolutions as ``convolution`` with
  ``window={size=3x3 pad=1_1x1_1}`` and ``dim_labels=b01f_01io->b01f``. XLA counts a
  convolution's FLOPs over valid (unpadded) window positions only, and so does this
  module.
* XLA CPU lowers "partial sums, output sharded" (a matmul contracting a sharded
  dimension into a sharded output) to a full all-reduce followed by a dynamic-slice,
  not to a reduce-scatter; a reduce-scatter appears only from `lax.psum_scatter`.
  All-to-all is emitted in its tuple form (one operand per peer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Collective", "Measured", "loop_flops_correction", "measure", "parse_collectives"]

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)


# ---------------------------------------------------------------------------------
# Public records
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled module.

    Attributes:
      kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or
        "collective-permute" (async `-start` forms report their base kind).
      nbytes: S, the payload in bytes as defined in DESIGN.md (see module doc).
      group_size: n, the devices taking part in one group (for a
        collective-permute: the largest set of devices its non-self pairs connect,
        e.g. 4 for a ring shift inside groups of 4; 1 if all pairs are self-pairs).
      count: executions per step (product of the enclosing while-loop trip counts).
      comm_bytes: bytes one device sends per step (all executions together).
      name: the HLO instruction name, without "%".
    """

    kind: str
    nbytes: int
    group_size: int
    count: int
    comm_bytes: float
    name: str


@dataclasses.dataclass(frozen=True)
class Measured:
    """What XLA compiled, per device and per step.

    Attributes:
      flops: FLOPs per device per step, with while-loop bodies counted once per
        iteration: `xla_flops` plus, for every `dot` and `convolution` in the module
        (inside fusions too), (executions per step - executions XLA counted) times its
        FLOPs, where executions per step multiply the trip counts of the enclosing
        while loops (a dot: 2 * result elements * contracted size; a convolution:
        2 * result batch * output features * valid window positions * input features
        per group, as XLA defines them). Without while loops this equals `xla_flops`
        exactly. Minus the element-wise FLOPs XLA counts at full shape for ops that
        feed a slice inside a fusion, which compute only the sliced elements (XLA
        duplicates a fused producer into each slice taken for an all-to-all, and cost
        analysis counts every copy in full). Without such slices this is 0.
        Element-wise and reduction FLOPs inside loop bodies are still counted
        once (they are not re-derived from the HLO), which for matmul-dominated layers
        is well under 1% of the total. Matmuls lowered to custom calls (e.g. cuBLAS on
        GPU) are not recognised, just as XLA's cost analysis does not count them.
      xla_flops: FLOPs per device exactly as `compiled.cost_analysis()["flops"]`
        reports them. XLA (jax 0.10.2, CPU) counts a while-loop body once, not once
        per iteration, so for a scanned model this is about one layer's FLOPs, unlike
        `flops` and `comm_bytes`.
      comm_bytes: bytes each device sends per step, summed over `collectives`.
      peak_memory: argument + output + temp - alias bytes (XLA's memory analysis).
      argument_bytes, output_bytes, temp_bytes, alias_bytes: the parts of it.
      collectives: every collective found, with its count and bytes.
      warnings: things that made a number uncertain (e.g. a while loop whose trip
        count could not be read, counted once; a matmul in a loop whose FLOPs could
        not be read, left as XLA counted it).
    """

    flops: float
    xla_flops: float
    comm_bytes: float
    peak_memory: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    collectives: tuple[Collective, ...]
    warnings: tuple[str, ...] = ()

    def by_kind(self) -> dict[str, float]:
        """Bytes sent per device per step, per collective kind (kinds present only)."""
        totals: dict[str, float] = {}
        for c in self.collectives:
            totals[c.kind] = totals.get(c.kind, 0.0) + c.comm_bytes
        return totals


# ---------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------


def measure(compiled: Any) -> Measured:
    """Measure a compiled, SPMD-partitioned JAX computation.

    Args:
      compiled: a `jax.stages.Compiled`, e.g.
        `jax.jit(f, in_shardings=..., out_shardings=...).lower(*args).compile()`.

    Returns:
      A `Measured` with FLOPs (loop bodies counted once per iteration), memory and
      per-device communication per step.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> f = jax.jit(lambda x, w: x @ w,
      ...             in_shardings=(NamedSharding(mesh, P(None, "d")),
      ...                           NamedSharding(mesh, P("d", None))),
      ...             out_shardings=NamedSharding(mesh, P()))
      >>> m = measure(f.lower(jnp.ones((16, 64)), jnp.ones((64, 32))).compile())
      >>> m.by_kind()                       # 2 * 7/8 * 16*32*4 bytes
      {'all-reduce': 3584.0}
    """
    module = _parse_module(compiled.as_text())
    notes: list[str] = []
    counts = _execution_counts(module, notes)
    collectives = _collectives(module, counts)
    xla_flops = _flops(compiled.cost_analysis())
    once = _execution_counts(module, [], loops=False)
    flops = xla_flops + _loop_flops_correction(module, counts, notes) - \
        _unneeded_fusion_flops(module, once)
    memory = compiled.memory_analysis()
    argument = int(getattr(memory, "argument_size_in_bytes", 0) or 0)
    output = int(getattr(memory, "output_size_in_bytes", 0) or 0)
    temp = int(getattr(memory, "temp_size_in_bytes", 0) or 0)
    alias = int(getattr(memory, "alias_size_in_bytes", 0) or 0)
    return Measured(
        flops=flops,
        xla_flops=xla_flops,
        comm_bytes=float(sum(c.comm_bytes for c in collectives)),
        peak_memory=argument + output + temp - alias,
        argument_bytes=argument,
        output_bytes=output,
        temp_bytes=temp,
        alias_bytes=alias,
        collectives=collectives,
        warnings=tuple(dict.fromkeys(notes)),
    )


def parse_collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Every collective in an optimized HLO module's text, with per-step counts.

    Async pairs count once (at their `-start`). A while loop whose trip count cannot
    be read counts its body once and issues a `UserWarning`. Both branches of a
    `conditional` are counted (an upper bound: which one runs is not known).

    Example:
      >>> text = '''HloModule m, num_partitions=4
      ... ENTRY %main (p: f32[8]) -> f32[8] {
      ...   %p = f32[8]{0} parameter(0)
      ...   ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={}, to_apply=%add
      ... }'''
      >>> parse_collectives(text)[0].comm_bytes     # 2 * 3/4 * 32 bytes
      48.0
    """
    collectives, notes = _parse(hlo_text)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return collectives


def _flops(cost: Any) -> float:
    """FLOPs from `cost_analysis()`: a dict, or (older JAX) a list of dicts."""
    if cost is None:
        return 0.0
    if isinstance(cost, Mapping):
        cost = [cost]
    return float(sum(float(part.get("flops", 0.0)) for part in cost if part))


# ---------------------------------------------------------------------------------
# HLO text -> computations and instructions
# ---------------------------------------------------------------------------------

# Module header: "HloModule jit_f, is_scheduled=true, ..., num_partitions=8".
_NUM_PARTITIONS_RE = re.compile(r"\bnum_partitions=(\d+)")
_REPLICA_COUNT_RE = re.compile(r"\breplica_count=(\d+)")

# Computation header, e.g. "%fused (p: f32[8]) -> f32[8] {" or "ENTRY %main.3_spmd (...) -> ... {".
# The parameter list and result type never contain "=", which tells headers from instructions.
_COMPUTATION_RE = re.compile(
    r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(=%]+)\s*(?:\([^=]*\))?\s*(?:->[^=]*)?\{$"
)

# "/*index=5*/" comments the printer puts inside long tuples (they hold a "=").
_COMMENT_RE = re.compile(r"/\*.*?\*/")

# Instruction start: optional ROOT, the name, "=". The result shape and the rest follow.
_INSTRUCTION_RE = re.compile(r"^(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")

# Opcode right after the result shape: "all-reduce(" / "while(" / "constant(".
_OPCODE_RE = re.compile(r"\s*(?P<opcode>[a-z][a-z0-9\-_]*)\(")

# One array shape inside a (possibly tuple) shape string: dtype then [dims], e.g.
# "f32[8,128]", "bf16[]", "pred[4]", "f8e4m3fn[2,2]", "s32[<=16]" (dynamic bound).
_ARRAY_SHAPE_RE = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str  # result shape text, e.g. "f32[8]{0}" or "(f32[4]{0}, s32[])"
    opcode: str
    operands: str  # text between the opcode's parentheses
    attrs: str  # everything after the operands: ", replica_groups=..., ..."
    is_root: bool


@dataclasses.dataclass(frozen=True)
class _Module:
    computations: dict[str, list[_Instruction]]
    entry: str
    num_devices: int  # num_partitions * replica_count, for replica_groups={}


def _matching_paren(text: str, start: int) -> int:
    """Index of the ")" that closes the "(" at `start` (or len(text) if unbalanced)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def _parse_instruction(line: str) -> _Instruction | None:
    """Split one instruction line into name, result shape, opcode, operands, attributes."""
    match = _INSTRUCTION_RE.match(line)
    if match is None:
        return None
    rest = match.group("rest")
    # A tuple shape "(f32[4]{0}, /*index=5*/s32[])" has spaces and "="; scan its parens.
    shape_end = _matching_paren(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
    if shape_end <= 0:
        return None
    opcode = _OPCODE_RE.match(rest, shape_end)
    if opcode is None:
        return None
    open_paren = opcode.end() - 1
    close_paren = _matching_paren(rest, open_paren)
    return _Instruction(
        name=match.group("name"),
        shape=rest[:shape_end],
        opcode=opcode.group("opcode"),
        operands=rest[open_paren + 1 : close_paren],
        attrs=rest[close_paren + 1 :],
        is_root=line.startswith("ROOT"),
    )


def _parse_module(hlo_text: str) -> _Module:
    """Group the instruction lines of an HLO module by computation."""
    computations: dict[str, list[_Instruction]] = {}
    entry = ""
    num_devices = 1
    current: list[_Instruction] | None = None
    for raw in hlo_text.splitlines():
        line = _COMMENT_RE.sub("", raw).strip()
        if line.startswith("HloModule"):
            partitions = _NUM_PARTITIONS_RE.search(line)
            replicas = _REPLICA_COUNT_RE.search(line)
            num_devices = int(partitions.group(1)) if partitions else 1
            num_devices *= int(replicas.group(1)) if replicas else 1
            continue
        header = _COMPUTATION_RE.match(line)
        if header is not None:
            current = computations.setdefault(header.group("name"), [])
            if header.group("entry"):
                entry = header.group("name")
            continue
        if line == "}":
            current = None
            continue
        if current is not None:
            instruction = _parse_instruction(line)
            if instruction is not None:
                current.append(instruction)
    if not entry and computations:
        entry = list(computations)[-1]  # the entry computation is printed last
    return _Module(computations, entry, num_devices)


# ---------------------------------------------------------------------------------
# Shapes -> bytes
# ---------------------------------------------------------------------------------


def _dtype_bits(dtype: str) -> int:
    """Bits per element of an HLO primitive type ("f32" -> 32, "pred" -> 8, "c64" -> 64)."""
    if dtype == "pred":
        return 8  # stored as one byte
    if dtype in ("token", "opaque"):
        return 0
    if dtype.startswith("bf"):
        return 16
    # s4, u8, f16, f64, c64, c128, f8e4m3fn, f4e2m1fn...: the width follows the letter.
    match = re.match(r"[sufc](\d+)", dtype)
    if match is None:
        raise ValueError(f"unknown HLO element type {dtype!r} in a shape")
    return int(match.group(1))


def _array_elements(dims: str) -> int:
    """Element count of "8,128" (or "" for a scalar; "<=16" dynamic dims use the bound)."""
    sizes = [d.strip().lstrip("<=") for d in dims.split(",") if d.strip()]
    return math.prod(int(s) for s in sizes)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, summed over tuple elements.

    >>> shape_bytes("(f32[4]{0}, bf16[2,3]{1,0}, s32[])")
    32
    """
    total_bits = 0
    for match in _ARRAY_SHAPE_RE.finditer(shape):
        bits = _dtype_bits(match.group("dtype"))
        total_bits += bits * _array_elements(match.group("dims"))
    return (total_bits + 7) // 8


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape "(a, (b, c), d)" -> ["a", "(b, c)", "d"]."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    elements, depth, start = [], 0, 1
    for i, char in enumerate(shape):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if (char == "," and depth == 1) or (char == ")" and depth == 0):
            elements.append(shape[start:i].strip())
            start = i + 1
    return [e for e in elements if e]


# ---------------------------------------------------------------------------------
# Group sizes
# ---------------------------------------------------------------------------------

# Explicit groups: the body of "replica_groups={{0,1},{2,3}}"; each "{...}" is one group.
_EXPLICIT_GROUPS_RE = re.compile(r"replica_groups=\{(?P<body>(?:\s*\{[\d,\s]*\}\s*,?)*)\}")
_ONE_GROUP_RE = re.compile(r"\{([\d,\s]*)\}")

# Iota groups: "replica_groups=[2,4]<=[8]" or "[4,2]<=[2,4]T(1,0)": [groups, group size].
_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[(?P<dims>\d+(?:,\d+)*)\]<=\[")

# Mesh-axes groups: "replica_groups=mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'b'}".
# The mesh lists axis sizes; the braces name the axes (or sub-axes) one group spans.
_MESH_GROUPS_RE = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
    r"(?:\s*,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?"  # optional explicit device order
    r"\s*\{(?P<refs>[^}]*)\}"
)
# One mesh axis "'axis_0'=2" (names may be unquoted in older printers).
_MESH_AXIS_RE = re.compile(r"'?(?P<name>[\w.\-]+)'?\s*=\s*(?P<size>\d+)")
# One axis reference "'axis_1'" or a sub-axis "'axis_1':(2)4" (pre-size 2, size 4).
_AXIS_REF_RE = re.compile(r"'?(?P<name>[\w.\-]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")

# "source_target_pairs={{0,1},{1,2}}" of a collective-permute.
_PAIRS_RE = re.compile(r"source_target_pairs=\{(?P<body>(?:\s*\{\s*\d+\s*,\s*\d+\s*\}\s*,?)*)\}")
_PAIR_RE = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")


def group_size(attrs: str, num_devices: int) -> int:
    """Group size n from an instruction's `replica_groups` attribute.

    >>> group_size("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 8)
    2
    >>> group_size("replica_groups=mesh['x'=2,'y'=4] {'y'}", 8)
    4
    """
    explicit = _EXPLICIT_GROUPS_RE.search(attrs)
    if explicit is not None:
        groups = [
            [d for d in g.split(",") if d.strip()] for g in _ONE_GROUP_RE.findall(explicit["body"])
        ]
        sizes = [len(g) for g in groups if g]
        return max(sizes) if sizes else num_devices  # "{}": every device
    iota = _IOTA_GROUPS_RE.search(attrs)
    if iota is not None:
        return int(iota["dims"].split(",")[-1])
    mesh = _MESH_GROUPS_RE.search(attrs)
    if mesh is not None:
        axis_sizes = {m["name"]: int(m["size"]) for m in _MESH_AXIS_RE.finditer(mesh["axes"])}
        size = 1
        for ref in _AXIS_REF_RE.finditer(mesh["refs"]):
            if ref["size"] is not None:
                size *= int(ref["size"])
            elif ref["name"] in axis_sizes:
                size *= axis_sizes[ref["name"]]
            else:
                raise ValueError(f"replica group names unknown mesh axis {ref['name']!r}: {attrs}")
        return size
    return num_devices  # no replica_groups attribute: every device


def _permute_group_size(pairs: list[tuple[int, int]]) -> int:
    """Devices in the largest connected set of (source, target) pairs (a ring: its length).

    >>> _permute_group_size([(0, 1), (1, 0), (2, 3), (3, 2)])
    2
    """
    parent: dict[int, int] = {}

    def root(d: int) -> int:
        parent.setdefault(d, d)
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    for source, target in pairs:
        parent[root(source)] = root(target)
    sizes: dict[int, int] = {}
    for device in list(parent):
        sizes[root(device)] = sizes.get(root(device), 0) + 1
    return max(sizes.values(), default=1)


def _permute_pairs(attrs: str) -> list[tuple[int, int]]:
    """The (source, target) pairs of a collective-permute."""
    match = _PAIRS_RE.search(attrs)
    if match is None:
        return []
    return [(int(s), int(t)) for s, t in _PAIR_RE.findall(match["body"])]


# ---------------------------------------------------------------------------------
# Payload and bytes per device
# ---------------------------------------------------------------------------------


def _collective_kind(opcode: str) -> tuple[str, bool] | None:
    """("all-gather", True) for "all-gather-start"; None for "-done" and other opcodes."""
    if opcode in COLLECTIVE_KINDS:
        return opcode, False
    if opcode.endswith("-start") and opcode[: -len("-start")] in COLLECTIVE_KINDS:
        return opcode[: -len("-start")], True
    return None


def _payload_bytes(kind: str, is_async: bool, shape: str, n: int) -> int:
    """S for one execution, from the result shape (operands are not printed with shapes).

    Async starts return tuples: all-gather-start (operands, results);
    collective-permute-start (operand, result, context...). all-reduce-start returns
    the reduced value itself.
    """
    if is_async and kind in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter"):
        elements = _tuple_elements(shape)
        if len(elements) >= 2:
            shape = elements[1] if kind == "all-gather" else elements[0]
            if kind == "reduce-scatter":
                return shape_bytes(shape)  # the operand, already full size
    result = shape_bytes(shape)
    if kind == "reduce-scatter":
        return result * n  # the operand the scatter started from
    return result  # all-reduce, all-gather (result), all-to-all and permute (= operand)


def _bytes_per_device(kind: str, payload: int, n: int) -> float:
    """Bytes one device sends for one execution, ring algorithms (DESIGN.md)."""
    if kind == "collective-permute":
        return float(payload)
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * payload
    return (n - 1) / n * payload  # all-gather, reduce-scatter, all-to-all


def _collective(inst: _Instruction, count: int, num_devices: int) -> Collective | None:
    """The `Collective` for one instruction, or None if it is not one."""
    found = _collective_kind(inst.opcode)
    if found is None:
        return None
    kind, is_async = found
    if kind == "collective-permute":
        moving = [(s, t) for s, t in _permute_pairs(inst.attrs) if s != t]
        n = _permute_group_size(moving)
        payload = _payload_bytes(kind, is_async, inst.shape, n) if moving else 0
    else:
        n = group_size(inst.attrs, num_devices)
        payload = _payload_bytes(kind, is_async, inst.shape, n)
    per_execution = _bytes_per_device(kind, payload, n)
    return Collective(
        kind=kind,
        nbytes=payload,
        group_size=n,
        count=count,
        comm_bytes=per_execution * count,
        name=inst.name,
    )


# ---------------------------------------------------------------------------------
# Call graph and while-loop trip counts
# ---------------------------------------------------------------------------------

# Computations an instruction runs once per execution: fusions and async starts
# ("calls="), calls/reductions ("to_apply="), conditionals ("true_computation=",
# "false_computation=", "branch_computations={%a, %b}"), custom calls.
_CALLED_ONCE_RE = re.compile(
    r"(?:^|[\s,])(?:calls|to_apply|true_computation|false_computation)=%?(?P<name>[\w.\-]+)"
)
_CALLED_LIST_RE = re.compile(
    r"(?:^|[\s,])(?:branch_computations|called_computations|calls)=\{(?P<names>[^}]*)\}"
)
_WHILE_BODY_RE = re.compile(r"(?:^|[\s,])body=%?(?P<name>[\w.\-]+)")
_WHILE_CONDITION_RE = re.compile(r"(?:^|[\s,])condition=%?(?P<name>[\w.\-]+)")
# backend_config={"known_trip_count":{"n":"4"},...} (XLA writes int64 as strings).
_BACKEND_CONFIG_RE = re.compile(r"backend_config=(?P<json>\{.*\})")
_KNOWN_TRIP_COUNT_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(?P<n>\d+)"?')
_DIRECTION_RE = re.compile(r"direction=(?P<dir>[A-Z]+)")
_PARAMETER_INDEX_RE = re.compile(r"^\s*(\d+)\s*$")

# Async done/update instructions name the same wrapped computation as their start;
# following them too would count the wrapped collective twice.
_NOT_EXECUTING_OPCODES = frozenset({"async-done", "async-update"})


def _operand_tokens(operands: str) -> list[str]:
    """Top-level operands of "%a, %b" (or old style "f32[8]{0} %a, s32[] %b"), stripped."""
    tokens, depth, current = [], 0, ""
    for char in operands + ",":
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            tokens.append(current.strip())
            current = ""
        else:
            current += char
    return [t for t in tokens if t]


def _operand_names(operands: str) -> list[str]:
    """Operand names from "%a, %b" (or old style "f32[8]{0} %a, s32[] %b")."""
    names = [token.split()[-1].lstrip("%") for token in _operand_tokens(operands)]
    return [n for n in names if n]


def _constant_value(inst: _Instruction | None) -> int | None:
    """The integer value of a scalar `constant(N)` instruction, else None."""
    if inst is None or inst.opcode != "constant":
        return None
    try:
        return int(inst.operands.strip())
    except ValueError:
        return None


def _trip_count_from_condition(module: _Module, condition: str) -> int | None:
    """Trip count N of a loop whose condition is `counter < constant(N)` (counter from 0).

    The compare is either the condition's ROOT or the ROOT of a fusion the ROOT calls
    (jax 0.10.2 CPU: ROOT %wrapped_compare = pred[] fusion(%gte, %constant), calls=...).
    """
    body = module.computations.get(condition, [])
    by_name = {inst.name: inst for inst in body}
    root = next((inst for inst in body if inst.is_root), None)
    if root is None:
        return None
    operands = [by_name.get(name) for name in _operand_names(root.operands)]
    compare = root
    if root.opcode == "fusion":
        called = _CALLED_ONCE_RE.search(root.attrs)
        fused = module.computations.get(called["name"], []) if called else []
        compare = next((inst for inst in fused if inst.is_root), None)
        if compare is None or compare.opcode != "compare":
            return None
        # Map the compare's operands (fusion parameters) back to the fusion's operands.
        fused_by_name = {inst.name: inst for inst in fused}
        mapped = []
        for name in _operand_names(compare.operands):
            param = fused_by_name.get(name)
            index = _PARAMETER_INDEX_RE.match(param.operands) if param else None
            if param is None or param.opcode != "parameter" or index is None:
                mapped.append(param)  # e.g. a constant cloned into the fusion
            else:
                position = int(index.group(1))
                mapped.append(operands[position] if position < len(operands) else None)
        operands = mapped
    if compare.opcode != "compare" or len(operands) != 2:
        return None
    direction = _DIRECTION_RE.search(compare.attrs)
    lhs, rhs = (_constant_value(op) for op in operands)
    bound_if = {  # which side holds the constant, and the trip count it gives
        ("LT", "rhs"): lambda n: n,
        ("LE", "rhs"): lambda n: n + 1,
        ("GT", "lhs"): lambda n: n,
        ("GE", "lhs"): lambda n: n + 1,
    }
    if direction is None:
        return None
    if rhs is not None and lhs is None and (direction["dir"], "rhs") in bound_if:
        return max(0, bound_if[(direction["dir"], "rhs")](rhs))
    if lhs is not None and rhs is None and (direction["dir"], "lhs") in bound_if:
        return max(0, bound_if[(direction["dir"], "lhs")](lhs))
    return None


def _while_trip_count(module: _Module, inst: _Instruction, notes: list[str]) -> int:
    """Trip count of a `while`: backend_config, else its condition, else 1 (noted)."""
    config = _BACKEND_CONFIG_RE.search(inst.attrs)
    if config is not None:
        known = _KNOWN_TRIP_COUNT_RE.search(config["json"])
        if known is not None:
            return int(known["n"])
    condition = _WHILE_CONDITION_RE.search(inst.attrs)
    trip = _trip_count_from_condition(module, condition["name"]) if condition else None
    if trip is not None:
        return trip
    notes.append(
        f"while loop %{inst.name}: trip count unknown (no known_trip_count and no "
        f"'counter < constant' condition); collectives and matmul FLOPs in its body "
        f"are counted once"
    )
    return 1


def _callees(
    module: _Module, inst: _Instruction, notes: list[str], loops: bool = True
) -> Iterable[tuple[str, int]]:
    """(computation, executions per execution of `inst`) for what `inst` calls.

    With `loops=False` a while loop runs its body once (XLA's cost-analysis view).
    """
    if inst.opcode in _NOT_EXECUTING_OPCODES:
        return
    if inst.opcode == "while":
        trips = _while_trip_count(module, inst, notes) if loops else 1
        body = _WHILE_BODY_RE.search(inst.attrs)
        condition = _WHILE_CONDITION_RE.search(inst.attrs)
        if body is not None:
            yield body["name"], trips
        if condition is not None:
            yield condition["name"], trips + 1
        return
    for match in _CALLED_ONCE_RE.finditer(inst.attrs):
        yield match["name"], 1
    for match in _CALLED_LIST_RE.finditer(inst.attrs):
        for name in match["names"].split(","):
            if name.strip():
                yield name.strip().lstrip("%"), 1


def _execution_counts(
    module: _Module, notes: list[str], loops: bool = True
) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation.

    A computation called from several places runs once per call site; counts are
    summed over callers in topological order (callers before callees). With
    `loops=False` every while loop counts as one iteration, as XLA's cost analysis
    counts it.
    """
    edges: dict[str, list[tuple[str, int]]] = {}
    for name, body in module.computations.items():
        edges[name] = [
            (callee, times)
            for inst in body
            for callee, times in _callees(module, inst, notes, loops)
            if callee in module.computations
        ]
    order: list[str] = []  # reverse post-order from the entry = topological order
    seen: set[str] = set()

    def visit(name: str) -> None:
        seen.add(name)
        for callee, _ in edges.get(name, ()):
            if callee not in seen:
                visit(callee)
        order.append(name)

    if module.entry:
        visit(module.entry)
    counts = {name: 0 for name in module.computations}
    counts[module.entry] = 1
    for name in reversed(order):
        for callee, times in edges[name]:
            counts[callee] += counts[name] * times
    return counts


def _collectives(module: _Module, counts: Mapping[str, int]) -> tuple[Collective, ...]:
    """Every collective of a module that runs, with its executions per step."""
    found = []
    for name, body in module.computations.items():
        for inst in body:
            collective = _collective(inst, counts.get(name, 0), module.num_devices)
            if collective is not None and collective.count > 0:
                found.append(collective)
    return tuple(found)


def _parse(hlo_text: str) -> tuple[tuple[Collective, ...], tuple[str, ...]]:
    """Collectives with per-step counts, and notes about anything uncertain."""
    module = _parse_module(hlo_text)
    notes: list[str] = []
    counts = _execution_counts(module, notes)
    return _collectives(module, counts), tuple(dict.fromkeys(notes))


# ---------------------------------------------------------------------------------
# Matmul FLOPs, re-counted per loop iteration
# ---------------------------------------------------------------------------------

_MATMUL_OPCODES = ("dot", "convolution")

# "lhs_contracting_dims={1,2}" of a dot ("{}" for an outer product).
_LHS_CONTRACTING_RE = re.compile(r"lhs_contracting_dims=\{(?P<dims>[\d,\s]*)\}")
# "dim_labels=b01f_01io->b01f" of a convolution: lhs, kernel and output layouts.
_DIM_LABELS_RE = re.compile(r"dim_labels=(?P<lhs>\w+)_(?P<rhs>\w+)->(?P<out>\w+)")
# "window={size=3x3 stride=2x2 pad=1_1x1_1 lhs_dilate=2x2 rhs_dilate=1x1}".
_WINDOW_RE = re.compile(r"window=\{(?P<body>[^}]*)\}")
_WINDOW_FIELD_RE = re.compile(r"(?P<key>[a-z_]+)=(?P<value>[\dx_\-]+)")


def _array_dims(shape: str) -> list[int] | None:
    """Dimension sizes of an array shape "f32[8,128]{1,0}" ([] for a scalar, None for a tuple)."""
    if shape.strip().startswith("("):
        return None
    match = _ARRAY_SHAPE_RE.search(shape)
    if match is None:
        return None
    return [int(d.strip().lstrip("<=")) for d in match["dims"].split(",") if d.strip()]


def _operand_dims(
    inst: _Instruction, by_name: Mapping[str, _Instruction]
) -> list[list[int] | None]:
    """Each operand's dimension sizes: printed inline (old style), else read from the
    instruction of the same computation that defines it (inside a fusion, the
    `parameter` instructions, which carry the fusion's parameter shapes)."""
    found: list[list[int] | None] = []
    for token in _operand_tokens(inst.operands):
        if _ARRAY_SHAPE_RE.search(token):  # "f32[8,128]{1,0} %a"
            found.append(_array_dims(token))
            continue
        definition = by_name.get(token.split()[-1].lstrip("%"))
        found.append(_array_dims(definition.shape) if definition is not None else None)
    return found


def _dot_flops(inst: _Instruction, by_name: Mapping[str, _Instruction]) -> float | None:
    """2 * result elements * product of the lhs contracting dimension sizes."""
    result = _array_dims(inst.shape)
    contracting = _LHS_CONTRACTING_RE.search(inst.attrs)
    operands = _operand_dims(inst, by_name)
    lhs = operands[0] if operands else None
    if result is None or contracting is None or lhs is None:
        return None
    dims = [int(d) for d in contracting["dims"].split(",") if d.strip()]
    if any(d >= len(lhs) for d in dims):
        return None
    return 2.0 * math.prod(result) * math.prod(lhs[d] for d in dims)


def _valid_window_positions(
    input_size: int,
    output_size: int,
    kernel_size: int,
    stride: int = 1,
    pad_low: int = 0,
    lhs_dilation: int = 1,
    rhs_dilation: int = 1,
) -> int:
    """(output position, kernel position) pairs of one spatial dimension that read a
    real input element, not padding or a hole of lhs dilation (as XLA counts them).

    >>> _valid_window_positions(16, 16, 3, pad_low=1)   # "SAME": 16*3 minus 2 edges
    46
    """
    valid = 0
    for k in range(kernel_size):
        offset = k * rhs_dilation - pad_low  # dilated input index = o * stride + offset
        if lhs_dilation == 1:
            first = max(0, -(offset // stride))  # ceil(-offset / stride)
            last = min(output_size - 1, (input_size - 1 - offset) // stride)
            valid += max(0, last - first + 1)
            continue
        for o in range(output_size):
            index, hole = divmod(o * stride + offset, lhs_dilation)
            valid += hole == 0 and 0 <= index < input_size
    return valid


def _convolution_flops(
    inst: _Instruction, by_name: Mapping[str, _Instruction]
) -> float | None:
    """2 * result batch * output features * valid window positions * input features
    per group (the kernel's "i" dimension): XLA's definition, which skips padding.
    Without padding or dilation the valid positions are output spatial elements times
    kernel spatial elements: 2 * prod(result) * prod(kernel spatial) * in / groups.
    """
    result = _array_dims(inst.shape)
    labels = _DIM_LABELS_RE.search(inst.attrs)
    operands = _operand_dims(inst, by_name)
    if result is None or labels is None or len(operands) < 2:
        return None
    lhs, rhs = operands[0], operands[1]
    lhs_labels, rhs_labels, out_labels = labels["lhs"], labels["rhs"], labels["out"]
    if (
        lhs is None
        or rhs is None
        or "i" not in rhs_labels
        or (len(lhs), len(rhs), len(result)) != tuple(len(g) for g in labels.groups())
    ):
        return None
    window: dict[str, list[str]] = {}
    match = _WINDOW_RE.search(inst.attrs)
    if match is not None:
        for item in _WINDOW_FIELD_RE.finditer(match["body"]):
            window[item["key"]] = item["value"].split("x")

    def field(key: str, k: int, default: str) -> str:
        values = window.get(key, [])
        return values[k] if k < len(values) else default

    positions = 1
    for k, digit in enumerate(sorted(c for c in out_labels if c.isdigit())):
        if digit not in lhs_labels or digit not in rhs_labels:
            return None
        positions *= _valid_window_positions(
            input_size=lhs[lhs_labels.index(digit)],
            output_size=result[out_labels.index(digit)],
            kernel_size=rhs[rhs_labels.index(digit)],
            stride=int(field("stride", k, "1")),
            pad_low=int(field("pad", k, "0_0").split("_")[0]),
            lhs_dilation=int(field("lhs_dilate", k, "1")),
            rhs_dilation=int(field("rhs_dilate", k, "1")),
        )
    non_spatial = math.prod(size for c, size in zip(out_labels, result) if not c.isdigit())
    return 2.0 * non_spatial * positions * rhs[rhs_labels.index("i")]


def _matmul_flops(inst: _Instruction, by_name: Mapping[str, _Instruction]) -> float | None:
    """FLOPs of one execution of a `dot` or `convolution`; None if they cannot be read."""
    if inst.opcode == "dot":
        return _dot_flops(inst, by_name)
    if inst.opcode == "convolution":
        return _convolution_flops(inst, by_name)
    return None


def _loop_flops_correction(
    module: _Module, counts: Mapping[str, int], notes: list[str]
) -> float:
    """FLOPs XLA's cost analysis leaves out by counting each while body once.

    For every dot and convolution: (executions per step - executions with every while
    body run once) * its FLOPs. A dot inside a fusion belongs to the fusion's
    computation, whose count follows the call graph (fusion, call, loop). Zero for a
    module without while loops.
    """
    once = _execution_counts(module, [], loops=False)
    extra = 0.0
    for name, body in module.computations.items():
        missing = counts.get(name, 0) - once.get(name, 0)
        if missing == 0:
            continue
        by_name = {inst.name: inst for inst in body}
        for inst in body:
            if inst.opcode not in _MATMUL_OPCODES:
                continue
            flops = _matmul_flops(inst, by_name)
            if flops is None:
                notes.append(
                    f"{inst.opcode} %{inst.name}: FLOPs unreadable (shape or dimension "
                    f"attributes not understood); counted as XLA counts it, not "
                    f"{counts.get(name, 0)} times"
                )
                continue
            extra += missing * flops
    return extra


# ---------------------------------------------------------------------------------
# Element-wise FLOPs counted for elements a fusion never computes
# ---------------------------------------------------------------------------------

# Opcodes XLA's cost analysis counts as one FLOP per result element (checked on jax
# 0.10.2 CPU: add, convert, compare, clamp and maximum count 1000 on f32[1000]; select
# counts its own 1000 besides its compare's; sqrt and exp count as transcendentals).
_ELEMENTWISE_FLOP_OPCODES = frozenset(
    "add subtract multiply divide remainder maximum minimum negate abs sign floor ceil "
    "round-nearest-afz round-nearest-even compare select clamp convert and or xor not".split())
# Opcodes that pass their result's demand on to their operand unchanged.
_PASS_THROUGH_OPCODES = _ELEMENTWISE_FLOP_OPCODES | frozenset(
    "bitcast reshape copy transpose broadcast".split())
_SLICE_OPCODES = frozenset({"slice", "dynamic-slice"})


def _demanded_fractions(body: list[_Instruction]) -> dict[str, float]:
    """Per instruction of a fused computation, the fraction of its elements the fusion's
    result needs: below 1 only upstream of a slice.

    Instructions are in definition order, so walking them backwards visits users first.
    A slice needs (its elements / its operand's) of the demand on it; element-wise and
    layout ops pass the demand on; anything else (reductions, dots, gathers) needs all
    of its operands.
    """
    demand: dict[str, float] = {}
    for inst in reversed(body):
        mine = 1.0 if inst.is_root else demand.get(inst.name, 1.0)
        names = _operand_names(inst.operands)
        for k, name in enumerate(names):
            if inst.opcode in _SLICE_OPCODES and k == 0:
                whole = next((i for i in body if i.name == name), None)
                part = _array_dims(inst.shape)
                full = _array_dims(whole.shape) if whole is not None else None
                need = mine * math.prod(part) / max(math.prod(full), 1) \
                    if part is not None and full else mine
            elif inst.opcode in _PASS_THROUGH_OPCODES:
                need = mine
            else:
                need = 1.0
            demand[name] = max(demand.get(name, 0.0), need)
    return demand


def _unneeded_fusion_flops(module: _Module, once: Mapping[str, int]) -> float:
    """Element-wise FLOPs XLA's cost analysis counts for elements no fusion computes.

    XLA's loop-fusion emitter computes a fusion's result element by element, so the
    element-wise ops feeding a slice inside a fusion run only for the sliced elements;
    the cost analysis counts them at their full shape. This happens when an all-to-all
    or a dynamic-slice reshard takes slices of a fused element-wise result: the fusion
    is duplicated once per slice (8 slices of a gelu before an 8-way all-to-all count 8
    full gelus). Returns the count to subtract, weighted as cost analysis weights
    computations (`once`: while bodies once).
    """
    fused = {match["name"] for body in module.computations.values() for inst in body
             if inst.opcode == "fusion" for match in _CALLED_ONCE_RE.finditer(inst.attrs)}
    extra = 0.0
    for name in fused:
        body = module.computations.get(name)
        times = once.get(name, 0)
        if not body or not times or not any(i.opcode in _SLICE_OPCODES for i in body):
            continue
        demand = _demanded_fractions(body)
        for inst in body:
            dims = _array_dims(inst.shape)
            if inst.opcode in _ELEMENTWISE_FLOP_OPCODES and dims is not None:
                extra += times * math.prod(dims) * (1.0 - demand.get(inst.name, 1.0))
    return extra


def loop_flops_correction(hlo_text: str) -> float:
    """FLOPs to add to XLA's cost analysis of a module so loop bodies count per trip.

    `measure` adds this to `cost_analysis()["flops"]`. Notes (a loop of unknown trip
    count, an unreadable matmul) are issued as `UserWarning`s.

    Example (an [8,16] @ [16,4] dot in a loop of 6 trips; XLA counts 1 of the 6):
      >>> text = '''HloModule m
      ... %cond (c: (s32[], f32[8,16])) -> pred[] {
      ...   %c = (s32[], f32[8,16]{1,0}) parameter(0)
      ...   %i = s32[] get-tuple-element(%c), index=0
      ...   %n = s32[] constant(6)
      ...   ROOT %lt = pred[] compare(%i, %n), direction=LT
      ... }
      ... %body (b: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
      ...   %b = (s32[], f32[8,16]{1,0}) parameter(0)
      ...   %j = s32[] get-tuple-element(%b), index=0
      ...   %x = f32[8,16]{1,0} get-tuple-element(%b), index=1
      ...   %w = f32[16,4]{1,0} constant({...})
      ...   %d = f32[8,4]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
      ...   ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%j, %x)
      ... }
      ... ENTRY %main (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
      ...   %p = (s32[], f32[8,16]{1,0}) parameter(0)
      ...   ROOT %loop = (s32[], f32[8,16]{1,0}) while(%p), condition=%cond, body=%body
      ... }'''
      >>> loop_flops_correction(text)          # 5 more trips * 2 * 8*4 * 16
      5120.0
    """
    module = _parse_module(hlo_text)
    notes: list[str] = []
    counts = _execution_counts(module, notes)
    extra = _loop_flops_correction(module, counts, notes)
    for note in dict.fromkeys(notes):
        warnings.warn(note, stacklevel=2)
    return extra
