"""The identity objective of IConFace (paper eqs. 9-11) on top of the flow-matching loss.

L_id = omega(sigma) [(1 - lambda_h*) (1 - cos(A(I_hat), sg(e_ref))) + lambda_h* (1 - cos(A(I_hat), sg(e_gt)))],
lambda_h* = lambda_h (1 - cos(e_ref, e_gt)), omega(sigma) = max(1 - sigma, omega_min)^2; zero without references.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


def sigma_weight(sigma: jax.Array, omega_min: float = 0.25) -> jax.Array:
    """omega(sigma) = max(1 - sigma, omega_min)^2: high-noise steps down-weighted, never skipped."""
    return jnp.square(jnp.maximum(1.0 - sigma.astype(jnp.float32), omega_min))


def identity_loss(restored: jax.Array, e_ref: jax.Array, e_gt: jax.Array, sigma: jax.Array, has_refs: jax.Array,
                  lambda_h: float, omega_min: float = 0.25) -> jax.Array:
    """Per-sample L_id (B,) from the restored image's embedding and the (stop-gradient) anchors."""
    e_ref, e_gt = jax.lax.stop_gradient(e_ref), jax.lax.stop_gradient(e_gt)
    lam = lambda_h * (1.0 - _cos(e_ref, e_gt))
    mixed = (1.0 - lam) * (1.0 - _cos(restored, e_ref)) + lam * (1.0 - _cos(restored, e_gt))
    return jnp.where(has_refs, sigma_weight(sigma, omega_min) * mixed, 0.0)
