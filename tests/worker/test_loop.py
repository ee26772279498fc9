"""The worker loop against a real in-process service: leases, heartbeats, stops, failures, reconnects."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bocompress.client import Client
from tests.conftest import LiveServer, free_port, start_server
from tests.e2e.helpers import (
    SLOW_MODEL,
    SLOW_SECONDS_ENV,
    digits_cnn_spec,
    log_tail,
    trials,
    wait_for,
    wait_job,
    worker_process,
)
from bocompress.worker.logs import JsonFormatter
from bocompress.worker.loop import Backoff, Worker, run_worker
from bocompress.worker.methods.base import CostMismatch
from bocompress.worker.runtime import JobCache, import_allowed


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[LiveServer]:
    server = start_server(f"sqlite:///{tmp_path / 'loop.db'}", scheduler_interval=0.1)
    yield server
    server.stop()


@pytest.fixture
def alice(srv: LiveServer) -> Iterator[Client]:
    with Client(srv.url, srv.token("client", "alice"), timeout=60) as c:
        yield c


class _Running:
    """run_worker in a thread, with its stop event and return value."""

    def __init__(self, url: str, token: str | None, **kw: Any) -> None:
        self.stop = threading.Event()
        self.result: list[int] = []
        self.error: list[BaseException] = []

        def target() -> None:
            try:
                self.result.append(run_worker(url, token, name="t-worker", poll=0.05, stop_event=self.stop, **kw))
            except BaseException as exc:  # noqa: BLE001 - surfaced by join()
                self.error.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 30.0) -> int:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_worker did not return after its stop event was set"
        if self.error:
            raise self.error[0]
        return self.result[0]


@pytest.fixture
def blocking_evaluate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Make every trial evaluation block until the returned event is set (released at teardown)."""
    release = threading.Event()
    started = threading.Event()
    original = Worker._evaluate

    def slow(self: Worker, trial: dict[str, Any], job: dict[str, Any]) -> Any:
        started.set()
        release.wait(60)
        return original(self, trial, job)

    monkeypatch.setattr(Worker, "_evaluate", slow)
    release.started = started  # type: ignore[attr-defined]
    yield release
    release.set()


# --------------------------------------------------------------------------- a whole job


def test_run_worker_completes_a_job(srv: LiveServer, alice: Client) -> None:
    job = alice.create_job(digits_cnn_spec("loop", 4))
    w = _Running(srv.url, srv.token("worker", "ops"))
    final = wait_job(alice, job.id, timeout=120)
    assert w.join() == 5  # the profiling task and 4 trials
    assert final["state"] == "completed"
    assert final["search_space"] and len(final["layers"]) == 5
    for t in trials(alice, job.id):
        assert t["state"] == "completed" and t["worker"] == "ops/t-worker"
        assert math.isclose(t["values"]["ratio_measured"], t["values"]["ratio"], rel_tol=1e-9)
        assert {"distill_l2", "accuracy", "params", "eval_seconds"} <= set(t["values"])


def test_max_trials_returns(srv: LiveServer, alice: Client) -> None:
    alice.create_job(digits_cnn_spec("max", 6))
    done = run_worker(srv.url, srv.token("worker", "ops"), poll=0.05, max_trials=3)
    assert done == 3


# --------------------------------------------------------------------------- lease lost, stop


def test_cancelled_job_abandons_the_running_trial(srv: LiveServer, alice: Client,
                                                  blocking_evaluate: threading.Event) -> None:
    spec = digits_cnn_spec("cancel", 3)
    spec["budget"].update(lease_seconds=1, max_parallel=1)
    job = alice.create_job(spec)
    w = _Running(srv.url, srv.token("worker", "ops"))
    assert blocking_evaluate.started.wait(60)  # type: ignore[attr-defined]
    running = wait_for(lambda: [t for t in trials(alice, job.id) if t["state"] == "running"], what="a running trial")
    job.cancel()
    # The heartbeat (every lease_seconds / 3) gets 409; the worker drops the task without reporting.
    time.sleep(1.5)
    t0 = time.monotonic()
    assert w.join() == 1  # only the profiling task was reported
    assert time.monotonic() - t0 < 5, "the task should have been dropped at the heartbeat, not at the stop"
    t = alice._json("GET", f"/jobs/{job.id}/trials")["items"]
    after = {x["id"]: x for x in t}[running[0]["id"]]
    assert after["state"] == "cancelled" and after["values"] == {} and after["error"] is None


def test_stop_hands_the_trial_back(srv: LiveServer, alice: Client, blocking_evaluate: threading.Event) -> None:
    spec = digits_cnn_spec("stop", 2)
    spec["budget"]["max_parallel"] = 1
    job = alice.create_job(spec)
    w = _Running(srv.url, srv.token("worker", "ops"), grace=0.3)
    assert blocking_evaluate.started.wait(60)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    assert w.join() == 1
    assert time.monotonic() - t0 < 10
    queued = [t for t in trials(alice, job.id) if t["state"] == "queued" and t["attempt"] == 2]
    assert len(queued) == 1 and "stopped before the task finished" in queued[0]["error"]


def test_stop_within_grace_finishes_the_trial(srv: LiveServer, alice: Client,
                                              blocking_evaluate: threading.Event) -> None:
    spec = digits_cnn_spec("grace", 1)
    job = alice.create_job(spec)
    w = _Running(srv.url, srv.token("worker", "ops"), grace=30)
    assert blocking_evaluate.started.wait(60)  # type: ignore[attr-defined]
    w.stop.set()
    time.sleep(0.3)
    blocking_evaluate.set()  # the trial ends well within the grace period
    assert w.join() == 2
    assert wait_job(alice, job.id)["state"] == "completed"


def test_sigterm_hands_back_the_trial(srv: LiveServer, alice: Client, tmp_path: Path) -> None:
    """A real worker process gets SIGTERM mid-trial: it hands the trial back and exits 0."""
    spec = digits_cnn_spec("sigterm", 1, model=SLOW_MODEL, layers=["fc1"])
    spec["budget"]["max_attempts"] = 3
    job = alice.create_job(spec)
    log = tmp_path / "worker.log"
    env = {SLOW_SECONDS_ENV: "4"}  # the profile's teacher pass and the trial's evaluation take 4 s each
    with worker_process(srv.url, srv.token("worker", "ops"), log, "--grace", "0.5", "--allow-import", "tests.e2e",
                        env=env) as proc:
        wait_for(lambda: [t for t in trials(alice, job.id) if t["state"] == "running"], timeout=120,
                 what="the trial to be leased")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_tail(log)
    (t,) = trials(alice, job.id)
    assert (t["state"], t["attempt"]) in (("queued", 2), ("completed", 1)), (t, log_tail(log))
    assert t["state"] == "queued", "a 4 s trial cannot finish within a 0.5 s grace"
    assert "stopped" in t["error"]


# --------------------------------------------------------------------------- failures


def test_import_path_not_allowed_fails_the_job(srv: LiveServer, alice: Client) -> None:
    job = alice.create_job(digits_cnn_spec("import", 2, model=SLOW_MODEL))
    w = _Running(srv.url, srv.token("worker", "ops"), allowed_prefixes=[])
    final = wait_job(alice, job.id, timeout=60)
    w.join()
    assert final["state"] == "failed"
    assert "not allowed" in final["reason"] and "BOCOMPRESS_WORKER_ALLOW_IMPORT" in final["reason"]


def test_import_path_allowed_by_prefix(srv: LiveServer, alice: Client) -> None:
    job = alice.create_job(digits_cnn_spec("import-ok", 2, model=SLOW_MODEL))
    w = _Running(srv.url, srv.token("worker", "ops"), allowed_prefixes=["tests.e2e"])
    final = wait_job(alice, job.id, timeout=120)
    w.join()
    assert final["state"] == "completed", final["reason"]


def test_cost_mismatch_fails_without_retry(srv: LiveServer, alice: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def mismatch(self: Worker, trial: dict[str, Any], job: dict[str, Any]) -> Any:
        raise CostMismatch("params", 0.5, 0.4, "test")

    monkeypatch.setattr(Worker, "_evaluate", mismatch)
    job = alice.create_job(digits_cnn_spec("mismatch", 2))
    w = _Running(srv.url, srv.token("worker", "ops"))
    final = wait_job(alice, job.id, timeout=60)
    w.join()
    assert final["counts"]["failed"] == 2
    for t in trials(alice, job.id):
        assert t["state"] == "failed" and t["attempt"] == 1 and "cost mismatch" in t["error"]
        assert "last frames" in t["error"] and "in mismatch" in t["error"]  # where it was raised
    # no trial completed: the job failed, with the common first line as its reason
    assert final["state"] == "failed" and final["reason"].startswith("every trial failed (2 of 2: "), final
    assert "cost mismatch" in final["reason"] and "last frames" not in final["reason"]


def test_unexpected_error_is_retried(srv: LiveServer, alice: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Worker._evaluate
    calls: list[int] = []

    def flaky(self: Worker, trial: dict[str, Any], job: dict[str, Any]) -> Any:
        calls.append(trial["id"])
        if calls.count(trial["id"]) == 1:
            raise RuntimeError("transient failure")
        return original(self, trial, job)

    monkeypatch.setattr(Worker, "_evaluate", flaky)
    job = alice.create_job(digits_cnn_spec("flaky", 1))
    w = _Running(srv.url, srv.token("worker", "ops"))
    final = wait_job(alice, job.id, timeout=60)
    w.join()
    assert final["state"] == "completed"
    (t,) = trials(alice, job.id)
    assert t["state"] == "completed" and t["attempt"] == 2


def test_bad_token_raises(srv: LiveServer) -> None:
    from bocompress.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        run_worker(srv.url, "not-a-token", poll=0.05, max_trials=1)


# --------------------------------------------------------------------------- the service is away


def test_reconnects_when_the_service_comes_up_late(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from bocompress.service.app import create_app
    from bocompress.service.config import Settings
    from bocompress.service.db.migrate import upgrade

    monkeypatch.setattr(Backoff.__init__, "__defaults__", (0.2, 1.0))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    w = _Running(url, None)
    time.sleep(2.0)  # leases fail with connection errors meanwhile: the worker must keep trying
    assert w.thread.is_alive() and not w.error

    db = f"sqlite:///{tmp_path / 'late.db'}"
    upgrade(db)
    app = create_app(Settings(database_url=db, host="127.0.0.1", port=port, auth=False, scheduler_interval=0.1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        with Client(url, None) as c:
            wait_for(lambda: server.started, what="the late server")
            job = c.create_job(digits_cnn_spec("late", 2))
            assert wait_job(c, job.id, timeout=60)["state"] == "completed"
        assert w.join() == 3
    finally:
        server.should_exit = True
        th.join(30)


# --------------------------------------------------------------------------- pieces


def test_import_allowed_matches_packages_not_string_prefixes() -> None:
    assert import_allowed("mypkg.models:f", ["mypkg"])
    assert import_allowed("mypkg:f", ["mypkg"])
    assert not import_allowed("mypkg2.models:f", ["mypkg"])
    assert import_allowed("mypkg2.models:f", ["mypkg2.models:"])
    assert not import_allowed("os.path:join", [])


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(base=0.5, cap=10.0)
    delays = [b.next() for _ in range(12)]
    assert all(0 < d <= 10.0 for d in delays) and max(delays) > 4.0
    b.reset()
    assert b.next() <= 0.5


def test_json_logs_carry_the_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("bocompress.worker.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("task done", extra={"job_id": 3, "trial_id": 7, "seconds": 0.5})
    finally:
        log.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["msg"] == "task done" and record["job_id"] == 3 and record["trial_id"] == 7


def test_job_cache_is_lru() -> None:
    built: list[int] = []

    def build(job: dict[str, Any]) -> Any:
        built.append(job["id"])
        return type("Ctx", (), {"device": __import__("torch").device("cpu")})()

    cache = JobCache(build, max_jobs=2)
    for jid in (1, 2, 1, 3, 1, 2):
        cache.get({"id": jid})
    assert built == [1, 2, 3, 2] and len(cache) == 2 and 1 in cache and 3 not in cache


def test_worker_module_help_runs() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ})
    assert out.returncode == 0 and "--device" in out.stdout
