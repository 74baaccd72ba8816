"""Face dataset sources and image decoding with bad-input handling.

A source has `records` (one per training target: the target image's key, the keys of the
same-identity images that may serve as its references, and an optional given degraded image),
`fetch(key)` (a path, encoded bytes or a decoded array) and `issues` (what was skipped while
indexing, by kind). Paths (CSV, split file, image folders, images) may be local or `gs://`. Sources here:

- `FFHQRefSource`: FFHQ-Ref as released with ReF-LDM, `reference_mapping/*_references.csv` rows of
  `gt_image`, optional `lq_image` and `ref_image` (a Python list literal), resolved against image
  directories (flat, or FFHQ's `images1024x1024/<thousands>/` layout), optionally restricted to an
  identity-disjoint split file (`id_based_ffhq_split/*.txt`).
- `FolderSource`: `root/<identity>/*.{png,jpg,jpeg,webp}`; references are the identity's other images.
- `TfdsSource`: a TFDS dataset read through `tfds.data_source` (ArrayRecord, local or on GCS);
  needs the optional `tensorflow-datasets` extra.
- `synthetic.SyntheticSource`: procedurally drawn identities (the CPU demo and the tests).

Bad inputs never stop a run and are never silent. Indexing skips CSV rows naming missing files and
targets with no usable reference, counting them in `issues` and logging one warning per source.
`decode` converts what has a right conversion (grayscale, palette, RGBA/LA over white, 16-bit, CMYK
-> RGB uint8, through `images.decode_image`, as whole photos and crops to restore are read) and raises
`ImageError` (kind `unreadable` or `too_small`) for corrupt, truncated, unsupported or tiny images; the
pipeline counts those, logs them and substitutes deterministically.
"""
from __future__ import annotations

import ast
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import numpy as np

from iconface_jax import storage
from iconface_jax.images import IMAGE_EXTS, ImageError, decode_image, square_resize

logger = logging.getLogger(__name__)

ISSUE_KINDS = ("unreadable", "too_small", "converted")  # counted per image read by the pipeline

Key = Hashable  # a path (str) or an index (int), whatever the source's `fetch` takes


@dataclasses.dataclass(frozen=True)
class Record:
    """One training target: its image, its candidate references (distinct, never the target) and an
    optional given degraded image."""

    gt: Key
    refs: tuple[Key, ...]
    lq: Key | None = None


class Source(Protocol):
    """What the pipeline needs from a dataset."""

    records: Sequence[Record]
    issues: dict[str, int]

    def fetch(self, key: Key) -> str | bytes | np.ndarray:
        """The image behind `key`: a file path, encoded bytes or a uint8 array."""


# ----------------------------------------------------------------------------- decoding


def decode(data: str | bytes | np.ndarray, resolution: int, min_side: int) -> tuple[np.ndarray, bool]:
    """Decode to a (resolution, resolution, 3) uint8 RGB image, centre-cropped to a square.

    Returns the image and whether a mode conversion happened (`images.decode_image`). Raises `ImageError` for
    unreadable data or a shorter side below `min_side`.
    """
    rgb, converted = decode_image(data, draft=resolution)
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise ImageError("too_small", f"{w}x{h} is below the minimum side {min_side}")
    return square_resize(rgb, resolution), converted


# ----------------------------------------------------------------------------- sources


def _report(name: str, issues: Counter, kept: int) -> dict[str, int]:
    """Log what indexing skipped (one warning per source) and return the counts."""
    if issues:
        logger.warning("%s: kept %d targets; skipped or dropped: %s", name, kept,
                       ", ".join(f"{k} {v}" for k, v in sorted(issues.items())))
    return dict(issues)


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name.strip()))[0]


def _split_stems(path: str) -> set[str]:
    return {_stem(line) for line in storage.path(path).read_text().splitlines() if line.strip()}


def _listing(directory: str) -> list[str]:
    """The sorted names in `directory`. On Cloud Storage this also fills gcsfs's listing cache, from which
    its existence tests of the directory's entries are then answered without a request each."""
    return sorted(p.name for p in storage.path(directory).iterdir())


def _list_tree(directory: str) -> None:
    """On Cloud Storage, lists `directory` and its subfolders once (a request per 1,000 entries), so that
    `resolve_image`'s existence tests are answered from gcsfs's listing cache instead of a request each."""
    if storage.is_remote(directory):
        for _ in storage.path(directory).walk():
            pass


def resolve_image(name: str, directory: str) -> str | None:
    """The file `name` in `directory`, or in FFHQ's thousands subfolder (00000/00042.png); None if absent."""
    path = os.path.join(directory, name)
    if storage.path(path).is_file():
        return path
    stem = _stem(name)
    if stem.isdigit():
        nested = os.path.join(directory, f"{int(stem) // 1000 * 1000:05d}", os.path.basename(name))
        if storage.path(nested).is_file():
            return nested
    return None


class FFHQRefSource:
    """FFHQ-Ref reference-mapping CSV (`gt_image`, optional `lq_image`, `ref_image` list literal).

    `image_dir` holds the targets and (unless `ref_dir` is given) the references; `lq_dir` the given
    degraded images. A name missing there is also looked up in FFHQ's nested layout
    (`00000.png` -> `00000/00000.png`, `01234.png` -> `01000/01234.png`). With `split_file`, only
    targets and references listed there are kept (identity-disjoint training).
    """

    def __init__(self, csv_path: str, image_dir: str, lq_dir: str = "", ref_dir: str = "",
                 split_file: str = ""):
        self.csv_path = csv_path
        split = _split_stems(split_file) if split_file else None
        issues: Counter = Counter()
        self.records: list[Record] = []
        for directory in {image_dir, lq_dir, ref_dir} - {""}:
            _list_tree(directory)
        reader = storage.read_csv(csv_path)
        missing_cols = {"gt_image", "ref_image"} - set(reader.fieldnames or ())
        if missing_cols:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing_cols)}")
        for row in reader:
            record = self._parse(row, image_dir, lq_dir, ref_dir or image_dir, split, issues)
            if record is not None:
                self.records.append(record)
        self.issues = _report(f"FFHQ-Ref {csv_path}", issues, len(self.records))

    def _parse(self, row: dict[str, Any], image_dir: str, lq_dir: str, ref_dir: str,
               split: set[str] | None, issues: Counter) -> Record | None:
        gt_name = (row.get("gt_image") or "").strip()
        try:
            ref_names = ast.literal_eval(row.get("ref_image") or "[]")
            if isinstance(ref_names, str):
                ref_names = [ref_names]
            ref_names = [str(r) for r in ref_names]
        except (ValueError, SyntaxError):
            issues["malformed_row"] += 1
            return None
        if not gt_name:
            issues["malformed_row"] += 1
            return None
        if split is not None and _stem(gt_name) not in split:
            issues["outside_split"] += 1
            return None
        gt = resolve_image(gt_name, image_dir)
        if gt is None:
            issues["missing_file"] += 1
            return None
        refs: list[str] = []
        for name in ref_names:
            if split is not None and _stem(name) not in split:
                issues["reference_outside_split"] += 1
                continue
            path = resolve_image(name, ref_dir)
            if path is None:
                issues["missing_file"] += 1
            elif path == gt or path in refs:
                issues["duplicate_reference"] += 1
            else:
                refs.append(path)
        if not refs:
            issues["no_usable_reference"] += 1
            return None
        lq = None
        lq_name = (row.get("lq_image") or "").strip()
        if lq_name and lq_dir:
            lq = resolve_image(lq_name, lq_dir)
            if lq is None:
                issues["missing_file"] += 1
        return Record(gt=gt, refs=tuple(refs), lq=lq)

    def fetch(self, key: Key) -> str:
        """The file path (records hold resolved paths)."""
        return str(key)


class FolderSource:
    """One folder per identity: `root/<identity>/*.{png,jpg,jpeg,webp}` (sorted, case-insensitive
    extensions). Every image is a target whose references are the identity's other images; an
    identity with a single image has no usable reference and is skipped (counted)."""

    def __init__(self, root: str):
        self.root = root
        if not storage.path(root).is_dir():
            raise FileNotFoundError(f"folder source: {root} is not a directory")
        issues: Counter = Counter()
        self.records: list[Record] = []
        for identity in _listing(root):
            folder = os.path.join(root, identity)
            if not storage.path(folder).is_dir():
                continue
            images = [os.path.join(folder, n) for n in _listing(folder)
                      if n.lower().endswith(IMAGE_EXTS) and storage.path(os.path.join(folder, n)).is_file()]
            if len(images) < 2:
                issues["no_usable_reference"] += len(images)
                continue
            self.records += [Record(gt=p, refs=tuple(q for q in images if q != p)) for p in images]
        self.issues = _report(f"folder {root}", issues, len(self.records))

    def fetch(self, key: Key) -> str:
        """The file path."""
        return str(key)


class TfdsSource:
    """A TFDS dataset with an image feature and an identity label, read through `tfds.data_source`
    (random access over ArrayRecord files, local or `gs://`).

    Indexing reads every example's label once (images are not decoded: `SkipDecoding`), so it costs
    one pass over the data; identities with a single image are skipped (counted). Needs
    `pip install "iconface-jax[tfds]"`.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str = "", image_key: str = "image",
                 identity_key: str = "identity"):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.identity_key = image_key, identity_key
        self._source = None
        source = self._open()
        groups: dict[str, list[int]] = {}
        for i in range(len(source)):
            label = source[i][identity_key]
            label = label.decode() if isinstance(label, bytes) else str(np.asarray(label).item())
            groups.setdefault(label, []).append(i)
        issues: Counter = Counter()
        self.records: list[Record] = []
        for label in sorted(groups):
            idx = groups[label]
            if len(idx) < 2:
                issues["no_usable_reference"] += 1
                continue
            self.records += [Record(gt=i, refs=tuple(j for j in idx if j != i)) for i in idx]
        self.issues = _report(f"TFDS {name}[{split}]", issues, len(self.records))

    def _open(self) -> Any:
        if self._source is None:
            try:
                import tensorflow_datasets as tfds  # optional extra
            except ImportError as e:
                raise ImportError('the TFDS source needs `pip install "iconface-jax[tfds]"`') from e
            self._source = tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir or None,
                decoders={self.image_key: tfds.decode.SkipDecoding()})
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes reopen the data source rather than pickling file handles.
        return {**self.__dict__, "_source": None}

    def fetch(self, key: Key) -> bytes | np.ndarray:
        """The encoded image bytes (or an array, if the dataset stores decoded images)."""
        value = self._open()[int(key)][self.image_key]
        return value if isinstance(value, bytes) else np.asarray(value)
