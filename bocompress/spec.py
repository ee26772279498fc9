"""A typed, read-only view of a job spec (the ``JobCreate`` body as the service stores it).

Every layer reads a stored spec through :class:`JobSpec` instead of ``spec["budget"][...]`` dict
lookups: the service, the scheduler, the optimizer's problem and the client. It holds the rules
that must be written once: the job's metric and direction, and how many proposals its buffer
needs. Only the standard library is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: The metric of a generic job whose objective names none.
DEFAULT_METRIC = "objective"


def refill_step(max_parallel: int) -> int:
    """How many free buffer slots a job waits for before a refill: 1 up to 15 parallel trials
    (each result is in the next proposal), then an eighth of the buffer (a wide buffer is
    refilled in batches, since every refill reads the job's history)."""
    return max(1, max_parallel // 8)


@dataclass(frozen=True)
class JobSpec:
    """The parts of a job spec that the service and the client act on.

    Build it with :meth:`of` from the stored spec (a dict) or a job's ``spec`` as the API shows it.
    """

    #: ``compression`` (workers evaluate it) or ``generic`` (its client does, with ask/tell).
    kind: Literal["compression", "generic"]
    max_trials: int
    max_parallel: int
    max_attempts: int
    lease_seconds: float
    #: The value a trial is ranked by: ``objective`` (J) for compression jobs, else the job's metric.
    metric: str
    direction: Literal["minimize", "maximize"]
    #: Compression: ``scalarized``, ``constrained`` or ``pareto``; None for generic jobs.
    objective_kind: str | None
    kappa: float
    #: The largest allowed R (``constrained``), else None.
    budget: float | None
    #: The cost kind R counts (``params``, ``flops``, ``channels``, ``activation``).
    cost: str

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> "JobSpec":
        b = spec.get("budget") or {}
        o = spec.get("objective") or {}
        compression = spec.get("compression") is not None
        budget = o.get("budget")
        return cls(
            kind="compression" if compression else "generic",
            max_trials=int(b.get("max_trials", 60)),
            max_parallel=int(b.get("max_parallel", 4)),
            max_attempts=int(b.get("max_attempts", 3)),
            lease_seconds=float(b.get("lease_seconds", 60.0)),
            metric=DEFAULT_METRIC if compression else (o.get("metric") or DEFAULT_METRIC),
            direction="minimize" if compression else ("maximize" if o.get("direction") == "maximize" else "minimize"),
            objective_kind=o.get("kind"),
            kappa=float(o.get("kappa", 1.0)),
            budget=None if budget is None else float(budget),
            cost=str(o.get("cost") or "params"),
        )

    @property
    def is_compression(self) -> bool:
        return self.kind == "compression"

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    @property
    def constrained(self) -> bool:
        return self.objective_kind == "constrained"

    @property
    def modelled_metric(self) -> str:
        """What the optimizer models: L (``distill_l2``) for compression jobs, else the metric."""
        return "distill_l2" if self.is_compression else self.metric

    def signed(self, value: float) -> float:
        """A trial's ranking value, lower is better (a maximized metric negated)."""
        return -float(value) if self.maximize else float(value)

    def buffer_target(self, active: int = 0) -> int:
        """How many queued proposals the job keeps: ``max_parallel``, or, when more consumers are
        active (``active``: the trials leased or asked and not yet reported), one
        :func:`refill_step` more than them, so each can take its next trial while a refill runs."""
        return max(self.max_parallel, int(active) + refill_step(self.max_parallel))

    def buffer_need(self, queued: int, n_created: int, active: int = 0) -> int:
        """How many proposals the job's buffer lacks: up to :meth:`buffer_target` queued, never past ``max_trials``."""
        deeper = self.buffer_target(active) - self.max_parallel  # > 0 when more consumers than max_parallel
        return min(self.max_parallel - int(queued) + deeper, self.max_trials - int(n_created))

    def needs_refill(self, queued: int, n_created: int, active: int = 0) -> bool:
        """Whether the buffer is short enough to refill now (at least :func:`refill_step` free slots,
        or whatever is left of the budget): refilled before it runs dry."""
        need = self.buffer_need(queued, n_created, active)
        return need > 0 and need >= min(refill_step(self.max_parallel), self.max_trials - int(n_created))

    def engine_batch(self, need: int) -> int:
        """How many of ``need`` proposals one engine call makes: at most ``max_parallel`` (a joint
        q-batch grows costly with q; the rest comes in the next refill, and an empty buffer is
        answered meanwhile by a cheap proposal)."""
        return max(0, min(int(need), max(1, self.max_parallel)))

    def budget_spent(self, n_created: int) -> bool:
        """Whether every trial of the budget has been created."""
        return int(n_created) >= self.max_trials


__all__ = ["DEFAULT_METRIC", "JobSpec", "refill_step"]
