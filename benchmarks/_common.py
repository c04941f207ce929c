"""Helpers shared by the benchmark scripts: device setup, tables, JSON."""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def request_cpu_devices(n: int = 8) -> None:
    """Ask for `n` CPU devices; must run before any JAX computation starts the backend."""
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    if len(jax.devices()) < n:
        raise SystemExit(f"needs {n} devices, JAX started with {len(jax.devices())}; run this "
                         "script in a fresh process (it sets jax_num_cpu_devices itself).")


def _owed_collection(since: float) -> float:
    """Seconds from `since` (taken inside a phase run with the cyclic collector paused, as
    meshplan traces and plans) to the end of the young-generation collection the phase's
    objects owe: CPython's first automatic collection after a pause scans every object
    made meanwhile and still alive (it may already run as the collector is re-enabled;
    the explicit one here runs it otherwise)."""
    gc.collect(0)
    return time.perf_counter() - since


def timed_plan(step, args, progress=None, **plan_kwargs) -> dict:
    """Trace and plan `step(*args)` as a user's `step.plan(*args)` does, timed in parts:
    "jax" (JAX's own trace, `jax.make_jaxpr`, which `step.trace` then reuses), "graph"
    (meshplan's trace), "plan" (the search), "meshplan" (the two), "gc" (the collection
    meshplan's objects owe; JAX's is counted in "jax") and "total". Each phase runs with
    the cyclic collector paused, as meshplan runs it. Also "result": the Plan, or the
    MemoryError of a search in which nothing fits. `progress(message, seconds since
    meshplan started)` reports the search as it goes."""
    import jax

    from meshplan.ir._util import paused_gc

    gc.collect()  # nothing left owing from building the example
    with paused_gc():
        t0 = time.perf_counter()
        jax.make_jaxpr(step.fn)(*args)
        t_jax = time.perf_counter()
    jax_s = t_jax - t0 + _owed_collection(t_jax)
    if progress is not None:
        plan_kwargs["progress"] = lambda msg: progress(msg, time.perf_counter() - t1)
    with paused_gc():
        t1 = time.perf_counter()
        step.trace(*args)
        t2 = time.perf_counter()
        try:
            result = step.plan(*args, **plan_kwargs)
        except MemoryError as e:  # the search ran; nothing fits
            result = e
        t3 = time.perf_counter()
    gc_s = _owed_collection(t3)
    return {"jax": jax_s, "graph": t2 - t1, "plan": t3 - t2, "meshplan": t3 - t1,
            "gc": gc_s, "total": jax_s + (t3 - t1) + gc_s, "result": result}


def show_saved(path: str | None, report) -> bool:
    """With --show PATH: print the tables of that saved results file and return True."""
    if not path:
        return False
    with open(path) as f:
        doc = json.load(f)
    report(doc["rows"], doc["summary"]["seconds"])
    return True


def pick(parser, text: str, allowed, what: str) -> list[str]:
    """The comma-separated names in `text`; a parser error names any not in `allowed`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            parser.error(f"unknown {what} {n!r}; choose from {', '.join(allowed)}")
    return names


def short_error(e: BaseException, limit: int = 160) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          align: Sequence[str] | None = None) -> str:
    """A plain-text (Markdown-compatible) table; `align` is "l" or "r" per column."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)])
              for i, h in enumerate(headers)]
    align = align or ["l"] + ["r"] * (len(headers) - 1)

    def fmt(r):
        out = []
        for i, w in enumerate(widths):
            c = r[i] if i < len(r) else ""
            out.append(c.ljust(w) if align[i] == "l" else c.rjust(w))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in cells])


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to every result table."""
    import jax

    try:
        import subprocess

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent, check=False).stdout
        commit = git("rev-parse", "--short", "HEAD").strip() or None
        # A run from a tree with uncommitted changes to tracked files is not that commit's.
        if commit and git("status", "--porcelain", "--untracked-files=no").strip():
            commit += "+changes"
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()][:1] + [f"... {len(jax.devices())} in all"],
        "git_commit": commit,
    }


def write_json(name: str, doc: dict, out: str | None = None) -> Path:
    """Write `doc` to benchmarks/results/<name> (or `out`); returns the path."""
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    return path


def save_rows(name: str, rows: list, seconds: float, out: str | None = None) -> None:
    """Write rows with the environment and the run time to results/<name>; say where."""
    path = write_json(name, {"environment": environment(), "rows": rows,
                             "summary": {"seconds": seconds}}, out)
    print(f"wrote {path}")


def selection(doc: str, option: str, allowed, what: str, time_limit: float, report):
    """Parse `--<option> a,b --time-limit S --out F --show F`: (args, names picked), or
    None after `--show` printed a saved results file."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(f"--{option}", default=",".join(allowed))
    ap.add_argument("--time-limit", type=float, default=time_limit)
    ap.add_argument("--out")
    ap.add_argument("--show", help="print a saved results file and exit")
    args = ap.parse_args()
    if show_saved(args.show, report):
        return None
    return args, pick(ap, getattr(args, option), allowed, what)


def run_rows(items, run, label, report, name: str, out: str | None = None) -> None:
    """`run(item)` for each item (each returns a row with its "seconds"), saying when each
    is done; then the tables (`report(rows, seconds)`) and results/<name>."""
    import time

    t0 = time.perf_counter()
    rows = []
    for item in items:
        rows.append(run(item))
        print(f"  {label(item)}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    report(rows, seconds)
    save_rows(name, rows, seconds, out)


def _jsonable(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, (tuple, set, frozenset)):
        return list(x)
    return str(x)


def si(x: float | None, unit: str = "") -> str:
    """A number with an SI prefix (k, M, G, T), 3 significant digits."""
    if x is None:
        return "-"
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g}{s}{unit}"
    return f"{x:.3g}{unit}"


# The clusters plan_quality.py and planning_speed.py plan for, by name.
CLUSTERS = ("local", "a100x1", "a100x4", "h100x2")


def make_cluster(name: str):
    """`Cluster.local()`, or a DGX preset: a100x1/a100x4 (1 or 4 A100 nodes), h100x2."""
    import meshplan as mp

    return {"local": mp.Cluster.local,
            "a100x1": lambda: mp.clusters.dgx_a100(nodes=1),
            "a100x4": lambda: mp.clusters.dgx_a100(nodes=4),
            "h100x2": lambda: mp.clusters.dgx_h100(nodes=2)}[name]()
