"""Channel pruning by LASSO selection and least-squares reconstruction (He, Zhang, Sun, ICCV 2017).

``theta[l]`` is the fraction of the *input* channels of convolution ``l`` kept; removing an input
channel of ``l`` removes the matching output channel of its producer convolution (and of the
BatchNorm between them). For each layer, in forward order:

1. sample ``N`` output positions of ``l`` on calibration inputs: the input volumes ``X``
   (``N x c x kh*kw``, from the network pruned so far) and the ORIGINAL network's outputs ``Y``
   (``N x n``), so that errors do not accumulate from layer to layer;
2. channel selection: with ``W`` fixed, a non-negative LASSO on the channel-selection vector
   ``beta`` (``Y ~ sum_i beta_i X_i W_i^T``, solved by coordinate descent on the ``c x c`` Gram
   matrix), bisecting the penalty ``alpha`` until exactly ``kept(theta, c)`` channels are non-zero
   (the largest ``beta`` when no ``alpha`` gives the exact count);
3. reconstruction: least squares for the kept part of ``W`` (and the bias, if the layer has one)
   to reproduce ``Y``.

A convolution is searchable when its input channels are free: they come from a single
convolution through BatchNorm/activation/pooling only, and nothing else reads them (in a
residual network: the second convolution of a basic block, not the ones tied to the residual
sum). What does not depend on theta (sample positions, the original outputs, the original input
volumes and their statistics) is computed once in the constructor; a trial costs one forward
pass over the calibration inputs (each layer is refitted inside it, by a pre-hook) plus small
solves.

The selection itself (the LASSO, the least squares, the paper's baselines) is
:mod:`bocompress.worker.methods.channel_select`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bocompress.costs import kept
from bocompress.worker import batch as B
from bocompress.worker.methods.base import CompressionError, CompressorOptions, eval_mode, theta_value
from bocompress.worker.methods.channel_base import ChannelCompressorBase
from bocompress.worker.methods.channel_groups import (
    BATCH_NORM,
    PER_CHANNEL,
    ChannelGroup,
    execute_prune_plan,
    is_type,
    match_any,
    prune_plan,
    with_name,
)
from bocompress.worker.methods.channel_select import select_channels, selection_problem
from bocompress.worker.methods.lsq import PatchStats, Stop, conv_patches, refit

__all__ = ["ChannelLassoCompressor"]

#: Default number of sampled output positions per layer (the LASSO and the least squares).
DEFAULT_POINTS = 2000
#: Calibration samples the positions are drawn from (and that each trial's forward pass runs on).
CALIB_SAMPLES = 256


# --------------------------------------------------------------------------- the compressor


@dataclass
class _LayerCache:
    """What a searchable layer needs, independent of theta.

    Attributes:
        group: its channel group (named after the layer; prunes the producer's outputs).
        producer: the convolution whose output channels are its input channels.
        b: ``N`` sampled image indices (into the calibration batch).
        oh: ``N`` sampled output rows.
        ow: ``N`` sampled output columns.
        patches: ``N x c x q`` the input volumes there, in the original network.
        target: ``N x n`` the original layer's outputs there (bias included).
        stats: :class:`PatchStats` of ``patches`` and ``target`` (computed on first use; kept
            when small).
    """

    group: ChannelGroup
    producer: str
    b: Tensor
    oh: Tensor
    ow: Tensor
    patches: Tensor
    target: Tensor
    stats: PatchStats | None = None


#: Largest ``c * q`` whose original-input statistics (``(c q)^2`` float64) are kept between trials.
_KEEP_STATS_UP_TO = 2048


class ChannelLassoCompressor(ChannelCompressorBase):
    """He et al. 2017 channel pruning: LASSO channel selection + least-squares reconstruction.

    Search parameters: one per searchable Conv2d ``l`` (named after it): the fraction of its
    input channels kept. ``l`` is searchable when it matches ``layer_patterns``, has
    ``groups == 1`` and zero padding, and its input channels come from one convolution (through
    BatchNorm/activations/pooling only) that feeds nothing else.

    Args:
        model: the trained network (left untouched).
        layer_patterns: fnmatch globs over module names.
        theta_min: the lower bound of every search parameter.
        example_input: a batch of inputs, ``batch x ...`` (graph tracing; calibration by default).
        method_map: the job's ``method`` (a name or a ``{"Conv2d": method, ...}`` mapping).
        calib_inputs: a larger calibration batch, ``batch x ...``, to sample input volumes from.
        n_points: sampled output positions per layer (He et al.'s code fits on a few hundred).
        seed: seed of the position sampling.

    Raises:
        NoLayerMatched: when a pattern matches no searchable convolution.
    """

    method = "channel_lasso"
    supported = ("Conv2d",)

    def __init__(
        self,
        model: nn.Module,
        layer_patterns: list[str],
        theta_min: float,
        example_input: Tensor,
        method_map: str | dict[str, str] = "channel_lasso",
        options: CompressorOptions | None = None,
        *,
        calib_inputs: Tensor | None = None,
        n_points: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, layer_patterns, theta_min, example_input, method_map, options)
        n_points = DEFAULT_POINTS if n_points is None else n_points
        if n_points < 1:
            raise CompressionError(f"n_points must be >= 1, got {n_points}")
        self._setup(model, example_input)
        if calib_inputs is None:
            calib_inputs = self.options.calib_inputs
        if calib_inputs is not None:
            calib_inputs = B.head(calib_inputs, min(B.n_samples(calib_inputs), CALIB_SAMPLES))
        self.calib_inputs = example_input if calib_inputs is None else calib_inputs
        self.n_points = int(n_points)
        self.seed = int(self.options.seed if seed is None else seed)
        rank = {n: i for i, n in enumerate(self._analysis.order)}
        found: list[tuple[str, str, ChannelGroup]] = []
        for g in self._analysis.groups:
            for consumer, problem in self._consumers(g):
                if not match_any(consumer, self.layer_patterns):
                    continue
                touched = [consumer, *g.out_layers]
                if any(self.excluded(n) for n in touched):
                    self._skipped[consumer] = "excluded by the job's layer patterns (it or its producer; left dense)"
                elif problem:
                    self._skipped[consumer] = problem
                else:
                    found.append((consumer, g.out_layers[0], g))
        seen = {c for c, _, _ in found} | set(self._skipped)
        for name, mod in model.named_modules():
            if name not in seen and is_type(mod, self._types) and match_any(name, self.layer_patterns):
                self._skipped[name] = "its input channels do not come from a prunable convolution (e.g. the model input)"
        found.sort(key=lambda t: rank.get(t[0], len(rank)))
        for consumer, _, g in found:
            self._groups.append(with_name(g, consumer))
            self._matchable.append(consumer)
        self._layers: dict[str, _LayerCache] = {}
        if self._groups:
            self._sample([(c, p, g) for (c, p, _), g in zip(found, self._groups)])
        self._finish_profile()

    # -- which convolutions have free input channels -----------------------------------------

    def _consumers(self, g: ChannelGroup) -> list[tuple[str, str]]:
        """The Conv2d layers reading a group's channels, each with why it cannot be searched.

        Returns:
            ``(name, problem)`` pairs; ``problem`` is "" for the one searchable case: a single
            plain Conv2d reading the channels of a single plain Conv2d.
        """
        mods = {m.module: self.model.get_submodule(m.module) for m in g.members}
        consumers = [m.module for m in g.members if m.dim == "in" and is_type(mods[m.module], self._types)]
        readers = [m.module for m in g.members if m.dim == "in"]
        if not consumers:
            return []
        if g.touches_output:
            return [(n, "its input channels also reach the model output") for n in consumers]
        if len(g.out_layers) != 1:
            why = f"its input channels are tied to several layers {list(g.out_layers)} (a residual sum)"
            return [(n, why) for n in consumers]
        if len(readers) != 1:
            return [(n, f"its input channels are also read by {[r for r in readers if r != n]}") for n in consumers]
        name, conv, producer = consumers[0], mods[consumers[0]], mods[g.out_layers[0]]
        if g.problem:
            return [(name, g.problem)]
        if not isinstance(producer, nn.Conv2d) or producer.groups != 1:
            return [(name, f"its producer {g.out_layers[0]} is not a plain Conv2d")]
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return [(name, "grouped convolutions, string padding and non-zero padding modes are not supported")]
        if g.ops - {"ELEMENTWISE"}:
            return [(name, f"its input passes through {sorted(g.ops - {'ELEMENTWISE'})}")]
        for m in g.members:
            mod = mods[m.module]
            if m.module not in (name, g.out_layers[0]) and not isinstance(mod, (BATCH_NORM, *PER_CHANNEL)):
                return [(name, f"{m.module} ({type(mod).__name__}) also uses its input channels")]
        for n in (name, g.out_layers[0]):
            if len(self._analysis.calls[n].out_shapes) != 1:
                return [(name, f"{n} runs more than once per forward pass")]
        return [(name, "")]

    # -- theta-independent caches --------------------------------------------------------------

    def _sample(self, layers: Sequence[tuple[str, str, ChannelGroup]]) -> None:
        """Sample positions; record the original inputs and outputs there (one forward pass)."""
        x = self.calib_inputs
        gen = torch.Generator().manual_seed(self.seed)
        byname = {c: (p, g) for c, p, g in layers}
        handles = []

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            name = names[mod]
            inp = args[0].detach()
            bsz, _, ho, wo = out.shape
            total = bsz * ho * wo
            pick = torch.randperm(total, generator=gen)[: min(self.n_points, total)]
            b, rest = pick // (ho * wo), pick % (ho * wo)
            oh, ow = rest // wo, rest % wo
            producer, group = byname[name]
            self._layers[name] = _LayerCache(
                group=group,
                producer=producer,
                b=b,
                oh=oh,
                ow=ow,
                patches=conv_patches(mod, inp, b, oh, ow),
                target=out.detach()[b, :, oh, ow].clone(),
            )

        names = {}
        for c in byname:
            mod = self.model.get_submodule(c)
            names[mod] = c
            handles.append(mod.register_forward_hook(hook))
        try:
            with eval_mode(self.model), torch.no_grad():
                B.call(self.model, x)
        except Exception as exc:
            raise CompressionError(f"channel_lasso: the model failed on the calibration inputs: {exc}") from exc
        finally:
            for h in handles:
                h.remove()
        missing = [c for c in byname if c not in self._layers]
        if missing:
            raise CompressionError(f"channel_lasso: layers {missing} did not run on the calibration inputs")

    def unrepaired_layers(self, theta: Mapping[str, float]) -> list[str]:
        """None: every pruned layer (and every one after it) is refitted to the original's outputs."""
        return []

    def group_scores(self, g: ChannelGroup) -> Tensor:
        """Each input channel's contribution energy to the layer's output on the calibration samples.

        ``|X_i W_i'|^2``: the diagonal of the selection LASSO's Gram matrix.
        """
        conv = self.model.get_submodule(g.name)
        G, _ = selection_problem(self._original_stats(g.name), conv.weight, conv.bias)
        return torch.from_numpy(np.ascontiguousarray(np.diag(G)))

    def _original_stats(self, name: str) -> PatchStats:
        cache = self._layers[name]
        if cache.stats is not None:
            return cache.stats
        stats = PatchStats.of(cache.patches, cache.target)
        if stats.channels * stats.taps <= _KEEP_STATS_UP_TO:
            cache.stats = stats
        return stats

    # -- the protocol --------------------------------------------------------------------------

    def apply(self, theta: dict[str, float]) -> nn.Module:
        """A new model: each searchable layer keeps its LASSO-selected input channels, refitted.

        Args:
            theta: keep-ratio per search parameter (layer name); other keys are ignored.

        Returns:
            The pruned copy; the original model is untouched.
        """
        return self.apply_with_selection(theta)[0]

    def apply_with_selection(self, theta: Mapping[str, float]) -> tuple[nn.Module, dict[str, Tensor]]:
        """:meth:`apply`, also returning the kept input channels of every refitted layer.

        One forward pass of the copy over the calibration inputs does all the work: a pre-hook on
        each layer (in forward order, from the first one pruned) receives the layer's input in
        the network pruned so far, selects and refits the layer against the original outputs,
        prunes it with its producer, and passes on only the kept channels. Layers after the first
        pruned one are refitted even at ``theta = 1`` (their inputs changed); layers before it
        are left as they are.

        Args:
            theta: keep-ratio per search parameter (layer name).

        Returns:
            ``(model, keep)``: the pruned copy and, per refitted layer, its kept input channels
            (sorted indices into the original channels).
        """
        ks = {g.name: kept(theta_value(theta, g.name), g.size) for g in self._groups}
        model = copy.deepcopy(self.model)
        start = next((i for i, g in enumerate(self._groups) if ks[g.name] < g.size), None)
        if start is None:
            return model, {}
        todo = [g.name for g in self._groups[start:]]
        keeps: dict[str, Tensor] = {}

        def make_hook(name: str, first: bool) -> Any:
            cache = self._layers[name]

            def hook(conv: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                if first:
                    stats = self._original_stats(name)
                else:
                    stats = PatchStats.of(conv_patches(conv, x, cache.b, cache.oh, cache.ow), cache.target)
                keep, w, bias = self.select_and_fit(stats, conv, ks[name])
                removed = sorted(set(range(stats.channels)) - set(keep.tolist()))
                execute_prune_plan(model, prune_plan([(cache.group, removed)]))
                conv.weight.data = w.reshape(conv.out_channels, keep.numel(), *conv.kernel_size).to(conv.weight)
                if bias is not None:
                    conv.bias.data = bias.to(conv.bias)
                keeps[name] = keep
                return (x[:, keep.to(x.device)], *args[1:])

            return hook

        def stop(_m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
            raise Stop

        handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n, i == 0)) for i, n in enumerate(todo)]
        handles.append(model.get_submodule(todo[-1]).register_forward_hook(stop))
        try:
            with eval_mode(model), torch.no_grad():
                B.call(model, self.calib_inputs)
        except Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(keeps) != len(todo):
            raise CompressionError(f"channel_lasso: layers {[n for n in todo if n not in keeps]} did not run")
        return model, keeps


    def select_and_fit(self, stats: PatchStats, conv: nn.Module, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer's step: the ``k`` kept input channels (the LASSO) and the least-squares weights
        (``n x k*kh*kw``) and bias that reproduce the original outputs from them.

        He et al.'s baselines ("first k", "max response") and selection without reconstruction
        replace this one method (``bench/paper/channel_selection.py``).
        """
        keep = select_channels(stats, conv.weight, conv.bias, k)
        w, bias = refit(stats, keep, conv.bias is not None)
        return keep, w, bias


#: The class the method registry builds for ``channel_lasso``.
COMPRESSOR = ChannelLassoCompressor
