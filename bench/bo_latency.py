"""Latency and memory of the BO engine, and lease latency of the service under 16 workers.

Part 1, the engine alone: one GP-stage ``propose`` (GP refit + acquisition optimization, one
point) after ``n`` observations of a synthetic ``d``-layer compression landscape
(``bocompress.service.optimizer.synthetic``), for n in {25, 100, 400, 1000} and d in {4, 16, 64}. Each
configuration runs in a fresh subprocess (one torch thread, as the service runs proposals) and
reports the median of a few calls (the first cold, the others warm-started from the returned
state, as the service does), the peak Python heap (tracemalloc) and the process's peak RSS
(``resource.getrusage``; includes the interpreter and torch, about 0.3 GB before any work).

Part 2, the service: a real ``bocompress serve`` subprocess (SQLite), one compression job with a
synthetic 8-layer profile and the GP engine after 8 Sobol trials, and 16 threads that each loop
lease -> complete (a synthetic L). Reports the p50/p95 of successful lease calls. Ax's
``get_next_trials(1)`` is timed in the same run on the same landscape with 16 trials in flight:
Ax computes a proposal on the request path, the service answers from its proposal buffer.

Writes both tables to docs/benchmarks.md. Run: ``python bench/bo_latency.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Seconds a simulated worker waits after an empty lease (204), as ``bocompress worker --poll``.
IDLE_POLL_S = 0.5
NS = (25, 100, 400, 1000)
DS = (4, 16, 64)


# --------------------------------------------------------------------------- part 1: engine


def engine_case(n: int, d: int, calls: int) -> dict[str, Any]:
    """One configuration (run inside a fresh subprocess): timings and peak memory."""
    import resource
    import tracemalloc

    import torch

    from bocompress.service.optimizer import Problem, propose
    from bocompress.service.optimizer.synthetic import make_landscape, sobol_history

    torch.set_num_threads(1)
    ls = make_landscape(d=d, seed=0)
    obs = sobol_history(ls, n)
    prob = Problem(ls.params, {"kind": "scalarized", "kappa": 1.0, "cost": "params"}, ls.profile, 8, 0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    times = []
    state = None
    for i in range(calls):
        t0 = time.perf_counter()
        pts, state = propose(prob, obs, [], n + i, 1, state)
        times.append(time.perf_counter() - t0)
        assert len(pts) == 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "d": d, "cold_s": times[0], "median_s": statistics.median(times), "times": times,
            "tracemalloc_mb": peak / 2**20, "rss_mb": rss, "rss_before_mb": rss0}


def run_engine(calls: int, ns: tuple[int, ...], ds: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for d in ds:
        for n in ns:
            out = subprocess.run(
                [sys.executable, __file__, "--case", f"{n},{d},{calls}"], cwd=ROOT, capture_output=True, text=True,
                timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if out.returncode != 0:
                raise RuntimeError(f"case n={n} d={d} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"n={n:5d} d={d:3d}: median {row['median_s']:.2f}s (cold {row['cold_s']:.2f}s), "
                  f"tracemalloc {row['tracemalloc_mb']:.0f} MB, RSS {row['rss_mb']:.0f} MB", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def engine_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| d | n | median s / propose | cold s | peak Python heap (MB) | peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['n']} | {r['median_s']:.2f} | {r['cold_s']:.2f} | "
                     f"{r['tracemalloc_mb']:.0f} | {r['rss_mb']:.0f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2: leases


def _synthetic_l(params: dict[str, float]) -> float:
    """A stand-in distillation error: additive over layers, decreasing in each theta."""
    return float(sum((1.0 - v) ** 3 for v in params.values()) / max(1, len(params)))


def run_leases(workers: int, trials: int, d: int) -> dict[str, Any]:
    """16 simulated workers lease+complete on one GP job of a real ``bocompress serve`` (SQLite); lease latencies."""
    from bench.load import SERVICE_ROOT
    from bocompress.procs import RawClient, ServiceProcess, make_running_job
    from bocompress.service.auth import create_token
    from bocompress.service.db.migrate import upgrade

    tmp = tempfile.mkdtemp(prefix="bo_latency_")
    db = f"sqlite:///{tmp}/lat.db"
    upgrade(db)
    token = create_token(db, "client", "bench", "bench-client")
    wtoken = create_token(db, "worker", "bench", "bench-worker")
    srv = ServiceProcess(db, log_path=Path(tmp) / "server.log", pythonpath=SERVICE_ROOT).start()
    try:
        # The schema's default lease (60 s) and attempts (3); 8 Sobol trials, then the GP.
        job_id = make_running_job(srv.url, token, trials, workers, 60.0, d=d, size=64, name="latency",
                                  optimizer={"n_initial": 8, "seed": 0}, worker_token=wtoken, high=0.5)
        lat: list[float] = []
        empty: list[float] = []
        done = [0]
        stop = asyncio.Event()
        deadline = time.time() + 600

        async def worker(i: int) -> None:
            # One keep-alive connection per worker from one asyncio loop: the client side costs
            # little, so the times are the service's (16 client threads would add their own GIL wait).
            c, owner = RawClient(srv.url, wtoken), RawClient(srv.url, token)
            try:
                while not stop.is_set() and time.time() < deadline:
                    t0 = time.perf_counter()
                    st, _, body = await c.request("POST", "/api/v1/workers/lease",
                                                  {"worker": f"w{i}", "kinds": ["evaluate"]})
                    dt = time.perf_counter() - t0
                    if st == 204:
                        empty.append(dt)
                        st, _, jb = await owner.request("GET", f"/api/v1/jobs/{job_id}")
                        if st == 200 and json.loads(jb)["state"] in ("completed", "failed", "cancelled"):
                            stop.set()
                        await asyncio.sleep(IDLE_POLL_S)
                        continue
                    assert st == 200, body[:300]
                    got = json.loads(body)
                    lat.append(dt)
                    await asyncio.sleep(0.05)  # the "evaluation"
                    L = _synthetic_l(got["trial"]["params"])
                    st, _, body = await c.request("POST", f"/api/v1/trials/{got['trial']['id']}/complete",
                                                  {"values": {"distill_l2": L}, "sem": {"distill_l2": 0.01 * L},
                                                   "lease_token": got["lease"]["token"]})
                    assert st == 200, body[:300]
                    done[0] += 1
            finally:
                await c.close()
                await owner.close()

        async def all_workers() -> None:
            await asyncio.gather(*(worker(i) for i in range(workers)))

        t0 = time.perf_counter()
        asyncio.run(all_workers())
        wall = time.perf_counter() - t0
    finally:
        srv.stop()
    q = statistics.quantiles(lat, n=20, method="inclusive")
    qa = statistics.quantiles(lat + empty, n=20, method="inclusive")
    return {"workers": workers, "trials": trials, "d": d, "leases": len(lat), "completed": done[0],
            "empty_leases": len(empty), "p50_s": statistics.median(lat), "p95_s": q[18], "max_s": max(lat),
            "all_p50_s": statistics.median(lat + empty), "all_p95_s": qa[18], "all_max_s": max(lat + empty),
            "wall_s": wall}


def ax_next_trial_times(bounds: dict[str, tuple[float, float]], metric: str, value: Any, pending: int,
                        n_obs: int, calls: int) -> dict[str, Any]:
    """Ax's ``get_next_trials(1)`` timed with ``pending`` trials in flight, after ``n_obs`` completed
    ones: ``value(params)`` is the ``(mean, sem)`` a finished trial reports as ``metric`` (minimized)."""
    from ax.api.client import Client
    from ax.api.configs import RangeParameterConfig
    from ax.exceptions.core import DataRequiredError

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    client = Client(random_seed=0)
    client.configure_experiment(parameters=[
        RangeParameterConfig(name=name, parameter_type="float", bounds=b) for name, b in bounds.items()])
    client.configure_optimization(objective=f"-{metric}")
    in_flight: list[tuple[int, dict]] = []
    completed = 0
    times: list[float] = []

    def finish_oldest() -> None:
        j, q = in_flight.pop(0)
        client.complete_trial(trial_index=j, raw_data={metric: value({k: float(v) for k, v in q.items()})})

    while completed < n_obs + calls:
        t0 = time.perf_counter()
        try:
            ((idx, p),) = client.get_next_trials(max_trials=1).items()
        except DataRequiredError:
            # Ax's Sobol stage is spent and it waits for data: a worker would wait for a result.
            finish_oldest()
            completed += 1
            continue
        dt = time.perf_counter() - t0
        if completed >= n_obs:
            times.append(dt)
        in_flight.append((idx, dict(p)))
        if len(in_flight) >= pending:
            finish_oldest()
            completed += 1
    return {"calls": len(times), "n_obs": n_obs, "p50_s": statistics.median(times), "p95_s": _q(times, 0.95),
            "max_s": max(times), "load1": os.getloadavg()[0]}


def run_ax_latency(workers: int, n_obs: int, d: int, calls: int) -> dict[str, Any]:
    """Ax's ``get_next_trials(1)`` with ``workers`` trials in flight after ``n_obs`` completed ones."""
    def value(params: dict[str, float]) -> tuple[float, float]:
        L = _synthetic_l(params)
        return L, 0.01 * L

    return ax_next_trial_times({f"fc{i}": (0.05, 0.5) for i in range(d)}, "L", value, workers, n_obs, calls)


# --------------------------------------------------------------------------- part 3: askers and workers, many jobs

#: The asker scenario's generic job: 8 parameters, max_parallel 16, 240 trials, 8 Sobol then the GP.
ASK_D, ASK_PARALLEL, ASK_TRIALS = 8, 16, 240
#: Seconds an asker or worker "evaluates" a trial.
EVAL_S = 0.05


def _generic_value(params: dict[str, float]) -> float:
    """An 8-d test function with its optimum off the centre: a shifted Styblinski-Tang, scaled to [0, 1]^d."""
    xs = [10.0 * v - 5.0 + 0.7 for v in params.values()]
    return float(sum(x ** 4 - 16 * x ** 2 + 5 * x for x in xs) / (2 * len(xs)))


class Busy:
    """Two busy processes (``while True: pass``) that load the machine while a scenario runs."""

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> "Busy":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def _q(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p * (len(xs) - 1)))))]


def _make_generic_job(url: str, token: str, name: str, trials: int, seed: int) -> int:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        r = c.post("/api/v1/jobs", json={
            "name": name, "parameters": [{"name": f"x{i}", "type": "float", "low": 0.0, "high": 1.0}
                                         for i in range(ASK_D)],
            "objective": {"metric": "y", "direction": "minimize"},
            "budget": {"max_trials": trials, "max_parallel": ASK_PARALLEL},
            "optimizer": {"n_initial": 8, "seed": seed}})
        r.raise_for_status()
        return int(r.json()["id"])


def _trials_of(url: str, token: str, job_id: int) -> list[dict[str, Any]]:
    import httpx

    out: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        cursor = None
        while True:
            r = c.get(f"/api/v1/jobs/{job_id}/trials", params={"limit": 10_000, **({"cursor": cursor} if cursor else {})})
            r.raise_for_status()
            page = r.json()
            out += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
    return list({t["id"]: t for t in out}.values())  # each trial's last change


def _cancel_unfinished(url: str, token: str, job_ids: list[int]) -> None:
    """Cancel the jobs a scenario left running (its window closed first), so their refills do not
    hold the engine during the next scenario."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        for jid in job_ids:
            c.post(f"/api/v1/jobs/{jid}/cancel").raise_for_status()


def run_consumers(url: str, token: str, wtoken: str, mode: str, consumers: int, jobs: int, trials: int,
                  tag: str) -> dict[str, Any]:
    """``consumers`` askers (``mode="ask"``, generic jobs) or workers (``mode="lease"``, compression jobs)
    spread over ``jobs`` new jobs of ``trials`` trials each, each looping take -> 50 ms -> report until
    every job is done. Time to a trial: each ask or lease call that got one (p50, p95, max)."""
    from bocompress.procs import RawClient, make_running_job

    if mode == "ask":
        ids = [_make_generic_job(url, token, f"ask-{tag}-{j}", trials, j) for j in range(jobs)]
    else:
        ids = [make_running_job(url, token, trials, ASK_PARALLEL, 60.0, d=ASK_D, size=64, name=f"lease-{tag}-{j}",
                                optimizer={"n_initial": 8, "seed": j}, worker_token=wtoken, high=0.5)
               for j in range(jobs)]
    lat: list[float] = []
    per_job: dict[int, list[float]] = {j: [] for j in ids}
    empty = [0]
    calls = [0]
    done: set[int] = set()
    deadline = time.time() + 300

    async def consumer(i: int) -> None:
        job_id = ids[i % len(ids)]
        c, owner = RawClient(url, token if mode == "ask" else wtoken), RawClient(url, token)
        try:
            while time.time() < deadline and len(done) < len(ids):
                if mode == "ask" and job_id in done:
                    return
                t0 = time.perf_counter()
                if mode == "ask":
                    st, _, body = await c.request("POST", f"/api/v1/jobs/{job_id}/ask", {"count": 1})
                    got = json.loads(body)["trials"] if st == 200 else []
                    trial = got[0] if got else None
                else:
                    st, _, body = await c.request("POST", "/api/v1/workers/lease",
                                                  {"worker": f"w{i}", "kinds": ["evaluate"]})
                    trial = json.loads(body)["trial"] if st == 200 else None
                    lease = json.loads(body)["lease"] if st == 200 else None
                dt = time.perf_counter() - t0
                calls[0] += 1
                if trial is None:
                    empty[0] += 1
                    for jid in ids:
                        if jid not in done:
                            st, _, jb = await owner.request("GET", f"/api/v1/jobs/{jid}")
                            if st == 200 and json.loads(jb)["state"] in ("completed", "failed", "cancelled"):
                                done.add(jid)
                    await asyncio.sleep(EVAL_S)
                    continue
                lat.append(dt)
                per_job[int(trial["job_id"])].append(dt)
                await asyncio.sleep(EVAL_S)
                if mode == "ask":
                    st, _, body = await c.request("POST", f"/api/v1/trials/{trial['id']}/tell",
                                                  {"values": {"y": _generic_value(trial["params"])}})
                else:
                    L = _synthetic_l(trial["params"])
                    st, _, body = await c.request("POST", f"/api/v1/trials/{trial['id']}/complete",
                                                  {"values": {"distill_l2": L}, "sem": {"distill_l2": 0.01 * L},
                                                   "lease_token": lease["token"]})
                assert st == 200, body[:300]
        finally:
            await c.close()
            await owner.close()

    async def all_consumers() -> None:
        await asyncio.gather(*(consumer(i) for i in range(consumers)))

    t0 = time.perf_counter()
    asyncio.run(all_consumers())
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    _cancel_unfinished(url, token, [j for j in ids if j not in done])  # no engine work left for the next scenario
    # What made the points, and the longest stretch each job went without an engine batch.
    engine_share, gaps = [], []
    for jid in ids:
        ts = _trials_of(url, token, jid)
        eng = sorted(t["created_at"] for t in ts if t.get("proposal") == "engine")
        engine_share.append(len(eng) / max(1, len(ts)))
        stamps = sorted({datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp() for x in eng})
        gaps.append(max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0))
    return {"mode": mode, "consumers": consumers, "jobs": jobs, "trials": trials * jobs, "answered": len(lat),
            "calls": calls[0], "empty": empty[0], "p50_s": _q(lat, 0.5), "p95_s": _q(lat, 0.95), "max_s": max(lat, default=float("nan")),
            "job_p95_max_s": max((_q(v, 0.95) for v in per_job.values() if v), default=float("nan")),
            "engine_share_min": min(engine_share), "engine_share_max": max(engine_share),
            "engine_gap_max_s": max(gaps), "wall_s": wall, "load1": load}


def run_ax_generic(pending: int, n_obs: int, calls: int) -> dict[str, Any]:
    """Ax's ``get_next_trials(1)`` on the asker scenario's 8-d function, ``pending`` trials in flight."""
    return ax_next_trial_times({f"x{i}": (0.0, 1.0) for i in range(ASK_D)}, "y",
                               lambda params: (_generic_value(params), 0.0), pending, n_obs, calls)


def healthz_cpu_ms(url: str, pid: int, n: int = 2000) -> float:
    """The service's CPU per ``GET /healthz`` (ms), one keep-alive client, after a warm-up: this
    machine's speed for the request path, so tables from different runs can be compared (its
    engine child, idle meanwhile, included)."""
    from bench.load import cpu_seconds
    from bocompress.procs import RawClient

    async def go(k: int) -> None:
        c = RawClient(url, "")
        try:
            for _ in range(k):
                await c.request("GET", "/healthz")
        finally:
            await c.close()

    asyncio.run(go(200))
    before = cpu_seconds(pid)
    asyncio.run(go(n))
    return 1e3 * (cpu_seconds(pid) - before) / n


def run_askers(quick: bool, with_off: bool) -> tuple[str, list[dict[str, Any]]]:
    """Part 3: every scenario on one ``bocompress serve`` (SQLite), idle and loaded; Ax in the same run."""
    from bench.load import SERVICE_ROOT
    from bocompress.procs import ServiceProcess
    from bocompress.service.auth import create_token
    from bocompress.service.db.migrate import upgrade

    rows: list[dict[str, Any]] = []
    ax_rows: list[dict[str, Any]] = []
    healthz: list[float] = []
    tmp = tempfile.mkdtemp(prefix="bo_askers_")
    cells = [(m, c, j) for m in ("ask", "lease") for j in ((1,) if quick else (1, 10)) for c in (16, 64)]
    if not quick:
        cells.append(("ask", 40, 10))  # fairness: 10 jobs, 4 consumers each
    for cheap in (("auto", "off") if with_off else ("auto",)):
        db = f"sqlite:///{tmp}/ask-{cheap}.db"
        upgrade(db)
        token = create_token(db, "client", "bench", "bench-client")
        wtoken = create_token(db, "worker", "bench", "bench-worker")
        srv = ServiceProcess(db, log_path=Path(tmp) / f"server-{cheap}.log", pythonpath=SERVICE_ROOT,
                             env={"BOCOMPRESS_CHEAP_PROPOSALS": cheap}).start()
        try:
            if cheap == "auto":
                assert srv.proc is not None
                healthz.append(healthz_cpu_ms(srv.url, srv.proc.pid))
                print(json.dumps({"healthz_cpu_ms": healthz[-1]}), file=sys.stderr, flush=True)
            for loaded in (False, True):
                todo = cells if cheap == "auto" else [("ask", 16, 1)]
                for k, (mode, consumers, jobs) in enumerate(todo):
                    tag = f"{cheap}-{int(loaded)}-{k}"
                    if loaded:
                        with Busy(2):
                            r = run_consumers(srv.url, token, wtoken, mode, consumers, jobs, ASK_TRIALS, tag)
                    else:
                        r = run_consumers(srv.url, token, wtoken, mode, consumers, jobs, ASK_TRIALS, tag)
                    r.update(loaded=loaded, cheap=cheap)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    rows.append(r)
        finally:
            srv.stop()
    for loaded in (False, True):
        if loaded:
            with Busy(2):
                ax = run_ax_generic(16, 16 if quick else 24, 3 if quick else 8)
        else:
            ax = run_ax_generic(16, 16 if quick else 24, 3 if quick else 8)
        ax["loaded"] = loaded
        print(json.dumps(ax), file=sys.stderr, flush=True)
        ax_rows.append(ax)
    lines = ["| who | cheap proposals | consumers | jobs | machine (load1 at end) | asks/leases answered | p50 (ms) | "
             "p95 (ms) | max (ms) | worst job's p95 (ms) | engine-made share (min-max over jobs) | longest gap "
             "between a job's engine batches (s) | Ax p95 / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ax = next(a for a in ax_rows if a["loaded"] == r["loaded"])
        lines.append(
            f"| {'askers (generic)' if r['mode'] == 'ask' else 'workers (compression)'} | {r['cheap']} | "
            f"{r['consumers']} | {r['jobs']} | {'loaded' if r['loaded'] else 'idle'} ({r['load1']:.1f}) | "
            f"{r['answered']} of {r['trials']} ({r['empty']} empty) | {1e3 * r['p50_s']:.1f} | {1e3 * r['p95_s']:.1f} | "
            f"{1e3 * r['max_s']:.0f} | {1e3 * r['job_p95_max_s']:.1f} | "
            f"{100 * r['engine_share_min']:.0f}-{100 * r['engine_share_max']:.0f}% | {r['engine_gap_max_s']:.1f} | "
            f"{ax['p95_s'] / r['p95_s']:.0f}x |")
    lines += ["", f"| Ax `get_next_trials(1)` (16 pending, {ax_rows[0]['n_obs']}+ observations, same 8-d function) | calls | p50 (ms) | "
              "p95 (ms) | max (ms) |", "|---|---|---|---|---|"]
    for a in ax_rows:
        lines.append(f"| {'loaded' if a['loaded'] else 'idle'} (load1 {a['load1']:.1f}) | {a['calls']} | "
                     f"{1e3 * a['p50_s']:.0f} | {1e3 * a['p95_s']:.0f} | {1e3 * a['max_s']:.0f} |")
    lines += ["", f"This machine, this run: the service spends {healthz[0]:.2f} ms of CPU per `GET /healthz` "
              "(the request path alone, measured before the scenarios); compare runs by it."]
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- part 4: what parallel consumers cost


def run_search(url: str, token: str, task: Any, consumers: int, seed: int, tag: str) -> dict[str, Any]:
    """One search of ``task`` (bench/tasks.py, synthetic) by ``consumers`` askers on a generic job
    (max_parallel = consumers, the task's budget): its best value and what made its points."""
    import httpx

    from bocompress.procs import RawClient

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        r = c.post("/api/v1/jobs", json={
            "name": f"cost-{tag}", "parameters": task.params, "objective": {"metric": "y", "direction": "minimize"},
            "budget": {"max_trials": task.trials, "max_parallel": consumers}, "optimizer": {"n_initial": 8, "seed": seed}})
        r.raise_for_status()
        job_id = int(r.json()["id"])
    values: list[float] = []
    kinds: list[str] = []

    async def consumer() -> None:
        c = RawClient(url, token)
        try:
            while True:
                st, _, body = await c.request("POST", f"/api/v1/jobs/{job_id}/ask", {"count": 1})
                got = json.loads(body)["trials"] if st == 200 else []
                if not got:
                    return  # the budget is all asked for (ask waits for the engine while it can propose)
                t = got[0]
                kinds.append(t.get("proposal") or "?")
                await asyncio.sleep(EVAL_S)
                y = float(task.fn(t["params"]))
                st, _, body = await c.request("POST", f"/api/v1/trials/{t['id']}/tell", {"values": {"y": y}})
                assert st == 200, body[:300]
                values.append(y)
        finally:
            await c.close()

    async def all_consumers() -> None:
        await asyncio.gather(*(consumer() for _ in range(consumers)))

    t0 = time.perf_counter()
    asyncio.run(all_consumers())
    return {"task": task.name, "consumers": consumers, "seed": seed, "best": min(values), "n": len(values),
            "cheap_share": kinds.count("cheap") / max(1, len(kinds)), "wall_s": time.perf_counter() - t0}


def run_parallel_cost(task_names: tuple[str, ...], seeds: int) -> tuple[str, list[dict[str, Any]]]:
    """Final best with 16 parallel askers (cheap proposals auto / quasirandom / off) vs 1 (sequential
    BO, every point the engine's), same trial budget, on the synthetic tasks named."""
    from bench.load import SERVICE_ROOT
    from bench.tasks import make_tasks
    from bocompress.procs import ServiceProcess
    from bocompress.service.auth import create_token
    from bocompress.service.db.migrate import upgrade

    tasks = make_tasks(list(task_names))
    tmp = tempfile.mkdtemp(prefix="bo_cost_")
    configs = [("off", 1), ("off", 16), ("auto", 16), ("quasirandom", 16)]
    rows: list[dict[str, Any]] = []
    for cheap in ("off", "auto", "quasirandom"):
        db = f"sqlite:///{tmp}/cost-{cheap}.db"
        upgrade(db)
        token = create_token(db, "client", "bench", "bench-client")
        srv = ServiceProcess(db, log_path=Path(tmp) / f"server-{cheap}.log", pythonpath=SERVICE_ROOT,
                             env={"BOCOMPRESS_CHEAP_PROPOSALS": cheap, "BOCOMPRESS_ASK_WAIT_SECONDS": "120"}).start()
        try:
            for task in tasks:
                for consumers in [c for s_, c in configs if s_ == cheap]:
                    for seed in range(seeds):
                        r = run_search(srv.url, token, task, consumers, seed, f"{cheap}-{task.name}-{consumers}-{seed}")
                        r["cheap"] = cheap
                        print(json.dumps(r), file=sys.stderr, flush=True)
                        rows.append(r)
        finally:
            srv.stop()
    lines = ["| task (budget) | consumers | cheap proposals | median best (seeds) | cheap share | median wall (s) |",
             "|---|---|---|---|---|---|"]
    for task in tasks:
        for cheap, consumers in configs:
            rs = [r for r in rows if r["task"] == task.name and r["cheap"] == cheap and r["consumers"] == consumers]
            if rs:
                lines.append(f"| {task.title} ({task.trials}) | {consumers} | {cheap} | "
                             f"{statistics.median(r['best'] for r in rs):.4g} "
                             f"({', '.join(format(r['best'], '.3g') for r in rs)}) | "
                             f"{100 * statistics.mean(r['cheap_share'] for r in rs):.0f}% | "
                             f"{statistics.median(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=3, help="propose calls per configuration (first cold)")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--lease-trials", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="a few configurations only (smoke)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-leases", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--skip-askers", action="store_true")
    ap.add_argument("--cost", default="", help="part 4 only on these tasks (comma-separated, bench/tasks.py), "
                                              "e.g. hartmann6,ackley10: final best with 16 parallel askers vs 1")
    ap.add_argument("--cost-seeds", type=int, default=3)
    ap.add_argument("--with-off", action="store_true",
                    help="askers: also 16 askers with cheap proposals off (every ask waits for the engine)")
    args = ap.parse_args()
    if args.case:
        n, d, calls = (int(x) for x in args.case.split(","))
        print(json.dumps(engine_case(n, d, calls)))
        return
    if args.cost:  # part 4 alone
        args.skip_engine = args.skip_leases = args.skip_askers = True
    t_start = time.perf_counter()
    ns, ds = ((25, 100), (4, 16)) if args.quick else (NS, DS)
    parts = []
    if not args.skip_engine:
        rows = run_engine(args.calls, ns, ds)
        tab = engine_table(rows)
        print(tab)
        at = [r for r in rows if r["n"] == 100 and r["d"] == 16]
        big = [r for r in rows if r["n"] == 1000]
        verdict = []
        if at:
            verdict.append(f"n=100, d=16: {at[0]['median_s']:.2f} s median (goal <= 1.0 s)")
        if big:
            verdict.append(f"n=1000: peak RSS at most {max(r['rss_mb'] for r in big):.0f} MB (goal <= 1024 MB)")
        parts.append(
            "### Engine: one GP-stage `propose` (refit + acquisition, 1 point)\n\n"
            f"Synthetic d-layer compression landscape, scalarized objective, median of {args.calls} calls "
            "(the first cold, the rest warm-started from the returned state), one torch thread, each "
            "configuration in a fresh process. Peak RSS includes the interpreter, torch and BoTorch "
            "(~0.3-0.4 GB before any work); the Python heap (tracemalloc) excludes tensor storage.\n\n"
            + tab + "\n\n" + "; ".join(verdict) + ".\n")
    if not args.skip_leases:
        lease = run_leases(args.workers, args.lease_trials, 8)
        print(json.dumps(lease), file=sys.stderr)
        ax = run_ax_latency(args.workers, 24, 8, 6)
        print(json.dumps(ax), file=sys.stderr)
        tab2 = (
            "| what | calls | p50 (s) | p95 (s) | max (s) |\n|---|---|---|---|---|\n"
            f"| bocompress `POST /workers/lease` that got a trial ({args.workers} workers, SQLite, GP engine) | "
            f"{lease['leases']} | {lease['p50_s']:.3f} | {lease['p95_s']:.3f} | {lease['max_s']:.3f} |\n"
            f"| bocompress `POST /workers/lease`, every call (204 answers included) | "
            f"{lease['leases'] + lease['empty_leases']} | {lease['all_p50_s']:.3f} | {lease['all_p95_s']:.3f} | "
            f"{lease['all_max_s']:.3f} |\n"
            f"| Ax `get_next_trials(1)` ({args.workers} in flight, {ax['n_obs']}+ observations) | {ax['calls']} | "
            f"{ax['p50_s']:.3f} | {ax['p95_s']:.3f} | {ax['max_s']:.3f} |"
        )
        print(tab2)
        parts.append(
            f"### Lease latency: {args.workers} concurrent workers\n\n"
            f"A real `bocompress serve` subprocess on SQLite (its proposals computed in its engine child "
            f"process), one compression job (synthetic 8-layer SVD profile, {args.lease_trials} trials, 8 Sobol "
            f"then GP, max_parallel {args.workers}); {args.workers} simulated workers (one asyncio loop in this process) loop "
            f"lease -> 50 ms \"evaluation\" -> complete, waiting {IDLE_POLL_S} s after an empty answer "
            f"({lease['empty_leases']} empty answers (204) while the buffer refilled; "
            f"{lease['completed']} trials completed in {lease['wall_s']:.0f} s). "
            "Ax is timed in the same run on the same 8-d landscape: its proposal is computed on the call.\n\n"
            + tab2 + "\n")
    if args.cost:
        tab4, _ = run_parallel_cost(tuple(args.cost.split(",")), args.cost_seeds)
        print(tab4)
        cost_parts = [
            "### What parallel consumers cost: final best with 16 askers vs 1, same budget\n\n"
            "The same service (SQLite), generic jobs of bench/tasks.py's synthetic tasks, 8 Sobol then the GP, "
            f"the task's trial budget; askers loop ask -> {int(EVAL_S * 1e3)} ms -> tell. 1 asker with cheap "
            "proposals off is sequential BO (max_parallel 1, every point the engine's, each ask waits for its fit); "
            "16 askers (max_parallel 16): 'off' waits for the engine's batches, 'auto' answers an empty buffer at "
            "once by perturbing the incumbent (quasi-random before one), 'quasirandom' by the next Halton point. "
            "Cheap share: the fraction of trials that were cheap proposals. Lower best is better.\n\n" + tab4 + "\n"]
    sections: list[tuple[str, str, list[str]]] = []
    if parts:
        sections.append(("bo-latency", "## BO engine latency and memory; lease latency", parts))
    if args.cost:
        sections.append(("bo-latency-cost", "## The cost of cheap proposals: 16 parallel askers vs 1", cost_parts))
    if not args.skip_askers:
        tab3, _ = run_askers(args.quick, args.with_off)
        asker_parts: list[str] = []
        print(tab3)
        asker_parts.append(
            "### Time to a trial: concurrent askers and workers, one and ten jobs, idle and loaded\n\n"
            f"One real `bocompress serve` subprocess on SQLite (proposals in its engine child process). Askers: "
            f"generic {ASK_D}-d jobs (a shifted Styblinski-Tang on [0, 1]^{ASK_D}; max_parallel {ASK_PARALLEL}, "
            f"{ASK_TRIALS} trials each, 8 Sobol then the GP), each consumer looping ask -> {int(EVAL_S * 1e3)} ms -> "
            f"tell over keep-alive HTTP from one asyncio loop; workers: the same on compression jobs (synthetic "
            f"8-layer SVD profile), lease -> {int(EVAL_S * 1e3)} ms -> complete. Consumers are spread round-robin "
            "over the jobs. 'Loaded': two busy processes (`while True: pass`) started by the bench for the "
            "scenario, on a 2-core machine shared with other work (load1 is the 1-minute load average at the "
            "end of the scenario). Time to a trial: every ask or lease call that got one. 'Cheap proposals "
            "auto': an empty buffer is answered at once by a cheap proposal (service/optimizer/cheap.py, "
            "marked `proposal: \"cheap\"`); 'off': the ask waits for the engine (the behaviour before). "
            "The engine-made share and the longest gap between a job's engine batches show how much of each "
            "job the GP still proposed, and that no job was starved of fits by the others. Ax is timed in the "
            "same run, one call at a time, 16 trials pending, idle and under the same load.\n\n" + tab3 + "\n")
        sections.append(("bo-latency-askers", "## Time to a trial: askers and workers, many jobs, idle and loaded",
                         asker_parts))
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s", file=sys.stderr)
    if args.no_docs or not sections:
        return
    from bench._docs import write_section

    for key, title, body_parts in sections:
        body = "\n".join(body_parts) + (f"\nWhole run: {total / 60:.1f} min on the 2-core development machine "
                                        f"(load average at the end: {os.getloadavg()[0]:.1f}).\n")
        write_section("bo-latency", title, body, key=key)


if __name__ == "__main__":
    main()
