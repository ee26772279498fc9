"""bench/paper on the smallest zoo model: the studies' code runs and the page states each claim's verdict.

Not a benchmark (the numbers are from 3-trial searches): it keeps ``python -m bench.paper`` working.
"""

from __future__ import annotations

import torch

from bench.paper import channel_selection, report, two_pass
from bench.quality_cells import Cell


def test_two_pass_study_meets_the_total_budget_and_renders(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    res = two_pass.run(budgets=(0.25,), seeds=1, trials=3)
    res["seconds"] = 1.0
    rows = {r["recipe"]: r for r in res["rows"]}
    assert set(rows) == {"one pass", "one pass, 2x fine-tune", "two passes"}
    for r in rows.values():
        assert 0 < r["R"] <= 0.25 + 1e-9  # both recipes at the same total budget of the original's parameters
        assert 0.0 <= r["acc_after"] <= 1.0 and r["L"] >= 0
    assert rows["two passes"]["R_conv_pass"] > rows["two passes"]["R"]  # the conv pass leaves the linear layers dense
    monkeypatch.setattr(report, "PAGE", tmp_path / "results.md")
    monkeypatch.setattr(report, "DOCS", tmp_path)
    page = report.write({"two_pass": res}).read_text()
    assert "The two-pass recipe" in page and "| 0.25 | two passes |" in page
    assert "_per_layer: not run yet" in page  # a study without results is said, not invented


def test_the_selection_rules_replace_only_the_selection() -> None:
    """The LASSO rule with least squares is the product's channel_lasso; first k keeps channels 0..k-1."""
    cell = Cell("resnet20", "channel_lasso", 1.0, bn=False, spec="channel_lasso")
    name = cell.params[0]["name"]
    theta = {p["name"]: 1.0 for p in cell.params} | {name: 0.5}
    product = cell.comp.apply_with_selection(theta)[1][name]
    channel_selection._rule(cell.comp, "lasso", True)
    assert torch.equal(cell.comp.apply_with_selection(theta)[1][name], product)
    channel_selection._rule(cell.comp, "first k", False)
    kept = cell.comp.apply_with_selection(theta)[1][name]
    assert torch.equal(kept, torch.arange(kept.numel()))
