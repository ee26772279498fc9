"""Least-squares reconstruction of a layer from its (changed) inputs: the machinery the methods share.

He et al. (ICCV 2017) refit a pruned layer so that it reproduces the ORIGINAL network's output
from the inputs it now gets. This module holds what that needs, for any method:

* :func:`conv_patches` / :class:`PatchStats` / :func:`refit`: sampled input volumes of a conv (or
  rows of a Linear), their sufficient statistics and the ridge-regularised least squares;
* :func:`sample_sites`: one forward pass of the original model that samples output positions of
  each layer to refit and records the original outputs there (done once per job);
* :func:`refit_in_forward`: one forward pass of a compressed copy that refits each site, in
  forward order, from the inputs it receives in the network compressed (and refitted) so far, so
  errors do not accumulate from layer to layer.

``channel_lasso`` selects channels with these statistics and refits; ``channel_l1`` refits the
consumers of its pruned channels; ``svd``/``tucker2`` refit the last factor of a factorized layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bocompress.worker import batch as B

__all__ = [
    "PatchStats",
    "Site",
    "Stop",
    "conv_patches",
    "refit",
    "refit_in_forward",
    "sample_sites",
    "site_problem",
]


class Stop(Exception):
    """Raised by a hook to end a forward pass once the last layer of interest has run."""


def conv_patches(conv: nn.Conv2d, x: Tensor, b: Tensor, oh: Tensor, ow: Tensor) -> Tensor:
    """The input volumes a convolution sees at some output positions.

    Args:
        conv: the convolution (zero padding, ``groups == 1``).
        x: its input, ``batch x in_channels x H x W``.
        b: sample image indices, ``N`` (long).
        oh: output rows, ``N`` (long).
        ow: output columns, ``N`` (long).

    Returns:
        ``N x in_channels x (kh * kw)``: ``conv(x)[b, :, oh, ow] == einsum(patches, weight) + bias``.
    """
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    c = x.shape[1]
    xp = F.pad(x, (pw, pw, ph, ph))
    hp, wp = xp.shape[2], xp.shape[3]
    rows = xp.permute(0, 2, 3, 1).reshape(-1, c)  # (B Hp Wp) x c
    base = (b * hp + oh * sh) * wp + ow * sw  # top-left corner of each window
    taps = torch.tensor([i * dh * wp + j * dw for i in range(kh) for j in range(kw)], device=x.device)
    idx = (base.to(x.device)[:, None] + taps[None, :]).reshape(-1)
    return rows.index_select(0, idx).reshape(b.numel(), kh * kw, c).transpose(1, 2)


@dataclass
class PatchStats:
    """Sufficient statistics of sampled input volumes ``X`` (``N x c*q``) and outputs ``Y`` (``N x n``).

    Both the selection LASSO and the least-squares refit need only these, so one pass over the
    samples serves both. All float64.

    Attributes:
        xx: ``cq x cq``, ``X'X`` (channel-major: column ``i*q + t`` is channel ``i``, tap ``t``).
        xy: ``cq x n``, ``X'Y``.
        xs: ``cq``, column sums of ``X`` (for a bias).
        ys: ``n``, column sums of ``Y``.
        count: ``N``.
        channels: ``c``.
        taps: ``q = kh * kw``.
    """

    xx: Tensor
    xy: Tensor
    xs: Tensor
    ys: Tensor
    count: int
    channels: int
    taps: int

    @classmethod
    def of(cls, patches: Tensor, target: Tensor) -> "PatchStats":
        """Statistics of ``patches`` (``N x c x q``) and ``target`` (``N x n``)."""
        n_s, c, q = patches.shape
        X = patches.reshape(n_s, c * q).to(torch.float64)
        Y = target.to(torch.float64)
        return cls(xx=X.T @ X, xy=X.T @ Y, xs=X.sum(0), ys=Y.sum(0), count=n_s, channels=c, taps=q)

    def columns(self, keep: Tensor) -> Tensor:
        """The ``X`` columns of the kept channels."""
        q = self.taps
        return (keep.to(self.xx.device)[:, None] * q + torch.arange(q, device=self.xx.device)).reshape(-1)




def refit(stats: PatchStats, keep: Tensor, with_bias: bool, ridge: float = 1e-6) -> tuple[Tensor, Tensor | None]:
    """Least squares for the kept part of a layer's weight (and bias), from the statistics.

    Args:
        stats: statistics of the layer's sampled inputs and original outputs.
        keep: kept input channels (``k`` indices).
        with_bias: also fit a bias (only when the layer has one).
        ridge: Tikhonov weight relative to the mean diagonal of ``X'X`` (keeps the solve stable
            when ``N < k q`` or channels are collinear).

    Returns:
        ``(weight, bias)``: ``n x k x q`` and ``n`` (or None), float32.
    """
    cols = stats.columns(keep)
    A = stats.xx[cols][:, cols]
    B = stats.xy[cols]
    if with_bias:
        top = torch.cat([A, stats.xs[cols, None]], dim=1)
        corner = torch.tensor([[float(stats.count)]], dtype=A.dtype, device=A.device)
        A = torch.cat([top, torch.cat([stats.xs[None, cols], corner], dim=1)], dim=0)
        B = torch.cat([B, stats.ys[None, :]], dim=0)
    A = A.clone()
    lam = ridge * float(A.diagonal().mean().clamp_min(1e-300))
    A.diagonal().add_(lam)
    sol = torch.linalg.solve(A, B)  # (kq [+1]) x n
    kq = cols.numel()
    w = sol[:kq].T.reshape(-1, keep.numel(), stats.taps).to(torch.float32)
    bias = sol[kq].to(torch.float32) if with_bias else None
    return w, bias


# --------------------------------------------------------------------------- sites


def site_problem(module: nn.Module) -> str:
    """Why a module cannot be refitted by :func:`refit_in_forward` ("" when it can)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "string padding or a non-zero padding mode"
        return ""
    if isinstance(module, nn.Linear):
        return ""
    return f"{type(module).__name__} is not a Conv2d or Linear"


@dataclass
class Site:
    """A layer to refit: sampled output positions and the original outputs there.

    Attributes:
        name: the module's name in the original model.
        b: ``N`` sample indices (conv) or ``N`` row indices of the flattened input (Linear).
        oh: ``N`` output rows (conv; None for a Linear).
        ow: ``N`` output columns (conv; None for a Linear).
        target: ``N x n`` the original layer's outputs there (bias included), float32.
    """

    name: str
    b: Tensor
    oh: Tensor | None
    ow: Tensor | None
    target: Tensor

    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        """``N x c x q`` inputs of ``module`` (the layer in a compressed copy) at the sampled positions."""
        if isinstance(module, nn.Conv2d):
            return conv_patches(module, x, self.b, self.oh, self.ow)
        rows = x.reshape(-1, x.shape[-1])
        return rows.index_select(0, self.b.to(x.device))[:, :, None]


def sample_sites(
    model: nn.Module, names: Sequence[str], inputs: B.Batch, n_points: int, seed: int = 0
) -> dict[str, Site]:
    """Sample output positions of each named layer; record the original outputs there (one forward pass).

    Args:
        model: the original network (eval mode is forced during the pass).
        names: Conv2d / Linear modules, each running once per forward pass.
        inputs: calibration inputs.
        n_points: positions per layer (fewer when the layer has fewer outputs).
        seed: seed of the sampling.

    Returns:
        name -> :class:`Site` for every layer that ran.
    """
    from bocompress.worker.methods.base import forward_hooked

    gen = torch.Generator().manual_seed(int(seed))
    sites: dict[str, Site] = {}
    modules = {n: model.get_submodule(n) for n in names}
    by_mod = {m: n for n, m in modules.items()}

    def hook(mod: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
        name = by_mod[mod]
        if name in sites:
            return
        if isinstance(mod, nn.Conv2d):
            bsz, _, ho, wo = out.shape
            total = bsz * ho * wo
            pick = torch.randperm(total, generator=gen)[: min(n_points, total)]
            b, rest = pick // (ho * wo), pick % (ho * wo)
            oh, ow = rest // wo, rest % wo
            target = out.detach()[b.to(out.device), :, oh.to(out.device), ow.to(out.device)]
            sites[name] = Site(name, b, oh, ow, target.float().clone())
        else:
            rows = out.detach().reshape(-1, out.shape[-1])
            pick = torch.randperm(rows.shape[0], generator=gen)[: min(n_points, rows.shape[0])]
            sites[name] = Site(name, pick, None, None, rows.index_select(0, pick.to(rows.device)).float().clone())

    forward_hooked(model, inputs, modules.values(), hook)
    return sites


def refit_in_forward(
    model: nn.Module,
    sites: Mapping[str, Site],
    inputs: B.Batch,
    out_keep: Callable[[str], Tensor | None] | None = None,
    fit_bias: bool = True,
    ridge: float = 1e-6,
) -> list[str]:
    """Refit, in place, every site's layer of a compressed copy to reproduce the original outputs.

    One forward pass over ``inputs``: a pre-hook on each site's layer (they run in forward order)
    takes the input it receives in the copy compressed and refitted so far, and solves the least
    squares for the layer's whole weight (and bias, if it has one and ``fit_bias``) against the
    original outputs at the sampled positions. The pass stops after the last site has run.

    Args:
        model: the compressed copy (module names as in the original; the layers' input channels
            may have been removed).
        sites: from :func:`sample_sites` on the original.
        inputs: the calibration inputs the sites were sampled from.
        out_keep: layer name -> the original output channels it still has (None: all of them).
        fit_bias: also refit an existing bias.
        ridge: Tikhonov weight relative to the mean diagonal of ``X'X``.

    Returns:
        The names of the layers refitted.
    """
    from bocompress.worker.methods.base import eval_mode

    todo = [n for n in sites if _has(model, n)]
    if not todo:
        return []
    done: list[str] = []
    left = set(todo)

    def make_hook(name: str) -> Callable[..., None]:
        site = sites[name]

        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in left:
                return
            x = args[0]
            target = site.target.to(x.device)
            keep = out_keep(name) if out_keep is not None else None
            if keep is not None:
                target = target[:, keep.to(target.device)]
            stats = PatchStats.of(site.patches(layer, x), target)
            has_bias = layer.bias is not None and fit_bias
            w, bias = refit(stats, torch.arange(stats.channels), has_bias, ridge)
            layer.weight.data = w.reshape(layer.weight.shape).to(layer.weight)
            if bias is not None:
                layer.bias.data = bias.to(layer.bias)
            left.discard(name)
            done.append(name)
            if not left:
                raise Stop

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in todo]
    try:
        with eval_mode(model), torch.no_grad():
            B.call(model, inputs)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return done


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
