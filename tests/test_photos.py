"""Whole-photo restoration (iconface_jax.photos, `restore --mode photo`): a real photo of ../shared/faces/whole with
landmarks from dlib or from a JSON file comes back at its size, unchanged away from the face and restored on it;
references are matched to the faces of a two-face photo by identity; the alignment JSON is the release's."""
from __future__ import annotations

import importlib.util
import json
import sys

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from helpers import import_or_skip, on_ci
from iconface_jax import alignment, landmarks, photos, restore, workdir
from iconface_jax.data import sources

pytestmark = pytest.mark.slow

# dlib's five points on deg_4.png (measured once with `landmarks.dlib_faces`, upsample 1): the JSON route's input.
DEG_4_LANDMARKS = [[587.3, 640.3], [864.3, 631.7], [762.0, 810.0], [556.0, 889.0], [885.0, 884.0]]


@pytest.fixture(scope="module")
def toy(toy_run):
    system, cfg, _ = workdir.load(str(toy_run))
    return system, cfg.data.resolution


def identity_run(calls: list):
    """A stand-in restoration that returns its degraded input and records the references it was given."""

    def run(system, degraded, references, key):
        calls.append((np.asarray(degraded), np.asarray(references)))
        return degraded

    return run


def crop_coords(face: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Each pixel's (x, y) in the aligned crop's frame (the template fit of the landmarks), (H, W, 2)."""
    matrix = alignment.fit(face, alignment.template(photos.CROP, alignment.CROP_SCALE))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.stack([xx, yy, np.ones_like(xx)], -1) @ matrix.T


def check_composite(photo: np.ndarray, out: np.ndarray, face: np.ndarray) -> None:
    """Same size; pixels outside the crop's footprint (8 px margin) the input's own; the face region changed."""
    assert out.shape == photo.shape
    uv = crop_coords(face, photo.shape[:2])
    far = ((uv < -8) | (uv > photos.CROP + 8)).any(-1)
    assert far.mean() > 0.3
    np.testing.assert_array_equal(out[far], photo[far])
    centre = ((uv > photos.CROP / 4) & (uv < 3 * photos.CROP / 4)).all(-1)
    assert np.abs(out[centre].astype(int) - photo[centre]).mean() > 5


def test_assign_matches_by_cosine_and_reports_the_unmatched():
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 16))
    faces = np.stack([a, b])
    # References: b (scaled: cosine ignores norm), a, a nearly, c (nobody), b nearly.
    refs = np.stack([3 * b, a, a + 0.1 * c, c, b + 0.3 * c])
    per_face, unused = photos.assign(faces, refs, threshold=0.5, max_refs=3)
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    assert [[r for r, _ in p] for p in per_face] == [[1, 2], [0, 4]]  # best first
    assert per_face[0][1][1] == pytest.approx(cos(a, a + 0.1 * c))
    assert [r for r, _ in unused] == [3]
    assert unused[0][1] == pytest.approx(max(cos(a, c), cos(b, c)))
    per_face, unused = photos.assign(faces, refs, threshold=0.5, max_refs=1)  # the weaker match dropped, reported
    assert [[r for r, _ in p] for p in per_face] == [[1], [0]]
    assert [r for r, _ in unused] == [2, 3, 4]


def test_read_photo_converts_16_bit_and_alpha_as_training_does(tmp_path):
    """A 16-bit grayscale PNG and an RGBA PNG read as whole photos: 16-bit samples scaled to 8 bits (not clipped),
    alpha composited over white (not dropped), the same pixels the training decoder reads from the same files."""
    gray = np.tile(np.array([0, 257 * 40, 40000, 65535], np.uint16), (8, 2))  # (8, 8)
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 30, 0)
    rgba[:4, :, 3] = 255  # top opaque, then a fifth opaque, then transparent
    rgba[4:6, :, 3] = 51
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    want = {"g16.png": np.repeat(np.tile(np.array([0, 40, 156, 255], np.uint8), (8, 2))[..., None], 3, axis=2),
            "rgba.png": np.array([[(200, 30, 0)] * 8] * 4 + [[(244, 210, 204)] * 8] * 2 + [[(255, 255, 255)] * 8] * 2,
                                 np.uint8)}
    for name, expected in want.items():
        photo = photos.read_photo(str(tmp_path / name))
        assert photo.dtype == np.uint8, name
        np.testing.assert_array_equal(photo, expected, err_msg=name)
        np.testing.assert_array_equal(photo, sources.decode(str(tmp_path / name), 8, 1)[0], err_msg=name)


def test_params_json_is_the_releases_and_reads_back(shared_dir, tmp_path):
    """Our alignment JSON has the keys of the release's `align_face` params, its matrices invert each other and take
    the landmarks onto the template, and `landmarks.from_json` (the --landmarks-json route) reads it back."""
    sys.path.insert(0, str(shared_dir / "reference" / "flux_faceir"))
    try:
        face_align = importlib.import_module("face_align")
    finally:
        sys.path.pop(0)
    photo = np.zeros((300, 200, 3), np.uint8)
    points = np.array(DEG_4_LANDMARKS, np.float32) / 6
    face = photos.given_faces([points])[0]
    scale = alignment.RELEASE_CROP_SCALE  # their template refuses scales below 1
    _, matrix = photos.align(photo, face, scale)
    params = photos.align_params(photo, face, matrix, scale)
    _, theirs = face_align.align_face(photo, np.concatenate([face.box, [1.0], points.ravel()]), face_size=512,
                                      crop_scale=scale)
    assert sorted(params) == sorted(theirs)
    np.testing.assert_allclose(params["template"], theirs["template"], atol=1e-4)

    def misfit(matrix):  # squared distance of the moved landmarks to the template
        matrix = np.asarray(matrix)
        return ((points @ matrix[:, :2].T + matrix[:, 2] - np.asarray(theirs["template"])) ** 2).sum()
    # Least squares: no worse than their LMEDS similarity, and close to it.
    assert misfit(params["affine_matrix"]) <= misfit(theirs["affine_matrix"]) * (1 + 1e-6)
    np.testing.assert_allclose(params["affine_matrix"], theirs["affine_matrix"], atol=0.05 * 512)
    forward = np.asarray(params["affine_matrix"])
    inverse = np.vstack([params["inverse_affine"], [0, 0, 1]]) @ np.vstack([forward, [0, 0, 1]])
    np.testing.assert_allclose(inverse, np.eye(3), atol=1e-9)
    (tmp_path / "params.json").write_text(json.dumps([params]))
    np.testing.assert_allclose(landmarks.from_json(tmp_path / "params.json")[0], points, atol=1e-6)


def test_cli_restores_a_whole_photo_with_json_landmarks(toy_run, shared_dir, tmp_path, capsys):
    """The issue's command on deg_4.png with ref_4.jpg (an aligned square crop of the reference, made here: the
    JSON route has no finder for whole-photo references), landmarks from a file; --save-crops and --params-json."""
    photo = photos.read_photo(str(shared_dir / "faces" / "whole" / "deg_4.png"))
    ref = photos.read_photo(str(shared_dir / "faces" / "whole" / "ref_4.jpg"))
    ref_face = photos.given_faces([[[581.7, 635.7], [873.5, 629.5], [760.0, 818.0], [558.0, 893.0],
                                    [869.0, 893.0]]])[0]
    Image.fromarray(photos.align(ref, ref_face)[0]).save(tmp_path / "ref.png")
    (tmp_path / "lm.json").write_text(json.dumps({"landmarks": DEG_4_LANDMARKS}))
    args = ["--checkpoint", str(toy_run), "--input", str(shared_dir / "faces" / "whole" / "deg_4.png"),
            "--ref", str(tmp_path / "ref.png"), "--output", str(tmp_path / "out.png"), "--steps", "2",
            "--mode", "photo",
            "--landmarks-json", str(tmp_path / "lm.json"), "--save-crops", str(tmp_path / "crops"),
            "--params-json", str(tmp_path / "params.json"), "--match-threshold", "-1"]
    assert restore.main(args) == 0
    err = capsys.readouterr().err
    assert "face 1/1" in err and "ref.png" in err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    check_composite(photo, out, np.array(DEG_4_LANDMARKS))
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == ["out_face1.png", "out_face1_restored.png"]
    params = json.loads((tmp_path / "params.json").read_text())
    assert len(params) == 1 and params[0]["image_width"] == photo.shape[1]
    # In crop mode a photo is refused, never stretched.
    assert restore.main([*args[:6], "--output", str(tmp_path / "crop.png"), "--mode", "crop"]) == 1
    assert "--mode photo" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dlib_ready():
    """dlib and its models (the test extra): a skip where missing, under CI a failure."""
    import_or_skip("dlib")
    if importlib.util.find_spec("face_recognition_models") is None:
        (pytest.fail if on_ci() else pytest.skip)("face-recognition-models is not installed")


def test_dlib_route_restores_the_face_it_finds(toy, shared_dir, dlib_ready):
    """dlib finds the face of deg_4.png (and the two faces of ref_1.jpg, the reference photo with a second, smaller
    face); the toy model's restoration lands on that face."""
    system, size = toy
    whole = shared_dir / "faces" / "whole"
    finder = photos.dlib_finder(upsample=0)
    photo = photos.read_photo(str(whole / "deg_4.png"))
    faces = finder(photo)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].landmarks, DEG_4_LANDMARKS, atol=15)
    refs = photos.reference_crops(str(whole / "ref_4.jpg"), finder)
    assert [name for name, _ in refs] == [str(whole / "ref_4.jpg")] and refs[0][1].shape == (512, 512, 3)
    run = jax.jit(lambda degraded, references, key: degraded[..., ::-1])  # a visible change: channels swapped
    result = photos.restore_photo(system, lambda s, d, r, k: run(d, r, k), photo, faces, refs,
                                  jax.random.PRNGKey(0), size, match_threshold=-1)
    check_composite(photo, result.composite, faces[0].landmarks)
    # The face region is the restoration: cut again from the composite, the crop's centre is the restored crop's.
    back = photos.align(result.composite, faces[0])[0]
    mid = slice(photos.CROP // 4, 3 * photos.CROP // 4)
    assert np.abs(back[mid, mid].astype(int) - result.restored[0][mid, mid]).mean() < 3
    assert result.references == [[(refs[0][0], pytest.approx(result.references[0][0][1]))]]


def test_group_photo_references_go_to_their_faces(toy, shared_dir):
    """Two aligned faces side by side on a canvas (landmarks known: the template, moved with them); references the
    same two faces as aligned crops, in the other order, plus a flat grey image. Each face gets its own face's
    reference, by the toy AdaFace's identity features, and the grey image matches neither."""
    system, size = toy
    split = shared_dir / "faces" / "supp_ref_ffhq_moderate"
    cases = sorted(p for p in split.iterdir() if p.is_dir())[:2]
    gts = [np.asarray(Image.open(c / "gt.jpg").convert("RGB")) for c in cases]
    canvas = np.full((400, 700, 3), 90, np.uint8)
    points = []
    for k, (gt, (x, y)) in enumerate(zip(gts, [(20, 60), (380, 40)])):
        canvas[y:y + 300, x:x + 300] = cv2.resize(gt, (300, 300), interpolation=cv2.INTER_AREA)
        points.append(alignment.FFHQ_TEMPLATE_512 * (300 / 512) + [x, y])
    faces = photos.given_faces(points)
    grey = np.full((512, 512, 3), 128, np.uint8)
    refs = [("ref_b", gts[1]), ("ref_a", gts[0]), ("grey", grey)]
    calls = []
    result = photos.restore_photo(system, identity_run(calls), canvas, faces, refs, jax.random.PRNGKey(0), size,
                                  match_threshold=0.9)
    assert [[name for name, _ in p] for p in result.references] == [["ref_a"], ["ref_b"]]
    assert [name for name, _ in result.unused] == ["grey"]
    assert len(calls) == 1 and calls[0][1].shape == (2, 1, size, size, 3)  # both faces in one batch
    assert result.composite.shape == canvas.shape
