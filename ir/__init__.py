"""meshplan.ir: trace a JAX function to a Graph; op semantics; repeated-layer detection."""
from meshplan.ir._dims import DimMap, dim_map, flops_of
from meshplan.ir._graph import Graph, InputInfo, Node, Value
from meshplan.ir._trace import default_roles, trace

__all__ = ["DimMap", "Graph", "InputInfo", "Node", "Value", "default_roles", "dim_map",
           "flops_of", "trace"]
