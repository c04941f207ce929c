"""meshplan.runtime: mesh building, plan application, and measurement of what XLA compiled."""
from meshplan.runtime._apply import Interpreter, build_mesh, interpret
from meshplan.runtime._measure import Collective, Measured, measure

__all__ = ["Collective", "Interpreter", "Measured", "build_mesh", "interpret", "measure"]
