"""The `meshplan` command line: `meshplan demo` plans, runs and checks an example model;
`meshplan calibrate` measures the local devices into a cluster file; `meshplan validate`
checks one.

    $ meshplan demo                      # GPT on 8 CPU-emulated devices, 3 training steps
    $ meshplan demo --model mlp --steps 5 --devices 4 --time-limit 2
    $ python -m meshplan demo
    $ meshplan calibrate --devices 8 --out cluster.json [--quick]
    $ meshplan validate cluster.json

`--devices` sets the number of CPU devices before JAX starts its backend, so those commands
must run in a fresh process (or in one whose JAX already has exactly `--devices` devices).
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

    cal = sub.add_parser(
        "calibrate", help="measure the local devices and the links between them, and write "
                          "a cluster JSON file that plans can use",
        description="Time copies between every ordered pair of local devices (latency and "
                    "bandwidth), each device's matmul rate and memory bandwidth, write the "
                    "result as a cluster JSON file (mp.Cluster.load reads it; edit it by "
                    "hand if you like, then check it with `meshplan validate`), and load it "
                    "back to validate it.")
    cal.add_argument("--devices", type=_positive_int, default=None,
                     help="emulate this many CPU devices and calibrate them (as the demo "
                          "does); default: calibrate the devices JAX finds "
                          "(jax.devices(): the GPUs or TPUs where present)")
    cal.add_argument("--out", default="cluster.json",
                     help="cluster file to write (default: %(default)s)")
    cal.add_argument("--name", default="calibrated",
                     help="the cluster's name (default: %(default)s)")
    cal.add_argument("--quick", action="store_true",
                     help="fewer repeats and smaller messages and matmuls: about a second "
                          "instead of a few, and noisier")
    cal.set_defaults(run=_calibrate)

    val = sub.add_parser(
        "validate", help="check a (hand-edited) cluster JSON file",
        description="Load a cluster JSON file with mp.Cluster.load, which checks every "
                    "field, and print the cluster, or the error naming the field at fault "
                    "(exit status 1).")
    val.add_argument("file", help="cluster JSON file")
    val.set_defaults(run=_validate)
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


def _set_cpu_devices(n: int, command: str = "demo") -> str | None:
    """Ask JAX for `n` CPU devices; an error message if its backend already has others."""
    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass  # the backend is running already: fine if it has the devices we want
    have = len(jax.devices())
    if have != n:
        return (f"meshplan {command}: JAX already started with {have} devices, so --devices "
                f"{n} cannot take effect; run it in a fresh process (e.g. `meshplan "
                f"{command}`), or pass --devices {have}.")
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


# ------------------------------------------------------------------------------ calibrate


def _calibrate(args: argparse.Namespace) -> int:
    if args.devices is not None:
        error = _set_cpu_devices(args.devices, "calibrate")  # before any JAX computation
        if error:
            print(error, file=sys.stderr)
            return 2

    import meshplan as mp

    out = functools.partial(print, flush=True)
    devices = jax.devices()
    out(f"Calibrating {len(devices)} {devices[0].platform} device(s)"
        f"{' (quick)' if args.quick else ''} ...")
    t = time.perf_counter()
    try:
        cluster = mp.Cluster.calibrate(devices, quick=args.quick, name=args.name,
                                       progress=lambda msg: out("  " + msg))
    except ValueError as e:  # e.g. an empty --name
        print(f"meshplan calibrate: {e}", file=sys.stderr)
        return 2
    out(f"  done in {time.perf_counter() - t:.1f} s\n")
    out(_calibration_table(cluster))

    try:
        cluster.save(args.out)
    except OSError as e:  # e.g. the folder does not exist: the table above is still shown
        print(f"meshplan calibrate: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    try:
        loaded = mp.Cluster.load(args.out)
    except ValueError as e:  # would be a bug: calibrate built the cluster with checks
        print(f"meshplan calibrate: wrote {args.out}, but it does not load back: {e}",
              file=sys.stderr)
        return 1
    same = "identical to the measurement" if loaded == cluster else "BUT DIFFERENT"
    out(f"\nWrote {args.out}; loaded it back with mp.Cluster.load: valid, {same}.")
    out(f"  {loaded!r}")
    out(f"Use it with mp.auto_parallel(step, cluster=mp.Cluster.load({str(args.out)!r})).")
    return 0 if loaded == cluster else 1


def _calibration_table(cluster) -> str:
    """Per-device rates, then link bandwidth and latency over all ordered pairs."""
    lines = [f"  {'device':>6}  {'kind':<24} {'matmul float32':>16} {'memory bw':>12} "
             f"{'memory':>12}"]
    for i, d in enumerate(cluster.devices):
        lines.append(f"  {i:>6}  {d.kind:<24} "
                     f"{d.flops_per_second('float32') / 1e9:>10.3g} GFLOP/s "
                     f"{d.memory_bandwidth / 1e9:>7.3g} GB/s {_bytes(d.memory_bytes):>12}")
    n = cluster.num_devices
    links = [cluster.link(i, j) for i in range(n) for j in range(n) if i != j]
    if not links:
        lines.append("  links: none (a single device never communicates)")
        return "\n".join(lines)
    bw = np.array([b for b, _ in links])
    lat = np.array([a for _, a in links])
    title = f"links ({len(links)} ordered pairs)"
    lines.append(f"\n  {title:<28}{'median':>12} {'min':>12} {'max':>12}")
    lines.append(f"  {'bandwidth (GB/s)':<28}{np.median(bw) / 1e9:>12.3g} "
                 f"{bw.min() / 1e9:>12.3g} {bw.max() / 1e9:>12.3g}")
    lines.append(f"  {'latency (us)':<28}{np.median(lat) * 1e6:>12.3g} "
                 f"{lat.min() * 1e6:>12.3g} {lat.max() * 1e6:>12.3g}")
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    from meshplan.costmodel import Cluster  # no JAX computation: validation is pure

    try:
        cluster = Cluster.load(args.file)
    except (OSError, ValueError) as e:
        print(f"meshplan validate: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid\n  {cluster!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
