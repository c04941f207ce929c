"""Published large-scale training runs: the cost model's prediction against the measurement.

Each row is a public result: model, cluster, parallel configuration and measured
throughput. meshplan plans the same model (the example GPT in bfloat16 with float32 weights
and Adam state, built from `jax.ShapeDtypeStruct`s: nothing is allocated) on the same
cluster twice:

* "published config": the reported configuration pinned (`Constraints(tp, pp, dp,
  num_microbatches, schedule, remat)`), costed by meshplan's model;
* "meshplan": meshplan's own plan, searched freely.

Measured step time = the run's FLOPs per step / (GPUs x achieved FLOP/s per GPU), with the
FLOPs counted as the source counts them (Megatron-LM: 96 B s l h^2 (1 + s/6h + V/16lh),
activation recomputation included; DESIGN.md). Targets (issue 3): the published
configuration is predicted to fit and within 20 % of its measured step time; meshplan's
plan is predicted at least as fast and fits.

Sources (facts only):
  [NSC21] Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
          Using Megatron-LM", SC'21, Table 1 (weak scaling on Selene: DGX A100 80 GB, 8 x
          200 Gb/s InfiniBand per node; sequence 2048, vocabulary 51200, microbatch 1,
          full activation recomputation) and section 5.1's GPT-3 175B estimate (1024 GPUs,
          batch 1536, 140 TFLOP/s/GPU, its t and p not given there: t=8, p=8 assumed). The
          table does not name the schedule of each row: 1F1B is assumed.

    /work/venv/bin/python benchmarks/published.py [--rows 39B,145B] [--time-limit 3]

Writes benchmarks/results/published.json.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import run_rows, selection, short_error, table  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
    """One published run: the model, the cluster, the configuration, the measurement."""

    name: str
    layers: int
    hidden: int
    heads: int
    batch: int
    nodes: int  # DGX A100 nodes, 8 GPUs each
    tp: int
    pp: int
    tflops: float  # achieved TFLOP/s per GPU, as reported
    source: str
    schedule: str = "1f1b"
    virtual: int | None = None
    seq: int = 2048
    vocab: int = 51200
    microbatch: int = 1

    @property
    def gpus(self) -> int:
        return 8 * self.nodes

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def flops_per_step(self) -> float:
        """Megatron-LM's count, with recomputation: 96 B s l h^2 (1 + s/6h + V/16lh)."""
        b, s, l, h, v = self.batch, self.seq, self.layers, self.hidden, self.vocab
        return 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))

    def measured_step(self) -> float:
        return self.flops_per_step() / (self.gpus * self.tflops * 1e12)


RUNS = (
    Run("39B", 48, 8192, 64, 1536, 64, 8, 2, 138.0, "[NSC21] Table 1"),
    Run("146B", 80, 12288, 96, 2304, 192, 8, 8, 148.0, "[NSC21] Table 1"),
    Run("175B", 96, 12288, 96, 1536, 128, 8, 8, 140.0,
        "[NSC21] section 5.1 (t, p assumed)"),
    Run("1T", 128, 25600, 160, 3072, 384, 8, 64, 163.0, "[NSC21] Table 1"),
)


def one(run: Run, time_limit: float) -> dict:
    import meshplan as mp
    from meshplan.examples import make

    t0 = time.perf_counter()
    ex = make("gpt", layers=run.layers, hidden=run.hidden, heads=run.heads, seq=run.seq,
              batch=run.batch, vocab=run.vocab, abstract=True, dtype="bfloat16")
    step = mp.auto_parallel(ex.train_step, cluster=mp.clusters.dgx_a100(nodes=run.nodes),
                            time_limit=time_limit)
    pinned = mp.Constraints(pp=run.pp, tp=run.tp, dp=run.dp, schedule=run.schedule,
                            virtual_stages=run.virtual, remat="full",
                            num_microbatches=run.batch // (run.dp * run.microbatch))
    row = {"run": run.name, "gpus": run.gpus, "source": run.source,
           "config": f"t{run.tp} p{run.pp} d{run.dp} m{pinned.num_microbatches}",
           "measured_s": run.measured_step(), "measured_tflops": run.tflops}
    try:
        plan = step.plan(*ex.args, constraints=pinned, compare_baselines=False)
        row.update(published_s=plan.cost.step_time, published_gib=plan.cost.peak_memory / 2**30,
                   published_fits=plan.cost.peak_memory <= 80e9)
    except (ValueError, MemoryError) as e:
        row.update(published_error=short_error(e))
    t1 = time.perf_counter()
    own = step.plan(*ex.args, compare_baselines=False)
    pp = own.pipeline
    row.update(
        meshplan_s=own.cost.step_time, meshplan_gib=own.cost.peak_memory / 2**30,
        meshplan_config=(f"t{dict(zip(own.axis_names, own.mesh_shape)).get('tp', 1)} "
                         f"p{len(own.stages) // pp.virtual_stages if pp else 1} "
                         f"d{dict(zip(own.axis_names, own.mesh_shape)).get('dp', 1)} "
                         + (f"m{pp.microbatches} {pp.schedule} remat={pp.remat} "
                            f"ZeRO-{pp.zero}" if pp else "")),
        plan_seconds=time.perf_counter() - t1, seconds=time.perf_counter() - t0)
    return row


def report(rows, seconds) -> None:
    out = []
    for r in rows:
        pub = r.get("published_s")
        ratio = pub / r["measured_s"] if pub else None
        out.append([r["run"], r["gpus"], r["config"], f"{r['measured_s']:.1f}",
                    f"{pub:.1f}" if pub else r.get("published_error", "-"),
                    f"{ratio:.2f}" if ratio else "-",
                    f"{r['published_gib']:.1f}" if pub else "-",
                    f"{r['meshplan_s']:.1f}", f"{r['meshplan_gib']:.1f}", r["meshplan_config"],
                    f"{r['plan_seconds']:.0f}"])
    print(table(["run", "GPUs", "published config", "measured s/step", "predicted s/step",
                 "pred/meas", "pred GiB", "meshplan s/step", "meshplan GiB", "meshplan config",
                 "plan s"], out))
    ok = [r for r in rows if r.get("published_s")]
    within = sum(0.8 <= r["published_s"] / r["measured_s"] <= 1.2 for r in ok)
    fits = sum(r["published_fits"] for r in ok)
    faster = sum(r["meshplan_s"] <= r["published_s"] * (1 + 1e-9) and r["meshplan_gib"] * 2**30
                 <= 80e9 for r in ok)
    print(f"\npredicted within 20 % of measured: {within}/{len(rows)}; published config fits: "
          f"{fits}/{len(rows)}; meshplan's plan at least as fast and fits: {faster}/{len(rows)}"
          f" ({seconds:.0f} s)")


def main():
    chosen = selection(__doc__, "rows", [r.name for r in RUNS], "row", 3.0, report)
    if chosen is None:
        return
    args, names = chosen
    run_rows([r for r in RUNS if r.name in names], lambda r: one(r, args.time_limit),
             lambda r: r.name, report, "published.json", args.out)


if __name__ == "__main__":
    main()
