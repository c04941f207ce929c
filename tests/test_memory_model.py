"""Memory model: fusion, schedule, buffer assignment; predictions against XLA's numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshplan as mp
from meshplan import ir
from meshplan.examples import make
from meshplan.planner._memory import _assign, liveness, memory
from meshplan.planner._ops import build_view

F32 = 4


def _view(fn, shapes, roles):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return build_view(ir.trace(fn, *args, roles=roles))


def _replicated(view):
    return {v: ((),) * len(val.shape) for v, val in view.values.items()}


def _producers(view):
    return {v: op.prim for op in view.ops for v in op.outputs}


def test_tiny_graph_liveness_by_hand():
    # h = x @ w1 is stored (a matmul result); a = tanh(h) is stored because a matmul reads
    # it; y = a @ w2 and z = sum(a) are the step's results.
    def f(w1, w2, x):
        a = jnp.tanh(x @ w1)
        return a @ w2, jnp.sum(a)

    shapes = [(8, 16), (16, 8), (4, 8)]
    view = _view(f, shapes, ("param", "param", "data"))
    live = liveness(view)
    h, a, y, z = (op.outputs[0] for op in view.ops if op.kind == "op")
    # Schedule (slot: op): 0 x@w1, 1 tanh, 2 sum (a scalar: XLA's list scheduler takes it
    # first), 3 a@w2. A value lives from its producer's write phase 2s+1 to its last
    # reader's write phase 2s+1, except that tanh writes over h (same shape, dies there):
    # h ends at tanh's read phase 2. Results live to the last phase, 7.
    got = {v: (int(s), int(e), bool(o))
           for v, s, e, o in zip(live.temps, live.start, live.end, live.is_out)}
    assert got == {h: (1, 2, False), a: (3, 7, False), z: (5, 7, True), y: (7, 7, True)}
    # Bytes: arguments 4 * (128 + 128 + 32); results y [4,8] and z [], plus the results
    # tuple (8 B per pointer); temporaries h and a, 256 B each, never live together, too
    # large for the results' buffers: a 256 B heap. XLA says exactly the same.
    mem = memory(view, live, _replicated(view), (1,))
    assert (mem.argument, mem.output, mem.temp, mem.alias) == (
        F32 * (128 + 128 + 32), F32 * (32 + 1) + 2 * 8, 256, 0)
    xla = jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]) \
        .compile().memory_analysis()
    assert (xla.argument_size_in_bytes, xla.output_size_in_bytes, xla.temp_size_in_bytes) == (
        mem.argument, mem.output, mem.temp)


def test_fused_chain_is_not_stored():
    # exp, the multiply and the add are fused into the reduction: only the matmul result
    # and the reduction's result are buffers.
    view = _view(lambda w, x: jnp.sum(jnp.exp(x @ w) * 3.0 + 1.0, axis=0),
                 [(8, 8), (16, 8)], ("param", "data"))
    live = liveness(view)
    prim = _producers(view)
    assert sorted(prim[v] for v in live.temps) == ["dot_general", "reduce_sum"]


def test_temporaries_reuse_result_buffers_written_later():
    # Two results of 100 B written at phases 5 and 9. A 100 B temporary dead by phase 4 fits
    # in the first; one live over [6, 8] in the second; one live over [2, 9] in none.
    out_sizes, out_start = np.array([100.0, 100.0]), np.array([5, 9])
    fits = _assign(np.array([100.0, 100.0]), np.array([0, 6]), np.array([4, 8]),
                   out_sizes, out_start)
    assert fits == 0.0
    heap = _assign(np.array([100.0, 60.0]), np.array([2, 0]), np.array([9, 1]),
                   out_sizes, out_start)
    assert heap == 100.0  # the 60 B one fits a result buffer, the other needs the heap


def _first_fit_reference(sizes, start, end, out_sizes, out_start) -> float:
    """The same buffer assignment written plainly: every allocation tried in order."""
    allocs = sorted(range(len(out_sizes)), key=lambda j: (out_sizes[j], out_start[j]))
    busy = {j: [] for j in allocs}
    heap = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], start[i])):
        a, b = start[i], end[i]
        for j in allocs:
            if out_sizes[j] >= sizes[i] and out_start[j] > b and \
                    all(e < a or s > b for s, e in busy[j]):
                busy[j].append((a, b))
                break
        else:
            heap.append(i)
    phases = range(max(list(end) + list(out_start)) + 1)
    return max([sum(sizes[i] for i in heap if start[i] <= t <= end[i]) for t in phases],
               default=0.0)


@pytest.mark.parametrize("seed", range(6))
def test_buffer_assignment_equals_a_plain_first_fit(seed):
    # Nested lifetimes (a forward pass's activations, freed in reverse) and short ones,
    # over more results than a skip block holds, in a few sizes: the skip structures of
    # _assign must not change which allocation a temporary gets.
    rng = np.random.default_rng(seed)
    n_out, n_tmp, phases = 80, 400, 400
    # Results written in the step's last 40 phases (the update), temporaries dead before.
    out_sizes = rng.choice([64.0, 128.0, 256.0], n_out)
    out_start = rng.integers(phases - 40, phases, n_out)
    nested = rng.integers(0, phases // 2 - 30, n_tmp // 2)
    starts = np.concatenate([nested, rng.integers(0, phases - 40, n_tmp - len(nested))])
    lengths = np.concatenate([phases - 60 - 2 * nested,
                              rng.integers(0, 20, n_tmp - len(nested))])
    ends = np.minimum(starts + lengths, phases - 41)
    sizes = rng.choice([32.0, 64.0, 128.0, 256.0, 512.0], n_tmp)
    assert _assign(sizes, starts, ends, out_sizes, out_start) == \
        _first_fit_reference(sizes, starts, ends, out_sizes, out_start)


def test_optimizer_updates_run_next_to_their_gradients():
    # In program order every Adam update follows the whole backward pass; XLA's list
    # scheduler runs each update once its gradient exists, so the last layer's parameters
    # are written before the first layer's weight gradient is computed.
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step)
    t = step.trace(*ex.args)
    view = build_view(t.graph, t.pairs)
    live = liveness(view)
    prim = _producers(view)
    dots = [int(s) for v, s in zip(live.temps, live.start) if prim[v] == "dot_general"]
    updates = [int(s) for v, s, o in zip(live.temps, live.start, live.is_out) if o]
    assert min(updates) < max(dots)
    # and no two weight gradients of the 256x256 layer... are live when the peak is reached:
    # the temporaries' peak is below the gradients' total.
    sizes = np.array([view.values[v].nbytes for v in live.temps], dtype=float)
    temp = ~live.is_out
    delta = np.zeros(live.n_phases + 1)
    np.add.at(delta, live.start[temp], sizes[temp])
    np.add.at(delta, live.end[temp] + 1, -sizes[temp])
    params = sum(view.values[v].nbytes for v in live.args
                 if any(i.value == v and i.role == "param" for i in t.graph.input_info))
    assert np.cumsum(delta).max() < params


def test_results_are_counted_in_their_pinned_layout():
    # The dp baseline replicates parameters and optimizer state: the updated ones are
    # returned replicated (out_shardings = in_shardings), whatever layout they were
    # computed in.
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = mp.baselines(step, *ex.args)["dp"]
    leaves = jax.tree.leaves(ex.args[:2])
    state_bytes = sum(x.nbytes for x in leaves)
    loss_bytes, table = 4, 8 * (len(leaves) + 1)  # + the results tuple's pointers
    predicted = dict(plan.cost.memory)["output"]
    assert predicted == state_bytes + loss_bytes + table
    m = mp.measure(step.compile(*ex.args, plan=plan))
    assert predicted == m.output_bytes


@pytest.mark.parametrize("name,tp", [("mlp", 8), ("gpt", 8), ("moe", 4), ("gpt_scan", 2)])
def test_peak_memory_within_25_percent_of_xla(name, tp):
    ex = make(name)
    step = mp.auto_parallel(ex.train_step, time_limit=2)
    plan = step.plan(*ex.args, constraints=mp.Constraints(tp=tp, dp=8 // tp),
                     compare_baselines=False)
    m = mp.measure(step.compile(*ex.args, plan=plan))
    ratio = plan.cost.peak_memory / m.peak_memory
    assert 0.75 <= ratio <= 1.25, (name, tp, ratio, dict(plan.cost.memory), m)
    # Arguments and results are exact.
    assert dict(plan.cost.memory)["argument"] == m.argument_bytes
    assert dict(plan.cost.memory)["output"] == m.output_bytes


def test_deep_tp8_memory_grows_per_block_as_xla():
    # Under tp=8 the GPT's activations are whole on every device, its LayerNorm
    # reductions are big enough for XLA:CPU's YNNPACK fusions, and the scale and 1/sigma
    # broadcasts they read are buffers of their own, four per block. Missing them, the
    # model grew by 0.43 MB per block where XLA grows by 0.69 MB (pred/meas 0.70 at 16
    # blocks). The per-block growth is compared, so a constant offset cannot hide it.
    temps = {}
    for layers in (2, 4):
        ex = make("gpt", layers=layers)
        step = mp.auto_parallel(ex.train_step, time_limit=2)
        plan = step.plan(*ex.args, constraints=mp.Constraints(tp=8), compare_baselines=False)
        m = mp.measure(step.compile(*ex.args, plan=plan))
        temps[layers] = (dict(plan.cost.memory)["temp"], m.temp_bytes)
    pred_growth = temps[4][0] - temps[2][0]
    meas_growth = temps[4][1] - temps[2][1]
    assert abs(pred_growth / meas_growth - 1) < 0.1, temps
    for pred, meas in temps.values():
        assert abs(pred / meas - 1) < 0.1, temps
