"""Outcome transforms of generic jobs, chosen from the data (as Ax's ``Y`` transforms).

A stationary GP with a Gaussian likelihood fits a metric with a long bad tail poorly: Rosenbrock's or
Powell's values span five orders of magnitude over a box, so the few points near the optimum look
alike to a GP standardized by the tail's spread, and its posterior there is flat. A monotone
transform of the metric keeps the order of the points (the incumbent and the acquisition's target
stay the same points) while making the modelled values closer to Gaussian.

The transforms (``Problem.options["transform"]``):

- ``none``: the metric as reported (then winsorized at the Tukey fence, as before);
- ``power``: Yeo-Johnson (as Ax's ``PowerTransformY`` and HEBO), its ``lambda`` fitted by maximum
  likelihood on the robustly scaled metric; close to a log for a heavy tail, the identity for
  Gaussian-looking data;
- ``log``: ``log(f - min f + eps)`` of the minimized metric ``f`` (eps: a tenth of the gap from
  the best to the second-best tenth of the values); the strongest, for tails over many decades;
- ``rank``: normal scores of the ranks (a Gaussian copula, as in HEBO's and SMAC's warpings); it
  forgets magnitudes entirely;
- ``auto`` (the default for generic jobs): ``power`` when the data reject the identity for a
  heavy bad tail: at least :data:`AUTO_MIN_N` points, the maximum-likelihood ``lambda`` below 1
  (a concave transform of the minimized metric: its bad tail compressed), and the likelihood-ratio
  statistic against ``lambda = 1`` at least :data:`LR_MIN` (a 5 % test); else ``none``. A metric
  whose values look Gaussian, or whose long tail is the good one (Hartmann's deep minima), is
  modelled as before, exactly.

``lambda`` is kept in ``[-2, 1]``: a transform never stretches the bad tail nor squeezes the good
one, where the information about the optimum is.

Every transform here is written for ``Y`` larger-is-better (``training_data``'s convention): the bad
tail is ``Y``'s lower tail.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TRANSFORMS = ("auto", "none", "power", "log", "rank")
#: ``auto`` transforms when the likelihood-ratio statistic of the fitted ``lambda`` against the
#: identity is at least this (the 95 % quantile of chi-square with 1 degree of freedom).
LR_MIN = 3.84
#: ``auto`` decides from at least this many points (fewer: no transform).
AUTO_MIN_N = 8
#: The range of Yeo-Johnson's ``lambda`` (see the module's docstring).
LAMBDA_RANGE = (-2.0, 1.0)


def skewness(x: Tensor) -> float:
    """The sample skewness ``m3 / m2^1.5`` of a 1-d tensor (0 for a constant one)."""
    x = x.to(torch.float64)
    c = x - x.mean()
    m2 = float((c**2).mean())
    if m2 <= 1e-300:
        return 0.0
    return float((c**3).mean()) / m2**1.5


def choose(Y: Tensor, name: str) -> str:
    """The transform to use for ``n`` values ``Y`` (larger is better) under option ``name``."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; use one of {TRANSFORMS}")
    if name != "auto":
        return name
    if Y.numel() < AUTO_MIN_N:
        return "none"
    return "power" if power_evidence(-Y) >= LR_MIN else "none"


def power_evidence(f: Tensor) -> float:
    """The likelihood-ratio statistic ``2 (llf(lambda_hat) - llf(1))`` of Yeo-Johnson on the robustly
    scaled minimized metric ``f`` (0 when ``lambda_hat`` is 1: no evidence for a transform)."""
    from scipy import stats

    s, _ = _robust_scale(f)
    lam = yeo_johnson_lambda(s)
    if lam >= LAMBDA_RANGE[1] - 1e-9:
        return 0.0
    x = s.detach().cpu().numpy()
    return float(2.0 * (stats.yeojohnson_llf(lam, x) - stats.yeojohnson_llf(1.0, x)))


def _robust_scale(f: Tensor) -> tuple[Tensor, float]:
    """``(f - median) / IQR`` and the IQR used (floored so a near-constant sample stays finite)."""
    med = f.median()
    q1, q3 = torch.quantile(f, torch.tensor([0.25, 0.75], dtype=f.dtype))
    iqr = float(q3 - q1)
    sd = float(f.std()) if f.numel() > 1 else 0.0
    spread = iqr if iqr > 1e-12 else sd if sd > 1e-12 else 1.0
    return (f - med) / spread, spread


def yeo_johnson(x: Tensor, lam: float) -> Tensor:
    """The Yeo-Johnson transform of ``x`` with parameter ``lam`` (monotone increasing)."""
    pos = x >= 0
    out = torch.empty_like(x)
    xp, xn = x[pos], x[~pos]
    out[pos] = torch.log1p(xp) if abs(lam) < 1e-8 else ((1 + xp) ** lam - 1) / lam
    out[~pos] = -torch.log1p(-xn) if abs(lam - 2) < 1e-8 else -((1 - xn) ** (2 - lam) - 1) / (2 - lam)
    return out


def yeo_johnson_lambda(x: Tensor) -> float:
    """The maximum-likelihood ``lambda`` of Yeo-Johnson for ``x`` in :data:`LAMBDA_RANGE`
    (scipy's ``yeojohnson_normmax``, clipped: the likelihood is unimodal in ``lambda``)."""
    from scipy import stats

    lam = float(stats.yeojohnson_normmax(x.detach().cpu().numpy()))
    return min(LAMBDA_RANGE[1], max(LAMBDA_RANGE[0], lam)) if math.isfinite(lam) else 1.0


def apply(name: str, Y: Tensor) -> tuple[Tensor, Tensor | None]:
    """Transform ``n`` values ``Y`` (larger is better) by ``name`` (not ``auto``: see :func:`choose`).

    Returns:
        The transformed values (``n``, larger is better, same order) and ``dz/dY`` at each point
        (to carry observed noise variances through, by the delta method), or None where the
        transform has no derivative (``rank``: the noise is then inferred).
    """
    if name == "none" or Y.numel() < 2:
        return Y, torch.ones_like(Y)
    f = -Y  # minimized: the bad tail is f's upper tail
    if name == "power":
        s, scale = _robust_scale(f)
        lam = yeo_johnson_lambda(s)
        z = yeo_johnson(s, lam)
        # d/ds of Yeo-Johnson: (1 + s)^(lam - 1) for s >= 0, (1 - s)^(1 - lam) for s < 0.
        ds = torch.where(s >= 0, (1 + s.clamp_min(0)) ** (lam - 1), (1 - s.clamp_max(0)) ** (1 - lam))
        return -z, ds / scale
    if name == "log":
        fs = torch.sort(f).values
        tenth = fs[min(fs.numel() - 1, max(1, fs.numel() // 10))]
        gap = float(tenth - fs[0])
        eps = 0.1 * gap if gap > 0 else max(1e-12, 1e-6 * float(fs[-1] - fs[0]))
        base = f - fs[0] + eps
        return -base.log(), 1.0 / base
    if name == "rank":
        n = f.numel()
        ranks = torch.empty(n, dtype=f.dtype)
        order = torch.argsort(f, stable=True)
        ranks[order] = torch.arange(n, dtype=f.dtype)
        # Ties share their mean rank, so equal values stay equal.
        for v in torch.unique(f):
            m = f == v
            if int(m.sum()) > 1:
                ranks[m] = ranks[m].mean()
        u = (ranks + 0.5) / n
        z = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
        return -z, None
    raise ValueError(f"unknown transform {name!r}; use one of {TRANSFORMS}")
