"""The layer table of the wire contract: what a worker's profiling task reports (``ProfileReport``):
each layer's closed-form costs in theta, its one-shot allocation signals, and the search space.

Part of the contract (:mod:`bocompress.schemas` exports all of it): only pydantic is imported.
"""

from __future__ import annotations

import math
from typing import Any

from bocompress.schemas_types import _Strict
from pydantic import Field, model_validator



class CostFactor(_Strict):
    """A kept count: ``clamp(floor(theta[param] * size + 0.5), 1, size)``."""

    param: str
    size: int = Field(ge=1)


class CostTerm(_Strict):
    """``coef * product(kept counts of its factors)``; no factor means a constant."""

    coef: float
    factors: list[CostFactor] = Field(default_factory=list)


class CostForm(_Strict):
    """A layer's cost as a closed form in theta: ``min(sum(terms), cap)`` (cap = the dense cost)."""

    terms: list[CostTerm]
    cap: float | None = None


class LayerSignals(_Strict):
    """Curves of one search parameter over a theta grid, for one-shot allocators (interface of issue 13).

    ``energy[k]``: the share of the layer's importance mass kept at ``grid[k]`` (svd: singular-value
    energy; tucker2: core energy; magnitude: squared weights; channel methods: group scores).
    ``lamp[k]``: the LAMP-style score of the most important unit removed at ``grid[k]`` (0 when
    nothing is removed). ``sensitivity[m]``: the measured L of the model with only this layer
    compressed at ``sens_grid[m]`` (BatchNorm re-estimated, as trials are).
    """

    grid: list[float] = Field(min_length=2, max_length=33)
    energy: list[float] = Field(min_length=2, max_length=33)
    lamp: list[float] = Field(min_length=2, max_length=33)
    sens_grid: list[float] | None = Field(default=None, min_length=1, max_length=8)
    sensitivity: list[float] | None = Field(default=None, min_length=1, max_length=8)

    @model_validator(mode="after")
    def _curves_ok(self) -> "LayerSignals":
        k = len(self.grid)
        if len(self.energy) != k or len(self.lamp) != k:
            raise ValueError("signals: grid, energy and lamp must have one length")
        vals = [*self.grid, *self.energy, *self.lamp, *(self.sens_grid or []), *(self.sensitivity or [])]
        if not all(math.isfinite(x) for x in vals):
            raise ValueError("signals: every value must be finite")
        if any(b <= a for a, b in zip(self.grid, self.grid[1:])) or self.grid[0] <= 0 or self.grid[-1] != 1.0:
            raise ValueError("signals.grid must increase strictly in (0, 1] and end at 1.0")
        if (self.sens_grid is None) != (self.sensitivity is None):
            raise ValueError("signals: sens_grid and sensitivity come together")
        if self.sens_grid is not None and len(self.sens_grid) != len(self.sensitivity or []):
            raise ValueError("signals: sens_grid and sensitivity must have one length")
        return self


class LayerInfo(_Strict):
    name: str
    type: str = Field(description="module type, e.g. Conv2d, Linear")
    method: str
    shape: list[int] = Field(description="weight shape")
    params: list[str] = Field(description="names of the search parameters this layer's cost depends on")
    costs: dict[str, CostForm] = Field(description="cost kind -> closed form in theta")
    dense: dict[str, float] = Field(default_factory=dict, description="cost kind -> cost of the original layer")
    signals: LayerSignals | None = Field(
        default=None, description="per-layer curves for one-shot allocators (on the row named after a search parameter)"
    )


class SearchParam(_Strict):
    name: str
    low: float
    high: float
    size: int = Field(default=0, description="the count theta multiplies (rank, channels); 0 when continuous")
    dense_from: float | None = Field(
        default=None, description="theta from which the layer is left dense (1.0 when it never is before 1)"
    )


class ProfileReport(_Strict):
    """What a worker reports for a job's profiling task."""

    layers: list[LayerInfo] = Field(min_length=1)
    params: list[SearchParam] = Field(min_length=1)
    totals: dict[str, float] = Field(description="cost kind -> cost of the whole original model")
    model_info: dict[str, Any] = Field(default_factory=dict)
