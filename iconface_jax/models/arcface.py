"""ArcFace IResNet-18/34/50/100/200 (the Ref-ArcFace / GT-ArcFace metric's recogniser) as Flax NNX modules,
inference only.

A line-by-line mirror of insightface's `recognition/arcface_torch/backbones/iresnet.py` (`iresnetN`),
the network of the public ArcFace recognisers (the arcface_torch `backbone.pth` releases, and the
WebFace600K R50 that ReF-LDM's evaluation, so the paper's Ref-ArcFace, uses):

    conv1, bn1, prelu   = Conv 3x3 3->64 (no bias), BatchNorm2d, PReLU
    layerS.i            = IBasicBlock: bn1, conv1 3x3, bn2, prelu, conv2 3x3 (stride), bn3
                          + downsample = [Conv 1x1 (stride), BN] where the shape changes, else identity
    bn2, flatten, fc, features = BatchNorm2d, Flatten (channel-major), Linear(512*7*7, 512), BatchNorm1d
    return x (raw features, not normalised)

Every stage's first block has stride 2, so every stage (layer1 included, 64 -> 64 channels) opens with a
projection shortcut; this is where IResNet differs from AdaFace's IR, whose same-width strided shortcut
is a subsample. The head's Dropout (p = 0 in the releases) is the identity at inference and holds no
weights, so it is left out. Inputs are RGB (AdaFace's are BGR). Activations are NHWC and attribute
paths mirror the official state-dict names (`layer2.0.downsample.0.kernel` <-
`layer2.0.downsample.0.weight`), so `convert/arcface.py` is a rename plus layout transposes. Norms and
the returned features are float32 whatever `dtype` is.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from iconface_jax import weights
from iconface_jax.models import recognition
from iconface_jax.models.recognition import FlattenChannelMajor, FrozenBatchNorm, PReLU, identity_crop, sequential

FAMILY = "arcface"

# Blocks per stage of the official `iresnet18` .. `iresnet200`.
ARCHS: dict[str, tuple[int, ...]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
PAD = ((1, 1), (1, 1))  # torch padding=1; 'SAME' would pad (0, 1) for stride 2 on even sizes


@dataclasses.dataclass(frozen=True)
class ArcFaceConfig(recognition.BackboneConfig):
    """ArcFace IResNet architecture: blocks per stage (the only thing that differs between R18 .. R200)."""

    ARCHS: ClassVar[Mapping[str, tuple[int, ...]]] = ARCHS

    def __post_init__(self):
        super().__post_init__()
        if len(self.units) != len(STAGES):
            raise ValueError(f"ArcFaceConfig: units {self.units} must give one count for each of {len(STAGES)} "
                             "stages (layer1 .. layer4)")


class IBasicBlock(nnx.Module):
    """The official `IBasicBlock`: pre-activation residual unit, stride on the second 3x3 conv."""

    def __init__(self, in_channels: int, depth: int, stride: int, *, eps: float, dtype: Any, param_dtype: Any,
                 precision: Any, rngs: nnx.Rngs):
        conv = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.bn1 = FrozenBatchNorm(in_channels, **norm)
        self.conv1 = nnx.Conv(in_channels, depth, (3, 3), 1, padding=PAD, **conv)
        self.bn2 = FrozenBatchNorm(depth, **norm)
        self.prelu = PReLU(depth, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = nnx.Conv(depth, depth, (3, 3), stride, padding=PAD, **conv)
        self.bn3 = FrozenBatchNorm(depth, **norm)
        if stride != 1 or in_channels != depth:  # the official `_make_layer` condition
            self.downsample = nnx.List([
                nnx.Conv(in_channels, depth, (1, 1), stride, padding="VALID", **conv),
                FrozenBatchNorm(depth, **norm),
            ])
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = sequential([self.bn1, self.conv1, self.bn2, self.prelu, self.conv2, self.bn3], x)
        return out + (x if self.downsample is None else sequential(self.downsample, x))


class ArcFace(nnx.Module):
    """ArcFace IResNet. `model(rgb)` on RGB NHWC (B, 112, 112, 3) in [-1, 1] returns the raw float32 (B, 512)
    features, as the official network does (compare them by cosine).

    `model(rgb, return_stages=True)` also returns a dict of intermediate NHWC activations: `input_layer`
    (after the stem's PReLU), then `stage1`..`stage4` (after `layer1`..`layer4`).
    """

    def __init__(self, config: ArcFaceConfig | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        self.config = config = config or ArcFaceConfig()
        self.dtype = dtype
        norm = dict(eps=config.bn_eps, dtype=dtype, param_dtype=param_dtype)
        c0 = config.channels[0]
        self.conv1 = nnx.Conv(3, c0, (3, 3), 1, padding=PAD, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              precision=precision, rngs=rngs)
        self.bn1 = FrozenBatchNorm(c0, **norm)
        self.prelu = PReLU(c0, dtype=dtype, param_dtype=param_dtype)
        in_ch = c0
        for name, depth, n in zip(STAGES, config.channels, config.units):
            setattr(self, name, nnx.List([
                IBasicBlock(in_ch if i == 0 else depth, depth, 2 if i == 0 else 1, eps=config.bn_eps, dtype=dtype,
                            param_dtype=param_dtype, precision=precision, rngs=rngs)
                for i in range(n)]))
            in_ch = depth
        c, f = config.channels[-1], config.feature_size
        self.bn2 = FrozenBatchNorm(c, **norm)
        self.flatten = FlattenChannelMajor()
        self.fc = nnx.Linear(c * f * f, config.embed_dim, dtype=dtype, param_dtype=param_dtype, precision=precision,
                             rngs=rngs)
        self.features = FrozenBatchNorm(config.embed_dim, eps=config.bn_eps, dtype=jnp.float32,
                                        param_dtype=param_dtype)

    def __call__(self, x: jax.Array, *, return_stages: bool = False):
        size = self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise ValueError(f"ArcFace expects RGB NHWC images of shape (B, {size}, {size}, 3), got {x.shape}")
        x = sequential([self.conv1, self.bn1, self.prelu], x.astype(self.dtype))
        stages = {"input_layer": x}
        for i, name in enumerate(STAGES):
            x = sequential(getattr(self, name), x)
            stages[f"stage{i + 1}"] = x
        x = sequential([self.bn2, self.flatten, self.fc, self.features], x).astype(jnp.float32)
        return (x, stages) if return_stages else x


def load(src: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None) -> ArcFace:
    """An ArcFace model from a directory written by `python -m convert.arcface` (no random init is run)."""
    config = ArcFaceConfig.from_dict(weights.read_config(src, FAMILY))
    model = nnx.eval_shape(lambda: ArcFace(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                           rngs=nnx.Rngs(0)))
    return weights.restore(model, src)


def embed_faces(model: ArcFace, rgb: jax.Array) -> jax.Array:
    """Raw ArcFace features (B, 512) of FFHQ-aligned RGB NHWC faces in [-1, 1] (any square size, e.g. 512),
    prepared as ReF-LDM's identity metric prepares them: rows and columns 6.25%..93.75% kept, area-resized
    to 112x112 (`recognition.identity_crop`), RGB kept; differentiable with respect to `rgb`."""
    return model(identity_crop(rgb, model.config.input_size))


__all__: Sequence[str] = ["ARCHS", "ArcFace", "ArcFaceConfig", "IBasicBlock", "load", "embed_faces"]
