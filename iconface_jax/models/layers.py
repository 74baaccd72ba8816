"""Building blocks shared by the models: the precision policy, a LoRA-capable Linear, and norms.

Parameters are named as their PyTorch counterparts (`kernel` for a Linear's `weight`, stored
(in, out); `scale` for a norm's `weight`) so that converters are mechanical renames.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): random-weight models behave like torch's.
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Parameter and compute dtypes; norms, softmax statistics and losses always run in float32."""

    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def named(cls, name: str) -> "Precision":
        """`float32` (parity tests) or `bf16` (bf16 weights and activations, the training default)."""
        if name == "float32":
            return cls(jnp.float32, jnp.float32)
        if name == "bf16":
            return cls(jnp.bfloat16, jnp.bfloat16)
        raise ValueError(f"unknown precision {name!r}; expected 'float32' or 'bf16'")


class Linear(nnx.Module):
    """y = x W (+ b), plus an optional low-rank update (x A) B * alpha / rank held in `nnx.LoRAParam`s."""

    def __init__(self, in_features: int, out_features: int, *, precision: Precision, rngs: nnx.Rngs,
                 use_bias: bool = False):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = precision.dtype
        self.kernel = nnx.Param(torch_linear_init(rngs.params(), (in_features, out_features), precision.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), precision.param_dtype)) if use_bias else None
        # Declared as data (not static) so attaching adapters later keeps them in the state.
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.lora_scale = 0.0

    def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> None:
        """Attaches LoRA factors; B starts at zero so the layer's output is unchanged (peft's init)."""
        # peft initialises A with kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)).
        self.lora_a = nnx.LoRAParam(torch_linear_init(rngs.params(), (self.in_features, rank), dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), dtype))
        self.lora_scale = alpha / rank

    def merge_lora(self) -> None:
        """Folds the LoRA update into the kernel and removes the factors."""
        delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)) * self.lora_scale
        self.kernel.set_value((self.kernel[...].astype(jnp.float32) + delta).astype(self.kernel.get_value().dtype))
        self.lora_a = self.lora_b = None
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            low = x @ self.lora_a[...].astype(self.dtype)
            y = y + (low @ self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm over the last axis, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, precision: Precision):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), precision.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# Rematerialisation policies by name (config `model.remat`): what a checkpointed block keeps for the backward
# pass. "full" keeps only the block's inputs; "save_dots" also keeps the outputs of its weight matmuls
# (no batch dimensions), so only attention and elementwise work is recomputed.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def checkpointed(module: nnx.Module, *args, policy: str = "full"):
    """`module(*args)` under `jax.checkpoint` with a named policy; non-array arguments (segment lengths)
    stay static. Functional (split / merge), so it nests in any JAX transform."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(args)
    traced = [isinstance(leaf, jax.Array) for leaf in leaves]

    def run(state, arrays):
        arrays = iter(arrays)
        full = [next(arrays) if t else leaf for leaf, t in zip(leaves, traced)]
        return nnx.merge(graphdef, state)(*jax.tree.unflatten(treedef, full))

    return jax.checkpoint(run, policy=REMAT_POLICIES[policy])(state, [x for x, t in zip(leaves, traced) if t])
