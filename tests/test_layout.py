"""meshplan.planner._layout.reshard: the collectives XLA really emits between two layouts.

Each case compiles ``wsc(wsc(x, src), dst)`` (how the runtime pins layouts, on Auto axes)
and compares the prediction with what `meshplan.runtime.measure` reads from the HLO:
total bytes sent per device, the kinds, and each collective's S and group size.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding

from meshplan.planner._layout import Comm, legal, reshard
from meshplan.planner._plan import spec_of
from meshplan.runtime import measure

F32 = 4

# (mesh shape, array shape, src, dst): one or more per rule of planner/_layout.py's docstring.
CASES = [
    # 1-D mesh
    ((8,), (16, 32), ((0,), ()), ((), (0,))),                     # axis moves: all-to-all
    ((8,), (16, 32), ((), (0,)), ((), ())),                       # axis dropped: all-gather
    ((8,), (8, 16, 32), ((), (), ()), ((), (0,), ())),            # axis added: local slice
    ((8,), (8, 4, 16, 32), ((), (), (0,), ()), ((0,), (), (), ())),
    # rule 1: same tiling, another device order -> collective-permute
    ((2, 4), (16, 32), ((0, 1), ()), ((1, 0), ())),
    ((4, 2), (8, 16, 32), ((), (1, 0), ()), ((), (0, 1), ())),
    # rule 2: all-to-all, a permute after it when the device order comes out wrong
    ((2, 4), (16, 32), ((0,), ()), ((), (0,))),
    ((2, 4), (16, 32), ((0,), ()), ((), (1, 0))),
    ((2, 4), (16, 32), ((0,), ()), ((), (0, 1))),
    ((2, 4), (16, 32), ((), (0, 1)), ((0, 1), ())),
    ((2, 4), (16, 32), ((0,), (1,)), ((1,), (0,))),
    ((4, 2), (2, 12, 8), ((), (0,), (1,)), ((1,), (), (0,))),     # two all-to-alls
    ((2, 4), (8, 4, 16, 32), ((0,), (1,), (), ()), ((), (), (0,), (1,))),
    ((2, 4), (8, 4, 16, 32), ((), (), (0,), (1,)), ((0,), (1,), (), ())),  # merged: one of 8
    # rule 3: only axes added to a partly replicated layout: slice, maybe a permute
    ((2, 4), (16, 32), ((), (0,)), ((), (1,))),
    ((4, 2), (6, 16), ((), (0,)), ((), (1, 0))),
    ((2, 4), (8, 16, 32), ((), (1,), ()), ((0,), (1,), ())),
    # rule 4: only axes dropped: an all-gather per dim over the dropped factor
    ((2, 4), (16, 32), ((0,), (1,)), ((), (1,))),
    ((2, 4), (16, 32), ((0,), (1,)), ((), ())),
    ((4, 2), (6, 16), ((), (0, 1)), ((), (0,))),
    ((2, 4), (6, 16), ((), (0, 1)), ((), (1,))),                  # part of an axis + permute
    ((4, 2), (6, 16), ((1,), (0,)), ((), (1,))),
    # rule 5: composite patterns (gather one dim, then all-to-all; split/merge a dim)
    ((2, 4), (2, 12, 8), ((), (0,), (1,)), ((), (1,), ())),
    ((4, 2), (2, 12, 8), ((), (0,), (1,)), ((1,), (), ())),
    ((2, 4), (8, 16, 32), ((), (0,), ()), ((0, 1), (), ())),
    ((2, 4), (2, 12, 8), ((), (), (1, 0)), ((), (1,), (0,))),
    # rule 6: a dim whose tiling is unchanged is held fixed
    ((2, 4), (8, 16, 32), ((0,), (1,), ()), ((0,), (), (1,))),
    ((4, 2), (8, 4, 16, 32), ((), (0,), (1,), ()), ((), (0,), (), (1,))),
    # rule 7: "Involuntary full rematerialization": gather everything, then slice
    ((2, 4), (8, 4, 16, 32), ((0, 1), (), (), ()), ((), (1,), (), ())),  # the reported case
    ((2, 4), (6, 16), ((), (1,)), ((0,), ())),
    ((4, 2), (6, 16), ((), (0, 1)), ((1,), ())),
    ((2, 4), (2, 12, 8), ((0,), (1,), ()), ((), (), (0, 1))),
    # 3-axis mesh
    ((2, 2, 2), (16, 32), ((), (2, 1)), ((1, 2, 0), ())),
    ((2, 2, 2), (16, 32), ((0, 2), (1,)), ((1,), ())),
    ((2, 2, 2), (8, 16, 32), ((), (0,), (1, 2)), ((0,), (2, 1), ())),
    ((2, 2, 2), (8, 4, 16, 32), ((0,), (), (1,), ()), ((), (2, 0), (), (1,))),
    ((2, 2, 2), (8, 16, 32), ((0,), (2,), (1,)), ((2, 1), (), ())),
]


@functools.cache
def _mesh(mesh_shape):
    names = tuple(f"a{i}" for i in range(len(mesh_shape)))
    devices = np.array(jax.devices()[:math.prod(mesh_shape)]).reshape(mesh_shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(mesh_shape))


def _measure(mesh_shape, shape, src, dst):
    mesh = _mesh(mesh_shape)
    s1 = NamedSharding(mesh, spec_of(src, mesh.axis_names))
    s2 = NamedSharding(mesh, spec_of(dst, mesh.axis_names))
    wsc = jax.lax.with_sharding_constraint
    f = jax.jit(lambda x: wsc(wsc(x, s1), s2), in_shardings=s1, out_shardings=s2)
    return measure(f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile())


@pytest.mark.parametrize("mesh_shape,shape,src,dst", CASES,
                         ids=[f"{m}-{s}-{a}-{b}" for m, s, a, b in CASES])
def test_reshard_matches_xla(mesh_shape, shape, src, dst):
    assert legal(src, shape, mesh_shape) and legal(dst, shape, mesh_shape)
    measured = _measure(mesh_shape, shape, src, dst)
    comms = reshard(F32 * math.prod(shape), src, dst, mesh_shape)
    predicted = sum(c.bytes_sent(mesh_shape) for c in comms)
    assert predicted == pytest.approx(measured.comm_bytes, rel=0.01, abs=1e-9), (
        comms, measured.collectives)
    found = [c for c in measured.collectives if c.comm_bytes > 0]
    assert sorted(c.kind for c in comms) == sorted(c.kind for c in found)
    # The same collectives: S and group size each (a permute's group is not comparable).
    def sig(kind, nbytes, n):
        return kind, round(nbytes), 0 if kind == "collective-permute" else n
    assert sorted(sig(c.kind, c.nbytes, c.group_size(mesh_shape)) for c in comms) == \
        sorted(sig(c.kind, c.nbytes, c.group_size) for c in found)


def test_axis_moved_while_another_dropped_is_a_full_gather():
    """[8,1,1,1] -> [1,4,1,1,2] last_tile_dim_replicate on a 2x4 mesh: XLA cannot do an
    all-to-all and gathers the whole array before slicing (not 14 kB of all-to-all)."""
    nbytes = F32 * 8 * 4 * 16 * 32
    comms = reshard(nbytes, ((0, 1), (), (), ()), ((), (1,), (), ()), (2, 4))
    assert comms == (Comm("all-gather", nbytes, (0, 1)),)


def test_adding_axes_is_free_and_bytes_scale():
    assert reshard(4096, ((), ()), ((0,), (1,)), (2, 4)) == ()
    assert reshard(4096, ((), (1,)), ((0,), (1,)), (2, 4)) == ()
    a = reshard(1000.0, ((0,), (1,)), ((1,), (0,)), (2, 4))
    b = reshard(3000.0, ((0,), (1,)), ((1,), (0,)), (2, 4))
    assert [c.kind for c in a] == [c.kind for c in b]
    assert [3 * c.nbytes for c in a] == [c.nbytes for c in b]


def test_gather_over_part_of_an_axis_counts_its_own_group():
    """Dim 1 split by axis 1 (4) -> by axis 0 (2) on a 2x4 mesh: XLA permutes the quarters
    so that each target half sits on a pair of devices of axis 1, then gathers inside
    those pairs: a group of 2 that is only part of axis 1."""
    comms = reshard(4096, ((), (1,)), ((), (0,)), (2, 4))
    assert [c.kind for c in comms] == ["collective-permute", "all-gather"]
    gather = comms[1]
    assert gather.axes == (1,) and gather.group == 2 and gather.nbytes == 2048
    assert gather.bytes_sent((2, 4)) == pytest.approx(2048 / 2)


def test_swaps_xla_cannot_merge_cost_a_full_gather():
    """Three chained dim swaps where XLA merges two that only work one after the other:
    jax 0.10.2's compiler dies of a division by zero (SIGFPE) on this reshard, so it is
    priced as the most expensive one, a full gather (not compiled here: it would crash)."""
    src, dst = ((0,), (), (2,), (1,)), ((2,), (1,), (0,), ())
    nbytes = F32 * 16 * 8 * 4 * 32
    comms = reshard(nbytes, src, dst, (4, 2, 2))
    assert [c.kind for c in comms] == ["all-gather"] * 3
    assert comms[-1].nbytes == nbytes
