"""Image files and the model's pixel convention: uint8 RGB on disk, float [-1, 1] inside the model."""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import cv2
import numpy as np
from etils import epath
from PIL import Image

from iconface_jax import storage
from iconface_jax.data import sources

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def to_model(image: np.ndarray) -> np.ndarray:
    """uint8 -> the model's [-1, 1] float input."""
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(image) -> np.ndarray:
    """The model's [-1, 1] output -> uint8, rounded and clipped."""
    return ((np.asarray(image) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def read_face(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An aligned face crop of any size (grayscale, RGBA, 16-bit converted), local or gs://, as the model's
    square input in [-1, 1], and the file's (height, width); errors name the file."""
    try:
        data = storage.path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        rgb, _ = sources.decode(data, size, 1)
    except (OSError, sources.ImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return to_model(rgb), (height, width)


def image_size(path: str) -> tuple[int, int]:
    """An image file's (height, width), local or gs://, from its header; errors name the file."""
    try:
        with storage.path(path).open("rb") as f, Image.open(f) as img:
            width, height = img.size
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return height, width


def _unwritable(directory: str) -> str | None:
    """Why files cannot be written in the local folder `directory` (made if missing), or None."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):  # the nearest folder that exists is where the new ones would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """Raises ValueError, naming `flag` and `path`, unless outputs can be written into the local folder `path`."""
    problem = f"{path} is a file, not a folder" if os.path.isfile(path) else _unwritable(path)
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")


def check_output(path: str, flag: str = "--output") -> None:
    """Raises ValueError, naming `flag` and `path`, unless an image can be written to the local file `path`: an
    extension PIL writes, not a folder, in a writable (or creatable) folder."""
    ext = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise ValueError(f"{flag} {path}: {repr(ext) if ext else 'no extension'} is not an image format PIL writes "
                         f"(use one of {', '.join(IMAGE_EXTS)})")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder; name the image file to write")
    problem = _unwritable(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")


def check_distinct(outputs: Iterable[tuple[str, str]], inputs: Iterable[str]) -> None:
    """Raises ValueError naming the files where two sources would be written to one output, or an output would
    replace one of the `inputs`. `outputs`: (local output path, the input it is made from)."""
    read = {os.path.realpath(p): p for p in inputs if not storage.is_remote(p)}
    written: dict[str, str] = {}
    for out, source in outputs:
        key = os.path.realpath(out)
        if key in read:
            raise ValueError(f"{out} is the input {read[key]}: writing it would replace the input")
        if key in written:
            raise ValueError(f"{written[key]} and {source} would both be written to {out}; rename one or "
                             f"restore them into separate output folders")
        written[key] = source


def read_uint8(path: str, size: int) -> np.ndarray:
    """An image file as a size x size uint8 RGB array (centre-cropped and resized as the model reads it)."""
    return to_uint8(read_face(path, size)[0])


def from_model(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The model's output back to uint8 at the input's size."""
    out = to_uint8(image)
    if out.shape[:2] != tuple(shape):
        interp = cv2.INTER_AREA if out.shape[0] > shape[0] else cv2.INTER_CUBIC
        out = cv2.resize(out, (shape[1], shape[0]), interpolation=interp)
    return out


def write_png(path: epath.Path | str, image: np.ndarray) -> None:
    """Writes a uint8 image as PNG, local or gs://."""
    with storage.path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
