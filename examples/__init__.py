"""Example models for tests, benchmarks and notebooks.

Each `make_*` function returns an `Example`: a pure, un-jitted
`train_step(params, opt_state, batch) -> (params, opt_state, loss)` and its `args`.
At default sizes every dimension a planner may shard is divisible by 8.
"""

from __future__ import annotations

from ._common import Example, abstract
from .gpt import gpt_param_count, make_gpt
from .mlp import make_mlp
from .moe import make_moe
from .transformer import make_transformer_scan

ALL_EXAMPLES = ("mlp", "transformer_scan", "gpt", "gpt_scan", "moe")


def make(name: str, **kw) -> Example:
    """Build the example called `name` (one of `ALL_EXAMPLES`) with keyword overrides."""
    if name == "mlp":
        return make_mlp(**kw)
    if name == "transformer_scan":
        return make_transformer_scan(**kw)
    if name in ("gpt", "gpt_scan"):
        return make_gpt(scan=name == "gpt_scan", **kw)
    if name == "moe":
        return make_moe(**kw)
    raise ValueError(f"unknown example {name!r}; expected one of {ALL_EXAMPLES}")


__all__ = ["ALL_EXAMPLES", "Example", "abstract", "gpt_param_count", "make", "make_gpt",
           "make_mlp", "make_moe", "make_transformer_scan"]
