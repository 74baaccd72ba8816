"""Degradations: shapes, determinism, kernels, config round trip, and the presets' calibration on the
real benchmark faces (FFHQ-Ref Moderate 25.2 dB, Severe 19.6 dB, within 1.5 dB)."""
from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from iconface_jax.data import calibrate, degrade

FACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "faces")


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


@pytest.mark.skipif(not os.path.isdir(FACES), reason=f"benchmark faces not found at {FACES} (CI has ../shared)")
@pytest.mark.parametrize("preset", ["moderate", "severe"])
def test_preset_calibration_on_benchmark_faces(preset):
    images = calibrate.load_ground_truths(FACES)
    assert len(images) == 40
    median = float(np.median(calibrate.preset_psnrs(images, preset, seed=0)))
    assert abs(median - calibrate.TARGETS[preset]) <= calibrate.TOLERANCE_DB, median
