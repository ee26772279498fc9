"""Uploads: safetensors only; hostile files get a 4xx and leave nothing stored."""

from __future__ import annotations

import io
import pickle

import httpx
import pytest
import torch
from safetensors.torch import save
from sqlalchemy import func, select

from bocompress.service.db.models import Blob
from bocompress.service.db.session import make_engine, make_sessionmaker, read_session
from tests.conftest import LiveServer, start_server
from bocompress.worker.zoo import load_model


def blob_count(url: str) -> int:
    engine = make_engine(url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            return int(s.execute(select(func.count()).select_from(Blob)).scalar_one())
    finally:
        engine.dispose()


def good_weights() -> bytes:
    return save({k: v.contiguous() for k, v in load_model("digits-cnn").state_dict().items()})


def test_model_upload_roundtrip(server: LiveServer, admin: httpx.Client) -> None:
    data = good_weights()
    r = admin.post("/api/v1/models", files={"file": ("w.safetensors", data)}, data={"arch": "digits-cnn"})
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["id"].startswith("mdl_") and out["size"] == len(data) and len(out["sha256"]) == 64
    assert admin.get(f"/api/v1/models/{out['id']}/file").content == data
    ds = save({"inputs": torch.randn(16, 1, 8, 8), "labels": torch.arange(16) % 10})
    r = admin.post("/api/v1/datasets", files={"file": ("d.safetensors", ds)})
    assert r.status_code == 201, r.text
    job = admin.post("/api/v1/jobs", json={"name": "up", "compression": {
        "model": out["id"], "data": r.json()["id"], "method": "svd"}, "objective": {"kind": "scalarized"}})
    assert job.status_code == 201, job.text


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(load_model("digits-cnn").state_dict(), buf)
    return buf.getvalue()


HOSTILE = [
    ("torch.save pickle", _pickle_bytes, "pickle"),
    ("plain pickle", lambda: pickle.dumps({"a": 1}), "safetensors"),
    ("truncated", lambda: good_weights()[:5000], "truncated"),
    ("empty", lambda: b"", "short"),
    ("garbage header", lambda: (10).to_bytes(8, "little") + b"not json!!" + b"\0" * 10, "JSON"),
]


@pytest.mark.parametrize("case,make,word", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_model_uploads(server: LiveServer, admin: httpx.Client, case: str, make, word: str) -> None:
    before = blob_count(server.database_url)
    r = admin.post("/api/v1/models", files={"file": ("w.bin", make())}, data={"arch": "digits-cnn"})
    assert r.status_code == 422, (case, r.text)
    assert r.json()["detail"].startswith("file:") and word.lower() in r.json()["detail"].lower(), r.json()
    assert blob_count(server.database_url) == before
    assert admin.get("/healthz").status_code == 200


def test_wrong_arch_and_bad_dataset(server: LiveServer, admin: httpx.Client) -> None:
    before = blob_count(server.database_url)
    r = admin.post("/api/v1/models", files={"file": ("w", good_weights())}, data={"arch": "../../etc/passwd"})
    assert r.status_code == 422 and "arch" in r.json()["detail"]
    r = admin.post("/api/v1/datasets", files={"file": ("d", save({"labels": torch.zeros(3, dtype=torch.long)}))})
    assert r.status_code == 422 and "inputs" in r.json()["detail"]
    r = admin.post("/api/v1/datasets", files={"file": ("d", save({"inputs": torch.zeros(3, 2),
                                                                  "labels": torch.zeros(4, dtype=torch.long)}))})
    assert r.status_code == 422 and "labels" in r.json()["detail"]
    r = admin.post("/api/v1/models", data={"arch": "digits-cnn"})
    assert r.status_code == 422 and "file" in r.json()["detail"]
    assert blob_count(server.database_url) == before


def test_oversize_upload_is_413(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'small.db'}"
    srv = start_server(url, max_upload_bytes=64 * 1024)
    try:
        with srv.client(srv.admin_token) as c:
            r = c.post("/api/v1/models", files={"file": ("w", good_weights())}, data={"arch": "digits-cnn"})
            assert r.status_code == 413 and r.json()["code"] == "too_large"
            assert c.get("/healthz").status_code == 200
        assert blob_count(url) == 0
    finally:
        srv.stop()
