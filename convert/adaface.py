"""Convert an official AdaFace IR checkpoint to the Flax layout of `iconface_jax.models.adaface`.

    python -m convert.adaface --src adaface_ir50_ms1mv2.ckpt --dst weights/adaface_ir50 [--dtype float32]

Sources: the official release (a PyTorch Lightning checkpoint: `state_dict` with `model.` prefixes,
beside the margin head's `head.kernel` and training state, all ignored), a bare state dict
(`.pt`/`.pth`, with or without the `model.` prefix) or a safetensors file. PyTorch pickles are read
safely (`convert.recognition`: `--allow-unsafe-pickle` only for files you trust).

The architecture (IR-18/34/50/101) is inferred from the number of body units. The conversion is a
mechanical rename (`weight` -> `kernel` / `scale` / `negative_slope`, `running_mean` -> `mean`,
`running_var` -> `var`) plus layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out). The model
flattens its last feature map in channel-major order, so the Linear rows need no permutation.
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
from iconface_jax.models.adaface import ARCHS, FAMILY, AdaFaceConfig

IGNORED_PREFIXES = ("head.",)  # the training-time margin head (`head.kernel`)


def official_plan(config: AdaFaceConfig) -> OfficialPlan:
    """{our parameter name: (official state-dict key, official shape, transform or None)}."""
    plan: OfficialPlan = {}
    c0 = config.channels[0]
    plan["input_layer.0.kernel"] = ("input_layer.0.weight", (c0, 3, 3, 3), conv_kernel)
    add_batchnorm(plan, "input_layer.1", "input_layer.1", c0)
    plan["input_layer.2.negative_slope"] = ("input_layer.2.weight", (c0,), None)
    index, in_ch = 0, c0
    for depth, n in zip(config.channels, config.units):
        for i in range(n):
            cin = in_ch if i == 0 else depth
            p = f"body.{index}"
            add_batchnorm(plan, f"{p}.res_layer.0", f"{p}.res_layer.0", cin)
            plan[f"{p}.res_layer.1.kernel"] = (f"{p}.res_layer.1.weight", (depth, cin, 3, 3), conv_kernel)
            add_batchnorm(plan, f"{p}.res_layer.2", f"{p}.res_layer.2", depth)
            plan[f"{p}.res_layer.3.negative_slope"] = (f"{p}.res_layer.3.weight", (depth,), None)
            plan[f"{p}.res_layer.4.kernel"] = (f"{p}.res_layer.4.weight", (depth, depth, 3, 3), conv_kernel)
            add_batchnorm(plan, f"{p}.res_layer.5", f"{p}.res_layer.5", depth)
            if cin != depth:
                plan[f"{p}.shortcut_layer.0.kernel"] = (f"{p}.shortcut_layer.0.weight", (depth, cin, 1, 1),
                                                        conv_kernel)
                add_batchnorm(plan, f"{p}.shortcut_layer.1", f"{p}.shortcut_layer.1", depth)
            index += 1
        in_ch = depth
    c, f = config.channels[-1], config.feature_size
    add_batchnorm(plan, "output_layer.0", "output_layer.0", c)
    plan["output_layer.3.kernel"] = ("output_layer.3.weight", (config.embed_dim, c * f * f), linear_kernel)
    plan["output_layer.3.bias"] = ("output_layer.3.bias", (config.embed_dim,), None)
    add_batchnorm(plan, "output_layer.4", "output_layer.4", config.embed_dim, affine=False)
    return plan


def _ignored(key: str) -> bool:
    bare = key[len("model."):] if key.startswith("model.") else key
    return key.startswith(IGNORED_PREFIXES) or bare.startswith(IGNORED_PREFIXES)


def infer_config(reader: Reader, src: str | None = None) -> tuple[AdaFaceConfig, str]:
    """(config, key prefix) of the AdaFace network in `reader`: the architecture from the body unit count."""
    prefix = find_prefix(reader.infos, ("input_layer.", "body.", "output_layer."))
    units = block_indices(reader.infos, prefix, "body")
    if not units:
        raise ConversionError(f"{source_name(reader, src)}: not an AdaFace IR checkpoint: no '{prefix}body.N.*' "
                              f"tensors (first keys: {list(reader.infos)[:3]})")
    total = max(units) + 1
    for per_stage in ARCHS.values():
        if sum(per_stage) == total:
            return AdaFaceConfig(units=per_stage), prefix
    known = ", ".join(f"{a.upper().replace('_', '-')} ({sum(u)})" for a, u in ARCHS.items())
    raise ConversionError(f"{source_name(reader, src)}: {total} body units ('{prefix}body.0' .. "
                          f"'{prefix}body.{total - 1}') match no known AdaFace architecture: {known}")


def plan(reader: Reader, src: str | None = None) -> tuple[dict, dict[str, Entry]]:
    """(config dict, {our parameter name: Entry over the source keys}) for the network in `reader`."""
    config, prefix = infer_config(reader, src)
    return config.to_dict(), plan_entries(official_plan(config), prefix)


def convert(src: str, dst: str, dtype: np.dtype = np.dtype(np.float32), *, allow_unsafe_pickle: bool = False,
            log=print) -> AdaFaceConfig:
    """Reads, checks and writes one conversion; nothing is written on error."""
    def describe(config: dict) -> str:
        return (f"AdaFace {config['arch'].upper().replace('_', '-')} (body units per stage "
                f"{', '.join(map(str, config['units']))})")

    config = recognition.convert(src, dst, dtype, FAMILY, plan, describe, allow_unsafe_pickle=allow_unsafe_pickle,
                                 ignored=_ignored, log=log)
    return AdaFaceConfig.from_dict(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return recognition.main(__doc__.split("\n\n")[0], convert, argv)


if __name__ == "__main__":
    sys.exit(main())
