"""The phases of ``bench/load.py``: simulated workers' cycles, dashboard polling, a seeded history.

Each phase drives a running service over :class:`bocompress.procs.RawClient` connections (one per
simulated worker or dashboard) and returns latency summaries in milliseconds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bocompress.procs import RawClient


def seed_history(database_url: str, job_id: int, n: int, seed: int = 0) -> int:
    """Fill a running job up to ``n`` completed trials directly in the database (a long history).

    Uses the storage layer's own guarded insert (``insert_proposals``), then marks the rows
    completed with synthetic values, so the rows look like a finished search. Returns the
    number of trials the job has.
    """
    from sqlalchemy import update

    from bocompress.service.db.models import Job, Trial, utcnow
    from bocompress.service.db.session import make_engine, make_sessionmaker, run_tx
    from bocompress.service.db.trials import TransitionError, insert_proposals

    rng = random.Random(seed)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)

    def fill(s: Any) -> int:
        job = s.get(Job, job_id)
        names = [p["name"] for p in job.search_space]
        k = n - job.n_created
        if k > 0:
            insert_proposals(s, job.id, job.n_created, [{nm: round(rng.uniform(0.05, 1.0), 4) for nm in names}
                                                     for _ in range(k)])
        now = utcnow()
        rows = s.execute(select_trials(job_id)).all()
        for tid, params in rows:
            L = synthetic_l(params)
            s.execute(update(Trial).where(Trial.id == tid).values(
                state="completed", values={"distill_l2": L, "ratio": 0.5, "objective": L + 0.5},
                sem={"distill_l2": 0.01}, worker="seed", started_at=now, finished_at=now, result_hash="seed"))
        return len(rows)

    try:
        for _ in range(20):
            try:
                return run_tx(factory, fill)
            except TransitionError:  # the scheduler proposed meanwhile: read n_created again
                time.sleep(0.2)
        raise RuntimeError("could not seed the history")
    finally:
        engine.dispose()


def select_trials(job_id: int) -> Any:
    from sqlalchemy import select

    from bocompress.service.db.models import Trial

    return select(Trial.id, Trial.params).where(Trial.job_id == job_id, Trial.kind == "evaluate",
                                                Trial.state.in_(("queued", "running")))


def synthetic_l(params: dict[str, float]) -> float:
    """A deterministic stand-in for the distillation error: sum of squared removed fractions."""
    return float(sum((1.0 - v) ** 2 for v in params.values()) / max(1, len(params)))


def median_by(rounds: list[dict[str, Any]], key: Any) -> dict[str, Any]:
    """The round whose ``key`` is the median (the upper one of an even count)."""
    return sorted(rounds, key=key)[len(rounds) // 2]


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``xs`` in milliseconds (xs in seconds)."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, int(round(q / 100.0 * (len(ys) - 1)))))
    return 1000.0 * ys[k]


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99)}


# --------------------------------------------------------------------------- cycles


@dataclass
class CycleStats:
    cycles: int = 0
    empty: int = 0
    errors: Counter = field(default_factory=Counter)
    lat: dict[str, list[float]] = field(default_factory=lambda: {"lease": [], "heartbeat": [], "complete": []})


async def worker_cycles(url: str, token: str, name: str, stop_at: float, stats: CycleStats,
                        stop: asyncio.Event, interval: float | None = None) -> None:
    """One simulated worker: lease -> heartbeat -> complete until ``stop_at`` or ``stop``.

    ``interval``: start a cycle at most every ``interval`` seconds (a paced worker; None: flat out).
    """
    c = RawClient(url, token)
    next_at = time.perf_counter() + random.random() * (interval or 0.0)  # paced workers start spread out
    try:
        while time.perf_counter() < stop_at and not stop.is_set():
            if interval is not None:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                # behind schedule (a slow cycle): start now, no burst to catch up
                next_at = max(next_at + interval, time.perf_counter())
            t0 = time.perf_counter()
            st, _, body = await c.request("POST", "/api/v1/workers/lease", {"worker": name, "kinds": ["evaluate"]})
            stats.lat["lease"].append(time.perf_counter() - t0)
            if st == 204:  # the real worker sleeps ``poll`` (1 s; 0.2 s in the demo): a busy worker's retry
                stats.empty += 1
                await asyncio.sleep(0.2)
                continue
            if st != 200:
                stats.errors[f"lease {st}"] += 1
                await asyncio.sleep(0.05)
                continue
            got = json.loads(body)
            tid, tok = got["trial"]["id"], got["lease"]["token"]
            t0 = time.perf_counter()
            st, _, _ = await c.request("POST", f"/api/v1/trials/{tid}/heartbeat", {"lease_token": tok})
            stats.lat["heartbeat"].append(time.perf_counter() - t0)
            if st != 200:
                stats.errors[f"heartbeat {st}"] += 1
                continue
            L = synthetic_l(got["trial"]["params"])
            t0 = time.perf_counter()
            st, _, _ = await c.request("POST", f"/api/v1/trials/{tid}/complete",
                                       {"values": {"distill_l2": L}, "sem": {"distill_l2": 0.01 * L},
                                        "lease_token": tok})
            stats.lat["complete"].append(time.perf_counter() - t0)
            if st != 200:
                stats.errors[f"complete {st}"] += 1
                continue
            stats.cycles += 1
    finally:
        await c.close()


async def poller(url: str, token: str, job_id: int, stop: asyncio.Event, lat: list[float], period: float,
                 sizes: list[int]) -> None:
    """A dashboard: one full fetch, then ``?since=<X-Job-Seq>`` every ``period`` seconds."""
    c = RawClient(url, token)
    since = 0
    try:
        st, h, _ = await c.request("GET", f"/api/v1/jobs/{job_id}/trials?since=0")
        since = int(h.get("x-job-seq", "0"))
        while not stop.is_set():
            t0 = time.perf_counter()
            st, h, body = await c.request("GET", f"/api/v1/jobs/{job_id}/trials?since={since}")
            lat.append(time.perf_counter() - t0)
            if st == 200:
                sizes.append(len(body))
                since = int(h.get("x-job-seq", since))
            await asyncio.sleep(period)
    finally:
        await c.close()


async def run_cycles(urls: list[str], token: str, job_id: int, workers: int, seconds: float,
                     pollers: int = 2, poll_period: float = 0.2, until_completed: int | None = None,
                     rate: float | None = None) -> dict[str, Any]:
    """Run ``workers`` cycle loops (spread over ``urls``) for ``seconds`` plus dashboard pollers.

    ``rate``: pace the workers to that many cycles per second in all (None: each runs flat out).
    """
    stats = CycleStats()
    interval = None if rate is None else workers / rate
    gc.collect()
    gc.freeze()  # the load generator's own full collections would count as service latency
    stop = asyncio.Event()
    poll_lat: list[float] = []
    sizes: list[int] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    tasks = [asyncio.create_task(worker_cycles(urls[i % len(urls)], token, f"w{i}", stop_at, stats, stop, interval))
             for i in range(workers)]
    polls = [asyncio.create_task(poller(urls[i % len(urls)], token, job_id, stop, poll_lat, poll_period, sizes))
             for i in range(pollers)]
    while time.perf_counter() < stop_at:
        await asyncio.sleep(0.2)
        if until_completed is not None and stats.cycles >= until_completed:
            break
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*polls)
    return {"workers": workers, "rate": rate, "seconds": elapsed, "cycles": stats.cycles,
            "cycles_per_s": stats.cycles / elapsed,
            "empty_leases": stats.empty, "errors": dict(stats.errors),
            **{k: summary(v) for k, v in stats.lat.items()}, "poll_under_load": summary(poll_lat),
            "poll_bytes_p50": statistics.median(sizes) if sizes else 0}


async def run_idle_polling(url: str, token: str, job_id: int, n: int = 1000, full: int = 5) -> dict[str, Any]:
    """Polling latency of a quiet job: ``?since=seq-k`` for small k (a few changed trials), and full fetches."""
    c = RawClient(url, token)
    try:
        st, h, body = await c.request("GET", f"/api/v1/jobs/{job_id}/trials?since=0")
        assert st == 200, body[:200]
        seq = int(h["x-job-seq"])
        n_items = len(json.loads(body)["items"])
        full_lat = []
        for _ in range(full):
            t0 = time.perf_counter()
            st, _, body = await c.request("GET", f"/api/v1/jobs/{job_id}/trials?since=0")
            full_lat.append(time.perf_counter() - t0)
        full_bytes = len(body)
        lat = []
        rng = random.Random(0)
        for _ in range(n):
            since = max(0, seq - rng.randint(0, 20))
            t0 = time.perf_counter()
            st, _, _ = await c.request("GET", f"/api/v1/jobs/{job_id}/trials?since={since}")
            lat.append(time.perf_counter() - t0)
            assert st == 200
    finally:
        await c.close()
    return {"trials": n_items, "poll_idle": summary(lat), "full_fetch": summary(full_lat), "full_bytes": full_bytes}
