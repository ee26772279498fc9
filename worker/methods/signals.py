"""What a profile carries per layer besides its cost forms: the break-even bound and the signals.

:func:`break_even` finds where a factorized layer stops saving (the SearchParam's ``high``);
:func:`importance_curves` and :func:`signals_dict` give the energy and LAMP curves over
:func:`signal_grid` that the one-shot allocators (``bocompress.service.optimizer.allocators``) read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bocompress.costs import kept

__all__ = ["break_even", "importance_curves", "signal_grid", "signals_dict"]


def break_even(
    sizes: Sequence[int],
    cost: Callable[[tuple[int, ...]], tuple[float, float]],
    dense: tuple[float, float],
    theta_min: float,
    rule: str = "params",
) -> tuple[float, dict[str, bool]] | str:
    """Where a factorized layer stops saving, for a search range of [theta_min, 1] ("leave it dense").

    The layer's ranks are ``kept(theta, s)`` for each ``s`` in ``sizes``. It is factorized only
    where that is cheaper than the dense layer in the ``rule`` cost (the job's cost kind:
    ``params`` or ``flops``), and left dense from there on (costs grow with the ranks, so the
    dense thetas are ``[dense_from, 1]``). The ``rule`` form ``min(terms, cap=dense)`` is then
    exact for every theta. The other kind's capped form is exact too whenever, for every rank
    tuple, "cheaper in params" and "cheaper in flops" agree (true when a layer's input and output
    spatial sizes agree); where they do not (a strided k x k conv under tucker2), the other kind
    is exact outside a narrow band of theta below the break-even, and ``exact[kind]`` says so.

    Args:
        sizes: the counts theta multiplies (e.g. ``[c_in, c_out]``).
        cost: rank tuple -> ``(params, flops)`` of the factorized layer.
        dense: ``(params, flops)`` of the dense layer.
        theta_min: the lowest theta searched.
        rule: ``params`` or ``flops``: which cost decides "cheaper".

    Returns:
        ``(dense_from, exact)``: the smallest theta at which the layer is left dense (a rank
        breakpoint; 1.0 when only full rank is) and ``{"params": bool, "flops": bool}``, whether
        each capped form is exact for every theta. A string (the reason) when the factorization
        saves nothing at theta_min.
    """
    d = 1 if rule == "flops" else 0

    def ranks(theta: float) -> tuple[int, ...]:
        return tuple(kept(theta, s) for s in sizes)

    def cheap(r: tuple[int, ...]) -> bool:
        return cost(r)[d] < dense[d]

    # Every rank tuple reachable: at 0, 1, each breakpoint and between consecutive breakpoints.
    bps = sorted({(j + 0.5) / s for s in sizes for j in range(1, s)})
    probes = [0.0, 1.0, *bps] + [(a + b) / 2 for a, b in zip(bps, bps[1:])]
    exact = {"params": True, "flops": True}
    for t in probes:
        r = ranks(t)
        c = cost(r)
        is_cheap = cheap(r)
        for i, kind in enumerate(("params", "flops")):
            actual = c[i] if is_cheap else dense[i]
            if min(c[i], dense[i]) != actual:
                exact[kind] = False
    if not cheap(ranks(theta_min)):
        return f"the factorization is no cheaper ({rule}) than the dense layer even at theta_min={theta_min}"
    # ranks just past a breakpoint (a breakpoint itself may round either way in floating point)
    dense_from = next((b for b in bps if b > theta_min and not cheap(ranks(b + 1e-12))), 1.0)
    return float(min(dense_from, 1.0)), exact


def signal_grid(theta_min: float, points: int = 33) -> list[float]:
    """The theta grid of the allocator signals: ``points`` evenly spaced values in [theta_min, 1], ending at 1.0."""
    k = points - 1
    grid = [theta_min + (1.0 - theta_min) * i / k for i in range(k)] + [1.0]
    return [float(x) for x in grid]


def importance_curves(values_desc: Tensor, kept_counts: Sequence[int]) -> tuple[list[float], list[float]]:
    """Energy kept and the LAMP score of the first unit removed, for several kept counts.

    Args:
        values_desc: ``n`` non-negative unit importances (sigma^2, w^2, a group score), largest first.
        kept_counts: how many of the largest units are kept, one per grid point (``n``: all).

    Returns:
        ``(energy, lamp)``: ``energy[k] = sum(v[:c]) / sum(v)`` (1.0 when ``c = n``) and
        ``lamp[k] = v[c] / sum(v[:c + 1])`` (LAMP, Lee et al. 2021: a unit's importance relative to
        every unit at least as important; 0.0 when nothing is removed). Made monotone over the
        grid (energy non-decreasing, lamp non-increasing) against float rounding.
    """
    v = values_desc.detach().to("cpu", torch.float64).clamp_min(0).flatten()
    n = v.numel()
    csum = torch.cumsum(v, 0)
    total = float(csum[-1]) if n else 0.0
    energy, lamp = [], []
    for c in kept_counts:
        c = int(min(max(c, 0), n))
        if c >= n:
            energy.append(1.0)
            lamp.append(0.0)
            continue
        energy.append(float(csum[c - 1]) / total if c > 0 and total > 0 else 0.0)
        denom = float(csum[c])
        lamp.append(float(v[c]) / denom if denom > 0 else 0.0)
    for i in range(1, len(energy)):
        energy[i] = max(energy[i], energy[i - 1])
        lamp[i] = min(lamp[i], lamp[i - 1])
    return energy, lamp


def signals_dict(grid: Sequence[float], energy: Sequence[float], lamp: Sequence[float]) -> dict[str, list[float]]:
    """A LayerSignals dict; the last point (theta = 1) keeps everything: energy 1, lamp 0."""
    e, s = [float(x) for x in energy], [float(x) for x in lamp]
    e[-1], s[-1] = 1.0, 0.0
    return {"grid": [float(t) for t in grid], "energy": e, "lamp": s}
