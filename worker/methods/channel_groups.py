"""Channel dependency groups: which layers' channels must be pruned together, and how to prune them.

One search parameter of a channel-pruning method is one *dependency group*: the set of layers whose
channels must be removed together (a convolution's output channels, the BatchNorm after it, the
input channels of every consumer, and, in a residual network, every convolution tied to the same
residual sum). Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds the groups once, on
the original model (:func:`analyze_channel_groups`); :func:`prune_plan` and
:func:`execute_prune_plan` remove chosen channels of several groups at once, in original
coordinates. Shared by :mod:`bocompress.worker.methods.channel_l1` and :mod:`bocompress.worker.methods.channel_lasso`
(with the layer table of :mod:`bocompress.worker.methods.channel_base`).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bocompress.worker import batch as B
from bocompress.worker.layers import attention_layers
from bocompress.worker.methods.base import TYPE_CLASSES, CompressionError

__all__ = [
    "BATCH_NORM",
    "CONV",
    "PER_CHANNEL",
    "SUPPORTED_OPS",
    "ChannelAnalysis",
    "ChannelGroup",
    "GroupMember",
    "ModuleCalls",
    "analyze_channel_groups",
    "dim_size",
    "execute_prune_plan",
    "group_l1_importance",
    "is_type",
    "match_any",
    "prune_plan",
    "with_name",
]

#: Convolutions of any dimension (the base class of Conv1d/2d/3d and their transposes).
CONV = nn.modules.conv._ConvNd
#: BatchNorm of any dimension.
BATCH_NORM = nn.modules.batchnorm._BatchNorm
#: Modules whose parameters are one value per channel (a closed form of one kept count).
PER_CHANNEL = (BATCH_NORM, nn.GroupNorm, nn.LayerNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)
#: Torch-Pruning graph nodes (not modules) that a searchable group may pass through.
SUPPORTED_OPS = frozenset({"ELEMENTWISE", "CONCAT", "SPLIT", "RESHAPE", "SLICE", "OUTPUT"})


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


def dim_size(module: nn.Module, dim: str) -> int | None:
    if isinstance(module, CONV):
        return int(module.out_channels if dim == "out" else module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features if dim == "out" else module.in_features)
    if isinstance(module, BATCH_NORM | nn.modules.instancenorm._InstanceNorm):
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
    if isinstance(module, CONV):
        if module.transposed:
            return f"{name}: transposed convolutions are not supported"
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            return f"{name}: grouped (non-depthwise) convolutions are not supported"
        return ""
    if isinstance(module, nn.Linear):
        return ""
    if isinstance(module, PER_CHANNEL):
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
        if isinstance(mod, CONV | nn.Linear) and isinstance(output, Tensor):
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

    in_attention = attention_layers(work)
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
            if isinstance(target, CONV | nn.Linear):
                dim = "in" if dep.handler.__name__ == "prune_in_channels" else "out"
            else:
                dim = "out"
            problem = _member_problem(target, name) or in_attention.get(name, "")
            if problem:
                problems.append(problem)
            counts: dict[int, int] = {}
            for r in root_idxs:
                counts[r] = counts.get(r, 0) + 1
            per = counts[root_idxs[0]] if root_idxs else 0
            if len(counts) != root_size or any(v != per for v in counts.values()):
                problems.append(f"{name}: its indices do not follow the group's channels one-to-{per}")
            size = dim_size(target, dim)
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
        unsupported = ops - SUPPORTED_OPS
        if unsupported:
            problems.append(f"passes through unsupported operations {sorted(unsupported)}")
        out_layers = tuple(
            sorted(
                {m.module for m in members if m.dim == "out" and isinstance(work.get_submodule(m.module), CONV | nn.Linear)},
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


def is_type(module: nn.Module, type_names: Sequence[str]) -> bool:
    """Whether ``module`` is an instance of one of the named layer types (keys of ``TYPE_CLASSES``)."""
    return any(isinstance(module, TYPE_CLASSES[t]) for t in type_names)


def with_name(group: ChannelGroup, name: str) -> ChannelGroup:
    """A copy of ``group`` searched under another parameter name."""
    return replace(group, name=name)
