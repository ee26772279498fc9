"""Compressed models as files: safetensors weights plus a JSON description of every changed layer.

An exported model is one safetensors file. Its ``__metadata__["bocompress"]`` holds a JSON
description: the base architecture (a zoo name, an import path, or a model spec in
``arch_spec``, see :mod:`bocompress.modelspec`) and, for each module whose structure changed:

* ``module``: a module *replaced* by another (a Linear factorized into two, a Conv2d into a
  Tucker-2 chain), as a small whitelisted spec (Conv2d, Linear, BatchNorm, Sequential, Identity);
* ``resize``: a module of any class *resized in place* by channel pruning (timm's
  ``BatchNormAct2d``, a HuggingFace LayerNorm...): the new values of its plain attributes
  (``num_features``...) and the shapes of its own parameters and buffers. Loading builds the
  same class with the same factory and resizes it the same way.

Sparse weights (magnitude pruning) are stored as a packed bit mask plus the nonzero values
(``<name>.__mask``, ``<name>.__values``), so the file shrinks with the density. Layers the worker
turned from HuggingFace ``Conv1D`` into ``nn.Linear`` are listed in ``linearized``. Loading
rebuilds the base architecture, applies all of this and loads the weights strictly. Nothing is
unpickled. torch is imported lazily, so ``import bocompress`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bocompress.errors import BocompressError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FORMAT = "bocompress.compressed/1"


#: Suffixes of the two tensors that store one sparse tensor.
MASK_SUFFIX, VALUES_SUFFIX = ".__mask", ".__values"
#: A floating-point tensor is stored sparse when at most this fraction of it is nonzero ...
SPARSE_DENSITY = 0.75
#: ... and it has at least this many elements.
SPARSE_MIN_NUMEL = 256


def _spec(m: "nn.Module") -> dict[str, Any]:
    from torch import nn

    # exact classes only: a subclass (timm's BatchNormAct2d is a BatchNorm2d) is not rebuilt as its base
    if type(m) is nn.Conv2d:
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding)
                if not isinstance(m.padding, str) else m.padding, "dilation": list(m.dilation), "groups": m.groups,
                "bias": m.bias is not None}
    if type(m) is nn.Linear:
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm1d):
        return {"type": type(m).__name__, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if type(m) is nn.Identity:
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


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float)) for x in v)


def _resize(base: "nn.Module", mod: "nn.Module") -> dict[str, Any] | None:
    """How ``mod`` differs from ``base`` (same class) in its plain attributes and own tensor shapes."""
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(mod).items()
             if not k.startswith("_") and _plain(v) and vars(base).get(k) != v}
    tensors = {}
    for group in ("_parameters", "_buffers"):
        for k, t in getattr(mod, group).items():
            b = getattr(base, group).get(k)
            if t is not None and (b is None or tuple(b.shape) != tuple(t.shape)):
                tensors[k] = list(t.shape)
    if not attrs and not tensors:
        return None
    return {"class": f"{type(mod).__module__}.{type(mod).__qualname__}", "attrs": attrs, "tensors": tensors}


def _arch_fields(arch: Any) -> dict[str, Any]:
    from bocompress.modelspec import ModelSpec, parse_arch

    spec = arch if isinstance(arch, ModelSpec) else (parse_arch(arch) if isinstance(arch, (str, dict)) else None)
    if spec is not None:
        return {"arch": spec.factory, "arch_spec": spec.model_dump(exclude_defaults=True)}
    return {"arch": str(arch)}


def describe(original: "nn.Module", compressed: "nn.Module", arch: Any, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The description of ``compressed`` relative to ``original`` (a fresh build of ``arch``).

    ``arch`` is a zoo name, an import path, or a model spec (a :class:`~bocompress.modelspec.ModelSpec`,
    its dict or JSON text).
    """
    orig = dict(original.named_modules())
    changed: list[dict[str, Any]] = []
    covered: list[str] = []
    for name, mod in compressed.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in covered):
            continue
        base = orig.get(name)
        if base is not None and type(base) is type(mod):
            try:
                _spec(mod)
                whitelisted = True
            except BocompressError:
                whitelisted = False
            if not whitelisted:  # same class, resized in place (channel pruning): record how
                resize = _resize(base, mod)
                if resize is not None:
                    changed.append({"path": name, "resize": resize})
                continue
        if base is None or not _same(base, mod):
            changed.append({"path": name, "module": _spec(mod)})
            covered.append(name)
    layers = {}
    for name, mod in compressed.named_modules():
        w = getattr(mod, "weight", None)
        if w is not None and hasattr(w, "shape") and len(list(mod.children())) == 0:
            layers[name] = {"type": type(mod).__name__, "weight_shape": list(w.shape),
                            "nonzero": int((w != 0).sum().item())}
    return {"format": FORMAT, **_arch_fields(arch), "changed": changed, "layers": layers, **(extra or {})}


def _set_submodule(root: "nn.Module", path: str, new: "nn.Module") -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def _tensors(compressed: "nn.Module") -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors to store (sparse ones as mask + values) and the description of the sparse ones."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    sparse: dict[str, Any] = {}
    seen: set[int] = set()
    for k, v in compressed.state_dict().items():
        t = v.detach().cpu()
        # tied weights (an LM head sharing the embedding) are stored once per name: safetensors
        # refuses shared storage
        t = t.clone().contiguous() if t.untyped_storage().data_ptr() in seen else t.contiguous()
        seen.add(v.untyped_storage().data_ptr())
        if t.is_floating_point() and t.numel() >= SPARSE_MIN_NUMEL:
            nz = t != 0
            nnz = int(nz.sum())
            if nnz <= SPARSE_DENSITY * t.numel():
                out[k + MASK_SUFFIX] = torch.from_numpy(np.packbits(nz.flatten().numpy()))
                out[k + VALUES_SUFFIX] = t[nz].contiguous()
                sparse[k] = {"shape": list(t.shape), "nonzero": nnz}
                continue
        out[k] = t
    return out, sparse


def _payload(original: "nn.Module", compressed: "nn.Module", arch: Any, extra: dict[str, Any] | None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    desc = describe(original, compressed, arch, extra)
    tensors, sparse = _tensors(compressed)
    if sparse:
        desc["sparse"] = {"tensors": sparse, "stored_values": sum(s["nonzero"] for s in sparse.values())}
    return tensors, desc


def save_compressed(path: str | Path, original: "nn.Module", compressed: "nn.Module", arch: Any,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``compressed`` as safetensors with its description; returns the description."""
    from safetensors.torch import save_file

    tensors, desc = _payload(original, compressed, arch, extra)
    save_file(tensors, str(path), metadata={"bocompress": json.dumps(desc)})
    return desc


def to_bytes(original: "nn.Module", compressed: "nn.Module", arch: Any, extra: dict[str, Any] | None = None
             ) -> tuple[bytes, dict[str, Any]]:
    from safetensors.torch import save

    tensors, desc = _payload(original, compressed, arch, extra)
    return save(tensors, metadata={"bocompress": json.dumps(desc)}), desc


def _checked(desc: dict[str, Any], where: Any) -> dict[str, Any]:
    if desc.get("format") != FORMAT:
        raise BocompressError(f"{where}: unknown export format {desc.get('format')!r}")
    return desc


def read_description(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "bocompress" not in meta:
        raise BocompressError(f"{path} is not a bocompress export (no description in its metadata)")
    return _checked(json.loads(meta["bocompress"]), path)


def description_of(data: bytes, where: str = "the file") -> dict[str, Any] | None:
    """The description in safetensors ``data`` (only the header is read); None when ``data`` is no
    bocompress export. Raises BocompressError for an export of an unknown format."""
    import struct

    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError):
        return None
    if not isinstance(meta, dict) or "bocompress" not in meta:
        return None
    try:
        return _checked(json.loads(meta["bocompress"]), where)
    except ValueError as exc:
        raise BocompressError(f"{where}: unreadable export description: {exc}") from None


def _apply_resize(model: "nn.Module", path: str, resize: dict[str, Any]) -> None:
    import torch
    from torch import nn

    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise BocompressError(f"the described module {path!r} is not in the rebuilt model") from None
    cls = f"{type(m).__module__}.{type(m).__qualname__}"
    if cls != resize.get("class"):
        raise BocompressError(f"module {path!r} is a {cls} in the rebuilt model, {resize.get('class')} in the export")
    for k, v in (resize.get("attrs") or {}).items():
        old = getattr(m, k, None)
        setattr(m, k, tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v)
    for k, shape in (resize.get("tensors") or {}).items():
        if k in m._parameters and m._parameters[k] is not None:
            old_p = m._parameters[k]
            m._parameters[k] = nn.Parameter(torch.empty(shape, dtype=old_p.dtype), requires_grad=old_p.requires_grad)
        elif k in m._buffers and m._buffers[k] is not None:
            m._buffers[k] = torch.empty(shape, dtype=m._buffers[k].dtype)
        else:
            raise BocompressError(f"module {path!r} has no tensor {k!r} to resize")


def _linearize(model: "nn.Module", names: list[str]) -> None:
    from torch import nn

    for name in names:
        m = model.get_submodule(name)
        if not hasattr(m, "nf") or getattr(m, "weight", None) is None:
            raise BocompressError(f"layer {name!r} is not a HuggingFace Conv1D in the rebuilt model")
        n_in, n_out = int(m.weight.shape[0]), int(m.weight.shape[1])
        _set_submodule(model, name, nn.Linear(n_in, n_out, bias=m.bias is not None))


def _dense_state(state: dict[str, Any], desc: dict[str, Any], path: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    for k, info in ((desc.get("sparse") or {}).get("tensors") or {}).items():
        try:
            packed, values = state.pop(k + MASK_SUFFIX), state.pop(k + VALUES_SUFFIX)
        except KeyError:
            raise BocompressError(f"{path}: the sparse tensor {k!r} is missing its mask or values") from None
        numel = int(np.prod(info["shape"])) if info["shape"] else 1
        mask = torch.from_numpy(np.unpackbits(packed.numpy())[:numel].astype(bool))
        if int(mask.sum()) != values.numel():
            raise BocompressError(f"{path}: the sparse tensor {k!r} has {values.numel()} values for "
                                  f"{int(mask.sum())} mask bits")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        state[k] = dense.reshape(info["shape"])
    return state


def load_compressed(path: str | Path, factory: Callable[[], "nn.Module"] | None = None,
                    allow_import: Sequence[str] | None = None) -> "nn.Module":
    """Rebuild an exported compressed model and load its weights (eval mode).

    Args:
        path: The ``.safetensors`` file from ``Job.download``.
        factory: Builds the base architecture; default: the zoo model named in the description,
            or the description's import path / model spec when ``allow_import`` allows it.
        allow_import: import prefixes you trust to build the described architecture, e.g.
            ``["transformers"]`` or ``["timm"]`` (the description names a factory installed here;
            nothing in the file is executed).

    Returns:
        The compressed ``torch.nn.Module``.
    """
    from safetensors.torch import load_file

    desc = read_description(path)
    if factory is None:
        arch = desc["arch"]
        from bocompress.worker.zoo import ARCHS

        if desc.get("arch_spec") or arch not in ARCHS:
            from bocompress.modelspec import build_model, parse_arch

            spec = parse_arch(dict(desc["arch_spec"])) if desc.get("arch_spec") else None
            if allow_import is None:
                module = arch.split(":", 1)[0]
                raise BocompressError(
                    f"architecture {arch!r} is not in the zoo: it is built by an import path; pass "
                    f"allow_import=[{module.split('.')[0]!r}] (prefixes you trust) or factory= to build it")
            built = build_model(spec or arch, list(allow_import), "pass allow_import= (or factory=) to load_compressed")
            factory = lambda: built  # noqa: E731 - the one model just built
        else:
            factory = ARCHS[arch]
    model = factory()
    if desc.get("linearized"):
        _linearize(model, list(desc["linearized"]))
    changes = sorted(desc["changed"], key=lambda c: c["path"].count("."))
    for ch in changes:
        if "resize" in ch:
            _apply_resize(model, ch["path"], ch["resize"])
        else:
            _set_submodule(model, ch["path"], _build(ch["module"]))
    state = _dense_state(load_file(str(path)), desc, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BocompressError(f"{path}: weights do not fit the described model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
