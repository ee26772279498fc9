"""A ChipNet job's bad options are a 422 naming the field, before any work (no job, no task).

Real HTTP through the app on both backends (the ``admin`` fixture), with uploads checked from
their safetensors headers only.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save

from bocompress.service.api.strategies import ZOO_MODELS_WITHOUT_BN, ZOO_UNLABELLED, ZOO_WITH_BATCHNORM
from bocompress.worker.zoo import ARCHS, load_data, load_model


def _chip(chipnet: dict | None = None, objective: dict | None = None, **compression: object) -> dict:
    c = {"model": "resnet20", "data": "digits32-train", "method": "channel_l1", **compression}
    opt: dict = {"engine": "chipnet"}
    if chipnet is not None:
        opt["chipnet"] = chipnet
    return {"name": "chip", "compression": c, "optimizer": opt,
            "objective": objective or {"kind": "constrained", "budget": 0.5, "cost": "flops"}}


BAD = [
    ("budget 1", _chip(objective={"kind": "constrained", "budget": 1.0}), "objective.budget"),
    ("budget 0", _chip(objective={"kind": "constrained", "budget": 0.0}), "objective.budget"),
    ("budget < 0", _chip(objective={"kind": "constrained", "budget": -0.2}), "objective.budget"),
    ("scalarized", _chip(objective={"kind": "scalarized"}), "objective.kind"),
    ("pareto", _chip(objective={"kind": "pareto"}), "objective.kind"),
    ("svd", _chip(method="svd"), "compression.method"),
    ("a method mapping", _chip(method={"Conv2d": "channel_l1"}), "compression.method"),
    ("lasso", _chip(method="channel_lasso"), "compression.method"),
    ("no BatchNorm", _chip(model="digits-cnn", data="digits"), "compression.model"),
    ("transformer", _chip(model="transformer", data="digits-tokens"), "compression.model"),
    ("no labels", _chip(data="synthetic"), "compression.data"),
    ("no held-out part", _chip(holdout_fraction=0.0), "compression.holdout_fraction"),
    ("epochs 0", _chip({"epochs": 0}), "optimizer.chipnet.epochs"),
    ("epochs < 0", _chip({"epochs": -3}), "optimizer.chipnet.epochs"),
    ("epochs not an int", _chip({"epochs": 1.5}), "optimizer.chipnet.epochs"),
    ("gate_lr 0", _chip({"gate_lr": 0}), "optimizer.chipnet.gate_lr"),
    ("unknown option", _chip({"epoch": 3}), "optimizer.chipnet.epoch"),
    ("a generic job", {"name": "g", "parameters": [{"name": "x", "low": 0, "high": 1}],
                       "optimizer": {"engine": "chipnet"}}, "optimizer.engine"),
]


@pytest.mark.parametrize("case,spec,field", BAD, ids=[c[0] for c in BAD])
def test_bad_chipnet_jobs_are_422_naming_the_field(admin: httpx.Client, case: str, spec: dict, field: str) -> None:
    r = admin.post("/api/v1/jobs", json=spec)
    assert r.status_code == 422, (case, r.status_code, r.text)
    body = r.json()
    assert body["code"] == "invalid" and field in body["detail"], (case, body)
    assert admin.get("/api/v1/jobs").json()["items"] == []  # nothing was created


def _upload(admin: httpx.Client, kind: str, tensors: dict, **form: str) -> str:
    r = admin.post(f"/api/v1/{kind}", files={"file": ("f.safetensors", save(tensors))}, data=form)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_uploads_are_judged_by_their_safetensors_header(admin: httpx.Client) -> None:
    state = {k: v.contiguous() for k, v in load_model("resnet20").state_dict().items()}
    bn_model = _upload(admin, "models", state, arch="resnet20")
    plain = _upload(admin, "models", {k: v.contiguous() for k, v in load_model("digits-cnn").state_dict().items()},
                    arch="digits-cnn")
    x, y = load_data("digits32-train", 32)
    labelled = _upload(admin, "datasets", {"inputs": x, "labels": y})
    unlabelled = _upload(admin, "datasets", {"inputs": x})
    r = admin.post("/api/v1/jobs", json=_chip(model=plain, data=labelled))
    assert r.status_code == 422 and "compression.model" in r.json()["detail"] and "BatchNorm" in r.json()["detail"]
    r = admin.post("/api/v1/jobs", json=_chip(model=bn_model, data=unlabelled))
    assert r.status_code == 422 and "compression.data" in r.json()["detail"] and "labels" in r.json()["detail"]
    assert admin.get("/api/v1/jobs").json()["items"] == []
    r = admin.post("/api/v1/jobs", json=_chip(model=bn_model, data=labelled))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "profiling" and job["spec"]["budget"]["max_trials"] == 1
    assert job["spec"]["optimizer"]["chipnet"]["epochs"] == 20  # the paper's defaults, stored
    assert job["progress"]["state"] == "waiting"
    # the same spec with the BO engine is a normal job: ChipNet's checks are ChipNet's only
    spec = _chip(model=plain, data=unlabelled)
    spec["optimizer"] = {"engine": "auto"}
    assert admin.post("/api/v1/jobs", json=spec).status_code == 201


def test_heartbeat_progress_is_checked(admin: httpx.Client) -> None:
    for bad in ({"progress": 1.5}, {"progress": -0.1}, {"progress": "half"}, {"message": "x" * 501}):
        r = admin.post("/api/v1/trials/1/heartbeat", json={"lease_token": "t", **bad})
        assert r.status_code == 422, (bad, r.text)


def test_the_static_batchnorm_facts_match_the_zoo() -> None:
    for name in ARCHS:
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in load_model(name).modules())
        assert (name in ZOO_WITH_BATCHNORM) == has_bn and (name in ZOO_MODELS_WITHOUT_BN) == (not has_bn), name
    for data in ("digits", "digits32-train", "digits-tokens"):
        assert data not in ZOO_UNLABELLED
    assert load_data("synthetic", 4, arch="resnet20")[1] is None


def test_cancel_after_the_upload_keeps_no_artifact(server, admin: httpx.Client) -> None:
    """The worker uploaded the pruned model, then the job was cancelled before its result: the
    upload is deleted and the result refused (nothing half-written is kept)."""
    from sqlalchemy import select

    from bocompress.service.db.models import Blob
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session
    from tests.dashboard.helpers import profile_report
    from tests.service.helpers import lease

    spec = _chip(objective={"kind": "constrained", "budget": 0.5, "cost": "params"})
    job = admin.post("/api/v1/jobs", json=spec).json()
    got = lease(admin, worker="p", kinds=["profile"])
    assert got is not None
    r = admin.post(f"/api/v1/trials/{got['trial']['id']}/complete",
                   json={"profile": profile_report("channel_l1"), "lease_token": got["lease"]["token"]})
    assert r.status_code == 200, r.text
    task = None
    for _ in range(100):
        task = task or lease(admin, worker="w", kinds=["chipnet"])
    assert task is not None and task["job"]["id"] == job["id"], task
    tid, tok = task["trial"]["id"], task["lease"]["token"]
    weights = save({k: v.contiguous() for k, v in load_model("resnet20").state_dict().items()})
    r = admin.post(f"/api/v1/trials/{tid}/artifact", files={"file": ("m.safetensors", weights)},
                   headers={"X-Lease-Token": tok})
    assert r.status_code == 201, r.text
    blob_id = r.json()["blob_id"]
    assert admin.post(f"/api/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    r = admin.post(f"/api/v1/trials/{tid}/complete", json={"values": {"distill_l2": 0.1}, "lease_token": tok,
                                                           "artifact": {"blob_id": blob_id, "theta": {}}})
    assert r.status_code == 409 and r.json()["code"] == "cancelled", r.text
    r = admin.post(f"/api/v1/trials/{tid}/heartbeat", json={"lease_token": tok, "progress": 0.9})
    assert r.status_code == 409 and r.json()["code"] == "cancelled", r.text
    engine = make_engine(server.database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            assert s.execute(select(Blob.id).where(Blob.id == blob_id)).first() is None
    finally:
        engine.dispose()
    assert admin.get(f"/api/v1/jobs/{job['id']}/trials").json()["items"] == []
