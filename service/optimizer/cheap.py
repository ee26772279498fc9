"""Cheap proposals: a point made at once, on the request path, when a job's buffer is empty.

The scheduler keeps each job's buffer of engine proposals ahead of demand, but a GP fit takes a
second or more and a burst of consumers can empty the buffer first. Rather than make a lease or
an ``ask`` wait for the fit, storage calls the proposer here (handed to it by the scheduler) and
inserts its point as a trial marked ``proposal = "cheap"``. The engine sees it as any other
trial: pending while it runs, an observation once it is told.

Strategies (``strategy``):

- ``quasirandom``: the next point of a Halton sequence (prime bases, shifted per job seed by a
  Cranley-Patterson rotation), indexed by the job's ``n_created``: spreads out like the initial
  design and never repeats.
- ``perturb``: the incumbent (the best completed trial) moved by a Gaussian step of
  :data:`PERTURB_SIGMA` of each dimension's unit range: local search around the best point.
- ``auto``: ``perturb`` once the job has an incumbent, else ``quasirandom``.

Only the standard library is used: no torch on the request path, a point costs microseconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

#: The strategies :func:`propose_cheap` knows (``off`` is the scheduler's: no cheap proposer at all).
STRATEGIES = ("auto", "perturb", "quasirandom")
#: The perturbation's standard deviation, as a fraction of each dimension's unit range.
PERTURB_SIGMA = 0.1
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97)


def _primes(d: int) -> list[int]:
    out = list(_PRIMES[:d])
    n = out[-1] + 2 if out else 2
    while len(out) < d:
        if all(n % p for p in out if p * p <= n):
            out.append(n)
        n += 1
    return out


def _radical_inverse(i: int, base: int) -> float:
    f, r = 1.0, 0.0
    while i > 0:
        f /= base
        r += f * (i % base)
        i //= base
    return r


def halton(index: int, d: int, seed: int) -> list[float]:
    """Point ``index`` (>= 0) of a ``d``-dimensional Halton sequence in ``[0, 1)^d``, rotated by ``seed``."""
    rng = random.Random(seed * 1_000_003 + d)
    shift = [rng.random() for _ in range(d)]
    return [(_radical_inverse(index + 1, b) + s) % 1.0 for b, s in zip(_primes(d), shift)]


def _grid_range(p: Mapping[str, Any]) -> tuple[int, int]:
    size, low, high = int(p.get("size") or 0), float(p["low"]), float(p["high"])
    k_lo = max(1, math.ceil(low * size - 1e-9))
    k_hi = min(size, math.floor(high * size + 1e-9))
    return (k_lo, k_hi) if k_lo <= k_hi else (0, -1)


def _from_unit(p: Mapping[str, Any], u: float, compression: bool) -> float:
    """A unit coordinate as the parameter's value (as :mod:`bocompress.service.optimizer.space` maps it)."""
    u = min(max(u, 0.0), 1.0)
    low, high = float(p["low"]), float(p["high"])
    if compression:
        if int(p.get("size") or 0) > 0:
            k_lo, k_hi = _grid_range(p)
            if k_hi < k_lo:
                return low
            k = min(k_hi, k_lo + int(u * (k_hi - k_lo + 1)))
            return k / int(p["size"])
        return low + u * (high - low)
    log = bool(p.get("log", False)) and low > 0
    if str(p.get("type", "float")) == "int":
        lo, hi = int(math.ceil(low)), int(math.floor(high))
        if hi <= lo:
            return float(lo)
        if log and lo >= 1:
            return float(min(hi, max(lo, round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))))
        return float(min(hi, lo + int(u * (hi - lo + 1))))
    if log:
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return low + u * (high - low)


def _to_unit(p: Mapping[str, Any], v: float, compression: bool) -> float:
    low, high = float(p["low"]), float(p["high"])
    if high <= low:
        return 0.5
    if compression and int(p.get("size") or 0) > 0:
        k_lo, k_hi = _grid_range(p)
        if k_hi < k_lo:
            return 0.5
        k = round(float(v) * int(p["size"]))
        return (min(max(k, k_lo), k_hi) - k_lo + 0.5) / (k_hi - k_lo + 1)
    if not compression and str(p.get("type", "float")) == "int":
        lo, hi = int(math.ceil(low)), int(math.floor(high))
        if hi <= lo:
            return 0.5
        k = min(max(round(float(v)), lo), hi)
        if bool(p.get("log", False)) and lo >= 1:
            return (math.log(k) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (k - lo + 0.5) / (hi - lo + 1)
    if not compression and bool(p.get("log", False)) and low > 0 and float(v) > 0:
        return (math.log(float(v)) - math.log(low)) / (math.log(high) - math.log(low))
    return (float(v) - low) / (high - low)


def propose_cheap(search_space: Sequence[Mapping[str, Any]], compression: bool, incumbent: Mapping[str, float] | None,
                  n_created: int, seed: int = 0, strategy: str = "auto") -> dict[str, float]:
    """One point for a job whose buffer is empty.

    Args:
        search_space: The job's parameters as stored (``name``, ``low``, ``high``; generic ones
            ``type`` and ``log``, compression ones ``size``).
        compression: Whether they are a compression job's per-layer fractions (``size`` grids).
        incumbent: The best completed trial's params, or None when there is none yet.
        n_created: The job's trial count: the Halton index, and part of the perturbation's seed
            (so the same job state gives the same point).
        seed: The job's optimizer seed.
        strategy: One of :data:`STRATEGIES`.

    Returns:
        ``{name: value}`` for every parameter.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown cheap-proposal strategy {strategy!r}; one of {STRATEGIES}")
    params = list(search_space)
    if strategy == "auto":
        strategy = "perturb" if incumbent else "quasirandom"
    if strategy == "perturb" and incumbent:
        rng = random.Random((seed * 1_000_003 + n_created) * 7919 + 17)
        us = [_to_unit(p, float(incumbent.get(str(p["name"]), 0.5 * (float(p["low"]) + float(p["high"])))), compression)
              for p in params]
        us = [min(1.0, max(0.0, u + rng.gauss(0.0, PERTURB_SIGMA))) for u in us]
    else:
        us = halton(int(n_created), len(params), seed)
    return {str(p["name"]): _from_unit(p, u, compression) for p, u in zip(params, us)}


__all__ = ["PERTURB_SIGMA", "STRATEGIES", "halton", "propose_cheap"]
