"""What a compression job minimizes: J, feasibility and the Pareto front, defined once.

Everything that ranks compression trials uses these functions: the service when it stores a
trial's ``objective``, the optimizer when it builds the GP's target and ranks incumbents, the
``/pareto`` endpoint, the dashboard (which shows the stored ``objective``) and the client's plot.

``J`` for a trial with distillation error L and exact compression ratio R:

- ``scalarized`` and ``pareto`` (ranked by its scalarization): ``kappa * L + R``;
- ``constrained``: ``L`` when ``R <= budget``; else ``L + 1e6 * (1 + R - budget)``, so every
  over-budget trial ranks after every feasible one (L is at most about 1).

The functions take floats or (for the optimizer) torch tensors alike; torch is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bocompress.spec import JobSpec

#: R may exceed the budget by this much and still be feasible (float summation noise).
FEASIBILITY_TOL = 1e-12
#: The penalty per unit of R over the budget, on top of a unit step.
PENALTY = 1e6


def over_budget(r: Any, budget: float) -> Any:
    """Whether R exceeds the budget: a bool, or a bool tensor for a tensor ``r``."""
    return r > budget + FEASIBILITY_TOL


def feasible(r: float, budget: float | None) -> bool:
    """Whether a trial of ratio ``r`` fits ``budget`` (no budget: always)."""
    return budget is None or not over_budget(float(r), float(budget))


def job_objective(kind: str | None, loss: Any, r: Any, kappa: float = 1.0, budget: float | None = None) -> Any:
    """J of one trial (or a tensor of them): see the module docstring. Lower is better.

    Args:
        kind: ``scalarized``, ``constrained`` or ``pareto``.
        loss: L, the distillation error (a float or a tensor).
        r: R, the exact compression ratio (same shape as ``loss``).
        kappa: the weight of L (``scalarized``, ``pareto``).
        budget: the largest allowed R (``constrained``).
    """
    if kind == "constrained":
        if budget is None:
            raise ValueError("a 'constrained' objective needs a budget")
        b = float(budget)
        # ``over * penalty`` is exactly 0 for a feasible trial, so J is L itself there.
        return loss + over_budget(r, b) * (PENALTY * (1.0 + r - b))
    if kind in ("scalarized", "pareto"):
        return float(kappa) * loss + r
    raise ValueError(f"unknown objective kind {kind!r}")


def compression_values(spec: JobSpec, ratio: float, values: Mapping[str, Any]) -> dict[str, float]:
    """A compression trial's stored values: the worker's report with the exact ``ratio`` (its own
    measurement kept as ``ratio_measured``), ``objective`` (J) and, for ``constrained``, ``feasible``.

    Args:
        spec: the job's spec (:class:`~bocompress.spec.JobSpec`: objective kind, kappa, budget).
        ratio: R, computed by the service from the layer table.
        values: what the worker reported (``distill_l2`` at least).
    """
    out = dict(values)
    if "ratio" in values:
        out["ratio_measured"] = float(values["ratio"])
    out["ratio"] = float(ratio)
    if spec.constrained:
        out["feasible"] = 1.0 if feasible(ratio, spec.budget) else 0.0
    out["objective"] = float(job_objective(spec.objective_kind, float(values["distill_l2"]), float(ratio), spec.kappa,
                                           spec.budget))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, both coordinates minimized, in increasing first
    coordinate; of equal points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_mask(r: Sequence[float], loss: Sequence[float]) -> list[bool]:
    """Per point, whether it is on :func:`pareto_front` of (loss, r)."""
    pts = [(float(a), float(b)) for a, b in zip(loss, r)]
    on = set(pareto_front(pts))
    return [i in on for i in range(len(pts))]


__all__ = ["FEASIBILITY_TOL", "PENALTY", "compression_values", "feasible", "job_objective", "over_budget",
           "pareto_front", "pareto_mask"]
