"""meshplan.runtime: mesh building, plan application, pipelined execution of a scan over
layers, and measurement of what XLA compiled."""
from meshplan.runtime._apply import Interpreter, build_mesh, interpret
from meshplan.runtime._measure import Collective, Measured, measure
from meshplan.runtime._pipeline import pipeline_scan, pipeline_value_and_grad, schedule_table

__all__ = ["Collective", "Interpreter", "Measured", "build_mesh", "interpret", "measure",
           "pipeline_scan", "pipeline_value_and_grad", "schedule_table"]
