"""Landmark sources: dlib on the real photos of ../shared/faces (faces found, landmarks consistent with the aligned
crop, the training data's crop scale), the reduction of 68 points to five, the release's align_params_json files
(written by their own `face_align.py`), and the refusals."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import import_or_skip, on_ci, require
from iconface_jax import alignment, landmarks
from test_alignment import theirs  # noqa: F401 (a fixture: the release's face_align module)


def photo(path) -> np.ndarray:
    return np.asarray(Image.open(require(path, path.name)).convert("RGB"))


@pytest.fixture(scope="module")
def dlib_ready():
    """dlib and its models (the test extra): a skip where missing, under CI a failure."""
    import_or_skip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        (pytest.fail if on_ci() else pytest.skip)("face-recognition-models is not installed")


@pytest.mark.parametrize("name", ["deg_4.png", "ref_4.jpg"])
def test_dlib_finds_the_face_and_its_landmarks_align_it(shared_dir, dlib_ready, name):
    """One face; its five points fit the template with eyes within 15 px (FFHQ faces scatter ~10 px about it),
    and dlib run again on the aligned crop finds the same points where the warp took them (within 4 px)."""
    image = photo(shared_dir / "faces" / "whole" / name)
    faces = landmarks.dlib_faces(image, upsample=0)
    assert len(faces) == 1
    _, box, points = faces[0]
    assert box[0] < points[:, 0].min() and points[:, 0].max() < box[2] and box[1] < points[:, 1].max() < box[3]
    target = alignment.template()
    matrix = alignment.fit(points, target)
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    assert np.linalg.norm(moved[:2] - target[:2], axis=1).max() < 15
    again = landmarks.dlib_faces(alignment.warp(image, matrix, 512), upsample=0)
    assert len(again) == 1 and np.linalg.norm(again[0][2] - moved, axis=1).max() < 4


def test_dlib_finds_the_small_second_face_when_upsampling(shared_dir, dlib_ready):
    """ref_1.jpg holds a second, much smaller face (about 90 px): found at one upsampling, best score first."""
    faces = landmarks.dlib_faces(photo(shared_dir / "faces" / "whole" / "ref_1.jpg"), upsample=1)
    assert len(faces) == 2 and faces[0][0] > faces[1][0]
    widths = [box[2] - box[0] for _, box, _ in faces]
    assert widths[0] > 400 and 60 < widths[1] < 130


def test_crop_scale_matches_the_ffhq_aligned_training_crops(shared_dir, dlib_ready):
    """dlib's points (FFHQ's own alignment used this predictor) on the 40 FFHQ-aligned ground truths, fitted to the
    unscaled template: the scale of each fit is the crop_scale that reproduces that crop; their median is ours."""
    cases = sorted(require(shared_dir / "faces", "the benchmark faces").glob("*/*/gt.jpg"))
    assert len(cases) == 40
    scales = []
    for case in cases:
        (_, _, points), *_ = landmarks.dlib_faces(photo(case), upsample=0)
        matrix = alignment.fit(points, alignment.template(512, crop_scale=1.0))
        scales.append(np.hypot(*matrix[:, 0]))
    assert abs(np.median(scales) - alignment.CROP_SCALE) < 0.01


def test_five_from_68_takes_eye_centres_nose_tip_and_mouth_corners():
    points = np.random.default_rng(0).uniform(0, 500, (68, 2)).astype(np.float32)
    five = landmarks.five_from_68(points)
    expected = [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    np.testing.assert_allclose(five, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="68"):
        landmarks.five_from_68(points[:5])


@pytest.mark.parametrize("count", [1, 2])
def test_from_json_reads_the_release_align_params(theirs, tmp_path, count):
    """Their node writes one object for one image and a list for a batch; both read back to the landmarks."""
    rng = np.random.default_rng(count)
    image = np.zeros((300, 400, 3), np.uint8)
    faces = [rng.uniform(50, 250, (5, 2)).astype(np.float32) for _ in range(count)]
    params = [theirs.align_face(image, np.concatenate([[10, 10, 200, 200, 0.9], f.ravel()]))[1] for f in faces]
    path = tmp_path / "align_params.json"
    path.write_text(theirs.align_params_to_json(params[0] if count == 1 else params))
    read = landmarks.from_json(path)
    assert len(read) == count
    for ours, expected in zip(read, faces):
        np.testing.assert_allclose(ours, expected, rtol=1e-6)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a readable JSON file"),
    ("[]", "an empty list"),
    ('{"score": 1}', 'no "landmarks" field'),
    ('[{"landmarks": [[1, 2]] }]', 'entry 0 "landmarks" must be five'),
    ('{"landmarks": [[1, 2], [3, 4], [5, 6], [7, 8], [9, "x"]]}', '"landmarks" must be five'),
    ('{"landmarks": [[1, 2], [3, 4], [5, 6], [7, 8], [9, NaN]]}', '"landmarks" must be five finite'),
])
def test_from_json_refuses_malformed_files_naming_them(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        landmarks.from_json(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_dlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # a None entry makes `import dlib` raise ImportError
    landmarks._dlib.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[landmarks\]"'):
            landmarks.dlib_faces(np.zeros((8, 8, 3), np.uint8))
    finally:
        landmarks._dlib.cache_clear()
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        landmarks.dlib_faces(np.zeros((8, 8), np.uint8))
