"""Uploads of user models and datasets: model specs in ``arch`` (validated, never imported) and
datasets with integer or named inputs; a bad one is a 422 naming the field."""

from __future__ import annotations

import json

import httpx
import torch
from safetensors.torch import save

from tests.conftest import LiveServer
from tests.service.test_uploads import blob_count, good_weights

BERT = {"factory": "transformers:AutoModelForSequenceClassification.from_config",
        "config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}}


def _model(admin: httpx.Client, arch: str) -> httpx.Response:
    return admin.post("/api/v1/models", files={"file": ("w", good_weights())}, data={"arch": arch})


def _dataset(admin: httpx.Client, tensors: dict[str, torch.Tensor]) -> httpx.Response:
    return admin.post("/api/v1/datasets", files={"file": ("d", save(tensors))})


def test_model_spec_is_stored_and_returned(server: LiveServer, admin: httpx.Client) -> None:
    timm = {"factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"num_classes": 10}}
    for spec in (timm, BERT):
        r = _model(admin, json.dumps(spec))
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["arch"] == spec["factory"] and out["arch_spec"] == spec, out
        again = admin.get(f"/api/v1/models/{out['id']}").json()
        assert again["arch_spec"] == spec
    plain = _model(admin, "digits-cnn").json()
    assert plain["arch"] == "digits-cnn" and plain.get("arch_spec") is None


def test_bad_model_specs_are_422_naming_the_field(server: LiveServer, admin: httpx.Client) -> None:
    before = blob_count(server.database_url)
    cases = [
        ('{"factory": "timm:create_model",', "not valid JSON"),
        ('{"args": []}', "'factory'"),
        ('{"factory": "rm -rf /"}', "'factory'"),
        ('{"factory": "os:_exit"}', "private"),
        ('{"factory": "timm:create_model", "kwargs": {"not an identifier": 1}}', "'kwargs'"),
        ('{"factory": "timm:create_model", "code": "print(1)"}', "'code'"),
        ('{"factory": "x:y", "config": {"hidden_size": 3}}', "model_type"),
        ('{"factory": "x:y", "args": ' + "[" * 40 + "]" * 40 + "}", "nests deeper"),
        (json.dumps({"factory": "x:y", "kwargs": {"blob": "a" * 70_000}}), "at most"),
        ("[1, 2]", "arch"),
    ]
    for arch, word in cases:
        r = _model(admin, arch)
        assert r.status_code == 422, (arch[:60], r.text)
        detail = r.json()["detail"]
        assert detail.startswith("arch:") and word in detail, (arch[:60], detail)
    assert blob_count(server.database_url) == before


def test_datasets_with_token_ids_and_named_inputs(server: LiveServer, admin: httpx.Client) -> None:
    ids = torch.randint(0, 100, (8, 12))
    r = _dataset(admin, {"inputs": ids})
    assert r.status_code == 201, r.text
    r = _dataset(admin, {"input_ids": ids, "attention_mask": torch.ones(8, 12, dtype=torch.int64),
                         "labels": torch.zeros(8, dtype=torch.long)})
    assert r.status_code == 201, r.text
    assert r.json()["tensors"] == {"input_ids": [8, 12], "attention_mask": [8, 12], "labels": [8]}


def test_bad_datasets_are_422_naming_the_tensor(server: LiveServer, admin: httpx.Client) -> None:
    before = blob_count(server.database_url)
    ids = torch.randint(0, 100, (8, 12))
    cases = [
        ({"input_ids": ids, "attention_mask": torch.ones(7, 12)}, "disagree on N"),
        ({"inputs": ids, "attention_mask": torch.ones(8, 12)}, "one positional input"),
        ({"input_ids": ids, "labels": torch.zeros(9, dtype=torch.long)}, "'labels'"),
        ({"input_ids": ids, "labels": torch.zeros(8)}, "'labels'"),
        ({"inputs": torch.zeros(8)}, "'inputs' must be N x ..."),
        ({"labels": torch.zeros(8, dtype=torch.long)}, "needs a tensor named 'inputs'"),
        ({f"x{i}": torch.zeros(2, 1) for i in range(17)}, "at most 16"),
    ]
    for tensors, word in cases:
        r = _dataset(admin, tensors)
        assert r.status_code == 422, (sorted(tensors), r.text)
        assert r.json()["detail"].startswith("file:") and word in r.json()["detail"], r.json()
    r = admin.post("/api/v1/datasets", files={"file": ("d", save({"input-ids": ids}))})
    assert r.status_code == 422 and "identifier" in r.json()["detail"]
    assert blob_count(server.database_url) == before
