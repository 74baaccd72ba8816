"""The demo's patchify codec: exact pixel patches, and the DCT band cut checked against scipy's DCT."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.fft

from iconface_jax import config, face_system
from iconface_jax.models import patchify


def _images(shape=(2, 16, 24, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_pixel_tokens_are_row_major_patches_and_invert_exactly():
    codec = patchify.PatchAutoencoder(8)
    x = _images()
    tokens = np.asarray(patchify.encode_tokens(codec, jnp.asarray(x)))
    assert tokens.shape == (2, 2 * 3, 192) and codec.token_channels == 192
    # token (row 1, column 2) holds the pixels x[:, 8:16, 16:24] in (i, j, rgb) order
    np.testing.assert_array_equal(tokens[:, 1 * 3 + 2], x[:, 8:16, 16:24].reshape(2, -1))
    np.testing.assert_array_equal(patchify.decode_tokens(codec, jnp.asarray(tokens), 16, 24), x)


def _band_cut_by_scipy(x: np.ndarray, factor: int, luma: int, chroma: int) -> np.ndarray:
    """Per patch: an orthonormal opponent colour transform, scipy's orthonormal 2-D DCT-II, frequencies
    u + v at or above the band zeroed, and back."""
    opponent = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float64)
    opponent /= np.linalg.norm(opponent, axis=1, keepdims=True)
    b, h, w, _ = x.shape
    p = x.reshape(b, h // factor, factor, w // factor, factor, 3).astype(np.float64) @ opponent.T
    coeffs = scipy.fft.dctn(p, type=2, norm="ortho", axes=(2, 4))
    u, v = np.arange(factor)[:, None], np.arange(factor)[None, :]
    keep = np.stack([u + v < luma, u + v < chroma, u + v < chroma], -1)  # (u, v, colour)
    coeffs = coeffs * keep[None, None, :, None, :, :]
    back = scipy.fft.idctn(coeffs, type=2, norm="ortho", axes=(2, 4)) @ opponent
    return back.reshape(x.shape)


@pytest.mark.parametrize("factor, bands", [(8, (6, 3)), (4, (3, 1))])
def test_bands_keep_the_low_dct_frequencies(factor, bands):
    codec = patchify.PatchAutoencoder(factor, bands)
    # channels: frequencies with u + v < n number n (n + 1) / 2 for n <= factor
    assert codec.token_channels == sum(n * (n + 1) // 2 for n in (bands[0], bands[1], bands[1]))
    x = _images((2, 16, 16, 3))
    tokens = patchify.encode_tokens(codec, jnp.asarray(x))
    assert tokens.shape == (2, (16 // factor) ** 2, codec.token_channels)
    decoded = np.asarray(patchify.decode_tokens(codec, tokens, 16, 16))
    np.testing.assert_allclose(decoded, _band_cut_by_scipy(x, factor, *bands), atol=2e-6)
    # the kept coefficients are an orthonormal set: their energy is the decoded image's
    np.testing.assert_allclose(np.sum(np.asarray(tokens) ** 2), np.sum(decoded.astype(np.float64) ** 2), rtol=1e-5)


def test_bands_that_keep_every_frequency_invert_exactly():
    codec = patchify.PatchAutoencoder(4, (7, 7))
    x = _images((1, 8, 8, 3))
    assert codec.token_channels == 48
    np.testing.assert_allclose(patchify.decode_tokens(codec, patchify.encode_tokens(codec, jnp.asarray(x)), 8, 8), x,
                               atol=2e-6)


@pytest.mark.parametrize("bands", [(6,), (0, 3), (6, 16), (1, 2, 3)])
def test_bad_bands_are_refused(bands):
    with pytest.raises(ValueError, match="patchify bands"):
        patchify.PatchAutoencoder(8, bands)


def test_config_bands_reach_the_codec_and_only_patchify_takes_them():
    m = ml_collections.ConfigDict(dict(precision="float32", autoencoder=dict(
        kind="patchify", factor=8, bands=(6, 3), weights="", remat_decoder=False)))
    assert face_system.build_autoencoder(m).token_channels == 33
    del m.autoencoder.bands  # configs from before bands existed (as config.upgrade reads them): pixel tokens
    assert face_system.build_autoencoder(config.upgrade({"model": m.to_dict()}).model).token_channels == 192
    m.autoencoder.kind, m.autoencoder.bands = "vae", (6, 3)
    with pytest.raises(ValueError, match="autoencoder.bands"):
        face_system.build_autoencoder(m)
