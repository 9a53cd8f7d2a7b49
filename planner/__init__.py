"""memo.planner: torch-free memory planning (alpha program, layouts, cost model, plan files)."""

from .alpha import AlphaResult, solve_alpha
from .units import UnitError, format_bytes, parse_bandwidth, parse_bytes, parse_count

__all__ = ["AlphaResult", "solve_alpha", "UnitError", "format_bytes", "parse_bandwidth", "parse_bytes", "parse_count"]
