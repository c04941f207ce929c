"""meshplan.planner: strategies, the intra-op ILP, mesh and placement search, baselines."""
from meshplan.planner._evaluate import Cost
from meshplan.planner._ilp import SolveResult, brute_force, solve
from meshplan.planner._plan import (Alternative, Constraints, PipelineSettings, Plan, Stage,
                                     spec_of)
from meshplan.planner._search import SearchOptions, search

__all__ = ["Alternative", "Constraints", "Cost", "PipelineSettings", "Plan", "SearchOptions",
           "SolveResult", "Stage", "brute_force", "search", "solve", "spec_of"]
