"""Sampling: the FLUX.2-klein sampler (Euler over the dynamically shifted flow-match schedule, batched CFG)
and IConFace's face restoration on it (`restore_faces`, `restore_tokens`, `posterior_mean`).

Schedule as `Flux2KleinPipeline`: sigmas linspace(1, 1/n, n), shifted by exp(mu) / (exp(mu) + (1/s - 1))
with mu = compute_empirical_mu(image_seq_len, n), then a final 0. Guidance runs both branches in one
forward of a doubled batch: conditional prompt first, empty prompt second, the same image tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from iconface_jax import flow
from iconface_jax.face_system import FaceSystem, grid_of


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift (diffusers' `compute_empirical_mu`)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def schedule(num_steps: int, image_seq_len: int) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas from 1 down to 0 (the scene's token count sets the shift)."""
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    mu = empirical_mu(image_seq_len, num_steps)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return np.append(shifted.astype(np.float32), np.float32(0.0))


def sample(velocity: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, sigmas: np.ndarray,
           guidance: float, on_step: Callable[[jax.Array], None] | None = None) -> jax.Array:
    """Integrates dz = v dsigma from sigma = 1 to 0; returns z0.

    `velocity(z2, sigma2)` maps a doubled batch [z; z] (conditional then unconditional) to velocities;
    with guidance 1 or less only the conditional branch would matter, but one compiled shape is kept.
    `on_step(i)` is called on the host after each step (progress bars), from inside the compiled loop.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    b = noise.shape[0]

    def step(i, z):
        sigma = jnp.full((2 * b,), sigmas[i], jnp.float32)
        v = velocity(jnp.concatenate([z, z], axis=0), sigma).astype(jnp.float32)
        cond, uncond = v[:b], v[b:]
        v = uncond + guidance * (cond - uncond)
        z = (z.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v).astype(z.dtype)
        if on_step is not None:
            jax.debug.callback(on_step, i, ordered=True)
        return z

    return jax.lax.fori_loop(0, len(sigmas) - 1, step, noise)


def restore_faces(system: FaceSystem, degraded: jax.Array, references: jax.Array, key: jax.Array,
                  steps: int = 12, guidance: float = 4.0, on_step=None) -> jax.Array:
    """Restored images (B, H, W, 3) in [-1, 1] from degraded (B, H, W, 3) and references (B, R, H, W, 3)."""
    _, h, w, _ = degraded.shape
    noise = jax.random.normal(key, jax.eval_shape(system.encode, degraded).shape, jnp.float32)
    z0 = restore_tokens(system, degraded, references, noise, steps, guidance, on_step)
    return jnp.clip(system.decode(z0, h, w), -1.0, 1.0)


def restore_tokens(system: FaceSystem, degraded: jax.Array, references: jax.Array, noise: jax.Array,
                   steps: int = 12, guidance: float = 4.0, on_step=None) -> jax.Array:
    """Restored scene tokens z0 (B, L, C), sampled from the initial tokens `noise` (B, L, C)."""
    cond, text = conditions(system, degraded, references)
    # Both guidance branches see the same images.
    cond = jax.tree.map(lambda x: jnp.concatenate([x, x]), cond)

    def velocity(z2, sigma2):
        return system.model.velocity(z2, text, sigma2, cond)

    return sample(velocity, noise, schedule(steps, noise.shape[1]), guidance, on_step)


def posterior_mean(system: FaceSystem, degraded: jax.Array, references: jax.Array, key: jax.Array) -> jax.Array:
    """The model's one-step clean estimate from pure noise (sigma 1, the prompt's branch), images (B, H, W, 3).

    At sigma 1 the noisy input carries nothing about the image, so a trained model's estimate there is its
    posterior mean E[x | degraded, references]: the regression its samples scatter around. A perfect sampler's
    samples have twice its mean squared error (docs/demo.md#samples-and-the-posterior-mean), so it separates
    what the model knows from what sampling adds.
    """
    b, h, w, _ = degraded.shape
    cond, text = conditions(system, degraded, references)
    noise = jax.random.normal(key, jax.eval_shape(system.encode, degraded).shape, jnp.float32)
    sigma = jnp.ones((b,), jnp.float32)
    z0 = flow.estimate_z0(noise, system.model.velocity(noise, text[:b], sigma, cond), sigma)
    return jnp.clip(system.decode(z0, h, w), -1.0, 1.0)


def conditions(system: FaceSystem, degraded: jax.Array, references: jax.Array):
    """What every sampling step reuses (`IConFace.condition`) and the text [prompt; empty] (2B, T, C)."""
    b, h, w, _ = degraded.shape
    x_deg, x_refs = system.encode(degraded), system.encode(references)
    e_id = system.anchor(degraded, references)
    text = jnp.concatenate([jnp.broadcast_to(system.prompt[...], (b, *system.prompt.shape)),
                            jnp.broadcast_to(system.empty[...], (b, *system.empty.shape))]).astype(x_deg.dtype)
    # Conditions (and the reference cache) once per image.
    return system.model.condition(x_deg, x_refs, e_id, grid=grid_of(h, w, x_deg.shape[1])), text
