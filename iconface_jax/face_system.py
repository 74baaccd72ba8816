"""The restoration system: IConFace model, autoencoder, frozen AdaFace and prompt embeddings, built from a config.

Training and restoration share it: `build(config)` makes it from the `model` section of a training
config (random or converted weights), and its methods encode, decode and embed faces.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from iconface_jax import text, weights
from iconface_jax.models import adaface, flux2, iconface, lora, patchify, vae
from iconface_jax.models.layers import Precision


class FaceSystem(nnx.Module):
    """IConFace model + autoencoder + face encoder + prompt embeddings (prompt, empty) of shape (T, C)."""

    def __init__(self, model: iconface.IConFace, autoencoder, face_encoder: adaface.AdaFace,
                 prompt: jax.Array, empty: jax.Array):
        self.model, self.autoencoder, self.face_encoder = model, autoencoder, face_encoder
        self.codec = codec_of(autoencoder)
        self.prompt, self.empty = nnx.Variable(jnp.asarray(prompt)), nnx.Variable(jnp.asarray(empty))

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (..., H, W, 3) in [-1, 1] -> tokens (..., L, C), leading axes kept."""
        lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
        tokens = self.codec.encode_tokens(self.autoencoder, images.reshape(-1, h, w, 3))
        return tokens.reshape(*lead, *tokens.shape[1:])

    def decode(self, tokens: jax.Array, height: int, width: int) -> jax.Array:
        """Tokens (B, L, C) -> images (B, height, width, 3)."""
        return self.codec.decode_tokens(self.autoencoder, tokens, height, width)

    def embed(self, images: jax.Array) -> jax.Array:
        """Raw AdaFace features z = direction * norm of RGB face images (..., H, W, 3), float32."""
        lead = images.shape[:-3]
        if 0 in lead:  # no references in this batch
            return jnp.zeros((*lead, self.face_encoder.config.embed_dim), jnp.float32)
        direction, norm = adaface.embed_faces(self.face_encoder, images.reshape(-1, *images.shape[-3:]))
        return (direction * norm).reshape(*lead, -1)

    def anchor(self, degraded: jax.Array, references: jax.Array) -> jax.Array:
        """The identity anchor e_id of each sample (norm-weighted references, else the degraded image)."""
        return iconface.identity_anchor(self.embed(references), self.embed(degraded),
                                        self.model.config.id_temperature)


def grid_of(height: int, width: int, tokens: int) -> tuple[int, int]:
    """Token grid (h, w) of an image given its token count."""
    stride = round((height * width / tokens) ** 0.5)
    return height // stride, width // stride


def build(cfg: ml_collections.ConfigDict, place: weights.Placement | None = None) -> FaceSystem:
    """The IConFace model with LoRA, the codec, the frozen face encoder and the prompt embeddings; converted
    weights are restored with the shardings `place(shape)` (the trainer's fsdp shardings), by default on one
    device."""
    m = cfg.model
    precision = Precision.named(m.precision)
    backend = m.attention or None
    if m.weights:
        backbone = flux2.load(m.weights, precision, attention_backend=backend, remat=m.remat, place=place)
    else:
        fields = {k: v for k, v in m.backbone.items() if k != "preset"}
        arch = dataclasses.replace(flux2.PRESETS[m.backbone.preset], **fields)
        backbone = flux2.build(arch, precision, seed=cfg.seed, attention_backend=backend, remat=m.remat,
                                   init=m.init)
    lora.add_lora(backbone, m.lora.rank, m.lora.alpha, lora.preset_targets(m.lora.targets), seed=cfg.seed)
    if m.lora_init:  # a converted adapter (the authors' release) instead of B = 0
        lora.restore(backbone, m.lora_init, m.lora.rank, m.lora.alpha, m.lora.targets)
    model = iconface.IConFace(backbone, iconface.IConFaceConfig(**m.iconface), seed=cfg.seed)

    codec = build_autoencoder(m, place)
    if codec.token_channels != backbone.config.in_channels:
        source = m.weights or "config.model.backbone.in_channels"
        raise ValueError(f"the {m.autoencoder.kind} codec makes {codec.token_channels}-channel tokens but the "
                         f"transformer ({source}) takes {backbone.config.in_channels}")
    f = m.face_encoder
    face = (adaface.load(f.weights, place=place) if f.weights else
            adaface.AdaFace(adaface.AdaFaceConfig(units=f.units, channels=f.channels), rngs=nnx.Rngs(cfg.seed)))
    if m.text.embeddings:
        prompt, empty = text.load_prompt_embeddings(m.text.embeddings)
    else:
        prompt, empty = text.random_prompt_embeddings(m.text.length, backbone.config.joint_attention_dim, cfg.seed)
    return FaceSystem(model, codec, face, prompt, empty)


def build_autoencoder(m: ml_collections.ConfigDict, place: weights.Placement | None = None):
    """The codec of a config's `model` section: the FLUX.2 VAE or the demo's patchify codec (converted weights
    restored with the shardings `place(shape)`)."""
    precision = Precision.named(m.precision)
    if m.autoencoder.kind == "vae" and m.autoencoder.bands:
        raise ValueError("config.model.autoencoder.bands: the DCT band cut is the patchify codec's; the VAE has none")
    if m.autoencoder.kind == "vae" and not m.autoencoder.weights:  # random, as every other part without weights
        config = dataclasses.replace(vae.DEFAULT, remat_decoder=m.autoencoder.remat_decoder)
        return vae.init(config, dtype=precision.dtype, param_dtype=precision.param_dtype)
    if m.autoencoder.kind == "vae":
        return vae.load(m.autoencoder.weights, dtype=precision.dtype, param_dtype=precision.param_dtype,
                        place=place, remat_decoder=m.autoencoder.remat_decoder)
    if m.autoencoder.kind == "patchify":
        return patchify.PatchAutoencoder(m.autoencoder.factor, m.autoencoder.bands)
    raise ValueError(f"config.model.autoencoder.kind {m.autoencoder.kind!r}: expected 'vae' or 'patchify'")


def codec_of(autoencoder):
    """The module whose `encode_tokens` / `decode_tokens` drive `autoencoder`."""
    return patchify if isinstance(autoencoder, patchify.PatchAutoencoder) else vae


def trainable_filter(cfg: ml_collections.ConfigDict):
    """LoRA and side pathways; with `train_base` (training from scratch) every model parameter."""
    return nnx.All(nnx.Param, nnx.PathContains("model")) if cfg.model.train_base else iconface.trainable
