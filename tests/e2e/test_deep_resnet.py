"""A trained ResNet-20 through the whole product: a constrained job at R <= 0.5 keeps the function,
and a job whose outputs collapsed says so.

The model is the zoo's ``resnet20`` (trained here on digits upsampled to 3x32x32, 99.6% on the 450
held-out digits). The search calibrates on the training digits (``digits32-train``); the exported,
fine-tuned model is judged on the 450 held-out digits (``digits32``), which no part of the search
or the fine-tune ever sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bocompress
from tests.conftest import LiveServer, start_server
from tests.e2e.helpers import wait_job, worker_process
from bocompress.worker.zoo import load_data, load_model

#: The fixed short fine-tune every exported model gets (distillation on the calibration inputs).
FINETUNE_STEPS = 100


@pytest.fixture
def deep_server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = start_server(f"sqlite:///{tmp_path / 'deep.db'}", scheduler_interval=0.1)
    yield srv
    srv.stop()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def _spec(name: str, method: object, trials: int, engine: str = "auto", **compression: object) -> dict:
    return {"name": name,
            "compression": {"model": "resnet20", "data": "digits32-train", "method": method,
                            "n_calibration": 256, "sensitivity": False, **compression},
            "objective": {"kind": "constrained", "budget": 0.5, "cost": "params"},
            "budget": {"max_trials": trials, "max_parallel": 1},
            "optimizer": {"n_initial": trials, "seed": 0, "engine": engine}}


def test_trained_resnet_at_half_size_keeps_its_accuracy_and_a_collapse_is_flagged(
        deep_server: LiveServer, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    client = bocompress.Client(deep_server.url, token=deep_server.token("client", "alice"))
    x_test, y_test = load_data("digits32", 450)
    original = _accuracy(load_model("resnet20"), x_test, y_test)
    log = tmp_path / "w.log"
    with worker_process(deep_server.url, deep_server.token("worker", "ops"), log):
        job = client.create_job(_spec("resnet20-half", {"Conv2d": "tucker2", "Linear": "svd"}, 5))
        done = wait_job(client, job.id, timeout=600, log_path=log)
        assert done["state"] == "completed", done
        assert done["collapsed"] is False and done["warnings"] == [], done["warnings"]
        best = done["best"]
        assert best["values"]["ratio"] <= 0.5
        job.export(best["id"], finetune_steps=FINETUNE_STEPS, lr=1e-4)
        path = job.download(best["id"], tmp_path / "half.safetensors", progress=False, poll=0.5, timeout=600)
        small = bocompress.load_compressed(path)
        n_small = sum(p.numel() for p in small.parameters())
        n_full = sum(p.numel() for p in load_model("resnet20").parameters())
        assert n_small <= 0.5 * n_full + 1, (n_small, n_full)
        acc = _accuracy(small, x_test, y_test)
        print(f"resnet20 R={best['values']['ratio']:.3f} L={best['values']['distill_l2']:.4f} "
              f"held-out accuracy {acc:.4f} after {FINETUNE_STEPS} fine-tune steps (original {original:.4f})")
        assert acc >= original - 0.05, (acc, original, best["values"])

        # the same network, pruned to half its channels with every repair turned off: its outputs
        # collapse, and the job says so instead of reporting a success
        bad = client.create_job(_spec("resnet20-collapsed", "channel_l1", 1, engine="uniform",
                                      bn_recalibrate=False, ls_correction=False))
        gone = wait_job(client, bad.id, timeout=600, log_path=log)
        assert gone["state"] == "completed", gone
        assert gone["best"]["values"]["distill_l2"] >= 0.9 or \
            gone["best"]["values"]["accuracy"] <= 0.2, gone["best"]["values"]
        print(f"collapsed job: L={gone['best']['values']['distill_l2']:.3f} warnings={gone['warnings']}")
        assert gone["collapsed"] is True and any("collapsed" in w for w in gone["warnings"]), gone["warnings"]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            client.get_job(bad.id).best()
        assert any(issubclass(w.category, bocompress.CollapseWarning) for w in seen)
