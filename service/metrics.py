"""Prometheus metrics, one registry per app (so tests can build several apps in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bocompress.states import JobState, TrialState
from bocompress.service.db.models import Job, Trial, utcnow
from bocompress.service.db.session import read_session


class _DBCollector:
    """Gauges read from the database at scrape time: the database is the one source of truth."""

    def __init__(self, factory: sessionmaker[Session], seen_workers: dict[str, float]) -> None:
        self.factory = factory
        self.seen = seen_workers

    def collect(self) -> Any:
        trials = GaugeMetricFamily("bocompress_trials", "Trials by state", labels=["state"])
        jobs = GaugeMetricFamily("bocompress_jobs", "Jobs by state", labels=["state"])
        depth = GaugeMetricFamily("bocompress_queue_depth", "Queued trials waiting for a worker")
        running_leases = GaugeMetricFamily("bocompress_running_leases", "Trials leased right now")
        workers = GaugeMetricFamily("bocompress_workers", "Workers seen in the last 60 s by this replica")
        try:
            with read_session(self.factory) as s:
                by_state = dict(s.execute(select(Trial.state, func.count()).where(Trial.kind == "evaluate")
                                          .group_by(Trial.state)).all())
                job_states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                queued_all = s.execute(select(func.count()).select_from(Trial)
                                       .where(Trial.state == TrialState.QUEUED)).scalar_one()
                running_all = s.execute(select(func.count()).select_from(Trial)
                                        .where(Trial.state == TrialState.RUNNING, Trial.lease_expires_at > utcnow())
                                        ).scalar_one()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is away
            return
        for st in TrialState:
            trials.add_metric([st.value], float(by_state.get(st.value, 0)))
        for st in JobState:
            jobs.add_metric([st.value], float(job_states.get(st.value, 0)))
        depth.add_metric([], float(queued_all))
        running_leases.add_metric([], float(running_all))
        now = time.monotonic()
        workers.add_metric([], float(sum(1 for t in self.seen.values() if now - t < 60)))
        yield from (trials, jobs, depth, running_leases, workers)


class Metrics:
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.seen_workers: dict[str, float] = {}
        self.requests = Counter("bocompress_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.lease_latency = Histogram(
            "bocompress_lease_latency_seconds", "Time to answer a lease request", ["outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=self.registry)
        self.proposal_time = Histogram(
            "bocompress_proposal_seconds", "Time to compute a batch of proposals (fit + acquisition)",
            ["engine"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.finished = Counter("bocompress_trial_results", "Results and failures reported", ["state"],
                                registry=self.registry)
        self.registry.register(_DBCollector(factory, self.seen_workers))

    def observe_lease(self, seconds: float, worker: str, got: bool) -> None:
        self.lease_latency.labels("leased" if got else "empty").observe(seconds)
        self.seen_workers[worker] = time.monotonic()
        if len(self.seen_workers) > 10_000:
            self.seen_workers.clear()

    def trial_finished(self, state: str) -> None:
        self.finished.labels(state).inc()

    def observe_proposal(self, seconds: float, engine: str) -> None:
        self.proposal_time.labels(engine).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
