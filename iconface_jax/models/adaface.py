"""AdaFace IR-18/34/50/101 (the frozen identity encoder) as Flax NNX modules, inference only.

A line-by-line mirror of the official `net.py` (`Backbone(input_size=(112, 112), num_layers, "ir")`):

    input_layer  = [Conv 3x3 3->64 (no bias), BatchNorm2d, PReLU]
    body[i]      = BasicBlockIR: res_layer = [BN, Conv 3x3, BN, PReLU, Conv 3x3 (stride), BN]
                                 shortcut  = MaxPool2d(1, stride) if in == out else [Conv 1x1 (stride), BN]
    output_layer = [BatchNorm2d, Dropout, Flatten (channel-major), Linear(512*7*7, 512), BatchNorm1d(affine=False)]
    return x / ||x||, ||x||

The first unit of every stage has stride 2 (the stage-1 shortcut is the strided `MaxPool2d(1, 2)`, a
plain subsample). Activations are NHWC; the attribute paths mirror the official state-dict names
(`body.3.res_layer.1.kernel` <- `body.3.res_layer.1.weight`), so `convert/adaface.py` is a mechanical
rename plus layout transposes. The 7x7x512 NHWC feature map is transposed to NCHW before flattening,
so the Linear kernel is the official weight transposed, nothing permuted.

BatchNorm runs in inference mode only (running statistics); its statistics are stored as plain
`nnx.Param`s like every other frozen base weight, so `iconface_jax.weights.restore` fills them and
optimizers that select trainable state by type never touch them. Norms and the returned
embedding and norm are computed in float32 whatever `dtype` is.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iconface_jax import weights
from iconface_jax.models import recognition
from iconface_jax.models.recognition import FlattenChannelMajor, FrozenBatchNorm, PReLU, identity_crop, sequential

FAMILY = "adaface"

# Body units per stage of the official `get_blocks(num_layers)`; `ir_101` is `Backbone(..., 100, "ir")`.
ARCHS: dict[str, tuple[int, ...]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
}


@dataclasses.dataclass(frozen=True)
class AdaFaceConfig(recognition.BackboneConfig):
    """AdaFace IR architecture: body units per stage (the only thing that differs between IR-18/34/50/101)."""

    ARCHS: ClassVar[Mapping[str, tuple[int, ...]]] = ARCHS

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index of the last body unit of each stage (IR-50: 2, 6, 20, 23)."""
        return tuple(int(i) - 1 for i in np.cumsum(self.units))


class Subsample(nnx.Module):
    """`MaxPool2d(kernel_size=1, stride)`: a window of one pixel is the pixel itself, so this is `x[::s, ::s]`."""

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        return x[:, :: self.stride, :: self.stride, :]


class Dropout(nnx.Module):
    """The output layer's `Dropout(0.4)`: the identity at inference (kept so the indices match the official names)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class BasicBlockIR(nnx.Module):
    """The official `BasicBlockIR`: pre-activation residual unit, stride on the second 3x3 conv."""

    def __init__(self, in_channels: int, depth: int, stride: int, *, eps: float, dtype: Any, param_dtype: Any,
                 precision: Any, rngs: nnx.Rngs):
        conv = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        pad = ((1, 1), (1, 1))  # torch padding=1; 'SAME' would pad (0, 1) for stride 2 on even sizes
        if in_channels == depth:
            self.shortcut_layer = Subsample(stride)
        else:
            self.shortcut_layer = nnx.List([
                nnx.Conv(in_channels, depth, (1, 1), stride, padding="VALID", **conv),
                FrozenBatchNorm(depth, **norm),
            ])
        self.res_layer = nnx.List([
            FrozenBatchNorm(in_channels, **norm),
            nnx.Conv(in_channels, depth, (3, 3), 1, padding=pad, **conv),
            FrozenBatchNorm(depth, **norm),
            PReLU(depth, dtype=dtype, param_dtype=param_dtype),
            nnx.Conv(depth, depth, (3, 3), stride, padding=pad, **conv),
            FrozenBatchNorm(depth, **norm),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.shortcut_layer, Subsample):
            shortcut = self.shortcut_layer(x)
        else:
            shortcut = sequential(self.shortcut_layer, x)
        return sequential(self.res_layer, x) + shortcut


class AdaFace(nnx.Module):
    """AdaFace IR backbone. `model(bgr)` on BGR NHWC (B, 112, 112, 3) in [-1, 1] returns
    `(embedding, norm)`: float32 (B, 512) unit vectors and float32 (B, 1) feature norms.

    `model(bgr, return_stages=True)` also returns a dict of intermediate NHWC activations:
    `input_layer`, then `stage1`..`stageN` (after the last body unit of each stage).
    """

    def __init__(self, config: AdaFaceConfig | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        self.config = config = config or AdaFaceConfig()
        self.dtype = dtype
        conv = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        norm = dict(eps=config.bn_eps, dtype=dtype, param_dtype=param_dtype)
        c0 = config.channels[0]
        self.input_layer = nnx.List([
            nnx.Conv(3, c0, (3, 3), 1, padding=((1, 1), (1, 1)), **conv),
            FrozenBatchNorm(c0, **norm),
            PReLU(c0, dtype=dtype, param_dtype=param_dtype),
        ])
        units, in_ch = [], c0
        for depth, n in zip(config.channels, config.units):
            for i in range(n):
                units.append(BasicBlockIR(in_ch if i == 0 else depth, depth, 2 if i == 0 else 1, eps=config.bn_eps,
                                          dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs))
            in_ch = depth
        self.body = nnx.List(units)
        c, f = config.channels[-1], config.feature_size
        self.output_layer = nnx.List([
            FrozenBatchNorm(c, **norm),
            Dropout(0.4),
            FlattenChannelMajor(),
            nnx.Linear(c * f * f, config.embed_dim, dtype=dtype, param_dtype=param_dtype, precision=precision,
                       rngs=rngs),
            FrozenBatchNorm(config.embed_dim, affine=False, eps=config.bn_eps, dtype=jnp.float32,
                            param_dtype=param_dtype),
        ])

    def __call__(self, x: jax.Array, *, return_stages: bool = False):
        size = self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"AdaFace expects BGR NHWC images of shape (B, {size}, {size}, 3), got {x.shape}")
        x = x.astype(self.dtype)
        stages = {}
        x = sequential(self.input_layer, x)
        stages["input_layer"] = x
        ends = self.config.stage_ends
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in ends:
                stages[f"stage{ends.index(i) + 1}"] = x
        x = sequential(self.output_layer, x).astype(jnp.float32)
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        embedding = x / norm
        return (embedding, norm, stages) if return_stages else (embedding, norm)


def load(src: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None,
         place: weights.Placement | None = None) -> AdaFace:
    """An AdaFace model from a directory written by `python -m convert.adaface` (no random init is run);
    `place(shape)` is each weight's sharding (`weights.restore`)."""
    config = AdaFaceConfig.from_dict(weights.read_config(src, FAMILY))
    model = nnx.eval_shape(lambda: AdaFace(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                           rngs=nnx.Rngs(0)))
    return weights.restore(model, src, place=place)


def embed_faces(model: AdaFace, rgb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """AdaFace `(embedding, norm)` of FFHQ-aligned RGB NHWC faces in [-1, 1] (any square size, e.g. 512).

    Keeps rows and columns 6.25%..93.75% (512 -> 448), area-resizes to 112x112 (exact 4x4 mean pool for
    512), flips RGB to BGR and runs the model; every step is differentiable with respect to `rgb`.
    Inputs are not clipped: clip decoded images to [-1, 1] before calling if they may overshoot.
    """
    x = identity_crop(rgb, model.config.input_size)
    return model(x[..., ::-1])


__all__: Sequence[str] = [
    "ARCHS", "AdaFace", "AdaFaceConfig", "BasicBlockIR", "load", "embed_faces",
]
