"""Rectified-flow matching as FLUX.2 trains it: interpolation, velocity target, sigma sampling, z0 estimate.

Convention (docs/design.md#flow-matching): z_sigma = (1 - sigma) z0 + sigma eps, target u* = eps - z0, so the model's
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


SIGMA_LAWS = ("logit_normal", "uniform", "mode")


def sample_sigma(key: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                 law: str = "logit_normal", unshifted_fraction: float = 0.0, mode_scale: float = 1.29) -> jax.Array:
    """Training sigmas (batch,): a base law, time-shifted as s' = shift s / (1 + (shift - 1) s).

    Base laws (those of the IConFace authors' `utils.sample_sigma`): `logit_normal` sigmoid(N(mean, std))
    (SD3's default), `uniform` U(0, 1), `mode` SD3's mode-biased law 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u).
    With `unshifted_fraction` f > 0 each sample keeps its unshifted value with probability f: a mixture that
    keeps the sampler-matched high-noise range and gives low noise (where the identity loss weighs most) mass.
    """
    if law not in SIGMA_LAWS:
        raise ValueError(f"unknown sigma law {law!r}; expected one of {SIGMA_LAWS}")
    k_base, k_mix = jax.random.split(key) if unshifted_fraction > 0 else (key, None)
    if law == "logit_normal":
        sigma = jax.nn.sigmoid(mean + std * jax.random.normal(k_base, (batch,), jnp.float32))
    else:
        u = jax.random.uniform(k_base, (batch,), jnp.float32)
        sigma = u if law == "uniform" else 1 - u - mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    if k_mix is None:
        return shifted
    return jnp.where(jax.random.bernoulli(k_mix, unshifted_fraction, (batch,)), sigma, shifted)


def loss(velocity: jax.Array, z0: jax.Array, eps: jax.Array) -> jax.Array:
    """Per-sample mean squared error to the velocity target, in float32: (B,)."""
    err = velocity.astype(jnp.float32) - velocity_target(z0, eps).astype(jnp.float32)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
