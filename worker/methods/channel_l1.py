"""Dependency-aware L1-norm channel pruning (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

One search parameter per prunable *dependency group*: the set of layers whose channels must be
removed together (a convolution's output channels, the BatchNorm after it, the input channels of
every consumer, and, in a residual network, every convolution tied to the same residual sum).
Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds the groups once, on the original
model; ``theta[group]`` is the fraction of the group's channels kept, and the kept channels are
those whose filters have the largest L1 norm (averaged over the group's producing layers).

The group analysis and the pruning plans are :mod:`bocompress.worker.methods.channel_groups`; the exact
layer table and the base class it shares with :mod:`bocompress.worker.methods.channel_lasso` are
:mod:`bocompress.worker.methods.channel_base`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from bocompress.worker import batch as B
from bocompress.worker.methods.base import CompressorOptions
from bocompress.worker.methods.channel_base import ChannelCompressorBase
from bocompress.worker.methods.channel_groups import (
    GroupMember,
    ModuleCalls,
    execute_prune_plan,
    group_l1_importance,
    is_type,
    match_any,
    prune_plan,
)
from bocompress.worker.methods.lsq import Site, refit_in_forward, sample_sites, site_problem

__all__ = ["ChannelL1Compressor"]

#: Least-squares correction of the pruned layers' consumers on by default (see docs/proxy.md).
DEFAULT_LS = True
#: Calibration samples the least-squares correction samples positions from.
LS_SAMPLES = 256


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
            typed = [n for n in g.out_layers if is_type(model.get_submodule(n), self._types)]
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

    def unrepaired_layers(self, theta: Mapping[str, float]) -> list[str]:
        """Consumers of pruned channels that the least squares does not refit (all of them without it).

        A pruned producer and its BatchNorm keep their other channels as they were; a refitted
        consumer reproduces the original's output.
        """
        ks = self._kept(theta)
        cut = [g for g in self._groups if ks[g.name] < g.size]
        if not self.ls_correction:
            return list(dict.fromkeys(m for g in cut for m in g.member_modules()))
        sites = self._refit_sites()
        return list(dict.fromkeys(m.module for g in cut for m in g.members if m.dim == "in" and m.module not in sites))

    def reconstruct(self, pruned: nn.Module, plan: Mapping[tuple[str, str], tuple[GroupMember, list[int]]]) -> list[str]:
        """Refit, by least squares, each consumer whose input channels were removed (He et al.'s step 2).

        The refit layer reproduces the original network's output (its kept output channels) from
        the inputs it now receives, layer after layer in forward order (:mod:`bocompress.worker.methods.lsq`).

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


#: The class the method registry builds for ``channel_l1``.
COMPRESSOR = ChannelL1Compressor
