"""Pipeline memory: does the per-stage memory model predict what the pipelined runtime holds?

For pipelined plans of the example models on 8 CPU-emulated devices (unrolled and scanned
GPTs, the lax.scan transformer, once with its gradient clipped by the global norm; GPipe,
1F1B and interleaved 1F1B; with and without tensor and data parallelism and recomputation;
sequence 32, and 128 where attention scores dominate), this runs one step under the plan
and compares the planner's predicted peak bytes per device of each stage
(`plan.cost.memory`) with what the executor measured: at every program it runs, the arrays the step holds on each device
(state, in-flight microbatches' values, accumulated gradients) plus XLA's temporaries of
that program (`memory_analysis`), the most at any time (`step.memory_peaks`).

Target (pred/meas): within 25 %, as for the unpipelined plans in fidelity.py.

    /work/venv/bin/python benchmarks/pipeline_memory.py            # all rows (~5 min)
    /work/venv/bin/python benchmarks/pipeline_memory.py --show benchmarks/results/pipeline_memory.json

Writes benchmarks/results/pipeline_memory.json (override with --out).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import request_cpu_devices, run_rows, selection, table  # noqa: E402

NUM_DEVICES = 8
TARGET = 0.25  # allowed |pred/meas - 1|
CASES = {  # name -> (example, pp, schedule, tp, remat, sequence, microbatches); 4 blocks
    "gpt-pp2-1f1b-tp2": ("gpt", 2, "1f1b", 2, "none", 32, 4),
    "gpt-pp4-gpipe-tp1": ("gpt", 4, "gpipe", 1, "none", 32, 4),
    "gpt-pp2-interleaved-tp2": ("gpt", 2, "interleaved", 2, "none", 32, 4),
    "gpt-pp2-1f1b-tp4-remat": ("gpt", 2, "1f1b", 4, "full", 32, 4),
    "gpt-seq128-pp2-1f1b-tp1": ("gpt", 2, "1f1b", 1, "none", 128, 2),  # attention-heavy
    "gpt_scan-pp2-1f1b-tp2": ("gpt_scan", 2, "1f1b", 2, "none", 32, 4),
    "gpt_scan-pp4-1f1b-tp1": ("gpt_scan", 4, "1f1b", 1, "none", 32, 4),
    "gpt_scan-seq128-pp2-gpipe-tp2": ("gpt_scan", 2, "gpipe", 2, "none", 128, 4),
    "transformer_scan-pp2-gpipe-tp2-remat": ("transformer_scan", 2, "gpipe", 2, "full", 32, 4),
    "transformer_scan-pp2-interleaved-tp2": ("transformer_scan", 2, "interleaved", 2, "none",
                                             32, 4),
    # AdamW after optax.clip_by_global_norm: the norm sums every stacked gradient
    "transformer_scan+clip-pp2-gpipe-tp2": ("transformer_scan+clip", 2, "gpipe", 2, "none",
                                            32, 4),
}


def run(name: str, time_limit: float) -> dict:
    import optax

    import meshplan as mp
    from meshplan.examples import make

    model, pp, schedule, tp, remat, seq, m = CASES[name]
    t0 = time.perf_counter()
    model, _, clip = model.partition("+clip")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)) if clip else None
    ex = make(model, layers=4, seq=seq, tx=tx)
    step = mp.auto_parallel(ex.train_step, time_limit=time_limit)
    c = mp.Constraints(pp=pp, num_microbatches=m, schedule=schedule, tp=tp, remat=remat,
                       virtual_stages=2 if schedule == "interleaved" else None)
    plan = step.plan(*ex.args, constraints=c, compare_baselines=False)
    runner = step._jitted(ex.args, plan)
    runner(*ex.args)  # compiles every program
    peaks = runner.memory_peaks(*ex.args)
    predicted = dict(plan.cost.memory)
    p = len(plan.stages) // plan.pipeline.virtual_stages
    stages = []
    for k, st in enumerate(plan.stages[:p]):
        measured = max(peaks.get(d, 0) for d in st.device_ids)
        stages.append({"stage": k, "layers": list(st.layers), "mesh": list(st.mesh_shape),
                       "predicted": predicted[f"stage {k}"], "measured": measured,
                       "ratio": predicted[f"stage {k}"] / measured})
    return {"case": name, "model": model, "pp": pp, "schedule": schedule, "tp": tp,
            "remat": remat, "microbatches": plan.pipeline.microbatches, "stages": stages,
            "seconds": time.perf_counter() - t0}


def report(rows: list[dict], seconds: float) -> None:
    body, ok, n = [], 0, 0
    for r in rows:
        for s in r["stages"]:
            good = abs(s["ratio"] - 1) <= TARGET
            ok, n = ok + good, n + 1
            body.append([r["case"], s["stage"], f"{s['layers'][0]}-{s['layers'][1]}",
                         "x".join(map(str, s["mesh"])), f"{s['predicted'] / 2**20:.2f}",
                         f"{s['measured'] / 2**20:.2f}",
                         f"{s['ratio']:.2f}" + ("" if good else " *")])
    print(table(["case", "stage", "layers", "mesh", "predicted MiB", "measured MiB",
                 "pred/meas"], body, ["l", "r", "r", "r", "r", "r", "r"]))
    print(f"{ok}/{n} stages within {TARGET:.0%} ('*' outside); {seconds:.0f} s")


def main() -> int:
    picked = selection(__doc__, "cases", list(CASES), "case", 3.0, report)
    if picked is None:
        return 0
    args, names = picked
    request_cpu_devices(NUM_DEVICES)
    run_rows(names, lambda n: run(n, args.time_limit), str, report, "pipeline_memory.json",
             args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
