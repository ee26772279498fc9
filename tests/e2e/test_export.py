"""The user's side end to end: the quickstart example, export, download and load_compressed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bocompress
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import REPO_ROOT, worker_process
from bocompress.worker.zoo import load_data


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(f"sqlite:///{tmp_path / 'export.db'}", scheduler_interval=0.1)
    yield srv
    srv.stop()


def test_quickstart_example_end_to_end(sqlite_server: LiveServer, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    token = sqlite_server.token("client", "alice")
    with worker_process(sqlite_server.url, sqlite_server.token("worker", "ops"), tmp_path / "w.log"):
        out = quickstart.main(["--url", sqlite_server.url, "--token", token, "--trials", "8",
                               "--finetune-steps", "150", "--out", str(tmp_path / "qs"), "--no-progress"])
        assert Path(out["path"]).stat().st_size > 0
        assert (tmp_path / "qs" / "quickstart.png").stat().st_size > 0
        assert out["accuracy"] > 0.8

        client = bocompress.Client(sqlite_server.url, token=token)
        job = client.get_job(out["job"])
        best = out["best"]
        # an export without fine-tuning reproduces exactly what the worker measured
        info = job.export(best["id"], finetune_steps=0)
        assert info["state"] in ("queued", "running", "completed") and info["trial_id"] == best["id"]
        path = job.download(best["id"], tmp_path / "plain.safetensors", progress=False, poll=0.2, timeout=120)
        # the latest completed export of the trial is served: wait for the plain one
        exp = client._json("GET", f"/jobs/{job.id}/trials/{best['id']}/export")
        assert exp["finetune_steps"] == 0 and exp["state"] == "completed", exp
        model = bocompress.load_compressed(path)
        theta = {k: float(v) for k, v in best["params"].items()}
        # the worker's own path for this job: the same calibration part, compression and repairs
        from bocompress.worker.proxy import prepare
        from bocompress.worker.runtime import build_context

        ctx = build_context(client, {"id": job.id, "spec": job.spec}, "cpu", [])
        reference, _ = prepare(ctx.compressor, theta, ctx.inputs, ctx.teacher, ctx.proxy)
        x, _ = load_data("digits", 450)
        with torch.no_grad():
            diff = (model.eval()(x) - reference.eval()(x)).abs().max().item()
        assert diff < 1e-5, diff
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == int(best["values"]["params"]) == int(exp["values"]["params"])
        assert abs(exp["values"]["distill_l2"] - best["values"]["distill_l2"]) < 1e-5 * max(1.0, best["values"]["distill_l2"])
        # the fine-tuned export (asked by the quickstart) lowered L on held-out calibration inputs
        fts = [t for t in client._json("GET", f"/jobs/{job.id}/trials")["items"]]
        assert fts  # the evaluate trials are listed; export tasks are not trials
        assert all(t["number"] < 8 for t in fts)
    ft = [e for e in _exports(sqlite_server, job.id) if e["params"].get("finetune_steps") == 150]
    assert ft and ft[0]["values"]["distill_l2"] < ft[0]["values"]["distill_l2_before"], ft


def _exports(srv: LiveServer, job_id: int) -> list[dict]:
    from sqlalchemy import select

    from bocompress.service.db.models import Trial
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session

    engine = make_engine(srv.database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            rows = s.execute(select(Trial).where(Trial.job_id == job_id, Trial.kind == "export")).scalars().all()
            return [{"params": r.params, "values": r.values, "state": r.state} for r in rows]
    finally:
        engine.dispose()
