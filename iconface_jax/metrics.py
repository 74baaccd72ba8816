"""Evaluation metrics: PSNR, SSIM, identity cosine, and pyiqa's no-reference quality metrics when available.

PSNR and SSIM take uint8 RGB images of one size and compute what pyiqa's `psnr` and `ssim` metrics
compute with their default options (ReF-LDM's evaluation, which the FFHQ-Ref and CelebA-Test-Ref numbers
follow, calls exactly those):

- PSNR (pyiqa `psnr_arch.psnr`, `test_y_channel=False`): over all RGB pixels and channels on the [0, 1]
  scale, `10 log10(1 / (mse + 1e-8))`, so identical images score 80 dB.
- SSIM (pyiqa `ssim_arch.SSIM`, `test_y_channel=True`, `downsample=False`): on the luma Y of YIQ
  (0.299 R + 0.587 G + 0.114 B on 0..255, rounded to integers), Wang et al.'s SSIM with an 11x11
  Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, over the window's valid region (no
  padding), with the contrast-structure term clipped at zero (`relu`) before it multiplies the
  luminance term. `channels="rgb"` is pyiqa's `ssimc` instead: the same on each RGB channel, averaged.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np

PSNR_EPS = 1e-8  # pyiqa's, added to the [0, 1]-scale MSE: caps PSNR at 80 dB
SSIM_CHANNELS = ("y", "rgb")
# YIQ luma weights in thousandths (Y = 0.299 R + 0.587 G + 0.114 B), for exact integer arithmetic.
LUMA_PER_MILLE = np.array([299, 587, 114], np.int64)

# Column label -> pyiqa metric name (the paper's MUSIQ, CLIP-IQA and MANIQA; pyiqa's default variants).
IQA_METRICS = {"MUSIQ": "musiq", "CLIP-IQA": "clipiqa", "MANIQA": "maniqa"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images as pyiqa's default `psnr`: RGB, [0, 1] scale, MSE + 1e-8."""
    _check_pair(a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0**2
    return float(10.0 * np.log10(1.0 / (mse + PSNR_EPS)))


def luma(image: np.ndarray) -> np.ndarray:
    """The YIQ luma of a uint8 RGB image (..., 3) on the 0..255 scale, rounded to integers half to even, as
    float64: pyiqa's `to_y_channel(x, 255, "yiq")`. pyiqa computes it in float32, so at exact halves (one
    colour in a thousand) its rounding follows that float error; here it is exact."""
    q, r = np.divmod(image.astype(np.int64) @ LUMA_PER_MILLE, 1000)
    return (q + ((r > 500) | ((r == 500) & (q % 2 == 1)))).astype(np.float64)


def ssim(a: np.ndarray, b: np.ndarray, *, channels: str = "y") -> float:
    """Mean SSIM of two uint8 RGB (or grayscale) images as pyiqa computes it: on luma by default (its
    `ssim`), or per RGB channel and averaged with `channels="rgb"` (its `ssimc`)."""
    _check_pair(a, b)
    if channels not in SSIM_CHANNELS:
        raise ValueError(f"SSIM channels {channels!r}: expected one of {SSIM_CHANNELS}")
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[:2]}")
    if a.ndim == 2:
        x, y = a[..., None].astype(np.float64), b[..., None].astype(np.float64)
    elif channels == "y":
        x, y = luma(a)[..., None], luma(b)[..., None]
    else:
        x, y = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c]) for c in range(x.shape[-1])]))


def _ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    window = g @ g.T

    def filt(z):  # correlation over the valid region: drop the 5-pixel border the window overhangs
        return cv2.filter2D(z, -1, window, borderType=cv2.BORDER_REFLECT)[5:-5, 5:-5]

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    # pyiqa clips the contrast-structure term at 0, so anticorrelated windows score 0, not below.
    contrast_structure = np.maximum((2 * cov + c2) / (var_x + var_y + c2), 0.0)
    return float(((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * contrast_structure).mean())


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype}")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (..., D) feature arrays (raw or unit AdaFace features)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Refuses every connection and name lookup in this process for the duration: pyiqa would
    otherwise download missing weights (this project never fetches weights at run time)."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled while loading pyiqa metrics (weights must already be present)")

    saved = socket.socket.connect, socket.getaddrinfo
    socket.socket.connect, socket.getaddrinfo = refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.getaddrinfo = saved


def load_iqa(labels: Sequence[str] = tuple(IQA_METRICS)) -> tuple[dict[str, Callable[[np.ndarray], float]], list[str]]:
    """({label: score(uint8 RGB image)} of the pyiqa metrics that load offline, [a message per one that does not])."""
    try:
        import pyiqa
        import torch
    except ImportError:
        return {}, [f"pyiqa is not installed (pip install pyiqa): {', '.join(labels)} left empty"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorers, messages = {}, []
    for label in labels:
        name = IQA_METRICS[label]
        try:
            with no_network():
                metric = pyiqa.create_metric(name, device=device, as_loss=False)
        except Exception as e:  # pyiqa raises whatever its downloader or loader raises
            messages.append(f"{label}: pyiqa metric {name!r} could not load without downloading its weights "
                            f"({type(e).__name__}: {e}); put them in pyiqa's cache (torch hub dir /pyiqa) "
                            f"on a machine with network, then rerun: {label} left empty")
            continue

        def score(image: np.ndarray, metric=metric) -> float:
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
            with torch.no_grad():
                return float(metric(x.to(device)).mean())

        scorers[label] = score
    return scorers, messages
