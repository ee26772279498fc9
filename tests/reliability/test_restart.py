"""Service restarts: stop and restart ``bocompress serve`` (a subprocess) mid-job, twice.

Once gracefully (SIGTERM) and once as a crash (SIGKILL), on SQLite and on PostgreSQL, while
stand-in workers keep retrying. The job resumes, the history from before each restart is
intact, proposals continue, and every acknowledged result is stored exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.reliability.procs import (
    ServiceProcess,
    admin_client,
    check_exactly_once,
    descendants,
    mint,
    prepare_database,
    read_results,
    spawn_standin,
    trial_history,
    wait_gone,
    wait_job,
)
from tests.service.helpers import compression_job, profile_job

MAX_TRIALS, MAX_ATTEMPTS = 24, 5


def _completed(job: dict) -> int:
    return int(job["counts"].get("completed", 0))


def test_restart_service_mid_job(database_url: str, tmp_path: Path) -> None:
    tok = prepare_database(database_url)
    srv = ServiceProcess(database_url, log_path=tmp_path / "service.log").start()
    workers = []
    try:
        wtok = mint(srv.url, tok, "worker", "pool")
        with admin_client(srv.url, tok) as admin:
            job = compression_job(admin, max_trials=MAX_TRIALS, max_parallel=3, lease_seconds=3,
                                  max_attempts=MAX_ATTEMPTS)
            jid = job["id"]
            profile_job(admin, jid)
            log = tmp_path / "results.jsonl"
            workers = [spawn_standin(srv.url, wtok, f"w{i}", tmp_path, hold=0.25, log=log) for i in range(3)]
            created_before = []
            for k, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
                before = wait_job(admin, jid, lambda j, k=k: _completed(j) >= 6 * (k + 1), 90,
                                  f"{6 * (k + 1)} completed trials")
                snapshot, _ = trial_history(database_url, jid)
                assert srv.proc is not None
                kids = descendants(srv.proc.pid)  # the engine process and its fork server
                assert kids, "the service runs its engine in a child process"
                srv.stop(sig)
                # nothing of the service outlives it, even killed outright
                assert wait_gone(kids) == [], f"left running after {sig.name}: {kids}"
                created_before.append(before["n_created"] if "n_created" in before else len(snapshot))
                time.sleep(1.0)  # workers hit a closed port meanwhile, and retry
                srv.start()
                after, _ = trial_history(database_url, jid)
                now = {t["id"]: t for t in after}
                for t in snapshot:
                    if t["state"] == "completed":
                        assert now[t["id"]] == t, f"trial {t['id']} changed across the restart"
            final = wait_job(admin, jid, lambda j: j["state"] != "running", 120, "the job to finish")
            assert final["state"] == "completed", final
        trials, events = trial_history(database_url, jid)
        counts = check_exactly_once(trials, events, read_results(log), MAX_TRIALS, MAX_ATTEMPTS)
        assert counts == {"completed": MAX_TRIALS}, counts
        # proposals continued after each restart: trials were created after it
        assert len(trials) > max(created_before), (created_before, len(trials))
        assert sum(1 for e in events if e["kind"] == "proposed") == MAX_TRIALS
    finally:
        for w in workers:
            w.stop()
        srv.stop()
