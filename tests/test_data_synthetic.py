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


def test_aligned_views_keep_the_traits_in_place():
    """Aligned crops (the default, as FFHQ's) keep an identity's eyes, brows, mouth and mole where they were in
    its other views, so a reference's pixels there show the target's traits; free roll, scale and shift move
    them. Measured by the overlap (IoU) of the trait masks of view 0 and views 1..3; expression, lighting and
    background stay as drawn."""
    def overlaps(aligned):
        out = []
        for identity in range(6):
            src = synthetic.SyntheticSource(1, 4, 64, first_identity=identity, aligned=aligned)
            masks = [src.fetch(identity * 4 + v, with_traits=True)[1] for v in range(4)]
            out += [(masks[0] & m).sum() / (masks[0] | m).sum() for m in masks[1:]]
        return np.array(out)
    assert overlaps(True).min() > 0.5 and overlaps(False).mean() < 0.4
    free, aligned = synthetic.view_params(0, 3, 1, aligned=False), synthetic.view_params(0, 3, 1)
    assert (aligned.roll, aligned.scale, aligned.shift[1]) == (0.0, 1.0, 0.0) and free.roll != 0.0
    assert dataclasses.replace(aligned, roll=free.roll, scale=free.scale, shift=free.shift) == free


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


def test_trait_mask_holds_every_pixel_the_fine_traits_change():
    """Two identities equal but for their fine traits (iris, brows, lips, mole, freckles), drawn in one view:
    every pixel where they differ lies in the union of their trait masks, which is a small part of the image."""
    a = synthetic.identity_traits(0, 11)
    b = dataclasses.replace(a, iris=(200, 40, 40), lips=(90, 160, 90), mole_uv=(-a.mole_uv[0], a.mole_uv[1] - 0.1),
                            brow_arch=a.brow_arch + 0.05, brow_slant=-a.brow_slant, brow_thickness=0.04,
                            freckles=((0.3, 0.2), (-0.35, 0.15)))
    for view in range(3):
        v = synthetic.view_params(0, 11, view)
        img_a, mask_a = synthetic.render(a, v, 64, with_traits=True)
        img_b, mask_b = synthetic.render(b, v, 64, with_traits=True)
        assert np.array_equal(img_a, synthetic.render(a, v, 64))  # the mask does not change the image
        changed = np.abs(img_a.astype(int) - img_b.astype(int)).max(axis=-1) > 0
        assert changed.sum() > 20
        assert not (changed & ~(mask_a | mask_b)).any()
        assert mask_a.mean() < 0.15


def test_held_out_identities_follow_the_training_ones():
    train = synthetic.SyntheticSource(5, 3, 32, seed=2)
    held_out = synthetic.SyntheticSource(4, 3, 32, seed=2, first_identity=5)
    assert min(r.gt for r in held_out.records) == 15
    assert not {r.gt for r in train.records} & {r.gt for r in held_out.records}
    assert np.array_equal(held_out.fetch(16), synthetic.SyntheticSource(6, 3, 32, seed=2).fetch(16))


def test_benchmark_reports_a_time_per_image():
    """The render-time figure lives in a benchmark (`python -m iconface_jax.data.synthetic`), not in a timing
    assert: here only that it runs and reports a positive time."""
    assert synthetic.benchmark(32, images=3) > 0
