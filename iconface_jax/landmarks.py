"""Five-point face landmarks without RetinaFace weights: dlib's detector and 68-point predictor, or the user's own.

Points are in `alignment`'s order: the eye on the image's left, the other eye, the nose tip, the mouth corner on the
image's left, the other corner. dlib is an optional extra (`pip install -e ".[landmarks]"`): the `dlib-bin` wheels
and the `face-recognition-models` package, which ships the 68-point predictor FFHQ's own alignment used.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import pathlib

import numpy as np

_EXTRA = 'pip install -e ".[landmarks]"'
# The 68-point scheme (iBUG 300-W, 0-based): the image-left eye's contour is 36-41, the other 42-47, the nose tip
# 30, the outer mouth corners 48 and 54. Eye centres are contour means, as in FFHQ's recipe.
_EYES = (slice(36, 42), slice(42, 48))
_NOSE_TIP, _MOUTH_CORNERS = 30, (48, 54)


@functools.cache
def _dlib():
    """(dlib's HOG face detector, its 68-point shape predictor), loaded once."""
    try:
        import dlib
    except ImportError:
        raise ImportError(f"dlib landmarks need the dlib-bin package: {_EXTRA}") from None
    # Located without importing the package: its __init__ imports pkg_resources, gone from recent setuptools.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"dlib landmarks need the face-recognition-models package: {_EXTRA}")
    model = pathlib.Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not model.is_file():
        raise ImportError(f"{model} is missing (a broken face-recognition-models install): {_EXTRA}")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))


def five_from_68(points: np.ndarray) -> np.ndarray:
    """The five alignment points (5, 2) from 68 iBUG points (68, 2)."""
    points = np.asarray(points, np.float32)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) landmarks, shape (68, 2); got shape {points.shape}")
    eyes = [points[s].mean(0) for s in _EYES]
    return np.stack([*eyes, points[_NOSE_TIP], *points[list(_MOUTH_CORNERS)]])


def dlib_faces(image: np.ndarray, upsample: int = 1) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Faces in a uint8 RGB image as (detector score, box [x1, y1, x2, y2], five landmarks (5, 2)), best first.
    `upsample` doubles the image that many times before detection (finds smaller faces, 4x slower each)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 HxWx3 RGB image; got {image.dtype} of shape {image.shape}")
    detector, predictor = _dlib()
    image = np.ascontiguousarray(image)
    rects, scores, _ = detector.run(image, upsample, 0.0)
    faces = []
    for rect, score in zip(rects, scores):
        shape = predictor(image, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float32)
        faces.append((float(score), box, five_from_68(points)))
    return faces  # dlib's detector returns them best first


def from_json(path: str | pathlib.Path) -> list[np.ndarray]:
    """The five landmarks (5, 2) of each face in an `align_params_json` file as the IConFace release writes it:
    one object, or a list of them, each with "landmarks" as five [x, y] pairs."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise ValueError(f"{path}: an empty list, no faces")
    faces = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}" if isinstance(data, list) else f"{path}:"
        if not isinstance(entry, dict) or "landmarks" not in entry:
            raise ValueError(f"{where} has no \"landmarks\" field (expected an object from align_params_json)")
        try:
            points = np.asarray(entry["landmarks"], np.float64)
        except (TypeError, ValueError):
            points = np.empty(0)
        if points.shape != (5, 2) or not np.isfinite(points).all():
            raise ValueError(f"{where} \"landmarks\" must be five finite [x, y] pairs")
        faces.append(points.astype(np.float32))
    return faces
