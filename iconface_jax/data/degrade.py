"""Online blind degradations on uint8 RGB images: the Real-ESRGAN second-order chain and the BSRGAN
shuffled chain, mixed per image, with the named presets `moderate` and `severe`.

`apply(image, preset, rng)` degrades an (H, W, 3) uint8 image and returns one of the same shape: the
chain runs down to H/scale and the result is resized back to H x W, because the model reads the
degraded image on the same token grid as the target. Everything random comes from the `rng` passed
in (a `numpy.random.Generator`), so a degradation is reproducible from its seed.

Spatial parameters (blur sigmas, kernel sizes, sinc cut-offs) are specified for `reference_size`
(512) pixel images and scale with the image, so the same preset removes the same facial detail at
64 px (the CPU demo) and at 512 px. The presets were calibrated with `tools/calibrate_degradations.py` on the 40 real
`gt.jpg` of `../shared/faces`: their median PSNR matches the FFHQ-Ref Moderate (25.2 dB) and Severe
(19.6 dB) benchmark inputs (docs/decisions.md#degradation-mix has the figures).

Deviations from the reference implementations, because a piece is not public or for speed: BSRGAN's
camera-ISP noise (a learned model) is replaced by Poisson noise with the same probability; the
shifted-kernel nearest downsampling omits the half-pixel shift.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from scipy import linalg, special

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 grey, as Real-ESRGAN's grey Poisson noise
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_MIN_SIDE = 2  # the smallest low-resolution side a chain may reach (severe presets at 64 px)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One order of the Real-ESRGAN chain: blur, random resize, noise, JPEG (Wang et al. 2021)."""

    blur_prob: float = 1.0
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # otherwise Poisson noise
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma in 8-bit units
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


@dataclasses.dataclass(frozen=True)
class BSRGAN:
    """The BSRGAN shuffled chain (Zhang et al. 2021): two blurs, two downsamplings, noise, JPEG and
    sensor noise in random order, then a final JPEG."""

    halve_prob: float = 0.25  # BSRGAN's optional 2x pre-downsampling
    resize_prob: float = 0.75  # downsample-1 by resizing, otherwise blur + nearest subsampling
    noise_range: tuple[float, float] = (2.0, 25.0)  # sigma in 8-bit units
    jpeg_prob: float = 0.9
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    poisson_prob: float = 0.25  # stands in for the learned camera-ISP noise
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A degradation distribution: the overall scale, the chain mixture and each chain's parameters."""

    scale_range: tuple[float, float] = (2.0, 6.0)  # overall downscale factor, uniform
    p_bsrgan: float = 0.5  # the rest use the Real-ESRGAN chain; the paper mixes both
    first: Stage = Stage()
    second: Stage = Stage(
        blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))
    final_sinc_prob: float = 0.8
    bsrgan: BSRGAN = BSRGAN()
    upsample_modes: tuple[str, ...] = ("bilinear", "bicubic")  # back to the input size
    reference_size: int = 512  # image side the spatial parameters are given for

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (for an `ml_collections.ConfigDict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preset:
        """Inverse of `to_dict`; accepts a ConfigDict and missing fields (defaults)."""
        d = dict(d)
        for name, sub in (("first", Stage), ("second", Stage), ("bsrgan", BSRGAN)):
            if name in d:
                d[name] = sub(**{k: _tuple(v) for k, v in dict(d[name]).items()})
        return cls(**{k: v if k in ("first", "second", "bsrgan") else _tuple(v) for k, v in d.items()})


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _moderate() -> Preset:
    """2-6x with half the default noise and no JPEG below quality 40."""
    light = dict(noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 1.5), jpeg_range=(40.0, 95.0))
    base = Preset()
    return Preset(
        scale_range=(2.0, 6.0),
        first=dataclasses.replace(base.first, **light),
        second=dataclasses.replace(base.second, **light),
        bsrgan=dataclasses.replace(base.bsrgan, **light))


# Calibrated with `python -m tools.calibrate_degradations` (median PSNR on ../shared/faces gt.jpg):
# `moderate` lands on FFHQ-Ref Moderate (25.2 dB), `severe` (8-20x, the chains' default noise and
# JPEG) on FFHQ-Ref Severe (19.6 dB).
PRESETS: dict[str, Preset] = {
    "moderate": _moderate(),
    "severe": Preset(scale_range=(8.0, 20.0)),
}


def apply(image: np.ndarray, preset: str | Preset, rng: np.random.Generator) -> np.ndarray:
    """Degrade an (H, W, 3) uint8 RGB image with a preset (name or `Preset`); same shape and dtype."""
    if isinstance(preset, str):
        preset = PRESETS[preset]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    s = min(h, w) / preset.reference_size
    scale = rng.uniform(*preset.scale_range)
    x = image.astype(np.float32) / 255.0
    if rng.random() < preset.p_bsrgan:
        x = _bsrgan(x, scale, s, preset.bsrgan, rng)
    else:
        x = _realesrgan(x, scale, s, preset, rng)
    x = _resize(x, (h, w), _choice(preset.upsample_modes, rng))
    return _to_uint8(x)


# ----------------------------------------------------------------------------- chains


def _realesrgan(x: np.ndarray, scale: float, s: float, p: Preset, rng: np.random.Generator) -> np.ndarray:
    """Second-order Real-ESRGAN chain; returns the low-resolution image (H/scale)."""
    h, w = x.shape[:2]
    lr = _lr_size(h, w, scale)
    x = _stage(x, None, p.first, s, rng)
    x = _stage(x, lr, p.second, s, rng, skip_jpeg=True)
    # Final sinc and JPEG in random order, as Real-ESRGAN does, around the resize to H/scale.
    sinc = _final_sinc(p.final_sinc_prob, s, rng)
    quality = rng.uniform(*p.second.jpeg_range)
    mode = _choice(tuple(RESIZE_MODES), rng)
    if rng.random() < 0.5:
        x = _filter(_resize(x, lr, mode), sinc)
        x = _jpeg(x, quality)
    else:
        x = _jpeg(x, quality)
        x = _filter(_resize(x, lr, mode), sinc)
    return x


def _stage(x: np.ndarray, base: tuple[int, int] | None, st: Stage, s: float, rng: np.random.Generator,
           skip_jpeg: bool = False) -> np.ndarray:
    """One Real-ESRGAN order. `base` is the size the random resize is relative to (None: current);
    `s` the spatial scale of this image relative to the preset's reference size."""
    if rng.random() < st.blur_prob:
        x = _filter(x, _random_kernel(st, s, rng))
    updown = rng.choice(3, p=np.asarray(st.resize_probs) / np.sum(st.resize_probs))
    factor = (rng.uniform(1.0, st.resize_range[1]), rng.uniform(st.resize_range[0], 1.0), 1.0)[updown]
    bh, bw = base if base is not None else x.shape[:2]
    x = _resize(x, (max(_MIN_SIDE, int(bh * factor)), max(_MIN_SIDE, int(bw * factor))),
                _choice(tuple(RESIZE_MODES), rng))
    gray = rng.random() < st.gray_noise_prob
    if rng.random() < st.gaussian_noise_prob:
        x = _gaussian_noise(x, rng.uniform(*st.noise_range) / 255.0, gray, rng)
    else:
        x = _poisson_noise(x, rng.uniform(*st.poisson_scale_range), gray, rng)
    if not skip_jpeg:
        x = _jpeg(x, rng.uniform(*st.jpeg_range))
    return np.clip(x, 0.0, 1.0)


def _bsrgan(x: np.ndarray, sf: float, s: float, p: BSRGAN, rng: np.random.Generator) -> np.ndarray:
    """BSRGAN shuffled chain with a (possibly fractional) scale `sf`; returns the H/sf image."""
    h, w = x.shape[:2]
    lr = _lr_size(h, w, sf)
    if sf >= 2.0 and rng.random() < p.halve_prob:
        x = _resize(x, _lr_size(h, w, 2.0), _choice(("bilinear", "bicubic", "area"), rng))
        sf /= 2.0
    order = list(rng.permutation(7))
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # the coarse downsample (3) always follows the random one (2)
        order[i2], order[i3] = order[i3], order[i2]
    for op in order:
        if op in (0, 1):
            x = _filter(x, _bsrgan_blur_kernel(sf, s, rng))
        elif op == 2:
            if rng.random() < p.resize_prob:
                sf1 = rng.uniform(1.0, 2.0 * sf)
                x = _resize(x, _lr_size(*x.shape[:2], sf1), _choice(tuple(RESIZE_MODES), rng))
            else:
                sigma = rng.uniform(0.1, 0.6 * sf) * s
                # BSRGAN's 25 px kernel, widened for the large scales of the severe preset.
                x = _filter(x, _gaussian_kernel(_odd(max(25 * s, 6 * sigma + 1)), sigma))
                x = _resize(x, _lr_size(*x.shape[:2], sf), "nearest")
        elif op == 3:
            x = _resize(x, lr, _choice(tuple(RESIZE_MODES), rng))
        elif op == 4:
            x = _bsrgan_noise(x, p.noise_range, rng)
        elif op == 5:
            if rng.random() < p.jpeg_prob:
                x = _jpeg(x, rng.uniform(*p.jpeg_range))
        elif op == 6:
            if rng.random() < p.poisson_prob:
                x = _poisson_noise(x, rng.uniform(*p.poisson_scale_range), rng.random() < 0.5, rng)
        x = np.clip(x, 0.0, 1.0)
    return _jpeg(x, rng.uniform(*p.jpeg_range))


# ----------------------------------------------------------------------------- kernels


def _odd(size: float) -> int:
    """Nearest odd integer >= 3 (kernel sizes)."""
    n = max(3, int(round(size)))
    return n if n % 2 else n + 1


def _quadratic(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on a centred size x size grid, Sigma = R(theta) diag(sig_x^2, sig_y^2) R^T."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    c, sn = math.cos(theta), math.sin(theta)
    u, v = c * xx + sn * yy, -sn * xx + c * yy
    return (u / sig_x) ** 2 + (v / sig_y) ** 2


def _normalised(k: np.ndarray) -> np.ndarray:
    return (k / k.sum()).astype(np.float32)


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    return _normalised(np.exp(-0.5 * _quadratic(size, sigma, sigma, 0.0)))


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with cut-off `cutoff` radians (pi: no filtering)."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    r = np.hypot(*np.meshgrid(ax, ax))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[(size - 1) // 2, (size - 1) // 2] = cutoff**2 / (4 * np.pi)
    return _normalised(k)


def mixed_kernel(kind: str, size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    """One of KERNEL_TYPES: (an)isotropic Gaussian, generalised Gaussian (exponent beta) or plateau."""
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sig_y, theta = sig_x, 0.0
    q = _quadratic(size, sig_x, sig_y, theta)
    if kind in ("iso", "aniso"):
        return _normalised(np.exp(-0.5 * q))
    if kind.startswith("generalized"):
        return _normalised(np.exp(-0.5 * q**beta))
    return _normalised(1.0 / (q**beta + 1.0))


def _random_kernel(st: Stage, s: float, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN's first/second-order kernel: sinc with `sinc_prob`, else a random mixed kernel."""
    size = int(rng.choice(np.arange(7, 22, 2)))
    if rng.random() < st.sinc_prob:
        cutoff = rng.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi)
        return sinc_kernel(min(np.pi, cutoff / s), _odd(size * s))
    kind = KERNEL_TYPES[rng.choice(len(KERNEL_TYPES), p=np.asarray(st.kernel_probs) / np.sum(st.kernel_probs))]
    sig_x, sig_y = rng.uniform(*st.blur_sigma), rng.uniform(*st.blur_sigma)
    theta = rng.uniform(-np.pi, np.pi)
    lo, hi = st.betag_range if kind.startswith("generalized") else st.betap_range
    # Real-ESRGAN draws beta from [lo, 1) or [1, hi) with equal odds; its plateau range starts at 1, so half of its
    # plateau kernels have beta exactly 1 (the lower draw is uniform(1, 1)).
    beta = rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)
    return mixed_kernel(kind, _odd(size * s), max(sig_x * s, 0.05), max(sig_y * s, 0.05), theta, beta)


def _final_sinc(prob: float, s: float, rng: np.random.Generator) -> np.ndarray | None:
    """Real-ESRGAN's last sinc filter (None: skipped)."""
    if rng.random() >= prob:
        return None
    size = int(rng.choice(np.arange(7, 22, 2)))
    cutoff = rng.uniform(np.pi / 3, np.pi)
    return sinc_kernel(min(np.pi, cutoff / s), _odd(size * s))


def _bsrgan_blur_kernel(sf: float, s: float, rng: np.random.Generator) -> np.ndarray:
    """BSRGAN `add_blur`: anisotropic Gaussian with variances up to 4 + sf, or isotropic up to 2 + sf/5."""
    size = _odd((2 * rng.integers(2, 12) + 3) * s)
    if rng.random() < 0.5:
        var1, var2 = (4.0 + sf) * rng.random(), (4.0 + sf) * rng.random()
        sig_x, sig_y = max(math.sqrt(var1), 0.1) * s, max(math.sqrt(var2), 0.1) * s
        return mixed_kernel("aniso", size, sig_x, sig_y, np.pi * rng.random(), 1.0)
    return _gaussian_kernel(size, max((2.0 + 0.2 * sf) * rng.random(), 0.1) * s)


# ----------------------------------------------------------------------------- operators


def _filter(x: np.ndarray, kernel: np.ndarray | None) -> np.ndarray:
    """Convolve (kernels are point-symmetric, so OpenCV's correlation is a convolution)."""
    if kernel is None:
        return x
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    h, w = size
    if x.shape[:2] == (h, w):
        return x
    flag = cv2.INTER_NEAREST if mode == "nearest" else RESIZE_MODES[mode]
    return cv2.resize(x, (w, h), interpolation=flag)


def _lr_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(_MIN_SIDE, int(round(h / scale))), max(_MIN_SIDE, int(round(w / scale)))


def _choice(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _gaussian_noise(x: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    shape = x.shape[:2] + (1,) if gray else x.shape
    return x + sigma * rng.standard_normal(shape, dtype=np.float32)


def _poisson_noise(x: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN's shot noise, `scale` times stronger: counts of the image rounded to 8 bits (its luma when `gray`)
    at 2^ceil(log2(number of distinct values)) photons per unit, so 256 unless the image has at most 128 values."""
    levels = np.clip(np.rint((x @ LUMA)[..., None] * 255.0 if gray else x * 255.0), 0, 255).astype(np.uint8)
    photons = 2.0 ** math.ceil(math.log2(np.count_nonzero(np.bincount(levels.ravel(), minlength=256))))
    base = levels.astype(np.float32) / 255.0
    noise = rng.poisson(base * photons).astype(np.float32) / np.float32(photons) - base
    return x + scale * noise


def _bsrgan_noise(x: np.ndarray, noise_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """BSRGAN `add_Gaussian_noise`: colour (40%) or grey (40%) noise of a level drawn from `noise_range` (8-bit
    units), or channel-correlated noise (20%) at the top of the range, L = noise_range[1] / 255, whatever was drawn.

    The correlated covariance is BSRGAN's |L^2 U^T D U| (U = `scipy.linalg.orth` of a random matrix, D uniform
    variances, |.| elementwise). The |.| can leave it indefinite; BSRGAN's sampler (numpy's multivariate_normal,
    through an SVD) then draws with covariance Q |Lambda| Q^T from its eigendecomposition, as here.
    """
    sigma = rng.uniform(*noise_range) / 255.0
    r = rng.random()
    if r > 0.6:
        return _gaussian_noise(x, sigma, False, rng)
    if r < 0.4:
        return _gaussian_noise(x, sigma, True, rng)
    d = rng.random(3)
    u = linalg.orth(rng.random((3, 3)))
    cov = np.abs((noise_range[1] / 255.0) ** 2 * (u.T * d) @ u)
    eigenvalues, q = np.linalg.eigh(cov)
    mix = (q * np.sqrt(np.abs(eigenvalues))).T.astype(np.float32)  # z @ mix has covariance q |eigenvalues| q^T
    return x + rng.standard_normal(x.shape, dtype=np.float32) @ mix


def _jpeg(x: np.ndarray, quality: float) -> np.ndarray:
    """JPEG round trip (OpenCV expects BGR, so chroma is computed with the right weights)."""
    bgr = cv2.cvtColor(_to_uint8(x), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(round(quality))])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
