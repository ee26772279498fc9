"""Retraining a found architecture as an export option, end to end: real HTTP, a real database,
a real worker subprocess.

A small BO job on the digits CNN (channel_l1, 2 Sobol trials), then exports of its trial with
``retrain``: fine-tune on labels (completes, downloadable, held-out accuracy measured before and
after), bad options refused with a 422 before any work, and a Scratch-E retraining cancelled
mid-way (the worker stops at its next heartbeat, nothing is kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

import bocompress
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import log_tail, wait_for, wait_job, worker_process
from bocompress.worker.zoo import load_data


@pytest.fixture
def rt_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(f"sqlite:///{tmp_path / 'retrain.db'}", scheduler_interval=0.1)
    yield srv
    srv.stop()


def _post(client: bocompress.Client, path: str, body: dict) -> httpx.Response:
    return client._http.post("/api/v1" + path, json=body)


def test_retrain_exports_refuse_bad_options_complete_and_cancel(rt_server: LiveServer, tmp_path: Path) -> None:
    client = bocompress.Client(rt_server.url, token=rt_server.token("client", "alice"))
    log = tmp_path / "w.log"
    with worker_process(rt_server.url, rt_server.token("worker", "ops"), log):
        job = client.create_job({
            "name": "rt", "compression": {"model": "digits-cnn", "data": "digits-train", "method": "channel_l1",
                                          "sensitivity": False},
            "objective": {"kind": "constrained", "budget": 0.6},
            "budget": {"max_trials": 2, "max_parallel": 1, "lease_seconds": 1.5},
            "optimizer": {"engine": "sobol", "n_initial": 2}})
        done = wait_job(client, job.id, timeout=300, log_path=log)
        assert done["state"] == "completed", (done, log_tail(log))
        trial = client._json("GET", f"/jobs/{job.id}/trials")["items"][0]
        base = f"/jobs/{job.id}/trials/{trial['id']}/export"

        # 4xx before any work: epochs <= 0, data without labels for a mode that trains on labels
        x, _ = load_data("digits-train", 64)
        r = client._http.post("/api/v1/datasets", files={"file": ("d.safetensors", save({"inputs": x}))})
        assert r.status_code == 201, r.text
        unlabelled = r.json()["id"]
        bad = [({"retrain": {"mode": "scratch-e", "epochs": 0}}, "retrain.epochs"),
               ({"retrain": {"mode": "finetune-labels", "epochs": -1}}, "retrain.epochs"),
               ({"retrain": {"mode": "scratch-b", "epochs": 2, "dataset": "synthetic"}}, "retrain.dataset"),
               ({"retrain": {"mode": "scratch-e", "epochs": 2, "dataset": unlabelled}}, "retrain.dataset"),
               ({"retrain": {"mode": "finetune-labels", "epochs": 2, "dataset": "imagenet"}}, "retrain.dataset"),
               ({"retrain": {"mode": "sgd", "epochs": 2}}, "retrain.mode"),
               ({"retrain": {"mode": "finetune-distill", "epochs": 2}, "finetune_steps": 10}, "retrain")]
        for body, field in bad:
            r = _post(client, base, body)
            assert r.status_code == 422 and field in r.json()["detail"], (body, r.text)
        assert client._http.get("/api/v1" + base).status_code == 404  # no export task was made
        # finetune-distill needs no labels: the unlabelled upload is fine for it
        assert _post(client, base, {"retrain": {"mode": "finetune-distill", "epochs": 1,
                                                "dataset": unlabelled}}).status_code == 202

        exp = job.export(trial["id"], retrain={"mode": "finetune-labels", "epochs": 2})
        assert exp["retrain"] == {"mode": "finetune-labels", "epochs": 2, "batch_size": 64, "seed": 0}, exp
        path = job.download(trial["id"], tmp_path / "ft.safetensors", progress=False, poll=0.2, timeout=120)
        got = client._json("GET", base)
        assert got["state"] == "completed" and got["retrain"]["mode"] == "finetune-labels", got
        vals = got["values"]
        assert vals["retrain_epochs"] == 2 and {"accuracy_before", "accuracy", "distill_l2_before"} <= set(vals)
        model = bocompress.load_compressed(path).eval()
        assert sum(p.numel() for p in model.parameters()) == int(vals["params"]) == int(trial["values"]["params"])
        xt, yt = load_data("digits", 450)
        with torch.no_grad():
            assert float((model(xt).argmax(1) == yt).float().mean()) > 0.5

        # cancel mid-way: the worker stops at its next heartbeat, the export ends cancelled, nothing kept
        exp = job.export(trial["id"], retrain={"mode": "scratch-e", "epochs": 5000})
        running = wait_for(lambda: (lambda e: e if (e.get("progress") or {}).get("fraction", 0) > 0 else None)(
            client._json("GET", base)), timeout=120, what="retraining progress")
        assert running["state"] == "running" and running["id"] == exp["id"], running
        out = job.cancel_export(trial["id"])
        assert out["state"] == "cancelled" and out["id"] == exp["id"], out
        wait_for(lambda: "retraining stopped" in log.read_text(errors="replace"), timeout=60,
                 what="the worker to stop retraining")
        final = client._json("GET", base)
    assert final["state"] == "cancelled" and final["artifact"] is None, final
    r = client._http.get("/api/v1" + f"/jobs/{job.id}/trials/{trial['id']}/artifact")
    assert r.status_code == 409, r.text
