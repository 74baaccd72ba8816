"""A parameter-free space-to-depth 'autoencoder' behind the VAE's token interface, for the CPU demo.

No pretrained VAE can be downloaded and a random one makes samples unreadable; patchify is exactly
invertible, so a tiny model trained from scratch still produces viewable images.

With `bands`, each patch is rotated into an orthonormal basis (an opponent colour transform, then the
8x8 DCT-II of JPEG) and only its low frequencies are kept: a fixed linear codec, like a VAE's
latents, where the pixel tokens' high-frequency channels (which a narrow transformer cannot draw and
whose sampling noise it cannot cancel) are dropped. The basis is orthonormal, so the kept coefficients
and the flow's unit noise have the same scale relation as the pixels had.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# Rows: luma (R + G + B), red-green, yellow-blue; orthonormal.
_OPPONENT = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float64)
_OPPONENT /= np.linalg.norm(_OPPONENT, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class PatchAutoencoder:
    """`factor` x `factor` pixel patches become one token: all 3 * factor^2 pixels, or with `bands` =
    (luma, chroma) the DCT coefficients of frequency u + v < luma of the luma channel and u + v < chroma
    of each chroma channel."""

    factor: int = 8
    bands: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))  # hashable, as `basis`'s cache needs
        if self.bands and (len(self.bands) != 2 or not all(1 <= b <= 2 * self.factor - 1 for b in self.bands)):
            raise ValueError(f"patchify bands {self.bands}: expected () or (luma, chroma), each 1.."
                             f"{2 * self.factor - 1} (frequencies u + v below it are kept)")

    @property
    def token_channels(self) -> int:
        return 3 * self.factor**2 if not self.bands else basis(self.factor, self.bands).shape[1]


@functools.lru_cache(maxsize=None)
def basis(factor: int, bands: tuple[int, int]) -> np.ndarray:
    """(3 f^2, K) orthonormal columns mapping a pixel token (index (i f + j) 3 + rgb) to its kept
    coefficients: luma, then the two chroma channels, each in order of (u + v, u)."""
    n = np.arange(factor)
    dct = np.sqrt(2.0 / factor) * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * factor))
    dct[0] /= np.sqrt(2.0)  # dct[u, i]: the orthonormal DCT-II
    columns = []
    for channel, limit in zip(range(3), (bands[0], bands[1], bands[1])):
        for u, v in sorted(((u, v) for u in n for v in n if u + v < limit), key=lambda uv: (uv[0] + uv[1], uv[0])):
            columns.append(np.einsum("i,j,c->ijc", dct[u], dct[v], _OPPONENT[channel]).ravel())
    return np.stack(columns, axis=1).astype(np.float32)


def encode_tokens(model: PatchAutoencoder, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> tokens (B, H/f * W/f, channels), row-major patches."""
    b, h, w, c = images.shape
    f = model.factor
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch factor {f}")
    x = images.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // f) * (w // f), f * f * c).astype(jnp.float32)
    return x @ basis(f, model.bands) if model.bands else x


def decode_tokens(model: PatchAutoencoder, tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The inverse of `encode_tokens` (exact without `bands`; with them, the kept frequencies' image)."""
    f, b = model.factor, tokens.shape[0]
    if model.bands:
        tokens = tokens.astype(jnp.float32) @ basis(f, model.bands).T
    x = tokens.reshape(b, height // f, width // f, f, f, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, 3)


def token_grid(model: PatchAutoencoder, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of an image."""
    return height // model.factor, width // model.factor
