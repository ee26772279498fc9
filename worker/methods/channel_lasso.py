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

The baselines of the paper, :func:`select_first_k` and :func:`select_max_response`, are here too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bocompress.costs import kept
from worker import batch as B
from worker.methods.base import CompressionError, CompressorOptions, eval_mode, theta_value
from worker.methods.lsq import PatchStats, Stop, conv_patches, refit
from worker.methods.channel_l1 import (
    _BN,
    _PER_CHANNEL,
    ChannelCompressorBase,
    ChannelGroup,
    _is_type,
    execute_prune_plan,
    match_any,
    prune_plan,
    with_name,
)

__all__ = [
    "ChannelLassoCompressor",
    "PatchStats",
    "conv_patches",
    "lasso_select",
    "least_squares_weight",
    "refit",
    "relative_error",
    "select_channels",
    "select_first_k",
    "select_max_response",
    "selection_problem",
]

#: Default number of sampled output positions per layer (the LASSO and the least squares).
DEFAULT_POINTS = 2000
#: Calibration samples the positions are drawn from (and that each trial's forward pass runs on).
CALIB_SAMPLES = 256


# --------------------------------------------------------------------------- baselines


def select_first_k(weight: Tensor, k: int) -> Tensor:
    """The "first k" baseline of He et al.: keep input channels ``0 .. k-1``.

    Args:
        weight: the consumer convolution's weight, ``out x in x kh x kw``.
        k: number of input channels to keep.

    Returns:
        ``k`` sorted channel indices (long).
    """
    _check_k(weight, k)
    return torch.arange(k)


def select_max_response(weight: Tensor, k: int) -> Tensor:
    """The "max response" baseline: the ``k`` input channels with the largest ``sum |w|``.

    (Li et al.'s L1 norm, applied to the consumer's input-channel slices.)

    Args:
        weight: the consumer convolution's weight, ``out x in x kh x kw``.
        k: number of input channels to keep.

    Returns:
        ``k`` sorted channel indices (long).
    """
    _check_k(weight, k)
    score = weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).sum(dim=1)
    order = torch.argsort(-score.to(torch.float64), stable=True)
    return torch.sort(order[:k]).values


def _check_k(weight: Tensor, k: int) -> None:
    if weight.dim() < 2:
        raise CompressionError(f"expected a conv weight (out x in x ...), got shape {tuple(weight.shape)}")
    if not 1 <= k <= weight.shape[1]:
        raise CompressionError(f"cannot keep {k} of {weight.shape[1]} input channels")


def relative_error(pred: Tensor, target: Tensor) -> float:
    """``||pred - target||^2 / ||target||^2`` (the relative MSE of a layer's output)."""
    t = target.detach().to(torch.float64)
    return float(((pred.detach().to(torch.float64) - t) ** 2).sum() / (t**2).sum().clamp_min(1e-300))


# --------------------------------------------------------------------------- sampling


def selection_problem(stats: PatchStats, weight: Tensor, bias: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of the channel-selection LASSO, from the patch statistics.

    With ``Z_i = X_i W_i'`` (channel ``i``'s contribution to the output, ``N x n``) and the target
    ``Y - bias``, returns ``G[i, j] = <Z_i, Z_j> / (N n)`` and ``r[i] = <Z_i, Y - bias> / (N n)``,
    computed as ``G = sum over taps of (X'X o W'W)`` without forming ``Z``.

    Args:
        stats: statistics of the layer's sampled inputs and original outputs.
        weight: the layer's weight, ``n x c x kh x kw``.
        bias: its bias (``n``) or None.

    Returns:
        ``(G, r)``: ``c x c`` and ``c`` float64 arrays.
    """
    c, q = stats.channels, stats.taps
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], c * q)  # n x cq
    n = w.shape[0]
    G = (stats.xx * (w.T @ w)).reshape(c, q, c, q).sum(dim=(1, 3))
    xy = stats.xy
    if bias is not None:
        xy = xy - stats.xs[:, None] * bias.detach().to(torch.float64)[None, :]
    r = (xy * w.T).reshape(c, q * n).sum(dim=1)
    scale = float(stats.count * n)
    return (G / scale).cpu().numpy(), (r / scale).cpu().numpy()


def _nonneg_lasso(G: np.ndarray, r: np.ndarray, alphas: np.ndarray, max_sweeps: int, tol: float) -> np.ndarray:
    """Coordinate descent for ``min_b 1/2 b'Gb - r'b + alpha sum(b)``, ``b >= 0``, for many alphas.

    Args:
        G: ``c x c`` Gram matrix (positive semi-definite).
        r: ``c`` correlations.
        alphas: ``A`` penalties, solved together (one column each).
        max_sweeps: most passes over the coordinates.
        tol: stop when no coefficient moves more than ``tol`` (relative to the largest).

    Returns:
        ``c x A`` solutions.
    """
    c = G.shape[0]
    B = np.zeros((c, alphas.size))
    R = np.repeat(r[:, None], alphas.size, axis=1)  # r - G B
    diag = np.diag(G)
    live = [i for i in range(c) if diag[i] > 1e-12 * max(float(diag.max()), 1e-300)]
    for _ in range(max_sweeps):
        moved = 0.0
        for i in live:
            new = np.maximum(B[i] + (R[i] - alphas) / diag[i], 0.0)
            d = new - B[i]
            if d.any():
                R -= np.outer(G[:, i], d)
                B[i] = new
                moved = max(moved, float(np.abs(d).max()))
        if moved <= tol * max(float(B.max()), 1e-12):
            break
    return B


def lasso_select(
    patches: Tensor,
    weight: Tensor,
    target: Tensor,
    k: int,
    bias: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """He et al.'s channel selection: a LASSO on the channel weights ``beta``, with ``W`` fixed.

    Solves ``min 1/(2Nn) ||Y - b - sum_i beta_i X_i W_i'||^2 + alpha ||beta||_1`` (``beta >= 0``) on a
    grid of ``alpha`` and narrows the grid around the count ``k`` (a multi-point bisection), until a
    solution with exactly ``k`` non-zero channels appears; otherwise the ``k`` largest ``beta`` of the
    sparsest solution with at least ``k`` non-zeros are kept.

    Args:
        patches: ``N x c x q`` sampled input volumes of the layer.
        weight: the layer's weight, ``n x c x kh x kw``.
        target: ``N x n`` the original layer's outputs (bias included).
        k: number of channels to keep, ``1 <= k <= c``.
        bias: the layer's bias (``n``), or None.
        **options: ``n_alphas``, ``rounds``, ``max_sweeps``, ``tol`` of the search.

    Returns:
        ``k`` sorted channel indices (long).
    """
    _check_k(weight, k)
    if k == patches.shape[1]:
        return torch.arange(k)
    return select_channels(PatchStats.of(patches, target), weight, bias, k, **options)


def select_channels(stats: PatchStats, weight: Tensor, bias: Tensor | None, k: int, **options: Any) -> Tensor:
    """:func:`lasso_select` from precomputed statistics."""
    _check_k(weight, k)
    if k == stats.channels:
        return torch.arange(k)
    G, r = selection_problem(stats, weight, bias)
    return _select_from_gram(G, r, k, **options)


def _select_from_gram(
    G: np.ndarray, r: np.ndarray, k: int, *, n_alphas: int = 16, rounds: int = 4, max_sweeps: int = 200, tol: float = 1e-6
) -> Tensor:
    c = G.shape[0]
    a_max = max(float(r.max()), 1e-300)  # at alpha >= max(r) the solution is zero
    lo, hi = math.log(a_max * 1e-7), math.log(a_max)
    best: np.ndarray | None = None
    for _ in range(rounds):
        alphas = np.exp(np.linspace(lo, hi, n_alphas))
        B = _nonneg_lasso(G, r, alphas, max_sweeps, tol)
        nnz = (B > 0).sum(axis=0)
        exact = np.flatnonzero(nnz == k)
        if exact.size:
            best = B[:, exact[-1]]
            break
        enough = np.flatnonzero(nnz >= k)
        if enough.size == 0:  # even the weakest penalty keeps fewer (dead or duplicate channels)
            best = B[:, 0]
            break
        j = int(enough[-1])
        best = B[:, j]
        if j + 1 >= n_alphas:
            break
        lo, hi = math.log(alphas[j]), math.log(alphas[j + 1])
    assert best is not None
    # largest beta first; ties (zeros) broken by the channel's energy, then by index
    order = sorted(range(c), key=lambda i: (-best[i], -G[i, i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def least_squares_weight(
    patches: Tensor, target: Tensor, with_bias: bool, ridge: float = 1e-6
) -> tuple[Tensor, Tensor | None]:
    """Reconstruct a layer's weight from its kept input channels by (lightly ridged) least squares.

    Args:
        patches: ``N x k x q`` input volumes of the kept channels.
        target: ``N x n`` outputs of the original layer (bias included).
        with_bias: also fit a bias (only when the layer has one).
        ridge: Tikhonov weight relative to the mean diagonal of ``X'X``.

    Returns:
        ``(weight, bias)``: ``n x k x q`` and ``n`` (or None), float32.
    """
    return refit(PatchStats.of(patches, target), torch.arange(patches.shape[1]), with_bias, ridge)


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
            if name not in seen and _is_type(mod, self._types) and match_any(name, self.layer_patterns):
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
        consumers = [m.module for m in g.members if m.dim == "in" and _is_type(mods[m.module], self._types)]
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
            if m.module not in (name, g.out_layers[0]) and not isinstance(mod, (_BN, *_PER_CHANNEL)):
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
                keep = select_channels(stats, conv.weight, conv.bias, ks[name])
                w, bias = refit(stats, keep, conv.bias is not None)
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


#: The class the method registry builds for ``channel_lasso``.
COMPRESSOR = ChannelLassoCompressor
