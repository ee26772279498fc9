"""Validate a safetensors file without torch and without unpickling anything.

The format: 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
tensor bytes. We check every field, that the offsets tile the data exactly, and the sizes.

This is the one validator of the project: the service runs it on every upload (models,
datasets, export artifacts) and the worker runs it on every file it downloads, before
``safetensors`` loads it, so a file the service accepts is one the worker can load.

The header is bounded before it is parsed (:data:`DEFAULT_MAX_HEADER_BYTES`,
:data:`DEFAULT_MAX_TENSORS`; the service's are configurable): a JSON header of tens of
megabytes takes seconds to parse and holds the interpreter meanwhile.
"""

from __future__ import annotations

import json
import math
import struct

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: The safetensors library's own bound on the header (100 MB): what the worker can ever load.
MAX_HEADER = 100 * 1024 * 1024
#: The service's default bound on an upload's header: 8 MiB holds ~100,000 tensor entries, far
#: beyond any real model's state dict (a ResNet-152 has ~1,000), and parses in ~0.1 s.
DEFAULT_MAX_HEADER_BYTES = 8 * 1024 * 1024
#: The service's default bound on the number of tensors in one upload.
DEFAULT_MAX_TENSORS = 50_000


class InvalidSafetensors(ValueError):
    pass


def _is_int(v: object) -> bool:
    return type(v) is int  # not bool, whose type is a subclass of int; the loader wants a usize


def header_length(data: bytes) -> int:
    """The header length N of the first 8 bytes, or InvalidSafetensors (too short, or a pickle/zip)."""
    if len(data) < 8:
        raise InvalidSafetensors("file is too short to be safetensors (no header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > len(data):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise InvalidSafetensors("this looks like a pickle / torch.save file: only safetensors is accepted")
        raise InvalidSafetensors(f"header length {n} does not fit the file ({len(data)} bytes): not safetensors or truncated")
    return int(n)


def check_prefix(prefix: bytes, max_header_bytes: int | None = DEFAULT_MAX_HEADER_BYTES) -> None:
    """The first check, on the first bytes of an upload still being read: a header length over
    the bound is refused before the rest of the file is read at all."""
    if len(prefix) < 8 or max_header_bytes is None:
        return
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > max_header_bytes and not (prefix[:1] == b"\x80" or prefix[:2] == b"PK"):
        raise InvalidSafetensors(f"header of {n} bytes is larger than this service's limit of {max_header_bytes} "
                                 "bytes (max_safetensors_header_bytes)")


def check_bounds(data: bytes, max_header_bytes: int | None = DEFAULT_MAX_HEADER_BYTES,
                 max_tensors: int | None = DEFAULT_MAX_TENSORS) -> int:
    """The cheap checks, before any JSON is parsed: the header's size and (counted, not parsed) its
    tensor entries. Returns the header length.

    Raises:
        InvalidSafetensors: not safetensors, or a header over a bound (the message names the bound).
    """
    n = header_length(data)
    if max_header_bytes is not None and n > max_header_bytes:
        raise InvalidSafetensors(f"header of {n} bytes is larger than this service's limit of {max_header_bytes} "
                                 "bytes (max_safetensors_header_bytes)")
    if max_tensors is not None:
        # Every tensor entry holds one "data_offsets" key: a count of it bounds the entries from above.
        k = data.count(b'"data_offsets"', 8, 8 + n)
        if k > max_tensors:
            raise InvalidSafetensors(f"header lists about {k} tensors, more than this service's limit of "
                                     f"{max_tensors} (max_safetensors_tensors)")
    return n


def inspect(data: bytes, max_header_bytes: int | None = DEFAULT_MAX_HEADER_BYTES,
            max_tensors: int | None = DEFAULT_MAX_TENSORS) -> dict[str, dict]:
    """Return ``{tensor name: {"dtype", "shape"}}`` or raise InvalidSafetensors saying why.

    Args:
        data: the whole file.
        max_header_bytes: the largest header accepted (None: the format's own 100 MB).
        max_tensors: the most tensors accepted (None: no bound).
    """
    n = check_bounds(data, max_header_bytes, max_tensors)
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSafetensors(f"header is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidSafetensors("header is not valid safetensors: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise InvalidSafetensors("header is not a JSON object")
    body = len(data) - 8 - n
    spans = []
    out: dict[str, dict] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and (not isinstance(info, dict)
                                     or not all(isinstance(v, str) for v in info.values())):
                raise InvalidSafetensors("__metadata__ must map names to strings")
            continue
        if max_tensors is not None and len(out) >= max_tensors:
            raise InvalidSafetensors(f"more than this service's limit of {max_tensors} tensors "
                                     "(max_safetensors_tensors)")
        shown = name if len(name) <= 100 else name[:100] + "..."
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise InvalidSafetensors(f"tensor {shown!r}: malformed entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InvalidSafetensors(f"tensor {shown!r}: unknown dtype {str(dtype)[:50]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
            raise InvalidSafetensors(f"tensor {shown!r}: bad shape {str(shape)[:100]} (need non-negative integers)")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs)
                or not 0 <= offs[0] <= offs[1] <= body):
            raise InvalidSafetensors(f"tensor {shown!r}: data offsets {str(offs)[:100]} outside the file (truncated?)")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise InvalidSafetensors(f"tensor {shown!r}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype}")
        spans.append((offs[0], offs[1]))
        out[name] = {"dtype": dtype, "shape": shape}
    spans.sort()
    pos = 0
    for a, b in spans:
        if a != pos:
            raise InvalidSafetensors("tensor data overlaps or leaves gaps: not a valid safetensors file")
        pos = b
    if pos != body:
        raise InvalidSafetensors(f"file holds {body} data bytes but the header accounts for {pos} (truncated or padded)")
    if not out:
        raise InvalidSafetensors("file holds no tensors")
    return out
