"""Trace a JAX function to a meshplan `Graph`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend.core import Literal

from meshplan.ir._dims import dim_map, flops_of
from meshplan.ir._graph import ROLES, Graph, InputInfo, Node, Value
from meshplan.ir._util import paused_gc

# Call-like primitives whose body is spliced into the caller: they add no semantics a
# partitioner must respect (remat is kept apart, as a region, so it can be re-applied).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_REMAT = ("remat2", "checkpoint", "remat")
_REGIONS = ("scan", "while", "cond") + _REMAT


def _open(jaxpr) -> tuple[Any, Sequence[Any]]:
    """(Jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr, "consts"):
        return jaxpr.jaxpr, jaxpr.consts
    return jaxpr, ()


def _is_literal(x) -> bool:
    return type(x) is Literal


@dataclasses.dataclass
class _Builder:
    """Mutable state of one trace: value ids are unique across the graph and its bodies."""

    next_id: int = 0
    unknown: set = dataclasses.field(default_factory=set)
    # (primitive, params, shapes) -> (DimMap, FLOPs): repeated layers ask the same.
    semantics: dict = dataclasses.field(default_factory=dict)

    def value(self, aval, const=None) -> Value:
        shape = getattr(aval, "shape", ())
        if type(shape) is not tuple:
            shape = tuple(map(int, shape))
        dtype = getattr(aval, "dtype", None)
        dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype or np.float32)
        v = Value(self.next_id, shape, dtype, const)
        self.next_id += 1
        return v

    def graph(self, jaxpr, consts=()) -> Graph:
        """Build a Graph for an open jaxpr whose constvars hold `consts`."""
        values: dict[int, Value] = {}
        nodes: list[Node] = []
        env: dict[Any, int] = {}
        for var, c in zip(jaxpr.constvars, consts):
            v = self.value(var.aval, np.asarray(c) if not hasattr(c, "aval") else c)
            values[v.id] = v
            env[var] = v.id
        inputs = []
        for var in jaxpr.invars:
            v = self.value(var.aval)
            values[v.id] = v
            env[var] = v.id
            inputs.append(v.id)
        self._walk(jaxpr, env, values, nodes)
        outputs = tuple(self._read(x, env, values) for x in jaxpr.outvars)
        return Graph(values, nodes, tuple(inputs), outputs)

    def _read(self, x, env, values) -> int:
        if _is_literal(x):
            v = self.value(x.aval, np.asarray(x.val))
            values[v.id] = v
            return v.id
        return env[x]

    def _walk(self, jaxpr, env, values, nodes):
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            ins = [env[x] if type(x) is not Literal else self._read(x, env, values)
                   for x in eqn.invars]
            if prim in _INLINE and _INLINE[prim] in eqn.params:
                inner, consts = _open(eqn.params[_INLINE[prim]])
                inner_env: dict[Any, int] = {}
                for var, c in zip(inner.constvars, consts):
                    v = self.value(var.aval, c)
                    values[v.id] = v
                    inner_env[var] = v.id
                # custom_vjp_call passes consts first; its call_jaxpr takes every operand.
                for var, vid in zip(inner.invars, ins[len(ins) - len(inner.invars):]):
                    inner_env[var] = vid
                self._walk(inner, inner_env, values, nodes)
                for var, x in zip(eqn.outvars, inner.outvars):
                    env[var] = self._read(x, inner_env, values)
                continue
            outs = []
            for var in eqn.outvars:
                v = self.value(var.aval)
                values[v.id] = v
                env[var] = v.id
                outs.append(v.id)
            nodes.append(self._node(eqn, prim, ins, outs, values))

    def _node(self, eqn, prim, ins, outs, values) -> Node:
        if prim in _REGIONS:
            nbytes = float(sum(values[v].nbytes for v in ins + outs))
            bodies, trip = self._bodies(eqn, prim)
            return Node(self.next_node(), prim, tuple(ins), tuple(outs), 0.0, nbytes, None,
                        eqn, bodies, trip)
        const = tuple(values[i].is_const for i in ins)
        key = _semantics_key(prim, eqn.params, ins, outs, const, values)
        found = self.semantics.get(key) if key is not None else None
        if found is None:
            in_avals = [x.aval for x in eqn.invars]
            out_avals = [x.aval for x in eqn.outvars]
            dims = dim_map(prim, eqn.params, in_avals, out_avals, const)
            found = (dims, flops_of(prim, eqn.params, in_avals, out_avals, dims),
                     float(sum(values[v].nbytes for v in ins + outs)),
                     len(self.semantics) if key is not None else -1)
            if key is not None:
                self.semantics[key] = found
        dims, flops, nbytes, semantics = found
        if dims is None and prim not in _KNOWN_OPAQUE:
            self.unknown.add(prim)
        return Node(self.next_node(), prim, tuple(ins), tuple(outs), flops, nbytes, dims, eqn,
                    semantics=semantics)

    def next_node(self) -> int:
        # Node ids share the value counter so ids stay unique across bodies too.
        self.next_id += 1
        return self.next_id - 1

    def _bodies(self, eqn, prim) -> tuple[tuple[Graph, ...], int]:
        p = eqn.params
        if prim == "scan":
            return (self.graph(*_open(p["jaxpr"])),), int(p["length"])
        if prim in _REMAT:
            return (self.graph(*_open(p["jaxpr"])),), 1
        if prim == "while":
            cond = self.graph(*_open(p["cond_jaxpr"]))
            body = self.graph(*_open(p["body_jaxpr"]))
            return (cond, body), _while_trip_count(eqn)
        branches = tuple(self.graph(*_open(b)) for b in p["branches"])
        return branches, 1


def _semantics_key(prim, params, ins, outs, const, values) -> tuple | None:
    """What an op's DimMap and FLOPs depend on, or None if its params do not hash."""
    key = (prim, tuple(sorted(params.items())),
           tuple((values[i].shape, values[i].dtype) for i in ins),
           tuple((values[o].shape, values[o].dtype) for o in outs), const)
    try:
        hash(key)
    except TypeError:  # e.g. a jaxpr-valued or array-valued parameter
        return None
    return key


# Primitives that are understood but deliberately kept whole (replicated): not "unknown".
_KNOWN_OPAQUE = frozenset(
    "random_bits random_seed random_wrap random_unwrap random_fold_in random_split "
    "threefry2x32 rng_bit_generator rng_uniform select_and_scatter_add reduce_window_sum "
    "reduce_window_max reduce_window select_and_gather_add top_k".split())


def _while_trip_count(eqn) -> int:
    """Trip count of a `fori_loop`-shaped while (counter from a literal to a literal), else 1."""
    cond, _ = _open(eqn.params["cond_jaxpr"])
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
        return 1
    lhs, rhs = cond.eqns[0].invars
    if not _is_literal(rhs):
        return 1
    # Without the initial counter value (an operand of the while), assume it starts at 0.
    return max(int(rhs.val), 1)


def default_roles(num_args: int) -> tuple[str, ...]:
    """Role of each positional argument of a step: (params, opt_state, batch...) by position."""
    if num_args == 1:
        return ("data",)
    if num_args == 2:
        return ("param", "data")
    return ("param", "opt_state") + ("data",) * (num_args - 2)


def trace(fn: Callable, *args, roles: Sequence[str] | None = None) -> Graph:
    """Trace `fn(*args)` to a Graph.

    `args` may hold arrays or `jax.ShapeDtypeStruct`s. Inputs are tagged with their pytree
    path and role ("param", "opt_state", "data"), by default from their position.

    Example:
        >>> g = trace(lambda w, x: jnp.tanh(x @ w), jnp.ones((4, 8)), jnp.ones((2, 4)))
        >>> [n.primitive for n in g.nodes]
        ['dot_general', 'tanh']
    """
    roles = tuple(roles) if roles is not None else default_roles(len(args))
    if len(roles) != len(args):
        raise ValueError(f"roles has {len(roles)} entries for {len(args)} arguments; give one "
                         f"role per positional argument, each one of {ROLES}.")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"unknown role(s) {bad}; each role must be one of {ROLES}.")
    with paused_gc():
        # return_shape gives the result's pytree from the same trace (no second pass).
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        builder = _Builder()
        g = builder.graph(closed.jaxpr, closed.consts)
        infos = []
        flat_i = 0
        for arg_index, arg in enumerate(args):
            for path, _ in jax.tree_util.tree_flatten_with_path(arg)[0]:
                infos.append(InputInfo(g.inputs[flat_i], arg_index,
                                       f"[{arg_index}]" + jax.tree_util.keystr(path),
                                       roles[arg_index]))
                flat_i += 1
    if flat_i != len(g.inputs):
        raise ValueError(f"traced {len(g.inputs)} inputs but the arguments flatten to {flat_i} "
                         "leaves; pass static values with static_argnums instead of as arrays.")
    g.input_info = tuple(infos)
    g.unknown_primitives = tuple(sorted(builder.unknown))
    g.out_shape = out_shape
    return g
