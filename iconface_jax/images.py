"""Image files and the model's pixel convention: uint8 RGB on disk, float [-1, 1] inside the model.

`decode_image` is the one decoder of image files: training images (`data.sources`), aligned crops to restore
(`read_face`) and whole photos (`photos.read_photo`) all come to uint8 RGB through it, so a grayscale, palette,
RGBA/LA (composited over white), 16-bit or CMYK file gives the same pixels whichever way it arrives.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import cv2
import numpy as np
from etils import epath
from PIL import Image, ImageOps

from iconface_jax import storage

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(Exception):
    """An image that cannot be used; `kind` is `unreadable` or `too_small` (the data pipeline counts them by kind)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: str | bytes | np.ndarray, draft: int = 0) -> tuple[np.ndarray, bool]:
    """An image file (path, local or gs://), its encoded bytes or a decoded array as uint8 RGB (H, W, 3), EXIF
    orientation applied, and whether a mode conversion happened (grayscale, palette, alpha, 16-bit, CMYK).

    `draft`: the side the image will be resized down to, if known; a JPEG then decodes straight to the smallest
    power-of-two reduction whose sides are no smaller (0: full size). Raises `ImageError` (kind `unreadable`) for
    corrupt, truncated or unsupported data.
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    try:
        if isinstance(data, str) and storage.is_remote(data):
            data = storage.path(data).read_bytes()  # one request; PIL would read the object piece by piece
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            # 48-bit RGB PNGs open as 8-bit RGB (Pillow keeps the high byte): a conversion all the same.
            deep = any(";16" in str(tile[3]) for tile in img.tile)
            if draft:
                img.draft("RGB", (draft, draft))
            img.load()  # raises on truncated data, unlike OpenCV, which pads silently
            rgb, converted = _pil_to_rgb(ImageOps.exif_transpose(img))
            return rgb, converted or deep
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise ImageError("unreadable", f"{type(e).__name__}: {e}") from None


def _pil_to_rgb(img: Image.Image) -> tuple[np.ndarray, bool]:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), False
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        # Composite over white: the colour under transparent pixels is arbitrary.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), True
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(img))
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB")), True
    raise ImageError("unreadable", f"unsupported image mode {mode}")


def _array_to_rgb(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """uint8/uint16/int32 arrays of shape (H, W), (H, W, 1|3|4) to RGB uint8."""
    converted = False
    if a.dtype != np.uint8:
        if a.dtype.kind not in "ui":
            raise ImageError("unreadable", f"unsupported sample type {a.dtype}")
        # 16-bit samples (PIL's 32-bit 'I' mode also holds 16-bit data) to 8 bits, rounded.
        top = 65535.0 if a.dtype == np.uint16 or a.max(initial=0) > 255 else 255.0
        a = np.clip(np.rint(a.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
        converted = True
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ImageError("unreadable", f"unsupported array shape {a.shape}")
    if a.shape[2] in (2, 4):  # alpha over white
        alpha = a[..., -1:].astype(np.float32) / 255.0
        a = np.rint(a[..., :-1] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        converted = True
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
        converted = True
    return np.ascontiguousarray(a), converted


def square_resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize (area when shrinking, bicubic when enlarging)."""
    h, w = img.shape[:2]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    if img.shape[0] == resolution:
        return img
    flag = cv2.INTER_AREA if img.shape[0] > resolution else cv2.INTER_CUBIC
    return cv2.resize(img, (resolution, resolution), interpolation=flag)


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
        rgb = square_resize(decode_image(data, draft=size)[0], size)
    except (OSError, ImageError) as e:
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
