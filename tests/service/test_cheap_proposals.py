"""Cheap proposals (service/optimizer/cheap.py): in the box, on the grid, deterministic, near the incumbent."""

from __future__ import annotations

import pytest

from bocompress.costs import kept
from bocompress.service.optimizer.cheap import halton, propose_cheap
from bocompress.spec import JobSpec

GENERIC = [{"name": "a", "type": "float", "low": -5.0, "high": 10.0},
           {"name": "n", "type": "int", "low": 1, "high": 100, "log": True},
           {"name": "lr", "type": "float", "low": 1e-4, "high": 1.0, "log": True},
           {"name": "k", "type": "int", "low": 0, "high": 3}]
LAYERS = [{"name": "fc0", "low": 0.05, "high": 1.0, "size": 16}, {"name": "fc1", "low": 0.3, "high": 0.5, "size": 7}]


def test_halton_points_fill_the_cube_without_repeats() -> None:
    pts = [tuple(halton(i, 3, seed=1)) for i in range(200)]
    assert len(set(pts)) == 200 and all(0.0 <= u < 1.0 for p in pts for u in p)
    assert halton(5, 3, seed=1) == halton(5, 3, seed=1) != halton(5, 3, seed=2)
    # each coordinate's first 64 points hit every eighth of the interval
    for j in range(3):
        assert {int(8 * p[j]) for p in pts[:64]} == set(range(8))


@pytest.mark.parametrize("strategy", ["quasirandom", "perturb", "auto"])
def test_points_are_in_the_box_and_typed(strategy: str) -> None:
    inc = {"a": 9.9, "n": 50.0, "lr": 1e-4, "k": 3.0}
    for i in range(100):
        p = propose_cheap(GENERIC, False, inc, i, seed=0, strategy=strategy)
        assert set(p) == {"a", "n", "lr", "k"}
        assert -5.0 <= p["a"] <= 10.0 and 1e-4 <= p["lr"] <= 1.0
        assert p["n"] == int(p["n"]) and 1 <= p["n"] <= 100 and p["k"] in (0.0, 1.0, 2.0, 3.0)


def test_compression_points_sit_on_the_kept_count_grid() -> None:
    for i in range(50):
        p = propose_cheap(LAYERS, True, {"fc0": 0.5, "fc1": 3 / 7} if i % 2 else None, i, seed=3)
        for spec in LAYERS:
            theta, size = p[spec["name"]], spec["size"]
            assert spec["low"] - 1e-9 <= theta <= spec["high"] + 1e-9
            assert abs(theta * size - round(theta * size)) < 1e-9 and kept(theta, size) == round(theta * size)


def test_a_perturbation_stays_near_the_incumbent_and_is_reproducible() -> None:
    inc = {"a": 2.5, "n": 10.0, "lr": 0.01, "k": 1.0}
    pts = [propose_cheap(GENERIC, False, inc, i, seed=0, strategy="perturb") for i in range(200)]
    far = sum(abs(p["a"] - 2.5) > 0.3 * 15.0 for p in pts)  # 3 sigma of the unit range
    assert far <= 2
    assert pts[7] == propose_cheap(GENERIC, False, inc, 7, seed=0, strategy="perturb")
    assert propose_cheap(GENERIC, False, None, 7, seed=0, strategy="auto") == propose_cheap(
        GENERIC, False, None, 7, seed=0, strategy="quasirandom")  # no incumbent yet: quasi-random
    with pytest.raises(ValueError, match="strategy"):
        propose_cheap(GENERIC, False, inc, 0, strategy="thompson")


def test_the_buffer_is_kept_deeper_than_its_active_consumers() -> None:
    spec = JobSpec.of({"budget": {"max_trials": 240, "max_parallel": 16}})
    assert spec.buffer_target(0) == 16 and spec.buffer_target(16) == 18 and spec.buffer_target(64) == 66
    assert spec.buffer_need(0, 0) == 16 and spec.buffer_need(0, 0, active=64) == 66
    assert spec.buffer_need(10, 230, active=64) == 10  # never past max_trials
    assert spec.needs_refill(15, 10, active=16)  # 3 free slots with 16 consumers: refilled before it runs dry
    assert not spec.needs_refill(16, 10)
    assert spec.engine_batch(66) == 16 and spec.engine_batch(3) == 3
