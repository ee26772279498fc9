"""Channel selection of He, Zhang, Sun (ICCV 2017): the non-negative LASSO and the paper's baselines.

For one convolution with sampled input volumes ``X`` (``N x c x kh*kw``) and the original
outputs ``Y`` (``N x n``): a non-negative LASSO on the channel-selection vector ``beta``
(``Y ~ sum_i beta_i X_i W_i^T``, coordinate descent on the ``c x c`` Gram matrix), bisecting the
penalty until exactly ``k`` channels are non-zero (:func:`lasso_select`, :func:`select_channels`),
then least squares for the kept part of ``W`` (:func:`least_squares_weight`). The baselines of
the paper, :func:`select_first_k` and :func:`select_max_response`, are here too.
:mod:`bocompress.worker.methods.channel_lasso` runs these layer after layer inside a pruned network.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bocompress.worker.methods.base import CompressionError
from bocompress.worker.methods.lsq import PatchStats, refit

__all__ = [
    "lasso_select",
    "least_squares_weight",
    "relative_error",
    "select_channels",
    "select_first_k",
    "select_max_response",
    "selection_problem",
]


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
