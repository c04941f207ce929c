"""Small helpers shared by the tracer and the planner."""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """Pause CPython's cyclic garbage collector for a bulk-allocation phase.

    Tracing and planning build millions of small tuples and dicts that all stay alive until
    the plan is made. The cyclic collector is triggered by allocation counts and rescans
    the ever-growing heap each time, which made planning time grow faster than the model:
    a 96-layer GPT planned in 30 % less time with it paused. Nothing is lost: cycles made
    meanwhile are collected on the next collection after the phase. Nested uses are fine;
    the collector is re-enabled only if it was enabled on entry.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
