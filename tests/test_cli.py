"""The `meshplan` command: its options, and the demo end to end on the MLP example."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from meshplan.__main__ import MODELS, main
from meshplan.examples import ALL_EXAMPLES

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_models_are_the_examples():
    assert MODELS == ALL_EXAMPLES


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_options_are_refused(capsys):
    for argv in (["demo", "--model", "nope"], ["demo", "--steps", "0"],
                 ["demo", "--time-limit", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_demo_refuses_a_device_count_jax_cannot_take(capsys):
    """In a process whose JAX already runs 8 devices, --devices 4 is refused, not ignored."""
    assert len(jax.devices()) == 8
    assert main(["demo", "--devices", "4"]) == 2
    assert "fresh process" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_in_process(capfd):
    assert main(["demo", "--model", "mlp", "--steps", "2", "--time-limit", "1"]) == 0
    out = capfd.readouterr().out
    assert "Running HiGHS" not in out  # the solver's banner is hidden
    for text in ("Cluster(", "Plan on local", "baseline: megatron", "match: largest difference",
                 "Predicted vs measured", "comm bytes", "FLOPs", "peak memory"):
        assert text in out, text


@pytest.mark.slow
def test_python_dash_m_demo():
    """`python -m meshplan demo` in a fresh process sets its own device count."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "meshplan", "demo", "--model", "mlp",
                        "--steps", "1", "--devices", "4", "--time-limit", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 devices" in r.stdout
    assert "measured/predicted" in r.stdout
