"""Op semantics: how each output dimension relates to operand dimensions, and FLOPs.

Every operation is described einsum-style by a `DimMap`: a set of *loop dimensions* (the
iteration space), and for each operand and output, which loop dimensions each of its array
dimensions walks. Sharding is then one rule for all ops: a mesh axis is assigned to a loop
dimension; every array dimension that walks that loop dimension (as its major part) is split
over the axis; a loop dimension that no output walks is a reduction, so splitting it leaves
partial results that must be all-reduced. An array dimension that walks no loop dimension
(`()`) must stay whole: sharding it is illegal for this op (a concatenated or sliced dim).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np

DimGroup = tuple[int, ...]  # the loop dims one array dim walks, major first; () = unshardable
ArrayDims = tuple[DimGroup, ...]

# Elementwise primitives XLA's HloCostAnalysis counts as transcendentals, not FLOPs.
_TRANSCENDENTAL = frozenset(
    "exp exp2 log log1p expm1 tanh logistic sin cos tan sqrt rsqrt cbrt pow erf erfc erf_inv "
    "atan2 asin acos atan sinh cosh asinh acosh atanh lgamma digamma".split())

ELEMENTWISE = frozenset(
    "add sub mul div rem max min pow integer_pow neg abs sign floor ceil round exp exp2 log "
    "log1p expm1 tanh logistic sin cos tan sqrt rsqrt cbrt square erf erfc erf_inv atan2 asin "
    "acos atan sinh cosh asinh acosh atanh lgamma digamma select_n clamp convert_element_type "
    "eq ne lt le gt ge and or not xor add_any stop_gradient is_finite nextafter copy copy_p "
    "reduce_precision imag real conj shift_left shift_right_logical shift_right_arithmetic "
    "population_count sharding_constraint optimization_barrier".split())

# Ops cheap enough to run again where a result is needed rather than keep it: elementwise
# ops, broadcasts and reshapes (no reductions, no matmuls). The pipelined executor's
# backward programs rebuild such residuals, and the per-layer memory model counts them so
# (both by `rebuildable`).
REBUILDABLE = ELEMENTWISE | {"broadcast_in_dim", "iota", "reshape", "squeeze", "expand_dims",
                             "alias"}



def rebuildable(wanted, made: dict, free, values: dict) -> dict[int, bool]:
    """Which values a later pass can compute again instead of keeping: those of `wanted`,
    and the operands they are rebuilt from.

    A value is rebuilt when its producer is a REBUILDABLE op with one result, and each
    operand is at hand (`free(u)`: kept anyway, a constant, state), at most 1/8 the size of
    the result (kept in its place), or rebuilt the same way. `made`: value -> (primitive,
    operands, number of results) of the op that computes it; `values`: value -> Value.
    Returns value -> whether it is rebuilt, for every value looked at.
    """
    memo: dict[int, bool] = {}

    def ok(v: int) -> bool:
        if v not in memo:
            memo[v] = False  # a cycle (a loop carry) is never rebuilt
            op = made.get(v)
            if op is not None:
                prim, operands, results = op
                size = values[v].nbytes
                memo[v] = prim in REBUILDABLE and results == 1 and all(
                    free(u) or (u in made and values[u].nbytes * 8 <= size) or ok(u)
                    for u in operands)
        return memo[v]

    for v in wanted:
        ok(v)
    return memo


_REDUCTIONS = {"reduce_sum": "sum", "reduce_max": "max", "reduce_min": "min",
               "reduce_prod": "prod", "reduce_and": "and", "reduce_or": "or",
               "argmax": None, "argmin": None}


@dataclasses.dataclass(frozen=True)
class DimMap:
    """Einsum-style description of one op.

    Example: `x[b, k] @ w[k, n]` has loops (b, n, k) sized (B, N, K), operands
    `(((0,), (2,)), ((2,), (1,)))`, output `(((0,), (1,)),)`, reduction "sum" (k is reduced).
    """

    loop_sizes: tuple[int, ...]
    operands: tuple[ArrayDims | None, ...]  # None: the operand is scalar/index-like, kept whole
    outputs: tuple[ArrayDims, ...]
    reduction: str | None = None  # how reduced loop dims combine; None: they may not be split
    main: int | None = 0  # operand whose layout a follower inherits; None: a source op

    def __hash__(self) -> int:
        return self._hash

    def __getstate__(self) -> dict:  # str hashes differ between processes: not pickled
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @functools.cached_property  # a DimMap keys the strategy memo: hashed for every lookup
    def _hash(self) -> int:
        return hash((self.loop_sizes, self.operands, self.outputs, self.reduction, self.main))

    @functools.cached_property  # asked for every op of every candidate plan
    def reduced_loops(self) -> frozenset[int]:
        """Loop dims that no output walks: splitting them leaves partial results."""
        seen = {l for out in self.outputs for g in out for l in g}
        return frozenset(range(len(self.loop_sizes))) - seen


def _identity(rank: int) -> ArrayDims:
    return tuple((i,) for i in range(rank))


def _shape(aval) -> tuple[int, ...]:
    return tuple(map(int, aval.shape))


def elementwise_map(in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...],
                    n_out: int = 1) -> DimMap:
    """Operands walk the output's dims (size-1 dims broadcast); scalars are kept whole."""
    rank = len(out_shape)
    ops = tuple(_partial_identity(out_shape, [s[d] == out_shape[d] for d in range(rank)])
                if rank and len(s) == rank else None for s in in_shapes)
    # The follower inherits the layout of the first operand that spans the whole output.
    full = [i for i, s in enumerate(in_shapes) if tuple(s) == out_shape and rank]
    main = full[0] if full else None
    return DimMap(out_shape, ops, (_identity(rank),) * n_out, None, main)


def _partial_identity(shape, keep) -> ArrayDims:
    """Identity on dims where keep[d] holds, () elsewhere."""
    return tuple((d,) if keep[d] else () for d in range(len(shape)))


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]):
    """Split both shapes into blocks of equal element count, skipping size-1 dims."""
    i = j = 0
    blocks = []
    while i < len(src) or j < len(dst):
        bi, bj = [], []
        pi = pj = 1
        while i < len(src) and src[i] == 1 and not bi:
            i += 1
        while j < len(dst) and dst[j] == 1 and not bj:
            j += 1
        if i >= len(src) and j >= len(dst):
            break
        while True:
            if pi <= pj and i < len(src):
                pi *= src[i]; bi.append(i); i += 1
            elif j < len(dst):
                pj *= dst[j]; bj.append(j); j += 1
            else:
                break
            if pi == pj:
                break
        if pi != pj:
            return None
        blocks.append((bi, bj))
    return blocks


def reshape_map(src: tuple[int, ...], dst: tuple[int, ...]) -> DimMap | None:
    """A split dim's sharding goes to its major part; merged dims carry the major dim's."""
    blocks = _reshape_groups(src, dst)
    if blocks is None:
        return None
    loops: list[int] = []
    in_dims: list[DimGroup] = [()] * len(src)
    out_dims: list[DimGroup] = [()] * len(dst)
    for bi, bj in blocks:
        if len(bi) == 1:  # one source dim split into (or equal to) several destination dims
            first = len(loops)
            loops += [dst[j] for j in bj]
            in_dims[bi[0]] = tuple(range(first, len(loops)))
            for k, j in enumerate(bj):
                out_dims[j] = (first + k,)
        elif len(bj) == 1:  # several source dims merged into one
            first = len(loops)
            loops += [src[i] for i in bi]
            out_dims[bj[0]] = tuple(range(first, len(loops)))
            for k, i in enumerate(bi):
                in_dims[i] = (first + k,)
        else:  # many-to-many: only the leading dims may carry a split
            loops.append(int(np.prod([src[i] for i in bi])))
            in_dims[bi[0]] = (len(loops) - 1,)
            out_dims[bj[0]] = (len(loops) - 1,)
    return DimMap(tuple(loops), (tuple(in_dims),), (tuple(out_dims),), None, 0)


def dot_general_map(lhs: tuple[int, ...], rhs: tuple[int, ...], dimension_numbers) -> DimMap:
    """Loops: batch, lhs free, rhs free, contracting (reduced)."""
    (lc, rc), (lb, rb) = dimension_numbers
    lfree = [d for d in range(len(lhs)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs)) if d not in rc and d not in rb]
    loops = [lhs[d] for d in lb] + [lhs[d] for d in lfree] + [rhs[d] for d in rfree] \
        + [lhs[d] for d in lc]
    nb, nl, nr = len(lb), len(lfree), len(rfree)
    lmap: list[DimGroup] = [()] * len(lhs)
    rmap: list[DimGroup] = [()] * len(rhs)
    for k, (a, b) in enumerate(zip(lb, rb)):
        lmap[a] = (k,); rmap[b] = (k,)
    for k, a in enumerate(lfree):
        lmap[a] = (nb + k,)
    for k, b in enumerate(rfree):
        rmap[b] = (nb + nl + k,)
    for k, (a, b) in enumerate(zip(lc, rc)):
        lmap[a] = (nb + nl + nr + k,); rmap[b] = (nb + nl + nr + k,)
    out = _identity(nb + nl + nr)
    return DimMap(tuple(loops), (tuple(lmap), tuple(rmap)), (out,), "sum", 0)


def _gather_map(operand, indices, out, dn, slice_sizes) -> DimMap | None:
    """Embedding-style gather: output batch dims follow the indices, offset dims the operand.

    Batched gathers (`take_along_axis`, as in a cross-entropy's label pick) also walk the
    output's batch dims with the operand's batching dims, so those may be split too.
    """
    offset = list(dn.offset_dims)
    batch_out = [d for d in range(len(out)) if d not in offset]
    batching = list(dn.operand_batching_dims)
    window = [d for d in range(len(operand))
              if d not in dn.collapsed_slice_dims and d not in batching]
    omap: list[DimGroup] = [()] * len(operand)
    for o, d in zip(offset, window):
        if slice_sizes[d] == operand[d]:
            omap[d] = (o,)
    # jax puts the index vector last; the remaining index dims are the output's batch dims.
    for d, k in zip(batching, dn.start_indices_batching_dims):
        omap[d] = (batch_out[k],)
    imap: list[DimGroup] = [()] * len(indices)
    for k, o in enumerate(batch_out):
        imap[k] = (o,)
    return DimMap(out, (tuple(omap), tuple(imap)), (_identity(len(out)),), None, 1)


def _scatter_add_map(operand, indices, updates, dn) -> DimMap | None:
    """Scatter-add (an embedding's gradient): update batch dims are summed away.

    In a batched scatter an update dim that matches an operand batching dim walks that
    operand dim instead (nothing is summed over it).
    """
    batching = dict(zip(dn.scatter_indices_batching_dims, dn.operand_batching_dims))
    window_upd = list(dn.update_window_dims)
    scatter_upd = [d for d in range(len(updates)) if d not in window_upd]
    op_window = [d for d in range(len(operand))
                 if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    summed = [k for k in range(len(scatter_upd)) if k not in batching]
    loops = list(operand) + [updates[scatter_upd[k]] for k in summed]
    omap = _partial_identity(operand, [d not in dn.inserted_window_dims for d in range(len(operand))])
    umap: list[DimGroup] = [()] * len(updates)
    for u, o in zip(window_upd, op_window):
        if updates[u] == operand[o]:
            umap[u] = (o,)
    imap: list[DimGroup] = [()] * len(indices)
    for k, u in enumerate(scatter_upd):
        loop = batching[k] if k in batching else len(operand) + summed.index(k)
        umap[u] = (loop,)
        imap[k] = (loop,)
    return DimMap(tuple(loops), (omap, tuple(imap), tuple(umap)), (omap,), "sum", 2)


def _conv_map(lhs, rhs, out, params) -> DimMap | None:
    """Convolution: batch, output feature and (ungrouped) input feature may be split."""
    dn = params["dimension_numbers"]
    if params.get("feature_group_count", 1) != 1 or params.get("batch_group_count", 1) != 1:
        return None
    lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    loops = (out[ospec[0]], out[ospec[1]], lhs[lspec[1]])  # N, O, C
    lmap: list[DimGroup] = [()] * len(lhs)
    rmap: list[DimGroup] = [()] * len(rhs)
    omap: list[DimGroup] = [()] * len(out)
    lmap[lspec[0]] = (0,); lmap[lspec[1]] = (2,)
    rmap[rspec[0]] = (1,); rmap[rspec[1]] = (2,)
    omap[ospec[0]] = (0,); omap[ospec[1]] = (1,)
    return DimMap(loops, (tuple(lmap), tuple(rmap)), (tuple(omap),), "sum", 0)


def dim_map(prim: str, params: dict, in_avals: Sequence[Any], out_avals: Sequence[Any],
            const_inputs: Sequence[bool]) -> DimMap | None:
    """The DimMap of one primitive application, or None when its semantics are unknown."""
    ins = [_shape(a) for a in in_avals]
    outs = [_shape(a) for a in out_avals]
    out = outs[0] if outs else ()
    if prim in ELEMENTWISE:
        if any(len(s) not in (0, len(out)) for s in ins):
            return None
        shapes = [() if c else s for s, c in zip(ins, const_inputs)]
        return elementwise_map(shapes, out, len(outs))
    if prim == "broadcast_in_dim":
        src = ins[0]
        omap = [() for _ in src]
        for d, o in enumerate(params["broadcast_dimensions"]):
            if src[d] == out[o]:
                omap[d] = (int(o),)
        main = None if const_inputs[0] or not src else 0
        return DimMap(out, (tuple(omap),) + (None,) * (len(ins) - 1), (_identity(len(out)),),
                      None, main)
    if prim in ("reshape", "squeeze", "expand_dims"):
        return reshape_map(ins[0], out)
    if prim == "transpose":
        perm = params["permutation"]
        omap = [()] * len(perm)
        for o, d in enumerate(perm):
            omap[d] = (o,)
        return DimMap(out, (tuple(omap),), (_identity(len(out)),), None, 0)
    if prim in _REDUCTIONS:
        axes = params["axes"]
        src = ins[0]
        kept = [d for d in range(len(src)) if d not in axes]
        return DimMap(src, (_identity(len(src)),), (tuple((d,) for d in kept),),
                      _REDUCTIONS[prim], 0)
    if prim in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"):
        axis = params.get("axis", params.get("dimension", 0))
        keep = [d != axis for d in range(len(out))]
        m = _partial_identity(out, keep)
        return DimMap(out, (m,) * len(ins), (m,) * len(outs), None, 0)
    if prim == "dot_general":
        return dot_general_map(ins[0], ins[1], params["dimension_numbers"])
    if prim == "conv_general_dilated":
        return _conv_map(ins[0], ins[1], out, params)
    if prim == "concatenate":
        dim = params["dimension"]
        m = _partial_identity(out, [d != dim for d in range(len(out))])
        return DimMap(out, (m,) * len(ins), (m,), None, 0)
    if prim == "split":
        axis = params["axis"]
        m = _partial_identity(ins[0], [d != axis for d in range(len(ins[0]))])
        return DimMap(ins[0], (m,), (m,) * len(outs), None, 0)
    if prim == "pad":
        cfg = params["padding_config"]
        m = _partial_identity(out, [c == (0, 0, 0) for c in cfg])
        return DimMap(out, (m, None), (m,), None, 0)
    if prim in ("slice", "dynamic_slice", "rev"):
        if prim == "rev":
            keep = [d not in params["dimensions"] for d in range(len(out))]
        else:
            keep = [ins[0][d] == out[d] for d in range(len(out))]
        m = _partial_identity(out, keep)
        return DimMap(out, (m,) + (None,) * (len(ins) - 1), (m,), None, 0)
    if prim == "dynamic_update_slice":
        keep = [ins[0][d] == ins[1][d] for d in range(len(out))]
        m = _partial_identity(out, keep)
        return DimMap(out, (m, m) + (None,) * (len(ins) - 2), (m,), None, 0)
    if prim == "iota":
        return DimMap(out, (), (_identity(len(out)),), None, None)
    if prim == "gather":
        return _gather_map(ins[0], ins[1], out, params["dimension_numbers"],
                           params["slice_sizes"])
    if prim == "scatter-add":
        return _scatter_add_map(ins[0], ins[1], ins[2], params["dimension_numbers"])
    return None


def flops_of(prim: str, params: dict, in_avals, out_avals, dims: DimMap | None) -> float:
    """FLOPs the way XLA's cost analysis counts them (2 per multiply-add)."""
    out_elems = sum(math.prod(_shape(a)) for a in out_avals)
    if prim == "dot_general" and dims is not None:
        return 2.0 * math.prod(dims.loop_sizes)
    if prim == "conv_general_dilated":
        rhs = _shape(in_avals[1])
        dn = params["dimension_numbers"]
        window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
        cin = rhs[dn.rhs_spec[1]]
        return 2.0 * out_elems * cin * window
    if prim in _REDUCTIONS:
        return float(math.prod(_shape(in_avals[0])))
    if prim in ELEMENTWISE and prim not in _TRANSCENDENTAL and prim not in (
            "convert_element_type", "sharding_constraint", "optimization_barrier", "copy",
            "copy_p", "stop_gradient"):
        return float(out_elems)
    return 0.0


def transcendentals_of(prim: str, out_avals) -> float:
    """Transcendental function evaluations (exp, tanh, ...), counted apart from FLOPs."""
    if prim in _TRANSCENDENTAL:
        return float(sum(math.prod(_shape(a)) for a in out_avals))
    return 0.0
