"""Models users bring, through the documented path: upload with a model spec, job, a real
``bocompress worker --allow-import``, export, download and ``load_compressed``.

* a HuggingFace BERT classifier (a small BertConfig, built by
  ``transformers:AutoModelForSequenceClassification.from_config``) on token ids with an attention
  mask, trained briefly on digits (each image as 16 grey-level tokens): svd and magnitude;
* a MobileNet-style net of the tests' own package (timm-style BatchNormAct2d, depthwise convs),
  built by ``tests.fixtures.mymodels:mobilenet`` with kwargs: channel_l1 and tucker2;
* refusals: an import path outside the allowed prefixes, a model whose forward raises a
  TypeError (fails on the first attempt), a job whose every trial fails.

Each export is checked against its trial: L of the downloaded model equals the trial's L. timm
itself is not tested here: it needs torchvision, which does not import beside this CPU torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bocompress
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import log_tail, save_state_dict, trials, wait_job, worker_process
from tests.e2e.test_parallel_workers import _worker_argv
from tests.fixtures.mymodels import bert_digits_config, mobilenet

pytest.importorskip("transformers")

ALLOWED = "transformers,tests.fixtures.mymodels"
BERT_SPEC = {"factory": "transformers:AutoModelForSequenceClassification.from_config", "config": bert_digits_config()}
N_CAL = 128


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    tmp = tmp_path_factory.mktemp("models")
    srv = start_server(f"sqlite:///{tmp / 'models.db'}", scheduler_interval=0.1)
    log = tmp / "worker.log"
    try:
        with worker_process(srv.url, srv.token("worker", "ops"), log, "--allow-import", ALLOWED,
                            command=_worker_argv(), env={"OMP_NUM_THREADS": "1"}):
            yield srv, log
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(live: tuple[LiveServer, Path]) -> bocompress.Client:
    return bocompress.Client(live[0].url, token=live[0].token("client", "alice"))


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _train(model: nn.Module, batches: Any, steps: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared CPU: one thread is several times faster
    try:
        model.train()
        for step in range(steps):
            out, y = batches(step)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    """A small BERT trained briefly on digits as tokens; its calibration inputs and labels."""
    from bocompress.modelspec import build_model

    x, y = _digits()
    grey = x.reshape(-1, 4, 2, 4, 2).sum((2, 4)).reshape(-1, 16) // 4  # 4x4 image, 17 grey levels
    tokens = torch.cat([torch.zeros(len(x), 1, dtype=torch.long), grey.long() + 1], dim=1)  # [CLS]=0, grey 1..17
    torch.manual_seed(0)
    model = build_model(json.dumps(BERT_SPEC), ["transformers"])
    g = torch.Generator().manual_seed(0)

    def batches(_: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x) - N_CAL, (64,), generator=g) + N_CAL
        return model(input_ids=tokens[idx], attention_mask=torch.ones_like(tokens[idx])).logits, y[idx]

    _train(model, batches, 600)
    cal = {"input_ids": tokens[:N_CAL], "attention_mask": torch.ones_like(tokens[:N_CAL])}
    with torch.no_grad():
        acc = (model(**cal).logits.argmax(1) == y[:N_CAL]).float().mean().item()
    assert acc > 0.5, acc  # it learned something: its outputs are worth distilling
    return model, cal, y[:N_CAL]


@pytest.fixture(scope="module")
def mnet() -> tuple[nn.Module, Tensor, Tensor]:
    x, y = _digits()
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = mobilenet(width=8)
    g = torch.Generator().manual_seed(0)

    def batches(_: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(N_CAL, len(x), (64,), generator=g)
        return model(x[idx]), y[idx]

    _train(model, batches, 200, lr=1e-2)
    return model, x[:N_CAL], y[:N_CAL]


def _job(client: bocompress.Client, name: str, model_id: str, data_id: str, method: Any, n: int = 4,
         engine: str = "sobol", **comp: Any) -> Any:
    spec = {"name": name,
            # no held-out share: L is then measured on every sample the test measures the export on
            "compression": {"model": model_id, "data": data_id, "method": method, "n_calibration": N_CAL,
                            "theta_min": 0.2, "holdout_fraction": 0.0, **comp},
            "objective": {"kind": "scalarized", "kappa": 1.0},
            "budget": {"max_trials": n, "max_parallel": 2},
            "optimizer": {"n_initial": n, "seed": 0, "engine": engine}}
    return client.create_job(spec)


def _relative_l2(out: Tensor, ref: Tensor) -> float:
    out, ref = out.double().flatten(1), ref.double().flatten(1)
    return float((out - ref).pow(2).sum(1).mean() / ref.pow(2).sum(1).mean())


def _export_and_check(client: bocompress.Client, job: Any, log: Path, tmp: Path, forward: Any,
                      allow: list[str], by: str = "distill_l2") -> tuple[nn.Module, dict[str, Any], Path]:
    """Export the best trial (lowest ``by``), download it, load it; its L equals the trial's L."""
    final = wait_job(client, job.id, timeout=300, log_path=log)
    assert final["state"] == "completed", (final, log_tail(log))
    # a trial may leave every layer dense (theta at or above break-even): export a compressed one
    done = [t for t in trials(client, job.id) if t["state"] == "completed" and t["values"]["ratio"] < 1.0]
    assert done, trials(client, job.id)
    best = min(done, key=lambda t: t["values"][by])
    job.export(best["id"], finetune_steps=0)
    path = job.download(best["id"], tmp / f"job{job.id}.safetensors", progress=False, poll=0.2, timeout=180)
    with pytest.raises(bocompress.BocompressError, match="allow_import"):
        bocompress.load_compressed(path)  # an import path is built only when the caller allows it
    model = bocompress.load_compressed(path, allow_import=allow)
    with torch.no_grad():
        l2 = _relative_l2(forward(model), forward(None))
    assert abs(l2 - best["values"]["distill_l2"]) <= 1e-5 * max(1.0, best["values"]["distill_l2"]), (
        l2, best["values"])
    # L may be 0 to float precision: least squares can rebuild a factorized layer exactly
    assert 0 <= best["values"]["distill_l2"] and best["values"]["ratio"] < 1.0
    assert best["values"]["eval_seconds"] == pytest.approx(
        best["values"]["apply_seconds"] + best["values"]["measure_seconds"])
    return model, best, path


@pytest.mark.parametrize("method", ["svd", "magnitude"])
def test_bert_token_ids(live: tuple[LiveServer, Path], client: bocompress.Client, bert: Any, method: str,
                        tmp_path: Path) -> None:
    original, cal, labels = bert
    model_id = client.upload_model(original, arch=BERT_SPEC)["id"]
    up = client.upload_dataset(cal, labels=labels)
    assert up["tensors"] == {"input_ids": [N_CAL, 17], "attention_mask": [N_CAL, 17], "labels": [N_CAL]}
    job = _job(client, f"bert-{method}", model_id, up["id"], method, output="logits")

    def forward(m: nn.Module | None) -> Tensor:
        return (m or original)(**cal).logits

    by = "ratio" if method == "magnitude" else "distill_l2"  # the sparsest one shows the file shrink
    model, best, path = _export_and_check(client, job, live[1], tmp_path, forward, ["transformers"], by=by)
    assert type(model).__name__ == "BertForSequenceClassification"
    names = [row["name"] for row in client._json("GET", f"/jobs/{job.id}")["layers"]]
    # every Linear: attention projections, MLPs, pooler and classifier
    assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.output.dense",
            "bert.encoder.layer.1.intermediate.dense", "classifier"} <= set(names), names
    if method == "magnitude":
        desc = bocompress.compressed.read_description(path)
        assert desc["sparse"]["tensors"], desc.get("sparse")
        from safetensors.torch import save

        dense_bytes = len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
        # mask (1 bit per weight) + nonzero values, against 4 bytes per weight dense (+ the description)
        assert path.stat().st_size < min(0.9, best["values"]["ratio"] + 0.2) * dense_bytes, (
            path.stat().st_size, dense_bytes, best["values"]["ratio"])
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        assert nonzero == pytest.approx(best["values"]["params"], rel=0.01)
        assert nonzero < sum(p.numel() for p in original.parameters())


def test_bert_channel_l1_leaves_attention_out(live: tuple[LiveServer, Path], client: bocompress.Client,
                                              bert: Any, tmp_path: Path) -> None:
    original, cal, labels = bert
    model_id = client.upload_model(original, arch=json.dumps(BERT_SPEC))["id"]
    data_id = client.upload_dataset(cal)["id"]
    job = _job(client, "bert-channel", model_id, data_id, "channel_l1", n=3)

    def forward(m: nn.Module | None) -> Tensor:
        return (m or original)(**cal).logits

    _export_and_check(client, job, live[1], tmp_path, forward, ["transformers"])
    names = [row["name"] for row in client._json("GET", f"/jobs/{job.id}")["layers"]]
    # the MLP neurons are searched; the attention projections are left out (heads stay whole)
    assert names and all("attention" not in n for n in names), names
    assert any("intermediate" in n for n in names), names


@pytest.mark.parametrize("method", ["channel_l1", "tucker2"])
def test_mobilenet_fused_bn_act(live: tuple[LiveServer, Path], client: bocompress.Client, mnet: Any,
                                method: str, tmp_path: Path) -> None:
    original, x, labels = mnet
    spec = {"factory": "tests.fixtures.mymodels:mobilenet", "kwargs": {"width": 8}}
    model_id = client.upload_model(original, arch=spec)["id"]
    data_id = client.upload_dataset(x, labels=labels)["id"]
    job = _job(client, f"mnet-{method}", model_id, data_id, method)

    def forward(m: nn.Module | None) -> Tensor:
        return (m or original)(x)

    model, best, _ = _export_and_check(client, job, live[1], tmp_path, forward, ["tests.fixtures"])
    assert "accuracy" in best["values"]
    if method == "channel_l1":
        from tests.fixtures.mymodels import BatchNormAct2d

        bns = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
        assert bns and any(b.num_features < o.num_features for b, o in
                           zip(bns, [m for m in original.modules() if isinstance(m, BatchNormAct2d)]))


def _profile_task(srv: LiveServer, job_id: int) -> Any:
    from sqlalchemy import select

    from bocompress.service.db.models import Trial
    from bocompress.service.db.session import make_engine, make_sessionmaker, read_session

    engine = make_engine(srv.database_url)
    try:
        with read_session(make_sessionmaker(engine)) as s:
            t = s.execute(select(Trial).where(Trial.job_id == job_id, Trial.kind == "profile")).scalar_one()
            return {"attempt": t.attempt, "state": t.state, "error": t.error}
    finally:
        engine.dispose()


def test_import_outside_allowed_prefixes_is_refused(live: tuple[LiveServer, Path], client: bocompress.Client,
                                                   tmp_path: Path) -> None:
    weights = save_state_dict({"weight": torch.zeros(3, 3)}, tmp_path / "w.safetensors")
    model_id = client.upload_model(weights, arch={"factory": "collections:OrderedDict"})["id"]
    data_id = client.upload_dataset(torch.zeros(16, 3))["id"]
    job = _job(client, "refused", model_id, data_id, "svd")
    final = wait_job(client, job.id, timeout=120, log_path=live[1])
    assert final["state"] == "failed", final
    assert "not allowed" in final["reason"] and "transformers, tests.fixtures.mymodels" in final["reason"], final
    assert _profile_task(live[0], job.id)["attempt"] == 1


def test_deterministic_profiling_error_fails_at_once(live: tuple[LiveServer, Path], client: bocompress.Client,
                                                    tmp_path: Path) -> None:
    from tests.fixtures.mymodels import broken_net

    model_id = client.upload_model(broken_net(), arch="tests.fixtures.mymodels:broken_net")["id"]
    data_id = client.upload_dataset(torch.randn(16, 64))["id"]
    job = _job(client, "broken", model_id, data_id, "svd")
    final = wait_job(client, job.id, timeout=120, log_path=live[1])
    assert final["state"] == "failed", final
    task = _profile_task(live[0], job.id)
    assert task["attempt"] == 1 and task["state"] == "failed", task
    assert task["error"].startswith("TypeError") and "last frames" in task["error"], task["error"]
    assert "mymodels/__init__.py" in task["error"]  # the frame where the model failed
    assert "TypeError" in final["reason"]


def test_job_whose_every_trial_fails_is_failed(live: tuple[LiveServer, Path], client: bocompress.Client) -> None:
    from tests.fixtures.mymodels import weight_reader

    model_id = client.upload_model(weight_reader(), arch="tests.fixtures.mymodels:weight_reader")["id"]
    data_id = client.upload_dataset(torch.randn(32, 64))["id"]
    # no sensitivity scan at profiling (it would compress the model there and fail the profile)
    # the uniform allocator's three points (R = 0.25, 0.5, 0.75) factorize the layer in every trial
    job = _job(client, "all-fail", model_id, data_id, "svd", n=3, engine="uniform", sensitivity=False)
    final = wait_job(client, job.id, timeout=120, log_path=live[1])
    assert final["state"] == "failed", (final, trials(client, job.id))
    assert final["reason"].startswith("every trial failed (3 of 3: AttributeError"), final["reason"]
    ts = trials(client, job.id)
    assert [t["attempt"] for t in ts] == [1, 1, 1] and all(t["state"] == "failed" for t in ts)
