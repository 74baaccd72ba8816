"""A parameter-free space-to-depth 'autoencoder' behind the VAE's token interface, for the CPU demo.

No pretrained VAE can be downloaded and a random one makes samples unreadable; patchify is exactly
invertible, so a tiny model trained from scratch still produces viewable images.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PatchAutoencoder:
    """`factor` x `factor` pixel patches become one token of 3 * factor^2 channels."""

    factor: int = 8

    @property
    def token_channels(self) -> int:
        return 3 * self.factor**2


def encode_tokens(model: PatchAutoencoder, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> tokens (B, H/f * W/f, 3 f^2), row-major patches."""
    b, h, w, c = images.shape
    f = model.factor
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch factor {f}")
    x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // f) * (w // f), f * f * c).astype(jnp.float32)


def decode_tokens(model: PatchAutoencoder, tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The exact inverse of `encode_tokens`."""
    f, b = model.factor, tokens.shape[0]
    x = tokens.reshape(b, height // f, width // f, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, 3)


def token_grid(model: PatchAutoencoder, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of an image."""
    return height // model.factor, width // model.factor
