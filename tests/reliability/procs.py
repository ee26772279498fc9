"""Helpers of the reliability tests: service and stand-in worker subprocesses, database facts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.load import ServiceProcess, check_one_stream, descendants, prepare_database  # noqa: F401 - re-exported

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STANDIN = HERE / "standin_worker.py"


@dataclass
class StandinProc:
    """One stand-in worker subprocess (see ``standin_worker.py``)."""

    name: str
    proc: subprocess.Popen[bytes]
    state_file: Path

    def state(self) -> str:
        try:
            return self.state_file.read_text()
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn_standin(url: str, token: str, name: str, workdir: Path, hold: float, log: Path,
                  idle_exit: float = 1e9) -> StandinProc:
    state = workdir / f"{name}.state"
    cmd = [sys.executable, str(STANDIN), "--url", url, "--token", token, "--name", name, "--hold", str(hold),
           "--log", str(log), "--state-file", str(state), "--idle-exit", str(idle_exit)]
    err = open(workdir / f"{name}.err", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=str(ROOT))
    return StandinProc(name, proc, state)


def admin_client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def mint(url: str, admin_token: str, role: str, owner: str) -> str:
    with admin_client(url, admin_token) as c:
        r = c.post("/api/v1/tokens", json={"role": role, "owner": owner})
        r.raise_for_status()
        return str(r.json()["token"])


def wait_job(c: httpx.Client, job_id: int, until: Any, timeout: float, what: str) -> dict[str, Any]:
    """Poll the job until ``until(job)``; retries while the service is down."""
    deadline = time.time() + timeout
    job: dict[str, Any] = {}
    while time.time() < deadline:
        try:
            r = c.get(f"/api/v1/jobs/{job_id}")
            if r.status_code == 200:
                job = r.json()
                if until(job):
                    return job
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: last job state {job.get('state')} {job.get('counts')}")


def read_results(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def trial_history(database_url: str, job_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The job's evaluate trials and events, straight from the database."""
    from sqlalchemy import select

    from bocompress.service.db.models import Event, Trial
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session

    engine = make_engine(database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            trials = [dict(id=t.id, number=t.number, state=t.state, attempt=t.attempt, values=t.values,
                           params=t.params, result_hash=t.result_hash, seq=t.seq)
                      for t in s.execute(select(Trial).where(Trial.job_id == job_id, Trial.kind == "evaluate")
                                         .order_by(Trial.number)).scalars()]
            events = [dict(trial_id=e.trial_id, kind=e.kind, from_state=e.from_state, to_state=e.to_state)
                      for e in s.execute(select(Event).where(Event.job_id == job_id).order_by(Event.id)).scalars()]
    finally:
        engine.dispose()
    return trials, events


def check_exactly_once(trials: list[dict[str, Any]], events: list[dict[str, Any]], results: list[dict[str, Any]],
                       max_trials: int, max_attempts: int) -> dict[str, int]:
    """Assert the guarantees of DESIGN.md "Trials" on one finished job; returns state counts.

    Every trial is completed exactly once (one ``completed`` event) or abandoned after
    ``max_attempts`` lost leases; every result a worker saw acknowledged (200) is the stored
    one; trial numbers are unique and consecutive.
    """
    assert [t["number"] for t in trials] == list(range(max_trials)), "trial numbers not 0..max_trials-1"
    completed_events = Counter(e["trial_id"] for e in events if e["to_state"] == "completed")
    leased = Counter(e["trial_id"] for e in events if e["kind"] == "leased")
    expired = Counter(e["trial_id"] for e in events if e["kind"] == "lease_expired")
    by_id = {t["id"]: t for t in trials}
    for t in trials:
        tid = t["id"]
        assert t["state"] in ("completed", "abandoned"), f"trial {tid} ended {t['state']}"
        if t["state"] == "completed":
            assert completed_events[tid] == 1, f"trial {tid} completed {completed_events[tid]} times"
            assert t["values"].get("distill_l2") is not None and t["result_hash"]
        else:
            assert completed_events[tid] == 0 and t["attempt"] == max_attempts, t
        # every lease of a trial but the last was lost (expired): attempts add up
        assert leased[tid] == t["attempt"] and expired[tid] == leased[tid] - 1, (tid, leased[tid], expired[tid], t)
    for r in results:
        assert r["status"] in (200, 409), r
        if r["status"] == 200:
            t = by_id[r["trial"]]
            assert t["state"] == "completed" and t["values"]["distill_l2"] == r["distill_l2"], (r, t)
    acked = {r["trial"] for r in results if r["status"] == 200}
    done = {t["id"] for t in trials if t["state"] == "completed"}
    assert acked <= done, f"acknowledged results missing: {sorted(acked - done)}"
    return dict(Counter(t["state"] for t in trials))


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); returns those still running."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)
