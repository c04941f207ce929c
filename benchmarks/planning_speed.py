"""Planning time of an unrolled GPT train step vs depth (the issue's target: 24 layers, hidden
1024, under 10 s on this machine; 96 layers at most twice as long as 24).

Planned for one DGX A100 node (8 x 80 GB), from abstract arguments; "total" is tracing
plus planning (three logical meshes), what a user waits for.

Run: python benchmarks/planning_speed.py [--layers 24 96] [--time-limit 3]
Prints one row per depth: trace seconds, plan seconds (search incl. all meshes), classes.
"""
import argparse
import time

import jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--time-limit", type=float, default=3.0)
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    import meshplan as mp
    from meshplan.examples import make

    rows = []
    print(f"{'layers':>6} {'trace s':>8} {'plan s':>8} {'total s':>8} {'classes':>8} "
          f"{'groups':>7} {'mesh':>10} status")
    for layers in args.layers:
        ex = make("gpt", layers=layers, hidden=args.hidden, heads=16, seq=512, batch=8,
                  vocab=4096, abstract=True)
        step = mp.auto_parallel(ex.train_step, time_limit=args.time_limit,
                                cluster=mp.clusters.dgx_a100(nodes=1))
        t0 = time.perf_counter()
        step.trace(*ex.args)
        t1 = time.perf_counter()
        plan = step.plan(*ex.args, compare_baselines=False)
        t2 = time.perf_counter()
        solver = dict(plan.solver)
        rows.append((layers, t1 - t0, t2 - t1, t2 - t0))
        print(f"{layers:>6} {t1 - t0:8.2f} {t2 - t1:8.2f} {t2 - t0:8.2f} {solver['classes']:>8} "
              f"{solver['groups']:>7} {'x'.join(map(str, plan.mesh_shape)):>10} "
              f"{solver['status']}")
    if len(rows) >= 2:
        print(f"ratio total({rows[-1][0]}) / total({rows[0][0]}) = {rows[-1][3] / rows[0][3]:.2f}")


if __name__ == "__main__":
    main()
