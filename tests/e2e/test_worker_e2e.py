"""End to end: a real worker subprocess against the real service, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bocompress.client import Client
from tests.conftest import LiveServer
from tests.e2e.helpers import digits_cnn_spec, log_tail, save_state_dict, trials, wait_job, worker_process
from bocompress.worker.zoo import load_model


@pytest.fixture
def alice(server: LiveServer) -> Iterator[Client]:
    with Client(server.url, server.token("client", "alice"), timeout=60) as c:
        yield c


@pytest.fixture
def worker(server: LiveServer, tmp_path: Path):  # noqa: ANN201 - a generator fixture
    log = tmp_path / "worker.log"
    with worker_process(server.url, server.token("worker", "ops"), log) as proc:
        proc.log_path = log  # type: ignore[attr-defined]
        yield proc


def test_worker_subprocess_completes_a_compression_job(server: LiveServer, alice: Client, worker) -> None:  # noqa: ANN001
    job = alice.create_job(digits_cnn_spec("e2e-10", 10))
    final = wait_job(alice, job.id, log_path=worker.log_path)
    assert final["state"] == "completed", (final, log_tail(worker.log_path))
    assert final["layers"] and {layer["method"] for layer in final["layers"]} == {"tucker2", "svd"}
    done = [t for t in trials(alice, job.id) if t["state"] == "completed"]
    assert len(done) == 10
    for t in done:
        v = t["values"]
        for key in ("distill_l2", "ratio", "objective", "accuracy", "ratio_measured", "accuracy_original"):
            assert key in v, (key, v)
        assert math.isclose(v["ratio_measured"], v["ratio"], rel_tol=1e-9), v
        assert 0.0 < v["ratio"] <= 1.0 and v["distill_l2"] >= 0.0
        assert math.isclose(v["objective"], v["distill_l2"] + v["ratio"], rel_tol=1e-9)
        assert t["sem"]["distill_l2"] >= 0.0
        assert t["worker"].endswith("e2e-worker") and t["attempt"] == 1
    assert worker.poll() is None, "the worker must keep running after the job"


def test_profiling_failure_fails_the_job_naming_the_pattern(server: LiveServer, alice: Client, worker) -> None:  # noqa: ANN001
    job = alice.create_job(digits_cnn_spec("e2e-nomatch", 3, layers=["nomatch*"]))
    final = wait_job(alice, job.id, log_path=worker.log_path)
    assert final["state"] == "failed"
    assert "nomatch*" in final["reason"], final["reason"]
    assert final["counts"].get("completed", 0) == 0


def test_uploaded_weights_with_a_wrong_tensor_fail_the_job(server: LiveServer, alice: Client, worker,  # noqa: ANN001
                                                          tmp_path: Path) -> None:
    state = dict(load_model("digits-cnn").state_dict())
    state["fc1.kernel"] = state.pop("fc1.weight")
    path = save_state_dict(state, tmp_path / "renamed.safetensors")
    uploaded = alice.upload_model(path, arch="digits-cnn")
    job = alice.create_job(digits_cnn_spec("e2e-badweights", 3, model=uploaded["id"]))
    final = wait_job(alice, job.id, log_path=worker.log_path)
    assert final["state"] == "failed"
    assert "fc1.weight" in final["reason"] and "fc1.kernel" in final["reason"], final["reason"]


def test_uploaded_weights_and_dataset_are_used(server: LiveServer, alice: Client, worker) -> None:  # noqa: ANN001
    """An uploaded state dict (safetensors) and an uploaded calibration set drive a job to completion."""
    from bocompress.worker.zoo import load_data

    model = load_model("digits-cnn")
    uploaded = alice.upload_model(model, arch="digits-cnn")
    x, y = load_data("digits", 64)
    data = alice.upload_dataset(x, labels=y)
    job = alice.create_job(digits_cnn_spec("e2e-uploads", 2, model=uploaded["id"], data=data["id"]))
    final = wait_job(alice, job.id, log_path=worker.log_path)
    assert final["state"] == "completed", (final, log_tail(worker.log_path))
    for t in trials(alice, job.id):
        assert math.isclose(t["values"]["ratio_measured"], t["values"]["ratio"], rel_tol=1e-9)
        assert 0.0 <= t["values"]["accuracy"] <= 1.0
