"""The BO engine of bocompress: pure computation (torch, BoTorch), no database, no HTTP.

The service calls :func:`propose` from a background thread with a job's history and stores the
points it returns; :func:`composite_value` and :func:`ratio` score a completed trial.
"""

from .engine import (
    Budgets,
    Observation,
    Problem,
    composite_value,
    fast_mode,
    initial_design_only,
    point_key,
    propose,
    ratio,
)
from .objectives import CostModel
from .space import Space

__all__ = [
    "Budgets",
    "CostModel",
    "Observation",
    "Problem",
    "Space",
    "composite_value",
    "fast_mode",
    "initial_design_only",
    "point_key",
    "propose",
    "ratio",
]
