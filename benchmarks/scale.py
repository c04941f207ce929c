"""Planning at scale: GPT-3-sized models on up to 1024 A100s, unrolled and scanned.

The model is the example GPT at GPT-3 175B's width (hidden 12288, 96 heads, sequence 2048,
vocabulary 51200, global batch 1536; bfloat16 compute, float32 weights and Adam state),
built from `jax.ShapeDtypeStruct`s, planned for DGX A100 clusters. Two sweeps:

  layers 24 / 48 / 96 on 1024 GPUs (128 nodes): planning time must not grow with identical
      layers beyond the stage DP itself (issue 3: 96 layers at most twice 24, under 60 s);
  devices 64 / 256 / 1024 at 96 layers: how the search grows with the cluster.

Each point runs in a fresh process (a user plans one model per process). Columns:
  jax s       JAX tracing the step (`jax.make_jaxpr`): the user's Python, once per layer
              (with the collection its objects owe, as below)
  meshplan s  meshplan's graph, search and pipeline DP, and the baselines (dp, fsdp,
              megatron) costed beside the plan as `plan()` does by default (the cyclic
              collector paused, as meshplan runs them)
  gc s        the collection meshplan's objects owe once it returns: CPython's first
              automatic collection after the pause scans every object made meanwhile
  total s     what `step.plan(*args)` costs a user: the three together
plus the chosen plan, its predicted step time and peak memory per GPU (80 GB each).
The search reports progress on stderr as it goes.

    /work/venv/bin/python benchmarks/scale.py
    /work/venv/bin/python benchmarks/scale.py --sweep layers --variants unrolled --repeat 3

Writes benchmarks/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import pick, save_rows, show_saved, table, timed_plan  # noqa: E402

GPT3 = dict(hidden=12288, heads=96, seq=2048, batch=1536, vocab=51200, dtype="bfloat16")
POINTS = {"layers": [(24, 128), (48, 128), (96, 128)],  # (layers, DGX A100 nodes)
          "devices": [(96, 8), (96, 32), (96, 128)]}


def one(variant: str, layers: int, nodes: int, time_limit: float) -> dict:
    """Trace and plan one point in this process."""
    import meshplan as mp
    from meshplan.examples import make

    ex = make("gpt_scan" if variant == "scanned" else "gpt", layers=layers, abstract=True,
              **GPT3)
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(nodes=nodes),
                            time_limit=time_limit)

    def progress(msg, seconds):
        print(f"    [{variant} {layers}L {8 * nodes} GPUs, {seconds:5.1f} s] {msg}",
              file=sys.stderr, flush=True)

    times = timed_plan(step, ex.args, progress)  # plan()'s defaults: baselines too
    plan = times.pop("result")
    times = {k: times[k] for k in ("jax", "meshplan", "gc", "total")}
    if isinstance(plan, MemoryError):
        return {"variant": variant, "layers": layers, "gpus": 8 * nodes, **times,
                "plan": "nothing fits: " + str(plan).split(";")[1].strip().split(".")[0],
                "step_s": None, "peak_gib": None, "fits": False}
    shape = dict(zip(plan.axis_names, plan.mesh_shape))
    pp = plan.pipeline
    config = (f"t{shape.get('tp', 1)} p{len(plan.stages) // pp.virtual_stages if pp else 1} "
              f"d{shape.get('dp', 1)}" + (f" m{pp.microbatches} {pp.schedule}"
                                          f"{'x' + str(pp.virtual_stages) if pp.virtual_stages > 1 else ''}"
                                          f" remat={pp.remat} ZeRO-{pp.zero}" if pp else ""))
    return {"variant": variant, "layers": layers, "gpus": 8 * nodes, **times, "plan": config,
            "step_s": plan.cost.step_time, "peak_gib": plan.cost.peak_memory / 2**30,
            "fits": plan.cost.peak_memory <= 80e9}


def _with_gc(row: dict) -> float:
    return row["meshplan"] + row["gc"]


def report(rows, seconds) -> None:
    print(table(["variant", "layers", "GPUs", "jax s", "meshplan s", "gc s", "total s", "plan",
                 "step s", "peak GiB"],
                [[r["variant"], r["layers"], r["gpus"], f"{r['jax']:.1f}",
                  f"{r['meshplan']:.1f}", "-" if "gc" not in r else f"{r['gc']:.1f}",
                  f"{r['total']:.1f}", r["plan"],
                  "-" if r["step_s"] is None else f"{r['step_s']:.1f}",
                  "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"] for r in rows]))
    for v in sorted({r["variant"] for r in rows}):
        by = {r["layers"]: r for r in rows if r["variant"] == v and r["gpus"] == 1024}
        if 24 in by and 96 in by:
            print(f"{v}: 96 layers / 24 layers on 1024 GPUs: total "
                  f"{by[96]['total'] / by[24]['total']:.2f}x, meshplan "
                  f"{by[96]['meshplan'] / by[24]['meshplan']:.2f}x"
                  + (f" ({_with_gc(by[96]) / _with_gc(by[24]):.2f}x with its collection)"
                     if "gc" in by[24] else "") + "; 96 layers in "
                  f"{by[96]['total']:.1f} s (target < 60 s), fits 80 GB: {by[96]['fits']}")
    print(f"({seconds:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="layers,devices")
    ap.add_argument("--variants", default="unrolled,scanned")
    ap.add_argument("--time-limit", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per point; the run with the median total is shown")
    ap.add_argument("--out")
    ap.add_argument("--show", help="print a saved results file and exit")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "LAYERS", "NODES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if show_saved(args.show, report):
        return
    if args.child:
        v, layers, nodes = args.child
        print(json.dumps(one(v, int(layers), int(nodes), args.time_limit)))
        return
    sweeps = pick(ap, args.sweep, list(POINTS), "sweep")
    variants = pick(ap, args.variants, ["unrolled", "scanned"], "variant")
    t0 = time.perf_counter()
    # 96 layers on 1024 GPUs is in both sweeps: each point once.
    points = list(dict.fromkeys((v, layers, nodes) for v in variants for sweep in sweeps
                                for layers, nodes in POINTS[sweep]))
    runs: dict[tuple, list[dict]] = {pt: [] for pt in points}
    for _ in range(args.repeat):  # points take turns, so a slow spell falls on all of them
        for variant, layers, nodes in points:
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(layers),
                                  str(nodes), "--time-limit", str(args.time_limit)],
                                 stdout=subprocess.PIPE, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant, layers, nodes].append(r)
            print(f"  {variant} {layers} layers {r['gpus']} GPUs: {r['total']:.1f} s",
                  flush=True)
    # Per point, the run with the median total time (its own plan and split of the time).
    rows = [sorted(rs, key=lambda r: r["total"])[len(rs) // 2] for rs in runs.values()]
    seconds = time.perf_counter() - t0
    report(rows, seconds)
    save_rows("scale.json", rows, seconds, args.out)


if __name__ == "__main__":
    main()
