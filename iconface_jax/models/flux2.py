"""The FLUX.2 flow-matching transformer (diffusers' `Flux2Transformer2DModel`) as Flax NNX modules.

Attribute names mirror diffusers' module names (`transformer_blocks.0.attn.to_out.0`), so a parameter's
dotted path is its diffusers key with `weight` renamed `kernel` (Linear, stored (in, out)) or `scale`
(RMSNorm). The forward pass is split into `conditioning`, the blocks and `head` so that the IConFace model
can run the same pieces with its side pathways in between.

Reference-token cache (diffusers' Flux2 KV mode): tokens of clean conditioning images attend only among
themselves at a fixed timestep, so their keys and values do not change from one sampling step to the next.
`cache_references` runs them through the blocks once and keeps each block's keys and values; a forward
with `cache=` appends them to its own keys and values instead of carrying those tokens in the sequence.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iconface_jax import weights
from iconface_jax.models.attention import attention
from iconface_jax.models.layers import REMAT_POLICIES, Linear, Precision, RMSNorm, checkpointed, layer_norm

FAMILY = "flux2"


@dataclasses.dataclass(frozen=True)
class Flux2Config:
    """Architecture hyper-parameters, named as diffusers' `Flux2Transformer2DModel` config."""

    in_channels: int = 128
    num_layers: int = 5
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = False

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


PRESETS = {
    "klein-base-4b": Flux2Config(),
    "klein-9b": Flux2Config(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
    "dev": Flux2Config(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                       guidance_embeds=True),
    "tiny": Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                        axes_dims_rope=(4, 4, 4, 4)),
}

# A modulation applied per segment of the sequence: ((token count, (B, k*D) modulation), ...) in order.
# The backbone uses one segment; IConFace gives image tokens their own (identity deltas).
Segments = Sequence[tuple[int, jax.Array]]
KeysValues = tuple[jax.Array, jax.Array]


class ReferenceCache(NamedTuple):
    """Keys and values (B, L_ref, H, head_dim), after norm and RoPE, of cached tokens in every block."""

    double: tuple[KeysValues, ...]
    single: tuple[KeysValues, ...]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, [cos | sin] (diffusers' `Timesteps` with flip_sin_to_cos, shift 0), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_tables(ids: jax.Array | np.ndarray, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (L, head_dim // 2) of the 4-axis RoPE over position ids (L, n_axes).

    Concrete ids (the usual case: they depend on shapes only) are computed in float64 on the host, as
    diffusers does; angles reach hundreds of radians, where float32 rounding alone costs ~3e-5.
    """
    if isinstance(ids, jax.core.Tracer):
        xp, pos = jnp, ids.astype(jnp.float32)
    else:
        xp, pos = np, np.asarray(ids, dtype=np.float64)
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (xp.arange(0, dim, 2, dtype=pos.dtype) / dim))
        angles.append(pos[:, axis:axis + 1] * freqs[None, :])
    angles = xp.concatenate(angles, axis=-1)
    return jnp.asarray(xp.cos(angles), jnp.float32), jnp.asarray(xp.sin(angles), jnp.float32)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates interleaved channel pairs (x0, x1) of (B, L, H, D) by the angles in `rope`, in float32."""
    cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _chunks(mod: jax.Array, n: int) -> list[jax.Array]:
    """Splits a (B, n*D) modulation into n (B, 1, D) pieces (shift, scale, gate, ...)."""
    return [m[:, None, :] for m in jnp.split(mod, n, axis=-1)]


def _by_segment(x: jax.Array, segments: Segments, fn) -> jax.Array:
    """Applies fn(x_segment, modulation) to each segment of the sequence axis."""
    if len(segments) == 1:
        return fn(x, segments[0][1])
    cuts = np.cumsum([n for n, _ in segments])[:-1].tolist()
    return jnp.concatenate([fn(p, m) for p, (_, m) in zip(jnp.split(x, cuts, axis=1), segments)], axis=1)


def _with_cached(k: jax.Array, v: jax.Array, cached: KeysValues | None) -> KeysValues:
    """Keys and values with a cache's appended (softmax does not care where keys sit in the sequence)."""
    if cached is None:
        return k, v
    return (jnp.concatenate([k, cached[0].astype(k.dtype)], axis=1),
            jnp.concatenate([v, cached[1].astype(v.dtype)], axis=1))


def _with_delta(mod: jax.Array, delta: jax.Array | None) -> jax.Array:
    """A shared modulation plus a per-sample delta (in the modulation's dtype), or the modulation alone."""
    return mod if delta is None else mod + delta.astype(mod.dtype)


def _as_segments(mod: jax.Array | Segments, length: int) -> Segments:
    return ((length, mod),) if isinstance(mod, jax.Array) else mod


def _modulated_norm(x: jax.Array, mod: Segments, stage: int, sets: int, eps: float) -> jax.Array:
    """LayerNorm(x) * (1 + scale) + shift with stage `stage` of a `sets`-set modulation."""
    def fn(y, m):
        shift, scale = _chunks(m, 3 * sets)[3 * stage:3 * stage + 2]
        return layer_norm(y, eps) * (1 + scale) + shift
    return _by_segment(x, mod, fn)


def _gated(y: jax.Array, mod: Segments, stage: int, sets: int) -> jax.Array:
    """gate * y with the gate of stage `stage`."""
    return _by_segment(y, mod, lambda v, m: _chunks(m, 3 * sets)[3 * stage + 2] * v)


class TimestepEmbedding(nnx.Module):
    """linear_2(silu(linear_1(x))): diffusers' `TimestepEmbedding` without biases."""

    def __init__(self, in_dim: int, dim: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, dim, precision=precision, rngs=rngs)
        self.linear_2 = Linear(dim, dim, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nnx.Module):
    """The conditioning vector temb from the timestep (and the guidance scale on guidance-distilled models)."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision, rngs: nnx.Rngs):
        self.channels = cfg.timestep_guidance_channels
        self.timestep_embedder = TimestepEmbedding(self.channels, cfg.hidden_size, precision=precision, rngs=rngs)
        self.guidance_embedder = (TimestepEmbedding(self.channels, cfg.hidden_size, precision=precision, rngs=rngs)
                                  if cfg.guidance_embeds else None)

    def __call__(self, timestep: jax.Array, guidance: jax.Array | None) -> jax.Array:
        temb = self.timestep_embedder(timestep_embedding(timestep, self.channels))
        if guidance is not None and self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, self.channels))
        return temb


class Modulation(nnx.Module):
    """linear(silu(temb)) -> sets x (shift, scale, gate); shared by all blocks of one kind."""

    def __init__(self, dim: int, sets: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear = Linear(dim, dim * 3 * sets, precision=precision, rngs=rngs)

    def __call__(self, temb: jax.Array) -> jax.Array:
        return self.linear(jax.nn.silu(temb))


class FeedForward(nnx.Module):
    """SwiGLU MLP with the gate fused into the first linear: linear_out(silu(a) * b), [a | b] = linear_in(x)."""

    def __init__(self, dim: int, hidden: int, *, precision: Precision, rngs: nnx.Rngs):
        self.linear_in = Linear(dim, 2 * hidden, precision=precision, rngs=rngs)
        self.linear_out = Linear(hidden, dim, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(jax.nn.silu(a) * b)


class Attention(nnx.Module):
    """Joint attention of the double-stream block: separate image and text projections, one softmax."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision, rngs: nnx.Rngs, backend: str | None):
        d, hd = cfg.hidden_size, cfg.attention_head_dim
        self.head_dim, self.backend = hd, backend

        def linear(): return Linear(d, d, precision=precision, rngs=rngs)
        def norm(): return RMSNorm(hd, eps=cfg.eps, precision=precision)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nnx.List([linear()])  # a list, as in diffusers, so the key reads `to_out.0`
        self.add_q_proj, self.add_k_proj, self.add_v_proj = linear(), linear(), linear()
        self.norm_added_q, self.norm_added_k = norm(), norm()
        self.to_add_out = linear()

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)  # (no -1: text may be empty)

    def __call__(self, img: jax.Array, txt: jax.Array, rope,
                 cached: KeysValues | None = None) -> tuple[jax.Array, jax.Array, KeysValues]:
        """Image and text outputs, and the image tokens' keys and values (what a cache keeps)."""
        q = jnp.concatenate([self.norm_added_q(self._heads(self.add_q_proj(txt))),
                             self.norm_q(self._heads(self.to_q(img)))], axis=1)
        k = jnp.concatenate([self.norm_added_k(self._heads(self.add_k_proj(txt))),
                             self.norm_k(self._heads(self.to_k(img)))], axis=1)
        v = jnp.concatenate([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], axis=1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        n_txt = txt.shape[1]
        out = attention(q, *_with_cached(k, v, cached), backend=self.backend)
        out = out.reshape(*out.shape[:2], -1)
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt]), (k[:, n_txt:], v[:, n_txt:])


class TransformerBlock(nnx.Module):
    """Double-stream block: image and text keep their own weights and modulations, attend jointly."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision, rngs: nnx.Rngs, backend: str | None):
        self.eps = cfg.eps
        self.attn = Attention(cfg, precision=precision, rngs=rngs, backend=backend)
        self.ff = FeedForward(cfg.hidden_size, cfg.mlp_hidden, precision=precision, rngs=rngs)
        self.ff_context = FeedForward(cfg.hidden_size, cfg.mlp_hidden, precision=precision, rngs=rngs)

    def __call__(self, img: jax.Array, txt: jax.Array, img_mod: jax.Array | Segments,
                 txt_mod: jax.Array | Segments, rope,
                 cached: KeysValues | None = None) -> tuple[jax.Array, jax.Array, KeysValues]:
        """One block; the modulations are (B, 6D) outputs of the shared heads, or per-segment ones.

        Returns the new image and text tokens and the image tokens' keys and values.
        """
        img_mod, txt_mod = _as_segments(img_mod, img.shape[1]), _as_segments(txt_mod, txt.shape[1])
        img_attn, txt_attn, kv = self.attn(_modulated_norm(img, img_mod, 0, 2, self.eps),
                                           _modulated_norm(txt, txt_mod, 0, 2, self.eps), rope, cached)
        return (self._rest(img, img_attn, img_mod, self.ff), self._rest(txt, txt_attn, txt_mod, self.ff_context),
                kv)

    def _rest(self, x, attn_out, mod, ff):
        """Gated attention residual, then the gated MLP residual, for one stream."""
        x = x + _gated(attn_out, mod, 0, 2)
        return x + _gated(ff(_modulated_norm(x, mod, 1, 2, self.eps)), mod, 1, 2)


class ParallelSelfAttention(nnx.Module):
    """Single-stream attention with the MLP in parallel: one fused qkv+MLP input map, one fused output map."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision, rngs: nnx.Rngs, backend: str | None):
        d, self.mlp_hidden = cfg.hidden_size, cfg.mlp_hidden
        self.head_dim, self.backend = cfg.attention_head_dim, backend
        self.to_qkv_mlp_proj = Linear(d, 3 * d + 2 * self.mlp_hidden, precision=precision, rngs=rngs)
        self.norm_q = RMSNorm(self.head_dim, eps=cfg.eps, precision=precision)
        self.norm_k = RMSNorm(self.head_dim, eps=cfg.eps, precision=precision)
        self.to_out = Linear(d + self.mlp_hidden, d, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array, rope, cached: KeysValues | None = None) -> tuple[jax.Array, KeysValues]:
        """The block's residual branch, and the tokens' keys and values."""
        d = x.shape[-1]
        h = self.to_qkv_mlp_proj(x)
        q, k, v, gate, up = jnp.split(h, [d, 2 * d, 3 * d, 3 * d + self.mlp_hidden], axis=-1)
        heads = lambda y: y.reshape(*y.shape[:-1], -1, self.head_dim)
        q, k, v = apply_rope(self.norm_q(heads(q)), rope), apply_rope(self.norm_k(heads(k)), rope), heads(v)
        out = attention(q, *_with_cached(k, v, cached), backend=self.backend)
        out = self.to_out(jnp.concatenate([out.reshape(*out.shape[:2], -1), jax.nn.silu(gate) * up], axis=-1))
        return out, (k, v)


class SingleTransformerBlock(nnx.Module):
    """Single-stream block over the joint [text; image] sequence."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision, rngs: nnx.Rngs, backend: str | None):
        self.eps = cfg.eps
        self.attn = ParallelSelfAttention(cfg, precision=precision, rngs=rngs, backend=backend)

    def __call__(self, x: jax.Array, mod: jax.Array | Segments, rope,
                 cached: KeysValues | None = None) -> tuple[jax.Array, KeysValues]:
        """One block; `mod` is the (B, 3D) single-stream modulation, or per-segment modulations.

        Returns the new tokens and their keys and values.
        """
        mod = _as_segments(mod, x.shape[1])
        out, kv = self.attn(_modulated_norm(x, mod, 0, 1, self.eps), rope, cached)
        return x + _gated(out, mod, 0, 1), kv


class NormOut(nnx.Module):
    """diffusers' `AdaLayerNormContinuous`: LayerNorm, then (1 + scale) and shift from linear(silu(temb))."""

    def __init__(self, dim: int, *, eps: float, precision: Precision, rngs: nnx.Rngs):
        self.eps = eps
        self.linear = Linear(dim, 2 * dim, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale, shift = _chunks(self.linear(jax.nn.silu(temb)), 2)
        return layer_norm(x, self.eps) * (1 + scale) + shift


@dataclasses.dataclass
class Conditioning:
    """What every block reads besides the tokens: temb, the three shared modulations and the RoPE tables."""

    temb: jax.Array
    mod_img: jax.Array
    mod_txt: jax.Array
    mod_single: jax.Array
    rope: tuple[jax.Array, jax.Array]


class Flux2Transformer(nnx.Module):
    """FLUX.2 transformer: `model(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids)`."""

    def __init__(self, cfg: Flux2Config, *, precision: Precision = Precision(), rngs: nnx.Rngs,
                 attention_backend: str | None = None, remat: str = "none"):
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim "
                             f"{cfg.attention_head_dim}")
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; expected 'none' or one of {sorted(REMAT_POLICIES)}")
        self.config, self.precision, self.remat = cfg, precision, remat
        d = cfg.hidden_size
        kw = dict(precision=precision, rngs=rngs)
        self.time_guidance_embed = TimeGuidanceEmbed(cfg, **kw)
        self.double_stream_modulation_img = Modulation(d, 2, **kw)
        self.double_stream_modulation_txt = Modulation(d, 2, **kw)
        self.single_stream_modulation = Modulation(d, 1, **kw)
        self.x_embedder = Linear(cfg.in_channels, d, **kw)
        self.context_embedder = Linear(cfg.joint_attention_dim, d, **kw)
        self.transformer_blocks = nnx.List(
            [TransformerBlock(cfg, backend=attention_backend, **kw) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List(
            [SingleTransformerBlock(cfg, backend=attention_backend, **kw) for _ in range(cfg.num_single_layers)])
        self.norm_out = NormOut(d, eps=cfg.eps, **kw)
        self.proj_out = Linear(d, cfg.in_channels, **kw)

    def conditioning(self, timestep: jax.Array, img_ids, txt_ids, guidance: jax.Array | None = None) -> Conditioning:
        """temb from timestep in [0, 1] (scaled by 1000 as diffusers does), modulations and RoPE for [text; image]."""
        dtype = self.precision.dtype
        temb = self.time_guidance_embed(jnp.asarray(timestep, dtype) * 1000,
                                        None if guidance is None else jnp.asarray(guidance, dtype) * 1000)
        ids = [i[0] if i.ndim == 3 else i for i in (txt_ids, img_ids)]
        xp = jnp if any(isinstance(i, jax.core.Tracer) for i in ids) else np
        rope = rope_tables(xp.concatenate(ids, axis=0), self.config.axes_dims_rope, self.config.rope_theta)
        return Conditioning(temb, self.double_stream_modulation_img(temb), self.double_stream_modulation_txt(temb),
                            self.single_stream_modulation(temb), rope)

    def head(self, img: jax.Array, temb: jax.Array) -> jax.Array:
        """Output norm and projection of the image tokens back to latent channels."""
        return self.proj_out(self.norm_out(img, temb))

    def blocks(self, img: jax.Array, txt: jax.Array, c: Conditioning, *, delta_double: jax.Array | None = None,
               delta_single: jax.Array | None = None, cache: ReferenceCache | None = None,
               after_block: Callable[[int, jax.Array], jax.Array] | None = None,
               keep_cache: bool = False) -> tuple[jax.Array, ReferenceCache | None]:
        """Runs embedded image (B, L_img, D) and text (B, L_txt, D) tokens through every block: the double-stream
        blocks, then the single-stream ones over [text; image]. The one block loop of every forward pass.

        delta_double (B, 6D) and delta_single (B, 3D) are added to the image tokens' modulations (text keeps the
        shared ones); `cache` holds keys and values every token also attends to; `after_block(i, img)` transforms
        the image tokens after block i (double blocks first); `keep_cache` also returns every block's keys and
        values of the image tokens. Returns the image tokens and that cache (or None).
        """
        n_txt, n_img = txt.shape[1], img.shape[1]
        mod_img = _with_delta(c.mod_img, delta_double)
        mod_single = _with_delta(c.mod_single, delta_single)
        if delta_single is not None and n_txt:
            mod_single = ((n_txt, c.mod_single), (n_img, mod_single))
        double, single = [], []
        for i, block in enumerate(self.transformer_blocks):
            img, txt, kv = self._run(block, img, txt, mod_img, c.mod_txt, c.rope,
                                     None if cache is None else cache.double[i])
            img = img if after_block is None else after_block(i, img)
            double.append(kv)
        x = jnp.concatenate([txt, img], axis=1) if n_txt else img
        for i, block in enumerate(self.single_transformer_blocks):
            x, (k, v) = self._run(block, x, mod_single, c.rope, None if cache is None else cache.single[i])
            if after_block is not None:
                j = len(double) + i
                x = x.at[:, n_txt:].set(after_block(j, x[:, n_txt:])) if n_txt else after_block(j, x)
            if keep_cache:
                single.append((k[:, n_txt:], v[:, n_txt:]))
        return x[:, n_txt:], ReferenceCache(tuple(double), tuple(single)) if keep_cache else None

    def _run(self, block: nnx.Module, *args):
        """`block(*args)`, rematerialised in the backward pass under the model's remat policy."""
        return block(*args) if self.remat == "none" else checkpointed(block, *args, policy=self.remat)

    def cache_references(self, hidden_states: jax.Array, img_ids, timestep: float | jax.Array = 0.0,
                         guidance: jax.Array | None = None) -> ReferenceCache:
        """The cache of reference tokens (B, L_ref, in_channels) with ids (L_ref, 4) at a fixed timestep
        (diffusers' `kv_cache_mode="extract"` with `ref_fixed_timestep`)."""
        b = hidden_states.shape[0]
        c = self.conditioning(jnp.full((b,), timestep), img_ids, np.zeros((0, 4), np.int32), guidance)
        tokens = self.x_embedder(hidden_states)
        return self.blocks(tokens, tokens[:, :0], c, keep_cache=True)[1]

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, timestep: jax.Array,
                 img_ids, txt_ids, guidance: jax.Array | None = None, cache: ReferenceCache | None = None) -> jax.Array:
        """Velocity for image tokens (B, L_img, in_channels); same arguments as diffusers' forward, and an
        optional reference cache whose tokens every token attends to (diffusers' `kv_cache_mode="cached"`)."""
        c = self.conditioning(timestep, img_ids, txt_ids, guidance)
        img, _ = self.blocks(self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states), c,
                             cache=cache)
        return self.head(img, c.temb)


def count_params(cfg: Flux2Config) -> int:
    """Parameter count from abstract shapes (no memory allocated)."""
    model = nnx.eval_shape(lambda: Flux2Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.get_value().shape)) for v in weights.base_params(model).values())


INITS = ("torch", "adaln_zero")


def build(cfg: Flux2Config, precision: Precision = Precision(), seed: int = 0,
          attention_backend: str | None = None, remat: str = "none", init: str = "torch") -> Flux2Transformer:
    """A randomly initialised transformer (benchmarks, tests, training from scratch).

    init "torch": every Linear as torch.nn.Linear (random models behave like diffusers'); "adaln_zero": then
    DiT's adaLN-Zero for training from scratch (Peebles and Xie 2023, sec. 3.2): the shared modulations, the
    output norm's modulation and the output projection start at zero, so every block starts as the identity
    and the model's output at 0.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    model = Flux2Transformer(cfg, precision=precision, rngs=nnx.Rngs(seed), attention_backend=attention_backend,
                             remat=remat)
    if init == "adaln_zero":
        for layer in (model.double_stream_modulation_img.linear, model.double_stream_modulation_txt.linear,
                      model.single_stream_modulation.linear, model.norm_out.linear, model.proj_out):
            layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
    return model


def load(path: str, precision: Precision = Precision(), attention_backend: str | None = None,
         remat: str = "none", place: weights.Placement | None = None) -> Flux2Transformer:
    """A ready transformer from a directory written by `python -m convert.flux2`; `place(shape)` is each
    weight's sharding (`weights.restore`)."""
    stored = weights.read_config(path, FAMILY)
    cfg = Flux2Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    model = nnx.eval_shape(lambda: Flux2Transformer(cfg, precision=precision, rngs=nnx.Rngs(0),
                                                    attention_backend=attention_backend, remat=remat))
    return weights.restore(model, path, place=place)
