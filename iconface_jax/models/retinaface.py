"""RetinaFace face detection (ResNet-18/34/50 and MobileNet v1 backbones) as Flax NNX modules, inference only,
with its priors, box and landmark decoding, NMS and a whole-image `detect`.

A mirror of the RetinaFace runtime of the IConFace authors' whole-photo tools (the widely used biubug6
Pytorch_Retinaface design in the `fx` / `class_head` naming of their `retinaface_r34.pth`):

    fx          backbone; the stride-8, 16 and 32 feature maps (ResNet `layer2..4`, MobileNet `stage1..3`)
    fpn         output1..3 = 1x1 ConvBNAct to `out_channel`; merge2(out2 + up(out3)), merge1(out1 + up(out2))
    ssh1..3     conv3X3 (half the channels) | conv5X5_1 -> conv5X5_2 | conv5X5_1 -> conv7X7_2 -> conv7x7_3,
                concatenated, ReLU
    *_head      one 1x1 conv per level, 2 anchors per pixel: class (2), box (4) and landmark (10) values

Activations are NHWC; attribute paths mirror the torch state-dict names (`fpn.output1.0.kernel` <-
`fpn.output1.0.weight`), so `convert/retinaface.py` is a rename plus conv layout transposes (it also reads
biubug6's and facexlib's own names: `body.`, `ClassHead.N.conv1x1`, ...). BatchNorm runs on
running statistics (`recognition.FrozenBatchNorm`, frozen `nnx.Param`s). `detect` follows the runtime's
`RetinaFaceDetector.detect`: RGB -> BGR, the short edge upscaled (never downscaled) to `resize_short` with
OpenCV's bilinear resize, the BGR mean (104, 117, 123) subtracted, boxes and landmarks decoded against the
priors, score threshold, top-k, NMS, and the result mapped back to the input's pixels.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iconface_jax import weights
from iconface_jax.models.recognition import FrozenBatchNorm

FAMILY = "retinaface"
BGR_MEAN = (104.0, 117.0, 123.0)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # anchor sides per level, 2 anchors per pixel
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
ANCHORS = 2
# name: (backbone, ResNet blocks per stage or MobileNet width multiplier, `in_channel`, FPN/SSH `out_channel`).
# The FPN reads 2x, 4x and 8x `in_channel` channels (the backbone's stride-8, 16, 32 outputs).
NETWORKS: dict[str, tuple[str, Any, int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 64, 128),
    "resnet34": ("basic", (3, 4, 6, 3), 64, 128),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 256, 256),
    "mobilenetv1_0.25": ("mobilenet_v1", 0.25, 32, 64),
    "mobilenetv1_0.50": ("mobilenet_v1", 0.50, 64, 128),
    "mobilenetv1": ("mobilenet_v1", 1.0, 128, 128),
}


@dataclasses.dataclass(frozen=True)
class RetinaFaceConfig:
    """A RetinaFace network by its runtime name (`resnet34`, `resnet50`, `mobilenetv1_0.25`, ...)."""

    network: str = "resnet34"
    bn_eps: float = 1e-5

    def __post_init__(self):
        if self.network not in NETWORKS:
            raise ValueError(f"RetinaFaceConfig.network: unknown network {self.network!r}; known: {sorted(NETWORKS)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetinaFaceConfig:
        """The config from a stored dict."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        """The fields, as stored in a converted weight directory."""
        return dataclasses.asdict(self)


class Sequential(nnx.List):
    """torch `nn.Sequential`: its layers applied in order, indexed like the torch module (`output1.0`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class LeakyReLU(nnx.Module):
    """`nn.LeakyReLU(slope)` (`nn.ReLU` at slope 0); holds no weights, kept so Sequential indices match torch."""

    def __init__(self, slope: float):
        self.slope = slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, x * self.slope)


def _conv(cin: int, cout: int, k: int, stride: int = 1, *, groups: int = 1, bias: bool = False, kw: dict) -> nnx.Conv:
    """torch `nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups, bias)` as an NHWC `nnx.Conv`."""
    pad = (k - 1) // 2  # explicit: 'SAME' pads (0, 1) for stride 2 on even sizes where torch pads (1, 1)
    return nnx.Conv(cin, cout, (k, k), stride, padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                    use_bias=bias, **kw)


def _bn(channels: int, kw: dict, eps: float) -> FrozenBatchNorm:
    """torch `nn.BatchNorm2d(channels)` in inference mode."""
    return FrozenBatchNorm(channels, eps=eps, dtype=kw["dtype"], param_dtype=kw["param_dtype"])


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, *, slope: float | None, groups: int = 1,
            kw: dict, eps: float) -> Sequential:
    """The runtime's `Conv2dNormActivation`: conv (no bias), BatchNorm, LeakyReLU(`slope`) unless `slope` is None."""
    layers = [_conv(cin, cout, k, stride, groups=groups, kw=kw), _bn(cout, kw, eps)]
    return Sequential(layers + ([LeakyReLU(slope)] if slope is not None else []))


class BasicBlock(nnx.Module):
    """torchvision-style ResNet basic block (two 3x3 convs, stride on the first)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, kw: dict, eps: float):
        self.conv1 = _conv(cin, planes, 3, stride, kw=kw)
        self.bn1 = _bn(planes, kw, eps)
        self.conv2 = _conv(planes, planes, 3, kw=kw)
        self.bn2 = _bn(planes, kw, eps)
        self.downsample = _downsample(cin, planes, stride, kw=kw, eps=eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x)))))
        return jax.nn.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nnx.Module):
    """torchvision-style ResNet bottleneck (1x1, 3x3 with the stride, 1x1 to 4x the width)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, kw: dict, eps: float):
        self.conv1 = _conv(cin, planes, 1, kw=kw)
        self.bn1 = _bn(planes, kw, eps)
        self.conv2 = _conv(planes, planes, 3, stride, kw=kw)
        self.bn2 = _bn(planes, kw, eps)
        self.conv3 = _conv(planes, planes * 4, 1, kw=kw)
        self.bn3 = _bn(planes * 4, kw, eps)
        self.downsample = _downsample(cin, planes * 4, stride, kw=kw, eps=eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(jax.nn.relu(self.bn2(self.conv2(out)))))
        return jax.nn.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int, *, kw: dict, eps: float) -> Sequential | None:
    """The projection shortcut [1x1 conv (stride), BN] where the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return Sequential([_conv(cin, cout, 1, stride, kw=kw), _bn(cout, kw, eps)])


class ResNet(nnx.Module):
    """ResNet-18/34/50 without its classifier; returns the `layer2`, `layer3` and `layer4` outputs."""

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: Sequence[int], *, kw: dict, eps: float):
        self.conv1 = _conv(3, 64, 7, 2, kw=kw)
        self.bn1 = _bn(64, kw, eps)
        cin = 64
        for index, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layer = []
            for i in range(n):
                layer.append(block(cin, planes, 2 if i == 0 and index > 0 else 1, kw=kw, eps=eps))
                cin = planes * block.expansion
            setattr(self, f"layer{index + 1}", Sequential(layer))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        # MaxPool2d(3, stride 2, padding 1): reduce_window pads with -inf, as torch does.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = self.layer1(x)
        outputs = []
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return outputs


class MobileNetV1(nnx.Module):
    """The runtime's MobileNet v1 (LeakyReLU 0.1) at `width`; returns the `stage1`, `stage2`, `stage3` outputs."""

    def __init__(self, width: float, *, kw: dict, eps: float):
        f = [_make_divisible(c * width) for c in (32, 64, 128, 256, 512, 1024)]

        def dw(cin: int, cout: int, stride: int) -> Sequential:  # the runtime's DepthWiseSeparableConv2d
            return Sequential([conv_bn(cin, cin, 3, stride, groups=cin, slope=0.1, kw=kw, eps=eps),
                               conv_bn(cin, cout, 1, slope=0.1, kw=kw, eps=eps)])

        self.stage1 = Sequential([conv_bn(3, f[0], 3, 2, slope=0.1, kw=kw, eps=eps), dw(f[0], f[1], 1),
                                  dw(f[1], f[2], 2), dw(f[2], f[2], 1), dw(f[2], f[3], 2), dw(f[3], f[3], 1)])
        self.stage2 = Sequential([dw(f[3], f[4], 2)] + [dw(f[4], f[4], 1) for _ in range(5)])
        self.stage3 = Sequential([dw(f[4], f[5], 2), dw(f[5], f[5], 1)])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        return [s1, s2, self.stage3(s2)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of 8, never more than 10% down (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode="nearest")` on NHWC: output pixel i reads input pixel floor(i * in / out)."""
    rows = (np.arange(size[0]) * x.shape[1]) // size[0]
    cols = (np.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


class FPN(nnx.Module):
    """Feature pyramid: lateral 1x1 ConvBNAct per level, top-down nearest upsampling, 3x3 merges."""

    def __init__(self, in_channels: Sequence[int], out: int, *, kw: dict, eps: float):
        slope = 0.1 if out <= 64 else 0.0
        for i, cin in enumerate(in_channels):
            setattr(self, f"output{i + 1}", conv_bn(cin, out, 1, slope=slope, kw=kw, eps=eps))
        self.merge1 = conv_bn(out, out, 3, slope=slope, kw=kw, eps=eps)
        self.merge2 = conv_bn(out, out, 3, slope=slope, kw=kw, eps=eps)

    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        out1, out2, out3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        out2 = self.merge2(out2 + _upsample_nearest(out3, out2.shape[1:3]))
        out1 = self.merge1(out1 + _upsample_nearest(out2, out1.shape[1:3]))
        return [out1, out2, out3]


class SSH(nnx.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields from stacked 3x3 convs."""

    def __init__(self, cin: int, out: int, *, kw: dict, eps: float):
        slope = 0.1 if out <= 64 else 0.0
        self.conv3X3 = conv_bn(cin, out // 2, 3, slope=None, kw=kw, eps=eps)
        self.conv5X5_1 = conv_bn(cin, out // 4, 3, slope=slope, kw=kw, eps=eps)
        self.conv5X5_2 = conv_bn(out // 4, out // 4, 3, slope=None, kw=kw, eps=eps)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, 3, slope=slope, kw=kw, eps=eps)
        self.conv7x7_3 = conv_bn(out // 4, out // 4, 3, slope=None, kw=kw, eps=eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        mid = self.conv5X5_1(x)
        out = [self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))]
        return jax.nn.relu(jnp.concatenate(out, axis=-1))


class Head(nnx.Module):
    """One 1x1 conv (with bias) per level giving `values` numbers per anchor, flattened level by level to
    (B, anchors, values) in the priors' order (row, column, anchor). `name` is the torch ModuleList's name."""

    def __init__(self, name: str, cin: int, values: int, *, kw: dict):
        self.key, self.values = name, values
        setattr(self, name, nnx.List([_conv(cin, ANCHORS * values, 1, bias=True, kw=kw) for _ in STEPS]))

    def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
        convs = getattr(self, self.key)
        outs = [conv(f).reshape(f.shape[0], -1, self.values) for conv, f in zip(convs, features)]
        return jnp.concatenate(outs, axis=1)


class RetinaFace(nnx.Module):
    """RetinaFace. `model(x)` on mean-subtracted BGR NHWC float images (B, H, W, 3) returns float32
    `(loc (B, N, 4), conf (B, N, 2) softmax probabilities, landmarks (B, N, 10))` over the N priors of
    `priors((H, W))`; any H and W."""

    def __init__(self, config: RetinaFaceConfig | None = None, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        self.config = config = config or RetinaFaceConfig()
        self.dtype = dtype
        kind, arch, in_channel, out = NETWORKS[config.network]
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        eps = config.bn_eps
        if kind == "mobilenet_v1":
            self.fx = MobileNetV1(arch, kw=kw, eps=eps)
        else:
            self.fx = ResNet(BasicBlock if kind == "basic" else Bottleneck, arch, kw=kw, eps=eps)
        self.fpn = FPN([in_channel * 2, in_channel * 4, in_channel * 8], out, kw=kw, eps=eps)
        self.ssh1 = SSH(out, out, kw=kw, eps=eps)
        self.ssh2 = SSH(out, out, kw=kw, eps=eps)
        self.ssh3 = SSH(out, out, kw=kw, eps=eps)
        self.class_head = Head("class_head", out, 2, kw=kw)
        self.bbox_head = Head("bbox_head", out, 4, kw=kw)
        self.landmark_head = Head("landmark_head", out, 10, kw=kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"RetinaFace expects BGR NHWC images of shape (B, H, W, 3), got {x.shape}")
        fpn = self.fpn(self.fx(x.astype(self.dtype)))
        features = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), fpn)]
        f32 = jnp.float32
        loc = self.bbox_head(features).astype(f32)
        conf = jax.nn.softmax(self.class_head(features).astype(f32), axis=-1)
        return loc, conf, self.landmark_head(features).astype(f32)


def load(src: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, precision: Any = None) -> RetinaFace:
    """A RetinaFace model from a directory written by `python -m convert.retinaface` (no random init is run)."""
    config = RetinaFaceConfig.from_dict(weights.read_config(src, FAMILY))
    model = nnx.eval_shape(lambda: RetinaFace(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                              rngs=nnx.Rngs(0)))
    return weights.restore(model, src)


# ------------------------------------------------------------------------------------ detection


def priors(image_size: tuple[int, int]) -> np.ndarray:
    """The runtime's `PriorBox` for an (H, W) input: float32 (N, 4) rows (cx, cy, w, h) as fractions of the
    image, level by level, then row, column and anchor size."""
    height, width = image_size
    rows = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        ys, xs = np.meshgrid(np.arange(math.ceil(height / step)), np.arange(math.ceil(width / step)), indexing="ij")
        # (col + 0.5) * step / width in float64, then float32: the runtime's arithmetic, bit for bit.
        cx = np.repeat(((xs + 0.5) * step / width).reshape(-1), len(sizes))
        cy = np.repeat(((ys + 0.5) * step / height).reshape(-1), len(sizes))
        sk = np.tile(np.array(sizes, np.float64), xs.size)
        rows.append(np.stack([cx, cy, sk / width, sk / height], axis=1))
    return np.concatenate(rows).astype(np.float32)


def decode(loc: jax.Array, prior: jax.Array) -> jax.Array:
    """Box offsets (..., N, 4) against `prior` (N, 4) -> corners (x1, y1, x2, y2) as fractions of the image."""
    centers = prior[:, :2] + loc[..., :2] * VARIANCE[0] * prior[:, 2:]
    wh = prior[:, 2:] * jnp.exp(loc[..., 2:] * VARIANCE[1])
    return jnp.concatenate([centers - wh / 2, centers + wh / 2], axis=-1)


def decode_landmarks(pred: jax.Array, prior: jax.Array) -> jax.Array:
    """Landmark offsets (..., N, 10) against `prior` (N, 4) -> five (x, y) points as fractions of the image."""
    points = pred.reshape(*pred.shape[:-1], 5, 2)
    points = prior[:, None, :2] + points * VARIANCE[0] * prior[:, None, 2:]
    return points.reshape(pred.shape)


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS on (N, >= 5) rows [x1, y1, x2, y2, score, ...] (pixel boxes, +1 inclusive areas as the runtime):
    indices kept, highest score first."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[overlap <= threshold]
    return keep


@nnx.jit
def _raw_detections(model: RetinaFace, bgr: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 BGR (B, H, W, 3) -> pixel boxes (B, N, 4), face scores (B, N), pixel landmarks (B, N, 10)."""
    height, width = bgr.shape[1:3]
    loc, conf, landmarks = model(bgr.astype(jnp.float32) - jnp.asarray(BGR_MEAN, jnp.float32))
    prior = jnp.asarray(priors((height, width)))
    boxes = decode(loc, prior) * jnp.asarray([width, height] * 2, jnp.float32)
    points = decode_landmarks(landmarks, prior) * jnp.asarray([width, height] * 5, jnp.float32)
    return boxes, conf[..., 1], points


def resize_scale(height: int, width: int, resize_short: int) -> tuple[float, int, int]:
    """(scale, new height, new width) of the runtime's rule: the short edge is upscaled to `resize_short` when
    shorter (never downscaled; `resize_short <= 0` keeps the size); sides rounded half to even as Python's round."""
    if resize_short <= 0 or min(height, width) >= resize_short:
        return 1.0, height, width
    scale = resize_short / float(min(height, width))
    return scale, max(1, round(height * scale)), max(1, round(width * scale))


def detect_batch(model: RetinaFace, images: np.ndarray | Sequence[np.ndarray], *, threshold: float = 0.6,
                 resize_short: int = 640, nms_threshold: float = 0.4, top_k: int = 5000,
                 keep_top_k: int = 750) -> list[np.ndarray]:
    """`detect` on several uint8 RGB images of one size (B, H, W, 3), in one batched forward pass: one
    float32 (N_b, 15) array per image."""
    shapes = {np.shape(im) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"detect_batch: images must all have one size, got shapes {sorted(shapes)}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or 0 in images.shape[:3]:
        raise ValueError(f"detect: images must be uint8 RGB of shape (B, H, W, 3) (one size), got {images.dtype} "
                         f"{images.shape}")
    scale, height, width = resize_scale(*images.shape[1:3], resize_short)
    bgr = np.ascontiguousarray(images[..., ::-1])
    if scale != 1.0:
        bgr = np.stack([cv2.resize(im, (width, height), interpolation=cv2.INTER_LINEAR) for im in bgr])
    boxes, scores, points = jax.device_get(_raw_detections(model, jnp.asarray(bgr)))
    results = []
    for b in range(len(bgr)):
        keep = scores[b] > threshold
        order = scores[b][keep].argsort()[::-1][:top_k]
        dets = np.concatenate([boxes[b][keep][order], scores[b][keep][order, None]], axis=1).astype(np.float32)
        landmarks = points[b][keep][order]
        kept = nms(dets, nms_threshold)[:keep_top_k]
        dets, landmarks = dets[kept], landmarks[kept]
        if scale != 1.0:
            dets[:, :4] /= scale
            landmarks = landmarks / scale
        results.append(np.concatenate([dets, landmarks], axis=1).astype(np.float32))
    return results


def detect(model: RetinaFace, image: np.ndarray, *, threshold: float = 0.6, resize_short: int = 640,
           nms_threshold: float = 0.4, top_k: int = 5000, keep_top_k: int = 750) -> np.ndarray:
    """Faces in a uint8 RGB image (H, W, 3): float32 (N, 15) rows [x1, y1, x2, y2, score, 10 landmark
    coordinates: (x, y) of two eyes, the nose and two mouth corners, in the checkpoint's order] in the image's pixels,
    highest score first. `threshold` on the face probability, `top_k` boxes before NMS (IoU
    `nms_threshold`), `keep_top_k` after; the short edge is upscaled to `resize_short` when shorter."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect: image must be uint8 RGB of shape (H, W, 3), got {image.dtype} {image.shape}")
    return detect_batch(model, image[None], threshold=threshold, resize_short=resize_short,
                        nms_threshold=nms_threshold, top_k=top_k, keep_top_k=keep_top_k)[0]


__all__: Sequence[str] = [
    "FAMILY", "NETWORKS", "RetinaFace", "RetinaFaceConfig", "decode", "decode_landmarks", "detect", "detect_batch",
    "load", "nms", "priors", "resize_scale",
]
