"""Pipeline schedules: step time, bubble and in-flight activations from per-stage times.

A pipeline of p stages runs m microbatches per step. Stage i takes ``forward[i]`` and
``backward[i]`` seconds per microbatch (point-to-point sends included, as the caller
prices them: nothing is assumed to overlap, as elsewhere in the cost model).

* 1F1B (Narayanan et al., "PipeDream", SOSP 2019; Megatron-LM's non-interleaved
  schedule): ``sum_i T_i + (m - 1) * max_i T_i`` with ``T_i = forward[i] + backward[i]``:
  the slowest stage runs m microbatches back to back, the others add their fill and drain
  once. With equal stages that is ``(m + p - 1) * T``: a bubble of (p - 1) / m of the
  ideal ``m * T`` (Megatron-LM's definition; GPipe's paper quotes the same bubble as
  (p - 1) / (m + p - 1) of the total).
* GPipe (Huang et al., "GPipe", NeurIPS 2019) runs every forward, then every backward: two
  pipelines, ``sum_i F_i + (m - 1) * max_i F_i + sum_i B_i + (m - 1) * max_i B_i``. Equal
  to 1F1B when one stage is the slowest both ways (always, with equal stages).
* Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", SC'21, section 2.2): each device holds v chunks of 1/v of its
  layers, so fill and drain shrink v-fold: ``m * max_i T_i + (sum_i T_i - max_i T_i) / v``,
  a bubble of (p - 1) / (v * m) with equal stages, at v times the point-to-point traffic
  (each microbatch crosses every device v times). Megatron-LM requires m to be a multiple
  of p for this schedule; so does this model.
* Activations held at a stage's peak, in microbatches of that stage's activations: GPipe
  keeps all m (every forward runs before any backward); 1F1B starts at most p - i forwards
  before stage i's first backward, so stage i holds min(p - i, m) <= p; interleaved stage i
  runs (p - i - 1) * 2 + (v - 1) * p warm-up chunk forwards (Megatron-LM's schedule) plus
  one, each 1/v of a microbatch's activations, at most m * v chunks.

>>> t = pipeline_time([1.0] * 4, [2.0] * 4, microbatches=8, schedule="1f1b")
>>> t.step_time, t.bubble_fraction, t.in_flight
(33.0, 0.375, (4.0, 3.0, 2.0, 1.0))
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

__all__ = ["SCHEDULES", "PipelineTime", "check_schedule", "in_flight", "in_flight_with_gradients",
           "pipeline_time"]

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True)
class PipelineTime:
    """One step of a pipeline schedule.

    Attributes:
      step_time: seconds per step, fill and drain included.
      ideal: seconds the slowest stage is busy (m * its time per microbatch).
      bubble: step_time - ideal: the slowest stage's idle time.
      bubble_fraction: bubble / ideal ((p - 1) / m, or (p - 1) / (v m) interleaved, for
        equal stages).
      in_flight: per stage, the microbatches of its activations it holds at its peak.
      hops_per_microbatch: activation sends per microbatch per stage boundary and
        direction (v for interleaved, else 1): multiplies the point-to-point traffic.
    """

    step_time: float
    ideal: float
    bubble: float
    bubble_fraction: float
    in_flight: tuple[float, ...]
    hops_per_microbatch: int


def check_schedule(p: int, m: int, schedule: str, v: int = 1) -> None:
    """Raise a ValueError naming the problem when (p stages, m microbatches, schedule, v
    chunks per device) is not a schedule this model (and the runtime) can run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}.")
    if not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError(f"microbatches must be a positive integer; got {m!r}.")
    if not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"virtual_stages={v!r}: must be a positive integer.")
    if schedule != "interleaved" and v != 1:
        raise ValueError(f"virtual_stages={v} needs schedule='interleaved' (got {schedule!r}).")
    if schedule == "interleaved" and m % p:
        raise ValueError(f"the interleaved schedule needs microbatches divisible by the "
                         f"{p} stages (Megatron-LM's rule); got {m}. Use a multiple of {p}.")


def _check(forward: Sequence[float], backward: Sequence[float], m: int, schedule: str,
           v: int) -> None:
    if len(forward) != len(backward) or not forward:
        raise ValueError(f"need one forward and one backward time per stage; got "
                         f"{len(forward)} and {len(backward)}.")
    if any(t < 0 for t in list(forward) + list(backward)):
        raise ValueError("stage times must be >= 0 seconds.")
    check_schedule(len(forward), m, schedule, v)


def in_flight(p: int, m: int, schedule: str, v: int = 1) -> tuple[float, ...]:
    """Per stage, microbatches of its activations held at its peak (see the module notes)."""
    return _held(p, m, schedule, v, 0)


def in_flight_with_gradients(p: int, m: int, schedule: str, v: int = 1) -> tuple[float, ...]:
    """Per stage, the most microbatches of its activations held at any backward pass
    after its first, when the stage's gradient sums over the microbatches exist: one
    backward is done and at most one more forward has started (GPipe: m - 1; 1F1B:
    min(p - i, m - 1); interleaved: one chunk fewer than `in_flight`'s, or the same
    when a forward chunk is left to start). 0 with one microbatch."""
    return _held(p, m, schedule, v, 1)


def _held(p: int, m: int, schedule: str, v: int, done: int) -> tuple[float, ...]:
    """Per stage, the most microbatches of activations held at a backward pass when
    `done` of its backward passes (chunks, interleaved) have run before it: the schedule's
    warm-up forwards, at most all m microbatches' (m * v chunks) less those done."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}.")
    if schedule == "gpipe":
        return tuple(float(m - done) for _ in range(p))
    if schedule == "1f1b" or v == 1:  # interleaving one chunk per device is plain 1F1B
        return tuple(float(min(p - i, m - done)) for i in range(p))
    return tuple(min((p - i - 1) * 2 + (v - 1) * p + 1, m * v - done) / v for i in range(p))


def pipeline_time(forward: Sequence[float], backward: Sequence[float], microbatches: int,
                  schedule: str = "1f1b", virtual_stages: int = 1) -> PipelineTime:
    """Step time of a pipeline from its stages' per-microbatch times (see the module notes).

    Args:
      forward, backward: seconds per microbatch for each stage, in pipeline order (for the
        interleaved schedule: each device's whole share, all of its v chunks together).
      microbatches: m, microbatches per step (the global batch is fixed; m splits it).
      schedule: "gpipe", "1f1b" or "interleaved".
      virtual_stages: v, chunks per device (interleaved only).
    """
    _check(forward, backward, microbatches, schedule, virtual_stages)
    p, m = len(forward), microbatches
    v = virtual_stages if schedule == "interleaved" else 1
    per_microbatch = [f + b for f, b in zip(forward, backward)]
    slowest = max(per_microbatch)
    ideal = m * slowest
    if schedule == "gpipe":  # a forward pipeline, then a backward one
        step = (sum(forward) + (m - 1) * max(forward) +
                sum(backward) + (m - 1) * max(backward))
    else:
        # The slowest stage is busy m times; every other stage's share of fill and drain
        # is paid once, in chunks of 1/v of its work.
        step = ideal + (sum(per_microbatch) - slowest) / v
    bubble = step - ideal
    return PipelineTime(step, ideal, bubble, bubble / ideal if ideal else 0.0,
                        in_flight(p, m, schedule, v), v)
