"""Validate a safetensors file without torch and without unpickling anything.

The format: 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
tensor bytes. We check every field, that the offsets tile the data exactly, and the sizes.
"""

from __future__ import annotations

import json
import math
import struct

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


class InvalidSafetensors(ValueError):
    pass


def inspect(data: bytes) -> dict[str, dict]:
    """Return ``{tensor name: {"dtype", "shape"}}`` or raise InvalidSafetensors saying why."""
    if len(data) < 8:
        raise InvalidSafetensors("file is too short to be safetensors (no header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > len(data):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise InvalidSafetensors("this looks like a pickle / torch.save file: only safetensors is accepted")
        raise InvalidSafetensors(f"header length {n} does not fit the file ({len(data)} bytes): not safetensors or truncated")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSafetensors(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidSafetensors("header is not a JSON object")
    body = len(data) - 8 - n
    spans = []
    out: dict[str, dict] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise InvalidSafetensors(f"tensor {name!r}: malformed entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise InvalidSafetensors(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidSafetensors(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= body):
            raise InvalidSafetensors(f"tensor {name!r}: data offsets {offs!r} outside the file (truncated?)")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise InvalidSafetensors(f"tensor {name!r}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype}")
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
