"""Transformer layers and user models on the worker side: HF Conv1D (GPT-2), nn.MultiheadAttention,
exports of model specs that round-trip, and the errors a user reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bocompress
from bocompress.compressed import read_description, save_compressed
from bocompress.modelspec import ModelSpecError, build_model, parse_arch
from bocompress.worker import batch as B
from bocompress.worker.layers import attention_layers, linearize_conv1d
from bocompress.worker.failures import MAX_ERROR_CHARS, deterministic, error_text
from bocompress.worker.methods import build_compressor

GPT2 = {"factory": "transformers:GPT2LMHeadModel",
        "config": {"model_type": "gpt2", "vocab_size": 40, "n_positions": 16, "n_embd": 32, "n_layer": 1,
                   "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}


def test_gpt2_conv1d_is_compressed_by_svd_and_round_trips(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    spec = parse_arch(json.dumps(GPT2))
    model = build_model(spec, ["transformers"]).eval()
    ids = {"input_ids": torch.randint(0, 40, (8, 16))}
    with torch.no_grad():
        before = B.forward(model, ids)
    names = linearize_conv1d(model)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(names), names
    with torch.no_grad():
        after = B.forward(model, ids)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    comp = build_compressor(model, "svd", ["transformer.*"], 0.1, B.head(ids, 4))
    planned = [row["name"] for row in comp.profile()["layers"]]
    assert set(names) <= set(planned), planned
    theta = {p["name"]: 0.25 for p in comp.profile()["params"]}
    small = comp.apply(theta).eval()
    path = tmp_path / "gpt2.safetensors"
    save_compressed(path, model, small, spec, {"linearized": names})
    desc = read_description(path)
    assert desc["arch"] == GPT2["factory"] and desc["arch_spec"] == GPT2 and desc["linearized"] == names
    loaded = bocompress.load_compressed(path, allow_import=["transformers"])
    with torch.no_grad():
        assert torch.equal(B.forward(loaded, ids), B.forward(small, ids))


def test_multihead_attention_out_proj_is_skipped_with_a_reason() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(8, 5, 16)
    comp = build_compressor(net, "svd", ["*"], 0.1, x)
    assert [row["name"] for row in comp.profile()["layers"]] == ["head"]
    assert "never runs" in comp.profile()["model_info"]["skipped"]["attn.out_proj"]
    assert "attn.out_proj" in attention_layers(net)  # channel pruning leaves it alone too
    out = comp.apply({p["name"]: 0.3 for p in comp.profile()["params"]})
    assert out(x).shape == (8, 4)


def test_factories_are_imported_only_under_allowed_prefixes() -> None:
    with pytest.raises(ModelSpecError, match=r"allowed prefixes: mypkg, timm\); allow it"):
        build_model('{"factory": "collections:OrderedDict"}', ["mypkg", "timm"], "allow it")
    with pytest.raises(ModelSpecError, match="allowed prefixes: none"):
        build_model("tests.fixtures.mymodels:mobilenet", [])
    m = build_model('{"factory": "tests.fixtures.mymodels:mobilenet", "kwargs": {"width": 4}, "input_shape": [1, 8, 8]}',
                    ["tests.fixtures.mymodels"])
    assert m.conv_stem.out_channels == 4 and m.input_shape == (1, 8, 8)
    with pytest.raises(ModelSpecError, match="factory 'tests.fixtures.mymodels:mobilenet' failed: TypeError"):
        build_model('{"factory": "tests.fixtures.mymodels:mobilenet", "kwargs": {"depth": 3}}', ["tests"])


def test_load_compressed_asks_before_importing(tmp_path: Path) -> None:
    from tests.fixtures.mymodels import mobilenet

    spec = {"factory": "tests.fixtures.mymodels:mobilenet", "kwargs": {"width": 4}}
    net = mobilenet(width=4).eval()
    path = tmp_path / "m.safetensors"
    save_compressed(path, net, net, spec)
    with pytest.raises(bocompress.BocompressError, match=r"allow_import=\['tests'\]"):
        bocompress.load_compressed(path)
    with pytest.raises(bocompress.BocompressError, match="not allowed"):
        bocompress.load_compressed(path, allow_import=["timm"])
    loaded = bocompress.load_compressed(path, allow_import=["tests.fixtures"])
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), net(x))


def _nested_failure() -> None:
    def inner() -> None:
        torch.zeros(2, 3) @ torch.zeros(4, 5)

    inner()


def test_stored_errors_keep_the_last_frames_and_deterministic_ones_are_not_retried() -> None:
    try:
        _nested_failure()
    except RuntimeError as exc:
        text = error_text(exc)
        assert deterministic(exc)
    first, *rest = text.splitlines()
    assert first.startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied"), first
    assert "last frames" in text and "in inner" in text and "test_user_models.py" in text
    try:
        raise ValueError("x" * 50_000)
    except ValueError as exc:
        assert len(error_text(exc)) <= MAX_ERROR_CHARS
    assert not deterministic(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not deterministic(RuntimeError("transient failure"))
    assert not deterministic(ConnectionResetError("peer"))
    assert deterministic(TypeError("forward() takes 2 positional arguments but 3 were given"))
    assert deterministic(RuntimeError("Expected tensor for argument #1 'indices' to have one of the following "
                                      "scalar types: Long, Int; but got torch.FloatTensor instead"))


def test_timm_model_where_timm_imports(tmp_path: Path) -> None:
    """A timm MobileNetV3 (BatchNormAct2d, depthwise convs) under channel_l1, exported and reloaded.

    Skipped where timm does not import (here: it needs torchvision, whose PyPI build does not import
    beside the CPU torch); the same path is covered by tests/fixtures/mymodels in tests/e2e.
    """
    pytest.importorskip("timm")
    spec = parse_arch({"factory": "timm:create_model", "args": ["mobilenetv3_small_050"],
                       "kwargs": {"num_classes": 10, "pretrained": False}})
    torch.manual_seed(0)
    model = build_model(spec, ["timm"]).eval()
    x = torch.randn(4, 3, 64, 64)
    comp = build_compressor(model, "channel_l1", ["*"], 0.3, x)
    theta = {p["name"]: 0.5 for p in comp.profile()["params"]}
    small = comp.apply(theta).eval()
    path = tmp_path / "timm.safetensors"
    save_compressed(path, model, small, spec)
    loaded = bocompress.load_compressed(path, allow_import=["timm"])
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
