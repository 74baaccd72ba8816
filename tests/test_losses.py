"""The identity objective on hand-built cases (paper eqs. 9-11)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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
