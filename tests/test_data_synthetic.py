"""Synthetic identities: seeded, any resolution, views vary, and the fine identity traits are
visible in a clean image but wiped out by the degradation."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from iconface_jax.data import degrade, synthetic


@pytest.mark.parametrize("resolution", [32, 64, 100, 512])
def test_renders_at_any_resolution(resolution):
    img = synthetic.render(synthetic.identity_traits(0, 3), synthetic.view_params(0, 3, 1), resolution)
    assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
    assert img.std() > 10


def test_seeded():
    src = synthetic.SyntheticSource(4, 3, 64, seed=7)
    assert np.array_equal(src.fetch(5), synthetic.SyntheticSource(4, 3, 64, seed=7).fetch(5))
    assert not np.array_equal(src.fetch(5), synthetic.SyntheticSource(4, 3, 64, seed=8).fetch(5))
    assert synthetic.identity_traits(7, 1) == synthetic.identity_traits(7, 1)
    assert synthetic.identity_traits(7, 1) != synthetic.identity_traits(7, 2)


def test_records_reference_other_views_of_the_identity():
    src = synthetic.SyntheticSource(3, 4, 32)
    assert len(src.records) == 12
    for r in src.records:
        assert len(r.refs) == 3 and r.gt not in r.refs
        assert {k // 4 for k in r.refs} == {r.gt // 4}
    with pytest.raises(ValueError):
        synthetic.SyntheticSource(3, 1, 32)


def test_views_of_one_identity_differ():
    imgs = [synthetic.SyntheticSource(1, 4, 64).fetch(v).astype(np.float32) for v in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(imgs[i] - imgs[j]).mean() > 3


@pytest.mark.parametrize("resolution, preset", [(64, "moderate"), (64, "severe"), (512, "severe")])
def test_fine_traits_are_destroyed_by_degradation(resolution, preset):
    """Changing only the fine traits (iris, mole, brows, freckles) makes a clear local difference in
    the clean image; on those pixels, the same degradation (same seed) of both versions differs by a
    fraction of it: the degraded input no longer tells the identities apart, a reference does."""
    for identity in (2, 5, 11):
        traits = synthetic.identity_traits(0, identity)
        other = dataclasses.replace(
            traits, iris=(230, 30, 30), mole_uv=(-traits.mole_uv[0], traits.mole_uv[1] - 0.2),
            brow_arch=traits.brow_arch + 0.08, brow_slant=-traits.brow_slant,
            freckles=((0.3, 0.2), (-0.3, 0.2)))
        view = synthetic.view_params(0, identity, 0)
        a, b = synthetic.render(traits, view, resolution), synthetic.render(other, view, resolution)
        clean = np.abs(a.astype(np.float32) - b).max(axis=-1)
        trait_pixels = clean > 40
        assert trait_pixels.sum() >= 10 and clean[trait_pixels].mean() > 70
        gaps = []
        for seed in range(8):
            da = degrade.apply(a, preset, np.random.default_rng(seed)).astype(np.float32)
            db = degrade.apply(b, preset, np.random.default_rng(seed)).astype(np.float32)
            gaps.append(np.abs(da - db).max(axis=-1)[trait_pixels].mean())
        assert np.median(gaps) < 0.3 * clean[trait_pixels].mean()


def test_fast_enough_for_the_cpu_demo():
    import time

    src = synthetic.SyntheticSource(50, 4, 64)
    start = time.perf_counter()
    for k in range(200):
        src.fetch(k)
    assert (time.perf_counter() - start) / 200 < 0.02  # about 1 ms on one core
