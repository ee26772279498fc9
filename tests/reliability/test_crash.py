"""Worker crashes: ``kill -9`` stand-in workers mid-trial 20 times during a job on PostgreSQL.

The workers are ``standin_worker.py`` subprocesses (the worker's HTTP protocol with a synthetic L,
no model code), so this tests the service's guarantees: leases expire and trials are handed
out again, nothing is stored twice, no acknowledged result is lost, and the job finishes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.conftest import drop_pg_database, make_pg_database, start_server
from tests.reliability.procs import check_exactly_once, mint, read_results, spawn_standin, trial_history, wait_job
from tests.service.helpers import compression_job, profile_job

KILLS = 20
MAX_TRIALS, MAX_ATTEMPTS, LEASE_S = 30, 3, 2


def test_kill9_workers_mid_trial_20_times_postgresql(tmp_path: Path) -> None:
    db = make_pg_database("crash")
    srv = start_server(db, scheduler_interval=0.1)
    workers = []
    try:
        wtok = srv.token("worker", "pool")
        with srv.client(srv.admin_token) as admin:
            job = compression_job(admin, max_trials=MAX_TRIALS, max_parallel=4, lease_seconds=LEASE_S,
                                  max_attempts=MAX_ATTEMPTS)
            profile_job(admin, job["id"])
            log = tmp_path / "results.jsonl"
            workers = [spawn_standin(srv.url, wtok, f"w{i}", tmp_path, hold=0.6, log=log) for i in range(4)]
            rng = random.Random(0)
            kills, spawned = 0, len(workers)
            deadline = time.time() + 120
            while kills < KILLS and time.time() < deadline:
                busy = [w for w in workers if w.state().startswith("busy")]
                if not busy:
                    time.sleep(0.05)
                    continue
                time.sleep(rng.uniform(0.05, 0.3))  # somewhere inside its 0.6 s of "computing"
                victim = rng.choice(busy)
                if not victim.state().startswith("busy"):
                    continue
                victim.kill9()
                kills += 1
                workers.remove(victim)
                workers.append(spawn_standin(srv.url, wtok, f"w{spawned}", tmp_path, hold=0.6, log=log))
                spawned += 1
            assert kills == KILLS, f"only {kills} kills landed mid-trial"
            final = wait_job(admin, job["id"], lambda j: j["state"] != "running", 120, "the job to finish")
            assert final["state"] == "completed", final
        trials, events = trial_history(db, job["id"])
        counts = check_exactly_once(trials, events, read_results(log), MAX_TRIALS, MAX_ATTEMPTS)
        assert counts.get("completed", 0) + counts.get("abandoned", 0) == MAX_TRIALS
        lost = sum(1 for e in events if e["kind"] in ("lease_expired", "abandoned"))
        assert lost >= KILLS // 2, f"only {lost} leases were lost: the kills missed the trials"
        print(f"{kills} kills; trial states {counts}; leases lost {lost}")
    finally:
        for w in workers:
            w.stop()
        srv.stop()
        drop_pg_database(db)
