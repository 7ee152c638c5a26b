"""The cache's byte formats: numpy arrays to and from BLOB columns, and the one payload format of
cached results (named arrays plus JSON metadata), which never unpickles anything.

A payload is a fixed prefix (magic, format version, header length), a JSON header naming each
array's dtype, shape and offset together with the metadata, then the raw arrays, each starting on a
64-byte boundary so they read back as views of one buffer.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pyarrow as pa

VERSION = 1  # bump when the payload layout changes; the store keys results by it, so older ones miss
MAGIC = b"BKLC"
_PREFIX = struct.Struct("<4sHQ")  # magic, version, header length in bytes
_ALIGN = 64
# Plain values only: object arrays would need pickle, and structured ones lose their fields in dtype.str.
_KINDS = "biufcSUmM"


def pack(arrays: dict[str, np.ndarray], meta=None) -> bytes:
    """One payload holding `arrays` (any shape, plain dtypes) and JSON-serialisable `meta`."""
    entries, parts, end = [], [], 0
    for name, value in arrays.items():
        array = np.asarray(value)
        _check_dtype(array.dtype, name)
        offset = _aligned(end)
        entries.append([str(name), array.dtype.str, list(array.shape), offset])
        parts.append((offset, array))
        end = offset + array.nbytes
    header = json.dumps({"arrays": entries, "meta": meta}).encode()
    start = _aligned(_PREFIX.size + len(header))
    out = bytearray(start + end)
    _PREFIX.pack_into(out, 0, MAGIC, VERSION, len(header))
    out[_PREFIX.size : _PREFIX.size + len(header)] = header
    for offset, array in parts:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        out[start + offset : start + offset + len(flat)] = flat.data
    return bytes(out)


def unpack(payload: bytes) -> tuple[dict[str, np.ndarray], object]:
    """The (arrays, meta) of a `pack` payload; a clear ValueError for anything else.

    The arrays are writeable views of one private copy of the payload, as `np.load` would give.
    """
    if len(payload) < _PREFIX.size or payload[:4] != MAGIC:
        raise ValueError("not a bricklab result payload (no codec header)")
    _, version, size = _PREFIX.unpack_from(payload)
    if version != VERSION:
        raise ValueError(f"result payload format {version}; this bricklab reads format {VERSION}")
    start = _aligned(_PREFIX.size + size)
    header = json.loads(bytes(payload[_PREFIX.size : _PREFIX.size + size]))
    buffer = bytearray(payload)
    arrays = {}
    for name, dtype, shape, offset in header["arrays"]:
        dtype = np.dtype(dtype)
        _check_dtype(dtype, name)
        count = math.prod(shape)
        if start + offset + count * dtype.itemsize > len(buffer):
            raise ValueError(f"result payload is truncated (array {name!r})")
        arrays[name] = np.frombuffer(buffer, dtype, count=count, offset=start + offset).reshape(shape)
    return arrays, header["meta"]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype.kind not in _KINDS or dtype.fields is not None:
        raise ValueError(
            f"array {name!r} has dtype {dtype}; the cache stores numbers, booleans and strings only"
        )


def blob_column(arrays: list[np.ndarray]) -> pa.Array:
    """A BLOB column from numpy arrays with one copy (a list of bytes objects would take two)."""
    sizes = np.array([a.nbytes for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] >= 2**31:
        data = [a.tobytes() for a in arrays]
        return pa.array(data, pa.large_binary())
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]) if arrays else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(
        pa.binary(), len(arrays), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(flat)]
    )


def concat_blobs(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """Concatenate a BLOB column into one numpy array without a Python loop."""
    column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros(0, dtype=dtype)
    _, offsets, data = column.buffers()
    off = np.frombuffer(offsets, dtype=np.int32, count=len(column) + 1, offset=column.offset * 4)
    raw = np.frombuffer(data, dtype=np.uint8)[off[0] : off[-1]]
    return raw.view(dtype).copy()
