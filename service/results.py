"""What a worker's or client's result stores: checked against the job, with R and J computed here.

Pure functions of a job (its spec and layer table) and a report: no HTTP and no SQL, so storage
calls them inside its transaction and the same report always yields the same stored values
(the same report twice hashes the same and is stored once). They raise
:class:`~bocompress.service.db.errors.Invalid` (a 422 naming the field).
"""

from __future__ import annotations

import math
from typing import Any

from bocompress import costs
from bocompress.objective import compression_values as _values, feasible
from bocompress.spec import JobSpec
from bocompress.service.db.errors import Invalid


def compression_values(job: Any, params: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """Fill ``ratio`` (exact, from the layer table) and ``objective`` from the worker's L."""
    spec = JobSpec.of(job.spec)
    return _values(spec, costs.ratio(job.profile, params, spec.cost), values)


def evaluate_values(job: Any, params: dict[str, Any], values: dict[str, float]) -> dict[str, float]:
    """An evaluation's stored values: checked against the job's metric; for compression jobs, R and
    the objective computed here, exactly, from the layer table."""
    if job.kind == "compression":
        if "distill_l2" not in values or values["distill_l2"] < 0:
            raise Invalid.field("values.distill_l2", "required, a finite number >= 0")
        return compression_values(job, params, values)
    metric = JobSpec.of(job.spec).metric
    if metric not in values:
        raise Invalid.field("values", f"missing the job's metric {metric!r}")
    return values


def validate_profile(job: Any, profile: dict[str, Any] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A profiling result's layer table, checked, and the search space it defines."""
    if profile is None:
        raise Invalid.field("profile", "a profiling task's result must carry the layer table")
    prof = profile
    names = [sp["name"] for sp in prof["params"]]
    if len(set(names)) != len(names):
        raise Invalid.field("profile.params", "names must be unique")
    known = set(names)
    cost_kind = JobSpec.of(job.spec).cost
    for i, layer in enumerate(prof["layers"]):
        for kind, form in layer["costs"].items():
            if kind not in layer["dense"]:
                raise Invalid.field(f"profile.layers.{i}.dense", f"missing the dense cost of kind {kind!r}")
            for term in form["terms"]:
                for f in term["factors"]:
                    if f["param"] not in known:
                        raise Invalid.field(f"profile.layers.{i}.costs", f"unknown parameter {f['param']!r}")
    for kind, total in prof["totals"].items():
        if not (math.isfinite(total) and total > 0):
            raise Invalid.field(f"profile.totals.{kind}", "must be a positive number")
    space = []
    for sp in prof["params"]:
        if not (0.0 < sp["low"] < sp["high"] <= 1.0 + 1e-9):
            raise Invalid.field("profile.params", f"{sp['name']}: need 0 < low < high <= 1")
        space.append({"name": sp["name"], "type": "float", "low": sp["low"], "high": sp["high"], "log": False,
                      "size": sp.get("size", 0)})
    if cost_kind not in prof["totals"]:
        raise Invalid(f"profile.totals: the method gives no {cost_kind!r} cost, which the objective uses",
                      "unsupported_cost")
    full = {sp["name"]: sp["high"] for sp in prof["params"]}
    r = costs.ratio(prof, full, cost_kind)
    if not math.isfinite(r):
        raise Invalid.field("profile", "the cost forms give a non-finite ratio")
    return prof, space


def unreachable_budget(job: Any, prof: dict[str, Any], space: list[dict[str, Any]]) -> str | None:
    """Why a ``constrained`` job's budget cannot be met, or None: its budget is below the smallest R
    the space allows (every parameter at its lowest ``k / size`` step, as the engine rounds)."""
    spec = JobSpec.of(job.spec)
    if not spec.constrained or spec.budget is None:
        return None
    low = {}
    for sp in space:
        size = int(sp.get("size") or 0)
        low[sp["name"]] = (max(1, math.ceil(sp["low"] * size - 1e-9)) / size) if size > 0 else sp["low"]
    r_min = costs.ratio(prof, low, spec.cost)
    if feasible(r_min, spec.budget):
        return None
    budget = spec.budget
    return (f"the budget R <= {budget:g} is unreachable: the smallest R this search space allows "
            f"(theta_min everywhere) is {r_min:.4f}; raise objective.budget to at least {r_min:.4f}, "
            f"lower compression.theta_min, or select more layers")


__all__ = ["compression_values", "evaluate_values", "unreachable_budget", "validate_profile"]
