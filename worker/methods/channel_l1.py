"""Dependency-aware L1-norm channel pruning (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

One search parameter per prunable *dependency group*: the set of layers whose channels must be
removed together (a convolution's output channels, the BatchNorm after it, the input channels of
every consumer, and, in a residual network, every convolution tied to the same residual sum).
Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds the groups once, on the original
model; ``theta[group]`` is the fraction of the group's channels kept, and the kept channels are
those whose filters have the largest L1 norm (averaged over the group's producing layers).

This module also holds the channel-group analysis and the exact cost table shared with
:mod:`worker.methods.channel_lasso`: every Conv/Linear/BatchNorm touched by a searchable group
gets closed-form costs (``params``, ``flops``, ``channels``, ``activation``: the four budgets of
ChipNet) that are products of kept counts, so ``bocompress.costs.ratio`` equals the measured
ratio of the pruned model exactly.

FLOPs follow :class:`torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-accumulate of
convolutions and matrix products, for one input sample; biases, normalisations and activations
count zero.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bocompress.costs import kept, model_cost
from bocompress.schemas import ProfileReport
from worker import batch as B
from worker.methods.base import (
    TYPE_CLASSES,
    CompressionError,
    Compressor,
    CompressorOptions,
    CostMismatch,
    check_patterns,
    eval_mode,
    importance_curves,
    method_types,
    signal_grid,
    signals_dict,
    theta_value,
)
from worker.methods.lsq import Site, refit_in_forward, sample_sites, site_problem

__all__ = [
    "ChannelAnalysis",
    "ChannelCompressorBase",
    "ChannelGroup",
    "ChannelL1Compressor",
    "GroupMember",
    "analyze_channel_groups",
    "build_cost_table",
    "execute_prune_plan",
    "group_l1_importance",
    "prune_plan",
]

#: Least-squares correction of the pruned layers' consumers on by default (see docs/proxy.md).
DEFAULT_LS = True
#: Calibration samples the least-squares correction samples positions from.
LS_SAMPLES = 256

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm
#: Modules whose parameters are one value per channel (a closed form of one kept count).
_PER_CHANNEL = (_BN, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)
#: Torch-Pruning graph nodes (not modules) that a searchable group may pass through.
_SUPPORTED_OPS = frozenset({"ELEMENTWISE", "CONCAT", "SPLIT", "RESHAPE", "SLICE", "OUTPUT"})


# --------------------------------------------------------------------------- group analysis


@dataclass(frozen=True)
class GroupMember:
    """One module dimension a channel group prunes.

    Attributes:
        module: the module's qualified name (as in ``model.named_modules()``).
        dim: ``"out"`` (output channels; also the channel dim of per-channel modules such as
            BatchNorm) or ``"in"`` (input channels / features of a Conv or Linear).
        handler: the Torch-Pruning function that removes indices of this dimension.
        pruning_dim: the Torch-Pruning node's pruning dimension (set before calling ``handler``).
        target_idxs: every index of this dimension the group covers, in the module's own
            coordinates (a Linear after a flatten covers ``H*W`` features per channel).
        root_idxs: for each entry of ``target_idxs``, the group channel it follows.
        per_channel: number of target indices per group channel.
    """

    module: str
    dim: str
    handler: Callable[..., Any]
    pruning_dim: int
    target_idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]
    per_channel: int


@dataclass
class ChannelGroup:
    """A set of channels that must be pruned together, with one keep-ratio.

    Attributes:
        name: the search parameter's name: the first (in ``named_modules`` order) Conv/Linear
            whose output channels the group prunes.
        size: number of channels of the group (the count theta multiplies).
        members: every module dimension the group prunes.
        out_layers: Conv/Linear modules whose output channels the group prunes.
        ops: Torch-Pruning op types (not modules) the group passes through, e.g. ELEMENTWISE.
        touches_output: the group reaches the model output (never prunable: the classifier).
        problem: why the group cannot be searched (empty when it can).
    """

    name: str
    size: int
    members: list[GroupMember]
    out_layers: tuple[str, ...]
    ops: frozenset[str]
    touches_output: bool
    problem: str = ""

    def member_modules(self, dim: str | None = None) -> list[str]:
        """Names of the modules this group touches (optionally only along ``dim``)."""
        return [m.module for m in self.members if dim is None or m.dim == dim]


@dataclass
class ModuleCalls:
    """Shapes seen by one Conv/Linear during a one-sample forward pass.

    Attributes:
        in_shapes: input shape of each call (batch 1), e.g. ``[1, C, H, W]``.
        out_shapes: output shape of each call (batch 1).
    """

    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class ChannelAnalysis:
    """What the channel methods need to know about a model, computed once.

    Attributes:
        groups: every dependency group found (searchable or not), output-reaching ones included.
        order: module names in first-call order of the one-sample forward pass.
        calls: per Conv/Linear name, the shapes of its calls.
        dim_sizes: ``(module, dim) -> number of channels/features`` for every group member.
        total_flops: FlopCounterMode FLOPs of the whole model for one sample.
        prunable_layers: Conv/Linear whose output channels belong to a group that does not reach
            the model output (the denominators of the ``channels``/``activation`` budgets).
        output_layers: Conv/Linear whose output channels reach the model output.
    """

    groups: list[ChannelGroup]
    order: list[str]
    calls: dict[str, ModuleCalls]
    dim_sizes: dict[tuple[str, str], int]
    total_flops: float
    prunable_layers: list[str]
    output_layers: list[str]


def _one_sample(example_input: B.Batch) -> B.Batch:
    try:
        B.n_samples(example_input)
    except B.BatchError as exc:
        raise CompressionError(f"example_input must have a leading batch dimension: {exc}") from exc
    return B.head(example_input, 1)


def _shape(x: B.Batch) -> Any:
    return tuple(x.shape) if isinstance(x, Tensor) else {k: tuple(v.shape) for k, v in x.items()}


def _dim_size(module: nn.Module, dim: str) -> int | None:
    if isinstance(module, _CONV):
        return int(module.out_channels if dim == "out" else module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features if dim == "out" else module.in_features)
    if isinstance(module, _BN | nn.modules.instancenorm._InstanceNorm):
        return int(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.PReLU):
        return int(module.num_parameters)
    return None


def _member_problem(module: nn.Module, name: str) -> str:
    """Why a module cannot be part of a searchable group ("" when it can)."""
    if isinstance(module, _CONV):
        if module.transposed:
            return f"{name}: transposed convolutions are not supported"
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            return f"{name}: grouped (non-depthwise) convolutions are not supported"
        return ""
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, _PER_CHANNEL):
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return f"{name}: LayerNorm over several dimensions is not supported"
        return ""
    return f"{name}: {type(module).__name__} has no channel cost form"


def analyze_channel_groups(model: nn.Module, example_input: Tensor) -> ChannelAnalysis:
    """Find the channel dependency groups of ``model`` with Torch-Pruning, and its layer shapes.

    The model is not modified: the graph is traced on a deep copy (tracing switches a model to
    eval mode).

    Args:
        model: the network to analyse.
        example_input: a batch of inputs (``batch x ...``); only the first sample is used.

    Returns:
        The :class:`ChannelAnalysis` of the model.

    Raises:
        CompressionError: when the model cannot be traced.
    """
    x = _one_sample(example_input)
    work = copy.deepcopy(model)
    work.eval()
    names = {m: n for n, m in work.named_modules()}

    calls: dict[str, ModuleCalls] = {}
    order: list[str] = []

    produced: dict[str, list[Tensor]] = {}

    def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        name = names[mod]
        if name not in order:
            order.append(name)
        if isinstance(output, Tensor):
            produced.setdefault(name, []).append(output)
        if isinstance(mod, _CONV | nn.Linear) and isinstance(output, Tensor):
            c = calls.setdefault(name, ModuleCalls())
            c.in_shapes.append(tuple(inputs[0].shape))
            c.out_shapes.append(tuple(output.shape))

    handles = [m.register_forward_hook(hook) for m in names if m is not work]
    try:
        with torch.no_grad():
            flop_counter = FlopCounterMode(display=False)
            with flop_counter:
                out = B.call(work, x)
    except Exception as exc:  # the model's own error, reported with context
        raise CompressionError(f"the model failed on example_input of shape {_shape(x)}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    total_flops = float(flop_counter.get_total_flops())
    model_outputs = [t for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor)]
    # modules whose output *is* a model output: their output channels can never be pruned
    emits_output = {n for n, ts in produced.items() if any(t is o for t in ts for o in model_outputs)}
    produced.clear()

    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(work, example_inputs=x, verbose=False)
    except Exception as exc:
        raise CompressionError(f"Torch-Pruning could not trace the model: {exc}") from exc

    rank = {n: i for i, (n, _) in enumerate(work.named_modules())}
    groups: list[ChannelGroup] = []
    dim_sizes: dict[tuple[str, str], int] = {}
    for g in dg.get_all_groups(ignored_layers=[], root_module_types=(nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)):
        members: list[GroupMember] = []
        ops: set[str] = set()
        problems: list[str] = []
        root_size = len(set(g[0].root_idxs))
        for item in g.items:
            dep, idxs, root_idxs = item.dep, list(item.idxs), list(item.root_idxs)
            target = dep.target.module
            if not isinstance(target, nn.Module) or target not in names:
                ops.add(tp.ops.OPTYPE(dep.target.type).name)
                continue
            name = names[target]
            if isinstance(target, _CONV | nn.Linear):
                dim = "in" if dep.handler.__name__ == "prune_in_channels" else "out"
            else:
                dim = "out"
            problem = _member_problem(target, name)
            if problem:
                problems.append(problem)
            counts: dict[int, int] = {}
            for r in root_idxs:
                counts[r] = counts.get(r, 0) + 1
            per = counts[root_idxs[0]] if root_idxs else 0
            if len(counts) != root_size or any(v != per for v in counts.values()):
                problems.append(f"{name}: its indices do not follow the group's channels one-to-{per}")
            size = _dim_size(target, dim)
            if size is not None:
                dim_sizes[(name, dim)] = size
            members.append(
                GroupMember(
                    module=name,
                    dim=dim,
                    handler=dep.handler,
                    pruning_dim=int(dep.target.pruning_dim),
                    target_idxs=tuple(int(i) for i in idxs),
                    root_idxs=tuple(int(r) for r in root_idxs),
                    per_channel=per,
                )
            )
        unsupported = ops - _SUPPORTED_OPS
        if unsupported:
            problems.append(f"passes through unsupported operations {sorted(unsupported)}")
        out_layers = tuple(
            sorted(
                {m.module for m in members if m.dim == "out" and isinstance(work.get_submodule(m.module), _CONV | nn.Linear)},
                key=rank.__getitem__,
            )
        )
        if not out_layers:
            continue
        groups.append(
            ChannelGroup(
                name=out_layers[0],
                size=root_size,
                members=members,
                out_layers=out_layers,
                ops=frozenset(ops),
                touches_output="OUTPUT" in ops or any(m.dim == "out" and m.module in emits_output for m in members),
                problem="; ".join(problems),
            )
        )
    prunable = [n for g in groups if not g.touches_output for n in g.out_layers]
    outputs = [n for g in groups if g.touches_output for n in g.out_layers]
    groups.sort(key=lambda g: rank[g.name])
    return ChannelAnalysis(
        groups=groups,
        order=order,
        calls=calls,
        dim_sizes=dim_sizes,
        total_flops=total_flops,
        prunable_layers=sorted(prunable, key=rank.__getitem__),
        output_layers=sorted(outputs, key=rank.__getitem__),
    )


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
        if isinstance(mod, _CONV | nn.Linear):
            size_out = analysis.dim_sizes.get((name, "out"), _dim_size(mod, "out"))
            size_in = analysis.dim_sizes.get((name, "in"), _dim_size(mod, "in"))
            out_c = counts.get((name, "out"), _Count(size_out))
            in_c = counts.get((name, "in"), _Count(size_in))
            has_bias = getattr(mod, "bias", None) is not None
            calls = analysis.calls.get(name, ModuleCalls())
            if isinstance(mod, _CONV):
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
        "channels": float(sum(_dim_size(modules[n], "out") or 0 for n in analysis.prunable_layers)),
        "activation": float(
            sum(
                _dim_size(modules[n], "out")
                * sum(
                    math.prod(s[2:]) if isinstance(modules[n], _CONV) else math.prod(s) // s[-1]
                    for s in analysis.calls.get(n, ModuleCalls()).out_shapes
                )
                for n in analysis.prunable_layers
            )
        ),
    }
    return layers, totals


# --------------------------------------------------------------------------- pruning


def prune_plan(
    groups: Iterable[tuple[ChannelGroup, Iterable[int]]],
) -> dict[tuple[str, str], tuple[GroupMember, list[int]]]:
    """Which indices of which module dimensions to remove, in original coordinates.

    Args:
        groups: pairs of a group and the group channels to *remove* (``0 <= c < group.size``).

    Returns:
        ``(module, handler name) -> (member, sorted indices to remove)``; several groups that
        prune the same dimension (e.g. the two inputs of a concatenation) are merged, so each
        dimension is pruned once and indices never shift between groups.
    """
    plan: dict[tuple[str, str], tuple[GroupMember, set[int]]] = {}
    for group, removed in groups:
        removed = set(int(r) for r in removed)
        if not removed:
            continue
        for m in group.members:
            key = (m.module, m.handler.__name__)
            idxs = {t for t, r in zip(m.target_idxs, m.root_idxs) if r in removed}
            if key in plan:
                plan[key][1].update(idxs)
            else:
                plan[key] = (m, idxs)
    return {k: (m, sorted(v)) for k, (m, v) in plan.items()}


def execute_prune_plan(
    model: nn.Module, plan: Mapping[tuple[str, str], tuple[GroupMember, list[int]]]
) -> nn.Module:
    """Remove the planned indices from ``model`` in place (Torch-Pruning's layer functions).

    Args:
        model: a copy of the analysed model (same module names).
        plan: from :func:`prune_plan`.

    Returns:
        ``model``, pruned.
    """
    for (name, _), (member, idxs) in plan.items():
        if not idxs:
            continue
        module = model.get_submodule(name)
        member.handler.__self__.pruning_dim = member.pruning_dim
        member.handler(module, idxs)
    return model


def group_l1_importance(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Li et al.'s filter importance: the L1 norm of each channel's filter, over the group.

    For a group of several coupled producers (a residual sum), each producer's filter L1 norms
    are averaged, channel by channel.

    Args:
        model: the original model.
        group: the channel group.

    Returns:
        ``size`` importances (float64), one per group channel.
    """
    imp = torch.zeros(group.size, dtype=torch.float64)
    n = 0
    for m in group.members:
        if m.dim != "out" or m.module not in group.out_layers:
            continue
        w = model.get_submodule(m.module).weight.detach().to("cpu", torch.float64)
        l1 = w.abs().reshape(w.shape[0], -1).sum(dim=1)
        imp.index_add_(0, torch.tensor(m.root_idxs), l1[list(m.target_idxs)])
        n += 1
    return imp / max(n, 1)


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches one of the fnmatch globs."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_type(module: nn.Module, type_names: Sequence[str]) -> bool:
    return any(isinstance(module, TYPE_CLASSES[t]) for t in type_names)


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
            if isinstance(self.model.get_submodule(n), _CONV | nn.Linear) and self.excluded(n):
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
            return float(sum(_dim_size(m, "out") or 0 for m in mods.values()))
        batch = B.n_samples(inputs)
        volume = [0]

        def hook(m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            volume[0] += out.numel() // batch

        handles = [m.register_forward_hook(hook) for m in mods.values()]
        try:
            with eval_mode(module), torch.no_grad():
                B.call(module, inputs)
        finally:
            for h in handles:
                h.remove()
        return float(volume[0])


class ChannelL1Compressor(ChannelCompressorBase):
    """L1-norm filter pruning over Torch-Pruning dependency groups (Li et al. 2017).

    Search parameters: one per searchable group, named after the group's first producing
    Conv/Linear (in ``named_modules`` order); ``theta`` is the fraction of the group's channels
    kept (``bocompress.costs.kept(theta, size)`` of them). A group is searchable when one of the
    Conv/Linear layers whose output channels it prunes matches ``layer_patterns`` (fnmatch globs
    over module names) and has a type mapped to this method, it does not reach the model output
    (the classifier's outputs are never pruned), and every module it touches has a closed-form
    cost (Conv/Linear/BatchNorm-like; no grouped or transposed convolutions).

    Args:
        model: the trained network (left untouched).
        layer_patterns: fnmatch globs over module names.
        theta_min: the lower bound of every search parameter.
        example_input: a batch of inputs (``batch x ...``) used to trace the graph (first sample).
        method_map: the job's ``method`` (a name or a ``{"Conv2d"|"Linear": method}`` mapping).

    Raises:
        NoLayerMatched: when a pattern matches no searchable group.
        CostMismatch: when the cost forms disagree with a pruned copy (a graph the forms
            do not describe).
    """

    method = "channel_l1"
    supported = ("Conv2d", "Linear")

    def __init__(
        self,
        model: nn.Module,
        layer_patterns: list[str],
        theta_min: float,
        example_input: Tensor,
        method_map: str | dict[str, str] = "channel_l1",
        options: CompressorOptions | None = None,
    ) -> None:
        super().__init__(model, layer_patterns, theta_min, example_input, method_map, options)
        self._setup(model, example_input)
        for g in self._analysis.groups:
            typed = [n for n in g.out_layers if _is_type(model.get_submodule(n), self._types)]
            matched = [n for n in typed if match_any(n, self.layer_patterns)]
            if not matched:
                continue
            excluded = self._excluded_group(g)
            if excluded:
                for n in matched:
                    self._skipped[n] = f"excluded by the job's layer patterns (its group touches {excluded}; left dense)"
            elif g.touches_output:
                for n in matched:
                    self._skipped[n] = "its output channels are the model's outputs"
            elif g.problem:
                for n in matched:
                    self._skipped[n] = g.problem
            else:
                self._groups.append(g)
                self._matchable.extend(typed)
        self._order = {g.name: torch.argsort(-group_l1_importance(model, g), stable=True) for g in self._groups}
        self._finish_profile()
        self.ls_correction = bool(DEFAULT_LS if self.options.ls_correction is None else self.options.ls_correction)
        self._sites: dict[str, Site] | None = None

    def _refit_sites(self) -> dict[str, Site]:
        """The consumers of searchable groups that least squares can refit, sampled once (lazily)."""
        if self._sites is None:
            calls = self._analysis.calls
            names = []
            for g in self._groups:
                for m in g.members:
                    mod = self.model.get_submodule(m.module)
                    if (m.dim == "in" and not site_problem(mod) and len(calls.get(m.module, ModuleCalls()).out_shapes) == 1
                            and m.module not in names):
                        names.append(m.module)
            inputs = self.options.calib_inputs if self.options.calib_inputs is not None else self.example_input
            inputs = B.head(inputs, min(B.n_samples(inputs), LS_SAMPLES))
            self._ls_inputs = inputs
            self._sites = sample_sites(self.model, names, inputs, self.options.n_points, self.options.seed)
        return self._sites

    def importance_order(self, name: str) -> Tensor:
        """Group ``name``'s channels, most important (largest filter L1 norm) first."""
        return self._order[name].clone()

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A new, pruned model: each group keeps its ``kept(theta, size)`` largest-L1 channels.

        Args:
            theta: keep-ratio per search parameter (group name); other keys are ignored.

        Returns:
            The pruned copy; the original model is untouched.
        """
        ks = self._kept(theta)
        plan = prune_plan((g, self._order[g.name][ks[g.name] :].tolist()) for g in self._groups)
        pruned = execute_prune_plan(copy.deepcopy(self.model), plan)
        if self.ls_correction and plan:
            self.reconstruct(pruned, plan)
        return pruned

    def reconstruct(self, pruned: nn.Module, plan: Mapping[tuple[str, str], tuple[GroupMember, list[int]]]) -> list[str]:
        """Refit, by least squares, each consumer whose input channels were removed (He et al.'s step 2).

        The refit layer reproduces the original network's output (its kept output channels) from
        the inputs it now receives, layer after layer in forward order (:mod:`worker.methods.lsq`).

        Returns:
            The names of the refitted layers.
        """
        sites = self._refit_sites()
        cut_in = {name for (name, _), (m, idxs) in plan.items() if m.dim == "in" and idxs}
        removed_out: dict[str, set[int]] = {}
        for (name, _), (m, idxs) in plan.items():
            if m.dim == "out" and idxs:
                removed_out.setdefault(name, set()).update(idxs)
        todo = {n: s for n, s in sites.items() if n in cut_in}

        def out_keep(name: str) -> Tensor | None:
            gone = removed_out.get(name)
            if not gone:
                return None
            size = self._analysis.dim_sizes[(name, "out")]
            return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)

        return refit_in_forward(pruned, todo, self._ls_inputs, out_keep)


def with_name(group: ChannelGroup, name: str) -> ChannelGroup:
    """A copy of ``group`` searched under another parameter name."""
    return replace(group, name=name)


#: The class the method registry builds for ``channel_l1``.
COMPRESSOR = ChannelL1Compressor
