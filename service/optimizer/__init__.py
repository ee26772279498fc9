"""The BO engine of bocompress: pure computation (torch, BoTorch), no database, no HTTP.

The service calls :func:`propose` from a background thread with a job's history and stores the
points it returns; :func:`ratio` gives a compression point's exact R.
"""

from .engine import initial_design_only, point_key, propose
from .objectives import CostModel
from .problem import Budgets, Observation, Problem, ratio
from .space import Space

__all__ = [
    "Budgets",
    "CostModel",
    "Observation",
    "Problem",
    "Space",
    "initial_design_only",
    "point_key",
    "propose",
    "ratio",
]
