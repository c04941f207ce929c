"""The intra-operator ILP, solved with OR-tools CP-SAT.

Data -> Variables -> Constraints -> Objective -> Solve -> Decode, as in the OR-tools samples.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time as _time

import numpy as np
from ortools.sat.python import cp_model

from meshplan.planner._problem import Problem

# CP-SAT needs integer coefficients. Costs are scaled so the largest single coefficient is
# about 1e7 units: the objective resolves differences of 1e-7 of the largest term, and the
# sum over even 1e5 terms stays far below 2**63.
_COST_UNITS = 1e7
# Memory coefficients are in KiB: a per-device budget of 80 GB is 8e7 units, and rounding
# each coefficient up keeps the constraint conservative.
_MEMORY_UNIT = 1024.0


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """The chosen strategy per class and how the solver got there."""

    choice: tuple[int, ...]
    objective: float  # seconds, the model's objective at `choice` (exact floats, not scaled)
    status: str  # "OPTIMAL", "FEASIBLE", "GREEDY" (solver found nothing better), "INFEASIBLE"
    gap: float  # relative gap between objective and the solver's lower bound
    wall_time: float


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """sum over classes of coef[c][s] * x[c, s] <= limit - constant (bytes)."""

    coef: tuple[np.ndarray, ...]
    constant: float
    limit: float


def node_costs(problem: Problem) -> list[np.ndarray]:
    """Per class, per strategy: seconds per step over all groups of the class."""
    return [np.array([s.time for s in strats]) * problem.class_size(c) + problem.self_cost[c]
            for c, strats in enumerate(problem.strategies)]


def objective_of(problem: Problem, choice, costs=None) -> float:
    """The ILP objective for a full choice, in seconds (float, unscaled)."""
    costs = costs if costs is not None else node_costs(problem)
    total = sum(costs[c][s] for c, s in enumerate(choice))
    for e in problem.edges:
        total += e.cost[e.src_keys[choice[e.src]], e.dst_keys[choice[e.dst]]]
    return float(total)


def greedy(problem: Problem, costs=None) -> tuple[int, ...]:
    """Classes in order, each taking its cheapest strategy given the ones chosen before."""
    costs = costs if costs is not None else node_costs(problem)
    incoming: dict[int, list] = {}
    for e in problem.edges:
        incoming.setdefault(e.dst, []).append(e)
        incoming.setdefault(e.src, []).append(e)
    choice: dict[int, int] = {}
    for c in range(len(costs)):
        total = costs[c].copy()
        for e in incoming.get(c, ()):
            other = e.src if e.dst == c else e.dst
            if other not in choice:
                continue
            if e.dst == c:
                total += e.cost[e.src_keys[choice[other]]][e.dst_keys]
            else:
                total += e.cost[:, e.dst_keys[choice[other]]][e.src_keys]
        choice[c] = int(np.argmin(total))
    return tuple(choice[c] for c in range(len(costs)))


def _memory_ok(rows, choice) -> bool:
    return all(r.constant + sum(r.coef[c][s] for c, s in enumerate(choice)) <= r.limit
               for r in rows)


def solve(problem: Problem, memory_rows: tuple[MemoryRow, ...] = (), time_limit: float = 10.0,
          hint: tuple[int, ...] | None = None, workers: int | None = None) -> SolveResult:
    """Pick one strategy per class minimising compute + collectives + resharding."""
    start = _time.perf_counter()
    # ---- Data
    costs = node_costs(problem)
    n = len(costs)
    biggest = max([float(c.max()) for c in costs if len(c)] +
                  [float(e.cost.max()) for e in problem.edges] + [1e-30])
    scale = _COST_UNITS / biggest

    def units(seconds) -> int:
        return int(round(seconds * scale))

    trivial = all(len(c) == 1 for c in costs)
    if trivial:
        choice = tuple(0 for _ in costs)
        status = "OPTIMAL" if _memory_ok(memory_rows, choice) else "INFEASIBLE"
        return SolveResult(choice, objective_of(problem, choice, costs), status, 0.0,
                           _time.perf_counter() - start)

    model = cp_model.CpModel()
    # ---- Variables: x[c, s] = class c takes strategy s.
    x = {(c, s): model.NewBoolVar(f"x[class={c},strategy={s}]")
         for c in range(n) for s in range(len(costs[c]))}
    terms = []
    # ---- Constraints
    for c in range(n):
        # Each class takes exactly one strategy.
        model.AddExactlyOne(x[c, s] for s in range(len(costs[c])))
        terms += [(units(costs[c][s]), x[c, s]) for s in range(len(costs[c]))]
    for k, e in enumerate(problem.edges):
        # Indicators of the producer's and consumer's layout of this value.
        src_on = [[x[e.src, s] for s in np.flatnonzero(e.src_keys == i)]
                  for i in range(e.cost.shape[0])]
        dst_on = [[x[e.dst, s] for s in np.flatnonzero(e.dst_keys == j)]
                  for j in range(e.cost.shape[1])]
        # Row minima are paid whatever the consumer picks: charge them linearly.
        row_min = e.cost.min(axis=1)
        for i, lits in enumerate(src_on):
            terms += [(units(row_min[i]), lit) for lit in lits]
        rest = e.cost - row_min[:, None]
        for i, j in zip(*np.nonzero(rest > 0)):
            u = units(rest[i, j])
            if u == 0:
                continue
            # y is forced to 1 when the producer is in layout i and the consumer wants j.
            y = model.NewBoolVar(f"reshard[edge={k},from={i},to={j}]")
            model.Add(sum(src_on[i]) + sum(dst_on[j]) - 1 <= y)
            terms.append((u, y))
    for r in memory_rows:
        # Per-device memory at a liveness peak stays within the device's budget.
        model.Add(sum(int(np.ceil(r.coef[c][s] / _MEMORY_UNIT)) * x[c, s]
                      for c in range(n) for s in range(len(costs[c])) if r.coef[c][s] > 0)
                  <= int((r.limit - r.constant) // _MEMORY_UNIT))
    # ---- Objective
    model.Minimize(sum(coef * var for coef, var in terms if coef))
    # ---- Hint: a greedy plan, so the solver starts from something sensible.
    hint = hint if hint is not None else greedy(problem, costs)
    for c, s in enumerate(hint):
        for t in range(len(costs[c])):
            model.AddHint(x[c, t], t == s)
    # ---- Solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers or min(8, os.cpu_count() or 1)
    solver.parameters.random_seed = 0
    code = solver.Solve(model)
    # ---- Decode
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        choice = tuple(next(s for s in range(len(costs[c])) if solver.Value(x[c, s]))
                       for c in range(n))
        obj = objective_of(problem, choice, costs)
        bound = solver.BestObjectiveBound() / scale
        gap = 0.0 if code == cp_model.OPTIMAL else max(0.0, (obj - bound) / max(obj, 1e-30))
        status = "OPTIMAL" if code == cp_model.OPTIMAL else "FEASIBLE"
    else:
        choice, gap = hint, float("inf")
        obj = objective_of(problem, choice, costs)
        status = "INFEASIBLE" if code == cp_model.INFEASIBLE else "GREEDY"
    return SolveResult(choice, obj, status, gap, _time.perf_counter() - start)


def brute_force(problem: Problem, memory_rows: tuple[MemoryRow, ...] = ()
                ) -> tuple[tuple[int, ...], float]:
    """Enumerate every choice (tiny problems only): the reference the ILP must match."""
    costs = node_costs(problem)
    best, best_obj = None, float("inf")
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if not _memory_ok(memory_rows, choice):
            continue
        obj = objective_of(problem, choice, costs)
        if obj < best_obj:
            best, best_obj = choice, obj
    return best, best_obj
