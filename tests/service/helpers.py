"""Small helpers for service tests: a worker's side of the protocol over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx


def synthetic_profile(d: int = 3, size: int = 16) -> dict[str, Any]:
    """A layer table as a worker would report it for d Linear layers compressed by SVD."""
    layers, params = [], []
    for i in range(d):
        name = f"fc{i}"
        n = m = size
        dense = float(n * m + n)
        layers.append({
            "name": name, "type": "Linear", "method": "svd", "shape": [n, m], "params": [name],
            "costs": {"params": {"terms": [{"coef": float(n + m), "factors": [{"param": name, "size": size}]},
                                           {"coef": float(n), "factors": []}], "cap": dense}},
            "dense": {"params": dense},
        })
        params.append({"name": name, "low": 0.05, "high": 0.5, "size": size})
    return {"layers": layers, "params": params, "totals": {"params": float(d * (size * size + size) + 100)}}


def compression_job(c: httpx.Client, **budget: Any) -> dict[str, Any]:
    spec = {"name": "cj", "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": 20, "max_parallel": 4, **budget},
            "optimizer": {"n_initial": 10000, "seed": 0, "engine": "sobol"}}
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


def lease(c: httpx.Client, worker: str = "w", kinds: list[str] | None = None) -> dict[str, Any] | None:
    body: dict[str, Any] = {"worker": worker}
    if kinds:
        body["kinds"] = kinds
    r = c.post("/api/v1/workers/lease", json=body)
    if r.status_code == 204:
        return None
    assert r.status_code == 200, r.text
    return r.json()


def profile_job(c: httpx.Client, job_id: int, d: int = 3, size: int = 64) -> dict[str, Any]:
    """Lease the profiling task and report a synthetic layer table; the job becomes running."""
    got = lease(c, kinds=["profile"])
    assert got is not None and got["task"] == "profile" and got["job"]["id"] == job_id
    r = c.post(f"/api/v1/trials/{got['trial']['id']}/complete",
               json={"profile": synthetic_profile(d, size), "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    job = c.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "running"
    return job
