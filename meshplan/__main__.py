"""The `meshplan` command line: `meshplan demo` plans, runs and checks an example model.

    $ meshplan demo                      # GPT on 8 CPU-emulated devices, 3 training steps
    $ meshplan demo --model mlp --steps 5 --devices 4 --time-limit 2
    $ python -m meshplan demo

The demo sets the number of CPU devices before JAX starts its backend, so it must run in a
fresh process (or in one whose JAX already has exactly `--devices` devices).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Callable, Sequence

import jax  # importing is fine; no JAX computation may run before the device count is set
import numpy as np

# The examples' names, repeated here so `--help` works without importing the models
# (tests check that this tuple equals meshplan.examples.ALL_EXAMPLES).
MODELS = ("mlp", "transformer_scan", "gpt", "gpt_scan", "moe")

# How close the sharded and unsharded losses must be for the demo to report a match:
# float32 sums in a different order (partial sums across devices) differ by a few ulps
# per step, and AdamW amplifies them a little over a few steps.
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-5


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meshplan` console script; returns the process exit status.

    >>> # main(["demo", "--model", "mlp", "--steps", "2"])
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    from meshplan import __doc__ as doc

    parser = argparse.ArgumentParser(
        prog="meshplan", description=(doc or "").strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="plan an example model, train it sharded and unsharded, and compare "
                     "the predicted costs with what XLA compiled",
        description="Plan an example model on CPU-emulated devices, print the plan next to "
                    "its alternatives and the dp/fsdp/megatron baselines, run training steps "
                    "under the plan and unsharded (plain jax.jit) side by side, and compare "
                    "predicted comm bytes, FLOPs and peak memory with mp.measure.")
    demo.add_argument("--model", choices=MODELS, default="gpt",
                      help="example model (default: %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=3,
                      help="training steps to run (default: %(default)s)")
    demo.add_argument("--devices", type=_positive_int, default=8,
                      help="CPU devices to emulate; the demo runs on CPU even where a GPU is "
                           "present (default: %(default)s)")
    demo.add_argument("--time-limit", type=_positive_float, default=3.0,
                      help="seconds per ILP solve (default: %(default)s)")
    demo.set_defaults(run=_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text}")
    return value


# ----------------------------------------------------------------------------------- demo


def _set_cpu_devices(n: int) -> str | None:
    """Ask JAX for `n` CPU devices; an error message if its backend already has others."""
    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # the backend is running already: fine if it has the devices we want
    have = len(jax.devices())
    if have != n:
        return (f"meshplan demo: JAX already started with {have} devices, so --devices {n} "
                "cannot take effect; run the demo in a fresh process (e.g. `meshplan demo`), "
                f"or pass --devices {have}.")
    return None


def _demo(args: argparse.Namespace) -> int:
    error = _set_cpu_devices(args.devices)  # before any JAX computation
    if error:
        print(error, file=sys.stderr)
        return 2

    import meshplan as mp
    from meshplan.examples import make

    t_start = time.perf_counter()
    out = functools.partial(print, flush=True)  # progress shows as it happens, even piped
    cluster = mp.Cluster.local()
    out(f"Cluster: {cluster!r}")

    t = time.perf_counter()
    ex = make(args.model)
    out(f"Model: {ex.name}: {ex.description} "
        f"({_count_params(ex.args[0]):,} parameters; built in {time.perf_counter() - t:.1f} s)")

    step = mp.auto_parallel(ex.train_step, cluster=cluster, time_limit=args.time_limit)
    out(f"\nPlanning (each logical mesh is an ILP, at most {args.time_limit:g} s per solve; "
        "then the dp, fsdp and megatron baselines in the same cost model) ...")
    t = time.perf_counter()
    plan = step.plan(*ex.args, progress=lambda msg: out("  " + msg))
    out(f"  planned in {time.perf_counter() - t:.1f} s\n")
    out(plan.summary())

    out(f"\nTraining {args.steps} step(s) under the plan (sharded over {cluster.num_devices} "
        "devices) and with plain jax.jit (unsharded):")
    out(f"  {'step':>4}  {'loss (meshplan)':>16}  {'loss (jax.jit)':>16}  {'|difference|':>12}")
    reference = jax.jit(ex.train_step)
    sharded_state, plain_state = ex.args[:2], ex.args[:2]
    batch = ex.args[2]
    worst, match = 0.0, True
    t = time.perf_counter()
    for i in range(1, args.steps + 1):
        *sharded_state, sharded_loss = step(*sharded_state, batch)
        *plain_state, plain_loss = reference(*plain_state, batch)
        a, b = float(sharded_loss), float(plain_loss)
        worst = max(worst, abs(a - b))
        match &= bool(np.isclose(a, b, rtol=LOSS_RTOL, atol=LOSS_ATOL))
        out(f"  {i:>4}  {a:>16.7f}  {b:>16.7f}  {abs(a - b):>12.2e}")
    out(f"  {'match' if match else 'MISMATCH'}: largest difference {worst:.2e} "
        f"(tolerance rtol={LOSS_RTOL:g}, atol={LOSS_ATOL:g}); "
        f"{time.perf_counter() - t:.1f} s including compilation")

    measured = mp.measure(step.compile(*ex.args))
    out("\nPredicted vs measured, per device per step (measured: mp.measure reads the "
        "compiled HLO, memory_analysis and cost_analysis):")
    out(_comparison_table(plan.cost, measured))
    for w in measured.warnings:
        out(f"  measurement note: {w}")
    out(f"\nDone in {time.perf_counter() - t_start:.1f} s.")
    return 0 if match else 1


def _count_params(params) -> int:
    return sum(int(np.prod(getattr(x, "shape", ()))) for x in jax.tree_util.tree_leaves(params))


def _comparison_table(cost, measured) -> str:
    """Rows of (quantity, predicted, measured, measured / predicted), with their parts."""
    # Per collective kind: on CPU, XLA lowers a reduce-scatter to all-reduce + slice, and
    # the planner predicts it that way there, so the kinds line up as well as the total.
    predicted_kinds = dict(cost.comm_by_kind)
    measured_kinds = measured.by_kind()
    kinds = [(f"  {k}", predicted_kinds.get(k, 0.0), measured_kinds.get(k, 0.0), _bytes)
             for k in sorted(set(predicted_kinds) | set(measured_kinds))]
    predicted_memory = dict(cost.memory)
    parts = [(f"  {k}", predicted_memory.get(k, 0.0), getattr(measured, f"{k}_bytes"), _bytes)
             for k in ("argument", "output", "temp", "alias")
             if predicted_memory.get(k, 0.0) or getattr(measured, f"{k}_bytes")]
    rows = ([("comm bytes", cost.comm_bytes, measured.comm_bytes, _bytes)] + kinds +
            [("FLOPs", cost.flops, measured.flops, _flops),
             ("peak memory", cost.peak_memory, measured.peak_memory, _bytes)] + parts)
    lines = [f"  {'quantity':<22} {'predicted':>16} {'measured':>16} {'measured/predicted':>19}"]
    for name, p, m, fmt in rows:
        ratio = f"{m / p:.3f}" if p else ("-" if not m else "inf")
        lines.append(f"  {name:<22} {fmt(p):>16} {fmt(m):>16} {ratio:>19}")
    return "\n".join(lines)


def _bytes(x: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size:
            return f"{x / size:.3f} {unit}"
    return f"{x:.0f} B"


def _flops(x: float) -> str:
    return f"{x:.4e}"


if __name__ == "__main__":
    sys.exit(main())
