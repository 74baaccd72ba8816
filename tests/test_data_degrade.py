"""Degradations: shapes, determinism, kernels, config round trip, and the presets' calibration on the
real benchmark faces (FFHQ-Ref Moderate 25.2 dB, Severe 19.6 dB, within 1.5 dB)."""
from __future__ import annotations

import dataclasses
import math
import re

import ml_collections
import numpy as np
import pytest
import scipy.linalg

from helpers import SHARED, require
from iconface_jax.data import degrade
from tools import calibrate_degradations as calibrate

FACES = SHARED / "faces"


def _image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([128 + 100 * np.sin(6 * xx + c) * np.cos(5 * yy) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 5, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (256, 256)])
@pytest.mark.parametrize("preset", ["moderate", "severe"])
def test_apply_keeps_shape_and_is_deterministic(shape, preset):
    img = _image(max(shape))[: shape[0], : shape[1]]
    for seed in range(6):  # several seeds reach both chains and most branches
        a = degrade.apply(img, preset, np.random.default_rng(seed))
        b = degrade.apply(img, preset, np.random.default_rng(seed))
        assert a.shape == img.shape and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert not np.array_equal(a, img)


def test_each_chain_runs_alone():
    img = _image(128)
    for p_bsrgan in (0.0, 1.0):
        preset = dataclasses.replace(degrade.PRESETS["severe"], p_bsrgan=p_bsrgan)
        out = degrade.apply(img, preset, np.random.default_rng(1))
        assert out.shape == img.shape and degrade.psnr(out, img) < 35


def test_apply_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        degrade.apply(np.zeros((8, 8), np.uint8), "moderate", np.random.default_rng(0))
    with pytest.raises(ValueError):
        degrade.apply(np.zeros((8, 8, 3), np.float32), "moderate", np.random.default_rng(0))


@pytest.mark.parametrize("kind", degrade.KERNEL_TYPES)
def test_kernels_normalised_and_point_symmetric(kind):
    k = degrade.mixed_kernel(kind, 21, 2.0, 0.8, 0.7, 1.5)
    assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-5
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # so correlation equals convolution
    assert k.argmax() == 21 * 10 + 10
    if kind.endswith("iso") and not kind.endswith("aniso"):
        np.testing.assert_allclose(k, k.T, atol=1e-7)


def test_sinc_kernel_is_a_low_pass():
    k = degrade.sinc_kernel(np.pi / 4, 21)
    assert abs(k.sum() - 1) < 1e-5
    spectrum = np.abs(np.fft.fft2(k, (64, 64)))
    assert spectrum[0, 0] == pytest.approx(1, abs=1e-4) and spectrum[32, 32] < 0.1


def test_preset_round_trips_through_config_dict():
    p = degrade.PRESETS["moderate"]
    cfg = ml_collections.ConfigDict(p.to_dict())
    cfg.scale_range = (3.0, 4.0)
    cfg.first.noise_range = [1.0, 2.0]
    q = degrade.Preset.from_dict(cfg)
    assert q.scale_range == (3.0, 4.0) and q.first.noise_range == (1.0, 2.0)
    assert q.second == p.second and q.bsrgan == p.bsrgan
    assert degrade.Preset.from_dict(p.to_dict()) == p


def test_severe_is_stronger_than_moderate():
    img = _image(128, 3)
    values = {name: np.median([degrade.psnr(degrade.apply(img, name, np.random.default_rng(s)), img)
                               for s in range(12)]) for name in ("moderate", "severe")}
    assert values["severe"] < values["moderate"] - 2


@pytest.mark.parametrize("preset", ["moderate", "severe"])
def test_preset_calibration_on_benchmark_faces(preset):
    images = calibrate.load_ground_truths(require(FACES, "benchmark faces"))
    assert len(images) == 40
    median = float(np.median(calibrate.preset_psnrs(images, preset, seed=0)))
    assert abs(median - calibrate.TARGETS[preset]) <= calibrate.TOLERANCE_DB, median


# --- details against the published pipelines (basicsr's Real-ESRGAN degradations, BSRGAN's utils_blindsr) ---


def _plateau_beta(k: np.ndarray) -> float:
    """beta of an isotropic plateau kernel 1 / ((r^2 / sigma^2)^beta + 1), read off its values at radii 1 and 2:
    k(0) / k(r) - 1 = (r^2 / sigma^2)^beta, so the ratio of the two is 4^beta."""
    c = k.shape[0] // 2
    at1, at2 = k[c, c] / k[c, c + 1] - 1, k[c, c] / k[c, c + 2] - 1
    return math.log(at2 / at1) / math.log(4)


def test_realesrgan_plateau_beta_is_exactly_one_half_the_time():
    """basicsr draws beta from uniform(lo, 1) or uniform(1, hi) with equal odds: with the plateau range (1, 2),
    half of the plateau kernels have beta = 1 exactly."""
    stage = dataclasses.replace(degrade.Stage(), sinc_prob=0.0, kernel_probs=(0, 0, 0, 0, 1, 0))
    assert stage.betap_range == (1.0, 2.0)
    rng = np.random.default_rng(0)
    betas = np.array([_plateau_beta(degrade._random_kernel(stage, 1.0, rng)) for _ in range(400)])
    assert np.all((betas > 1 - 1e-3) & (betas < 2 + 1e-3)), betas.min()
    exactly_one = np.mean(np.abs(betas - 1) < 1e-3)
    assert 0.4 < exactly_one < 0.6, exactly_one


def test_bsrgan_correlated_noise_has_bsrgans_covariance():
    """BSRGAN's channel-correlated noise: covariance |L^2 U^T D U| at the fixed L = noise_level2 / 255 (not the drawn
    level), sampled as BSRGAN samples it; numpy's multivariate_normal is the reference sampler."""
    noise_range = (2.0, 25.0)
    level = noise_range[1] / 255

    def draws(seed):  # the generator's draws in `_bsrgan_noise`'s order: level, branch, D, the matrix U is made from
        rng = np.random.default_rng(seed)
        return rng.uniform(*noise_range) / 255, rng.random(), rng.random(3), rng.random((3, 3))

    def unsigned(d, a):  # U^T D U before BSRGAN's |.|
        u = scipy.linalg.orth(a)
        return u.T @ np.diag(d) @ u

    # A seed in the correlated branch (0.4 <= r <= 0.6) whose drawn level is far below L and whose |.| flips a sign.
    seed = next(s for s in range(1000) for sigma, r, d, a in [draws(s)]
                if 0.4 <= r <= 0.6 and sigma < 0.6 * level and unsigned(d, a).min() < -0.1)
    _, _, d, a = draws(seed)
    noise = degrade._bsrgan_noise(np.zeros((256, 256, 3), np.float32), noise_range, np.random.default_rng(seed))
    reference = np.random.default_rng(1).multivariate_normal(
        np.zeros(3), np.abs(level**2 * unsigned(d, a)), size=256 * 256, check_valid="ignore")
    np.testing.assert_allclose(np.cov(noise.reshape(-1, 3).T), np.cov(reference.T), atol=0.03 * level**2)


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("values", [256, 3])
def test_poisson_noise_counts_like_realesrgan(gray, values):
    """basicsr's Poisson noise: the image rounded to 8 bits (grey: its ITU-R 601 luma, the same noise in every
    channel) counted at vals = 2^ceil(log2(number of distinct values)) photons, so base + noise = counts / vals."""
    rng = np.random.default_rng(0)
    image = rng.choice(np.linspace(0, 255, values).round(), size=(32, 32, 3)).astype(np.float32) / 255
    base = np.round((image @ np.array([0.299, 0.587, 0.114]))[..., None] * 255) / 255 if gray else image
    vals = 2 ** math.ceil(math.log2(len(np.unique(np.round(base * 255)))))
    noise = degrade._poisson_noise(image, 1.0, gray, rng) - image
    counts = (base + noise) * vals
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
    assert abs(np.mean(counts) - np.mean(base * vals)) < 0.05 * np.mean(base * vals)  # Poisson: mean = base * vals
    if gray:
        np.testing.assert_allclose(noise, np.repeat(noise[..., :1], 3, axis=2), atol=1e-6)  # float32 (x + n) - x


# Disjoint JPEG quality ranges, so that each recorded JPEG names the stage that drew its quality.
JPEG_TAGS = {(90.0, 95.0): "J1", (30.0, 35.0): "J2", (60.0, 65.0): "Jb"}


def _traces(monkeypatch, preset: degrade.Preset, seeds: range) -> list[list[str]]:
    """The operators each seed's `apply` calls, in order: F a blur or sinc filter, f a skipped one (kernel None),
    R a resize, N Gaussian or Poisson noise, B BSRGAN's noise, J1/J2/Jb a JPEG by the range its quality is in."""
    calls: list[str] = []

    def record(name, token):
        original = getattr(degrade, name)
        monkeypatch.setattr(degrade, name, lambda *a: calls.append(token(*a)) or original(*a))

    def jpeg_tag(x, quality):
        return next((tag for (lo, hi), tag in JPEG_TAGS.items() if lo <= quality <= hi), f"J{quality:.0f}")

    record("_filter", lambda x, kernel: "f" if kernel is None else "F")
    record("_resize", lambda x, size, mode: "R")
    record("_gaussian_noise", lambda *a: "N")
    record("_poisson_noise", lambda *a: "N")
    record("_bsrgan_noise", lambda *a: "B")
    record("_jpeg", jpeg_tag)
    img, traces = _image(32), []
    for seed in seeds:
        calls.clear()
        degrade.apply(img, preset, np.random.default_rng(seed))
        traces.append(list(calls))
    return traces


def test_realesrgan_chain_stage_by_stage(monkeypatch):
    """Order 1: blur (with its probability), resize, noise, JPEG at order 1's quality; order 2: the same without its
    JPEG; then resize to H/scale + final sinc and JPEG at order 2's quality, in either order (half each); then back
    to H x W. Blur and final-sinc probabilities counted over 400 seeds (binomial, 4 standard deviations)."""
    base = degrade.Preset()
    preset = dataclasses.replace(
        base, scale_range=(2.0, 4.0), p_bsrgan=0.0,
        first=dataclasses.replace(base.first, blur_prob=0.25, jpeg_range=(90.0, 95.0)),
        second=dataclasses.replace(base.second, blur_prob=0.8, jpeg_range=(30.0, 35.0)))
    chain = re.compile(r"(?P<blur1>F )?R N J1 (?P<blur2>F )?R N (?P<final>R (?P<sinc>[Ff]) J2|J2 R (?P<sinc_>[Ff])) R")
    n, counts = 400, dict(blur1=0, blur2=0, resize_first=0, sinc=0)
    for trace in _traces(monkeypatch, preset, range(n)):
        m = chain.fullmatch(" ".join(trace))
        assert m, " ".join(trace)
        counts["blur1"] += m["blur1"] is not None
        counts["blur2"] += m["blur2"] is not None
        counts["resize_first"] += m["final"].startswith("R")
        counts["sinc"] += (m["sinc"] or m["sinc_"]) == "F"
    for name, p in dict(blur1=0.25, blur2=0.8, resize_first=0.5, sinc=base.final_sinc_prob).items():
        assert abs(counts[name] - p * n) < 4 * math.sqrt(n * p * (1 - p)), (name, counts)


@pytest.mark.parametrize("jpeg_prob", [0.0, 1.0])
def test_bsrgan_chain_ends_with_its_jpeg(monkeypatch, jpeg_prob):
    """BSRGAN's shuffled ops include a JPEG only with jpeg_prob; the chain always ends with one more JPEG (its
    quality from BSRGAN's range), followed only by the resize back to H x W."""
    base = degrade.Preset()
    preset = dataclasses.replace(base, scale_range=(2.0, 4.0), p_bsrgan=1.0, bsrgan=dataclasses.replace(
        base.bsrgan, jpeg_prob=jpeg_prob, jpeg_range=(60.0, 65.0)))
    for trace in _traces(monkeypatch, preset, range(40)):
        assert trace[-2:] == ["Jb", "R"], trace
        assert trace.count("Jb") == 1 + jpeg_prob and not any(t.startswith("J") and t != "Jb" for t in trace), trace
        assert trace.count("B") == 1 and trace.count("F") >= 2, trace  # one noise op, two blur ops at least
