"""PSNR and SSIM as pyiqa's default `psnr` and `ssim` compute them: hand-computed cases, an independent
scipy derivation of pyiqa's formulas, and golden values computed once by pyiqa itself."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from iconface_jax import metrics

pytestmark = pytest.mark.parity

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def flat(rgb: tuple[int, int, int], shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (*shape, 3)).copy()


def luminance_term(a: float, b: float) -> float:
    """SSIM of two constant images of values a and b: no variance, so the contrast-structure term is C2/C2."""
    return (2 * a * b + C1) / (a * a + b * b + C1)


def scipy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """pyiqa's single-channel SSIM written out with scipy's valid-region correlation and an explicit window."""
    ax = np.arange(11) - 5
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda z: signal.correlate2d(z, w, mode="valid")
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    cs = np.maximum((2 * cxy + C2) / (vx + vy + C2), 0)  # pyiqa: F.relu on the contrast-structure map
    return float(np.mean((2 * mx * my + C1) / (mx**2 + my**2 + C1) * cs))


def tie_free_pair(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured image and a noisy copy with no colour whose luma is an exact half (where float rounding
    decides), so float64 `np.round(0.299 R + 0.587 G + 0.114 B)` is the exact luma."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (*shape, 3))
    b = np.clip(a + rng.integers(-40, 41, a.shape), 0, 255)
    for im in (a, b):
        ties = (im @ np.array([299, 587, 114])) % 1000 == 500
        im[ties, 2] = np.where(im[ties, 2] < 255, im[ties, 2] + 1, 254)  # 114 B moves off the half
    return a.astype(np.uint8), b.astype(np.uint8)


def test_psnr_by_hand():
    a = flat((100, 50, 200))
    assert metrics.psnr(a, a) == pytest.approx(80.0, abs=1e-12)  # 10 log10(1 / 1e-8)
    assert metrics.psnr(a, a + 1) == pytest.approx(10 * np.log10(1 / (1 / 255**2 + 1e-8)), abs=1e-9)
    b = a.copy()
    b[..., 0] += 30  # one channel of three: MSE (30/255)^2 / 3
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(1 / ((30 / 255) ** 2 / 3 + 1e-8)), abs=1e-9)


def test_luma_is_yiq_y_rounded_half_to_even():
    colours = np.array([[100, 50, 200], [10, 20, 30], [100, 0, 0], [0, 51, 0],
                        [2, 0, 43], [3, 1, 44], [0, 0, 250], [1, 1, 251]], np.uint8)
    # 82.05, 18.15, 29.9, 29.937; exact halves 5.5, 6.5, 28.5, 29.5 go to the even neighbour.
    np.testing.assert_array_equal(metrics.luma(colours), [82, 18, 30, 30, 6, 6, 28, 30])
    a, _ = tie_free_pair((64, 64), 0)
    np.testing.assert_array_equal(metrics.luma(a), np.round(a @ np.array([0.299, 0.587, 0.114])))


def test_ssim_by_hand():
    a, b = flat((100, 50, 200)), flat((10, 20, 30))
    assert metrics.ssim(a, b) == pytest.approx(luminance_term(82, 18), abs=1e-12)  # luma 82 vs 18
    rgb = np.mean([luminance_term(p, q) for p, q in zip((100, 50, 200), (10, 20, 30))])
    assert metrics.ssim(a, b, channels="rgb") == pytest.approx(rgb, abs=1e-12)
    # Different colours of equal luma (30): identical on Y, not per channel.
    assert metrics.ssim(flat((100, 0, 0)), flat((0, 51, 0))) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(flat((100, 0, 0)), flat((0, 51, 0)), channels="rgb") < 0.5
    # Grey stripes against their negative: every window anticorrelated (covariance = -variance, variance
    # ~625 > C2 / 2), so the contrast-structure term is negative and clipped: SSIM exactly 0 (else < 0).
    stripes = np.where(np.arange(24) % 2 == 0, 100, 150).astype(np.uint8)
    x = np.broadcast_to(stripes[None, :, None], (20, 24, 3)).copy()
    assert metrics.ssim(x, 250 - x) == 0.0
    assert metrics.ssim(x, 250 - x, channels="rgb") == 0.0
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(24, 20), (37, 41)])
def test_ssim_matches_pyiqa_formula(shape):
    a, b = tie_free_pair(shape, shape[0])
    lum = lambda im: np.round(im @ np.array([0.299, 0.587, 0.114]))
    assert metrics.ssim(a, b) == pytest.approx(scipy_ssim(lum(a), lum(b)), abs=1e-9)
    rgb = np.mean([scipy_ssim(a[..., c], b[..., c]) for c in range(3)])
    assert metrics.ssim(a, b, channels="rgb") == pytest.approx(rgb, abs=1e-9)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    gray = a[..., 0]
    assert metrics.ssim(gray, b[..., 0]) == pytest.approx(scipy_ssim(gray, b[..., 0]), abs=1e-9)


# pyiqa 0.1.16's own `psnr`, `ssim` and `ssimc` (torch 2.13.0, CPU), computed once and stored: pyiqa is in no extra
# (it pulls torchvision, timm and friends for metrics we do not use). Fed as ReF-LDM's evaluation feeds them:
# float32 RGB / 255, NCHW.
PYIQA_GOLDEN = {
    "seed 5": (19.211652755737305, 0.9259952945958327, 0.9280448703885349),
    "tie-free": (21.102581024169922, 0.9545838271201725, 0.9540706541078624),
}


def test_matches_pyiqa_golden_values():
    """pyiqa's stored scores: to float32 rounding on a pair without luma halves; where halves occur, pyiqa's
    float32 luma rounds some of them the other way, which moves SSIM by a few 1e-6."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-50, 51, a.shape), 0, 255).astype(np.uint8)
    pairs = {"seed 5": ((a, b), 1e-5), "tie-free": (tie_free_pair((48, 40), 5), 1e-7)}
    for name, ((x, y), ssim_tol) in pairs.items():
        want_psnr, want_ssim, want_ssimc = PYIQA_GOLDEN[name]
        assert metrics.psnr(x, y) == pytest.approx(want_psnr, abs=1e-5), name  # pyiqa's MSE is float32
        assert metrics.ssim(x, y) == pytest.approx(want_ssim, abs=ssim_tol), name
        assert metrics.ssim(x, y, channels="rgb") == pytest.approx(want_ssimc, abs=1e-7), name


def test_bad_inputs_are_named():
    a = flat((1, 2, 3), (24, 20))
    with pytest.raises(ValueError, match="shape"):
        metrics.ssim(a, a[:-1])
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(a[:8], a[:8])
    with pytest.raises(ValueError, match="'ycbcr'"):
        metrics.ssim(a, a, channels="ycbcr")
