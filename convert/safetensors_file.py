"""Safetensors files for the converters: read through the `safetensors` library, written by our streaming writer.

Reading uses `safe_open(path, framework="np", backend="pread")`: headers are parsed and checked by the library
(the tensors must cover the file exactly), shapes come from the header alone, and each tensor is read with
positioned reads into a fresh array (no memory map, whose touched pages would stay resident and count against
the process). BF16 tensors come back as `ml_dtypes.bfloat16`, which numpy knows once `ml_dtypes` is imported.
The library's errors are re-raised naming the file (and the tensor, when one is being read).

Writing stays ours: the library's writers take every tensor in memory at once; `write_safetensors` makes and
writes one tensor at a time.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ml_dtypes  # registers bfloat16 with numpy: the library's numpy backend needs it to return BF16 tensors
import numpy as np
from safetensors import SafetensorError, safe_open


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (message names the file and key)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and its shape, as the header says."""

    path: str
    shape: tuple[int, ...]


def _open(path: str) -> safe_open:
    """The library's reader over `path`, its refusals re-raised as `SafetensorsError` naming the file."""
    try:
        return safe_open(path, framework="np", backend="pread")
    except SafetensorError as e:
        # The library's only check on where the data ends: the header's tensors must end at the end of the file.
        if "not fully covered" in str(e):
            raise SafetensorsError(f"{path}: its tensors do not end where the file does (truncated?): {e}") from None
        raise SafetensorsError(f"{path}: not a safetensors file ({e})") from None


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors of `path` and their shapes, from the header only (no tensor data is read)."""
    with _open(path) as f:
        return {key: TensorInfo(path, tuple(f.get_slice(key).get_shape())) for key in f.keys()}


class Reader:
    """Reads tensors from one or more safetensors files, one tensor at a time."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a new numpy array."""
        path = self.infos[key].path
        with _open(path) as f:
            try:
                return f.get_tensor(key)
            # AttributeError: a dtype numpy does not have (the library asks numpy for, e.g., float8_e4m3fn).
            except (SafetensorError, AttributeError) as e:
                dtype = f.get_slice(key).get_dtype()
                raise SafetensorsError(f"{path}: tensor {key!r} ({dtype}) cannot be read: {e}") from None


_WRITE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


@dataclass(frozen=True)
class Lazy:
    """A tensor written to disk only when its turn comes (one at a time: peak memory one tensor)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray | Lazy], metadata: Mapping[str, str]) -> None:
    """Writes a safetensors file (little-endian, 8-byte aligned header) without torch or `safetensors`: arrays of
    any memory order in C order, 0-d arrays with shape []."""
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
            # Not `np.ascontiguousarray`, which makes a 0-d array 1-d; `tobytes` writes any view in C order.
            array = np.asarray(t.make() if isinstance(t, Lazy) else t)
            if array.dtype != np.dtype(specs[name][0]) or array.shape != specs[name][1]:
                raise ValueError(f"{path}: tensor {name!r} came out {array.dtype}{array.shape}, "
                                 f"declared {specs[name][0]}{specs[name][1]}")
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
