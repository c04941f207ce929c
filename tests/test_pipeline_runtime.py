"""Pipelined plans run for real on CPU devices and equal the unpipelined step."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

import meshplan as mp
from meshplan.examples import make
from meshplan.runtime import _pipestep


def _rel(a, b) -> float:
    """Relative error of two pytrees, as vectors: ||a - b|| / ||b||."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def gpts():
    """Unrolled GPTs with 4 and 6 blocks (6 and 8 pipeline layers), their reference
    (unpipelined, single program) results, and one meshplan step each (its traces shared
    by the plans below)."""
    out = {}
    for blocks in (4, 6):
        ex = make("gpt", layers=blocks)
        out[blocks] = (ex, jax.jit(ex.train_step)(*ex.args),
                       mp.auto_parallel(ex.train_step, time_limit=3))
    return out


CASES = [  # (blocks, devices, pp, schedule, tp, dp, remat); 4 microbatches of 2 samples
    (4, 8, 2, "gpipe", None, 2, "none"),  # data parallel inside each stage
    (4, 8, 2, "1f1b", 2, 2, "full"),  # tensor and data parallel; recomputation
    (4, 8, 2, "interleaved", 4, None, "none"),  # tensor parallel inside each stage
    (6, 8, 4, "1f1b", 2, None, "none"),
    (6, 4, 4, "interleaved", 1, 1, "full"),  # one device per stage: pipeline alone
    (4, 4, 4, "gpipe", 1, 1, "none"),
]


@pytest.mark.parametrize("blocks,devices,pp,schedule,tp,dp,remat", CASES)
def test_pipelined_step_equals_unpipelined(gpts, blocks, devices, pp, schedule, tp, dp, remat):
    ex, ref, step = gpts[blocks]
    cluster = mp.Cluster.local().subset(list(range(devices)))
    c = mp.Constraints(pp=pp, num_microbatches=4, schedule=schedule, tp=tp, dp=dp,
                       virtual_stages=2 if schedule == "interleaved" else None, remat=remat)
    plan = step.plan(*ex.args, constraints=c, cluster=cluster, compare_baselines=False)
    assert len(plan.stages) == pp * (2 if schedule == "interleaved" else 1)
    assert plan.pipeline.remat == remat
    out = step._jitted(ex.args, plan)(*ex.args)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    # Loss, parameters and optimizer state each as a whole (see test_runtime).
    errors = [_rel(a, b) for a, b in zip(out, ref)]
    assert max(errors) < 1e-5, errors
    _check_handover(step._jitted(ex.args, plan).runner)
    if remat == "full":  # backward programs recompute their stage's forward ops, so
        # forward programs hand on only what other stages read: less than without remat
        runner = step._jitted(ex.args, plan).runner
        progs = {(p.kind, p.stage): p for p in runner.programs if p.kind != "step"}
        plain = dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline,
                                                                      remat="none"))
        base = {(p.kind, p.stage): p for p in step._pipelined(ex.args, plain).runner.programs
                if p.kind != "step"}
        for (kind, k), pr in progs.items():
            if kind == "backward":
                fwd_ids = {n.id for n in progs["forward", k].nodes}
                assert fwd_ids <= {n.id for n in pr.nodes}
        assert sum(len(progs[key].outputs) for key in progs if key[0] == "forward") < \
            sum(len(base[key].outputs) for key in base if key[0] == "forward")
    # Each stage's parameters live on that stage's devices only (block 0 is layer 1).
    home = next(s for s in plan.stages if s.layers[0] <= 1 < s.layers[1])
    leaf = out[0]["blocks"][0]["fc1"]["kernel"]
    assert {d.id for d in leaf.sharding.device_set} <= set(home.device_ids)


def test_a_summed_loss_combines_microbatches_by_summing():
    """The executor measures whether the loss averages or sums over the batch."""
    ex = make("gpt", layers=4)

    def summed(params, opt_state, batch):
        p, o, loss = ex.train_step(params, opt_state, batch)
        return p, o, loss * batch["tokens"].shape[0]  # a sum over the batch of the mean

    ref = jax.jit(summed)(*ex.args)
    step = mp.auto_parallel(summed)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2, num_microbatches=2),
                     compare_baselines=False)
    out = step._jitted(ex.args, plan)(*ex.args)
    assert _rel(out[2], ref[2]) < 1e-5


def test_a_loss_divided_by_a_data_dependent_count_is_refused_not_combined_wrongly():
    """A masked mean is a mean over each microbatch with its own count: neither the mean
    nor the sum of the microbatches' values, so the pipeline refuses it."""
    import jax.numpy as jnp
    import optax
    k = jax.random.split(jax.random.key(0), 6)
    params = {"embed": jax.random.normal(k[0], (16, 32)) * 0.1,
              "blocks": [{"w": jax.random.normal(k[i + 1], (32, 32)) * 0.2}
                         for i in range(4)],
              "head": jax.random.normal(k[5], (32, 1)) * 0.1}
    tx = optax.sgd(0.1)
    batch = {"x": jax.random.normal(k[0], (8, 16)), "y": jnp.linspace(0, 1, 8)[:, None],
             "mask": jnp.array([1, 0, 0, 0, 1, 1, 1, 1], jnp.float32)}  # padded unevenly

    def step(p, o, batch):
        def loss_fn(p):
            h = batch["x"] @ p["embed"]
            for blk in p["blocks"]:
                h = h + jnp.tanh(h @ blk["w"])
            per = jnp.square(h @ p["head"] - batch["y"])[:, 0]
            return jnp.sum(per * batch["mask"]) / jnp.sum(batch["mask"])
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    pipelined = mp.auto_parallel(step, constraints=mp.Constraints(pp=2, num_microbatches=2))
    with pytest.raises(ValueError, match="neither the mean nor the sum.*masked mean"):
        pipelined(params, tx.init(params), batch)
    # Every sample counted, in bfloat16: a mean, though its rounding keeps it ~1e-2 off
    # the mean of the microbatches' values (not refused as a third way of combining).
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (params, batch))
    half[1]["mask"] = jnp.ones(8, jnp.bfloat16)
    args = (half[0], tx.init(half[0]), half[1])
    out = mp.auto_parallel(step, constraints=mp.Constraints(pp=2, num_microbatches=2))(*args)
    ref = jax.jit(step)(*args)
    assert abs(float(out[2]) - float(ref[2])) < 1e-2 * abs(float(ref[2]))


def test_a_gradient_zero_on_the_probed_microbatches_combines_as_the_others_do():
    """A weight only some later samples reach (here: flagged ones) has a zero gradient on
    the two microbatches the executor probes; it is averaged like every other value."""
    import jax.numpy as jnp
    import optax
    k = jax.random.split(jax.random.key(1), 7)
    params = {"embed": jax.random.normal(k[0], (16, 32)) * 0.1,
              "blocks": [{"w": jax.random.normal(k[i + 1], (32, 32)) * 0.2}
                         for i in range(4)],
              "head": jax.random.normal(k[5], (32, 1)) * 0.1,
              "flagged": jax.random.normal(k[6], (32, 1)) * 0.1}
    tx = optax.sgd(0.1)
    batch = {"x": jax.random.normal(k[0], (8, 16)), "y": jnp.linspace(0, 1, 8)[:, None],
             "flag": jnp.array([0, 0, 0, 0, 1, 1, 0, 1], jnp.float32)}

    def step(p, o, batch, compute=jnp.float32):
        def loss_fn(p):
            p = jax.tree.map(lambda w: w.astype(compute), p)  # mixed precision if bf16
            h = batch["x"].astype(compute) @ p["embed"]
            for blk in p["blocks"]:
                h = h + jnp.tanh(h @ blk["w"])
            out = h @ p["head"] + batch["flag"][:, None].astype(compute) * (h @ p["flagged"])
            return jnp.mean(jnp.square(out.astype(jnp.float32) - batch["y"]))
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        # A summed metric that is zero on the first two microbatches too: counted, not
        # averaged (3 flagged samples, not 3/4).
        return optax.apply_updates(p, u), o, loss, jnp.sum(batch["flag"])

    args = (params, tx.init(params), batch)
    ref = jax.jit(step)(*args)
    out = mp.auto_parallel(step, constraints=mp.Constraints(pp=2, num_microbatches=4))(*args)
    assert _rel(out[0], ref[0]) < 1e-5 and _rel(out[2], ref[2]) < 1e-5  # params, loss
    assert float(out[3]) == float(ref[3]) == 3.0
    # float32 weights, bfloat16 compute: the gradients (float32) carry bfloat16 rounding,
    # which is not taken for a third way of combining.
    half = functools.partial(step, compute=jnp.bfloat16)
    out = mp.auto_parallel(half, constraints=mp.Constraints(pp=2, num_microbatches=4))(*args)
    assert _rel(out[2], jax.jit(half)(*args)[2]) < 1e-2


def test_microbatches_that_do_not_divide_the_batch_are_refused_with_the_reason():
    ex = make("gpt", layers=4)  # batch 8
    step = mp.auto_parallel(ex.train_step)
    with pytest.raises(ValueError, match="does not divide the 2 samples each of dp=4"):
        step.plan(*ex.args, constraints=mp.Constraints(pp=2, dp=4, num_microbatches=4),
                  compare_baselines=False)


def test_a_pipelined_plan_cannot_be_compiled_as_one_program():
    ex = make("gpt", layers=4)
    step = mp.auto_parallel(ex.train_step)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2), compare_baselines=False)
    with pytest.raises(ValueError, match="one program per stage"):
        step.compile(*ex.args, plan=plan)


def test_recomputing_some_layers_runs_and_equals_unpipelined(gpts):
    """remat="layers": the backward programs rerun the forward ops of those layers only."""
    ex, ref, step = gpts[4]
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2, num_microbatches=4,
                                                          schedule="1f1b", remat="full"),
                     compare_baselines=False)
    some = dataclasses.replace(plan, pipeline=dataclasses.replace(
        plan.pipeline, remat="layers", recompute=(1, 4)))  # one block on each stage
    out = step._jitted(ex.args, some)(*ex.args)
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5
    runner = step._jitted(ex.args, some).runner
    full = step._jitted(ex.args, plan).runner
    size = lambda r, kind: sum(len(p.nodes) for p in r.programs if p.kind == kind)
    # Fewer forward ops rerun than under full recomputation, but some.
    assert size(runner, "forward") < size(runner, "backward")
    assert size(runner, "backward") < size(full, "backward")
    assert size(runner, "backward") > size(step._pipelined(ex.args, dataclasses.replace(
        plan, pipeline=dataclasses.replace(plan.pipeline, remat="none"))).runner, "backward")


def test_pinned_layer_recomputation_is_planned_even_when_every_activation_fits(gpts):
    """remat="layers" pinned on a model whose activations all fit: a "layers" plan that
    recomputes none (before: no plan, and a false out-of-memory error)."""
    ex, ref, step = gpts[4]
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2, remat="layers"),
                     compare_baselines=False)
    assert plan.pipeline.remat == "layers" and plan.pipeline.recompute == ()
    out = step._jitted(ex.args, plan)(*ex.args)
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5


def test_the_block_scan_is_cut_at_the_stage_boundaries():
    import doctest
    from meshplan.runtime import _scansplit
    assert doctest.testmod(_scansplit).failed == 0
    # Stages holding only the embedding or the head hold no scan steps.
    assert _scansplit.block_ranges([(0, 1), (1, 5), (5, 6)], 4) == ((0, 4),)
    assert _scansplit.block_ranges([(0, 3), (3, 6)], 4) == ((0, 2), (2, 4))


def _check_handover(runner):
    """What the executor's programs hand each other (AdamW, no clipping): a value is
    handed on by one program only (a recomputed or rebuilt copy stays inside the program
    that makes it again), a broadcast is made again where it is read rather than sent from
    another stage and held there for its readers, and the scalars made from Adam's step
    count are computed again by each stage's update instead of sent (a stage's update
    would otherwise be cut in two around them, with parameter-sized values held between
    the two programs)."""
    handed = [v for pr in runner.programs for v in pr.outputs]
    assert len(handed) == len(set(handed)), "a value handed on by two programs"
    # ... by the first program to make it in a microbatch's run (a copy made later would
    # replace it among the microbatch's values).
    per_micro = [pr for pr in runner.programs if pr.kind != "step"]
    run = sorted(per_micro, key=lambda pr: (pr.kind == "backward",
                                            -pr.stage if pr.kind == "backward" else pr.stage))
    for pr in per_micro:
        for v in pr.outputs:
            first = next(q for q in run if any(v in n.outputs for n in q.nodes))
            assert first is pr, (v, pr.kind, pr.stage, first.kind, first.stage)
    op = {v: n.primitive for n in runner.graph.nodes for v in n.outputs}
    sent = [(pr.kind, pr.stage, v) for pr in per_micro for v in pr.inputs
            if op.get(v) == "broadcast_in_dim" and v in runner.produced_by
            and runner.produced_by[v].stage != pr.stage]
    assert not sent, sent
    # No update program waits for a scalar from another stage's update.
    updates = [pr for pr in runner.programs if pr.kind == "step"]
    scalars = [(pr.stage, v) for pr in updates for v in pr.inputs
               if v in runner.produced_by and runner.produced_by[v].kind == "step"
               and runner.produced_by[v].stage != pr.stage
               and runner.graph.values[v].nbytes <= _pipestep._TINY_BYTES]
    assert not scalars, scalars


SCANNED = [  # (example, devices, pp, schedule, tp, dp, remat); 4 blocks in one scan
    ("gpt_scan", 8, 2, "1f1b", 2, 2, "none"),  # nnx.scan; tensor and data parallel
    ("transformer_scan", 8, 2, "interleaved", 2, None, "none"),  # lax.scan; 4 chunks
    ("transformer_scan", 4, 4, "gpipe", 1, 1, "full"),  # one block or more per stage
]


@pytest.mark.parametrize("name,devices,pp,schedule,tp,dp,remat", SCANNED)
def test_a_scanned_model_runs_pipelined_and_equals_unpipelined(name, devices, pp, schedule,
                                                               tp, dp, remat):
    """The scan over the blocks is cut at the stage boundaries: each stage scans its own
    blocks, with its own slice of the stacked weights, and the result is the whole step's."""
    ex = make(name, layers=4)
    ref = jax.jit(ex.train_step)(*ex.args)
    step = mp.auto_parallel(ex.train_step, time_limit=3)
    c = mp.Constraints(pp=pp, num_microbatches=4, schedule=schedule, tp=tp, dp=dp,
                       virtual_stages=2 if schedule == "interleaved" else None, remat=remat)
    plan = step.plan(*ex.args, constraints=c, cluster=mp.Cluster.local().subset(
        list(range(devices))), compare_baselines=False)
    run = step._jitted(ex.args, plan)
    out = run(*ex.args)
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5
    runner = run.runner
    _check_handover(runner)
    # Each stage's scans run exactly its blocks (pipeline layers 1..4 are scan steps 0..3).
    blocks = {k: min(hi, 5) - max(lo, 1) for k, (lo, hi) in
              enumerate(s.layers for s in plan.stages)}
    for pr in runner.programs:
        if pr.kind != "step":
            trips = {n.trip_count for n in pr.nodes if n.primitive == "scan"}
            assert trips <= {blocks[pr.stage]}, (pr.kind, pr.stage, trips)
    # A stage holds only its own blocks' rows of each stacked weight, on its devices, and
    # updates them there (the updated stack is assembled from the stages' rows).
    assert runner.input_slices and runner.output_pieces
    assert not any(n.primitive == "concatenate" and runner.graph.values[n.outputs[0]].shape[:1]
                   == (4,) for pr in runner.programs for n in pr.nodes if pr.kind == "step")
    for (v, k), x in runner._placed.items():
        if v in runner.input_slices:
            src, a, b = runner.input_slices[v]
            assert x.shape[0] == b - a < runner.graph.values[src].shape[0]
            # Device k's submesh is plan.stages[k]'s (virtual stages k + p, ... share it).
            assert {d.id for d in x.sharding.device_set} <= set(plan.stages[k].device_ids)


def test_predicted_stage_memory_matches_what_the_pipeline_holds(gpts):
    """Per stage, the planner's peak bytes per device are within 25 % of the executor's
    measured peak (live arrays + XLA's temporaries, see benchmarks/pipeline_memory.py), and
    1F1B's first stage holds fewer microbatches' activations than GPipe's."""
    ex, _, step = gpts[4]
    first = {}
    for schedule in ("gpipe", "1f1b"):
        c = mp.Constraints(pp=2, num_microbatches=4, schedule=schedule, tp=2, dp=2)
        plan = step.plan(*ex.args, constraints=c, compare_baselines=False)
        peaks = step._jitted(ex.args, plan).memory_peaks(*ex.args)
        predicted = dict(plan.cost.memory)
        for k, st in enumerate(plan.stages):
            measured = max(peaks[d] for d in st.device_ids)
            assert abs(predicted[f"stage {k}"] / measured - 1) <= 0.25, (schedule, k)
        first[schedule] = max(peaks[d] for d in plan.stages[0].device_ids)
    assert first["1f1b"] < first["gpipe"], first


def test_a_scanned_step_may_return_a_stacked_gradient_itself():
    """A stacked result of the backward pass (a per-layer gradient returned beside the
    update) is joined from the stages' pieces and accumulated over the microbatches."""
    import optax
    from meshplan.examples import transformer

    ex = make("transformer_scan", layers=4)
    tx = optax.adamw(1e-3)  # the example's own optimizer

    def with_grad(params, opt_state, batch):
        loss, grads = jax.value_and_grad(transformer._loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        w1 = grads["layers"]["mlp"]["w1"]  # [layers, hidden, 4 hidden]
        return optax.apply_updates(params, updates), opt_state, loss, w1

    ref = jax.jit(with_grad)(*ex.args)
    step = mp.auto_parallel(with_grad, time_limit=3)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2, num_microbatches=2, tp=2,
                                                          schedule="1f1b"),
                     compare_baselines=False)
    out = step._jitted(ex.args, plan)(*ex.args)
    assert out[3].shape == (4,) + ref[3].shape[1:]
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5


def test_a_scanned_model_clipped_by_its_global_norm_reduces_each_stage_s_own_rows():
    """optax.clip_by_global_norm sums the squares of every stacked gradient: each stage
    sums its own rows and only the partial sums move (no stage gathers a stacked array),
    the step equals the unpipelined one, and the predicted stage memory holds (25 %)."""
    import optax

    tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.1))  # always clips
    ex = make("transformer_scan", layers=4, tx=tx)
    ref = jax.jit(ex.train_step)(*ex.args)
    step = mp.auto_parallel(ex.train_step, time_limit=3)
    plan = step.plan(*ex.args, constraints=mp.Constraints(pp=2, num_microbatches=4, tp=2,
                                                          schedule="gpipe"),
                     compare_baselines=False)
    run = step._jitted(ex.args, plan)
    out = run(*ex.args)
    # SGD's update is the clipped gradient itself: a wrong norm would show here. (SGD
    # keeps no state: parameters and loss are compared.)
    assert max(_rel(out[k], ref[k]) for k in (0, 2)) < 1e-5
    runner = run.runner
    step_nodes = [n for pr in runner.programs if pr.kind == "step" for n in pr.nodes]
    whole = [(n.primitive, runner.graph.values[v].shape) for n in step_nodes
             for v in n.outputs if runner.graph.values[v].shape[:1] == (4,)]
    assert not whole, whole  # no step op makes a whole stack (4 blocks) anywhere
    # One partial sum of squares per stacked gradient on each of the 2 stages (2 blocks
    # each).
    partial = [n for n in step_nodes if n.primitive == "reduce_sum"
               and runner.graph.values[n.inputs[0]].shape[:1] == (2,)]
    assert len(partial) == 2 * len(jax.tree.leaves(ex.args[0]["layers"])), len(partial)
    peaks = run.memory_peaks(*ex.args)
    predicted = dict(plan.cost.memory)
    for k, st in enumerate(plan.stages):
        measured = max(peaks[d] for d in st.device_ids)
        assert abs(predicted[f"stage {k}"] / measured - 1) <= 0.25, (k, predicted, measured)
