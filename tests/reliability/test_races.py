"""Races: 64 concurrent leasers on TWO service replicas (``bocompress serve`` subprocesses, the first
with ``--processes 2``) on one
PostgreSQL database: no trial leased twice, and one proposal stream per job (trial numbers
unique and consecutive, no two trials with identical params), though both replicas' schedulers
try to fill the job's buffer.

The suite runs 64 leasers x ``RACE_TOTAL`` leases (default the issue's 10,000, about 40 s on 2 cores;
env ``BOCOMPRESS_RACE_TOTAL``); ``bench/load.py`` runs the same race and reports its rate.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from bocompress.procs import make_running_job, run_race
from tests.conftest import drop_pg_database, make_pg_database, run_coroutine
from tests.reliability.procs import ServiceProcess, check_one_stream, prepare_database

LEASERS = 64
RACE_TOTAL = int(os.environ.get("BOCOMPRESS_RACE_TOTAL", "10000"))


def _server_pids(srv: ServiceProcess) -> list[int]:
    assert srv.proc is not None
    kids = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_64_leasers_two_replicas_no_double_lease(tmp_path: Path) -> None:
    db = make_pg_database("race")
    replicas = []
    try:
        tok = prepare_database(db)
        # The first replica is itself two server processes (``serve --processes 2``): three
        # schedulers and three request paths race on one database.
        replicas = [ServiceProcess(db, log_path=tmp_path / f"replica{i}.log", processes=2 - i).start()
                    for i in range(2)]
        assert len(_server_pids(replicas[0])) == 2, "serve --processes 2 did not start two server processes"
        job_id = make_running_job(replicas[0].url, tok, RACE_TOTAL, 1024, 3600.0)
        out = run_coroutine(run_race([r.url for r in replicas], tok, LEASERS, RACE_TOTAL, timeout=300))
        assert out["errors"] == {}, out["errors"]
        ids = Counter(t for t, _ in out["leases"])
        assert sum(ids.values()) == RACE_TOTAL, f"{sum(ids.values())} of {RACE_TOTAL} leases in time"
        assert [t for t, n in ids.items() if n > 1] == [], "a trial was leased twice"
        facts = check_one_stream(db, job_id)
        assert facts["leased_twice"] == [], facts["leased_twice"][:10]
        assert facts["n_trials"] == facts["n_created"] == RACE_TOTAL, facts
        assert facts["numbers_consecutive"], "trial numbers are not 0..n-1: two proposal streams"
        assert facts["duplicate_params"] == 0, "two trials with identical params"
        assert facts["proposed_events"] == RACE_TOTAL
        assert facts["states"] == {"running": RACE_TOTAL}, facts["states"]
        print(f"{RACE_TOTAL} leases by {LEASERS} leasers over 2 replicas: {out['per_s']:.0f}/s")
    finally:
        for r in replicas:
            r.stop()
        drop_pg_database(db)
