"""Apply a plan: build the mesh, re-interpret the traced step, pin layouts, jit.

The traced graph is evaluated equation by equation with each primitive's own `bind`, and
`jax.lax.with_sharding_constraint` placed where the plan fixes a layout; scans are rebuilt
with `jax.lax.scan` over an interpreted body and remat regions with `jax.checkpoint`, so
the program XLA sees is the user's program plus annotations. Public JAX API only.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from meshplan.ir import Graph, Node
from meshplan.planner import Plan, spec_of

_REMAT = ("remat2", "checkpoint", "remat")
# A user's own sharding annotations name a mesh of theirs; the plan's pins replace them.
_DROPPED = ("sharding_constraint",)


def build_mesh(plan: Plan, devices: Sequence[Any] | None = None) -> Mesh:
    """The plan's logical mesh over local devices, in the plan's device order (Auto axes).

    A plan made for a described cluster of N devices runs on any N local devices: physical
    id i of the plan is the i-th of `devices` (default `jax.devices()`).
    """
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(plan.mesh_shape)
    if len(devices) != need:
        raise ValueError(f"the plan needs {need} devices (mesh {plan.mesh_shape}) but "
                         f"{len(devices)} are available; plan for this device count, or on CPU "
                         f"set jax.config.update('jax_num_cpu_devices', {need}) before JAX starts.")
    grid = np.array(devices, dtype=object)[np.asarray(plan.device_order)].reshape(plan.mesh_shape)
    return Mesh(grid, plan.axis_names, axis_types=(AxisType.Auto,) * len(plan.mesh_shape))


def read_value(g: Graph, env: dict, v: int):
    """Value `v` of graph `g`: its constant, or what `env` holds for it."""
    val = g.values[v]
    if val.is_const:
        return val.const if hasattr(val.const, "aval") else np.asarray(val.const, val.dtype)
    return env[v]


class Interpreter:
    """Evaluates a Graph under a plan, pinning the planned layouts."""

    def __init__(self, graph: Graph, plan: Plan, mesh: Mesh):
        self.graph = graph
        self.plan = plan
        self.mesh = mesh

    def sharding(self, layout) -> NamedSharding:
        return NamedSharding(self.mesh, spec_of(layout, self.plan.axis_names))

    def _pin(self, x, layout):
        if layout is None or not hasattr(x, "shape") or len(layout) != len(x.shape):
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(layout))

    def run(self, g: Graph, inputs: Sequence[Any], pin_inputs: bool = False) -> list:
        env: dict[int, Any] = {}
        resharded: dict[tuple, Any] = {}
        for v, x in zip(g.inputs, inputs):
            env[v] = self._pin(x, self.plan.value_layouts.get(v)) if pin_inputs else x

        def read(v: int):
            return read_value(g, env, v)

        for node in g.nodes:
            ins = [read(v) for v in node.inputs]
            want = self.plan.op_inputs.get(node.id)
            if want is not None:
                for k, (v, lay) in enumerate(zip(node.inputs, want)):
                    if lay is None or g.values[v].is_const:
                        continue
                    if lay != self.plan.value_layouts.get(v):
                        key = (v, lay)
                        if key not in resharded:  # one reshard per value and layout
                            resharded[key] = self._pin(ins[k], lay)
                        ins[k] = resharded[key]
            outs = self._eval(node, ins)
            for v, x in zip(node.outputs, outs):
                env[v] = self._pin(x, self.plan.value_layouts.get(v))
        return [read(v) for v in g.outputs]

    def _eval(self, node: Node, ins: list) -> list:
        eqn = node.eqn
        if node.primitive == "scan":
            return self._scan(node, ins)
        if node.primitive in _REMAT:
            body = node.bodies[0]
            fn = jax.checkpoint(lambda *a: self.run(body, a, pin_inputs=True),
                                prevent_cse=eqn.params.get("prevent_cse", True),
                                policy=eqn.params.get("policy"))
            return list(fn(*ins))
        if node.primitive in _DROPPED:
            return ins[:len(node.outputs)]
        params = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(params, tuple):  # older JAX returned (subfuns, params)
            params = params[1]
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*ins, **params)
        return list(out) if eqn.primitive.multiple_results else [out]

    def _scan(self, node: Node, ins: list) -> list:
        p = node.eqn.params
        body = node.bodies[0]
        nc, nk = p["num_consts"], p["num_carry"]
        consts, init, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
        lays = self.plan.value_layouts
        carry_lays = [lays.get(v) for v in body.inputs[nc:nc + nk]]
        init = [self._pin(x, l) for x, l in zip(init, carry_lays)]
        xs = [self._pin(x, None if lays.get(v) is None else ((),) + lays[v])
              for x, v in zip(xs, body.inputs[nc + nk:])]

        def step(carry, x):
            outs = self.run(body, list(consts) + list(carry) + list(x), pin_inputs=True)
            new = [self._pin(o, l) for o, l in zip(outs[:nk], carry_lays)]
            return new, outs[nk:]

        carry, ys = jax.lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"],
                                 unroll=p.get("unroll", 1))
        return list(carry) + list(ys)


def interpret(graph: Graph, plan: Plan, mesh: Mesh):
    """A function of the flat argument leaves that runs `graph` with the plan's pins."""
    it = Interpreter(graph, plan, mesh)

    def run(*flat_args):
        return it.run(graph, flat_args)

    return run
