"""Convert an insightface arcface_torch IResNet state dict to the Flax layout of `iconface_jax.models.arcface`.

    python -m convert.arcface --src backbone.pth --dst weights/arcface_r50 [--dtype float32]

Sources: the arcface_torch releases' `backbone.pth` (a plain `torch.save(state_dict)`, optionally under
DataParallel's `module.` or Lightning's `model.` prefix) or a safetensors file of the same keys.
PyTorch pickles are read safely (`convert.recognition`: `--allow-unsafe-pickle` only for files you trust).

The architecture (R18/34/50/100/200) is inferred from the number of blocks in `layer1` .. `layer4`.
The conversion is a mechanical rename (`weight` -> `kernel` / `scale` / `negative_slope`,
`running_mean` -> `mean`, `running_var` -> `var`) plus layouts: conv OIHW -> HWIO, linear (out, in)
-> (in, out). The model flattens its last feature map in channel-major order, so the `fc` rows need no
permutation.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from convert import recognition
from convert.common import ConversionError, Entry
from convert.recognition import (OfficialPlan, add_batchnorm, block_indices, conv_kernel, find_prefix,
                                 linear_kernel, plan_entries, source_name)
from convert.safetensors_file import Reader
from iconface_jax.models.arcface import ARCHS, FAMILY, STAGES, ArcFaceConfig

ROOTS = ("conv1.", "bn1.", "prelu.", *(f"{s}." for s in STAGES), "bn2.", "fc.", "features.")


def official_plan(config: ArcFaceConfig) -> OfficialPlan:
    """{our parameter name: (official state-dict key, official shape, transform or None)}; our names are theirs."""
    plan: OfficialPlan = {}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        plan[f"{name}.kernel"] = (f"{name}.weight", shape, conv_kernel)

    def bn(name: str, channels: int) -> None:
        add_batchnorm(plan, name, name, channels)

    c0 = config.channels[0]
    conv("conv1", (c0, 3, 3, 3))
    bn("bn1", c0)
    plan["prelu.negative_slope"] = ("prelu.weight", (c0,), None)
    in_ch = c0
    for stage, depth, n in zip(STAGES, config.channels, config.units):
        for i in range(n):
            cin, p = (in_ch if i == 0 else depth), f"{stage}.{i}"
            bn(f"{p}.bn1", cin)
            conv(f"{p}.conv1", (depth, cin, 3, 3))
            bn(f"{p}.bn2", depth)
            plan[f"{p}.prelu.negative_slope"] = (f"{p}.prelu.weight", (depth,), None)
            conv(f"{p}.conv2", (depth, depth, 3, 3))
            bn(f"{p}.bn3", depth)
            if i == 0:  # stride 2 opens every stage: a projection shortcut even where the width stays
                conv(f"{p}.downsample.0", (depth, cin, 1, 1))
                bn(f"{p}.downsample.1", depth)
        in_ch = depth
    c, f = config.channels[-1], config.feature_size
    bn("bn2", c)
    plan["fc.kernel"] = ("fc.weight", (config.embed_dim, c * f * f), linear_kernel)
    plan["fc.bias"] = ("fc.bias", (config.embed_dim,), None)
    bn("features", config.embed_dim)
    return plan


def infer_config(reader: Reader, src: str | None = None) -> tuple[ArcFaceConfig, str]:
    """(config, key prefix) of the IResNet in `reader`: the architecture from the blocks per stage."""
    prefix = find_prefix(reader.infos, ROOTS)
    counts = tuple(max(block_indices(reader.infos, prefix, stage), default=-1) + 1 for stage in STAGES)
    if not any(counts):
        raise ConversionError(f"{source_name(reader, src)}: not an ArcFace IResNet state dict: no "
                              f"'{prefix}layer1.N.*' .. '{prefix}layer4.N.*' tensors (first keys: "
                              f"{list(reader.infos)[:3]})")
    for per_stage in ARCHS.values():
        if per_stage == counts:
            return ArcFaceConfig(units=per_stage), prefix
    known = ", ".join(f"{a.upper()} {u}" for a, u in ARCHS.items())
    raise ConversionError(f"{source_name(reader, src)}: blocks per stage {counts} ('{prefix}layer1' .. "
                          f"'{prefix}layer4') match no known IResNet: {known}")


def plan(reader: Reader, src: str | None = None) -> tuple[dict, dict[str, Entry]]:
    """(config dict, {our parameter name: Entry over the source keys}) for the network in `reader`."""
    config, prefix = infer_config(reader, src)
    return config.to_dict(), plan_entries(official_plan(config), prefix)


def convert(src: str, dst: str, dtype: np.dtype = np.dtype(np.float32), *, allow_unsafe_pickle: bool = False,
            log=print) -> ArcFaceConfig:
    """Reads, checks and writes one conversion; nothing is written on error."""
    def describe(config: dict) -> str:
        return f"ArcFace IResNet {config['arch'].upper()} (blocks per stage {', '.join(map(str, config['units']))})"

    config = recognition.convert(src, dst, dtype, FAMILY, plan, describe, allow_unsafe_pickle=allow_unsafe_pickle,
                                 log=log)
    return ArcFaceConfig.from_dict(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return recognition.main(__doc__.split("\n\n")[0], convert, argv)


if __name__ == "__main__":
    sys.exit(main())
