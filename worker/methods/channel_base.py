"""What the two channel-pruning methods share: the exact layer table and the compressor base class.

Every Conv/Linear/BatchNorm touched by a searchable group gets closed-form costs (``params``,
``flops``, ``channels``, ``activation``: the four budgets of ChipNet) that are products of kept
counts (:func:`build_cost_table`), so ``bocompress.costs.ratio`` equals the measured ratio of the
pruned model exactly. :class:`ChannelCompressorBase` selects the groups, builds and checks that
table, and measures the costs of a pruned copy.

FLOPs follow :class:`torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-accumulate of
convolutions and matrix products, for one input sample; biases, normalisations and activations
count zero.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.costs import kept, model_cost
from bocompress.schemas import ProfileReport
from bocompress.worker import batch as B
from bocompress.worker.methods.base import Compressor, CostMismatch, forward_hooked, theta_value
from bocompress.worker.methods.channel_groups import (
    CONV,
    ChannelAnalysis,
    ChannelGroup,
    ModuleCalls,
    analyze_channel_groups,
    dim_size,
    execute_prune_plan,
    group_l1_importance,
    prune_plan,
)
from bocompress.worker.methods.signals import importance_curves, signal_grid, signals_dict
from bocompress.worker.methods.tracing import check_patterns, method_types

__all__ = ["ChannelCompressorBase", "build_cost_table"]


# --------------------------------------------------------------------------- cost forms


@dataclass
class _Count:
    """A kept count as ``const + sum(mult * kept(theta[param], size))``."""

    const: int
    terms: list[tuple[int, str, int]] = field(default_factory=list)

    def times(self, other: "_Count", coef: float) -> list[dict[str, Any]]:
        """``coef * self * other`` as CostTerm dicts."""
        out: list[dict[str, Any]] = []
        left = [(self.const, [])] + [(m, [(p, s)]) for m, p, s in self.terms]
        right = [(other.const, [])] + [(m, [(p, s)]) for m, p, s in other.terms]
        for a, fa in left:
            for b, fb in right:
                c = coef * a * b
                if c != 0:
                    out.append({"coef": float(c), "factors": [{"param": p, "size": s} for p, s in fa + fb]})
        return out

    def scaled(self, coef: float) -> list[dict[str, Any]]:
        """``coef * self`` as CostTerm dicts."""
        return self.times(_Count(1), coef)


def _form(terms: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[tuple[tuple[str, int], ...], float] = {}
    for t in terms:
        key = tuple(sorted((f["param"], f["size"]) for f in t["factors"]))
        merged[key] = merged.get(key, 0.0) + t["coef"]
    return {
        "terms": [
            {"coef": c, "factors": [{"param": p, "size": s} for p, s in key]} for key, c in merged.items() if c != 0
        ],
        "cap": None,
    }


def _form_value(form: Mapping[str, Any], theta: Mapping[str, float]) -> float:
    total = 0.0
    for t in form["terms"]:
        v = t["coef"]
        for f in t["factors"]:
            v *= kept(theta[f["param"]], f["size"])
        total += v
    return total


def build_cost_table(
    model: nn.Module,
    analysis: ChannelAnalysis,
    groups: Sequence[ChannelGroup],
    method: str,
    count_params: Callable[[nn.Module], int],
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Exact closed-form costs of every module the searchable ``groups`` touch.

    Each module dimension's kept count is ``const + sum_g per_channel_g * kept(theta_g, size_g)``
    (``const`` = the indices no searchable group covers); a Conv's parameters are
    ``k * in_count * out_count (+ out_count for its bias)``, a Linear's ``in * out (+ out)``, a
    BatchNorm's ``2 * count``. FLOPs are ``2 * k * spatial * in * out`` for a Conv
    (FlopCounterMode's convention), ``2 * tokens * in * out`` for a Linear; ``channels`` is the
    kept output count and ``activation`` the kept output count times the spatial size, for the
    Conv/Linear layers of ``analysis.prunable_layers``.

    Args:
        model: the original model (only read).
        analysis: its channel analysis.
        groups: the searchable groups; each one's ``name`` is its search parameter.
        method: the method name recorded in the layer table.
        count_params: counts a module's parameters (the compressor's convention).

    Returns:
        ``(layers, totals)``: LayerInfo dicts (in forward order) and the whole model's costs.
    """
    counts: dict[tuple[str, str], _Count] = {}
    for g in groups:
        for m in g.members:
            key = (m.module, m.dim)
            if key not in counts:
                counts[key] = _Count(analysis.dim_sizes[key])
            c = counts[key]
            c.const -= m.per_channel * g.size
            c.terms.append((m.per_channel, g.name, g.size))

    modules = dict(model.named_modules())
    prunable = set(analysis.prunable_layers)
    rank = {n: i for i, n in enumerate(analysis.order)}
    touched = sorted({name for name, _ in counts}, key=lambda n: rank.get(n, len(rank)))
    layers: list[dict[str, Any]] = []
    for name in touched:
        mod = modules[name]
        costs: dict[str, dict[str, Any]] = {}
        if isinstance(mod, CONV | nn.Linear):
            size_out = analysis.dim_sizes.get((name, "out"), dim_size(mod, "out"))
            size_in = analysis.dim_sizes.get((name, "in"), dim_size(mod, "in"))
            out_c = counts.get((name, "out"), _Count(size_out))
            in_c = counts.get((name, "in"), _Count(size_in))
            has_bias = getattr(mod, "bias", None) is not None
            calls = analysis.calls.get(name, ModuleCalls())
            if isinstance(mod, CONV):
                k = math.prod(mod.kernel_size)
                spatial = sum(math.prod(s[2:]) for s in calls.out_shapes)
                if mod.groups > 1:  # depthwise: input channels follow the output channels
                    params = out_c.scaled(k) + (out_c.scaled(1) if has_bias else [])
                    flops = out_c.scaled(2 * k * spatial)
                else:
                    params = in_c.times(out_c, k) + (out_c.scaled(1) if has_bias else [])
                    flops = in_c.times(out_c, 2 * k * spatial)
            else:
                spatial = sum(math.prod(s) // s[-1] for s in calls.out_shapes)
                params = in_c.times(out_c, 1) + (out_c.scaled(1) if has_bias else [])
                flops = in_c.times(out_c, 2 * spatial)
            costs["params"] = _form(params)
            costs["flops"] = _form(flops)
            if name in prunable:
                costs["channels"] = _form(out_c.scaled(1))
                costs["activation"] = _form(out_c.scaled(spatial))
        else:
            c = counts[(name, "out")]
            size = analysis.dim_sizes[(name, "out")]
            per_channel, constant = 0, 0
            for p in mod.parameters(recurse=False):
                if p.dim() == 1 and p.numel() == size:
                    per_channel += 1
                else:
                    constant += p.numel()
            costs["params"] = _form(c.scaled(per_channel) + ([{"coef": float(constant), "factors": []}] if constant else []))
        ones = {p: 1.0 for form in costs.values() for t in form["terms"] for p in (f["param"] for f in t["factors"])}
        dense = {kind: _form_value(form, ones) for kind, form in costs.items()}
        params_of = sorted({f["param"] for form in costs.values() for t in form["terms"] for f in t["factors"]})
        weight = getattr(mod, "weight", None)
        layers.append(
            {
                "name": name,
                "type": type(mod).__name__,
                "method": method,
                "shape": list(weight.shape) if isinstance(weight, Tensor) else [],
                "params": params_of,
                "costs": costs,
                "dense": dense,
            }
        )

    totals = {
        "params": float(count_params(model)),
        "flops": analysis.total_flops,
        "channels": float(sum(dim_size(modules[n], "out") or 0 for n in analysis.prunable_layers)),
        "activation": float(
            sum(
                dim_size(modules[n], "out")
                * sum(
                    math.prod(s[2:]) if isinstance(modules[n], CONV) else math.prod(s) // s[-1]
                    for s in analysis.calls.get(n, ModuleCalls()).out_shapes
                )
                for n in analysis.prunable_layers
            )
        ),
    }
    return layers, totals


class ChannelCompressorBase(Compressor):
    """What the two channel methods share: group selection, the layer table, measured costs.

    Subclasses set :attr:`method` and :attr:`supported`, fill ``self._groups`` (the searchable
    groups, each named after its search parameter) and ``self._skipped``, then call
    :meth:`_finish_profile`.
    """

    #: Layer-type names whose groups the method may search (keys of ``TYPE_CLASSES``).
    supported: tuple[str, ...] = ("Conv2d", "Linear")

    def _setup(self, model: nn.Module, example_input: Tensor) -> None:
        self._types = method_types(self.method, self.method_map, self.supported)
        self._analysis = analyze_channel_groups(model, example_input)
        self._groups: list[ChannelGroup] = []
        self._skipped: dict[str, str] = {}
        self._matchable: list[str] = []

    def _excluded_group(self, g: ChannelGroup) -> list[str]:
        """The Conv/Linear layers of ``g`` that the job excludes (pruning ``g`` would change them)."""
        if not self.exclude:
            return []
        out = []
        for n in dict.fromkeys(g.member_modules()):
            if isinstance(self.model.get_submodule(n), CONV | nn.Linear) and self.excluded(n):
                out.append(n)
        return out

    def group_scores(self, g: ChannelGroup) -> Tensor:
        """Importance of each channel of a searchable group (the signals' unit scores); L1 norms by default."""
        return group_l1_importance(self.model, g)

    def _finish_profile(self) -> None:
        """Check the patterns, build and validate the layer table, and check it on a pruned copy."""
        check_patterns(self.layer_patterns, self._matchable, self.method_map, self._skipped)
        layers, totals = build_cost_table(self.model, self._analysis, self._groups, self.method, self.count_params)
        grid = signal_grid(self.theta_min)
        rows = {lay["name"]: lay for lay in layers}
        for g in self._groups:
            scores = torch.sort(self.group_scores(g).to(torch.float64), descending=True).values
            energy, lamp = importance_curves(scores, [kept(t, g.size) for t in grid])
            if g.name in rows:
                rows[g.name]["signals"] = signals_dict(grid, energy, lamp)
        report = {
            "layers": layers,
            "params": [
                {"name": g.name, "low": self.theta_min, "high": 1.0, "size": g.size, "dense_from": 1.0}
                for g in self._groups
            ],
            "totals": totals,
            "model_info": {
                "class": type(self.model).__name__,
                "method": self.method_map if isinstance(self.method_map, str) else dict(self.method_map),
                "n_layers": len(self._groups),
                "groups": {g.name: sorted({m.module for m in g.members}) for g in self._groups},
                "output_layers": list(self._analysis.output_layers),
                "skipped": dict(self._skipped),
                "flops_per": "sample",
            },
        }
        self._profile = ProfileReport.model_validate(report).model_dump()
        self._check_structure()

    @property
    def groups(self) -> list[ChannelGroup]:
        """The searchable channel groups (one search parameter each)."""
        return list(self._groups)

    @property
    def param_names(self) -> list[str]:
        """Names of the search parameters, in forward order."""
        return [g.name for g in self._groups]

    def profile(self) -> dict:
        """The layer table: exact cost forms of every touched layer, and the search parameters.

        Returns:
            A dict valid as :class:`bocompress.schemas.ProfileReport` (a copy).
        """
        return copy.deepcopy(self._profile)

    def _kept(self, theta: Mapping[str, float]) -> dict[str, int]:
        return {g.name: kept(theta_value(theta, g.name), g.size) for g in self._groups}

    def changed_layers(self, theta: Mapping[str, float]) -> list[str]:
        """Every module a group pruned at ``theta`` touches (its producers, norms and consumers)."""
        ks = self._kept(theta)
        return list(dict.fromkeys(m for g in self._groups if ks[g.name] < g.size for m in g.member_modules()))

    def _check_structure(self, seed: int = 0) -> None:
        """Prune (first channels) at a random theta; the measured size must equal the forms'."""
        rng = random.Random(seed)
        theta = {g.name: rng.uniform(self.theta_min, 1.0) for g in self._groups}
        ks = self._kept(theta)
        plan = prune_plan((g, range(ks[g.name], g.size)) for g in self._groups)
        pruned = execute_prune_plan(copy.deepcopy(self.model), plan)
        total = float(self._profile["totals"]["params"])
        measured = float(self.count_params(pruned))
        exact = model_cost(self._profile, theta, "params")
        if measured != exact:
            raise CostMismatch("params", measured / total, exact / total, f"{self.method} at theta={theta}")

    # -- measured costs ------------------------------------------------------------------------

    def count_cost(self, module: nn.Module, kind: str, inputs: Tensor) -> float:
        """The measured cost of a pruned copy; ``channels`` and ``activation`` are known too.

        Args:
            module: a pruned copy of the model (same module names).
            kind: ``params``, ``flops``, ``channels`` (sum of output channels of the prunable
                Conv/Linear layers) or ``activation`` (the same, times output positions per sample).
            inputs: ``batch x input shape``.

        Returns:
            The measured cost (per sample for ``flops`` and ``activation``).
        """
        if kind not in ("channels", "activation"):
            return super().count_cost(module, kind, inputs)
        names = self._analysis.prunable_layers
        mods = {n: module.get_submodule(n) for n in names}
        if kind == "channels":
            return float(sum(dim_size(m, "out") or 0 for m in mods.values()))
        batch = B.n_samples(inputs)
        volume = [0]

        def hook(m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            volume[0] += out.numel() // batch

        forward_hooked(module, inputs, mods.values(), hook)
        return float(volume[0])
