"""Layers of transformer models, as the compression methods need to see them.

* HuggingFace's ``Conv1D`` (GPT-2 style: ``x @ W + b`` with ``W`` stored ``in x out``) is an
  ``nn.Linear`` with its weight transposed. :func:`linearize_conv1d` swaps each one for the
  equivalent ``nn.Linear`` (exactly the same function) when a job's model is loaded, so svd,
  magnitude and channel pruning treat GPT-2's projections like every other Linear. The export
  records the swapped names and :func:`bocompress.load_compressed` swaps them again.
* Attention modules reshape their query/key/value projections into ``heads x head_dim``: pruning
  channels of those projections breaks the reshape (``shape '[256, 65, -1, 64]' is invalid``).
  :func:`attention_layers` names the Linear layers inside attention modules, so channel pruning
  can leave them out with a reason that names the layer and its attention module.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_hf_conv1d", "linearize_conv1d", "conv1d_as_linear", "attention_layers"]

#: Attributes by which an attention module says how many heads it has (HF BERT/GPT-2/ViT, timm, torch).
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_head", "n_heads")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HuggingFace's ``transformers.pytorch_utils.Conv1D`` (not torch's nn.Conv1d)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what the HF ``Conv1D`` ``module`` computes (weights copied)."""
    w = module.weight.detach()  # in x out
    lin = nn.Linear(int(w.shape[0]), int(w.shape[1]), bias=module.bias is not None,
                    device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w.T)
    if module.bias is not None:
        lin.bias.data.copy_(module.bias.detach())
    lin.train(module.training)
    return lin


def linearize_conv1d(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace HF ``Conv1D`` layers of ``model`` (in place) by equivalent ``nn.Linear`` layers.

    Args:
        model: the network.
        names: only these layers (default: every HF Conv1D).

    Returns:
        The names of the replaced layers.
    """
    todo = [n for n, m in model.named_modules() if n and is_hf_conv1d(m) and (names is None or n in names)]
    for name in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, conv1d_as_linear(parent.get_submodule(child)))
    if names is not None and sorted(todo) != sorted(names):
        missing = sorted(set(names) - set(todo))
        raise ValueError(f"layers {missing[:5]} are not HuggingFace Conv1D layers of this model")
    return todo


def _heads(module: nn.Module) -> int | None:
    for attr in HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def attention_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers that feed or read attention heads -> why channel pruning must leave them alone.

    An attention module is one that holds Linear children and says how many heads it has
    (``num_attention_heads``, ``num_heads``...; ``nn.MultiheadAttention`` too). Every Linear
    below it is listed, with the attention module's name, type and number of heads.
    """
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        heads = _heads(mod)
        if heads is None:
            continue
        for sub, m in mod.named_modules():
            if sub and isinstance(m, nn.Linear):
                full = f"{name}.{sub}" if name else sub
                out.setdefault(full, f"{full}: inside attention module {name or '<root>'} ({type(mod).__name__}, "
                                     f"{heads} heads); channel pruning does not keep attention heads whole")
    return out
