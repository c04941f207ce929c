"""Plan quality: is the planner's plan at least as fast (predicted) as every hand rule?

For every example model (plus "gpt_large", a GPT big enough for the GPU presets to matter) on
`Cluster.local()` (8 CPU-emulated devices, real arguments) and on the described clusters
dgx_a100(nodes=1), dgx_a100(nodes=4) and dgx_h100(nodes=2) (abstract arguments: planning
needs no arrays), this compares the planner's predicted step time with the baselines' (dp,
fsdp, megatron) in the same cost model.

"planner" is the ILP search alone (`step.plan(..., compare_baselines=False)`): what the
solver found, without the fallback in which `plan(compare_baselines=True)` takes a hand rule
when the solver stopped short of it. The table's "final" column is what that fallback gives,
min(planner, every baseline that fits).

Target: planner <= every baseline (relative tolerance 1e-9) on every row.

    /work/venv/bin/python benchmarks/plan_quality.py
    /work/venv/bin/python benchmarks/plan_quality.py --models gpt,gpt_large --clusters a100x4
    /work/venv/bin/python benchmarks/plan_quality.py --time-limit 10

Writes benchmarks/results/plan_quality.json (override with --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CLUSTERS, environment, make_cluster, pick,  # noqa: E402
                     request_cpu_devices, short_error, show_saved, si, table, write_json)

NUM_DEVICES = 8
RTOL = 1e-9
BASELINES = ("dp", "fsdp", "megatron")
# A GPT whose weights and activations make the GPU presets' links and memory matter
# (about 55 M parameters, batch 32 x 512 tokens).
GPT_LARGE = dict(layers=4, hidden=1024, heads=16, seq=512, batch=32, vocab=4096)


def make_model(name: str):
    """(Example, real args or None, abstract args)."""
    from meshplan.examples import abstract, make

    if name == "gpt_large":
        ex = make("gpt", abstract=True, **GPT_LARGE)
        return ex, None, ex.args
    ex = make(name)
    return ex, ex.args, abstract(ex.args)


def baseline_row(step, args, cluster) -> dict:
    """{name: Plan or error string}: mp.baselines, or one rule at a time if it raises."""
    import meshplan as mp

    try:
        return dict(mp.baselines(step, *args, cluster=cluster))
    except Exception as e:  # noqa: BLE001 - reported per baseline
        first = short_error(e)
    from meshplan._api import baseline_constraints  # same rules, one at a time
    out: dict = {}
    for name, c in baseline_constraints(cluster).items():
        try:
            out[name] = step.plan(*args, constraints=c, cluster=cluster,
                                  compare_baselines=False)
        except Exception as e:  # noqa: BLE001
            out[name] = short_error(e)
    return out or {n: first for n in BASELINES}


def one(model: str, cluster_name: str, step, args) -> dict:
    cluster = make_cluster(cluster_name)
    row: dict = {"model": model, "cluster": cluster.name, "devices": cluster.num_devices}
    t0 = time.perf_counter()
    try:
        plan = step.plan(*args, cluster=cluster, compare_baselines=False)
    except Exception as e:  # noqa: BLE001 - a failing row is a result
        row["error"] = short_error(e, 300)
        plan = None
    row["plan_seconds"] = time.perf_counter() - t0
    if plan is not None:
        row["planner"] = {"mesh": dict(zip(plan.axis_names, map(int, plan.mesh_shape))),
                          "step_time": plan.cost.step_time, "peak_memory": plan.cost.peak_memory,
                          "comm_bytes": plan.cost.comm_bytes,
                          "solver": {k: v for k, v in plan.solver}}
    t1 = time.perf_counter()
    bases = baseline_row(step, args, cluster)
    row["baseline_seconds"] = time.perf_counter() - t1
    row["baselines"] = {}
    for name in BASELINES:
        b = bases.get(name, "not returned")
        if isinstance(b, str):
            row["baselines"][name] = {"error": b}
        else:
            row["baselines"][name] = {
                "mesh": dict(zip(b.axis_names, map(int, b.mesh_shape))),
                "step_time": b.cost.step_time, "peak_memory": b.cost.peak_memory,
                "comm_bytes": b.cost.comm_bytes}
    ok = [v["step_time"] for v in row["baselines"].values() if "step_time" in v]
    if plan is not None and ok:
        t = plan.cost.step_time
        best = min(ok)
        row["best_baseline"] = min((v["step_time"], k) for k, v in row["baselines"].items()
                                   if "step_time" in v)[1]
        row["best_baseline_over_planner"] = best / t if t > 0 else None
        row["planner_le_every_baseline"] = all(t <= b * (1 + RTOL) for b in ok)
        row["final_step_time"] = min(t, best)
    return row


def ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.4g}"


HEADERS = ["model", "cluster", "planner mesh", "planner ms", "dp ms", "fsdp ms", "megatron ms",
           "best base / planner", "planner <= all", "final ms", "plan s", "baselines s"]


def render(rows, header: bool = True) -> str:
    cells = []
    for r in rows:
        def base(n):
            b = r["baselines"].get(n, {})
            return ms(b["step_time"]) if "step_time" in b else "ERR"
        p = r.get("planner")
        mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items()) if p else "ERROR"
        ratio = r.get("best_baseline_over_planner")
        le = r.get("planner_le_every_baseline")
        cells.append([r["model"], r["cluster"], mesh, ms(p["step_time"]) if p else "-",
                      base("dp"), base("fsdp"), base("megatron"),
                      "-" if ratio is None else f"{ratio:.3f} ({r['best_baseline']})",
                      "-" if le is None else ("yes" if le else "NO"),
                      ms(r.get("final_step_time")), f"{r['plan_seconds']:.1f}",
                      f"{r['baseline_seconds']:.1f}"])
    if header:
        return table(HEADERS, cells, ["l", "l", "l"] + ["r"] * (len(HEADERS) - 3))
    return "  ".join(cells[0])


def report(rows: list[dict], total: float) -> dict:
    """Print the full table, errors and the summary line; the summary."""
    done = [r for r in rows if "planner_le_every_baseline" in r]
    n_ok = sum(r["planner_le_every_baseline"] for r in done)
    print()
    print(render([r for r in rows if "baselines" in r]))
    errs = [r for r in rows if "error" in r]
    for r in errs:
        print(f"ERROR {r['model']} on {r['cluster']}: {r['error']}")
    for r in rows:
        for n, b in r.get("baselines", {}).items():
            if "error" in b:
                print(f"baseline {n} failed for {r['model']} on {r['cluster']}: {b['error']}")
    print()
    print(f"summary: planner <= every baseline on {n_ok}/{len(done)} rows "
          f"({len(rows) - len(done)} rows without a comparison)")
    print(f"took {total:.1f} s")
    return {"rows": len(rows), "compared": len(done), "planner_le_all": n_ok, "seconds": total}


def main(argv=None) -> int:
    from meshplan.examples import ALL_EXAMPLES

    models_all = tuple(ALL_EXAMPLES) + ("gpt_large",)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(models_all),
                   help=f"comma-separated subset of {','.join(models_all)}")
    p.add_argument("--clusters", default=",".join(CLUSTERS),
                   help=f"comma-separated subset of {','.join(CLUSTERS)}")
    p.add_argument("--time-limit", type=float, default=3.0, help="seconds per ILP solve")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/plan_quality.json)")
    p.add_argument("--show", metavar="JSON", default=None,
                   help="print the table of a saved results file and exit (runs nothing)")
    a = p.parse_args(argv)
    if show_saved(a.show, report):
        return 0
    models = pick(p, a.models, models_all, "model")
    clusters = pick(p, a.clusters, CLUSTERS, "cluster")

    request_cpu_devices(NUM_DEVICES)
    import meshplan as mp

    t_start = time.perf_counter()
    rows: list[dict] = []
    print(f"plan quality, ILP time limit {a.time_limit:g} s; planner = ILP search alone "
          "(compare_baselines=False); final = min(planner, baselines)", flush=True)
    print("rows as they finish: " + "  ".join(HEADERS), flush=True)
    for model in models:
        try:
            ex, real, abstract_args = make_model(model)
        except Exception as e:  # noqa: BLE001
            print(f"{model}: cannot build: {short_error(e)}", flush=True)
            rows.append({"model": model, "cluster": "-", "error": short_error(e, 300)})
            continue
        # One step per model: the traced graph is cached on it and shared by the clusters.
        step = mp.auto_parallel(ex.train_step, time_limit=a.time_limit)
        for cname in clusters:
            args = real if (cname == "local" and real is not None) else abstract_args
            row = one(model, cname, step, args)
            row["args"] = "real" if args is real else "abstract"
            rows.append(row)
            if "baselines" in row:
                print(render([row], header=False), flush=True)
            else:
                print(f"{model} {cname}: ERROR {row.get('error')}", flush=True)

    total = time.perf_counter() - t_start
    summary = report(rows, total)
    doc = {"benchmark": "plan_quality", "time_limit": a.time_limit, "rtol": RTOL,
           "gpt_large": GPT_LARGE, "environment": environment(),
           "summary": summary,
           "rows": rows}
    print(f"wrote {write_json('plan_quality.json', doc, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
