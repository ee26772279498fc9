"""The compression ratio R(theta), exact and relaxed, as the acquisition functions need it.

R is a known function of theta and the layer table (``bocompress.costs``), never learned. The
acquisition optimizer needs it on batches of tensors and differentiable, so :class:`CostModel`
compiles a profile's cost forms into a few index tensors:

- exact: ``kept(theta, size) = clamp(floor(theta * size + 0.5), 1, size)``, the rounding every
  method uses (equals ``bocompress.costs.ratio`` up to float summation order);
- relaxed: ``clamp(theta * size, 1, size)``, continuous and piecewise linear, equal to the exact
  form wherever ``theta = k / size`` (where the engine's proposals land after snapping).

Each layer's cost is ``min(sum_t coef_t * prod_f count_f, cap)``; R is the model cost over the
original's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bocompress import costs as exact_costs


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


class CostModel:
    """R(theta) for one profile and cost kind, vectorized over batches of theta.

    Args:
        profile: A ProfileReport (model or dict).
        kind: The cost kind: ``params``, ``flops``, ``channels`` or ``activation``.
        names: The search parameter names, in the order of the last axis of theta tensors.
    """

    def __init__(self, profile: Any, kind: str, names: Sequence[str]) -> None:
        totals = _get(profile, "totals") or {}
        if kind not in totals:
            raise ValueError(f"the profile has no total for cost kind {kind!r} (has {sorted(totals)})")
        self.total = float(totals[kind])
        if not self.total > 0:
            raise ValueError(f"the profile's total {kind!r} cost must be > 0, got {self.total}")
        self.profile = profile
        self.kind = kind
        self.names = list(names)
        index = {n: i for i, n in enumerate(self.names)}
        coefs: list[float] = []
        idx: list[list[int]] = []
        sizes: list[list[float]] = []
        term_layer: list[int] = []
        caps: list[float] = []
        rest = self.total
        for layer in _get(profile, "layers") or []:
            layer_costs = _get(layer, "costs") or {}
            if kind not in layer_costs:
                continue
            form = layer_costs[kind]
            dense = _get(layer, "dense") or {}
            rest -= float(dense.get(kind, 0.0))
            li = len(caps)
            cap = _get(form, "cap")
            caps.append(math.inf if cap is None else float(cap))
            for term in _get(form, "terms") or []:
                coefs.append(float(_get(term, "coef")))
                ti, ts = [], []
                for f in _get(term, "factors") or []:
                    p = str(_get(f, "param"))
                    if p not in index:
                        raise ValueError(
                            f"layer {_get(layer, 'name')!r}: cost factor refers to {p!r}, "
                            f"which is not a search parameter ({self.names[:5]}...)"
                        )
                    ti.append(index[p])
                    ts.append(float(_get(f, "size")))
                idx.append(ti)
                sizes.append(ts)
                term_layer.append(li)
        n_f = max([len(t) for t in idx] + [1])
        # Padding factors read dim 0 with size 1: clamp(theta * 1, 1, 1) == 1, a neutral factor.
        self._idx = torch.tensor([t + [0] * (n_f - len(t)) for t in idx] or [[0]], dtype=torch.long)
        self._size = torch.tensor(
            [s + [1.0] * (n_f - len(s)) for s in sizes] or [[1.0]], dtype=torch.float64
        )
        self._coef = torch.tensor(coefs or [0.0], dtype=torch.float64)
        n_layers = max(len(caps), 1)
        member = torch.zeros(len(coefs) or 1, n_layers, dtype=torch.float64)
        for t, li in enumerate(term_layer):
            member[t, li] = 1.0
        self._member = member
        self._cap = torch.tensor(caps or [math.inf], dtype=torch.float64)
        self._rest = rest

    def __call__(self, theta: Tensor, exact: bool = False) -> Tensor:
        """R at a batch of theta.

        Args:
            theta: A ``batch_shape x d`` tensor of theta values (not unit coordinates).
            exact: Round kept counts as the workers do (``floor(theta * size + 0.5)``); otherwise
                use the continuous relaxation ``theta * size``.

        Returns:
            A ``batch_shape`` tensor of ratios.
        """
        dt = theta.dtype
        size = self._size.to(dt)
        v = theta[..., self._idx] * size  # batch_shape x terms x factors
        if exact:
            v = torch.floor(v + 0.5)
        v = torch.minimum(torch.clamp(v, min=1.0), size)
        term = v.prod(dim=-1) * self._coef.to(dt)  # batch_shape x terms
        layer = term @ self._member.to(dt)  # batch_shape x layers
        layer = torch.minimum(layer, self._cap.to(dt))
        return (layer.sum(dim=-1) + self._rest) / self.total

    def exact_ratio(self, params: Mapping[str, float]) -> float:
        """R(theta) by the reference implementation, ``bocompress.costs.ratio``."""
        return float(exact_costs.ratio(self.profile, params, self.kind))
