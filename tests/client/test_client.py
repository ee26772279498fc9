"""The Python client against a stub service over real sockets (see conftest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

import bocompress
from bocompress import client as client_mod
from bocompress.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    UnprocessableEntityError,
    WaitTimeoutError,
)

COMPRESSION_SPEC = {
    "name": "digits-svd",
    "compression": {"model": "digits_cnn", "data": "digits", "method": "svd"},
    "objective": {"kind": "scalarized", "kappa": 2.0},
    "budget": {"max_trials": 5, "max_parallel": 1},
}
GENERIC_SPEC = {
    "name": "quadratic",
    "parameters": [{"name": "x", "low": -1.0, "high": 1.0}, {"name": "y", "low": 0.0, "high": 2.0}],
    "objective": {"metric": "loss", "direction": "minimize"},
    "budget": {"max_trials": 3, "max_parallel": 1},
}


def test_import_is_light() -> None:
    """``import bocompress`` must not pull torch, SQLAlchemy, FastAPI, pandas, matplotlib, tqdm, typer."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bocompress"],
                         capture_output=True, text=True, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "bocompress" in imported and "httpx" in imported and "pydantic" in imported
    heavy = {"torch", "sqlalchemy", "fastapi", "pandas", "matplotlib", "tqdm", "typer", "numpy", "safetensors"}
    assert not imported & heavy, f"heavy modules imported by `import bocompress`: {sorted(imported & heavy)}"


def test_retry_on_503_creates_one_job_with_one_idempotency_key(stub, monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_mod, "_sleep", sleeps.append)
    stub.state.fail_create = 2
    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
    posts = stub.posts("/jobs")
    assert len(posts) == 3
    keys = {p.headers["Idempotency-Key"] for p in posts}
    assert len(keys) == 1 and len(next(iter(keys))) == 36  # one uuid4 for the logical POST
    assert len(stub.state.jobs) == 1 and job.id == 1 and job.name == "digits-svd"
    assert sleeps == [0.01, 0.01]  # the server's Retry-After, honoured

    # a second logical create is a new key and a new job
    with bocompress.Client(stub.url) as client:
        client.create_job(COMPRESSION_SPEC)
    assert len({p.headers["Idempotency-Key"] for p in stub.posts("/jobs")}) == 2
    assert len(stub.state.jobs) == 2


def test_backoff_is_jittered_exponential_without_retry_after(stub, monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_mod, "_sleep", sleeps.append)
    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
        stub.state.fail_get = 3
        job.refresh()
        assert len(sleeps) == 3
        for n, s in enumerate(sleeps):
            full = min(0.01 * 2**n, 0.05)
            assert 0.75 * full <= s <= full
        stub.state.fail_get = 10
        with pytest.raises(InternalServerError) as info:
            job.refresh()
    assert info.value.status_code == 502 and info.value.code == "unavailable"
    assert len(stub.gets("/jobs/1")) == 4 + 5  # 3 failures + success, then 1 + max_retries(4)


def test_422_is_not_retried_and_carries_fields(stub) -> None:
    with bocompress.Client(stub.url) as client:
        with pytest.raises(UnprocessableEntityError) as info:
            client.create_job({"compression": {"model": "m"}})
    err = info.value
    assert len(stub.posts("/jobs")) == 1
    assert err.status_code == 422 and err.code == "validation_error"
    assert err.detail == "name: field required"
    assert err.body == {"detail": "name: field required", "code": "validation_error"}
    assert err.request_id and err.request.method == "POST"
    assert "name: field required" in err.message and "422" in err.message
    assert isinstance(err, bocompress.APIStatusError) and isinstance(err, bocompress.BocompressError)


def test_not_found_and_plain_conflict_are_not_retried(stub) -> None:
    with bocompress.Client(stub.url) as client:
        with pytest.raises(NotFoundError) as info:
            client.get_job(42)
        assert info.value.detail == "job 42 not found"
        job = client.create_job(GENERIC_SPEC)
        trial = job.ask()[0]
        with pytest.raises(ConflictError) as conflict:
            client.heartbeat(trial["id"])
        assert conflict.value.code == "lease_lost"
    assert len(stub.posts(f"/trials/{trial['id']}/heartbeat")) == 1


def test_conflict_with_retry_after_is_retried_with_the_same_key(stub) -> None:
    with bocompress.Client(stub.url) as client:
        job = client.create_job(GENERIC_SPEC)
        trial = job.ask()[0]
        stub.state.conflict_complete = 1
        done = client.complete(trial["id"], {"loss": 0.5}, {"loss": 0.01})
    assert done["state"] == "completed"
    posts = stub.posts(f"/trials/{trial['id']}/complete")
    assert len(posts) == 2 and posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
    assert json.loads(posts[1].body) == {"values": {"loss": 0.5}, "sem": {"loss": 0.01}}


def test_connection_error_and_timeout(stub) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with bocompress.Client(f"http://127.0.0.1:{port}", max_retries=2) as client:
        with pytest.raises(APIConnectionError) as info:
            client.health()
    assert "cannot reach the service" in str(info.value)
    start = time.monotonic()
    with bocompress.Client(stub.url, timeout=0.2, max_retries=1) as client:
        with pytest.raises(APITimeoutError):
            client.request("GET", "/slow")
    assert time.monotonic() - start < 1.5
    assert len(stub.gets("/slow")) == 2


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(bocompress.BocompressError, match="http:// or https://"):
        bocompress.Client("localhost:8000")


def test_token_from_env_and_401(stub, monkeypatch) -> None:
    stub.state.token = "s3cret"
    with bocompress.Client(stub.url) as client:
        with pytest.raises(AuthenticationError) as info:
            list(client.jobs())
    assert info.value.status_code == 401 and info.value.code == "unauthorized"
    monkeypatch.setenv("BOCOMPRESS_URL", stub.url)
    monkeypatch.setenv("BOCOMPRESS_TOKEN", "s3cret")
    with bocompress.Client() as client:
        assert client.url == stub.url
        assert list(client.jobs()) == []
        assert client.health() == {"status": "ok"}
    assert stub.state.requests[-2].headers["Authorization"] == "Bearer s3cret"


def test_cursor_iteration(stub) -> None:
    with bocompress.Client(stub.url) as client:
        jobs = client.submit_many([{**GENERIC_SPEC, "name": f"j{i}"} for i in range(7)])
        assert [j.id for j in jobs] == list(range(1, 8))
        names = [j["name"] for j in client.jobs(limit=3)]
    assert names == [f"j{i}" for i in range(7)]
    pages = stub.gets("/jobs")
    assert [p.query.get("cursor") for p in pages] == [None, "3", "6"]
    assert all(p.query["limit"] == "3" for p in pages)


def test_wait_polls_only_changes(stub) -> None:
    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
        job.wait(progress=True, poll=0.001, timeout=30)
        best = job.best()
    assert job.state == "completed" and job.done
    assert len(job._trials) == 5
    assert all(t["state"] == "completed" for t in job._trials.values())
    polls = stub.gets("/jobs/1/trials")
    sinces = [int(p.query["since"]) for p in polls if "since" in p.query]
    assert "since" not in polls[0].query  # the first poll fetches everything
    assert sinces == sorted(sinces) and sinces[-1] <= job._since
    # every change of a trial (created running, then completed) went over the wire at most once:
    # 5 trials x 2 changes over 6+ polls (re-sending all trials each poll would be 25+ items)
    assert len(polls) >= 6
    assert sum(stub.state.served_trials) <= stub.state.jobs[1]["seq"] == 10
    assert job._since == 10
    assert best["values"]["objective"] == min(t["values"]["objective"] for t in job._trials.values())


def test_wait_timeout(stub) -> None:
    with bocompress.Client(stub.url) as client:
        job = client.create_job({**COMPRESSION_SPEC, "budget": {"max_trials": 1000}})
        with pytest.raises(WaitTimeoutError, match="still running"):
            job.wait(progress=False, poll=0.01, timeout=0.1)


def test_trials_dataframe_columns(stub) -> None:
    import pandas as pd

    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
        job.wait(progress=False, poll=0.001, timeout=30)
        df = job.trials()
    assert list(df.columns) == ["id", "number", "state", "attempt", "worker", "error", "created_at",
                                "finished_at", "conv1", "fc", "distill_l2", "ratio", "objective"]
    assert len(df) == 5 and list(df["number"]) == [0, 1, 2, 3, 4]
    assert isinstance(df["created_at"].dtype, pd.DatetimeTZDtype)
    row = df.iloc[2]
    assert row["objective"] == pytest.approx(2.0 * row["distill_l2"] + row["ratio"])


def test_trials_dataframe_prefixes_clashing_params(stub) -> None:
    spec = {**GENERIC_SPEC, "parameters": [{"name": "loss", "low": 0.0, "high": 1.0},
                                           {"name": "x", "low": 0.0, "high": 1.0}]}
    with bocompress.Client(stub.url) as client:
        job = client.create_job(spec)
        for trial in job.ask(count=2):
            job.tell(trial["id"], values={"loss": trial["params"]["x"] ** 2})
        df = job.trials()
    assert list(df.columns)[-3:] == ["param.loss", "param.x", "loss"]
    assert df["loss"].tolist() == pytest.approx((df["param.x"] ** 2).tolist())


def test_ask_tell_and_failed_tell(stub) -> None:
    with bocompress.Client(stub.url) as client:
        job = client.create_job(GENERIC_SPEC)
        asked = job.ask(count=5)
        assert len(asked) == 3  # the budget
        assert job.ask() == []
        job.tell(asked[0]["id"], values={"loss": 1.5}, sem={"loss": 0.1})
        job.tell(asked[1]["id"], failed=True, error="diverged")
        with pytest.raises(UnprocessableEntityError):
            job.tell(asked[2]["id"])
        assert job.refresh().counts == {"completed": 1, "failed": 1, "running": 1}
        fig = job.plot()  # a generic job: the best-so-far curve only
        assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "loss"
    tells = stub.posts(f"/trials/{asked[1]['id']}/tell")
    assert json.loads(tells[0].body) == {"values": {}, "sem": {}, "failed": True, "error": "diverged"}
    assert all("Idempotency-Key" in r.headers for r in stub.state.requests if r.method == "POST")


def test_pareto_plot_cancel(stub) -> None:
    import matplotlib

    matplotlib.use("Agg")
    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
        job.wait(progress=False, poll=0.001, timeout=30)
        front = job.pareto()
        fig = job.plot()
        assert len(fig.axes) == 2
        scatter_ax = fig.axes[1]
        front_line = [ln for ln in scatter_ax.get_lines() if ln.get_label() == "Pareto front"][0]
        assert len(front_line.get_xdata()) == len(front) >= 1
        assert sorted(front_line.get_xdata()) == sorted(t["values"]["ratio"] for t in front)
        other = client.create_job(COMPRESSION_SPEC)
        assert other.cancel().state == "cancelled"


def test_uploads_real_module_and_dataset(stub) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(10, 4)
    y = torch.randint(0, 2, (10,))
    with bocompress.Client(stub.url) as client:
        rec = client.upload_model(model, arch="tiny_mlp")
        assert rec["arch"] == "tiny_mlp" and rec["size"] > 0
        tensors = load(client.download_model(rec["id"]))
        assert set(tensors) == set(model.state_dict())
        assert torch.equal(tensors["0.weight"], model[0].weight.detach())
        ds = client.upload_dataset(x, labels=y)
        data = load(client.download_dataset(ds["id"]))
        assert set(data) == {"inputs", "labels"} and torch.equal(data["inputs"], x)
        with pytest.raises(bocompress.BocompressError, match="first dimension"):
            client.upload_dataset(x, labels=y[:3])
        with pytest.raises(NotFoundError):
            client.download_model("nope")


def test_upload_path_sent_as_is(stub, tmp_path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not really safetensors, sent as is")
    with bocompress.Client(stub.url) as client:
        rec = client.upload_model(path, arch="zoo:digits_cnn")
        assert client.download_model(rec["id"]) == path.read_bytes()
        with pytest.raises(bocompress.BocompressError, match="no such file"):
            client.upload_model(tmp_path / "missing.safetensors", arch="x")


def test_worker_calls(stub) -> None:
    with bocompress.Client(stub.url) as client:
        assert client.lease("w0", kinds=["evaluate"]) is None
        job = client.create_job(GENERIC_SPEC)
        trial = job.ask()[0]
        failed = client.fail(trial["id"], "CUDA out of memory", retry=True)
    assert failed["state"] == "queued"
    lease = stub.posts("/workers/lease")[0]
    assert json.loads(lease.body) == {"worker": "w0", "kinds": ["evaluate"]}


def test_export_and_download_waits_for_the_artifact(stub, tmp_path) -> None:
    stub.state.artifact = b"\x00safetensors bytes\x01"
    stub.state.artifact_pending = 3
    with bocompress.Client(stub.url) as client:
        job = client.create_job(COMPRESSION_SPEC)
        ans = job.export(101, finetune_steps=50, lr=1e-3)
        assert ans == {"trial_id": 101, "state": "queued", "finetune_steps": 50, "lr": 1e-3}
        out = job.download(101, tmp_path / "sub" / "model.safetensors", progress=True, poll=0.01)
        assert out.read_bytes() == stub.state.artifact
        stub.state.artifact_pending = 1000
        with pytest.raises(WaitTimeoutError, match="being built"):
            job.download(101, tmp_path / "x", progress=False, poll=0.01, timeout=0.05)
    assert len(stub.gets("/jobs/1/trials/101/artifact")) >= 4
