"""The converters' safetensors files: reading (through the `safetensors` library) against torch's writer, every
refusal naming the file (and the tensor) for truncated, foreign, malformed and unreadable sources; our writer read
back by torch's, numpy's and our reader, 0-d and non-contiguous arrays included."""
from __future__ import annotations

import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load_file, save_file

from convert.common import ConversionError, Entry, cli, convert, open_source
from convert.safetensors_file import Lazy, Reader, SafetensorsError, read_header, write_safetensors

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    "b.bias": (torch.arange(5, dtype=torch.float32) / 3 - 1).to(torch.bfloat16),
    "c.scale": torch.tensor([1.5, -2.25], dtype=torch.float16),
    "d.steps": torch.tensor(7, dtype=torch.int64),
}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(TENSORS, str(path))
    return path


def test_shapes_and_values_match_torch(good):
    infos = read_header(str(good))
    assert {k: (i.path, i.shape) for k, i in infos.items()} == {k: (str(good), t.shape) for k, t in TENSORS.items()}
    reader = Reader(infos)
    for key, tensor in TENSORS.items():
        array = reader.read(key)
        if tensor.dtype == torch.bfloat16:  # compare the stored bits: numpy has bfloat16 only through ml_dtypes
            assert array.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(array.view(np.int16), tensor.view(torch.int16).numpy())
        else:
            assert array.dtype == tensor.numpy().dtype
            np.testing.assert_array_equal(array, tensor.numpy())


def _raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> bytes:
    return json.dumps({"x": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}).encode()


# Each case: (how to make the file from the good one's bytes, a phrase the message must hold).
BAD = {
    "truncated": (lambda p, data: p.write_bytes(data[:-3]), "truncated?"),
    "padded": (lambda p, data: p.write_bytes(data + b"\0" * 8), "do not end where the file does"),
    "empty": (lambda p, data: p.write_bytes(b""), "not a safetensors file"),
    "zip": (lambda p, data: p.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10), "not a safetensors file"),
    "json_text": (lambda p, data: p.write_text(json.dumps({"not": "a tensor file"})), "not a safetensors file"),
    "header_not_json": (lambda p, data: _raw(p, b"{not json}      "), "not a safetensors file"),
    "byte_range_vs_shape": (lambda p, data: _raw(p, _entry("F32", [2], 0, 12), b"\0" * 12), "not a safetensors file"),
    "unknown_dtype": (lambda p, data: _raw(p, _entry("Q7", [2], 0, 8), b"\0" * 8), "not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_refused_naming_the_file(good, tmp_path, case):
    make, phrase = BAD[case]
    path = tmp_path / f"{case}.safetensors"
    make(path, good.read_bytes())
    with pytest.raises(SafetensorsError) as error:
        read_header(str(path))
    assert str(path) in str(error.value) and phrase in str(error.value), error.value
    with pytest.raises(ConversionError, match=phrase.replace("?", r"\?")):  # what the converters raise
        open_source(str(path))


def test_a_dtype_numpy_lacks_is_refused_naming_file_and_key(tmp_path, capsys):
    path = tmp_path / "fp8.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn), "b": torch.ones(2)}, str(path))
    reader = Reader(read_header(str(path)))
    np.testing.assert_array_equal(reader.read("b"), np.ones(2, np.float32))
    message = f"{path}: tensor 'w' (F8_E4M3) cannot be read"
    with pytest.raises(SafetensorsError, match=re.escape(message)):
        reader.read("w")
    # Through a converter's command line: an error line, not a traceback, and nothing written.
    plan = lambda _: ({}, {"w": Entry(("w",), ((4,),)), "b": Entry(("b",), ((2,),))})
    run = lambda src, dst, dtype: convert(src, dst, dtype, "test", plan)
    assert cli("test", run, ["--src", str(path), "--dst", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8.safetensors"]


def test_shards_a_duplicate_and_a_missing_shard_are_named(tmp_path):
    shards = tmp_path / "model"
    shards.mkdir()
    save_file({"a.weight": TENSORS["a.weight"]}, str(shards / "one.safetensors"))
    save_file({"b.bias": TENSORS["b.bias"]}, str(shards / "two.safetensors"))
    reader = open_source(str(shards))
    assert {k: i.path for k, i in reader.infos.items()} == {"a.weight": str(shards / "one.safetensors"),
                                                              "b.bias": str(shards / "two.safetensors")}
    save_file({"a.weight": TENSORS["a.weight"]}, str(shards / "three.safetensors"))
    with pytest.raises(ConversionError, match=r"three\.safetensors: tensor 'a\.weight' also appears in .*one\."):
        open_source(str(shards))
    (shards / "three.safetensors").unlink()
    index = shards / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "one.safetensors", "c": "gone.safetensors"}}))
    with pytest.raises(ConversionError, match=r"index\.json: names shard files that are missing: \['gone"):
        open_source(str(shards))


def test_writer_round_trip_with_scalars_and_views(tmp_path):
    """What `write_safetensors` writes reads back equal through torch's and numpy's loaders and ours: every dtype it
    writes, a lazy tensor, a 0-d scalar as shape [] (the release's `.alpha`), and arrays that are views in another
    memory order (a transpose, a strided slice, a lazy transpose), which must be written in C order."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 6)).astype(np.float32)
    tensors = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
               "c": Lazy(np.dtype(np.float16), (2, 2), lambda: np.eye(2, dtype=np.float16)),
               "alpha": np.asarray(4.0, np.float32),
               "t.weight": base.T,
               "s.weight": base[::2, 1::2],
               "lazy_t": Lazy(np.dtype(np.float32), (6, 4), lambda: base.T)}
    want = {k: np.asarray(v.make() if isinstance(v, Lazy) else v) for k, v in tensors.items()}
    assert not (want["t.weight"].flags.c_contiguous or want["s.weight"].flags.c_contiguous)
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, tensors, {"note": "x"})
    assert {k: i.shape for k, i in read_header(path).items()} == {k: v.shape for k, v in want.items()}
    by_torch = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load_file(path).items()}
    readers = {"torch": by_torch, "numpy": safetensors.numpy.load_file(path), "ours": Reader(read_header(path))}
    for name, reader in readers.items():
        for key, value in want.items():
            got = np.asarray(reader.read(key) if name == "ours" else reader[key])
            assert got.shape == value.shape, (name, key)
            np.testing.assert_array_equal(got.astype(np.float32), value.astype(np.float32), err_msg=f"{name} {key}")
