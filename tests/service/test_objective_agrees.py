"""The stored ``objective``, the GP's target and the dashboard's value are one number.

For each compression objective (scalarized, constrained with trials over the budget, pareto), a
real job goes through HTTP: created, profiled, its trials leased and completed by a worker's
calls. Then the stored ``objective`` of every trial (the API), the J the engine trains on and
ranks by (``training_data`` of exactly what the scheduler hands it), the value the dashboard
shows (its snapshot and CSV export) and :func:`bocompress.objective.job_objective` all agree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bocompress.objective import job_objective
from bocompress.service.db.models import Job
from bocompress.service.db.session import read_session
from bocompress.service.optimizer.acquisition import training_data
from bocompress.service.optimizer.problem import compile_problem
from bocompress.service.scheduler import job_problem, observations
from tests.conftest import LiveServer, start_server
from tests.service.helpers import lease, profile_job

OBJECTIVES = {
    "scalarized": {"kind": "scalarized", "kappa": 3.0},
    "constrained": {"kind": "constrained", "budget": 0.5},
    "pareto": {"kind": "pareto", "kappa": 0.5},
}
#: θ for every layer: R ≈ 0.37 (fits 0.5), 0.69 and 1.0 (over it) on the synthetic profile.
THETAS = (0.125, 0.3125, 0.5, 0.1875)


@pytest.fixture
def quiet_server(database_url: str) -> Iterator[LiveServer]:
    srv = start_server(database_url, scheduler=False)  # proposals come from the test
    yield srv
    srv.stop()


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_stored_objective_is_the_gp_target_and_the_dashboard_value(quiet_server: LiveServer, kind: str) -> None:
    c = quiet_server.client(quiet_server.admin_token)
    spec = {"name": f"agree-{kind}", "compression": {"model": "digits-cnn", "data": "digits", "method": "svd"},
            "objective": OBJECTIVES[kind], "budget": {"max_trials": len(THETAS), "max_parallel": len(THETAS)},
            "optimizer": {"engine": "sobol"}}
    r = c.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = profile_job(c, job_id, d=3, size=16)
    names = [p["name"] for p in job["search_space"]]
    store = quiet_server.app.state.ctx.store
    assert store.propose(job_id, 0, [{n: t for n in names} for t in THETAS]) == len(THETAS)
    for i in range(len(THETAS)):
        got = lease(c, kinds=["evaluate"])
        assert got is not None
        r = c.post(f"/api/v1/trials/{got['trial']['id']}/complete",
                   json={"values": {"distill_l2": 0.01 * (i + 1)}, "lease_token": got["lease"]["token"]})
        assert r.status_code == 200, r.text

    trials = sorted(c.get(f"/api/v1/jobs/{job_id}/trials").json()["items"], key=lambda t: t["number"])
    stored = [t["values"]["objective"] for t in trials]
    ratios = [t["values"]["ratio"] for t in trials]
    if kind == "constrained":  # the job has trials on both sides of the budget
        assert [t["values"]["feasible"] for t in trials] == [1.0, 0.0, 0.0, 1.0]
        assert min(stored[1], stored[2]) > 1e6 > max(stored[0], stored[3])

    # the one formula
    o = OBJECTIVES[kind]
    assert stored == [job_objective(kind, t["values"]["distill_l2"], t["values"]["ratio"], o.get("kappa", 1.0),
                                    o.get("budget")) for t in trials]

    # the GP's target: what the engine computes from exactly what the scheduler gives it
    with read_session(quiet_server.app.state.ctx.factory) as s:
        row = s.get(Job, job_id)
        assert row is not None
        problem = job_problem(row)
        obs, pending = observations(s, row)
    assert len(obs) == len(THETAS) and pending == []
    ctx = compile_problem(problem)
    _, _, _, J = training_data(ctx, obs)
    assert [float(x) for x in J] == pytest.approx(stored, rel=1e-12, abs=1e-12)
    assert [float(x) for x in ctx.cost(torch.tensor([[t] * 3 for t in THETAS], dtype=torch.float64),
                                        exact=True)] == pytest.approx(ratios, rel=1e-12)

    # the dashboard's values: its first read (snapshot) and its CSV export
    snap = c.get(f"/jobs/{job_id}/snapshot.json").json()["trials"]
    by_number = dict(zip(snap["number"], snap["values"]))
    assert [by_number[t["number"]]["objective"] for t in trials] == stored
    rows = list(csv.DictReader(io.StringIO(c.get(f"/jobs/{job_id}/trials.csv").text)))
    assert [float(r["objective"]) for r in sorted(rows, key=lambda r: int(r["number"]))] == pytest.approx(
        stored, rel=1e-15)
    best: dict[str, Any] = c.get(f"/api/v1/jobs/{job_id}").json()["best"]
    assert best["values"]["objective"] == min(stored)
