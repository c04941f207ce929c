"""Planning time of an unrolled GPT train step vs depth (the issue's target: 24 layers, hidden
1024, under 10 s on this machine; 96 layers at most twice as long as 24).

Planned for one DGX A100 node (8 x 80 GB) by default (`--cluster a100x4 h100x2`, or any of
plan_quality.py's described clusters, one after another), from abstract arguments. On one
node there is no stage count to search, so the planner's own time is small beside JAX's
tracing; on several nodes it also searches pipelines. Each depth runs in a fresh
Python process, as a user plans one model per process (a second model planned in the same
process is measured 30-50 % slower: JAX's caches keep the first one's traces alive).
"total" is what a user waits for in `step.plan(*args)`, split into:
  jax s       JAX tracing the step to a jaxpr (`jax.make_jaxpr`, as `ir.trace` runs it):
              the user's Python runs once per unrolled layer, outside meshplan's control
              (with the collection its objects owe, see gc s)
  graph s     meshplan turning the jaxpr into its Graph (`step.trace`; JAX's trace cached)
  plan s      the search: planning view, classes, three logical meshes' ILPs, evaluation,
              and the baselines (dp, fsdp, megatron) costed beside the plan, as
              `plan()` does by default (each its own constrained ILP and evaluation)
  (ilp s)     of which HiGHS and the model around it, for the chosen mesh (varies run to
              run by up to a second at either depth: it does not depend on depth)
  meshplan s  graph + plan, the part the planner's design controls
  gc s        the collection meshplan's objects owe: meshplan traces and plans with
              CPython's cyclic collector paused (`ir._util.paused_gc`), and the first
              automatic collection after the pause scans every object made meanwhile and
              still alive (the graph and plan are kept for compiling and running)
The last lines fit time = fixed + per-layer x layers through the two depths and give the
best total ratio any planner could reach beside JAX's own tracing: the user's Python runs
once per unrolled layer, so 96 layers plan within twice the time of 24 only if the planner
spends, depth-independently, at least the excess of JAX's growth over 2x.
With --repeat N each depth runs N times and the median of each column is shown; the depths
take turns (24, 96, 24, 96, ...), so a slow spell of this shared machine falls on both.

Run: python benchmarks/planning_speed.py [--layers 24 48 96] [--repeat 3] [--time-limit 3]
     [--cluster a100x1 a100x4 h100x2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import CLUSTERS, make_cluster, timed_plan  # noqa: E402

TARGET_RATIO = 2.0  # the bound on the deepest / shallowest planning time
_DESCRIBED = {"a100x1": "one DGX A100 node, 8 GPUs: intra-op plans only",
              "a100x4": "4 DGX A100 nodes, 32 GPUs: pipelines searched too",
              "h100x2": "2 DGX H100 nodes, 16 GPUs: pipelines searched too"}


def one_run(layers: int, hidden: int, time_limit: float, devices: int,
            cluster: str = "a100x1") -> dict:
    """Trace and plan one depth in this process; the timings and the plan's solver facts."""
    import jax
    jax.config.update("jax_num_cpu_devices", devices)
    import meshplan as mp
    from meshplan.examples import make

    ex = make("gpt", layers=layers, hidden=hidden, heads=16, seq=512, batch=8, vocab=4096,
              abstract=True)
    step = mp.auto_parallel(ex.train_step, time_limit=time_limit,
                            cluster=make_cluster(cluster))
    times = timed_plan(step, ex.args)  # plan()'s defaults: baselines compared too
    plan = times.pop("result")
    if isinstance(plan, Exception):
        raise plan
    solver = dict(plan.solver)
    return {"layers": layers, **times, "ilp": solver["ilp_seconds"],
            "classes": solver["classes"],
            "groups": solver["groups"], "mesh": "x".join(map(str, plan.mesh_shape)),
            "status": solver["status"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--time-limit", type=float, default=3.0)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cluster", choices=[c for c in CLUSTERS if c != "local"],
                    default=["a100x1"], nargs="+",
                    help="the described cluster(s) planned for (plan_quality.py's names), "
                         "each in turn")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one depth, in a fresh process; the parent reads the JSON line
        print(json.dumps(one_run(args.layers[0], args.hidden, args.time_limit, args.devices,
                                 args.cluster[0])))
        return

    for cluster in args.cluster:
        if len(args.cluster) > 1:
            print(f"\n{cluster}: {_DESCRIBED[cluster]}")
        one_cluster(args, cluster)


def one_cluster(args, cluster: str) -> None:
    """Plan each depth --repeat times on `cluster` (each in a fresh process, the depths
    in turns) and print the medians, the ratio and the fit through the depths."""
    cols = ("jax", "graph", "plan", "ilp", "meshplan", "gc", "total")
    print(f"{'layers':>6} {'jax s':>7} {'graph s':>8} {'plan s':>7} {'(ilp s)':>7} "
          f"{'meshplan s':>10} {'gc s':>5} "
          f"{'total s':>8} {'classes':>8} {'groups':>7} {'mesh':>6} status")
    runs: dict[int, list[dict]] = {layers: [] for layers in args.layers}
    for _ in range(args.repeat):
        for layers in args.layers:
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--layers", str(layers), "--hidden",
                 str(args.hidden), "--time-limit", str(args.time_limit), "--devices",
                 str(args.devices), "--cluster", cluster],
                capture_output=True, text=True, check=True)
            runs[layers].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for layers in args.layers:
        row = dict(runs[layers][-1], **{c: statistics.median(r[c] for r in runs[layers])
                                        for c in cols})
        rows.append(row)
        print(f"{layers:>6} {row['jax']:7.2f} {row['graph']:8.2f} {row['plan']:7.2f} "
              f"{row['ilp']:7.2f} "
              f"{row['meshplan']:10.2f} {row['gc']:5.2f} {row['total']:8.2f} {row['classes']:>8} "
              f"{row['groups']:>7} {row['mesh']:>6} {row['status']}")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        print(f"ratio {last['layers']} / {first['layers']} layers: "
              f"meshplan {last['meshplan'] / first['meshplan']:.2f} "
              f"({(last['meshplan'] + last['gc']) / (first['meshplan'] + first['gc']):.2f} "
              f"with its collection), "
              f"total {last['total'] / first['total']:.2f}, jax {last['jax'] / first['jax']:.2f}")
        print(depth_bound(first, last))


def linear_fit(first: dict, last: dict, col: str) -> tuple[float, float]:
    """(seconds per layer, depth-independent seconds) of column `col`, through two depths."""
    per_layer = (last[col] - first[col]) / (last["layers"] - first["layers"])
    return per_layer, first[col] - per_layer * first["layers"]


def depth_bound(first: dict, last: dict) -> str:
    """What the total ratio could be at best: JAX's tracing runs the user's Python once per
    unrolled layer, so even a planner with no per-layer work of its own keeps its
    depth-independent time beside JAX's growing time."""
    jax_layer, _ = linear_fit(first, last, "jax")
    mp_layer, mp_fixed = linear_fit(first, last, "meshplan")
    floor = (last["jax"] + mp_fixed) / (first["jax"] + mp_fixed)
    need = last["jax"] - TARGET_RATIO * first["jax"]  # f with jax_L + f <= 2 (jax_l + f)
    need /= TARGET_RATIO - 1
    return (f"fit through the two depths: jax {jax_layer * 1e3:.1f} ms/layer; meshplan "
            f"{mp_layer * 1e3:.1f} ms/layer + {mp_fixed:.2f} s depth-independent (mostly "
            f"the ILP).\nwith no per-layer work of its own, meshplan's total ratio would be "
            f"{floor:.2f}: at most {TARGET_RATIO:g}x needs at least {need:.2f} s of "
            f"depth-independent planning time beside JAX's tracing, which alone grows "
            f"{last['jax'] / first['jax']:.2f}x")


if __name__ == "__main__":
    main()
