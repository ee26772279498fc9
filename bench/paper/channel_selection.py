"""Study 3 (He, Zhang, Sun, ICCV 2017): channel selection at equal keep-ratio, without fine-tuning.

Selection rules, each with and without the least-squares reconstruction of the kept weights against
the original network's outputs (the layers pruned one after another in forward order, as in the
paper and in the product's ``channel_lasso``):

- ``lasso``: the non-negative LASSO on the channel-selection vector (the paper's; the product's
  ``channel_lasso``);
- ``max response``: the input channels with the largest ``sum |w|`` of the consumer (Li et al.'s L1);
- ``first k``: input channels ``0 .. k-1``.

**Layer by layer**: each searchable convolution of ResNet-20 alone at keep-ratio 0.25 (the others
dense); the whole network's L and held-out accuracy. **Whole network**: every searchable layer at the
same keep-ratio (0.5, 0.3, 0.15). BatchNorm statistics are not re-estimated (the paper's setting: no
repair but the reconstruction); the whole-network rows are also given with BN re-estimation, the
product's default.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from bench.paper.common import log
from bocompress.costs import ratio
from bench.quality_cells import Cell, _outputs
from bocompress.worker.methods.channel_select import select_max_response, select_first_k
from bocompress.worker.methods.lsq import refit

MODEL = "resnet20"
RULES = ("lasso", "max response", "first k")


def _rule(comp: Any, rule: str, reconstruct: bool) -> None:
    """Make ``comp`` (a channel_lasso compressor) select by ``rule``, refitting or not."""
    base = type(comp).select_and_fit

    def select_and_fit(stats: Any, conv: nn.Module, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if rule == "lasso":
            keep = base(comp, stats, conv, k)[0]
        elif rule == "max response":
            keep = select_max_response(conv.weight, k)
        else:
            keep = select_first_k(conv.weight, k)
        if reconstruct:
            w, bias = refit(stats, keep, conv.bias is not None)
            return keep, w, bias
        w = conv.weight.detach()[:, keep.to(conv.weight.device)].reshape(conv.out_channels, -1)
        return keep, w, (conv.bias.detach() if conv.bias is not None else None)

    comp.select_and_fit = select_and_fit


def _measure(cell: Cell, theta: dict[str, float], bn: bool, teacher_test: Tensor) -> dict[str, float]:
    """L on the calibration inputs (what the least squares were fitted on), L on the held-out inputs
    (not fitted on), and held-out accuracy."""
    m = cell._build(theta, bn)
    out = _outputs(m, cell.x_test).double()
    L_test = float((out - teacher_test).pow(2).sum(1).mean() / teacher_test.pow(2).sum(1).mean())
    return {"L": cell._l(m)[0], "L_heldout": L_test, "acc": float((out.argmax(1) == cell.y_test).double().mean())}


def run(keep_ratios: tuple[float, ...] = (0.5, 0.3, 0.15), layer_keep: float = 0.25) -> dict[str, Any]:
    cell = Cell(MODEL, "channel_lasso", 1.0, bn=False, spec="channel_lasso")
    teacher_test = _outputs(cell.model, cell.x_test).double()
    names = [p["name"] for p in cell.params]
    dense = {n: 1.0 for n in names}
    layer_rows, net_rows = [], []
    for reconstruct in (True, False):
        for rule in RULES:
            _rule(cell.comp, rule, reconstruct)
            tag = {"rule": rule, "least_squares": reconstruct}
            t0 = time.perf_counter()
            for n in names:
                layer_rows.append({**tag, "layer": n, "keep": layer_keep, **_measure(cell, {**dense, n: layer_keep}, False, teacher_test)})
            for r in keep_ratios:
                th = {n: r for n in names}
                for bn in (False, True):
                    net_rows.append({**tag, "keep": r, "bn": bn, "R": ratio(cell.profile, th, "params"), **_measure(cell, th, bn, teacher_test)})
            log(f"  channel selection {rule} (least squares {reconstruct}): {time.perf_counter() - t0:.0f} s")
    return {"model": MODEL, "layers": names, "layer_rows": layer_rows, "net_rows": net_rows,
            "acc_original": cell.acc_original, "n_calibration": len(cell.x_cal)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
