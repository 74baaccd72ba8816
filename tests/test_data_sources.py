"""Data sources and decoding: FFHQ-Ref CSV, folder and TFDS sources on fixtures written here, and
every bad-input case (corrupt, truncated, grayscale, RGBA, 16-bit, tiny, missing, unreferenced)."""
from __future__ import annotations

import io
import logging
import os
import sys
import types

import cv2
import numpy as np
import pytest
from PIL import Image

from iconface_jax.data import sources
from iconface_jax.data.sources import FFHQRefSource, FolderSource, ImageError, TfdsSource, decode


def _face(seed: int, size: int = 48) -> np.ndarray:
    """A small random uint8 RGB image (smooth, so JPEG keeps it recognisable)."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)


def _save(path: str, image: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# ----------------------------------------------------------------------------- decode


def test_decode_rgb_resizes_and_crops_to_square(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 10:50] = 200  # the centre square is uniform
    out, converted = decode(_save(str(tmp_path / "a.png"), img), 32, 8)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and not converted
    assert np.all(out == 200)


def test_decode_converts_grayscale(tmp_path):
    path = str(tmp_path / "g.png")
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(path)
    out, converted = decode(path, 32, 8)
    assert converted and out.shape == (32, 32, 3) and np.all(out == 77)


def test_decode_composites_rgba_over_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top half opaque red, bottom half transparent
    path = str(tmp_path / "a.png")
    Image.fromarray(rgba, mode="RGBA").save(path)
    out, converted = decode(path, 32, 8)
    assert converted and out.shape == (32, 32, 3)
    assert np.all(out[:16] == (255, 0, 0)) and np.all(out[16:] == 255)


def test_decode_converts_16_bit(tmp_path):
    gray = np.full((32, 32), 40000, np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    out, converted = decode(str(tmp_path / "g16.png"), 32, 8)
    assert converted and np.all(out == round(40000 / 257))
    colour = np.zeros((32, 32, 3), np.uint16)
    colour[..., 0] = 65535  # BGR on disk: blue
    cv2.imwrite(str(tmp_path / "c16.png"), colour)
    out, converted = decode(str(tmp_path / "c16.png"), 32, 8)
    assert converted and np.all(out == (0, 0, 255))


def test_decode_arrays_and_bytes():
    out, converted = decode(np.full((16, 16), 3000, np.uint16), 16, 4)
    assert converted and out.shape == (16, 16, 3) and np.all(out == round(3000 / 257))
    buf = io.BytesIO()
    Image.fromarray(_face(0, 16)).save(buf, format="PNG")
    out, converted = decode(buf.getvalue(), 16, 4)
    assert not converted and np.array_equal(out, _face(0, 16))


@pytest.mark.parametrize("case", ["corrupt", "truncated_jpeg", "truncated_png", "empty", "missing"])
def test_decode_unreadable(tmp_path, case):
    path = str(tmp_path / "bad")
    if case == "corrupt":
        open(path, "wb").write(np.random.default_rng(0).bytes(2000))
    elif case in ("truncated_jpeg", "truncated_png"):
        buf = io.BytesIO()
        Image.fromarray(_face(1, 128)).save(buf, format="JPEG" if case == "truncated_jpeg" else "PNG")
        open(path, "wb").write(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "empty":
        open(path, "wb").close()
    else:
        path = str(tmp_path / "nowhere.png")
    with pytest.raises(ImageError) as e:
        decode(path, 32, 8)
    assert e.value.kind == "unreadable"


def test_decode_tiny(tmp_path):
    with pytest.raises(ImageError) as e:
        decode(_save(str(tmp_path / "t.png"), _face(2, 6)), 64, 16)
    assert e.value.kind == "too_small"


# ----------------------------------------------------------------------------- FFHQ-Ref CSV


def _write_csv(path, rows, header=("gt_image", "lq_image", "ref_image")):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_ffhq_ref_csv_source(tmp_path, caplog):
    images = tmp_path / "images"
    for i in range(8):
        _save(str(images / f"{i:05d}.png"), _face(i))
    _save(str(images / "01000" / "01234.png"), _face(99))  # FFHQ nested layout
    _save(str(tmp_path / "lq" / "00000.png"), _face(50))
    rows = [
        ("00000.png", "00000.png", "['00001.png', '00002.png']"),
        ("00001.png", "", "['00000.png', '00002.png', '00002.png', '00001.png']"),  # duplicate, self
        ("00002.png", "", "['00003.png', 'gone.png']"),  # one missing reference
        ("gone.png", "", "['00001.png']"),  # missing target
        ("00004.png", "", "['gone.png', 'gone2.png']"),  # no usable reference
        ("00005.png", "", "not a list ["),  # malformed
        ("01234.png", "", "['00006.png']"),  # nested layout
    ]
    _write_csv(tmp_path / "train_references.csv", rows)
    with caplog.at_level(logging.WARNING):
        src = FFHQRefSource(str(tmp_path / "train_references.csv"), str(images), lq_dir=str(tmp_path / "lq"))
    assert "skipped" in caplog.text
    by_gt = {os.path.basename(r.gt): r for r in src.records}
    assert sorted(by_gt) == ["00000.png", "00001.png", "00002.png", "01234.png"]
    assert [os.path.basename(p) for p in by_gt["00001.png"].refs] == ["00000.png", "00002.png"]
    assert [os.path.basename(p) for p in by_gt["00002.png"].refs] == ["00003.png"]
    assert by_gt["01234.png"].gt.endswith(os.path.join("01000", "01234.png"))
    assert by_gt["00000.png"].lq.endswith(os.path.join("lq", "00000.png")) and by_gt["00001.png"].lq is None
    assert src.issues == {"missing_file": 4, "duplicate_reference": 2, "no_usable_reference": 1, "malformed_row": 1}
    for r in src.records:
        assert r.gt not in r.refs and len(set(r.refs)) == len(r.refs)
        assert decode(src.fetch(r.gt), 32, 8)[0].shape == (32, 32, 3)


def test_ffhq_ref_split_file_and_columns(tmp_path):
    for i in range(4):
        _save(str(tmp_path / f"{i:05d}.png"), _face(i))
    _write_csv(tmp_path / "refs.csv", [("00000.png", "['00001.png', '00002.png']"),
                                       ("00003.png", "['00002.png']")], header=("gt_image", "ref_image"))
    (tmp_path / "train_image.txt").write_text("00000.png\n00001.png\n")
    src = FFHQRefSource(str(tmp_path / "refs.csv"), str(tmp_path), split_file=str(tmp_path / "train_image.txt"))
    assert len(src.records) == 1 and [os.path.basename(p) for p in src.records[0].refs] == ["00001.png"]
    assert src.issues == {"outside_split": 1, "reference_outside_split": 1}
    _write_csv(tmp_path / "bad.csv", [("00000.png",)], header=("gt_image",))
    with pytest.raises(ValueError, match="ref_image"):
        FFHQRefSource(str(tmp_path / "bad.csv"), str(tmp_path))


# ----------------------------------------------------------------------------- folder


def test_folder_source(tmp_path):
    for i, (ident, n) in enumerate((("alice", 3), ("bob", 2), ("carol", 1))):
        for k in range(n):
            _save(str(tmp_path / ident / f"{k}.{('png', 'jpg', 'webp')[k % 3]}"), _face(10 * i + k))
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(b"")
    src = FolderSource(str(tmp_path))
    assert len(src.records) == 5 and src.issues == {"no_usable_reference": 1}
    for r in src.records:
        assert r.gt not in r.refs and all(os.path.dirname(p) == os.path.dirname(r.gt) for p in r.refs)
        assert len(r.refs) == (2 if "alice" in r.gt else 1)
    with pytest.raises(FileNotFoundError):
        FolderSource(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- TFDS


def test_tfds_source_with_a_fake_tfds(monkeypatch):
    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(_face(seed, 16)).save(buf, format="PNG")
        return buf.getvalue()

    examples = [{"image": png(i), "identity": np.int64(i // 3 if i < 6 else 100 + i)} for i in range(8)]
    calls = {}

    def data_source(name, split, data_dir, decoders):
        calls.update(name=name, split=split, decoders=decoders)
        return examples

    fake = types.SimpleNamespace(data_source=data_source,
                                 decode=types.SimpleNamespace(SkipDecoding=lambda: "skip"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    src = TfdsSource("faces", split="train", image_key="image", identity_key="identity")
    assert calls == {"name": "faces", "split": "train", "decoders": {"image": "skip"}}
    assert len(src.records) == 6 and src.issues == {"no_usable_reference": 2}
    assert src.records[0].refs == (1, 2)
    out, _ = decode(src.fetch(4), 16, 4)
    assert np.array_equal(out, _face(4, 16))
    assert "_source" in src.__getstate__() and src.__getstate__()["_source"] is None


def test_tfds_missing_extra_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="tfds"):
        TfdsSource("faces")


def test_issue_kinds_are_stable():
    assert sources.ISSUE_KINDS == ("unreadable", "too_small", "converted")
