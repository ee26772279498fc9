"""The two-pass recipe as one pipeline, end to end: real HTTP, a real SQLite database, a real
worker subprocess, the zoo's trained digits CNN.

One ``POST /jobs`` with ``recipe: {"kind": "two-pass"}``: BO over the convolutions (tucker2), a
``finetune-distill`` export of the best trial, BO over the linear layers (svd) of the fine-tuned
model in a second job, then the final export, which loads with ``bocompress.load_compressed``
from the original architecture and whose parameter count is the reported total R. Also: the 422s
before any work, and cancelling the first job while its fine-tune export waits (nothing follows).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import bocompress
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import log_tail, wait_for, wait_job, worker_process

#: Parameters of the zoo's digits-cnn (conv 55,744 + linear 34,186).
DIGITS_CNN_PARAMS = 89_930


def _spec(name: str, trials: int, **recipe: object) -> dict:
    return {"name": name,
            "compression": {"model": "digits-cnn", "data": "digits-train",
                            "method": {"Conv2d": "tucker2", "Linear": "svd"}, "sensitivity": False},
            "objective": {"kind": "constrained", "budget": 0.7},
            "budget": {"max_trials": trials, "max_parallel": 1},
            "optimizer": {"engine": "sobol", "n_initial": trials},
            "recipe": {"kind": "two-pass", "finetune": {"epochs": 1}, **recipe}}


@pytest.fixture
def pipe_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(f"sqlite:///{tmp_path / 'pipeline.db'}", scheduler_interval=0.1)
    yield srv
    srv.stop()


def test_pipeline_refuses_bad_recipes(pipe_server: LiveServer) -> None:
    client = bocompress.Client(pipe_server.url, token=pipe_server.token("client", "alice"))
    generic = {"name": "g", "parameters": [{"name": "x", "type": "float", "low": 0.0, "high": 1.0}],
               "recipe": {"kind": "two-pass"}}
    chip = _spec("c", 1)
    chip["compression"]["method"] = "channel_l1"
    chip["optimizer"] = {"engine": "chipnet"}
    bad = [
        (_spec("e", 2, finetune={"epochs": 0}), "recipe.finetune.epochs"),
        (_spec("e", 2, finetune={"epochs": -3}), "recipe.finetune.epochs"),
        ({**_spec("k", 2), "recipe": {"kind": "three-pass"}}, "recipe.kind"),
        (generic, "recipe"),
        (chip, "recipe"),
        (_spec("n", 2, second={"method": "tucker2"}), "recipe.second.method"),  # tucker2 selects no Linear
        (_spec("n", 2, second={"method": {"Linear": "channel_lasso"}}), "recipe.second.method"),
        (_spec("n", 2, first={"method": {"Linear": "svd"}}), "recipe.first.method"),  # the first pass is Conv2d
        (_spec("o", 2, first={"method": {"Conv2d": "tucker2", "Linear": "svd"}}), "recipe.first.method"),
        (_spec("m", 2, second={"method": {}}), "recipe.second.method"),
    ]
    for body, field in bad:
        r = client._http.post("/api/v1/jobs", json=body)
        assert r.status_code == 422, (field, r.text)
        assert field in r.json()["detail"], (field, r.json())
    assert client._json("GET", "/jobs")["items"] == []  # nothing was made
    # the stored spec: the first pass's method and layers, both passes filled in
    job = client.create_job(_spec("ok", 2))
    assert job.spec["compression"]["method"] == {"Conv2d": "tucker2"}
    assert job.spec["recipe"]["second"] == {"method": {"Linear": "svd"}, "layers": ["*"]}
    assert job.pipeline == {"kind": "two-pass", "stage": "first", "root": job.id, "pass": 1, "jobs": [job.id],
                            "export": None, "ratios": [], "total_ratio": None, "budget": None, "budgets": [],
                            "final": None, "reason": None}
    # cancelled before any work: nothing follows
    job.cancel()
    assert job.refresh().pipeline["stage"] == "cancelled" and job.state == "cancelled"


def test_two_pass_pipeline_end_to_end(pipe_server: LiveServer, tmp_path: Path) -> None:
    client = bocompress.Client(pipe_server.url, token=pipe_server.token("client", "alice"))
    log = tmp_path / "w.log"
    with worker_process(pipe_server.url, pipe_server.token("worker", "ops"), log):
        job = client.create_job(_spec("two-pass", 6), idempotency_key="two-pass-1")
        try:
            final = job.wait_pipeline(progress=False, poll=0.2, timeout=240)
        except Exception:
            print(log_tail(log, 60))
            raise
        first = job.refresh()
        pipe = first.pipeline
        assert pipe["stage"] == "done" and final.pipeline == {**pipe, "pass": 2}, pipe
        assert pipe["jobs"] == [job.id, final.id] and final.state == "completed" and first.state == "completed"
        # pass 2 searched the linear layers of the fine-tuned first pass
        assert final.spec["compression"]["model"] == pipe["export"]["model"]
        assert final.spec["compression"]["method"] == {"Linear": "svd"} and "recipe" not in final.spec
        assert {lay["name"] for lay in final.data["layers"]} == {"fc1", "fc2"}
        assert {lay["name"] for lay in first.data["layers"]} == {"conv1", "conv2", "conv3"}
        export = client._json("GET", f"/jobs/{job.id}/trials/{pipe['export']['trial_id']}/export")
        assert export["state"] == "completed" and export["retrain"]["mode"] == "finetune-distill", export
        assert export["values"]["retrain_epochs"] == 1
        r1, r2 = pipe["ratios"]
        assert r1 == first.best()["values"]["ratio"] and r2 == final.best()["values"]["ratio"]
        assert pipe["total_ratio"] == pytest.approx(r1 * r2, rel=1e-12)
        # the budget is the final model's: conv layers (55,744 of 89,930 parameters) at 0.7 of their own cost
        # in the first pass, the rest of the total left to the second
        b1, b2 = pipe["budgets"]
        assert pipe["budget"] == 0.7 and b1 == pytest.approx(1 - 0.3 * 55_744 / DIGITS_CNN_PARAMS, abs=0.01)
        assert first.spec["objective"]["budget"] == b1 and final.spec["objective"]["budget"] == b2
        assert b2 == pytest.approx(min(1.0, 0.7 / r1), rel=1e-12)
        assert r1 <= b1 + 1e-12 and r2 <= b2 + 1e-12 and pipe["total_ratio"] <= 0.7 + 1e-12
        # a retried POST (same key, same body) answers the same job though its stored budget is the pass's
        assert client.create_job(_spec("two-pass", 6), idempotency_key="two-pass-1").id == job.id
        # the final model: one file, rebuilt from the ORIGINAL architecture; its size is the total R
        best = final.best()
        final.export(best["id"])
        path = final.download(best["id"], tmp_path / "two-pass.safetensors", progress=False, poll=0.2, timeout=120)
        model = bocompress.load_compressed(path)
        n = sum(p.numel() for p in model.parameters())
        assert n / DIGITS_CNN_PARAMS == pytest.approx(pipe["total_ratio"], abs=1e-12), (n, pipe)
        assert n == int(best["values"]["params"])
        desc = bocompress.compressed.read_description(path)
        assert desc["arch"] == "digits-cnn"
        assert {c["path"] for c in desc["changed"]} >= {"fc1"}  # and the convs the first pass factorized
        assert any(c["path"].startswith("conv") for c in desc["changed"])
        import torch

        from bocompress.worker.zoo import load_data

        x, y = load_data("digits", 200)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        assert acc > 0.5, acc
        # the CLI shows the pipeline where it shows a job
        from typer.testing import CliRunner

        from bocompress.cli import app

        token = pipe_server.token("client", "alice")
        one = CliRunner().invoke(app, ["status", str(final.id), "--url", pipe_server.url, "--token", token])
        assert one.exit_code == 0, one.output
        assert f"pipeline: two-pass done (pass 2 of jobs {job.id}, {final.id}), total R=" in one.output, one.output
        listed = CliRunner().invoke(app, ["status", "--url", pipe_server.url, "--token", token])
        assert listed.exit_code == 0 and "pipeline" in listed.output and "done (pass 1)" in listed.output, listed.output
        print(f"\nMEASURED two-pass: R1={r1:.4f} R2={r2:.4f} total={pipe['total_ratio']:.4f} "
              f"L={best['values']['distill_l2']:.4g} acc={best['values'].get('accuracy')} "
              f"acc_orig={best['values'].get('accuracy_original')} export={export['values']}")


def test_cancel_during_finetune_cancels_what_follows(pipe_server: LiveServer, tmp_path: Path) -> None:
    client = bocompress.Client(pipe_server.url, token=pipe_server.token("client", "alice"))
    log = tmp_path / "w.log"
    # the worker stops after the profile and the 2 trials: the fine-tune export waits in the queue
    with worker_process(pipe_server.url, pipe_server.token("worker", "ops"), log, "--max-trials", "3") as proc:
        job = client.create_job(_spec("cancel-me", 2))
        done = wait_job(client, job.id, timeout=120, log_path=log)
        assert done["state"] == "completed", (done, log_tail(log))
        wait_for(lambda: job.refresh().pipeline["stage"] == "finetune", 30, "the finetune stage")
        proc.wait(timeout=30)
    task_id = job.pipeline["export"]["task_id"]
    job.cancel()
    pipe = job.refresh().pipeline
    assert pipe["stage"] == "cancelled" and "finetune" in pipe["reason"], pipe
    export = client._json("GET", f"/jobs/{job.id}/trials/{pipe['export']['trial_id']}/export")
    assert export["id"] == task_id and export["state"] == "cancelled", export
    assert [j["id"] for j in client._json("GET", "/jobs")["items"]] == [job.id]  # no second job
    assert job.state == "completed"  # the first pass's results stay
