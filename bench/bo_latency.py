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
    from bench.load import RawClient, ServiceProcess, make_running_job
    from bocompress.service.auth import create_token
    from bocompress.service.db.migrate import upgrade

    tmp = tempfile.mkdtemp(prefix="bo_latency_")
    db = f"sqlite:///{tmp}/lat.db"
    upgrade(db)
    token = create_token(db, "client", "bench", "bench-client")
    wtoken = create_token(db, "worker", "bench", "bench-worker")
    srv = ServiceProcess(db, log_path=Path(tmp) / "server.log").start()
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


def run_ax_latency(workers: int, n_obs: int, d: int, calls: int) -> dict[str, Any]:
    """Ax's ``get_next_trials(1)`` with ``workers`` trials in flight after ``n_obs`` completed ones."""
    from ax.api.client import Client
    from ax.api.configs import RangeParameterConfig
    from ax.exceptions.core import DataRequiredError

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    client = Client(random_seed=0)
    client.configure_experiment(parameters=[
        RangeParameterConfig(name=f"fc{i}", parameter_type="float", bounds=(0.05, 0.5)) for i in range(d)])
    client.configure_optimization(objective="-L")
    in_flight: list[tuple[int, dict]] = []
    completed = 0
    times: list[float] = []
    while completed < n_obs + calls:
        t0 = time.perf_counter()
        try:
            ((idx, p),) = client.get_next_trials(max_trials=1).items()
        except DataRequiredError:
            # Ax's Sobol stage is spent and it waits for data: a worker would wait for a result.
            j, q = in_flight.pop(0)
            client.complete_trial(trial_index=j, raw_data={"L": (_synthetic_l({k: float(v) for k, v in q.items()}), 0.0)})
            completed += 1
            continue
        dt = time.perf_counter() - t0
        if completed >= n_obs:
            times.append(dt)
        in_flight.append((idx, dict(p)))
        if len(in_flight) >= workers:
            j, q = in_flight.pop(0)
            L = _synthetic_l({k: float(v) for k, v in q.items()})
            client.complete_trial(trial_index=j, raw_data={"L": (L, 0.01 * L)})
            completed += 1
    return {"calls": len(times), "n_obs": n_obs, "p50_s": statistics.median(times),
            "p95_s": statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 2 else max(times),
            "max_s": max(times)}


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
    args = ap.parse_args()
    if args.case:
        n, d, calls = (int(x) for x in args.case.split(","))
        print(json.dumps(engine_case(n, d, calls)))
        return
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
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s", file=sys.stderr)
    if args.no_docs or not parts:
        return
    from bench._docs import write_section

    body = "\n".join(parts) + f"\nWhole run: {total / 60:.1f} min on the 2-core development machine.\n"
    write_section("bo-latency", "## BO engine latency and memory; lease latency", body, key="bo-latency")


if __name__ == "__main__":
    main()
