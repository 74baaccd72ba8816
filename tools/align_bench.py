"""`python -m tools.align_bench`: the measurements behind `alignment.CROP_SCALE`, and the whole-photo front end's
time per photo (dlib detection, alignment, paste-back). Needs the landmarks extra.

`scale [CROPS...]`: dlib's points on FFHQ-aligned 512 crops (default: the ground truths of ../shared/faces) fitted
to the template at several crop_scale values: the one whose fits are closest to the identity matches FFHQ's
alignment; also FFHQ's own recipe (eye and mouth points -> crop square) on the same points, and how far OpenCV's
LMEDS fit (the IConFace release's) strays from our least-squares one.
`time [PHOTOS...]`: seconds per photo (default: ../shared/faces/whole).
"""
from __future__ import annotations

import argparse
import pathlib
import time

import cv2
import numpy as np
from PIL import Image

from iconface_jax import alignment, landmarks

FACES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "faces"
CORNERS = np.array([[0, 0], [512, 0], [512, 512], [0, 512]], np.float64)


def _read(path: pathlib.Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def ffhq_square(points: np.ndarray) -> tuple[float, np.ndarray]:
    """(side, centre) of the square FFHQ's alignment script crops for these five points (it uses the eye centres
    and mouth corners of dlib's 68: the same points as ours, less the nose)."""
    eye_left, eye_right, _, mouth_left, mouth_right = np.asarray(points, np.float64)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_avg
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)  # its rotation does not matter here
    return 2 * half, eye_avg + eye_to_mouth * 0.1


def scale(crops: list[pathlib.Path]) -> None:
    """Prints the crop-scale measurements over FFHQ-aligned 512 crops."""
    points = []
    for path in crops:
        faces = landmarks.dlib_faces(_read(path), upsample=0)
        if faces:
            points.append(faces[0][2])
    print(f"dlib found a face in {len(points)} of {len(crops)} crops")
    print("crop_scale  mean / median corner displacement of the fit from the identity (px)")
    for crop_scale in (0.94, 0.96, 0.97, 0.98, 0.99, 1.0, 1.02, 1.05, 1.1, 1.2, 1.35):
        shifts = [np.linalg.norm(_apply(alignment.fit(p, alignment.template(512, crop_scale)), CORNERS) - CORNERS,
                                 axis=1).mean() for p in points]
        print(f"{crop_scale:10.2f}  {np.mean(shifts):6.2f} / {np.median(shifts):6.2f}")
    fits = [alignment.fit(p, alignment.template(512, 1.0)) for p in points]
    scales = np.array([np.hypot(*m[:, 0]) for m in fits])
    centres = np.array([_apply(m, np.array([[256.0, 256.0]]))[0] - 256 for m in fits])
    print(f"fit scale at crop_scale 1 (= the crop_scale of each crop): median {np.median(scales):.4f}, mean "
          f"{scales.mean():.4f} +- {scales.std() / np.sqrt(len(scales)):.4f} (s.e.m.), std {scales.std():.4f}; "
          f"centre moved by median {np.median(centres, 0).round(2)} px")
    squares = np.array([np.concatenate([[side], centre]) for side, centre in map(ffhq_square, points)])
    side, centre = ffhq_square(alignment.template(512, 1.0))
    print(f"FFHQ's recipe on these points: square side / 512 median {np.median(squares[:, 0]) / 512:.4f}, centre "
          f"median {np.median(squares[:, 1:], 0).round(2)}; on the template: {side / 512:.4f}, {centre.round(2)}")
    target = alignment.template(512, alignment.RELEASE_CROP_SCALE)
    kept, strays = [], []
    for p in points:
        lmeds, inliers = cv2.estimateAffinePartial2D(p, target, method=cv2.LMEDS)
        ours = alignment.fit(p, target)
        strays.append(np.linalg.norm(_apply(cv2.invertAffineTransform(lmeds), CORNERS)
                                     - _apply(cv2.invertAffineTransform(ours), CORNERS), axis=1).max())
        kept.append(int(inliers.sum()))
    strays, kept = np.array(strays), np.array(kept)
    print(f"LMEDS vs least squares at crop_scale {alignment.RELEASE_CROP_SCALE}: all five kept in {(kept == 5).sum()} "
          f"of {len(kept)} (crop corners within {strays[kept == 5].max():.4f} px); else median "
          f"{np.median(strays[kept < 5]):.1f} px, max {strays.max():.1f} px apart")


def timing(photos: list[pathlib.Path], upsample: int) -> None:
    """Prints seconds per photo: dlib detection, alignment (fit + warp) and paste-back of each face found."""
    landmarks.dlib_faces(np.zeros((64, 64, 3), np.uint8))  # load the models outside the timings
    print(f"photo  size  faces  detect(s, upsample {upsample})  align(s)  paste-back(s)")
    for path in photos:
        image = _read(path)
        start = time.perf_counter()
        faces = landmarks.dlib_faces(image, upsample)
        detect, align, paste = time.perf_counter() - start, 0.0, 0.0
        for _, _, points in faces:
            start = time.perf_counter()
            matrix = alignment.fit(points, alignment.template())
            crop = alignment.warp(image, matrix)
            align += time.perf_counter() - start
            start = time.perf_counter()
            alignment.paste_back(image, crop, matrix)
            paste += time.perf_counter() - start
        print(f"{path.name}  {image.shape[1]}x{image.shape[0]}  {len(faces)}  {detect:.3f}  {align:.4f}  {paste:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["scale", "time"])
    parser.add_argument("paths", nargs="*", type=pathlib.Path)
    parser.add_argument("--upsample", type=int, default=1, help="dlib's upsampling for `time`")
    args = parser.parse_args()
    if args.what == "scale":
        scale(args.paths or sorted(FACES.glob("*/*/gt.jpg")))
    else:
        timing(args.paths or sorted((FACES / "whole").glob("*.*")), args.upsample)


if __name__ == "__main__":
    main()
