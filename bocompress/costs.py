"""Exact cost of a compressed model as a closed form in theta.

The worker reports each layer's cost as a :class:`~bocompress.schemas.CostForm`; the service
(and the worker, to check its measurement) evaluate R(theta) with these functions, without
running the model. Pure Python: no torch needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def kept(theta: float, size: int) -> int:
    """The number of kept units (rank, channels, weights) for a fraction ``theta`` of ``size``.

    ``clamp(floor(theta * size + 0.5), 1, size)``: round half up, at least one, at most all.
    Every method uses this one rounding, so the service's R equals the worker's measurement.
    """
    return int(min(max(math.floor(theta * size + 0.5), 1), size))


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def form_cost(form: Any, theta: Mapping[str, float]) -> float:
    """Evaluate one layer's cost form (a CostForm model or its dict) at ``theta``."""
    total = 0.0
    for term in _get(form, "terms"):
        v = float(_get(term, "coef"))
        for f in _get(term, "factors"):
            v *= kept(float(theta[_get(f, "param")]), int(_get(f, "size")))
        total += v
    cap = _get(form, "cap")
    if cap is not None:
        total = min(total, float(cap))
    return total


def model_cost(profile: Any, theta: Mapping[str, float], kind: str = "params") -> float:
    """Cost of the whole compressed model: the uncompressed rest plus every layer's form."""
    totals = _get(profile, "totals")
    total = float(totals[kind])
    for layer in _get(profile, "layers"):
        costs = _get(layer, "costs")
        dense = _get(layer, "dense")
        if kind not in costs:
            continue
        total += form_cost(costs[kind], theta) - float(dense[kind])
    return total


def searched_cost(profile: Any, kind: str = "params") -> float:
    """The dense cost of the layers the search compresses (those with a cost form of ``kind``)."""
    return float(sum(float(_get(layer, "dense")[kind]) for layer in _get(profile, "layers")
                     if kind in _get(layer, "costs")))


def ratio(profile: Any, theta: Mapping[str, float], kind: str = "params") -> float:
    """R(theta) = cost(compressed) / cost(original), exact."""
    return model_cost(profile, theta, kind) / float(_get(profile, "totals")[kind])


def layer_params(profile: Any) -> Sequence[str]:
    return [str(_get(p, "name")) for p in _get(profile, "params")]
