"""A dependency-free safetensors reader and writer that stream one tensor at a time.

numpy has no bfloat16, so BF16 tensors are returned as `ml_dtypes.bfloat16` arrays; the `safetensors`
package's numpy backend refuses them and its torch backend would make torch a runtime dependency.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (message names the file and key)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range inside the data section."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses and validates the header of `path` without reading tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start, out = 8 + n, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {key!r} has a malformed header entry {entry!r}") from None
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{path}: tensor {key!r} byte range does not match its shape {shape}")
        if data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {key!r} lies past the end of the file (truncated?)")
        out[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return out


class Reader:
    """Reads tensors from one or more safetensors files, one positioned read per tensor.

    Plain reads rather than a memory map: mapped pages stay resident and count against the process,
    so converting a whole checkpoint would hold the source and the output at once.
    """

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a new numpy array."""
        info = self.infos[key]
        count = (info.end - info.start) // info.dtype.itemsize
        array = np.fromfile(info.path, dtype=info.dtype, count=count, offset=info.start)
        if array.size != count:
            raise SafetensorsError(f"{info.path}: tensor {key!r} is cut short (file truncated?)")
        return array.reshape(info.shape)


_WRITE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


@dataclass(frozen=True)
class Lazy:
    """A tensor written to disk only when its turn comes (one at a time: peak memory one tensor)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray | Lazy], metadata: Mapping[str, str]) -> None:
    """Writes a safetensors file (little-endian, 8-byte aligned header) without torch or `safetensors`."""
    header: dict = {"__metadata__": dict(metadata)}
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        if np.dtype(dtype) not in _WRITE_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, expected float32, float16 or bfloat16")
        size = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": _WRITE_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(specs):
            t = tensors[name]
            array = np.ascontiguousarray(t.make() if isinstance(t, Lazy) else t)
            if array.dtype != np.dtype(specs[name][0]) or array.shape != specs[name][1]:
                raise ValueError(f"{path}: tensor {name!r} came out {array.dtype}{array.shape}, "
                                 f"declared {specs[name][0]}{specs[name][1]}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
