"""Evaluation metrics: PSNR, SSIM, identity cosine, and pyiqa's no-reference quality metrics when available.

PSNR and SSIM take uint8 RGB images of one size. PSNR is over all pixels and channels on the 0..255
scale, capped at `PSNR_CAP_DB` (identical images score the cap, so means stay finite). SSIM is Wang et
al.'s with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, on each RGB channel
over the window's valid region (no padding), averaged over the channels (BasicSR's `calculate_ssim`
without its Y-channel option).
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np

from iconface_jax.data import degrade

PSNR_CAP_DB = 100.0

# Column label -> pyiqa metric name (the paper's MUSIQ, CLIP-IQA and MANIQA; pyiqa's default variants).
IQA_METRICS = {"MUSIQ": "musiq", "CLIP-IQA": "clipiqa", "MANIQA": "maniqa"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images, capped at PSNR_CAP_DB."""
    _check_pair(a, b)
    return min(degrade.psnr(a, b), PSNR_CAP_DB)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 RGB (or grayscale) images: Gaussian 11x11 window, sigma 1.5, valid region,
    averaged over channels."""
    _check_pair(a, b)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[:2]}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
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
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


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
