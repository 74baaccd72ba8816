"""What the face-recognition networks (AdaFace IR, ArcFace IResNet) share: their architecture config,
inference-mode BatchNorm, PReLU, channel-major flatten, and ReF-LDM's identity crop of aligned faces.

Both networks are 4-stage pre-activation ResNets on 112x112 crops with a Linear head over the
channel-major flattened 7x7x512 map; they differ in block layout, shortcut, head and input channel
order, which `adaface.py` and `arcface.py` mirror from their official code. The modules here run in
float32 where numerics matter (BatchNorm statistics) whatever the compute dtype.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

STAGE_CHANNELS = (64, 128, 256, 512)
INPUT_SIZE = 112
CROP_LO, CROP_HI = 0.0625, 0.9375  # identity crop of FFHQ-aligned faces (ReF-LDM)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a 4-stage face-recognition ResNet: residual units per stage (the only thing that
    differs between the official depths), widths, embedding size, input side and BatchNorm eps.

    Subclasses name their official depths in `ARCHS` ({name: units per stage}).
    """

    ARCHS: ClassVar[Mapping[str, tuple[int, ...]]] = {}
    units: tuple[int, ...] = (3, 4, 14, 3)  # the 50-layer network of both families
    channels: tuple[int, ...] = STAGE_CHANNELS
    embed_dim: int = 512
    input_size: int = INPUT_SIZE
    bn_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(int(u) for u in self.units))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        name = type(self).__name__
        if len(self.units) != len(self.channels) or min(self.units, default=0) < 1:
            raise ValueError(f"{name}: units {self.units} must give >= 1 unit for each of {len(self.channels)} stages")
        if self.input_size % 2 ** len(self.units):
            raise ValueError(f"{name}: input_size {self.input_size} must be divisible by {2 ** len(self.units)}")

    @classmethod
    def from_arch(cls, arch: str) -> BackboneConfig:
        """The config of an official depth (`ir_50`, `r100`, ...)."""
        if arch not in cls.ARCHS:
            raise ValueError(f"unknown {cls.__name__} architecture {arch!r}; known: {sorted(cls.ARCHS)}")
        return cls(units=cls.ARCHS[arch])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneConfig:
        """The config from a stored dict (unknown keys, such as the derived `arch`, are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    @property
    def arch(self) -> str | None:
        """The official depth's name when the config is one of them, else None."""
        default = type(self)()
        fields = ("channels", "embed_dim", "input_size")
        if any(getattr(self, f) != getattr(default, f) for f in fields):
            return None
        return next((name for name, units in self.ARCHS.items() if units == self.units), None)

    @property
    def feature_size(self) -> int:
        """Side of the last stage's feature map (7 for 112x112 inputs)."""
        return self.input_size // 2 ** len(self.units)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived `arch`, as stored in a converted weight directory."""
        d = dataclasses.asdict(self)
        d["arch"] = self.arch
        return d


class FrozenBatchNorm(nnx.Module):
    """Inference-mode BatchNorm over the last axis: `(x - mean) / sqrt(var + eps) * scale + bias`, in float32.

    `mean` and `var` are the running statistics, held as plain (frozen) `nnx.Param`s, so
    `iconface_jax.weights.restore` fills them and optimizers that select trainable state by type never
    touch them.
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


class FlattenChannelMajor(nnx.Module):
    """torch `Flatten()` on an NCHW tensor: the NHWC input is transposed to NCHW first, so a Linear after
    it takes the official weight transposed, nothing permuted."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def sequential(layers: Sequence[Callable[[jax.Array], jax.Array]], x: jax.Array) -> jax.Array:
    """torch `nn.Sequential`: the layers applied in order."""
    for layer in layers:
        x = layer(x)
    return x


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
    6.25% to 93.75%, area-resized), values unchanged in range; differentiable.

    This is how ReF-LDM's identity metric prepares aligned 512x512 faces for its recogniser (448x448
    centre, 4x4 mean pool); both recognisers here read faces through it.
    """
    if rgb.ndim != 4:
        raise ValueError(f"identity_crop expects NHWC images, got shape {rgb.shape}")
    (top, bottom), (left, right) = crop_bounds(rgb.shape[1]), crop_bounds(rgb.shape[2])
    x = rgb[:, top:bottom, left:right, :]
    return area_resize(x.astype(jnp.promote_types(x.dtype, jnp.float32)), size)  # resize in >= float32
