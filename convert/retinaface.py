"""Convert a RetinaFace checkpoint (the IConFace authors' runtime layout, or biubug6's) to our Flax layout.

    python -m convert.retinaface --src retinaface_r34.pth --dst weights/retinaface_r34 [--network resnet34]

Sources: a PyTorch state dict (`.pth`, optionally nested under `state_dict`, keys optionally prefixed `module.`
or `model.` as the runtime strips them) or a safetensors file, with the runtime's keys (`fx.layer1.0.conv1.weight`,
`fpn.output1.0.weight`, `ssh1.conv3X3.0.weight`, `class_head.class_head.0.weight`, ...) or those of
biubug6/Pytorch_Retinaface and facexlib (`body.layer1.0.conv1.weight`, `ClassHead.0.conv1x1.weight`, ...: their
`Resnet50_Final.pth`, `mobilenet0.25_Final.pth`, facexlib's `detection_Resnet50_Final.pth`). PyTorch pickles are
read with `torch.load(weights_only=True)` (`convert.recognition`; `--allow-unsafe-pickle` only for files you trust).

`--network` (resnet18, resnet34, resnet50, mobilenetv1_0.25, mobilenetv1_0.50, mobilenetv1) is inferred from the
keys when not given. The conversion is a rename (`weight` -> `kernel` for convs, `scale` for BatchNorm;
`running_mean` / `running_var` -> `mean` / `var`) plus the conv layout OIHW -> HWIO.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from flax import nnx

from convert import recognition
from convert.common import ConversionError, Entry, cli
from convert.recognition import (UNSAFE_FLAG, UNSAFE_HELP, OfficialPlan, block_indices, conv_kernel, find_prefix,
                                 plan_entries, source_name)
from convert.safetensors_file import Reader
from iconface_jax import weights
from iconface_jax.models.retinaface import FAMILY, NETWORKS, RetinaFace, RetinaFaceConfig

ROOTS = ("fx.", "fpn.", "ssh1.", "ssh2.", "ssh3.", "class_head.", "bbox_head.", "landmark_head.")
# biubug6/Pytorch_Retinaface (and facexlib, whose `detection_Resnet50_Final.pth` GFPGAN and CodeFormer use) name the
# same network differently: `body.` for `fx.`, a `<Kind>Head.N.conv1x1` module per level, and MobileNet's
# depthwise-separable block as one flat Sequential [dw conv, BN, act, pw conv, BN, act].
BIUBUG6_ROOTS = ("body.", "ClassHead.", "BboxHead.", "LandmarkHead.")
BIUBUG6_HEADS = {"class_head.class_head": "ClassHead", "bbox_head.bbox_head": "BboxHead",
                 "landmark_head.landmark_head": "LandmarkHead"}
# Our parameter's last name -> the torch one (a conv's `kernel` and a BatchNorm's `scale` are both `weight`).
RENAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# The first MobileNet conv's output channels -> the width of `mobilenetv1*` (`_make_divisible(32 * width)`).
MOBILENET_STEM = {8: "mobilenetv1_0.25", 16: "mobilenetv1_0.50", 32: "mobilenetv1"}


def official_plan(config: RetinaFaceConfig) -> OfficialPlan:
    """{our parameter name: (runtime state-dict key, shape, transform or None)}, read off the model itself:
    every path mirrors the torch module path, so only the last name and the conv layout change."""
    model = nnx.eval_shape(lambda: RetinaFace(config, rngs=nnx.Rngs(0)))
    plan: OfficialPlan = {}
    for name, var in weights.base_params(model).items():
        path, leaf = name.rsplit(".", 1)
        shape = tuple(var.get_value().shape)
        if leaf == "kernel":  # HWIO -> OIHW
            plan[name] = (f"{path}.weight", (shape[3], shape[2], shape[0], shape[1]), conv_kernel)
        else:
            plan[name] = (f"{path}.{RENAMES[leaf]}", shape, None)
    return plan


def biubug6_key(key: str) -> str:
    """The biubug6 / facexlib name of a runtime state-dict key (`fx.stage1.1.1.0.weight` -> `body.stage1.1.3.weight`,
    `class_head.class_head.2.bias` -> `ClassHead.2.conv1x1.bias`)."""
    for ours, theirs in BIUBUG6_HEADS.items():
        if key.startswith(ours + "."):
            level, leaf = key[len(ours) + 1:].split(".")
            return f"{theirs}.{level}.conv1x1.{leaf}"
    parts = key.split(".")
    if parts[0] == "fx":
        parts[0] = "body"
        if parts[1].startswith("stage") and len(parts) == 6:  # stageS.block.{dw, pw}.{conv, BN}.leaf: flatten
            parts[3:5] = [str(int(parts[3]) * 3 + int(parts[4]))]
    return ".".join(parts)


def infer_network(reader: Reader, backbone: str, src: str | None = None) -> str:
    """The runtime network name of the checkpoint in `reader`, whose backbone keys start with `backbone`
    (`fx.`, `module.fx.`, `body.`, ...)."""
    keys = reader.infos
    name = source_name(reader, src)
    if f"{backbone}layer1.0.conv3.weight" in keys:
        return "resnet50"
    blocks = block_indices(keys, backbone, "layer3")
    if blocks:
        by_blocks = {NETWORKS[n][1][2]: n for n in ("resnet18", "resnet34")}
        if max(blocks) + 1 not in by_blocks:
            raise ConversionError(f"{name}: {max(blocks) + 1} basic blocks in '{backbone}layer3' match no known "
                                  f"RetinaFace ResNet (resnet18: 2, resnet34: 6)")
        return by_blocks[max(blocks) + 1]
    stem = keys.get(f"{backbone}stage1.0.0.weight")
    if stem is not None:
        if stem.shape[0] not in MOBILENET_STEM:
            raise ConversionError(f"{name}: tensor '{backbone}stage1.0.0.weight' has {stem.shape[0]} output "
                                  f"channels, no known MobileNet v1 width ({sorted(MOBILENET_STEM)})")
        return MOBILENET_STEM[stem.shape[0]]
    if any(k.startswith(f"{backbone}features.") for k in keys):
        raise ConversionError(f"{name}: a MobileNet v2 RetinaFace ('{backbone}features.*'), which is not supported; "
                              f"supported networks: {', '.join(NETWORKS)}")
    raise ConversionError(f"{name}: not a RetinaFace checkpoint (the authors' runtime or biubug6 layout): no "
                          f"'{backbone}layer3.*' or '{backbone}stage1.*' tensors (first keys: {list(keys)[:3]})")


def convert(src: str, dst: str, dtype: np.dtype = np.dtype(np.float32), *, network: str | None = None,
            allow_unsafe_pickle: bool = False, log=print) -> RetinaFaceConfig:
    """Reads, checks and writes one conversion (`network` inferred from the keys when None); nothing is written
    on error."""
    if network is not None and network not in NETWORKS:
        raise ConversionError(f"--network {network!r} is not a known RetinaFace network: {', '.join(NETWORKS)}")

    def plan(reader: Reader, src: str | None = None) -> tuple[dict, dict[str, Entry]]:
        prefix = find_prefix(reader.infos, ROOTS + BIUBUG6_ROOTS)
        biubug6 = any(k.startswith(tuple(prefix + root for root in BIUBUG6_ROOTS)) for k in reader.infos)
        config = RetinaFaceConfig(network or infer_network(reader, prefix + ("body." if biubug6 else "fx."), src))
        official = official_plan(config)
        if biubug6:
            official = {name: (biubug6_key(key), shape, fn) for name, (key, shape, fn) in official.items()}
        return config.to_dict(), plan_entries(official, prefix)

    config = recognition.convert(src, dst, dtype, FAMILY, plan, lambda c: f"RetinaFace {c['network']}",
                                 allow_unsafe_pickle=allow_unsafe_pickle, log=log)
    return RetinaFaceConfig.from_dict(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return cli(__doc__.split("\n\n")[0], convert, argv, default_dtype="float32", flags=[(UNSAFE_FLAG, UNSAFE_HELP)],
               options=[("--network", f"one of {', '.join(NETWORKS)} (default: inferred from the keys)")])


if __name__ == "__main__":
    sys.exit(main())
