"""The key-value header of a GGUF file, read without the gguf package or any engine.

A runtime that converts a GGUF itself (openvino-genai) reports its limits and KV
geometry from this header, and refuses a file its engine cannot read with the
reason (a tokenizer kind, a weight type) before the engine's terser failure.
Only the header is read: arrays are skipped by length, tensors are not touched.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO, Dict, Tuple

MAGIC = b"GGUF"
VERSIONS = (2, 3)

# GGUF value types: (struct format, size) of the scalar ones; 8 is a string, 9 an array.
_SCALARS: Dict[int, Tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
# Longest string or array the header may claim: a corrupt length must not allocate gigabytes.
_MAX_STRING = 1 << 24
_MAX_ARRAY = 1 << 28

# llama.cpp's general.file_type values (LlamaFileType) by name, for messages.
FILE_TYPES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0",
    9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
    14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K",
    32: "MOSTLY_BF16",
}


# ggml tensor types: (bytes per block, elements per block), for the size of each tensor's data.
TENSOR_TYPES: Dict[int, Tuple[int, int]] = {
    0: (4, 1), 1: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32), 8: (34, 32), 9: (36, 32),
    10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256), 15: (292, 256),
    24: (1, 1), 25: (2, 1), 26: (4, 1), 27: (8, 1), 28: (8, 1), 30: (2, 1),
}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF this reader understands; the message says what was found."""


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise GGUFHeaderError(f"the header ends early (wanted {size} bytes at offset {handle.tell()})")
    return data


def _scalar(handle: BinaryIO, kind: int) -> Any:
    fmt, size = _SCALARS[kind]
    return struct.unpack(fmt, _read(handle, size))[0]


def _string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(handle, 8))
    if length > _MAX_STRING:
        raise GGUFHeaderError(f"a string of {length} bytes in the header (corrupt length?)")
    return _read(handle, length).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    """A scalar or string; an array is skipped and stands as its length (("array", n))."""
    if kind in _SCALARS:
        return _scalar(handle, kind)
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        (item, count) = struct.unpack("<IQ", _read(handle, 12))
        if count > _MAX_ARRAY:
            raise GGUFHeaderError(f"an array of {count} items in the header (corrupt length?)")
        if item in _SCALARS:
            handle.seek(_SCALARS[item][1] * count, 1)
        elif item == _STRING:
            for _ in range(count):
                (length,) = struct.unpack("<Q", _read(handle, 8))
                handle.seek(length, 1)
        else:
            raise GGUFHeaderError(f"an array of value type {item}, which GGUF does not define")
        return ("array", count)
    raise GGUFHeaderError(f"value type {kind}, which GGUF does not define")


def read_header(path: str) -> Dict[str, Any]:
    """Every key of the header: scalars and strings as values, arrays as ("array", length).

    The tensor table is read too, and every tensor's data must lie inside the file: a truncated
    GGUF crashes some readers (openvino-genai's, with a segmentation fault) instead of failing."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != MAGIC:
            raise GGUFHeaderError(f"it starts with {magic!r}, not {MAGIC!r}")
        version, _tensors, count = struct.unpack("<IQQ", _read(handle, 20))
        if version not in VERSIONS:
            raise GGUFHeaderError(f"GGUF version {version}, but this reader knows {VERSIONS}")
        if count > 1 << 20:
            raise GGUFHeaderError(f"{count} header keys (corrupt count?)")
        out: Dict[str, Any] = {}
        for _ in range(count):
            key = _string(handle)
            (kind,) = struct.unpack("<I", _read(handle, 4))
            out[key] = _value(handle, kind)
        _check_tensors(handle, _tensors, out, path)
        return out


def _check_tensors(handle: BinaryIO, count: int, header: Dict[str, Any], path: str) -> None:
    """The tensor table: each tensor's type known and its data within the file's size."""
    import os

    if count > 1 << 20:
        raise GGUFHeaderError(f"{count} tensors (corrupt count?)")
    end = 0
    for _ in range(count):
        name = _string(handle)
        (dims,) = struct.unpack("<I", _read(handle, 4))
        if dims > 8:
            raise GGUFHeaderError(f"tensor {name!r} has {dims} dimensions (corrupt?)")
        shape = struct.unpack(f"<{dims}Q", _read(handle, 8 * dims))
        kind, offset = struct.unpack("<IQ", _read(handle, 12))
        if kind not in TENSOR_TYPES:
            raise GGUFHeaderError(f"tensor {name!r} is of ggml type {kind}, which this reader does not know")
        block_bytes, block = TENSOR_TYPES[kind]
        elements = 1
        for d in shape:
            elements *= d
        end = max(end, offset + -(-elements // block) * block_bytes)
    alignment = header.get("general.alignment", 32)
    start = -(-handle.tell() // alignment) * alignment
    size = os.path.getsize(path)
    if start + end > size:
        raise GGUFHeaderError(f"its tensors need {start + end} bytes, but the file has {size} (truncated?)")
