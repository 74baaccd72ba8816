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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iconface_jax import weights

FAMILY = "adaface"

# Body units per stage of the official `get_blocks(num_layers)`; `ir_101` is `Backbone(..., 100, "ir")`.
ARCHS: dict[str, tuple[int, ...]] = {
    "ir_18": (2, 2, 2, 2),
    "ir_34": (3, 4, 6, 3),
    "ir_50": (3, 4, 14, 3),
    "ir_101": (3, 13, 30, 3),
}
STAGE_CHANNELS = (64, 128, 256, 512)
INPUT_SIZE = 112
CROP_LO, CROP_HI = 0.0625, 0.9375  # identity crop of FFHQ-aligned faces (ReF-LDM)


@dataclasses.dataclass(frozen=True)
class AdaFaceConfig:
    """Architecture: body units per stage (the only thing that differs between IR-18/34/50/101)."""

    units: tuple[int, ...] = ARCHS["ir_50"]
    channels: tuple[int, ...] = STAGE_CHANNELS
    embed_dim: int = 512
    input_size: int = INPUT_SIZE
    bn_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.units) != len(self.channels) or min(self.units, default=0) < 1:
            raise ValueError(f"AdaFaceConfig: units {self.units} must give >= 1 unit for each of {len(self.channels)} stages")
        if self.input_size % 2 ** len(self.units):
            raise ValueError(f"AdaFaceConfig: input_size {self.input_size} must be divisible by {2 ** len(self.units)}")

    @classmethod
    def from_arch(cls, arch: str) -> AdaFaceConfig:
        if arch not in ARCHS:
            raise ValueError(f"unknown AdaFace architecture {arch!r}; known: {sorted(ARCHS)}")
        return cls(units=ARCHS[arch])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdaFaceConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @property
    def arch(self) -> str | None:
        """`ir_50` etc. when the config is one of the official architectures."""
        default = AdaFaceConfig()
        if (self.channels, self.embed_dim, self.input_size) != (default.channels, default.embed_dim, default.input_size):
            return None
        return next((name for name, units in ARCHS.items() if units == self.units), None)

    @property
    def feature_size(self) -> int:
        """Side of the last stage's feature map (7 for 112x112 inputs)."""
        return self.input_size // 2 ** len(self.units)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index of the last body unit of each stage (IR-50: 2, 6, 20, 23)."""
        return tuple(int(i) - 1 for i in np.cumsum(self.units))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch
        return d


class FrozenBatchNorm(nnx.Module):
    """Inference-mode BatchNorm over the last axis: `(x - mean) / sqrt(var + eps) * scale + bias`, in float32.

    `mean` and `var` are the running statistics, held as plain (frozen) `nnx.Param`s.
    """

    def __init__(self, num_features: int, *, affine: bool = True, eps: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        self.eps, self.dtype = eps, dtype
        if affine:
            self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        else:
            self.scale = self.bias = None
        self.mean = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.var = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        f32 = jnp.float32
        mul = jax.lax.rsqrt(self.var[...].astype(f32) + self.eps)
        if self.scale is not None:
            mul = mul * self.scale[...].astype(f32)
        y = (x.astype(f32) - self.mean[...].astype(f32)) * mul
        if self.bias is not None:
            y = y + self.bias[...].astype(f32)
        return y.astype(out_dtype)


class PReLU(nnx.Module):
    """Per-channel PReLU (torch `nn.PReLU(C)`): `max(x, 0) + negative_slope * min(x, 0)` on the last axis."""

    def __init__(self, num_features: int, *, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.dtype = dtype
        self.negative_slope = nnx.Param(jnp.full((num_features,), 0.25, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        return jnp.where(x >= 0, x, self.negative_slope[...].astype(dtype) * x)


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


class FlattenChannelMajor(nnx.Module):
    """torch `Flatten()` on an NCHW tensor: the NHWC input is transposed to NCHW first."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
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
            shortcut = _sequential(self.shortcut_layer, x)
        return _sequential(self.res_layer, x) + shortcut


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
        x = _sequential(self.input_layer, x)
        stages["input_layer"] = x
        ends = self.config.stage_ends
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in ends:
                stages[f"stage{ends.index(i) + 1}"] = x
        x = _sequential(self.output_layer, x).astype(jnp.float32)
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        embedding = x / norm
        return (embedding, norm, stages) if return_stages else (embedding, norm)


def load(src: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None) -> AdaFace:
    """An AdaFace model from a directory written by `python -m convert.adaface` (no random init is run)."""
    config = AdaFaceConfig.from_dict(weights.read_config(src, FAMILY))
    model = nnx.eval_shape(lambda: AdaFace(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                           rngs=nnx.Rngs(0)))
    return weights.restore(model, src)


def crop_bounds(size: int) -> tuple[int, int]:
    """Rows (or columns) `[lo, hi)` kept by the identity crop: 6.25% to 93.75%, rounded half up (512 -> 32, 480)."""
    return int(np.floor(size * CROP_LO + 0.5)), int(np.floor(size * CROP_HI + 0.5))


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an exact box-filter (area) resize: output pixel i averages the input
    interval [i * n_in / n_out, (i + 1) * n_in / n_out) weighted by fractional overlap; rows sum to 1.

    For an integer factor this is plain k-pixel mean pooling; like OpenCV's INTER_AREA it also handles
    fractional factors (and degrades to nearest-with-blended-edges when upscaling).
    """
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    left = np.arange(n_in)[None, :].astype(np.float64)
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def area_resize(x: jax.Array, size: int) -> jax.Array:
    """Differentiable area resize of NHWC `x` to (size, size): mean pooling for integer factors, else a
    separable fractional area-weight matrix (`area_matrix`)."""
    _, h, w, _ = x.shape
    if h % size == 0 and w % size == 0:
        kh, kw = h // size, w // size
        if kh == kw == 1:
            return x
        return x.reshape(x.shape[0], size, kh, size, kw, x.shape[-1]).mean(axis=(2, 4))
    rows = jnp.asarray(area_matrix(h, size), x.dtype)
    cols = jnp.asarray(area_matrix(w, size), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def identity_crop(rgb: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """FFHQ-aligned NHWC faces of any size -> the float32 (B, size, size, C) identity crop (rows and columns
    6.25% to 93.75%, area-resized), values unchanged in range; differentiable."""
    if rgb.ndim != 4:
        raise ValueError(f"identity_crop expects NHWC images, got shape {rgb.shape}")
    (top, bottom), (left, right) = crop_bounds(rgb.shape[1]), crop_bounds(rgb.shape[2])
    x = rgb[:, top:bottom, left:right, :]
    return area_resize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), size)  # resize in >= float32


def embed_faces(model: AdaFace, rgb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """AdaFace `(embedding, norm)` of FFHQ-aligned RGB NHWC faces in [-1, 1] (any square size, e.g. 512).

    Keeps rows and columns 6.25%..93.75% (512 -> 448), area-resizes to 112x112 (exact 4x4 mean pool for
    512), flips RGB to BGR and runs the model; every step is differentiable with respect to `rgb`.
    Inputs are not clipped: clip decoded images to [-1, 1] before calling if they may overshoot.
    """
    x = identity_crop(rgb, model.config.input_size)
    return model(x[..., ::-1])


__all__: Sequence[str] = [
    "ARCHS", "AdaFace", "AdaFaceConfig", "BasicBlockIR", "FrozenBatchNorm", "PReLU", "load", "embed_faces",
    "identity_crop", "area_resize", "area_matrix", "crop_bounds",
]
