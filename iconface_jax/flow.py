"""Rectified-flow matching as FLUX.2 trains it: interpolation, velocity target, sigma sampling, z0 estimate.

Convention (DESIGN.md): z_sigma = (1 - sigma) z0 + sigma eps, target u* = eps - z0, so the model's
velocity moves from data (sigma = 0) to noise (sigma = 1) and z0_hat = z_sigma - sigma u_hat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def interpolate(z0: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """z_sigma for per-sample sigma (B,) broadcast over the token axes."""
    s = sigma.reshape(-1, *([1] * (z0.ndim - 1))).astype(z0.dtype)
    return (1 - s) * z0 + s * eps


def velocity_target(z0: jax.Array, eps: jax.Array) -> jax.Array:
    """u* = eps - z0."""
    return eps - z0


def estimate_z0(z_sigma: jax.Array, velocity: jax.Array, sigma: jax.Array) -> jax.Array:
    """z0_hat = z_sigma - sigma u_hat."""
    s = sigma.reshape(-1, *([1] * (z_sigma.ndim - 1))).astype(z_sigma.dtype)
    return z_sigma - s * velocity


def sample_sigma(key: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> jax.Array:
    """Logit-normal sigma (SD3's default), optionally time-shifted: s' = shift s / (1 + (shift - 1) s)."""
    sigma = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    return shift * sigma / (1 + (shift - 1) * sigma)


def loss(velocity: jax.Array, z0: jax.Array, eps: jax.Array) -> jax.Array:
    """Per-sample mean squared error to the velocity target, in float32: (B,)."""
    err = velocity.astype(jnp.float32) - velocity_target(z0, eps).astype(jnp.float32)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
