"""Runtime: plans run for real on 8 CPU devices and equal the unsharded step."""
import jax
import numpy as np
import pytest

import meshplan as mp
from meshplan.examples import ALL_EXAMPLES, make


def _rel(a, b) -> float:
    """Relative error of two pytrees, as vectors: ||a - b|| / ||b||."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_sharded_step_equals_unsharded(name, tp):
    ex = make(name)
    step = mp.auto_parallel(ex.train_step, time_limit=3)
    plan = step.plan(*ex.args, constraints=mp.Constraints(tp=tp, dp=8 // tp),
                     compare_baselines=False)
    out = step._jitted(ex.args, plan)(*ex.args)
    ref = jax.jit(ex.train_step)(*ex.args)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    # Loss, updated parameters and optimizer state each match as a whole. (Element by
    # element, Adam's first step g / (|g| + eps) turns rounding noise in near-zero
    # gradients into full-size updates that differ between any two summation orders.)
    errors = [_rel(a, b) for a, b in zip(out, ref)]
    assert max(errors) < 1e-5, (name, tp, errors)
    # The arguments really are laid out as planned.
    params_out = jax.tree.leaves(out[0])
    assert any(len(x.sharding.device_set) == 8 for x in params_out)


def test_auto_plan_runs_and_prediction_matches_xla_for_the_mlp():
    ex = make("mlp")
    step = mp.auto_parallel(ex.train_step, time_limit=3)
    plan = step.plan(*ex.args, compare_baselines=False)
    _, _, loss = step(*ex.args)
    _, _, ref = jax.jit(ex.train_step)(*ex.args)
    assert _rel(loss, ref) < 1e-5
    m = mp.measure(step.compile(*ex.args))
    assert m.comm_bytes == pytest.approx(plan.cost.comm_bytes, rel=0.10)
    assert m.flops == pytest.approx(plan.cost.flops, rel=0.10)
    assert m.peak_memory == pytest.approx(plan.cost.peak_memory, rel=0.25)


def test_plan_for_a_described_cluster_runs_on_local_devices():
    ex = make("mlp")
    cluster = mp.clusters.dgx_a100(nodes=1)
    plan = mp.auto_parallel(ex.train_step, cluster=cluster, time_limit=2).plan(
        *ex.args, compare_baselines=False)
    local = mp.auto_parallel(ex.train_step, plan=plan)  # no cluster given: local devices
    _, _, loss = local(*ex.args)
    _, _, ref = jax.jit(ex.train_step)(*ex.args)
    assert _rel(loss, ref) < 1e-5


def test_too_few_devices_is_a_clear_error():
    from meshplan.runtime import build_mesh
    ex = make("mlp")
    plan = mp.auto_parallel(ex.train_step, time_limit=2).plan(*ex.args, compare_baselines=False)
    with pytest.raises(ValueError, match="needs 8 devices"):
        build_mesh(plan, jax.devices()[:4])
