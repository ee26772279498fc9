"""ChipNet's gates and budgets: the relaxation, the exact budget ratios, the projection, the hard prune.

The pieces :func:`bocompress.worker.strategies.chipnet.chipnet` trains with (Tiwari et al., ICLR 2021):

* :func:`logistic` and :func:`continuous_heaviside`: z̃ = 1/(1+e^{−βζ}), z = 1 − e^{−γz̃} + z̃·e^{−γ};
* :class:`BudgetModel`: the four budgets (channels, activation volume, params, FLOPs) as exact ratios
  of the kept channels, from the model's closed-form cost table;
* :class:`Gates`: one gate per channel of every prunable BatchNorm channel group;
* :func:`project`: the final projection onto the budget when the gates are not crisp;
* :func:`hard_prune`: the channels physically removed, the gate values folded into BatchNorm.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from bocompress.worker.methods.base import CompressionError
from bocompress.worker.methods.channel_base import build_cost_table
from bocompress.worker.methods.channel_groups import ChannelAnalysis, ChannelGroup, execute_prune_plan, prune_plan
from bocompress.worker.strategies.training import count_params

__all__ = ["BUDGET_TYPES", "BudgetModel", "Gates", "continuous_heaviside", "gated_groups", "hard_prune", "kept_counts",
           "logistic", "project"]

#: The four budgets of ChipNet, each a ratio to the dense model.
BUDGET_TYPES = ("channels", "activation", "params", "flops")

_BN = nn.modules.batchnorm._BatchNorm


def logistic(zeta: Tensor, beta: float) -> Tensor:
    """``z~ = 1 / (1 + exp(-beta * zeta))`` (the paper's generalized logistic)."""
    return torch.sigmoid(beta * zeta)


def continuous_heaviside(z_tilde: Tensor, gamma: float) -> Tensor:
    """``z = 1 - exp(-gamma * z~) + z~ * exp(-gamma)``: 0 at 0, 1 at 1, steep near 0 for large gamma."""
    return 1.0 - torch.exp(-gamma * z_tilde) + z_tilde * math.exp(-gamma)


class BudgetModel:
    """The four budgets ``V`` as exact ratios of kept counts of the gated groups.

    Built from the closed-form layer table of :func:`build_cost_table` (every cost is a sum of terms
    ``coef * prod(kept_g)`` with at most two factors); layers no gated group touches are a constant.
    :meth:`ratio` takes one count per group -- soft (``sum(z)``, differentiable) or hard (kept
    channels) -- and equals the measured ratio of the pruned model for hard counts.

    Args:
        model: the dense model.
        analysis: its channel analysis.
        groups: the gated groups (their ``name`` is the factor name of the forms).
    """

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, groups: list[ChannelGroup]) -> None:
        layers, totals = build_cost_table(model, analysis, groups, "chipnet", count_params)
        index = {g.name: i for i, g in enumerate(groups)}
        self.totals = {k: float(totals[k]) for k in BUDGET_TYPES}
        self._forms: dict[str, tuple[float, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]] = {}
        for kind in BUDGET_TYPES:
            const = self.totals[kind]
            lin_c, lin_i, bil_c, bil_i, bil_j = [], [], [], [], []
            for lay in layers:
                form = lay["costs"].get(kind)
                if form is None:
                    continue
                const -= float(lay["dense"][kind])
                for t in form["terms"]:
                    ps = [index[f["param"]] for f in t["factors"]]
                    if not ps:
                        const += float(t["coef"])
                    elif len(ps) == 1:
                        lin_c.append(float(t["coef"]))
                        lin_i.append(ps[0])
                    elif len(ps) == 2:
                        bil_c.append(float(t["coef"]))
                        bil_i.append(ps[0])
                        bil_j.append(ps[1])
                    else:  # pragma: no cover - the channel forms have at most two factors
                        raise CompressionError(f"{lay['name']}: a cost term with {len(ps)} factors")
            f64 = torch.float64
            self._forms[kind] = (
                const,
                torch.tensor(lin_c, dtype=f64), torch.tensor(lin_i, dtype=torch.long),
                torch.tensor(bil_c, dtype=f64), torch.tensor(bil_i, dtype=torch.long), torch.tensor(bil_j, dtype=torch.long),
                torch.tensor(0.0, dtype=f64),
            )

    def cost(self, kind: str, counts: Tensor) -> Tensor:
        """The absolute cost of ``kind`` for ``counts`` (one kept count per group, float)."""
        const, lc, li, bc, bi, bj, _ = self._forms[kind]
        c = counts.to(torch.float64)
        return const + (lc * c[li]).sum() + (bc * c[bi] * c[bj]).sum()

    def ratio(self, kind: str, counts: Tensor) -> Tensor:
        """``cost / dense cost`` of ``kind`` for ``counts``."""
        return self.cost(kind, counts) / self.totals[kind]


# --------------------------------------------------------------------------- gates


class Gates(nn.Module):
    """One gate ``zeta`` per channel of each gated group, attached to its BatchNorms by hooks.

    Args:
        model: the model the hooks go on (the working copy).
        groups: the gated groups (each has at least one BatchNorm member along ``out``).
        zeta_init: ``zeta ~ U(0, zeta_init)``.
        gen: seeds the init.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], zeta_init: float, gen: torch.Generator) -> None:
        super().__init__()
        self.groups = groups
        self.zetas = nn.ParameterList([nn.Parameter(torch.rand(g.size, generator=gen) * zeta_init) for g in groups])
        self.beta = 1.0
        self.gamma = 2.0
        # per BatchNorm: (its size, [(group index, its channel indices, the group channels they follow)])
        self._sites: dict[str, tuple[int, list[tuple[int, Tensor, Tensor]]]] = {}
        for gi, g in enumerate(groups):
            for m in g.members:
                mod = model.get_submodule(m.module)
                if m.dim == "out" and isinstance(mod, _BN):
                    size, parts = self._sites.setdefault(m.module, (int(mod.num_features), []))
                    parts.append((gi, torch.tensor(m.target_idxs), torch.tensor(m.root_idxs)))
        self._handles: list[Any] = []
        self._step_z: list[Tensor] | None = None
        object.__setattr__(self, "_model", model)  # not a submodule: the gates own only their zetas

    def z_tilde(self, i: int) -> Tensor:
        """The logistic ``z~`` of group ``i`` (``size``)."""
        return logistic(self.zetas[i], self.beta)

    def z(self, i: int) -> Tensor:
        """The gate ``z`` of group ``i`` (``size``)."""
        return continuous_heaviside(self.z_tilde(i), self.gamma)

    def all_z(self) -> list[Tensor]:
        """``z`` of every group."""
        return [self.z(i) for i in range(len(self.groups))]

    def crispness(self) -> Tensor:
        """``mean((z~ - z)^2)`` over all gates."""
        return torch.cat([(self.z_tilde(i) - self.z(i)).pow(2) for i in range(len(self.groups))]).mean()

    def site_vector(self, bn: str, zs: list[Tensor]) -> Tensor:
        """The per-channel multiplier of BatchNorm ``bn`` (1 where no gated group covers a channel)."""
        size, parts = self._sites[bn]
        vec = torch.ones(size, dtype=zs[0].dtype, device=zs[0].device)
        for gi, t, r in parts:
            vec = vec.index_put((t.to(vec.device),), zs[gi][r.to(vec.device)])
        return vec

    def attach(self) -> None:
        """Register the gating hooks on the model's BatchNorms (a fused ``act`` child: its input)."""
        self.detach()

        def gate(bn: str, x: Tensor) -> Tensor:
            vec = self.site_vector(bn, self.step_z()).to(x.dtype)
            return x * vec.view(1, -1, *([1] * (x.dim() - 2)))

        for bn in self._sites:
            mod = self._model.get_submodule(bn)
            act = getattr(mod, "act", None)
            if isinstance(act, nn.Module) and any(act is c for c in mod.children()):
                self._handles.append(act.register_forward_pre_hook(lambda _m, args, bn=bn: (gate(bn, args[0]), *args[1:])))
            else:
                self._handles.append(mod.register_forward_hook(lambda _m, _a, out, bn=bn: gate(bn, out)))

    def step_z(self) -> list[Tensor]:
        """``z`` of every group, computed once per step (the hooks and the losses share it)."""
        if self._step_z is None:
            self._step_z = self.all_z()
        return self._step_z

    def new_step(self) -> None:
        """Forget the step's gate values (call before each step and after a schedule change)."""
        self._step_z = None

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


# --------------------------------------------------------------------------- result


def gated_groups(model: nn.Module, analysis: ChannelAnalysis) -> list[ChannelGroup]:
    """The channel groups that get a gate: the prunable ones with a BatchNorm among their outputs."""
    out = []
    for g in analysis.groups:
        if g.touches_output or g.problem:
            continue
        if any(m.dim == "out" and isinstance(model.get_submodule(m.module), _BN) for m in g.members):
            out.append(g)
    return out


def kept_counts(masks: list[Tensor]) -> Tensor:
    """The number of kept channels of each group (float64, as the budget model counts)."""
    return torch.tensor([float(m.sum()) for m in masks], dtype=torch.float64)


def project(zetas: list[Tensor], budget: BudgetModel, kind: str, target: float) -> list[Tensor]:
    """The projection step: the most channels, in ``zeta`` order, whose exact ratio is ``<= target``.

    Every group keeps at least its highest-``zeta`` channel. The ratio only grows as channels are
    added, so the longest feasible prefix of the ranking is found by bisection.

    Args:
        zetas: the gates of each group (``size_g`` each).
        budget: the budget model.
        kind: the budget type.
        target: ``V0``.

    Returns:
        A bool keep-mask per group.
    """
    sizes = [len(z) for z in zetas]
    forced = [int(torch.argmax(z)) for z in zetas]
    rest_g, rest_c, rest_v = [], [], []
    for gi, z in enumerate(zetas):
        for c in range(len(z)):
            if c != forced[gi]:
                rest_g.append(gi)
                rest_c.append(c)
                rest_v.append(float(z[c]))
    order = sorted(range(len(rest_v)), key=lambda k: -rest_v[k])
    base = torch.ones(len(zetas), dtype=torch.float64)
    gid = torch.tensor([rest_g[k] for k in order], dtype=torch.long)

    def ratio_of(n: int) -> float:
        counts = base + torch.bincount(gid[:n], minlength=len(zetas)).to(torch.float64)
        return float(budget.ratio(kind, counts))

    lo, hi = 0, len(order)  # ratio_of(lo) <= target is assumed (checked before training)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ratio_of(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    masks = [torch.zeros(s, dtype=torch.bool) for s in sizes]
    for gi, c in enumerate(forced):
        masks[gi][c] = True
    for k in order[:lo]:
        masks[rest_g[k]][rest_c[k]] = True
    return masks


def hard_prune(work: nn.Module, gates: Gates, masks: list[Tensor]) -> nn.Module:
    """A pruned copy of ``work``: gate values folded into the BatchNorms, unkept channels removed."""
    pruned = copy.deepcopy(work)
    with torch.no_grad():
        zs = [z.detach() for z in gates.all_z()]
        for bn in gates._sites:
            mod = pruned.get_submodule(bn)
            if mod.weight is None:
                continue
            vec = gates.site_vector(bn, zs).to(mod.weight.dtype)
            mod.weight.mul_(vec)
            mod.bias.mul_(vec)
    plan = prune_plan((g, (~m).nonzero().flatten().tolist()) for g, m in zip(gates.groups, masks))
    return execute_prune_plan(pruned, plan).eval()
