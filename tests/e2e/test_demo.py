"""``bocompress demo``: the service and a worker as subprocesses, a real job, the printed report."""

from __future__ import annotations

import os
import re
import time

import pytest

from bocompress.demo import MAX_RATIO, run_demo


@pytest.mark.slow
def test_demo_meets_its_bar_and_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    result = run_demo(trials=24, workers=1, progress=False)  # what `make demo` runs
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert "layer" in out and "theta" in out and "kept (rank or channels)" in out
    for layer in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert re.search(rf"^{layer}\s+(Conv2d|Linear)\s+(tucker2|svd)\s", out, re.M), out
    m = re.search(r"^R \(cost ratio, params\) = ([0-9.]+)", out, re.M)
    assert m and float(m.group(1)) <= MAX_RATIO, out
    acc = re.search(r"^accuracy = ([0-9.]+)% \(original ([0-9.]+)%", out, re.M)
    assert acc and float(acc.group(1)) >= float(acc.group(2)) - 2.0, out
    assert "Pareto set" in out and "demo passed" in out
    assert result.ratio <= MAX_RATIO and result.accuracy >= result.accuracy_original - 0.02
    assert not os.path.exists(result.workdir), "the temporary directory must be deleted"
    assert elapsed < 240, f"the demo took {elapsed:.0f} s"
