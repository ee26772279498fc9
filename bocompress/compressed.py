"""Compressed models as files: safetensors weights plus a JSON description of every changed layer.

An exported model is one safetensors file. Its ``__metadata__["bocompress"]`` holds a JSON
description: the base architecture and, for each module whose structure changed (a Linear
factorized into two, a Conv2d into a Tucker-2 chain, a layer with fewer channels), the new
module as a small whitelisted spec (Conv2d, Linear, BatchNorm, Sequential, Identity). Loading
rebuilds the base architecture, swaps those modules in and loads the weights strictly. Nothing
is unpickled. torch is imported lazily, so ``import bocompress`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bocompress.errors import BocompressError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FORMAT = "bocompress.compressed/1"


def _spec(m: "nn.Module") -> dict[str, Any]:
    from torch import nn

    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding)
                if not isinstance(m.padding, str) else m.padding, "dilation": list(m.dilation), "groups": m.groups,
                "bias": m.bias is not None}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return {"type": type(m).__name__, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if isinstance(m, nn.Identity):
        return {"type": "Identity"}
    if type(m) is nn.Sequential:
        return {"type": "Sequential", "children": [_spec(c) for c in m]}
    raise BocompressError(f"cannot describe a {type(m).__name__} in a compressed model")


def _build(spec: dict[str, Any]) -> "nn.Module":
    from torch import nn

    t = spec.get("type")
    if t == "Conv2d":
        pad = spec["padding"]
        return nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                         stride=tuple(spec["stride"]), padding=pad if isinstance(pad, str) else tuple(pad),
                         dilation=tuple(spec["dilation"]), groups=spec["groups"], bias=spec["bias"])
    if t == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if t in ("BatchNorm2d", "BatchNorm1d"):
        cls = nn.BatchNorm2d if t == "BatchNorm2d" else nn.BatchNorm1d
        return cls(spec["num_features"], eps=spec["eps"], momentum=spec["momentum"], affine=spec["affine"],
                   track_running_stats=spec["track_running_stats"])
    if t == "Identity":
        return nn.Identity()
    if t == "Sequential":
        return nn.Sequential(*[_build(c) for c in spec["children"]])
    raise BocompressError(f"unknown module type {t!r} in the description")


def _same(a: "nn.Module", b: "nn.Module") -> bool:
    try:
        return type(a) is type(b) and _spec(a) == _spec(b)
    except BocompressError:
        return type(a) is type(b)


def describe(original: "nn.Module", compressed: "nn.Module", arch: str, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The description of ``compressed`` relative to ``original`` (a fresh build of ``arch``)."""
    orig = dict(original.named_modules())
    changed: list[dict[str, Any]] = []
    covered: list[str] = []
    for name, mod in compressed.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in covered):
            continue
        base = orig.get(name)
        if base is None or not _same(base, mod):
            changed.append({"path": name, "module": _spec(mod)})
            covered.append(name)
    layers = {}
    for name, mod in compressed.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and hasattr(w, "shape") and len(list(mod.children())) == 0:
            layers[name] = {"type": type(mod).__name__, "weight_shape": list(w.shape),
                            "nonzero": int((w != 0).sum().item())}
    return {"format": FORMAT, "arch": arch, "changed": changed, "layers": layers, **(extra or {})}


def _set_submodule(root: "nn.Module", path: str, new: "nn.Module") -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def save_compressed(path: str | Path, original: "nn.Module", compressed: "nn.Module", arch: str,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``compressed`` as safetensors with its description; returns the description."""
    from safetensors.torch import save_file

    desc = describe(original, compressed, arch, extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in compressed.state_dict().items()}
    save_file(tensors, str(path), metadata={"bocompress": json.dumps(desc)})
    return desc


def to_bytes(original: "nn.Module", compressed: "nn.Module", arch: str, extra: dict[str, Any] | None = None
             ) -> tuple[bytes, dict[str, Any]]:
    from safetensors.torch import save

    desc = describe(original, compressed, arch, extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in compressed.state_dict().items()}
    return save(tensors, metadata={"bocompress": json.dumps(desc)}), desc


def read_description(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "bocompress" not in meta:
        raise BocompressError(f"{path} is not a bocompress export (no description in its metadata)")
    desc = json.loads(meta["bocompress"])
    if desc.get("format") != FORMAT:
        raise BocompressError(f"{path}: unknown export format {desc.get('format')!r}")
    return desc


def load_compressed(path: str | Path, factory: Callable[[], "nn.Module"] | None = None) -> "nn.Module":
    """Rebuild an exported compressed model and load its weights (eval mode).

    Args:
        path: The ``.safetensors`` file from ``Job.download``.
        factory: Builds the base architecture; default: the zoo model named in the description.
            Pass it for your own architectures (the description holds their import path).

    Returns:
        The compressed ``torch.nn.Module``.
    """
    from safetensors.torch import load_file

    desc = read_description(path)
    if factory is None:
        arch = desc["arch"]
        from worker.zoo import ARCHS

        if arch not in ARCHS:
            raise BocompressError(f"architecture {arch!r} is not in the zoo: pass factory= to build it")
        factory = ARCHS[arch]
    model = factory()
    for ch in sorted(desc["changed"], key=lambda c: c["path"].count(".")):
        _set_submodule(model, ch["path"], _build(ch["module"]))
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BocompressError(f"{path}: weights do not fit the described model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
