"""The FLUX.2 VAE (`diffusers.AutoencoderKLFlux2`) as Flax NNX modules, and its token interface.

Attribute names mirror the diffusers modules, so a parameter's dotted path is the torch key with
`weight` renamed `kernel` (convolutions, linears) or `scale` (group norms): torch
`encoder.down_blocks.0.resnets.0.conv1.weight` is `encoder.down_blocks.0.resnets.0.conv1.kernel`
here. Images are NHWC in [-1, 1]; latents are NHWC. Convolution kernels are HWIO, linear kernels
(in, out). Group-norm statistics and the attention softmax run in float32 whatever `dtype` is.

The transformer sees an image as tokens, exactly as `Flux2KleinPipeline` makes them: posterior mean,
2x2 patchify (32 -> 128 channels), normalisation by the VAE's BatchNorm running statistics, and
packing to (B, h * w, 128); `encode_tokens` and `decode_tokens` are that path and its inverse.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from iconface_jax import weights
from iconface_jax.models.layers import checkpointed

FAMILY = "flux2_vae"
Dtype = Any


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of `AutoencoderKLFlux2`; the defaults are the FLUX.2 VAE (84,046,115 parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: same as block_out_channels
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)
    remat_decoder: bool = False  # nnx.remat around each decoder block (decoding with gradients)

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's block channels, highest resolution first (as `block_out_channels`)."""
        return tuple(self.decoder_block_out_channels or self.block_out_channels)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def token_channels(self) -> int:
        """Channels of one packed token: latent channels times the patch area (128 for FLUX.2)."""
        return self.latent_channels * math.prod(self.patch_size)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """A config from a JSON-style dict (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAE config fields {unknown}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


DEFAULT = VAEConfig()
TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
CONFIGS = {"flux2": DEFAULT, "tiny": TINY}


class GroupNorm(nnx.Module):
    """`torch.nn.GroupNorm` over the last (channel) axis, statistics in float32."""

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-6, *,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, g = x.shape, self.num_groups
        x = x.astype(jnp.float32).reshape(*shape[:-1], g, shape[-1] // g)
        axes = tuple(range(1, x.ndim - 2)) + (x.ndim - 1,)  # spatial axes and channels within a group
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def _conv(cin: int, cout: int, k: int, stride: int = 1, padding: Any = "SAME", *, dtype: Dtype,
          param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A `torch.nn.Conv2d`-like convolution with bias (kernel HWIO)."""
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` without time embedding: norm-silu-conv twice plus a (1x1) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(cin, groups, **kw)
        self.conv1 = _conv(cin, cout, 3, **kw, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups, **kw)
        self.conv2 = _conv(cout, cout, 3, **kw, rngs=rngs)
        self.conv_shortcut = _conv(cin, cout, 1, **kw, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """The VAE's single-head spatial self-attention (diffusers `Attention` with group norm and residual)."""

    def __init__(self, channels: int, groups: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(channels, groups, dtype=dtype, param_dtype=param_dtype)
        self.to_q = nnx.Linear(channels, channels, **kw)
        self.to_k = nnx.Linear(channels, channels, **kw)
        self.to_v = nnx.Linear(channels, channels, **kw)
        self.to_out = nnx.List([nnx.Linear(channels, channels, **kw)])
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        y = jnp.einsum("bqk,bkc->bqc", probs, v)
        return x + self.to_out[0](y).reshape(b, h, w, c)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 convolution after zero padding of one row and column at the bottom and right."""

    def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, 2, ((0, 1), (0, 1)), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    """`layers` resnets, then an optional downsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)]) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`layers` resnets, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool, *, dtype: Dtype,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, attention, resnet (the attention optional)."""

    def __init__(self, channels: int, groups: int, attention: bool, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attentions = nnx.List([Attention(channels, groups, **kw) if attention else None])
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    """Image (B, H, W, 3) -> posterior moments (B, H/8, W/8, 2 * latent_channels)."""

    def __init__(self, config: VAEConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chs, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv(config.in_channels, chs[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(chs[max(i - 1, 0)], c, config.layers_per_block, g, i < len(chs) - 1, **kw)
            for i, c in enumerate(chs)])
        self.mid_block = UNetMidBlock2D(chs[-1], g, config.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(chs[-1], g, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = _conv(chs[-1], 2 * config.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> image (B, 8h, 8w, 3); blocks optionally rematerialised."""

    def __init__(self, config: VAEConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chs, g = config.decoder_channels[::-1], config.norm_num_groups
        self.remat = config.remat_decoder
        self.conv_in = _conv(config.latent_channels, chs[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(chs[0], g, config.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(chs[max(i - 1, 0)], c, config.layers_per_block + 1, g, i < len(chs) - 1, **kw)
            for i, c in enumerate(chs)])
        self.conv_norm_out = GroupNorm(chs[-1], g, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = _conv(chs[-1], config.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        call = checkpointed if self.remat else (lambda block, x: block(x))  # keeps block inputs only
        x = call(self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            x = call(block, x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class BatchNormStats(nnx.Module):
    """The running statistics of the VAE's affine-free BatchNorm, used only to normalise latents."""

    def __init__(self, channels: int):
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))


class AutoencoderKLFlux2(nnx.Module):
    """The FLUX.2 VAE: `encode` images to posterior means, `decode` latents to images (both NHWC)."""

    def __init__(self, config: VAEConfig = DEFAULT, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lc = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, **kw) if config.use_post_quant_conv else None
        self.bn = BatchNormStats(config.token_channels)

    @property
    def token_channels(self) -> int:
        """Channels of one packed token (128 for FLUX.2), as on the demo's patchify codec."""
        return self.config.token_channels

    def moments(self, images: jax.Array) -> jax.Array:
        """Posterior mean and log-variance, concatenated on the channel axis: (B, H/8, W/8, 2 * latent)."""
        h = self.encoder(images.astype(self.dtype))
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [-1, 1] -> posterior mode (= mean) latents (B, H/8, W/8, latent)."""
        return self.moments(images)[..., : self.config.latent_channels]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent) -> images (B, 8h, 8w, 3), nominally in [-1, 1]."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def init(config: VAEConfig = DEFAULT, *, seed: int = 0, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> AutoencoderKLFlux2:
    """A randomly initialised VAE (tests, demos)."""
    return AutoencoderKLFlux2(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract(config: VAEConfig = DEFAULT, *, dtype: Dtype = jnp.float32,
             param_dtype: Dtype = jnp.float32) -> AutoencoderKLFlux2:
    """The model with `jax.ShapeDtypeStruct`s in place of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: AutoencoderKLFlux2(config, dtype=dtype, param_dtype=param_dtype,
                                                     rngs=nnx.Rngs(0)))


def param_count(config: VAEConfig = DEFAULT, prefix: str = "") -> int:
    """Number of parameters (BatchNorm running statistics excluded) under `prefix`, from abstract shapes."""
    params = weights.named_params(abstract(config), nnx.Param)
    return sum(math.prod(v.get_value().shape) for k, v in params.items() if k.startswith(prefix))


def load(src: str, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         place: weights.Placement | None = None, **overrides: Any) -> AutoencoderKLFlux2:
    """The VAE stored in the converted directory `src`; `overrides` replace config fields (`remat_decoder`);
    `place(shape)` is each weight's sharding (`weights.restore`)."""
    config = dataclasses.replace(VAEConfig.from_dict(weights.read_config(src, FAMILY)), **overrides)
    model = abstract(config, dtype=dtype, param_dtype=param_dtype)
    return weights.restore(model, src, kinds=(nnx.Param, nnx.BatchStat), place=place)


def patchify(latents: jax.Array, patch: tuple[int, int] = (2, 2)) -> jax.Array:
    """(B, H, W, C) -> (B, H/ph, W/pw, C*ph*pw), channel index c*ph*pw + i*pw + j (`_patchify_latents`)."""
    b, h, w, c = latents.shape
    ph, pw = patch
    x = latents.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // ph, w // pw, c * ph * pw)


def unpatchify(x: jax.Array, patch: tuple[int, int] = (2, 2)) -> jax.Array:
    """The inverse of `patchify` (`_unpatchify_latents`)."""
    b, h, w, cp = x.shape
    ph, pw = patch
    x = x.reshape(b, h, w, cp // (ph * pw), ph, pw).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * ph, w * pw, cp // (ph * pw))


def pack(x: jax.Array) -> jax.Array:
    """(B, h, w, C) -> tokens (B, h * w, C) in row-major order (`_pack_latents`)."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Tokens (B, h * w, C) -> (B, h, w, C) (`_unpack_latents_with_ids` with the standard grid ids)."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    return tokens.reshape(b, h, w, c)


def normalize(model: AutoencoderKLFlux2, x: jax.Array) -> jax.Array:
    """Patchified latents -> (x - running_mean) / sqrt(running_var + eps), in float32."""
    mean, var = model.bn.running_mean[...], model.bn.running_var[...]
    return (x.astype(jnp.float32) - mean) / jnp.sqrt(var + model.config.batch_norm_eps)


def denormalize(model: AutoencoderKLFlux2, x: jax.Array) -> jax.Array:
    """The inverse of `normalize`: x * sqrt(running_var + eps) + running_mean, in float32."""
    mean, var = model.bn.running_mean[...], model.bn.running_var[...]
    return x.astype(jnp.float32) * jnp.sqrt(var + model.config.batch_norm_eps) + mean


def token_grid(config: VAEConfig, height: int, width: int) -> tuple[int, int]:
    """Token grid (h, w) of an image of `height` x `width` pixels (32 x 32 at 512 x 512)."""
    step = (config.scale_factor * config.patch_size[0], config.scale_factor * config.patch_size[1])
    if height % step[0] or width % step[1]:
        raise ValueError(f"image size {height}x{width} is not a multiple of {step[0]}x{step[1]}")
    return height // step[0], width // step[1]


def encode_tokens(model: AutoencoderKLFlux2, images: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> normalised packed tokens (B, H/16 * W/16, 128), float32."""
    token_grid(model.config, images.shape[1], images.shape[2])
    x = patchify(model.encode(images), model.config.patch_size)
    return pack(normalize(model, x))


def decode_tokens(model: AutoencoderKLFlux2, tokens: jax.Array, height: int, width: int) -> jax.Array:
    """Normalised packed tokens (B, L, 128) of a `height` x `width` image -> images (B, height, width, 3)."""
    h, w = token_grid(model.config, height, width)
    x = denormalize(model, unpack(tokens, h, w))
    return model.decode(unpatchify(x, model.config.patch_size))
