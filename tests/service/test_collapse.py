"""No silent collapse: a destroyed best trial is flagged in the job JSON; an unreachable budget
fails the job when profiling ends, naming the smallest R; one-shot allocator jobs run end to end."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import bocompress

from bocompress import costs
from tests.conftest import LiveServer
from tests.service.helpers import lease, synthetic_profile


def _job(c: httpx.Client, objective: dict[str, Any], engine: str, max_trials: int = 4) -> dict[str, Any]:
    spec = {"name": "collapse", "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": objective, "budget": {"max_trials": max_trials, "max_parallel": 2},
            "optimizer": {"n_initial": 4, "seed": 0, "engine": engine}}
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


def _profile(c: httpx.Client, job_id: int, prof: dict[str, Any]) -> dict[str, Any]:
    got = lease(c, kinds=["profile"])
    assert got is not None and got["job"]["id"] == job_id
    r = c.post(f"/api/v1/trials/{got['trial']['id']}/complete",
               json={"profile": prof, "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    return c.get(f"/api/v1/jobs/{job_id}").json()


def _evaluate(c: httpx.Client, values: dict[str, float]) -> dict[str, Any]:
    got = None
    deadline = time.time() + 30
    while got is None and time.time() < deadline:
        got = lease(c, kinds=["evaluate"])
        if got is None:
            time.sleep(0.05)
    assert got is not None, "the scheduler proposed nothing"
    r = c.post(f"/api/v1/trials/{got['trial']['id']}/complete",
               json={"values": values, "sem": {"distill_l2": 0.001}, "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_state(c: httpx.Client, job_id: int, state: str) -> dict[str, Any]:
    deadline = time.time() + 30
    while time.time() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] == state:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job['state']}, not {state}: {job.get('reason')}")


def test_a_collapsed_best_trial_is_flagged_in_the_job(server: LiveServer, admin: httpx.Client,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    prof = {**synthetic_profile(4, 64), "model_info": {"chance_accuracy": 0.1, "n_outputs": 10}}
    job = _job(admin, {"kind": "constrained", "budget": 0.5}, "uniform")
    _profile(admin, job["id"], prof)
    t = _evaluate(admin, {"distill_l2": 0.97, "accuracy": 0.11})
    assert t["values"]["ratio"] <= 0.5  # the uniform allocation fits the budget, exactly
    done = _wait_state(admin, job["id"], "completed")
    assert "one-shot allocator 'uniform'" in (done["reason"] or "")
    assert done["collapsed"] is True
    text = " ".join(done["warnings"])
    assert "distill_l2 = 0.97" in text and "chance" in text and "budget" in text
    listed = admin.get("/api/v1/jobs").json()["items"]
    assert next(j for j in listed if j["id"] == job["id"])["collapsed"] is True
    # The client warns and prints it; the CLI shows it.
    with bocompress.Client(server.url, token=server.admin_token) as client:
        handle = client.get_job(job["id"])
        with pytest.warns(bocompress.CollapseWarning, match="collapsed"):
            handle.best()
        assert handle.collapsed and handle.warnings == done["warnings"]
        handle.wait(progress=True, poll=0.05, timeout=10)
    assert "WARNING: collapsed" in capsys.readouterr().err
    from typer.testing import CliRunner

    from bocompress.cli import app

    res = CliRunner().invoke(app, ["status", str(job["id"]), "--url", server.url, "--token", server.admin_token])
    assert res.exit_code == 0 and "WARNING: collapsed" in res.output, res.output
    res = CliRunner().invoke(app, ["status", "--url", server.url, "--token", server.admin_token])
    assert "COLLAPSED" in res.output

    healthy = _job(admin, {"kind": "scalarized", "kappa": 1.0}, "auto", max_trials=1)
    _profile(admin, healthy["id"], prof)
    _evaluate(admin, {"distill_l2": 0.05, "accuracy": 0.93})
    ok = _wait_state(admin, healthy["id"], "completed")
    assert ok["collapsed"] is False and ok["warnings"] == []


def test_an_unreachable_budget_fails_when_profiling_ends(server: LiveServer, admin: httpx.Client) -> None:
    prof = synthetic_profile(3, 64)
    smallest = {p["name"]: 4 / 64 for p in prof["params"]}  # theta_min 0.05 of 64: at least 4 kept
    r_min = costs.ratio(prof, smallest, "params")
    job = _job(admin, {"kind": "constrained", "budget": round(r_min / 2, 4)}, "auto")
    out = _profile(admin, job["id"], prof)
    assert out["state"] == "failed"
    assert f"{r_min:.4f}" in out["reason"] and "unreachable" in out["reason"]
    assert out["counts"].get("queued", 0) == 0
    # A budget just above the smallest R is fine.
    ok = _job(admin, {"kind": "constrained", "budget": round(r_min + 0.001, 4)}, "auto")
    assert _profile(admin, ok["id"], prof)["state"] == "running"


def test_a_generic_job_cannot_use_a_one_shot_allocator(admin: httpx.Client) -> None:
    r = admin.post("/api/v1/jobs", json={
        "name": "g", "parameters": [{"name": "x", "low": 0.0, "high": 1.0}], "objective": {"metric": "y"},
        "optimizer": {"engine": "knapsack"}})
    assert r.status_code == 422 and "optimizer.engine" in r.json()["detail"]
    r = admin.post("/api/v1/jobs", json={
        "name": "g", "parameters": [{"name": "x", "low": 0.0, "high": 1.0}], "objective": {"metric": "y"},
        "optimizer": {"engine": "annealing"}})
    assert r.status_code == 422 and "optimizer.engine" in r.json()["detail"]
