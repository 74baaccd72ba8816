"""Five-point face alignment to the FFHQ template, and paste-back of a restored crop into its photo.

Host-side image work (numpy/OpenCV): `template` -> `fit` (landmarks to template, a similarity) -> `warp` (the
aligned square crop the model restores) -> `paste_back` (the restored crop inverse-warped into the photo through a
soft mask). Landmarks are five (x, y) points in pixels, in the template's order: the eye on the image's left, the
other eye, the nose tip, the mouth corner on the image's left, the other corner.
"""
from __future__ import annotations

import cv2
import numpy as np

# The five-point FFHQ template at 512 px (facexlib's, as GFPGAN, CodeFormer and the IConFace release use it).
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)
# The crop_scale whose crops match our training data (FFHQ-aligned 512 crops): dlib's 68-point landmarks (FFHQ's
# own) on the 40 FFHQ-aligned ground truths of ../shared/faces, fitted to the template, give scales of median 0.980
# (mean 0.985 +- 0.008 s.e.m.); the fits are closest to the identity there (`python -m tools.align_bench`).
CROP_SCALE = 0.98
# The IConFace release's default: a wider crop (more of the head and background) than FFHQ's.
RELEASE_CROP_SCALE = 1.35
# The grey the release fills a crop with where it leaves the photo (RGB).
BORDER_RGB = (132, 133, 135)


def template(size: int = 512, crop_scale: float = CROP_SCALE, shift_y: float = 0.0) -> np.ndarray:
    """The (5, 2) float32 template for a `size` px square crop: FFHQ's, shrunk about the centre by `crop_scale`
    (> 1 shows more around the face) and moved down by `shift_y` x size."""
    if size <= 0 or not crop_scale > 0:
        raise ValueError(f"template: size {size} and crop_scale {crop_scale} must be positive")
    centre = size / 2.0
    points = centre + (FFHQ_TEMPLATE_512 * (size / 512.0) - centre) / crop_scale
    points[:, 1] += shift_y * size
    return points.astype(np.float32)


def _points(name: str, value) -> np.ndarray:
    points = np.asarray(value, np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"{name} must be five finite (x, y) points, shape (5, 2); got shape {points.shape}")
    return points


def fit(landmarks: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity (rotation, uniform scale, translation) taking `landmarks` to `target` with the least
    squared error: Umeyama's closed form, reflections excluded."""
    src, dst = _points("landmarks", landmarks), _points("template", target)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    s, d = src - src_mean, dst - dst_mean
    norm = (s**2).sum()
    if norm == 0:
        raise ValueError("landmarks are five copies of one point: no similarity fits them")
    # With z = x + iy the model is d = (a + ib) s: least squares gives a + ib = sum(conj(s) d) / sum(|s|^2).
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    linear = np.array([[a, -b], [b, a]])
    return np.concatenate([linear, (dst_mean - linear @ src_mean)[:, None]], axis=1)


def _check(name: str, image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be a uint8 HxWx3 RGB image; got {image.dtype} of shape {image.shape}")


def _matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise ValueError(f"matrix must be an invertible finite (2, 3) affine map; got shape {matrix.shape}")
    return matrix


def warp(image: np.ndarray, matrix: np.ndarray, size: int = 512) -> np.ndarray:
    """The `size` x `size` crop that `matrix` (photo -> crop, from `fit`) cuts from `image`: bilinear, the area
    outside the photo filled with BORDER_RGB."""
    _check("image", image)
    return cv2.warpAffine(image, _matrix(matrix), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


def _radius(area: float, width: float) -> int:
    """The erosion and blur radius for a footprint of `area` px: a twentieth of its side, times `width`."""
    return max(1, round(max(1, int(max(1.0, area) ** 0.5) // 20) * width))


def _soft_mask(matrix: np.ndarray, crop_size: tuple[int, int], window: tuple[int, int], width: float) -> np.ndarray:
    """The crop's footprint in the window (photo -> crop `matrix`), float32 in [0, 1]: shrunk, then feathered by a
    Gaussian, both in proportion to the footprint's size (the release's recipe), so the crop's edges never show."""
    footprint = cv2.warpAffine(np.ones(crop_size, np.float32), matrix, window,
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    # A first small erosion drops the bilinear fringe, whose partial weights would mix in the crop's black border.
    footprint = cv2.erode(np.clip(footprint, 0, 1), np.ones((max(1, round(width)),) * 2, np.uint8))
    radius = _radius(float(footprint.sum()), width)
    inner = cv2.erode(footprint, np.ones((radius, radius), np.uint8))
    # The blur (sigma ~ 0.6 radius) reaches past the erosion (radius / 2): the release's mask keeps up to 5 % weight
    # outside the footprint, darkening the photo there by the crop's black surround. Cut to where the warped crop
    # has no black in it (0.999: float rounding of the interpolation weights).
    return np.clip(cv2.GaussianBlur(inner, (2 * radius + 1,) * 2, 0), 0, 1) * (footprint > 0.999)


def paste_back(photo: np.ndarray, crop: np.ndarray, matrix: np.ndarray, softness: float = 1.0) -> np.ndarray:
    """`photo` with `crop` (restored, the same size as the crop that `matrix` cut) warped back in through a soft
    mask; `softness` widens the feathered edge (1 = the release's default). uint8 in, uint8 out."""
    _check("photo", photo)
    _check("crop", crop)
    if crop.shape[0] != crop.shape[1]:
        raise ValueError(f"crop must be square (the aligned crop); got {crop.shape[1]}x{crop.shape[0]}")
    if not softness > 0:
        raise ValueError(f"softness must be positive; got {softness}")
    matrix, size = _matrix(matrix), crop.shape[0]
    width = max(softness, 0.5) * 2  # softness below 0.5 would leave the edge unblended
    # Only a window about the crop's footprint changes: working there keeps a small face in a large photo cheap.
    # Its margin holds all the blur reads from outside (same values as on the whole photo: zeros, or the photo's
    # own border where the window meets it), so the mask is exactly the whole photo's.
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64) @ inverse[:, :2].T + inverse[:, 2]
    low = np.clip(np.floor(corners.min(0)), 0, photo.shape[1::-1]).astype(int)
    high = np.clip(np.ceil(corners.max(0)) + 1, 0, photo.shape[1::-1]).astype(int)
    margin = _radius(float(np.prod(high - low)), width) + 4
    (x0, y0), (x1, y1) = np.maximum(low - margin, 0), np.minimum(high + margin, photo.shape[1::-1])
    out = photo.copy()
    shifted = np.concatenate([matrix[:, :2], matrix[:, :2] @ [[x0], [y0]] + matrix[:, 2:]], axis=1)
    window = (int(x1 - x0), int(y1 - y0))
    back = cv2.warpAffine(crop, shifted, window, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP).astype(np.float32)
    mask = _soft_mask(shifted, (size, size), window, width)[..., None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(np.rint(mask * back + (1 - mask) * region), 0, 255).astype(np.uint8)
    return out
