"""Multi-head attention behind one function with backends: cuDNN flash (GPU), Pallas splash (TPU), XLA.

All backends take q, k, v as (batch, length, heads, head_dim) and an optional key mask (batch, kv_len)
that is True where a key may be attended to; softmax statistics are float32 in every backend.
cuDNN takes only 16- and 8-bit floats: other dtypes take the XLA path. Splash is a Mosaic kernel, which
XLA cannot partition: under a mesh (`jax.set_mesh` / `use_abstract_mesh`) it runs per chip in a
`shard_map` over the mesh axes that split the batch, heads and sequence whole on each chip.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

BACKENDS = ("xla", "cudnn", "splash")
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2)  # fused_attention_stablehlo's
BATCH_AXES = ("data", "fsdp")  # sharding.BATCH_AXES (not imported: models do not depend on the trainer)
SPLASH_BLOCK = 128  # splash's default block sizes


def default_backend() -> str:
    """The fastest backend for the platform JAX runs on."""
    platform = jax.default_backend()
    return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None,
              backend: str | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, L, H, D) inputs; returns (B, Lq, H, D) in q's dtype."""
    backend = backend or default_backend()
    if backend == "cudnn" and q.dtype not in CUDNN_DTYPES:
        backend = "xla"  # cuDNN raises NotImplementedError on float32: a float32 run on a GPU takes XLA
    if backend == "xla":
        return _xla(q, k, v, key_mask)
    if backend == "cudnn":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if backend == "splash":
        return _splash_sharded(q, k, v, key_mask)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _xla(q, k, v, key_mask):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _splash_sharded(q, k, v, key_mask):
    """Splash per chip over the context mesh's batch axes (whole on every chip where they do not divide B)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes:
        return _splash(q, k, v, key_mask)
    spec = P(axes) if q.shape[0] % int(np.prod([mesh.shape[a] for a in axes])) == 0 else P()
    args = (q, k, v) + (() if key_mask is None else (key_mask,))
    per_chip = lambda q, k, v, mask=None: _splash(q, k, v, mask)
    return jax.shard_map(per_chip, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _splash(q, k, v, key_mask):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, lq, heads, dim = q.shape
    lk = k.shape[1]
    # Splash's blocks (128) must divide both lengths: pad them, mask the padded keys, drop the padded queries.
    pad_q, pad_k = -lq % SPLASH_BLOCK, -lk % SPLASH_BLOCK
    if pad_k:
        key_mask = jnp.ones((b, lk), bool) if key_mask is None else key_mask
        key_mask = jnp.pad(key_mask, ((0, 0), (0, pad_k)))
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    q, k, v = pad(q, pad_q), pad(k, pad_k), pad(v, pad_k)
    mask = sm.MultiHeadMask([sm.FullMask((lq + pad_q, lk + pad_k)) for _ in range(heads)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
    # splash takes (heads, length, dim) per example and does not scale q.
    q = (q / math.sqrt(dim)).astype(q.dtype).transpose(0, 2, 1, 3)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if key_mask is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        # Masked keys get segment 1, queries segment 0: a key is visible iff its segment matches.
        ids = sk.SegmentIds(q=jnp.zeros((b, lq + pad_q), jnp.int32), kv=(~key_mask).astype(jnp.int32))
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)[:, :lq]
