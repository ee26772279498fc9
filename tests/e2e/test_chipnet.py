"""A ChipNet job end to end: real HTTP, a real database, a real worker subprocess.

The zoo's trained ``resnet20`` is pruned by ChipNet to a params budget of 0.5 in one long worker
task; its hard-pruned result is the job's one trial (in the trials, the Pareto set and ``best``),
priced exactly by the ``channel_l1`` layer table, and its export is that very model. Cancelling
the job during the task stops the worker at its next heartbeat and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bocompress
from bocompress import costs
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import log_tail, wait_for, wait_job, worker_process

#: One soft-pruning epoch on 384 - 76 training samples, with the gates' faster learning rate
#: (docs/strategies.md): a CPU-cheap run; the projection step meets the budget.
QUICK = {"epochs": 1, "gate_lr": 0.05, "bn_batches": 4}


@pytest.fixture
def chip_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(f"sqlite:///{tmp_path / 'chipnet.db'}", scheduler_interval=0.1)
    yield srv
    srv.stop()


def _spec(name: str, chipnet: dict, budget: float = 0.5, cost: str = "params", lease: float = 60.0) -> dict:
    return {"name": name,
            "compression": {"model": "resnet20", "data": "digits32-train", "method": "channel_l1",
                            "n_calibration": 384, "sensitivity": False},
            "objective": {"kind": "constrained", "budget": budget, "cost": cost},
            "budget": {"lease_seconds": lease},
            "optimizer": {"engine": "chipnet", "chipnet": chipnet}}


def test_chipnet_job_meets_its_budget_and_exports_the_pruned_model(server: LiveServer, tmp_path: Path) -> None:
    """On both backends (the ``server`` fixture: SQLite and PostgreSQL)."""
    torch.set_num_threads(2)
    chip_server = server
    client = bocompress.Client(chip_server.url, token=chip_server.token("client", "alice"))
    log = tmp_path / "w.log"
    with worker_process(chip_server.url, chip_server.token("worker", "ops"), log):
        job = client.create_job(_spec("chipnet-half", QUICK))
        assert job.spec["budget"]["max_trials"] == 1 and job.spec["optimizer"]["chipnet"]["epochs"] == 1
        done = wait_job(client, job.id, timeout=600, log_path=log)
        assert done["state"] == "completed", (done, log_tail(log))
        assert done["progress"]["state"] == "completed" and done["progress"]["fraction"] == 1.0, done["progress"]
        items = client._json("GET", f"/jobs/{job.id}/trials")["items"]
        assert len(items) == 1 and items[0]["state"] == "completed", items
        trial = items[0]
        v = trial["values"]
        # the same values as a BO trial's: L, R exact from the layer table, held-out accuracy, J
        assert {"distill_l2", "ratio", "ratio_exact", "accuracy", "accuracy_original", "objective"} <= set(v)
        assert abs(v["ratio"] - 0.5) <= 0.02 and v["ratio"] <= 0.5 + 1e-9, v
        assert v["ratio"] == pytest.approx(costs.ratio(done, trial["params"], "params"), abs=1e-12)
        assert v["ratio_exact"] == pytest.approx(v["ratio"], abs=1e-9)
        assert v["accuracy"] > 0.5, v  # one CPU epoch: far above chance (0.1) on the held-out digits
        pareto = client._json("GET", f"/jobs/{job.id}/pareto")["items"]
        assert [t["id"] for t in pareto] == [trial["id"]]
        assert done["best"]["id"] == trial["id"]

        export = client._json("POST", f"/jobs/{job.id}/trials/{trial['id']}/export", json={})
        assert export["state"] == "completed" and export["artifact"]["blob_id"].startswith("art_"), export
        bad = client._http.post(f"/api/v1/jobs/{job.id}/trials/{trial['id']}/export", json={"finetune_steps": 5})
        assert bad.status_code == 422 and "finetune_steps" in bad.json()["detail"], bad.text
        path = client.get_job(job.id).download(trial["id"], tmp_path / "chip.safetensors", progress=False,
                                               poll=0.2, timeout=60)
    model = bocompress.load_compressed(path).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == round(v["ratio"] * done["totals"]["params"]) == int(v["params"]), (n_params, v)
    # the export is the measured model: its held-out L and accuracy are the trial's
    from bocompress.worker.evaluate import fidelity
    from bocompress.worker.runtime import build_context

    ctx = build_context(client, {"id": job.id, "spec": done["spec"]}, "cpu", [])
    hold = ctx.holdout
    l2, _, acc = fidelity(model, hold.inputs, hold.teacher, hold.labels)
    assert acc == pytest.approx(v["accuracy"], abs=1e-9) and l2 == pytest.approx(v["distill_l2_holdout"], rel=1e-5)


def test_cancel_during_chipnet_stops_the_worker_and_keeps_nothing(chip_server: LiveServer, tmp_path: Path) -> None:
    client = bocompress.Client(chip_server.url, token=chip_server.token("client", "alice"))
    log = tmp_path / "w.log"
    with worker_process(chip_server.url, chip_server.token("worker", "ops"), log):
        job = client.create_job(_spec("chipnet-cancel", {"epochs": 200}, lease=1.5))
        running = wait_for(lambda: (lambda j: j if (j.get("progress") or {}).get("fraction", 0) > 0 else None)(
            client._json("GET", f"/jobs/{job.id}")), timeout=300, what="ChipNet progress")
        assert running["progress"]["state"] == "running" and "soft pruning" in running["progress"]["message"]
        client._json("POST", f"/jobs/{job.id}/cancel")
        wait_for(lambda: "ChipNet stopped" in log.read_text(errors="replace"), timeout=60,
                 what="the worker to stop ChipNet")
        done = client._json("GET", f"/jobs/{job.id}")
    assert done["state"] == "cancelled" and done["progress"]["state"] == "cancelled", done
    assert client._json("GET", f"/jobs/{job.id}/trials")["items"] == []
    assert done["best"] is None
    from sqlalchemy import select

    from bocompress.service.db.models import Blob, Trial
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session

    engine = make_engine(chip_server.database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            tasks = s.execute(select(Trial).where(Trial.job_id == job.id, Trial.kind == "chipnet")).scalars().all()
            assert [t.state for t in tasks] == ["cancelled"]
            assert not (tasks[0].extra or {}).get("artifact")
            assert s.execute(select(Blob.id).where(Blob.kind == "artifact")).all() == []
    finally:
        engine.dispose()


def test_a_failed_chipnet_task_fails_the_job_with_its_reason(chip_server: LiveServer, tmp_path: Path) -> None:
    """An import-path model (no static BatchNorm fact to check) without BatchNorm: the worker's
    ChipNet refuses it, the task fails for good, and the job fails naming why."""
    client = bocompress.Client(chip_server.url, token=chip_server.token("client", "alice"))
    log = tmp_path / "w.log"
    with worker_process(chip_server.url, chip_server.token("worker", "ops"), log, "--allow-import", "tests.e2e"):
        spec = _spec("chipnet-no-bn", QUICK)
        spec["compression"].update(model="tests.e2e.helpers:slow_digits_cnn", data="digits-train", n_calibration=64)
        job = client.create_job(spec)
        done = wait_job(client, job.id, timeout=300, log_path=log)
    assert done["state"] == "failed", (done, log_tail(log))
    assert done["reason"].startswith("ChipNet failed:") and "BatchNorm" in done["reason"], done["reason"]
    assert done["progress"]["state"] == "failed" and "BatchNorm" in done["progress"]["message"], done["progress"]
    assert client._json("GET", f"/jobs/{job.id}/trials")["items"] == []
