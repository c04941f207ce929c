"""The intra-operator ILP, solved with HiGHS through OR-tools' model builder.

Data -> Variables -> Constraints -> Objective -> Solve -> Decode, as in the OR-tools samples.
"""
from __future__ import annotations

import dataclasses
import time as _time

import numpy as np
import scipy.sparse
from ortools.linear_solver.python import model_builder_helper as mbh

from meshplan.planner._problem import Problem

# Step times are seconds, and per-op terms range from nanoseconds (a tiny model on NVLink)
# to seconds (GPT-3 on Ethernet). The MIP sees them rescaled so the largest coefficient is
# 1e4: differences of 1e-6 of it stay well above HiGHS's 1e-7 feasibility tolerance, and
# absolute tolerances mean the same thing whatever the model's scale.
_LARGEST_COEFFICIENT = 1e4
# An LP value this close to 0 or 1 counts as integral (HiGHS's default primal feasibility
# tolerance is 1e-7; a little slack above it).
_INTEGRALITY_TOLERANCE = 1e-6
# Memory rows are in KiB for the same reason (80 GB per device is 8e7 units).
_MEMORY_UNIT = 1024.0


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """The chosen strategy per class and how the solver got there."""

    choice: tuple[int, ...]
    objective: float  # seconds, the ILP model's objective at `choice` (floats, not scaled)
    status: str  # "OPTIMAL", "FEASIBLE", "LP-ROUNDED", "GREEDY" (nothing better), "INFEASIBLE"
    # gap: (objective - lower bound) / objective; 0 when proven optimal
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


def share_groups(problem: Problem) -> list[list[int]]:
    """Edge indices grouped by the produced value they read (see Edge.share)."""
    groups: dict[tuple, list[int]] = {}
    for k, e in enumerate(problem.edges):
        groups.setdefault(e.share or ("edge", k), []).append(k)
    return list(groups.values())


def model_objective(problem: Problem, choice, costs=None) -> float:
    """The ILP's own objective: every reading edge pays its reshard (Alpa's model)."""
    costs = costs if costs is not None else node_costs(problem)
    total = sum(costs[c][s] for c, s in enumerate(choice))
    for e in problem.edges:
        total += e.cost[e.src_keys[choice[e.src]], e.dst_keys[choice[e.dst]]]
    return float(total)


def objective_of(problem: Problem, choice, costs=None) -> float:
    """The ILP objective for a full choice, in seconds (float, unscaled).

    Reshards of one value are charged once per distinct (producer layout, wanted layout),
    at the largest multiplicity among the edges that want it.
    """
    costs = costs if costs is not None else node_costs(problem)
    total = sum(costs[c][s] for c, s in enumerate(choice))
    for members in share_groups(problem):
        total += shared_cost(problem, members, choice)
    return float(total)


def shared_cost(problem: Problem, members: list[int], choice) -> float:
    """Seconds the readers `members` (edges of one produced value) pay under `choice`:
    each distinct (producer layout, wanted layout) once, at its largest multiplicity."""
    paid: dict[tuple, float] = {}
    for k in members:
        e = problem.edges[k]
        i, j = e.src_keys[choice[e.src]], e.dst_keys[choice[e.dst]]
        key = (i, e.dst_layouts[j] if e.dst_layouts else (k, j))
        paid[key] = max(paid.get(key, 0.0), float(e.cost[i, j]))
    return sum(paid.values())


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


def _compress(e) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge layouts whose reshard costs are identical: (src map, dst map, smaller matrix).

    Two producer layouts with the same cost row are interchangeable for this edge, so they
    share one row; likewise for consumer columns. This shrinks the edge variables several
    fold without changing the optimum.
    """
    row_of, inv_r = _unique_rows(e.cost)
    rows = e.cost[row_of]
    col_of, inv_c = _unique_rows(rows.T)
    return inv_r[e.src_keys], inv_c[e.dst_keys], rows[:, col_of]


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(a, axis=0, return_index=True, return_inverse=True) without the values:
    distinct rows in sorted order (first occurrence of each), and each row's index among
    them. Tuples in a dict: np.unique's structured-array sort costs ~100 us per call,
    and the model has one call per edge."""
    rows = list(map(tuple, a.tolist()))
    first: dict[tuple, int] = {}
    for k, r in enumerate(rows):
        first.setdefault(r, k)
    distinct = sorted(first)
    index = {r: k for k, r in enumerate(distinct)}
    return (np.array([first[r] for r in distinct], dtype=np.int64),
            np.array([index[r] for r in rows], dtype=np.int64))


class _LinearModel:
    """A linear model assembled as arrays and handed to OR-tools in one call.

    Models have 10^4-10^5 variables; setting them one coefficient at a time through the
    Python API took longer than solving them. Variables are numbered in creation order;
    `variables` returns their indices, so the builder keeps them in dicts keyed by what
    they mean (x[class] -> one index per strategy).
    """

    def __init__(self):
        self.objective: list[np.ndarray] = []
        self.n_vars = 0
        self.n_rows = 0
        self.row_lo: list[np.ndarray] = []
        self.row_hi: list[np.ndarray] = []
        self.entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def variables(self, cost: np.ndarray) -> np.ndarray:
        """New variables in [0, 1] with these objective coefficients; their indices."""
        first = self.n_vars
        self.n_vars += len(cost)
        self.objective.append(np.asarray(cost, dtype=float))
        return np.arange(first, self.n_vars)

    def rows(self, lo, hi, n: int) -> int:
        """n new rows lo <= a.x <= hi; the index of the first."""
        first = self.n_rows
        self.n_rows += n
        self.row_lo.append(np.broadcast_to(np.asarray(lo, dtype=float), (n,)))
        self.row_hi.append(np.broadcast_to(np.asarray(hi, dtype=float), (n,)))
        return first

    def terms(self, rows, cols, coefs) -> None:
        """a[rows[k], cols[k]] += coefs[k]."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        self.entries.append((rows, cols, np.broadcast_to(np.asarray(coefs, float), rows.shape)))

    def build(self) -> mbh.ModelBuilderHelper:
        rows, cols, vals = (np.concatenate(p) for p in zip(*self.entries))
        matrix = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(self.n_rows, self.n_vars))
        model = mbh.ModelBuilderHelper()
        model.fill_model_from_sparse_data(
            np.zeros(self.n_vars), np.ones(self.n_vars), np.concatenate(self.objective),
            np.concatenate(self.row_lo), np.concatenate(self.row_hi), matrix)
        return model


def _add_edge(m: _LinearModel, x: dict[int, np.ndarray], e, scale: float) -> None:
    """One reader of a value: joint variables y[i, j] (producer layout i, wanted layout j)
    whose marginals are the producer's and the consumer's one-hots; y's cost is the
    reshard from i to j."""
    src_keys, dst_keys, cost = _compress(e)
    n_src, n_dst = cost.shape
    y = m.variables(cost.ravel() * scale).reshape(n_src, n_dst)
    i, j = np.indices((n_src, n_dst))
    # Marginal on the producer: sum_j y[i, j] = sum of x[src, s] over its strategies s
    # that produce layout i (exactly its chosen layout's row is switched on).
    first = m.rows(0.0, 0.0, n_src)
    m.terms(first + i.ravel(), y.ravel(), 1.0)
    m.terms(first + src_keys, x[e.src], -1.0)
    # Marginal on the consumer: likewise, the column of the layout it wants.
    first = m.rows(0.0, 0.0, n_dst)
    m.terms(first + j.ravel(), y.ravel(), 1.0)
    m.terms(first + dst_keys, x[e.dst], -1.0)


def _model(problem: Problem, costs, memory_rows, scale):
    """Data -> Variables -> Constraints -> Objective, as one OR-tools model (continuous:
    its LP relaxation; `_make_integer` turns it into the MIP)."""
    m = _LinearModel()
    # ---- Variables: x[c][s] = class c takes strategy s (objective: its cost).
    x = {c: m.variables(costs[c] * scale) for c in range(len(costs))}
    # ---- Constraints
    # Each class takes exactly one strategy.
    first = m.rows(1.0, 1.0, len(costs))
    for c in range(len(costs)):
        m.terms(np.full(len(costs[c]), first + c), x[c], 1.0)
    for e in problem.edges:
        _add_edge(m, x, e, scale)
    for r in memory_rows:
        # Per-device memory at a liveness peak stays within the device's budget.
        row = m.rows(-np.inf, (r.limit - r.constant) / _MEMORY_UNIT, 1)
        for c in range(len(costs)):
            used = np.flatnonzero(r.coef[c] > 0)
            m.terms(np.full(len(used), row), x[c][used], r.coef[c][used] / _MEMORY_UNIT)
    return m.build(), x


def _make_integer(model: mbh.ModelBuilderHelper, x: dict[int, np.ndarray]) -> None:
    """Strategy variables become 0/1; the edge variables follow from their marginals."""
    for var in np.concatenate(list(x.values())).tolist():
        model.set_var_integrality(var, True)


def _binding(rows: tuple[MemoryRow, ...]) -> tuple[MemoryRow, ...]:
    """The memory rows some choice could violate; the others cannot bind, so are left out.

    A row that holds even when every class takes its most memory-hungry strategy changes
    nothing but slows the simplex down: such dense rows took a tiny GPT's LP from 1.0 s
    to 3.6 s.
    """
    return tuple(r for r in rows
                 if r.constant + sum(float(np.max(c)) for c in r.coef if len(c)) > r.limit)


def _least(row: MemoryRow) -> float:
    """The row's left side with every class at its least memory-hungry strategy."""
    return row.constant + sum(float(np.min(c)) for c in row.coef if len(c))


def _run(model, time_limit: float, presolve: bool):
    """Solve on HiGHS; the solver helper holds status, values and bound."""
    solver = mbh.ModelSolverHelper("highs")
    # No banner on stdout. For an LP without memory rows, HiGHS's presolve finds little to
    # remove and took two thirds of the solve (2x4 mesh, 24-layer GPT: 2.0 s, 0.7 s
    # without); with binding memory rows it pays off (tiny GPT: 3.6 s without, 2.7 s with).
    solver.set_solver_specific_parameters("output_flag=false" if presolve else
                                          "output_flag=false\npresolve=off")
    solver.set_time_limit_in_seconds(max(time_limit, 0.01))
    solver.solve(model)
    return solver


def _decode(values: np.ndarray, x) -> tuple[tuple[int, ...], bool]:
    """The strategy with the largest value per class, and whether every x was 0/1."""
    choice, integral = [], True
    for c in range(len(x)):
        vals = values[x[c]]
        choice.append(int(np.argmax(vals)))
        integral &= bool(np.all(np.minimum(vals, 1.0 - vals) < _INTEGRALITY_TOLERANCE))
    return tuple(choice), integral


def solve(problem: Problem, memory_rows: tuple[MemoryRow, ...] = (), time_limit: float = 10.0,
          hint: tuple[int, ...] | None = None) -> SolveResult:
    """Pick one strategy per class minimising compute + collectives + resharding.

    The model is Alpa's: one-hot strategy variables per class, and per edge a joint
    variable per (producer layout, consumer layout) pair whose marginals equal the two
    one-hots. That formulation has a tight LP relaxation: its optimum is nearly always
    integral. So the LP is solved first (HiGHS, simplex); an integral answer is optimal
    for the integer program too. Otherwise the HiGHS MIP runs with the time left, and the
    rounded LP answer and a greedy plan (or `hint`) are fallbacks. The fallback is not
    handed to HiGHS as a MIP start: solution hints through OR-tools' model builder crash
    HiGHS (segmentation fault, ortools 9.15); the best of all candidates is returned.
    """
    start = _time.perf_counter()
    # ---- Data
    costs = node_costs(problem)
    greedy_choice = hint if hint is not None else greedy(problem, costs)
    if all(len(c) == 1 for c in costs):
        status = "OPTIMAL" if _memory_ok(memory_rows, greedy_choice) else "INFEASIBLE"
        return SolveResult(greedy_choice, model_objective(problem, greedy_choice, costs), status,
                           0.0, _time.perf_counter() - start)
    # Costs are rescaled so the largest node or edge coefficient is _LARGEST_COEFFICIENT.
    biggest = max([float(c.max()) for c in costs] + [float(e.cost.max()) for e in problem.edges])
    scale = _LARGEST_COEFFICIENT / max(biggest, 1e-30)
    candidates = [(model_objective(problem, greedy_choice, costs), greedy_choice, "GREEDY")]
    rows = _binding(memory_rows)
    if any(_least(r) > r.limit * (1 + 1e-9) for r in rows):
        # Even every class at its smallest cannot meet this row: no need to ask HiGHS
        # (whose presolve took 2 s to say so for a 1024-GPU mesh of GPT-3).
        return SolveResult(greedy_choice, candidates[0][0], "INFEASIBLE", float("inf"),
                           _time.perf_counter() - start)
    # ---- Solve the LP relaxation
    model, x = _model(problem, costs, rows, scale)
    lp = _run(model, time_limit, presolve=bool(rows))
    if lp.status() == mbh.SolveStatus.INFEASIBLE:
        return SolveResult(greedy_choice, candidates[0][0], "INFEASIBLE", float("inf"),
                           _time.perf_counter() - start)
    bound = -float("inf")
    if lp.status() == mbh.SolveStatus.OPTIMAL:
        bound = lp.objective_value() / scale
        choice, integral = _decode(lp.variable_values(), x)
        obj = model_objective(problem, choice, costs)
        if integral and _memory_ok(memory_rows, choice):
            return SolveResult(choice, obj, "OPTIMAL", 0.0, _time.perf_counter() - start)
        if _memory_ok(memory_rows, choice):
            candidates.append((obj, choice, "LP-ROUNDED"))
    # ---- Fractional LP: the MIP, with the time that is left
    left = time_limit - (_time.perf_counter() - start)
    if left > 0.1:
        _make_integer(model, x)  # the same model, not built again
        mip = _run(model, left, presolve=True)
        if mip.has_solution():
            choice, _ = _decode(mip.variable_values(), x)
            status = "OPTIMAL" if mip.status() == mbh.SolveStatus.OPTIMAL else "FEASIBLE"
            candidates.append((model_objective(problem, choice, costs), choice, status))
            bound = max(bound, mip.best_objective_bound() / scale)
    # ---- Decode: the best answer found, with its gap to the best lower bound
    obj, choice, status = min((c for c in candidates if _memory_ok(memory_rows, c[1])),
                              default=candidates[0], key=lambda c: c[0])
    gap = 0.0 if status == "OPTIMAL" else max(0.0, (obj - bound) / max(obj, 1e-30))
    return SolveResult(choice, obj, status, gap, _time.perf_counter() - start)


def brute_force(problem: Problem, memory_rows: tuple[MemoryRow, ...] = (),
                max_choices: float = 2e7) -> tuple[tuple[int, ...] | None, float]:
    """Enumerate every choice (tiny problems only): the reference the ILP must match.

    The objective of all choices at once is one dense tensor with an axis per class,
    built by broadcasting node costs and edge matrices along their classes' axes.
    """
    costs = node_costs(problem)
    shape = tuple(len(c) for c in costs)
    if float(np.prod(shape, dtype=float)) > max_choices:
        raise ValueError(f"{np.prod(shape, dtype=float):.3g} choices to enumerate (strategy "
                         f"counts {shape}); brute force is for problems under {max_choices:.0g}.")

    def along(vec_or_mat, axes):
        out_shape = [1] * len(shape)
        for ax, n in zip(axes, np.shape(vec_or_mat)):
            out_shape[ax] = n
        if len(axes) == 2 and axes[0] > axes[1]:
            vec_or_mat = np.asarray(vec_or_mat).T
        return np.reshape(vec_or_mat, out_shape)

    total = np.zeros(shape)
    for c, vec in enumerate(costs):
        total = total + along(vec, (c,))
    for e in problem.edges:
        total = total + along(e.matrix(), (e.src, e.dst))
    feasible = np.ones(shape, dtype=bool)
    for r in memory_rows:
        used = np.full(shape, r.constant)
        for c, vec in enumerate(r.coef):
            used = used + along(vec, (c,))
        feasible &= used <= r.limit
    if not feasible.any():
        return None, float("inf")
    total = np.where(feasible, total, np.inf)
    flat = int(np.argmin(total))
    return tuple(int(i) for i in np.unravel_index(flat, shape)), float(total.flat[flat])


def _share_vector(problem: Problem, members: list[int], c: int, choice) -> np.ndarray | None:
    """The shared reshard cost of one value's readers (see `objective_of`) for every
    strategy of class `c`, the other classes fixed at `choice`; None where the edges do
    not have the common shape this handles (one producer class and its layout ids, and at
    most one reader in `c`), for `refine` to price them one strategy at a time."""
    edges = [problem.edges[k] for k in members]
    first = edges[0]
    if any(e.src != first.src or e.src_keys is not first.src_keys and
           not np.array_equal(e.src_keys, first.src_keys) for e in edges[1:]):
        return None

    def key(k, e, j):  # the layout a reader wants: readers wanting the same one share it
        return e.dst_layouts[j] if e.dst_layouts else ("edge", k)

    if c == first.src:  # the producer moves: every reader's wanted layout stays
        if any(e.dst == c for e in edges):
            return None
        best: dict = {}
        for k, e in zip(members, edges):
            j = e.dst_keys[choice[e.dst]]
            col = e.cost[first.src_keys, j]
            kk = key(k, e, j)
            best[kk] = col if kk not in best else np.maximum(best[kk], col)
        return sum(best.values())
    moving = [(k, e) for k, e in zip(members, edges) if e.dst == c]
    if len(moving) != 1:
        return None
    i = first.src_keys[choice[first.src]]
    fixed: dict = {}
    for k, e in zip(members, edges):
        if e.dst != c:
            j = e.dst_keys[choice[e.dst]]
            kk = key(k, e, j)
            fixed[kk] = max(fixed.get(kk, 0.0), float(e.cost[i, j]))
    k, e = moving[0]
    # Per layout the reader in c may want: what the fixed readers already pay for it.
    already = np.array([fixed.get(key(k, e, j), 0.0) for j in range(e.cost.shape[1])])
    paid = already[e.dst_keys]
    return sum(fixed.values()) - paid + np.maximum(paid, e.cost[i, e.dst_keys])


def refine(problem: Problem, choice: tuple[int, ...], memory_rows: tuple[MemoryRow, ...] = (),
           sweeps: int = 3) -> tuple[tuple[int, ...], float]:
    """Coordinate descent on the exact objective (reshards shared by readers, as XLA does).

    The ILP charges every reading edge its reshard (that keeps its formulation tight and
    fast); XLA converts a value to a layout once however many ops read it there. Starting
    from the ILP's answer, each class in turn takes the strategy that is best with the
    others fixed, for a few sweeps, never breaking a memory row.
    """
    costs = node_costs(problem)
    shares = share_groups(problem)
    touching: dict[int, list[int]] = {}
    for gi, members in enumerate(shares):
        for c in {problem.edges[k].src for k in members} | {problem.edges[k].dst
                                                               for k in members}:
            touching.setdefault(c, []).append(gi)

    def local_costs(c, ch) -> np.ndarray:
        """Class c's cost plus its shared reshards, per strategy, the others fixed."""
        local = costs[c].astype(float)
        for gi in touching.get(c, ()):
            vec = _share_vector(problem, shares[gi], c, ch)
            if vec is None:
                trial = list(ch)
                vec = np.empty(len(local))
                for s in range(len(local)):
                    trial[c] = s
                    vec[s] = shared_cost(problem, shares[gi], trial)
            local = local + vec
        return local

    choice = list(choice)
    for _ in range(sweeps):
        improved = False
        for c in range(len(costs)):
            if len(costs[c]) == 1:
                continue
            local = local_costs(c, choice)
            order = np.argsort(local, kind="stable")
            for s in order:
                if local[s] >= local[choice[c]] - 1e-15:
                    break
                trial = choice.copy()
                trial[c] = int(s)
                if _memory_ok(memory_rows, trial):
                    choice = trial
                    improved = True
                    break
        if not improved:
            break
    return tuple(choice), objective_of(problem, tuple(choice), costs)
