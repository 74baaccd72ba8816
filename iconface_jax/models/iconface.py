"""The IConFace model: the FLUX.2 backbone over [scene; degraded; references] plus two side pathways.

Global identity pathway: an AdaFace anchor e_id -> phi_global -> psi_dbl / psi_sgl deltas of the image
modulations (text untouched). Degraded structure pathway: a low-rank residual from the degraded tokens
into the scene tokens, and a memory of learned-query-pooled degraded tokens (base and detail routes)
that the scene tokens read through a gated low-rank cross-attention after every block. Every side
output map or gate starts at zero, so the untrained model equals the backbone exactly.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from iconface_jax import sequence
from iconface_jax.models import flux2
from iconface_jax.models.attention import attention
from iconface_jax.models.layers import Linear, Precision, layer_norm

# The paper's Table 3 rows: (input residual, identity modulation, memory routes).
VARIANTS = {
    "concat": (False, False, 0),
    "struct": (True, False, 0),
    "id": (True, True, 0),
    "one_route": (True, True, 1),
    "full": (True, True, 2),
}
PREDICTIONS = ("velocity", "clean")
MEMORY_READERS = ("image", "scene")


@dataclasses.dataclass(frozen=True)
class IConFaceConfig:
    """Side-pathway hyper-parameters; the paper's choices where it gives them, ours (docs/decisions.md) elsewhere."""

    variant: str = "full"
    id_dim: int = 512                 # AdaFace embedding size
    id_temperature: float = 1.0       # T in w_r = softmax(log q_r / T)
    residual_rank: int = 16           # rank of W_in
    residual_scale: float = 1.0       # s_deg
    memory_tokens: int = 256          # total over the routes (paper: 256)
    memory_dim: int = 256             # width of the pooled memory tokens
    pool_heads: int = 4
    xattn_rank: int = 64              # width of the low-rank Q_l, K_l, V_l
    xattn_heads: int = 2
    t_scene: int = 0                  # RoPE t ids (docs/design.md#hybrid-sequence)
    t_degraded: int = 2
    t_reference: int = 10
    # Degraded and reference tokens attend only among themselves at sigma 0, so their keys and values are
    # computed once per image (diffusers' Flux2 KV mode). Changes the model: train with it to sample with it.
    reference_cache: bool = False
    # What the network's output is read as: the velocity (FLUX.2's training), or the clean scene tokens x0,
    # turned into the velocity (z - x0) / max(sigma, clean_sigma_floor) so the loss and sampler are unchanged.
    # Clean prediction suits narrow networks on wide pixel-patch tokens (the CPU demo;
    # docs/decisions.md#clean-token-prediction).
    prediction: str = "velocity"
    clean_sigma_floor: float = 0.05
    # Which image tokens read the degraded memory after every block: the paper's "image tokens" (scene,
    # degraded and references; cached tokens read it in the cache pass, as it does not depend on sigma), or
    # the scene tokens alone.
    memory_readers: str = "image"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown IConFace variant {self.variant!r}; expected one of {sorted(VARIANTS)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")
        if self.memory_readers not in MEMORY_READERS:
            raise ValueError(f"unknown memory_readers {self.memory_readers!r}; expected one of {MEMORY_READERS}")

    @property
    def use_residual(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def use_identity(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def memory_routes(self) -> int:
        return VARIANTS[self.variant][2]


@struct.dataclass
class Conditions:
    """`IConFace.condition`'s output: everything a step needs that depends on neither the scene, sigma nor text."""

    residual: jax.Array | None      # s_deg W_in(x_deg), added to the embedded scene tokens
    memory: jax.Array | None        # M_deg, read by the scene tokens after every block
    delta_double: jax.Array | None  # identity deltas of the image modulations
    delta_single: jax.Array | None
    tokens: jax.Array | None        # embedded [degraded; references] (full attention)
    cache: flux2.ReferenceCache | None  # or their keys and values (reference cache)
    grid: tuple[int, int] = struct.field(pytree_node=False)
    degraded_grid: tuple[int, int] = struct.field(pytree_node=False)
    num_refs: int = struct.field(pytree_node=False)


# What the optimizer updates: the backbone's LoRA factors and every side-pathway parameter.
trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("identity"), nnx.PathContains("structure"),
                    nnx.PathContains("memory_xattn"))


def identity_anchor(ref_embeddings: jax.Array, degraded_embedding: jax.Array, temperature: float = 1.0) -> jax.Array:
    """e_id (B, 512): the norm-weighted reference anchor, or the degraded image's direction when R = 0.

    `ref_embeddings` are raw AdaFace features z_r (B, R, 512) (direction times norm); with
    e_r = z_r / ||z_r||, q_r = ||z_r||: w = softmax(log q / T), e_ref = normalize(sum_r w_r e_r).
    """
    def normalize(v):
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    if ref_embeddings.shape[1] == 0:
        return normalize(degraded_embedding.astype(jnp.float32))
    z = ref_embeddings.astype(jnp.float32)
    q = jnp.linalg.norm(z, axis=-1)
    w = jax.nn.softmax(jnp.log(q) / temperature, axis=-1)
    return normalize(jnp.einsum("br,brd->bd", w, z / q[..., None]))


def _zeros_like_linear(layer: Linear) -> Linear:
    layer.kernel.set_value(jnp.zeros_like(layer.kernel[...]))
    return layer


def smooth(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """A 3x3 binomial ([1, 2, 1] / 4 per axis) blur of (B, h*w, C) tokens on their grid, edges replicated."""
    b, _, c = tokens.shape
    x = tokens.reshape(b, *grid, c)
    for axis in (1, 2):
        padded = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                                  jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)], axis=axis)
        n = x.shape[axis]
        x = (jax.lax.slice_in_dim(padded, 0, n, axis=axis) + 2 * jax.lax.slice_in_dim(padded, 1, n + 1, axis=axis)
             + jax.lax.slice_in_dim(padded, 2, n + 2, axis=axis)) / 4
    return x.reshape(b, -1, c)


def resize_tokens(tokens: jax.Array, grid: tuple[int, int], to: tuple[int, int]) -> jax.Array:
    """Bilinear resize of (B, h*w, C) tokens from `grid` to `to` (identity when equal)."""
    if tuple(grid) == tuple(to):
        return tokens
    b, _, c = tokens.shape
    out = jax.image.resize(tokens.reshape(b, *grid, c).astype(jnp.float32), (b, *to, c), "bilinear")
    return out.reshape(b, -1, c).astype(tokens.dtype)


class Pooler(nnx.Module):
    """Learned-query attention pooling of (B, L, D) tokens into (B, N, memory_dim) memory tokens."""

    def __init__(self, dim: int, cfg: IConFaceConfig, num_queries: int, *, precision: Precision, rngs: nnx.Rngs):
        self.heads, self.eps = cfg.pool_heads, 1e-6
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (num_queries, cfg.memory_dim), jnp.float32)
                                 / math.sqrt(cfg.memory_dim))
        self.to_k = Linear(dim, cfg.memory_dim, precision=precision, rngs=rngs)
        self.to_v = Linear(dim, cfg.memory_dim, precision=precision, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = layer_norm(x, self.eps)
        b = x.shape[0]
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
        q = jnp.broadcast_to(self.queries[...].astype(x.dtype), (b, *self.queries.shape))
        out = attention(split(q), split(self.to_k(x)), split(self.to_v(x)), backend="xla")
        return out.reshape(b, -1, out.shape[-2] * out.shape[-1])


class MemoryCrossAttention(nnx.Module):
    """h + gamma * out(Attn(Q h, K M, V M)) with low-rank Q, K, V; gamma starts at zero."""

    def __init__(self, dim: int, cfg: IConFaceConfig, *, precision: Precision, rngs: nnx.Rngs):
        self.heads, self.eps = cfg.xattn_heads, 1e-6
        self.to_q = Linear(dim, cfg.xattn_rank, precision=precision, rngs=rngs)
        self.to_k = Linear(cfg.memory_dim, cfg.xattn_rank, precision=precision, rngs=rngs)
        self.to_v = Linear(cfg.memory_dim, cfg.xattn_rank, precision=precision, rngs=rngs)
        self.to_out = Linear(cfg.xattn_rank, dim, precision=precision, rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, h: jax.Array, memory: jax.Array) -> jax.Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
        out = attention(split(self.to_q(layer_norm(h, self.eps))), split(self.to_k(memory)),
                        split(self.to_v(memory)), backend="xla")
        out = self.to_out(out.reshape(*out.shape[:2], -1))
        return h + (self.gamma[...] * out.astype(jnp.float32)).astype(h.dtype)


class IdentityPathway(nnx.Module):
    """e_id -> h_id = phi_global(e_id) -> (Delta_dbl (B, 6D), Delta_sgl (B, 3D)); psi maps start at zero."""

    def __init__(self, dim: int, cfg: IConFaceConfig, *, precision: Precision, rngs: nnx.Rngs):
        self.phi_global = Linear(cfg.id_dim, dim, precision=precision, rngs=rngs, use_bias=True)
        self.psi_dbl = _zeros_like_linear(Linear(dim, 6 * dim, precision=precision, rngs=rngs))
        self.psi_sgl = _zeros_like_linear(Linear(dim, 3 * dim, precision=precision, rngs=rngs))

    def __call__(self, e_id: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jax.nn.silu(self.phi_global(e_id))
        return self.psi_dbl(h), self.psi_sgl(h)


class StructurePathway(nnx.Module):
    """Low-rank degraded-to-scene residual and the pooled degraded memory (one or two routes)."""

    def __init__(self, dim: int, cfg: IConFaceConfig, *, precision: Precision, rngs: nnx.Rngs):
        self.scale = cfg.residual_scale
        self.w_in_down = Linear(dim, cfg.residual_rank, precision=precision, rngs=rngs) if cfg.use_residual else None
        self.w_in_up = (_zeros_like_linear(Linear(cfg.residual_rank, dim, precision=precision, rngs=rngs))
                        if cfg.use_residual else None)
        routes = cfg.memory_routes
        self.pool_base = (Pooler(dim, cfg, cfg.memory_tokens // max(routes, 1), precision=precision, rngs=rngs)
                          if routes else None)
        self.pool_detail = (Pooler(dim, cfg, cfg.memory_tokens // 2, precision=precision, rngs=rngs)
                            if routes == 2 else None)

    def residual(self, degraded: jax.Array, grid: tuple[int, int], scene_grid: tuple[int, int]) -> jax.Array:
        """s_deg W_in(resize(x_deg)) to add to the embedded scene tokens."""
        resized = resize_tokens(degraded, grid, scene_grid)
        return self.scale * self.w_in_up(self.w_in_down(resized))

    def memory(self, degraded: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """M_deg = [P_b(x_deg); P_d(x_deg - smooth(x_deg))] (one route: P_b(x_deg) alone)."""
        base = self.pool_base(degraded)
        if self.pool_detail is None:
            return base
        return jnp.concatenate([base, self.pool_detail(degraded - smooth(degraded, grid))], axis=1)


class IConFace(nnx.Module):
    """Velocity of the scene tokens given degraded tokens, 0..N reference segments, text and e_id."""

    def __init__(self, backbone: flux2.Flux2Transformer, cfg: IConFaceConfig, *, seed: int = 0):
        self.backbone, self.config = backbone, cfg
        # Side pathways are trained: float32 parameters, the backbone's compute dtype.
        precision = Precision(jnp.float32, backbone.precision.dtype)
        dim, rngs = backbone.config.hidden_size, nnx.Rngs(seed)
        self.identity = IdentityPathway(dim, cfg, precision=precision, rngs=rngs) if cfg.use_identity else None
        self.structure = (StructurePathway(dim, cfg, precision=precision, rngs=rngs)
                          if cfg.use_residual or cfg.memory_routes else None)
        n_blocks = backbone.config.num_layers + backbone.config.num_single_layers
        self.memory_xattn = (nnx.List([MemoryCrossAttention(dim, cfg, precision=precision, rngs=rngs)
                                       for _ in range(n_blocks)]) if cfg.memory_routes else None)

    def condition(self, degraded: jax.Array, references: jax.Array, e_id: jax.Array | None = None, *,
                  grid: tuple[int, int], degraded_grid: tuple[int, int] | None = None) -> Conditions:
        """What every sampling step reuses: side-pathway inputs and the conditioning tokens (or their cache).

        degraded (B, h_d*w_d, C) and references (B, R, h*w, C) latent tokens, R >= 0; e_id (B, id_dim) the
        unit identity anchor (needed by the variants with the identity pathway).
        """
        cfg, bb = self.config, self.backbone
        degraded_grid = degraded_grid or grid
        check_condition_shapes(degraded, references, grid, degraded_grid)
        b, n_deg, n_refs = degraded.shape[0], degraded.shape[1], references.shape[1]
        tokens = bb.x_embedder(jnp.concatenate([degraded, references.reshape(b, -1, references.shape[-1])], axis=1))
        x_deg = tokens[:, :n_deg]
        residual = self.structure.residual(x_deg, degraded_grid, grid) if cfg.use_residual else None
        memory = self.structure.memory(x_deg, degraded_grid) if cfg.memory_routes else None
        delta_double = delta_single = None
        if cfg.use_identity:
            if e_id is None:
                raise ValueError(f"variant {cfg.variant!r} needs the identity anchor e_id")
            delta_double, delta_single = self.identity(e_id)
        cache = None
        if cfg.reference_cache:
            # Clean images at sigma 0, attending only among themselves: one pass, reused at every step.
            c = bb.conditioning(jnp.zeros((b,)), self._conditioning_ids(degraded_grid, grid, n_refs),
                                sequence.text_ids(0))
            read = None
            if memory is not None and cfg.memory_readers == "image":
                read = lambda i, h: self.memory_xattn[i](h, memory)
            _, cache = bb.blocks(tokens, tokens[:, :0], c, delta_double=delta_double, delta_single=delta_single,
                                 after_block=read, keep_cache=True)
            tokens = None
        return Conditions(residual, memory, delta_double, delta_single, tokens, cache,
                          tuple(grid), tuple(degraded_grid), n_refs)

    def velocity(self, scene: jax.Array, text: jax.Array, sigma: jax.Array, cond: Conditions) -> jax.Array:
        """Scene velocity (B, h*w, C) of noisy scene tokens (B, h*w, C) at sigma (B,) in [0, 1], text
        (B, T, joint_dim), given the conditions of `condition`."""
        cfg, bb = self.config, self.backbone
        n_scene = scene.shape[1]
        ids = [sequence.image_ids(cfg.t_scene, *cond.grid)]
        if cond.tokens is not None:  # full attention: the conditioning tokens ride along in the sequence
            ids.append(self._conditioning_ids(cond.degraded_grid, cond.grid, cond.num_refs))
        c = bb.conditioning(sigma, np.concatenate(ids), sequence.text_ids(text.shape[1]))

        img = bb.x_embedder(scene)
        if cond.residual is not None:
            img = img + cond.residual
        if cond.tokens is not None:
            img = jnp.concatenate([img, cond.tokens], axis=1)

        # The memory's readers: the scene tokens, or every image token in the sequence (cached ones read it
        # in the cache pass).
        n_readers = n_scene if cfg.memory_readers == "scene" else img.shape[1]

        def read_memory(block_index, h):
            return h.at[:, :n_readers].set(self.memory_xattn[block_index](h[:, :n_readers], cond.memory))

        # The identity deltas modulate image tokens only; text keeps the shared modulation.
        img, _ = bb.blocks(img, bb.context_embedder(text), c, delta_double=cond.delta_double,
                           delta_single=cond.delta_single, cache=cond.cache,
                           after_block=None if cond.memory is None else read_memory)
        out = bb.head(img[:, :n_scene], c.temb)
        if cfg.prediction == "clean":
            return clean_to_velocity(scene, out, sigma, cfg.clean_sigma_floor)
        return out

    def __call__(self, scene: jax.Array, degraded: jax.Array, references: jax.Array, text: jax.Array,
                 sigma: jax.Array, e_id: jax.Array | None = None, *, grid: tuple[int, int],
                 degraded_grid: tuple[int, int] | None = None, keep_residual: jax.Array | None = None) -> jax.Array:
        """Scene velocity (B, h*w, C): `velocity` under the `condition` of degraded and reference tokens.
        keep_residual (B,) bool, in training: False withholds the structure residual from that sample."""
        cond = self.condition(degraded, references, e_id, grid=grid, degraded_grid=degraded_grid)
        if keep_residual is not None and cond.residual is not None:
            cond = cond.replace(residual=jnp.where(keep_residual[:, None, None], cond.residual, 0))
        return self.velocity(scene, text, sigma, cond)

    def _conditioning_ids(self, degraded_grid: tuple[int, int], grid: tuple[int, int], n_refs: int) -> np.ndarray:
        """RoPE ids of [degraded; reference 0..R-1]."""
        cfg = self.config
        return np.concatenate([sequence.image_ids(cfg.t_degraded, *degraded_grid)]
                              + [sequence.image_ids(cfg.t_reference + r, *grid) for r in range(n_refs)])


def check_condition_shapes(degraded: jax.Array, references: jax.Array, grid: tuple[int, int],
                           degraded_grid: tuple[int, int]) -> None:
    """Names the shapes when degraded (B, h_d*w_d, C) or references (B, R, h*w, C) do not fit the grids."""
    b, c = degraded.shape[0], degraded.shape[-1]
    if degraded.ndim != 3 or degraded.shape[1] != degraded_grid[0] * degraded_grid[1]:
        raise ValueError(f"degraded tokens of shape {degraded.shape}; expected (B, {degraded_grid[0]}*"
                         f"{degraded_grid[1]}, C) for the degraded grid {degraded_grid}")
    want = (b, references.shape[1] if references.ndim == 4 else "R", grid[0] * grid[1], c)
    if references.ndim != 4 or references.shape != want:
        raise ValueError(f"reference tokens of shape {references.shape}; expected (B, R, h*w, C) = {want} "
                         f"for the grid {grid} and degraded tokens {degraded.shape}")


def clean_to_velocity(scene: jax.Array, clean: jax.Array, sigma: jax.Array, floor: float) -> jax.Array:
    """The velocity (z - x0) / max(sigma, floor) of a clean-token prediction x0 (JiT's x-prediction)."""
    s = jnp.maximum(sigma.astype(jnp.float32), floor).reshape(-1, *([1] * (scene.ndim - 1)))
    return ((scene.astype(jnp.float32) - clean.astype(jnp.float32)) / s).astype(clean.dtype)
