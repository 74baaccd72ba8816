"""What every converter shares: finding the source tensors, checking them, progress, and the CLI frame.

A converter supplies `plan(reader) -> (config, {output name: Entry})`; `convert` checks the plan
against the source headers before reading any data, then streams each output tensor through its
transform, with a progress bar, into `iconface_jax.weights.save` (atomic, written in chunks), so peak
memory is a chunk of the output, not the whole model.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert.safetensors_file import Reader, SafetensorsError, TensorInfo, read_header
from iconface_jax import weights

DTYPES = {"bf16": ml_dtypes.bfloat16, "float32": np.float32}


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and the key."""


def open_source(src: str) -> Reader:
    """A reader over `src`: one safetensors file, or a directory of them (sharded with an index or not)."""
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        for index in glob.glob(os.path.join(src, "*.safetensors.index.json")):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(src, s))]
            if missing:
                raise ConversionError(f"{index}: names shard files that are missing: {missing}")
            files = [os.path.join(src, s) for s in shards]
        if not files:
            raise ConversionError(f"{src}: directory holds no .safetensors files")
    else:
        files = [src]
    infos: dict[str, TensorInfo] = {}
    for path in files:
        try:
            header = read_header(path)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from None
        for key in header:
            if key in infos:
                raise ConversionError(f"{path}: tensor {key!r} also appears in {infos[key].path}")
        infos.update(header)
    return Reader(infos)


@dataclass(frozen=True)
class Entry:
    """One output tensor: the source keys it is made from, their expected shapes, and how."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    transform: Callable[..., np.ndarray] = lambda x: x
    dtype: np.dtype | None = None  # stored dtype when it must not follow --dtype (e.g. float32 statistics)


def check_plan(reader: Reader, plan: dict[str, Entry], ignore: Sequence[str] = ()) -> None:
    """Every source tensor is present, used (or ignored) and of the expected shape, before any data is read."""
    used = {k for e in plan.values() for k in e.keys} | set(ignore)
    missing = [k for k in sorted(used) if k not in reader.infos]
    if missing:
        where = ", ".join(sorted({i.path for i in reader.infos.values()}))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: missing tensor {missing[0]!r}{more}")
    unexpected = sorted(set(reader.infos) - used)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{reader.infos[unexpected[0]].path}: unexpected tensor {unexpected[0]!r}{more}")
    for entry in plan.values():
        for key, shape in zip(entry.keys, entry.shapes):
            info = reader.infos[key]
            if info.shape != tuple(shape):
                raise ConversionError(f"{info.path}: tensor {key!r} has shape {info.shape}, expected {tuple(shape)}")


def materialise(reader: Reader, plan: dict[str, Entry], dtype: np.dtype, desc: str) -> Iterator[tuple[str, np.ndarray]]:
    """Reads and transforms each output tensor in turn, yielding (name, array) as it is made."""
    for name, entry in tqdm(plan.items(), desc=desc, unit="tensor", file=sys.stderr, mininterval=1.0):
        arrays = [reader.read(k) for k in entry.keys]
        # ml_dtypes.bfloat16 is not a numpy floating subtype, so test the kind.
        for key, array in zip(entry.keys, arrays):
            if not (array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16):
                path = reader.infos[key].path
                raise ConversionError(f"{path}: tensor {key!r} is {array.dtype}, expected floating point")
        stored = dtype if entry.dtype is None else entry.dtype
        yield name, np.ascontiguousarray(entry.transform(*[a.astype(np.float32) for a in arrays]).astype(stored))


def convert(src: str, dst: str, dtype: np.dtype, family: str,
            plan_fn: Callable[[Reader], tuple[dict, dict[str, Entry]]], ignore: Sequence[str] = ()) -> None:
    """Plans, checks, streams and writes one conversion; on error nothing is written.

    `ignore` names source tensors to skip (training bookkeeping such as BatchNorm's step counter).
    """
    if os.path.exists(dst):
        raise ConversionError(f"destination {dst} already exists; remove it or choose another path")
    reader = open_source(src)
    config, plan = plan_fn(reader)
    check_plan(reader, plan, ignore)
    params = materialise(reader, plan, dtype, desc=f"converting {os.path.basename(src.rstrip('/'))}")
    weights.save(dst, family, config, params)


def cli(description: str, convert_fn: Callable[..., None], argv: Sequence[str] | None,
        default_dtype: str = "bf16", flags: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, str]] = ()) -> int:
    """The converters' shared command line: `--src PATH --dst DIR [--dtype bf16|float32]`.

    `flags` adds boolean options and `options` string-valued ones (default None), each as (flag, help);
    each is passed to `convert_fn` as a keyword argument.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--src", required=True, help="source checkpoint: file or directory")
    parser.add_argument("--dst", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype, help="stored parameter dtype")
    for flag, help_text in flags:
        parser.add_argument(flag, action="store_true", help=help_text)
    for flag, help_text in options:
        parser.add_argument(flag, help=help_text)
    args = parser.parse_args(argv)
    names = [flag.lstrip("-").replace("-", "_") for flag, _ in [*flags, *options]]
    extra = {name: getattr(args, name) for name in names}
    start = time.perf_counter()
    try:
        convert_fn(args.src, args.dst, np.dtype(DTYPES[args.dtype]), **extra)
    except (ConversionError, SafetensorsError, weights.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
