"""The identity objective on hand-built cases (paper eqs. 9-11)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from iconface_jax import losses


def test_sigma_weight_floor():
    np.testing.assert_allclose(losses.sigma_weight(jnp.asarray([0.0, 0.5, 0.75, 0.9, 1.0])),
                               [1.0, 0.25, 0.0625, 0.0625, 0.0625])


def test_identity_loss_hand_case():
    e_ref = jnp.asarray([[1.0, 0.0]])
    e_gt = jnp.asarray([[0.0, 1.0]])  # cos(e_ref, e_gt) = 0 -> lambda_h* = lambda_h
    restored = jnp.asarray([[1.0, 1.0]])  # cos 1/sqrt(2) to both
    sigma = jnp.asarray([0.5])  # omega = 0.25
    got = losses.identity_loss(restored, e_ref, e_gt, sigma, jnp.asarray([True]), lambda_h=0.4)
    want = 0.25 * ((1 - 0.4) * (1 - 2**-0.5) + 0.4 * (1 - 2**-0.5))
    np.testing.assert_allclose(got, [want], rtol=1e-6)
    # A perfect reference (e_ref == e_gt) gives lambda_h* = 0: pure L_ref-id.
    got = losses.identity_loss(jnp.asarray([[0.0, 1.0]]), e_ref, e_ref, jnp.asarray([0.0]), jnp.asarray([True]), 0.4)
    np.testing.assert_allclose(got, [1.0], rtol=1e-6)


def test_identity_loss_is_zero_without_references():
    got = losses.identity_loss(jnp.ones((2, 4)), jnp.ones((2, 4)), -jnp.ones((2, 4)), jnp.zeros(2),
                               jnp.asarray([False, False]), lambda_h=0.5)
    np.testing.assert_array_equal(got, [0.0, 0.0])


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("restored, sigma", [([3.0, 1.0], 0.1), ([1.0, 2.0], 0.6), ([-1.0, 0.5], 0.9)])
def test_identity_loss_with_unequal_cosines(restored, sigma):
    """cos(x, e_ref) != cos(x, e_gt) and 0 < lambda_h* < lambda_h: eqs. 9-11 by hand in 2-D, with an anchor at 60
    degrees from the ground truth (cos 1/2, so lambda_h* = lambda_h / 2) and norms that cosines must ignore."""
    e_ref = np.asarray([2.0, 0.0])
    e_gt = np.asarray([0.5, 0.5 * 3**0.5]) * 3.0
    lam_h, lam = 0.8, 0.8 * (1 - 0.5)
    assert abs(_cos(restored, e_ref) - _cos(restored, e_gt)) > 0.1
    omega = max(1 - sigma, 0.25) ** 2
    want = omega * ((1 - lam) * (1 - _cos(restored, e_ref)) + lam * (1 - _cos(restored, e_gt)))
    got = losses.identity_loss(jnp.asarray([restored]), jnp.asarray([e_ref]), jnp.asarray([e_gt]),
                               jnp.asarray([sigma]), jnp.asarray([True]), lambda_h=lam_h)
    np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_identity_loss_literal_values():
    """Three numbers worked out on paper: x = (1, 0), e_ref = (0, 1) (cos 0), e_gt = (1, 1) (cos 1/sqrt 2),
    cos(e_ref, e_gt) = 1/sqrt 2, lambda_h = 1 -> lambda_h* = 1 - 1/sqrt 2 = 0.29289;
    mixed = (1 - 0.29289) * 1 + 0.29289 * (1 - 0.70711) = 0.79289; sigma 0 -> omega 1, sigma 0.5 -> 1/4."""
    x, e_ref, e_gt = jnp.asarray([[1.0, 0.0]] * 2), jnp.asarray([[0.0, 1.0]] * 2), jnp.asarray([[1.0, 1.0]] * 2)
    got = losses.identity_loss(x, e_ref, e_gt, jnp.asarray([0.0, 0.5]), jnp.asarray([True, True]), lambda_h=1.0)
    np.testing.assert_allclose(got, [0.79289322, 0.79289322 / 4], rtol=1e-6)
