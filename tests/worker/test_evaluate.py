"""Evaluation: relative distillation error with its standard error, measured vs exact cost ratio."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from bocompress.worker.evaluate import evaluate, teacher_outputs
from bocompress.worker.methods import CostMismatch, build_compressor
from bocompress.worker.zoo import load_data, load_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def setup() -> dict:
    model = load_model("digits-cnn")
    x, y = load_data("digits", 256)
    teacher = teacher_outputs(model, x, batch_size=128)
    comp = build_compressor(model, "svd", ["*"], 0.05, x[:8])
    return {"model": model, "x": x, "y": y, "teacher": teacher, "svd": comp}


def _scaled(comp, s: float) -> dict[str, float]:
    """Every layer's theta at ``s`` times its break-even (s = 1: dense)."""
    return {p["name"]: max(p["low"], s * p["high"]) for p in comp.profile()["params"]}


def test_full_rank_has_zero_error(setup: dict) -> None:
    comp = setup["svd"]
    theta = _scaled(comp, 1.0)
    res = evaluate(comp, comp.apply(theta), setup["x"], setup["teacher"], setup["y"], theta, check_all=True)
    v = res["values"]
    assert v["distill_l2"] < 1e-10 and res["sem"]["distill_l2"] < 1e-10
    assert v["ratio"] == pytest.approx(1.0) and v["ratio_exact"] == pytest.approx(1.0)
    assert v["accuracy"] == v["accuracy_original"] >= 0.97
    for key in ("params", "flops", "ratio_params", "ratio_flops", "eval_seconds"):
        assert key in v


def test_tucker2_at_full_rank_has_zero_error(setup: dict) -> None:
    comp = build_compressor(setup["model"], "tucker2", ["*"], 0.05, setup["x"][:8])
    theta = {p["name"]: 1.0 for p in comp.profile()["params"]}
    res = evaluate(comp, comp.apply(theta), setup["x"], setup["teacher"], None, theta)
    assert res["values"]["distill_l2"] < 1e-10 and "accuracy" not in res["values"]


def test_error_grows_as_theta_shrinks(setup: dict) -> None:
    comp = setup["svd"]
    errors, ratios = [], []
    for s in (0.9, 0.5, 0.2):
        theta = _scaled(comp, s)
        res = evaluate(comp, comp.apply(theta), setup["x"], setup["teacher"], setup["y"], theta)
        errors.append(res["values"]["distill_l2"])
        ratios.append(res["values"]["ratio"])
        assert res["sem"]["distill_l2"] > 0
        assert res["sem"]["distill_l2"] < res["values"]["distill_l2"]
    assert errors[0] < errors[1] < errors[2]
    assert ratios[0] > ratios[1] > ratios[2]


@pytest.mark.parametrize("device", DEVICES)
def test_flops_cost_and_device(setup: dict, device: str) -> None:
    comp = build_compressor(setup["model"], "magnitude", ["*"], 0.05, setup["x"][:8])
    theta = {p["name"]: 0.3 for p in comp.profile()["params"]}
    teacher = teacher_outputs(copy.deepcopy(setup["model"]), setup["x"], device=device)
    res = evaluate(comp, comp.apply(theta), setup["x"], teacher, setup["y"], theta, cost_kind="flops", device=device)
    v = res["values"]
    assert v["ratio"] == pytest.approx(v["ratio_exact"], rel=1e-9)
    assert v["ratio_params"] < 0.35 and v["distill_l2"] > 0


def test_cost_mismatch_is_loud(setup: dict) -> None:
    comp = setup["svd"]
    small = _scaled(comp, 0.2)
    with pytest.raises(CostMismatch, match=r"measured ratio 0\.\d+ vs exact ratio from the profile 1\.0"):
        evaluate(comp, comp.apply(small), setup["x"], setup["teacher"], setup["y"], _scaled(comp, 1.0))


def test_benchmark_apply_and_evaluate_vs_forward(setup: dict) -> None:
    """What a trial measures is what a bare forward pass of the compressed model gives, and the
    trial's ``eval_seconds`` is the time evaluate took; prints the costs side by side (no speed bound)."""
    x, teacher, y = setup["x"], setup["teacher"], setup["y"]
    for method in ("svd", "tucker2", "magnitude"):
        comp = setup["svd"] if method == "svd" else build_compressor(setup["model"], method, ["*"], 0.05, x[:8])
        theta = _scaled(comp, 0.5)
        t0 = time.perf_counter()
        compressed = comp.apply(theta)
        t1 = time.perf_counter()
        res = evaluate(comp, compressed, x, teacher, y, theta)
        t2 = time.perf_counter()
        with torch.no_grad():
            out = compressed.eval()(x)
        t3 = time.perf_counter()
        v = res["values"]
        err = (out.double() - teacher.double()).pow(2).sum(1)
        assert v["distill_l2"] == pytest.approx(float(err.mean()) / float(teacher.double().pow(2).sum(1).mean()), rel=1e-6)
        assert v["distill_l2"] > 0  # theta at half the break-even compresses every layer
        assert v["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
        assert 0 < v["eval_seconds"] <= t2 - t1
        print(f"\n[bench] {method:9s} over {len(x)} digits: apply {1e3 * (t1 - t0):.1f} ms, "
              f"evaluate {1e3 * (t2 - t1):.1f} ms, bare forward {1e3 * (t3 - t2):.1f} ms")
