"""Test data for the dashboard: compression jobs, a worker's side over HTTP, and bulk history."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import httpx

from tests.service.helpers import lease

# A digits-CNN-like layer table: (name, type, weight shape, rank size).
LAYERS = [("features.0", "Conv2d", [32, 1, 3, 3], 9), ("features.3", "Conv2d", [64, 32, 3, 3], 64),
          ("features.6", "Conv2d", [64, 64, 3, 3], 64), ("classifier.0", "Linear", [128, 1024], 128),
          ("classifier.2", "Linear", [64, 128], 64), ("classifier.4", "Linear", [10, 64], 10)]


def profile_report(method: str = "svd") -> dict[str, Any]:
    """A layer table as a worker reports it: rank-r cost r·(m+n) per layer, θ_l its rank fraction."""
    layers, params, total = [], [], 0.0
    for name, typ, shape, size in LAYERS:
        m, n = shape[0], int(math.prod(shape[1:]))
        dense = float(m * n + m)
        total += dense
        layers.append({
            "name": name, "type": typ, "method": method, "shape": shape, "params": [name],
            "costs": {"params": {"terms": [{"coef": float(m + n),
                                            "factors": [{"param": name, "size": size}]},
                                           {"coef": float(m), "factors": []}], "cap": dense}},
            "dense": {"params": dense},
        })
        params.append({"name": name, "low": 0.05, "high": 1.0, "size": size})
    return {"layers": layers, "params": params, "totals": {"params": total + 500.0}}


def create_compression_job(c: httpx.Client, name: str, max_trials: int = 60, max_parallel: int = 4,
                           objective: dict[str, Any] | None = None,
                           worker: httpx.Client | None = None) -> dict[str, Any]:
    """Create a compression job and play the profiling worker: the job comes back ``running``.

    Args:
        c: the job owner's client (admin or client token).
        worker: a client with a worker or admin token for the profiling task (default ``c``).
    """
    spec = {"name": name, "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": objective or {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": max_trials, "max_parallel": max_parallel},
            "optimizer": {"n_initial": 10_000, "seed": 0, "engine": "sobol"}}
    job = create_profiled_job(c, spec, "svd", worker)
    return c.get(f"/api/v1/jobs/{job['id']}").json()


def create_profiled_job(c: httpx.Client, spec: dict[str, Any], method: str = "svd",
                        worker: httpx.Client | None = None) -> dict[str, Any]:
    """POST ``spec`` and play the profiling worker (a ``method`` layer table): the job as created."""
    w = worker or c
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = r.json()
    got = lease(w, worker="profiler", kinds=["profile"])
    assert got is not None and got["job"]["id"] == job["id"], got
    r = w.post(f"/api/v1/trials/{got['trial']['id']}/complete",
               json={"profile": profile_report(method), "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    return job


def synthetic_l(params: dict[str, float], rng: random.Random | None = None) -> float:
    """A distillation error that falls as layers keep more rank (each layer's error adds up)."""
    weights = [0.4, 1.0, 0.8, 1.5, 0.6, 0.3]
    base = sum(w * math.exp(-5.0 * float(params.get(name, 0.5))) for w, (name, *_rest) in zip(weights, LAYERS))
    noise = 1.0 + (rng.gauss(0.0, 0.03) if rng else 0.0)
    return 0.05 * base * noise


def work(c: httpx.Client, job_id: int, n: int, fail_numbers: tuple[int, ...] = (), timeout: float = 30.0,
         worker: str = "gpu0") -> list[dict[str, Any]]:
    """Act as a worker until ``n`` trials of ``job_id`` are reported; returns them as reported.

    Trials leased from other jobs are completed too (a worker serves every job). Trials whose
    number is in ``fail_numbers`` are reported as failures with a traceback-like error text.
    """
    rng = random.Random(job_id)
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(done) < n:
        assert time.monotonic() < deadline, f"only {len(done)} of {n} trials of job {job_id} could be leased"
        got = lease(c, worker=worker, kinds=["evaluate"])
        if got is None:
            time.sleep(0.05)
            continue
        t, tok = got["trial"], got["lease"]["token"]
        if got["job"]["id"] == job_id and t["number"] in fail_numbers:
            r = c.post(f"/api/v1/trials/{t['id']}/fail", json={
                "error": "RuntimeError: CUDA out of memory while factorizing features.3 "
                         f"(trial {t['number']}, tried to allocate 2.00 GiB)", "retry": False, "lease_token": tok})
        else:
            L = synthetic_l(t["params"], rng)
            r = c.post(f"/api/v1/trials/{t['id']}/complete",
                       json={"values": {"distill_l2": L}, "sem": {"distill_l2": 0.04 * L}, "lease_token": tok})
        assert r.status_code == 200, r.text
        if got["job"]["id"] == job_id:
            done.append(r.json())
    return done


def insert_history(database_url: str, job_id: int, n: int, seed: int = 0) -> None:
    """Write ``n`` completed trials straight through the DB layer (fast: one bulk insert and update).

    The proposals go in as the scheduler would add them (``insert_proposals``), then are marked
    completed with the values the service would compute from a worker's L (``compression_values``).
    """
    from sqlalchemy import update

    from bocompress.service.db.models import Job, Trial, utcnow
    from bocompress.service.db.session import make_engine, make_sessionmaker, run_tx
    from bocompress.service.db.trials import TransitionError, compression_values, insert_proposals

    rng = random.Random(seed)
    engine = make_engine(database_url)
    try:
        factory = make_sessionmaker(engine)

        def _write(s: Any) -> None:
            job = s.get(Job, job_id)
            names = [p["name"] for p in job.search_space]
            props = [{k: rng.uniform(0.05, 1.0) for k in names} for _ in range(n)]
            rows = insert_proposals(s, job.id, job.n_created, props)
            now = utcnow()
            updates = []
            for t in rows:
                L = synthetic_l(t.params, rng)
                updates.append({"id": t.id, "state": "completed", "worker": "gpu1", "started_at": now,
                                "finished_at": now, "values": compression_values(job, t.params, {"distill_l2": L}),
                                "sem": {"distill_l2": 0.04 * L}})
            s.execute(update(Trial), updates)

        for _ in range(20):   # the service's scheduler may add proposals at the same moment: retry
            try:
                run_tx(factory, _write)
                return
            except TransitionError:
                time.sleep(0.05)
        raise AssertionError(f"could not add {n} trials to job {job_id}: the scheduler kept racing")
    finally:
        engine.dispose()
