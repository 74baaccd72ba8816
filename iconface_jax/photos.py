"""Whole-photo restoration: find the faces, align each to the FFHQ crop, restore it with its references, paste back.

    faces = finder(photo)                       RetinaFace (`retinaface_finder`), dlib (`dlib_finder`) or given
    crops = warp(photo, fit(landmarks, template))           `alignment`, CROP px squares as the release cuts them
    references -> crops, matched to faces by AdaFace identity (`assign`), each face restored with its own
    composite = paste_back(photo, restored crop)            outside the faces' soft masks, the photo's own pixels

References may be whole photos (every face in them aligned the same way) or aligned square crops (taken as they
are). Faces with the same number of references restore in one batch, through one compiled program.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from PIL import Image

from iconface_jax import alignment, images, landmarks
from iconface_jax.face_system import FaceSystem

CROP = 512  # the aligned crop's side: the template's own size and the release's `face_size`
# Cosine similarity of AdaFace features below which a reference is taken for no face. Same-identity pairs of
# AdaFace IR-101 sit well above it, different people mostly below (its authors' verification threshold is ~0.3).
MATCH_THRESHOLD = 0.3


@dataclasses.dataclass(frozen=True)
class Face:
    """A found face: detector score, box [x1, y1, x2, y2] and five landmarks (5, 2) in `alignment`'s order."""

    score: float
    box: np.ndarray
    landmarks: np.ndarray


Finder = Callable[[np.ndarray], list[Face]]


def retinaface_finder(directory: str, threshold: float = 0.6) -> Finder:
    """Faces by a converted RetinaFace (`python -m convert.retinaface`) with face probability >= `threshold`."""
    from iconface_jax.models import retinaface  # loads only on this route

    model = retinaface.load(directory)

    def find(photo: np.ndarray) -> list[Face]:
        rows = retinaface.detect(model, photo, threshold=threshold)
        return [Face(float(r[4]), r[:4], r[5:15].reshape(5, 2)) for r in rows]

    return find


def dlib_finder(threshold: float = 0.0, upsample: int = 1) -> Finder:
    """Faces by dlib's HOG detector and 68-point predictor (the `landmarks` extra) scoring >= `threshold`;
    `upsample` as `landmarks.dlib_faces`."""

    def find(photo: np.ndarray) -> list[Face]:
        faces = landmarks.dlib_faces(photo, upsample)
        return [Face(s, box, points) for s, box, points in faces if s >= threshold]

    return find


def given_faces(points: Sequence[np.ndarray]) -> list[Face]:
    """Faces from user-given landmarks (`landmarks.from_json`): score 1, box the landmarks' extent."""
    points = [np.asarray(p, np.float32) for p in points]
    return [Face(1.0, np.concatenate([p.min(0), p.max(0)]), p) for p in points]


def read_photo(path: str) -> np.ndarray:
    """An image file at full size as uint8 RGB (EXIF orientation applied; grayscale, alpha, 16-bit, palette and CMYK
    converted by `images.decode_image`, as training reads them), local or gs://; errors name the file."""
    try:
        return images.decode_image(path)[0]
    except images.ImageError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def is_aligned(photo: np.ndarray) -> bool:
    """Whether an image is taken as an aligned face crop (square) rather than a photo to find faces in."""
    return photo.shape[0] == photo.shape[1]


def align(photo: np.ndarray, face: Face, crop_scale: float = alignment.CROP_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """The CROP x CROP aligned crop of `face` and its (2, 3) photo -> crop matrix."""
    matrix = alignment.fit(face.landmarks, alignment.template(CROP, crop_scale))
    return alignment.warp(photo, matrix, CROP), matrix


def align_params(photo: np.ndarray, face: Face, matrix: np.ndarray, crop_scale: float) -> dict:
    """The alignment of one face in the release's `align_params_json` layout (`landmarks.from_json` reads it)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    return {"version": 1, "image_width": int(photo.shape[1]), "image_height": int(photo.shape[0]),
            "face_width": CROP, "face_height": CROP, "crop_scale": float(crop_scale), "crop_shift_y": 0.0,
            "border_mode": "constant", "score": float(face.score), "bbox": [float(v) for v in face.box],
            "landmarks": np.asarray(face.landmarks, np.float64).tolist(),
            "template": alignment.template(CROP, crop_scale).tolist(),
            "affine_matrix": matrix.tolist(), "inverse_affine": inverse.tolist()}


def reference_crops(path: str, finder: Finder | None, crop_scale: float = alignment.CROP_SCALE
                    ) -> list[tuple[str, np.ndarray]]:
    """(name, CROP px aligned crop) of each face in a reference file: a square image as it is, else every face
    `finder` finds in it (named `path#k` from the second on). Raises where a photo has no face or no finder."""
    photo = read_photo(path)
    if is_aligned(photo):
        return [(path, images.square_resize(photo, CROP))]
    if finder is None:
        raise ValueError(f"{path}: a {photo.shape[1]}x{photo.shape[0]} photo, not an aligned square crop; "
                         f"whole-photo references need a face finder (--detector DIR or --landmarks dlib)")
    faces = finder(photo)
    if not faces:
        raise ValueError(f"{path}: no face found in the reference photo")
    return [(path if k == 0 else f"{path}#{k + 1}", align(photo, face, crop_scale)[0]) for k, face in enumerate(faces)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarities of feature rows."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def assign(faces: np.ndarray, refs: np.ndarray, threshold: float = MATCH_THRESHOLD,
           max_refs: int = 3) -> tuple[list[list[tuple[int, float]]], list[tuple[int, float]]]:
    """Which references (rows of `refs`, identity features) go to which face (rows of `faces`): each reference to
    the face it is most similar to (cosine), if at least `threshold`; per face the `max_refs` most similar.
    Returns per face [(reference, similarity)] best first, and the unused references [(reference, best)]."""
    per_face: list[list[tuple[int, float]]] = [[] for _ in range(len(faces))]
    unused = []
    if len(refs) == 0 or len(faces) == 0:
        return per_face, [(r, float("nan")) for r in range(len(refs))]
    sim = cosine(faces, refs)
    for r in range(len(refs)):
        f = int(np.argmax(sim[:, r]))
        if sim[f, r] >= threshold:
            per_face[f].append((r, float(sim[f, r])))
        else:
            unused.append((r, float(sim[f, r])))
    dropped = [pair for refs_f in per_face for pair in sorted(refs_f, key=lambda p: -p[1])[max_refs:]]
    per_face = [sorted(refs_f, key=lambda p: -p[1])[:max_refs] for refs_f in per_face]
    return per_face, sorted(unused + dropped)


@dataclasses.dataclass
class PhotoResult:
    """A restored photo: the composite, and per face its crop, restoration, alignment and references."""

    composite: np.ndarray
    crops: list[np.ndarray]
    restored: list[np.ndarray]
    params: list[dict]
    references: list[list[tuple[str, float]]]  # per face: (reference name, cosine similarity)
    unused: list[tuple[str, float]]  # references matching no face: (name, best similarity)
    seconds: dict[str, float]  # wall time per stage: align, embed, restore, paste


Restorer = Callable[[FaceSystem, jax.Array, jax.Array, jax.Array], jax.Array]


def restore_photo(system: FaceSystem, run: Restorer, photo: np.ndarray, faces: Sequence[Face],
                  references: Sequence[tuple[str, np.ndarray]], key: jax.Array, size: int, *,
                  crop_scale: float = alignment.CROP_SCALE, match_threshold: float = MATCH_THRESHOLD,
                  max_refs: int = 3, log: Callable[[str], None] = lambda line: None) -> PhotoResult:
    """Restores every face of `photo` (uint8 RGB) with its matched references and pastes it back.

    `run(system, degraded (B, S, S, 3), references (B, R, S, S, 3), key)` is the (compiled) restoration at the
    model's resolution S = `size` (`sampling.restore_faces`); `references` are (name, CROP px aligned crop) pairs.
    """
    if not faces:
        raise ValueError("no face to restore")
    seconds = dict.fromkeys(("align", "embed", "restore", "paste"), 0.0)
    t = time.perf_counter()
    aligned = [align(photo, face, crop_scale) for face in faces]
    seconds["align"] = time.perf_counter() - t

    t = time.perf_counter()
    to_model = lambda crops: np.stack([images.to_model(images.square_resize(c, size)) for c in crops])
    face_in = to_model([crop for crop, _ in aligned])
    ref_in = to_model([crop for _, crop in references]) if references else np.zeros((0, size, size, 3), np.float32)
    embed = np.asarray(_embed(system, np.concatenate([face_in, ref_in])))
    per_face, unused = assign(embed[: len(faces)], embed[len(faces):], match_threshold, max_refs)
    seconds["embed"] = time.perf_counter() - t
    names = [name for name, _ in references]
    for (r, best) in unused:
        log(f"reference {names[r]} unused: cosine similarity {best:.2f} to its closest face "
            f"(threshold {match_threshold}, at most {max_refs} per face)")

    t = time.perf_counter()
    outputs: list[np.ndarray | None] = [None] * len(faces)
    counts = sorted({len(p) for p in per_face})
    for group, count in enumerate(counts):  # one batch per reference count: one compiled shape each
        members = [i for i, p in enumerate(per_face) if len(p) == count]
        for i in members:
            refs = ", ".join(f"{names[r]} ({s:.2f})" for r, s in per_face[i]) or "none"
            log(f"face {i + 1}/{len(faces)}: score {faces[i].score:.2f}, box "
                f"{' '.join(f'{v:.0f}' for v in faces[i].box)}; references: {refs}")
        refs = ref_in[[[r for r, _ in per_face[i]] for i in members]].reshape(len(members), count, size, size, 3)
        out = np.asarray(run(system, face_in[members], refs, jax.random.fold_in(key, group)))
        for i, o in zip(members, out):
            outputs[i] = images.from_model(o, (CROP, CROP))
    seconds["restore"] = time.perf_counter() - t

    t = time.perf_counter()
    composite = photo
    for (_, matrix), restored in zip(aligned, outputs):
        composite = alignment.paste_back(composite, restored, matrix)
    seconds["paste"] = time.perf_counter() - t
    return PhotoResult(composite, [c for c, _ in aligned], outputs,
                       [align_params(photo, f, m, crop_scale) for f, (_, m) in zip(faces, aligned)],
                       [[(names[r], s) for r, s in p] for p in per_face],
                       [(names[r], s) for r, s in unused], seconds)


@nnx.jit
def _embed(system: FaceSystem, x: jax.Array) -> jax.Array:
    """AdaFace features (N, D) of model inputs (N, S, S, 3)."""
    return system.embed(x)


def restore_file(system: FaceSystem, run: Restorer, size: int, photo_path: str, ref_paths: Sequence[str],
                 out_path: str, *, find: Finder, ref_finder: Finder | None, key: jax.Array,
                 crop_scale: float = alignment.CROP_SCALE, match_threshold: float = MATCH_THRESHOLD,
                 max_refs: int = 3, crops_dir: str = "", params_path: str = "",
                 log: Callable[[str], None] = lambda line: None) -> PhotoResult:
    """`restore_photo` from files to files: the composite to `out_path`; with `crops_dir`, each face's aligned crop
    and restoration as `<out stem>_face<k>.png` and `_face<k>_restored.png`; with `params_path`, the alignments
    as a JSON list (`align_params`). `find` finds the photo's faces, `ref_finder` those of whole-photo references."""
    photo = read_photo(photo_path)
    t = time.perf_counter()
    faces = find(photo)
    detect = time.perf_counter() - t
    if not faces:
        raise ValueError(f"{photo_path}: no face found (a lower --score-threshold, or landmarks from a file)")
    references = [crop for path in ref_paths for crop in reference_crops(path, ref_finder, crop_scale)]
    log(f"{photo_path}: {len(faces)} face(s), {len(references)} reference face(s)")
    result = restore_photo(system, run, photo, faces, references, key, size, crop_scale=crop_scale,
                           match_threshold=match_threshold, max_refs=max_refs, log=log)
    result.seconds["detect"] = detect
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    Image.fromarray(result.composite).save(out_path)
    stem = os.path.splitext(os.path.basename(out_path))[0]
    if crops_dir:
        os.makedirs(crops_dir, exist_ok=True)
        for k, (crop, restored) in enumerate(zip(result.crops, result.restored), 1):
            images.write_png(os.path.join(crops_dir, f"{stem}_face{k}.png"), crop)
            images.write_png(os.path.join(crops_dir, f"{stem}_face{k}_restored.png"), restored)
    if params_path:
        os.makedirs(os.path.dirname(os.path.abspath(params_path)), exist_ok=True)
        with open(params_path, "w") as f:
            json.dump(result.params, f, indent=2)
    return result
