"""FLOP accounting (the formulas of docs/design.md#flops for the FLUX.2 transformer) and a measured matmul peak.

The trainer logs MFU with them, the bench prints it, and the ahead-of-time compiler prints them beside XLA's count
(the FLOP audit) and adds the attention kernels' FLOPs (custom calls XLA's cost model does not count) with them.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from iconface_jax.models import flux2


def model_flops(cfg: flux2.Flux2Config, text_len: int, image_len: int, cached_len: int = 0) -> tuple[float, float]:
    """Forward FLOPs of one sample, (linear, attention), docs/design.md#flops for any preset; `cached_len`
    more keys come from a reference cache."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    per_token = 4 * d * d + 3 * d * m  # q, k, v, out + SwiGLU in (2m) and out (m)
    length, blocks = text_len + image_len, cfg.num_layers + cfg.num_single_layers
    return 2.0 * length * per_token * blocks, 4.0 * length * (length + cached_len) * d * blocks


def train_flops_parts(cfg: flux2.Flux2Config, text_len: int, image_len: int) -> tuple[float, float]:
    """A LoRA step on a frozen base, (linear, attention): ~2x the linear forward (no weight gradients) and 3.5x
    attention (flash attention recomputes its forward in the backward pass)."""
    lin, att = model_flops(cfg, text_len, image_len)
    return 2 * lin, 3.5 * att


def train_flops(cfg: flux2.Flux2Config, text_len: int, image_len: int) -> float:
    """A LoRA step on a frozen base, `train_flops_parts` summed."""
    return sum(train_flops_parts(cfg, text_len, image_len))


def sampling_flops(cfg: flux2.Flux2Config, text_len: int, image_tokens: int, refs: int, steps: int,
                   cached: bool = False) -> tuple[float, float]:
    """A guided restoration of one face, (linear, attention): `steps` forwards of both guidance branches over
    text, scene, degraded and `refs` reference segments of `image_tokens` each; with the reference cache one
    pass of the degraded and reference tokens, then the steps over text and scene reading their cache."""
    if not cached:
        return tuple(2 * steps * f for f in model_flops(cfg, text_len, (2 + refs) * image_tokens))
    condition_len = (1 + refs) * image_tokens
    once, per_step = model_flops(cfg, 0, condition_len), model_flops(cfg, text_len, image_tokens, condition_len)
    return tuple(a + 2 * steps * b for a, b in zip(once, per_step))


def measure_peak(dtype: jnp.dtype, n: int) -> float:
    """Matmul FLOP/s of this device, from an (n x n) @ (n x n) product."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)
