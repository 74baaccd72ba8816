"""Alignment and paste-back against the IConFace release's `face_align.py` (../shared/reference/flux_faceir), on the
same landmarks: template, similarity, aligned crop and composite; and the least-squares fit against numpy's lstsq.

The crop and composite comparisons use landmarks that an exact similarity fits: on noisy ones the release's LMEDS
estimate may drop a point that the least-squares fit keeps (see the fit test), which would compare two maps."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from helpers import require
from iconface_jax import alignment

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def theirs(shared_dir):
    """Their `face_align` module, loaded from its file (it needs only cv2 and numpy)."""
    path = require(shared_dir / "reference" / "flux_faceir" / "face_align.py", "the release's face_align.py")
    spec = importlib.util.spec_from_file_location("release_face_align", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_image(rng, height: int, width: int) -> np.ndarray:
    """A uint8 RGB image of smooth random blobs: bilinear sampling of it is stable under sub-pixel jitter."""
    small = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def similarity(points: np.ndarray, scale: float, degrees: float, shift) -> np.ndarray:
    """`points` rotated by `degrees` and scaled about the origin, then shifted."""
    t = np.radians(degrees)
    return points @ (scale * np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])) + np.asarray(shift)


def detection(landmarks: np.ndarray) -> np.ndarray:
    """A RetinaFace row as the release consumes it: box, score, ten landmark coordinates."""
    return np.concatenate([[0, 0, 1, 1, 0.9], landmarks.ravel()]).astype(np.float32)


@pytest.mark.parametrize("size,crop_scale,shift_y", [(512, 1.35, 0.0), (512, 1.0, 0.0), (256, 1.7, -0.08)])
def test_template_matches_release(theirs, size, crop_scale, shift_y):
    ours = alignment.template(size, crop_scale, shift_y)
    np.testing.assert_allclose(ours, theirs.get_face_template(face_size=size, crop_scale=crop_scale,
                                                              crop_shift_y=shift_y), atol=1e-4)


def test_fit_on_exact_points_inverts_the_similarity_and_matches_release(theirs):
    """Landmarks that are an exact similarity image of the template: the fit is that similarity's inverse, and
    their LMEDS estimate is the same map."""
    target = alignment.template(512, 1.35)
    landmarks = similarity(target, 1.7, 23.0, (410.0, -35.0))
    matrix = alignment.fit(landmarks, target)
    np.testing.assert_allclose(landmarks @ matrix[:, :2].T + matrix[:, 2], target, atol=1e-3)
    _, params = theirs.align_face(np.zeros((900, 1200, 3), np.uint8), detection(landmarks), crop_scale=1.35)
    np.testing.assert_allclose(matrix, params["affine_matrix"], rtol=1e-5, atol=1e-3)


def test_fit_is_least_squares_and_lmeds_when_it_keeps_all_points():
    """On noisy points: numpy's lstsq over the four similarity parameters; and OpenCV's LMEDS (the release's)
    whenever it keeps all five as inliers (it refines on its inliers only, so it differs where it drops one)."""
    rng = np.random.default_rng(0)
    target = alignment.template(512, 1.35).astype(np.float64)
    kept = 0
    for _ in range(20):
        landmarks = similarity(target, rng.uniform(0.3, 3), rng.uniform(-40, 40), rng.uniform(-500, 500, 2))
        landmarks += rng.normal(0, 4, landmarks.shape)
        matrix = alignment.fit(landmarks, target)
        # x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty).
        x, y = landmarks.T
        one, zero = np.ones(5), np.zeros(5)
        rows = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate(target.T), rcond=None)
        np.testing.assert_allclose(matrix, [[a, -b, tx], [b, a, ty]], rtol=1e-9, atol=1e-7)
        lmeds, inliers = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), target.astype(np.float32),
                                                     method=cv2.LMEDS)
        if inliers.all():
            kept += 1
            np.testing.assert_allclose(matrix, lmeds, rtol=1e-4, atol=1e-2)
    assert kept >= 5  # the comparison above ran


@pytest.mark.parametrize("shift", [(600.0, 500.0), (-40.0, 380.0)])  # inside the photo; partly off its left edge
def test_warp_matches_release(theirs, shift):
    rng = np.random.default_rng(1)
    photo = smooth_image(rng, 720, 960)
    landmarks = similarity(alignment.template(512, 1.35), 0.6, -12.0, shift)
    matrix = alignment.fit(landmarks, alignment.template(512, 1.35))
    crop = alignment.warp(photo, matrix, 512)
    expected, _ = theirs.align_face(photo, detection(landmarks), crop_scale=1.35)
    assert crop.shape == expected.shape == (512, 512, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - expected).max() <= 1
    if shift[0] < 0:  # the border colour shows where the crop leaves the photo
        assert (expected[:, 0] == (132, 133, 135)).all(axis=-1).mean() > 0.5


@pytest.mark.parametrize("softness,shift", [(0.25, (420.0, 210.0)), (1.0, (420.0, 210.0)), (2.5, (420.0, 210.0)),
                                           (1.0, (-90.0, 420.0))])  # the last one partly off the photo's corner
def test_paste_back_matches_release_on_the_crop_and_keeps_the_photo_off_it(theirs, softness, shift):
    """Within the crop's footprint, their composite; outside it, the photo itself, where theirs darkens a band by up
    to a few levels (their blurred mask leaks past the footprint onto the warped crop's black surround)."""
    rng = np.random.default_rng(2)
    photo, restored = smooth_image(rng, 600, 800), smooth_image(rng, 256, 256)
    landmarks = similarity(alignment.template(256, 1.35), 0.9, 17.0, shift)
    _, params = theirs.align_face(photo, detection(landmarks), face_size=256, crop_scale=1.35)
    expected, _ = theirs.paste_face_back(photo, restored, params, mask_softness=softness)
    ours = alignment.paste_back(photo, restored, alignment.fit(landmarks, alignment.template(256, 1.35)), softness)
    assert ours.shape == photo.shape and ours.dtype == np.uint8
    footprint = cv2.warpAffine(np.ones((256, 256), np.float32), np.float32(params["inverse_affine"]), (800, 600))
    inside = cv2.erode(footprint, np.ones((7, 7), np.uint8)) == 1  # clear of the rim both masks erode first
    assert np.abs(ours.astype(int) - expected)[inside].max() <= 1
    assert (ours[footprint == 0] == photo[footprint == 0]).all()
    assert (ours != photo).any(axis=-1).mean() > 0.02  # the face went in


def test_paste_back_of_the_warp_keeps_far_pixels_and_the_face():
    """A crop pasted back unchanged leaves the photo as it was, up to bilinear resampling inside the face and
    exactly outside it; a different crop replaces the face's centre."""
    rng = np.random.default_rng(3)
    photo = smooth_image(rng, 400, 600)
    matrix = alignment.fit(similarity(alignment.template(256), 0.5, 5.0, (300.0, 150.0)), alignment.template(256))
    crop = alignment.warp(photo, matrix, 256)
    assert np.abs(alignment.paste_back(photo, crop, matrix).astype(int) - photo).max() <= 3
    composite = alignment.paste_back(photo, np.full_like(crop, 7), matrix)
    centre = np.linalg.solve(matrix[:, :2], np.array([128.0, 128.0]) - matrix[:, 2]).round().astype(int)
    assert (composite[centre[1], centre[0]] == 7).all()
    assert (composite[:, :40] == photo[:, :40]).all() and (composite[:40] == photo[:40]).all()
    away = alignment.fit(similarity(alignment.template(256), 0.5, 5.0, (900.0, 150.0)), alignment.template(256))
    assert (alignment.paste_back(photo, crop, away) == photo).all()  # a crop wholly off the photo


def test_bad_input_is_refused_with_the_field_named():
    image, matrix = np.zeros((64, 64, 3), np.uint8), np.array([[1.0, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="landmarks must be five"):
        alignment.fit(np.zeros((68, 2)), alignment.template())
    with pytest.raises(ValueError, match="five copies of one point"):
        alignment.fit(np.ones((5, 2)), alignment.template())
    with pytest.raises(ValueError, match="image must be a uint8"):
        alignment.warp(image.astype(np.float32), matrix, 32)
    with pytest.raises(ValueError, match="invertible"):
        alignment.warp(image, np.zeros((2, 3)), 32)
    with pytest.raises(ValueError, match="crop must be square"):
        alignment.paste_back(image, image[:, :32], matrix)
    with pytest.raises(ValueError, match="softness must be positive"):
        alignment.paste_back(image, image, matrix, softness=float("nan"))
    with pytest.raises(ValueError, match="crop_scale"):
        alignment.template(512, 0.0)
