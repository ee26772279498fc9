"""The search space: named parameters mapped to and from the unit cube.

Every model the engine fits sees points in ``[0, 1]^d``. A :class:`Space` knows how a unit
coordinate becomes a parameter value and back:

- ``float``: linear, or logarithmic when ``log`` is set.
- ``int``: the unit interval is cut into ``high - low + 1`` equal bins (on a log scale when
  ``log``), so every integer gets the same share of the cube; a value maps back to its bin centre.
- ``grid`` (compression parameters with ``size > 0``): theta is snapped to ``k / size`` for an
  integer ``k``, so ``bocompress.costs.kept(theta, size) == k`` exactly and two proposals that
  would keep the same counts are recognised as the same point.

Snapping is idempotent (``snap(snap(u)) == snap(u)``), which is what duplicate detection relies on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

DimKind = Literal["float", "int", "grid"]

# Unit coordinates are compared after rounding to this many steps per unit, so two floats that
# differ only by representation error are one point.
_KEY_STEPS = 1e9


@dataclass(frozen=True)
class Dim:
    """One dimension of the search space.

    Attributes:
        name: The parameter name.
        low: The smallest value.
        high: The largest value.
        kind: ``float``, ``int`` or ``grid`` (a compression fraction snapped to ``k / size``).
        log: Whether the unit coordinate is on a log scale (``float`` and ``int`` only).
        size: For ``grid``: the count theta multiplies (a rank, a channel count).
    """

    name: str
    low: float
    high: float
    kind: DimKind = "float"
    log: bool = False
    size: int = 0

    @property
    def k_range(self) -> tuple[int, int]:
        """For ``grid`` dims: the smallest and largest kept count ``k`` with ``k / size`` in range.

        When no ``k / size`` falls inside ``[low, high]`` the dim is pinned to ``low`` (returned as
        ``(0, -1)``, an empty range).
        """
        k_lo = max(1, math.ceil(self.low * self.size - 1e-9))
        k_hi = min(self.size, math.floor(self.high * self.size + 1e-9))
        return (k_lo, k_hi) if k_lo <= k_hi else (0, -1)


def _dim_from_dict(p: Mapping[str, Any], compression: bool) -> Dim:
    try:
        name, low, high = str(p["name"]), float(p["low"]), float(p["high"])
    except KeyError as e:
        raise ValueError(f"search parameter {dict(p)!r} lacks the field {e.args[0]!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or not low <= high:
        raise ValueError(f"parameter {name!r}: bounds must be finite with low <= high, got [{low}, {high}]")
    if compression:
        size = int(p.get("size") or 0)
        if size < 0:
            raise ValueError(f"parameter {name!r}: size must be >= 0, got {size}")
        return Dim(name, low, high, "grid" if size > 0 else "float", False, size)
    kind = str(p.get("type", "float"))
    if kind not in ("float", "int"):
        raise ValueError(f"parameter {name!r}: type must be 'float' or 'int', got {kind!r}")
    log = bool(p.get("log", False))
    if log and low <= 0:
        raise ValueError(f"parameter {name!r}: a log-scaled parameter needs low > 0, got {low}")
    if kind == "int" and (low != round(low) or high != round(high)):
        raise ValueError(f"parameter {name!r}: an int parameter needs integer bounds, got [{low}, {high}]")
    return Dim(name, low, high, kind, log, 0)  # type: ignore[arg-type]


class Space:
    """A box of named parameters with their unit-cube encoding.

    Args:
        params: ParameterSpec dicts (generic jobs) or SearchParam dicts (compression jobs).
        compression: Whether ``params`` are SearchParams (theta fractions, snapped to a grid).
    """

    def __init__(self, params: Sequence[Mapping[str, Any]], compression: bool) -> None:
        if len(params) == 0:
            raise ValueError("the search space needs at least one parameter")
        self.dims: list[Dim] = [_dim_from_dict(p, compression) for p in params]
        self.names: list[str] = [d.name for d in self.dims]
        if len(set(self.names)) != len(self.names):
            raise ValueError("parameter names must be unique")
        self.compression = compression
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}

    @property
    def d(self) -> int:
        """The number of dimensions."""
        return len(self.dims)

    # ------------------------------------------------------------------ value <-> unit

    def _unit_of(self, dim: Dim, x: float) -> float:
        if dim.high == dim.low:
            return 0.5
        if dim.kind == "int":
            if dim.log:
                lo, hi = math.log(dim.low - 0.5 if dim.low > 0.5 else dim.low), math.log(dim.high + 0.5)
                u = (math.log(max(x, 1e-300)) - lo) / (hi - lo)
            else:
                u = (x - dim.low + 0.5) / (dim.high - dim.low + 1.0)
        elif dim.log:
            u = (math.log(x) - math.log(dim.low)) / (math.log(dim.high) - math.log(dim.low))
        else:
            u = (x - dim.low) / (dim.high - dim.low)
        return min(max(u, 0.0), 1.0)

    def _value_of(self, dim: Dim, u: float) -> float:
        u = min(max(u, 0.0), 1.0)
        if dim.high == dim.low:
            return dim.low
        if dim.kind == "int":
            if dim.log:
                lo, hi = math.log(dim.low - 0.5 if dim.low > 0.5 else dim.low), math.log(dim.high + 0.5)
                x = math.floor(math.exp(lo + u * (hi - lo)) + 0.5)
            else:
                x = math.floor(dim.low + u * (dim.high - dim.low + 1.0))
            return float(min(max(x, dim.low), dim.high))
        if dim.kind == "grid":
            k_lo, k_hi = dim.k_range
            if k_lo > k_hi:
                return dim.low
            theta = dim.low + u * (dim.high - dim.low)
            k = min(max(math.floor(theta * dim.size + 0.5), k_lo), k_hi)
            return k / dim.size
        if dim.log:
            x = math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low)))
        else:
            x = dim.low + u * (dim.high - dim.low)
        return min(max(x, dim.low), dim.high)  # exp(log(low)) may round below low

    def to_unit(self, params: Mapping[str, float]) -> list[float]:
        """Encode a parameter dict as unit coordinates (missing names raise a ValueError)."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"point {dict(params)!r} lacks the parameters {missing}")
        return [self._unit_of(dim, float(params[dim.name])) for dim in self.dims]

    def to_unit_tensor(self, points: Sequence[Mapping[str, float]]) -> Tensor:
        """Encode points as a ``len(points) x d`` float64 tensor."""
        if len(points) == 0:
            return torch.zeros(0, self.d, dtype=torch.float64)
        return torch.tensor([self.to_unit(p) for p in points], dtype=torch.float64)

    def from_unit(self, u: Sequence[float]) -> dict[str, float]:
        """Decode unit coordinates into a snapped parameter dict (int rounded, grid snapped)."""
        return {dim.name: self._value_of(dim, float(ui)) for dim, ui in zip(self.dims, u)}

    def snap(self, u: Sequence[float]) -> list[float]:
        """Unit coordinates of the snapped point ``from_unit(u)``."""
        return self.to_unit(self.from_unit(u))

    def key(self, params: Mapping[str, float]) -> tuple[int, ...]:
        """A hashable identity of a point after snapping, for duplicate detection."""
        return self.unit_key(self.snap(self.to_unit(params)))

    @staticmethod
    def unit_key(u_snapped: Sequence[float]) -> tuple[int, ...]:
        """The identity of already-snapped unit coordinates."""
        return tuple(int(round(float(x) * _KEY_STEPS)) for x in u_snapped)

    # ------------------------------------------------------------------ helpers for theta

    def theta_from_unit(self, X: Tensor) -> Tensor:
        """Continuous theta of a compression space, differentiable (no snapping).

        Args:
            X: A ``batch_shape x d`` tensor of unit coordinates.

        Returns:
            A ``batch_shape x d`` tensor ``low + X * (high - low)``.
        """
        low = torch.tensor([d.low for d in self.dims], dtype=X.dtype, device=X.device)
        high = torch.tensor([d.high for d in self.dims], dtype=X.dtype, device=X.device)
        return low + X * (high - low)

    def snap_theta_tensor(self, X: Tensor) -> Tensor:
        """Snapped theta of a compression space for a batch (vectorized ``from_unit``).

        Args:
            X: A ``batch_shape x d`` tensor of unit coordinates.

        Returns:
            A ``batch_shape x d`` tensor of theta values; grid dims are ``k / size``.
        """
        theta = self.theta_from_unit(X.clamp(0.0, 1.0))
        out = theta.clone()
        for i, dim in enumerate(self.dims):
            if dim.kind != "grid":
                continue
            k_lo, k_hi = dim.k_range
            if k_lo > k_hi:
                out[..., i] = dim.low
                continue
            k = torch.floor(theta[..., i] * dim.size + 0.5).clamp(k_lo, k_hi)
            out[..., i] = k / dim.size
        return out

    def unit_from_theta_tensor(self, theta: Tensor) -> Tensor:
        """Inverse of :meth:`theta_from_unit`, clamped to the cube."""
        low = torch.tensor([d.low for d in self.dims], dtype=theta.dtype)
        span = torch.tensor([max(d.high - d.low, 1e-300) for d in self.dims], dtype=theta.dtype)
        return ((theta - low) / span).clamp(0.0, 1.0)
