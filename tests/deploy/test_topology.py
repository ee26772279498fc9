"""The docker-compose topology, run as plain processes: the same commands, the same wiring.

PostgreSQL (a fresh database) <- ``bocompress migrate`` (one shot) <- two ``bocompress serve``
replicas on one database, auth on, tokens from ``bocompress token create`` <- three
``bocompress worker`` processes spread over the two replicas. A small compression job
(digits-cnn, SVD, 8 trials, 3 in parallel) created through replica A must complete, every trial
exactly once, on at least two workers, and both replicas' ``/metrics`` must tell the story:
trials by state, lease latency, proposal time, workers, queue depth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bocompress.procs import ProcessGroup, free_port, wait_healthy
from tests.conftest import drop_pg_database, make_pg_database

from .helpers import DOCKER_DIR, ROOT

pytestmark = pytest.mark.slow

N_TRIALS = 8
MAX_PARALLEL = 3
JOB_TIMEOUT_S = 240.0


def _bocompress(*args: str) -> list[str]:
    """The argv of a ``bocompress`` command, run by this interpreter (in the repository root)."""
    return [sys.executable, "-m", "bocompress.cli", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOCOMPRESS_")}
    # Five processes on a small machine: one math thread each.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run(_bocompress(*args), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, f"bocompress {' '.join(args[:2])} failed ({res.returncode}): {res.stderr}"
    return res.stdout.strip()


def _metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value} from a replica's ``/metrics``."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(r.text):
        out.setdefault(f"__family__{fam.name}", {})[()] = 1.0
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _total(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in m.get(name, {}).items() if want <= set(k))


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[dict[str, Any]]:
    db = make_pg_database("topology")
    procs = ProcessGroup(tmp_path)
    try:
        yield {"db": db, "procs": procs}
    finally:
        procs.stop()
        drop_pg_database(db)


def test_two_replicas_three_workers_complete_a_job(topology: dict[str, Any]) -> None:
    db: str = topology["db"]
    procs: ProcessGroup = topology["procs"]
    base_env = _env(BOCOMPRESS_DATABASE_URL=db)

    # migrate (compose: the one-shot `migrate` service), then tokens (docs/deploy.md quick start).
    assert "database at revision" in _cli(["migrate"], base_env)
    client_token = _cli(["token", "create", "--role", "client", "--owner", "alice"], base_env)
    worker_token = _cli(["token", "create", "--role", "worker", "--owner", "ops", "--name", "gpu-pool"], base_env)
    assert client_token.startswith("bct_") and worker_token.startswith("bct_")

    # Two replicas of the service on one database (auth on: the CLI default).
    urls = {}
    for replica in ("A", "B"):
        port = free_port()
        env = _env(BOCOMPRESS_DATABASE_URL=db, BOCOMPRESS_REPLICA=f"replica-{replica}",
                   BOCOMPRESS_SCHEDULER_INTERVAL="0.2", BOCOMPRESS_AUTO_MIGRATE="false")
        procs.start(f"service-{replica}", _bocompress("serve", "--host", "127.0.0.1", "--port", str(port)), env,
                    cwd=ROOT)
        urls[replica] = f"http://127.0.0.1:{port}"
    for replica, url in urls.items():
        health = wait_healthy(url, 90.0, check=procs.check_alive, interval=0.2)
        assert health == {"status": "ok", "database": "postgresql", "auth": True}
        assert httpx.get(f"{url}/api/v1/jobs", timeout=10).status_code == 401, "auth must be on"
        # The container health check script, for real, against a real replica.
        hc = subprocess.run([sys.executable, str(DOCKER_DIR / "healthcheck.py"), f"{url}/healthz"],
                            capture_output=True, text=True, timeout=30)
        assert hc.returncode == 0 and "ok (database: postgresql" in hc.stdout, hc.stderr

    # Three workers, spread over the replicas; each needs only the URL and the token (env, as in compose).
    plan = {"w1": "A", "w2": "B", "w3": "A"}
    for name, replica in plan.items():
        env = _env(BOCOMPRESS_URL=urls[replica], BOCOMPRESS_TOKEN=worker_token, BOCOMPRESS_WORKER_LOG_LEVEL="info")
        procs.start(f"worker-{name}", _bocompress("worker", "--device", "cpu", "--name", name, "--poll", "0.2"), env,
                    cwd=ROOT)

    spec = {"name": "topology-digits-svd",
            "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": {"kind": "scalarized", "kappa": 1.0, "cost": "params"},
            "budget": {"max_trials": N_TRIALS, "max_parallel": MAX_PARALLEL, "lease_seconds": 60},
            "optimizer": {"n_initial": 4, "seed": 0}}
    auth = {"Authorization": f"Bearer {client_token}"}
    with httpx.Client(base_url=urls["A"], headers=auth, timeout=30) as a, \
            httpx.Client(base_url=urls["B"], headers=auth, timeout=30) as b:
        r = a.post("/api/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        # Follow it through replica B; scrape both replicas' metrics while it runs.
        during: list[dict[str, Any]] = []
        deadline = time.monotonic() + JOB_TIMEOUT_S
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            procs.check_alive()
            job = b.get(f"/api/v1/jobs/{job_id}").json()
            if job["state"] in ("completed", "failed", "cancelled"):
                break
            if job["state"] == "running":
                during.append({k: _metrics(u) for k, u in urls.items()})
            time.sleep(0.5)
        assert job.get("state") == "completed", (
            f"job {job_id} ended as {job.get('state')!r} ({job.get('reason')}) after "
            f"{JOB_TIMEOUT_S:.0f} s: {job.get('counts')}\n{procs.log('worker-w1')[-2000:]}")
        assert job["counts"].get("completed") == N_TRIALS

        trials = a.get(f"/api/v1/jobs/{job_id}/trials").json()["items"]
    assert len(trials) == N_TRIALS and len({t["id"] for t in trials}) == N_TRIALS
    assert all(t["state"] == "completed" for t in trials)
    for t in trials:
        assert {"distill_l2", "ratio", "objective"} <= set(t["values"])
        assert t["values"]["objective"] == pytest.approx(t["values"]["distill_l2"] + t["values"]["ratio"])
    workers = {t["worker"] for t in trials}
    assert len(workers) >= 2, f"trials ran on {workers}: the work was not shared"
    assert workers <= {f"ops/{w}" for w in plan}

    # Exactly once: one `completed` transition per trial in the event log (the database's word).
    import psycopg

    with psycopg.connect(db.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT e.trial_id, count(*) FROM events e JOIN trials t ON t.id = e.trial_id "
            "WHERE e.job_id = %s AND e.to_state = 'completed' AND t.kind = 'evaluate' GROUP BY e.trial_id",
            (job_id,)).fetchall()
    assert sorted(rows) == sorted((t["id"], 1) for t in trials)

    # /metrics after the run, on both replicas.
    after = {k: _metrics(u) for k, u in urls.items()}
    for replica, m in after.items():
        assert _total(m, "bocompress_trials", state="completed") == N_TRIALS, replica
        assert _total(m, "bocompress_queue_depth") == 0, replica
        assert "bocompress_queue_depth" in m and "bocompress_running_leases" in m
        assert _total(m, "bocompress_workers") >= 1, f"replica {replica} saw no worker"
        assert _total(m, "bocompress_lease_latency_seconds_count") > 0, replica
        assert _total(m, "bocompress_lease_latency_seconds_bucket", le="+Inf") == \
            _total(m, "bocompress_lease_latency_seconds_count")
        assert "__family__bocompress_proposal_seconds" in m, f"replica {replica} has no proposal histogram"
        assert _total(m, "bocompress_jobs", state="completed") == 1
    assert sum(_total(m, "bocompress_lease_latency_seconds_count", outcome="leased") for m in after.values()) \
        >= N_TRIALS + 1  # every trial and the profiling task were leased
    # Proposals are made by whichever replica holds the job's generator lock; together, at least
    # ceil(8 / 3) batches (the Sobol start and the GP).
    assert sum(_total(m, "bocompress_proposal_seconds_count") for m in after.values()) >= 3
    engines = {dict(k).get("engine") for m in after.values() for k in m.get("bocompress_proposal_seconds_count", {})}
    assert engines, "no proposal engine label"
    assert during, "the job finished before a scrape during the run"
    busy = [(k, _total(s[k], "bocompress_trials", state="running"), _total(s[k], "bocompress_queue_depth"),
             _total(s[k], "bocompress_running_leases")) for s in during for k in s]
    assert any(r + q > 0 for _, r, q, _ in busy), f"no scrape saw queued or running trials: {busy}"
    # A lease held right now is a running trial (the gauge and the state agree on every scrape).
    assert all(lease <= r + 1 for _, r, _, lease in busy), busy  # + the profiling task

    # Structured logs: the workers write JSON lines carrying job_id and trial_id.
    records = []
    for name in plan:
        for line in procs.log(f"worker-{name}").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
    done = [r for r in records if r.get("trial_id") is not None and r.get("job_id") == job_id]
    assert done, "no worker log line carries job_id and trial_id"
    assert {r["trial_id"] for r in done} >= {t["id"] for t in trials}


def test_compose_worker_command_on_cuda(tmp_path: Path) -> None:
    """The compose worker's exact command (``--device cuda``) completes a job on a real GPU.

    Runs only where CUDA is available (skipped on CPU-only machines). The service runs on SQLite
    here: what is checked is the worker's CUDA path, not the database.
    """
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the compose worker runs `bocompress worker --device cuda`")
    from .helpers import command_argv, load_compose

    argv = command_argv(load_compose({"POSTGRES_PASSWORD": "x"})["services"]["worker"]["command"])
    assert argv[:2] == ["bocompress", "worker"] and "cuda" in argv
    db = f"sqlite:///{tmp_path / 'gpu.db'}"
    env = _env(BOCOMPRESS_DATABASE_URL=db)
    assert "database at revision" in _cli(["migrate"], env)
    client_token = _cli(["token", "create", "--role", "client", "--owner", "alice"], env)
    worker_token = _cli(["token", "create", "--role", "worker", "--owner", "gpu"], env)
    procs = ProcessGroup(tmp_path)
    try:
        port = free_port()
        procs.start("service", _bocompress("serve", "--host", "127.0.0.1", "--port", str(port)),
                    _env(BOCOMPRESS_DATABASE_URL=db, BOCOMPRESS_SCHEDULER_INTERVAL="0.2"), cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 90.0, check=procs.check_alive, interval=0.2)
        procs.start("worker", _bocompress(*argv[1:], "--name", "gpu0", "--poll", "0.2"),
                    _env(BOCOMPRESS_URL=url, BOCOMPRESS_TOKEN=worker_token), cwd=ROOT)
        spec = {"name": "cuda-digits-svd", "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
                "objective": {"kind": "scalarized", "kappa": 1.0}, "budget": {"max_trials": 6, "max_parallel": 2},
                "optimizer": {"n_initial": 3, "seed": 0}}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {client_token}"}, timeout=30) as c:
            r = c.post("/api/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            job: dict[str, Any] = {}
            while time.monotonic() < deadline:
                procs.check_alive()
                job = c.get(f"/api/v1/jobs/{job_id}").json()
                if job["state"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            assert job.get("state") == "completed", f"{job}\n{procs.log('worker')[-3000:]}"
            trials = c.get(f"/api/v1/jobs/{job_id}/trials").json()["items"]
        assert len(trials) == 6 and all(t["state"] == "completed" and t["worker"] == "gpu/gpu0" for t in trials)
        started = [json.loads(ln) for ln in procs.log("worker").splitlines() if ln.startswith("{")]
        assert any(r.get("msg") == "worker started" and "device=cuda" in str(r.get("task")) for r in started)
    finally:
        procs.stop()
