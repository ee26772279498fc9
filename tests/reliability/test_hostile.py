"""Hostile input: each gets a clear 4xx, nothing is half-stored, and the service stays healthy.

Pickles (``torch.save``) and truncated files as weights, wrong tensor names and shapes,
oversize bodies (uploads, JSON and chunked), NaN/inf results, names with path tricks, huge
numbers in queries and paths.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save
from sqlalchemy import func, select

from bocompress.service.db.models import Blob, Job, Trial
from bocompress.service.db.session import make_engine, make_sessionmaker, read_session
from tests.conftest import LiveServer, drop_pg_database, new_database, start_server
from tests.service.helpers import compression_job, lease, profile_job

LIMIT = 64 * 1024  # max_upload_bytes of the test service


def counts(url: str) -> tuple[int, int, int]:
    """(blobs, jobs, trials) in the database: nothing may be half-stored by a refused request."""
    engine = make_engine(url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            return tuple(int(s.execute(select(func.count()).select_from(t)).scalar_one())  # type: ignore[return-value]
                         for t in (Blob, Job, Trial))
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A service with a small upload limit and a leased trial (its lease token in hand)."""
    db = new_database(request.param, Path(tmp_path_factory.mktemp("hostile")), "hostile")
    srv = start_server(db, scheduler_interval=0.1, max_upload_bytes=LIMIT)
    try:
        with srv.client(srv.admin_token) as c:
            job = compression_job(c, max_trials=2, max_parallel=2)
            profile_job(c, job["id"])
            got = None
            while got is None:
                got = lease(c, "w", ["evaluate"])
        yield {"srv": srv, "db": db, "job": job["id"], "trial": got["trial"]["id"], "lease": got["lease"]["token"]}
    finally:
        srv.stop()
        if request.param == "postgresql":
            drop_pg_database(db)


def refused(h: dict[str, Any], method: str, url: str, status: int | tuple[int, ...], word: str, **kw: Any
            ) -> httpx.Response:
    """Send a hostile request; assert the 4xx and its message, that nothing was stored, and health."""
    srv: LiveServer = h["srv"]
    before = counts(h["db"])
    with srv.client(srv.admin_token) as c:
        r = c.request(method, url, **kw)
        ok = (status,) if isinstance(status, int) else status
        assert r.status_code in ok, (url, r.status_code, r.text[:300])
        body = r.json()
        assert set(body) >= {"detail", "code"} and word.lower() in body["detail"].lower(), body
        assert c.get("/healthz").status_code == 200
    assert counts(h["db"]) == before, f"{url}: something was stored"
    return r


def _pickled() -> bytes:
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.randn(4, 4)}, buf)
    return buf.getvalue()


def _good() -> bytes:
    return save({"fc.weight": torch.randn(8, 8), "fc.bias": torch.zeros(8)})


@pytest.mark.parametrize("what,data,word", [
    ("torch.save pickle", _pickled, "pickle"),
    ("truncated safetensors", lambda: _good()[:-17], "truncated"),
    ("header only", lambda: _good()[:40], "safetensors"),
    ("header lies about offsets", lambda: _good().replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1), "file"),
])
def test_bad_weight_files(hostile: dict[str, Any], what: str, data: Any, word: str) -> None:
    refused(hostile, "POST", "/api/v1/models", 422, word, files={"file": ("w.safetensors", data())},
            data={"arch": "digits-mlp"})


@pytest.mark.parametrize("tensors,word", [
    ({"labels": torch.zeros(4, dtype=torch.long)}, "inputs"),  # no input at all
    ({"inputs": torch.zeros(4)}, "N x"),  # wrong rank
    ({"input_ids": torch.zeros(4, 2, dtype=torch.long), "mask": torch.zeros(5, 2)}, "disagree"),  # N differs
    ({"inputs": torch.zeros(4, 2), "labels": torch.zeros(5, dtype=torch.long)}, "labels"),  # wrong length
    ({"inputs": torch.zeros(4, 2), "evil": torch.zeros(4)}, "positional"),  # 'inputs' beside named inputs
])
def test_wrong_tensor_names_and_shapes(hostile: dict[str, Any], tensors: dict[str, torch.Tensor], word: str) -> None:
    refused(hostile, "POST", "/api/v1/datasets", 422, word, files={"file": ("d.safetensors", save(tensors))})


def test_oversize_bodies(hostile: dict[str, Any]) -> None:
    big = save({"w": torch.zeros(LIMIT // 4 + 10)})
    refused(hostile, "POST", "/api/v1/models", 413, "larger", files={"file": ("w", big)}, data={"arch": "digits-mlp"})
    # a JSON body far over the limit is refused before it is parsed
    huge = json.dumps({"name": "x" * (LIMIT + 2 * 1024 * 1024), "parameters": [{"name": "x", "low": 0, "high": 1}]})
    refused(hostile, "POST", "/api/v1/jobs", 413, "larger", content=huge,
            headers={"Content-Type": "application/json"})

    # chunked (no Content-Length): counted as it streams in
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * (64 * 1024)

    refused(hostile, "POST", "/api/v1/jobs", 413, "larger", content=chunks(),
            headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("raw,word", [
    ('{"values": {"distill_l2": NaN}}', "finite"),
    ('{"values": {"distill_l2": Infinity}}', "finite"),
    ('{"values": {"distill_l2": -Infinity}}', "finite"),
    ('{"values": {"distill_l2": 1e999}}', "finite"),
    ('{"values": {"distill_l2": 0.1}, "sem": {"distill_l2": NaN}}', "finite"),
    ('{"values": {"distill_l2": 0.1}, "sem": {"distill_l2": -1}}', ">= 0"),
    ('{"values": {"distill_l2": -0.5}}', "distill_l2"),
    ('{"values": {"distill_l2": "0.1; DROP TABLE trials"}}', "distill_l2"),
    ('{"values": {"other": 1.0}}', "distill_l2"),
    ('{"values": {"distill_l2": 0.1}, "lease_token": "' + "x" * 65 + '"}', "lease_token"),
])
def test_nan_inf_and_bad_results(hostile: dict[str, Any], raw: str, word: str) -> None:
    url = f"/api/v1/trials/{hostile['trial']}/complete"
    body = raw if "lease_token" in raw else raw[:-1] + f', "lease_token": "{hostile["lease"]}"}}'
    refused(hostile, "POST", url, 422, word, content=body, headers={"Content-Type": "application/json"})
    with hostile["srv"].client(hostile["srv"].admin_token) as c:
        t = c.get(f"/api/v1/trials/{hostile['trial']}").json()
        assert t["state"] == "running" and t["values"] == {}, t  # still waiting for a real result


def test_names_with_path_tricks(hostile: dict[str, Any]) -> None:
    refused(hostile, "POST", "/api/v1/models", 422, "arch", files={"file": ("w", _good())},
            data={"arch": "../../etc/passwd"})
    refused(hostile, "POST", "/api/v1/jobs", 422, "compression.model",
            json={"name": "x", "compression": {"model": "../../../etc/passwd", "data": "digits", "method": "svd"}})
    refused(hostile, "POST", "/api/v1/jobs", 422, "compression.model",
            json={"name": "x", "compression": {"model": "mdl_../../etc/passwd", "data": "digits", "method": "svd"}})
    refused(hostile, "POST", "/api/v1/jobs", 422, "compression.data",
            json={"name": "x", "compression": {"model": "digits-mlp", "data": "/etc/passwd", "method": "svd"}})
    refused(hostile, "POST", "/api/v1/jobs", 422, "parameter name",
            json={"name": "x", "parameters": [{"name": "../../x", "low": 0, "high": 1}]})
    for url in ("/api/v1/models/..%2F..%2Fetc%2Fpasswd", "/api/v1/models/mdl_..%2Fx/file",
                "/api/v1/datasets/..%2Fmdl_000000000000000000000000/file"):
        refused(hostile, "GET", url, 404, "not found")
    srv: LiveServer = hostile["srv"]
    with srv.client(srv.admin_token) as c:
        for url in ("/static/..%2F..%2Fservice%2Fapp.py", "/static/../../service/app.py"):
            r = c.get(url)
            assert r.status_code == 404 and b"create_app" not in r.content, (url, r.status_code)
        # the upload's own file name is never used as a path: the id is the service's
        r = c.post("/api/v1/models", files={"file": ("../../../../tmp/evil.safetensors", _good())},
                   data={"arch": "digits-mlp"})
        assert r.status_code == 201 and r.json()["id"].startswith("mdl_") and "/" not in r.json()["id"]
        assert not Path("/tmp/evil.safetensors").exists()


# The word names what was refused: the query parameter of a 422, or (ids that may also be refused
# as unknown, 404 "job ... not found") the resource of the path parameter.
@pytest.mark.parametrize("url,status,word", [
    ("/api/v1/jobs?limit=1000000000000", 422, "query.limit"),
    ("/api/v1/jobs?limit=99999999999999999999999999999", 422, "query.limit"),
    ("/api/v1/jobs?limit=-1", 422, "query.limit"),
    ("/api/v1/jobs?limit=1e9", 422, "query.limit"),
    ("/api/v1/jobs?cursor=not-a-cursor", 422, "query.cursor"),
    ("/api/v1/jobs/{job}/trials?limit=100000000", 422, "query.limit"),
    ("/api/v1/jobs/{job}/trials?since=-1", 422, "query.since"),
    ("/api/v1/jobs/{job}/trials?since=999999999999999999999999", 422, "query.since"),
    ("/api/v1/jobs/{job}/trials?cursor=djE6eA", 422, "query.cursor"),
    ("/api/v1/jobs/99999999999999999999", (404, 422), "job"),
    ("/api/v1/jobs/9223372036854775808/trials", (404, 422), "job"),
    ("/api/v1/trials/2147483648", (404, 422), "trial"),
])
def test_huge_numbers(hostile: dict[str, Any], url: str, status: int | tuple[int, ...], word: str) -> None:
    refused(hostile, "GET", url.replace("{job}", str(hostile["job"])), status, word)
