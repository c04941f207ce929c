"""Calibration: measuring the 8 local CPU devices into a cluster file that plans can use."""
from __future__ import annotations

import doctest
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import meshplan as mp
from meshplan.__main__ import main
from meshplan.costmodel import _calibrate
from meshplan.examples import make

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cal() -> mp.Cluster:
    """One quick calibration of all 8 devices (about a second), shared by the tests."""
    lines = []
    cluster = mp.Cluster.calibrate(quick=True, progress=lines.append)
    assert any("links:" in x for x in lines) and any("compute:" in x for x in lines)
    return cluster


def _off_diagonal(matrix, n):
    return [matrix[i][j] for i in range(n) for j in range(n) if i != j]


def test_calibrated_cluster_describes_the_local_devices(cal):
    n = len(jax.devices())
    assert cal.num_devices == n == 8
    assert cal.name == "calibrated" and cal.node_of == (0,) * n and cal.num_nodes == 1
    assert [t.name for t in cal.tiers] == ["measured"]
    for matrix in (cal.pair_bandwidth, cal.pair_latency):
        assert all(matrix[i][i] is None for i in range(n))
        values = _off_diagonal(matrix, n)
        assert len(values) == n * (n - 1)
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in values)
    # The tier is the median of the pairs.
    assert cal.tiers[0].bandwidth == pytest.approx(np.median(_off_diagonal(cal.pair_bandwidth, n)))
    assert cal.tiers[0].latency == pytest.approx(np.median(_off_diagonal(cal.pair_latency, n)))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for d in cal.devices:
        # Kind "cpu", so the planner keeps predicting XLA:CPU's reduce-scatter lowering.
        assert d.kind == "cpu"
        flops = d.flops_per_second("float32")
        assert math.isfinite(flops) and flops > 1e6  # even a slow CI core does > 1 MFLOP/s
        assert d.flops_per_second("bfloat16") == flops  # XLA:CPU: bf16 through float32
        assert math.isfinite(d.memory_bandwidth) and d.memory_bandwidth > 1e6
        assert d.memory_bytes == pytest.approx(host / n)


def test_file_round_trips_and_validates(cal, tmp_path, capsys):
    path = tmp_path / "cluster.json"
    cal.save(path)
    loaded = mp.Cluster.load(path)
    assert loaded == cal and loaded.fingerprint() == cal.fingerprint()
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["pair_bandwidth"][0].__setitem__(1, -5.0), r"pair_bandwidth\[0\]\[1\]"),
    (lambda d: d["pair_latency"][2].pop(), r"pair_latency\[2\]"),
    (lambda d: d["devices"][3].pop("memory_bandwidth"), r"devices\[3\]\.memory_bandwidth"),
    (lambda d: d["tiers"][0].__setitem__("bandwidth", "fast"), r"tiers\[0\]\.bandwidth"),
    (lambda d: d.pop("node_of"), "node_of is missing"),
])
def test_hand_edits_that_break_a_field_are_refused(cal, tmp_path, capsys, edit, field):
    doc = json.loads(cal.to_json())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=field):
        mp.Cluster.load(path)
    assert main(["validate", str(path)]) == 1
    assert "meshplan validate:" in capsys.readouterr().err


def test_a_valid_hand_edit_loads(cal, tmp_path):
    """Setting one measured pair by hand (e.g. a known slow link) is a valid edit."""
    doc = json.loads(cal.to_json())
    doc["pair_bandwidth"][0][1] = 1e9
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    assert mp.Cluster.load(path).link(0, 1)[0] == 1e9


def test_plan_from_the_calibrated_file_executes(cal, tmp_path):
    path = tmp_path / "cluster.json"
    cal.save(path)
    cluster = mp.Cluster.load(path)
    ex = make("mlp")
    plan = mp.auto_parallel(ex.train_step, cluster=cluster, time_limit=1).plan(
        *ex.args, compare_baselines=False)
    assert plan.cluster_fingerprint == cal.fingerprint()
    # Applying the saved plan checks it was made for this cluster, then runs it on the
    # 8 local CPU devices.
    step = mp.auto_parallel(ex.train_step, cluster=cluster, plan=plan)
    _, _, loss = step(*ex.args)
    _, _, ref = jax.jit(ex.train_step)(*ex.args)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_subsets_and_a_single_device():
    two = mp.Cluster.calibrate(jax.devices()[2:4], quick=True, name="two")
    assert two.num_devices == 2 and two.name == "two"
    assert two.link(0, 1)[0] > 0 and two.link(1, 0)[1] > 0
    one = mp.Cluster.calibrate(jax.devices()[:1], quick=True)
    assert one.num_devices == 1 and one.pair_bandwidth is None
    assert one.tiers[0].name == "unmeasured"  # one device never communicates


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no devices"):
        mp.Cluster.calibrate([])
    with pytest.raises(TypeError, match=r"devices\[0\] must be a jax.Device; got 'cpu:0'"):
        mp.Cluster.calibrate(["cpu:0"])
    with pytest.raises(ValueError, match=r"device ids \[0\] more than once"):
        mp.Cluster.calibrate([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match=r"two distinct byte counts.*\[4096, 4096\]"):
        mp.Cluster.calibrate(sizes=[4096, 4096])
    with pytest.raises(ValueError, match="repeats must be a positive integer; got 0"):
        mp.Cluster.calibrate(repeats=0)
    with pytest.raises(ValueError, match="name must be a non-empty string; got ''"):
        mp.Cluster.calibrate(name="")


def test_alpha_beta_fit():
    fit = _calibrate._fit
    exact = fit([1000, 3000], [2e-6, 4e-6])  # 1 GB/s, 1 us
    assert exact.bandwidth == pytest.approx(1e9) and exact.latency == pytest.approx(1e-6)
    # Noise that makes the large copy no slower: bytes / time and the small copy's time.
    flat = fit([1000, 3000], [5e-6, 4e-6])
    assert flat.bandwidth == pytest.approx(3000 / 4e-6) and flat.latency == 5e-6
    # A negative intercept: latency falls back to the small copy's time, not below zero.
    steep = fit([1000, 3000], [1e-6, 5e-6])
    assert steep.bandwidth == pytest.approx(5e8) and steep.latency == 1e-6
    # More than two sizes: least squares.
    ls = fit([1e3, 2e3, 4e3], [2e-6, 3e-6, 5e-6])
    assert ls.bandwidth == pytest.approx(1e9) and ls.latency == pytest.approx(1e-6)


def test_docstring_examples():
    result = doctest.testmod(_calibrate, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_cli_calibrate_in_process(tmp_path, capsys):
    """Without --devices it calibrates the devices JAX has (here the suite's 8)."""
    path = tmp_path / "c.json"
    assert main(["calibrate", "--quick", "--out", str(path), "--name", "ci"]) == 0
    out = capsys.readouterr().out
    for text in ("GFLOP/s", "bandwidth (GB/s)", "latency (us)", "links (56 ordered pairs)",
                 "loaded it back with mp.Cluster.load: valid"):
        assert text in out, text
    cluster = mp.Cluster.load(path)
    assert cluster.num_devices == 8 and cluster.name == "ci"


def test_cli_calibrate_refuses_a_device_count_jax_cannot_take(tmp_path, capsys):
    assert main(["calibrate", "--devices", "4", "--out", str(tmp_path / "c.json")]) == 2
    assert "fresh process" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_cli_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.json")]) == 1
    assert "nope.json" in capsys.readouterr().err


def test_cli_calibrate_in_a_fresh_process(tmp_path):
    """`meshplan calibrate --devices 4` sets its own device count, as the demo does."""
    path = tmp_path / "cluster.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "meshplan", "calibrate", "--devices", "4",
                        "--quick", "--out", str(path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "links (12 ordered pairs)" in r.stdout
    cluster = mp.Cluster.load(path)
    assert cluster.num_devices == 4 and len(cluster.pair_bandwidth) == 4
