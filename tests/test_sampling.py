"""Sampler: schedule equals diffusers' FLUX.2-klein scheduler; Euler with CFG on hand-derivable fields."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from iconface_jax import flow, sampling

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("seq_len,steps", [(1024, 12), (256, 4), (4096, 50), (4608, 12)])
def test_schedule_matches_diffusers(seq_len, steps):
    assert sampling.empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    np.testing.assert_allclose(sampling.schedule(steps, seq_len), scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)


def test_euler_follows_exact_straight_flow():
    # For the true velocity eps - z0 of a straight path, Euler is exact at any step count.
    z0, eps = jnp.asarray([[1.0, -2.0]]), jnp.asarray([[0.5, 0.25]])
    sigmas = sampling.schedule(5, 64)
    out = sampling.sample(lambda z, s: jnp.broadcast_to(flow.velocity_target(z0, eps), z.shape), eps, sigmas, 4.0)
    np.testing.assert_allclose(out, z0, atol=1e-6)


def test_guidance_combines_branches():
    # cond velocity 1, uncond velocity 0 over a single unit step: z moves by -(uncond + g (cond - uncond)) = -g.
    def velocity(z, s):
        return jnp.concatenate([jnp.ones_like(z[:1]), jnp.zeros_like(z[1:])])
    out = sampling.sample(velocity, jnp.zeros((1, 3)), np.asarray([1.0, 0.0], np.float32), guidance=4.0)
    np.testing.assert_allclose(out, -4.0 * np.ones((1, 3)), atol=1e-7)


def test_flow_interpolation_and_estimate():
    z0, eps, sigma = jnp.asarray([[2.0]]), jnp.asarray([[-1.0]]), jnp.asarray([0.25])
    z = flow.interpolate(z0, eps, sigma)
    np.testing.assert_allclose(z, [[0.75 * 2 - 0.25]])
    np.testing.assert_allclose(flow.estimate_z0(z, flow.velocity_target(z0, eps), sigma), z0, atol=1e-7)


def test_guidance_one_is_the_conditional_branch():
    def velocity(z, s):  # conditional and unconditional branches differ
        return jnp.concatenate([jnp.full_like(z[:1], 0.3), jnp.full_like(z[1:], -2.0)]) + 0.1 * z
    sigmas = sampling.schedule(4, 16)
    guided = sampling.sample(velocity, jnp.ones((1, 2)), sigmas, guidance=1.0)
    z = np.ones((1, 2), np.float32)
    for i in range(4):  # Euler on the conditional field alone
        z = z + (sigmas[i + 1] - sigmas[i]) * (0.3 + 0.1 * z)
    np.testing.assert_allclose(guided, z, rtol=1e-6)


def test_on_step_reports_every_step_from_the_compiled_loop():
    seen = []
    out = jax.jit(lambda z: sampling.sample(lambda z2, s: jnp.zeros_like(z2), z, sampling.schedule(5, 16), 4.0,
                                            on_step=lambda i: seen.append(int(i))))(jnp.ones((1, 2)))
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert seen == [0, 1, 2, 3, 4]
