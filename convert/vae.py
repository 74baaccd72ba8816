"""Converts the FLUX.2 VAE to a weight directory for `iconface_jax.models.vae.load`.

    python -m convert.vae --src PATH --dst DIR [--dtype bf16|float32]

PATH is any of:
- a diffusers `vae/` directory (`diffusion_pytorch_model.safetensors` + `config.json`), or a model
  repository whose `vae/` subdirectory is one;
- the diffusers safetensors file alone (a `config.json` of an `AutoencoderKLFlux2` beside it is used);
- Black Forest Labs' single file (`ae.safetensors` of FLUX.2: `encoder.down.0.block.0.norm1.weight`,
  `encoder.mid.attn_1.q.weight` as 1x1 convolutions, `encoder.quant_conv`, `decoder.post_quant_conv`,
  `decoder.up.N` numbered from the highest resolution, `bn.running_mean`).
Without a config.json the config is read off the tensor shapes; the hyperparameters that leave no
trace in the shapes take the FLUX.2 values (32 norm groups, BatchNorm eps 1e-4).
The BatchNorm running statistics are always stored in float32; `bn.num_batches_tracked` is dropped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

from convert import common
from convert.safetensors_file import Reader
from iconface_jax import weights
from iconface_jax.models import vae

IGNORED = ("bn.num_batches_tracked",)  # BatchNorm's step counter: an int64 scalar of no use here
CONFIG_FILE = "config.json"


def bfl_name(key: str, num_up: int) -> str:
    """The Black Forest Labs name of the diffusers key `key`; `num_up` is the number of decoder levels."""
    up = lambda m: f"decoder.up.{num_up - 1 - int(m[1])}."
    rules: list[tuple[str, str | Callable[[re.Match], str]]] = [
        (r"^quant_conv\.", "encoder.quant_conv."),
        (r"^post_quant_conv\.", "decoder.post_quant_conv."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: up(m) + f"block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m) + "upsample."),
        (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _where(reader: Reader) -> str:
    return ", ".join(sorted({i.path for i in reader.infos.values()}))


def _count(reader: Reader, key: Callable[[int], str]) -> int:
    """How many consecutive indices i from 0 have `key(i)` in the source."""
    n = 0
    while key(n) in reader.infos:
        n += 1
    return n


def infer_config(reader: Reader, name: Callable[[str], str]) -> vae.VAEConfig:
    """The config read off the tensor shapes; `name` maps a diffusers key to the source's key."""
    def shape(key: str) -> tuple[int, ...]:
        if name(key) not in reader.infos:
            raise common.ConversionError(f"{_where(reader)}: missing tensor {name(key)!r} (needed to infer the config)")
        return reader.infos[name(key)].shape

    levels = _count(reader, lambda i: name(f"encoder.down_blocks.{i}.resnets.0.conv1.weight"))
    up_levels = _count(reader, lambda i: name(f"decoder.up_blocks.{i}.resnets.0.conv1.weight"))
    if not levels or not up_levels:
        first = name("encoder.down_blocks.0.resnets.0.conv1.weight")
        raise common.ConversionError(f"{_where(reader)}: missing tensor {first!r}")
    chs = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    dec = tuple(shape(f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(up_levels))[::-1]
    latent = shape("decoder.conv_in.weight")[1]
    bn = shape("bn.running_mean")[0]
    p = math.isqrt(bn // latent)
    if p * p * latent != bn:
        raise common.ConversionError(f"{_where(reader)}: tensor {name('bn.running_mean')!r} has {bn} channels, "
                                     f"not a square patch of {latent} latent channels")
    config = vae.VAEConfig(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=chs,
        decoder_block_out_channels=None if dec == chs else dec,
        layers_per_block=_count(reader, lambda j: name(f"encoder.down_blocks.0.resnets.{j}.conv1.weight")),
        latent_channels=latent,
        use_quant_conv=name("quant_conv.weight") in reader.infos,
        use_post_quant_conv=name("post_quant_conv.weight") in reader.infos,
        mid_block_add_attention=name("encoder.mid_block.attentions.0.to_q.weight") in reader.infos,
        patch_size=(p, p),
    )
    bad = [c for c in chs + dec if c % config.norm_num_groups]
    if bad:
        raise common.ConversionError(f"{_where(reader)}: channels {bad} do not split into {config.norm_num_groups} "
                                     f"norm groups; put the model's {CONFIG_FILE} beside the file")
    return config


def config_from_diffusers(path: str) -> vae.VAEConfig:
    """Our config from a diffusers `AutoencoderKLFlux2` config.json (unsupported variants are errors)."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise common.ConversionError(f"{path}: unreadable config ({e})") from None
    if d.get("_class_name", "AutoencoderKLFlux2") != "AutoencoderKLFlux2":
        raise common.ConversionError(f"{path}: describes a {d['_class_name']}, not an AutoencoderKLFlux2")
    for key, want in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
        if any(t != want for t in d.get(key, [])):
            raise common.ConversionError(f"{path}: {key} {d[key]} unsupported (only {want})")
    if d.get("act_fn", "silu") not in ("silu", "swish"):
        raise common.ConversionError(f"{path}: act_fn {d['act_fn']!r} unsupported (only silu)")
    fields = {f.name for f in dataclasses.fields(vae.VAEConfig)} - {"remat_decoder"}
    config = vae.VAEConfig.from_dict({k: v for k, v in d.items() if k in fields})
    n = len(config.block_out_channels)
    if len(d.get("down_block_types", [None] * n)) != n or len(d.get("up_block_types", [None] * n)) != n:
        raise common.ConversionError(f"{path}: block type lists and block_out_channels differ in length")
    return config


def _find(src: str) -> tuple[str, str | None]:
    """The safetensors source (file or directory) and the diffusers config.json to use, if any."""
    if (os.path.isdir(src) and not os.path.isfile(os.path.join(src, CONFIG_FILE))
            and os.path.isdir(os.path.join(src, "vae"))):
        src = os.path.join(src, "vae")
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config):
        return src, None
    if os.path.isdir(src):
        return src, config
    try:  # beside a lone file, only a config that describes this model counts
        with open(config) as f:
            return src, config if json.load(f).get("_class_name") == "AutoencoderKLFlux2" else None
    except (OSError, json.JSONDecodeError, AttributeError):
        return src, None


def plan(reader: Reader, config_path: str | None) -> tuple[dict, dict[str, common.Entry]]:
    """The config and one `Entry` per model variable, named after the detected layout (diffusers or BFL)."""
    keys = reader.infos
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        layout, name = "diffusers", lambda k: k
    elif "encoder.down.0.block.0.conv1.weight" in keys:
        num_up = _count(reader, lambda i: f"decoder.up.{i}.block.0.conv1.weight")
        layout, name = "bfl", lambda k: bfl_name(k, num_up)
    else:
        raise common.ConversionError(f"{_where(reader)}: not a FLUX.2 VAE checkpoint (no tensor "
                                     f"'encoder.down_blocks.0.resnets.0.conv1.weight' nor "
                                     f"'encoder.down.0.block.0.conv1.weight')")
    if config_path is not None and layout == "diffusers":
        config = config_from_diffusers(config_path)
    else:
        config = infer_config(reader, name)
    model = vae.abstract(config)
    out = {}
    for key, var in weights.named_params(model, (nnx.Param, nnx.BatchStat)).items():
        shape = tuple(var.get_value().shape)
        path, leaf = key.rsplit(".", 1)
        if leaf == "kernel" and len(shape) == 4:  # conv: torch OIHW -> HWIO
            entry = common.Entry((name(path + ".weight"),), ((shape[3], shape[2], shape[0], shape[1]),),
                                 lambda w: w.transpose(2, 3, 1, 0))
        elif leaf == "kernel" and layout == "bfl":  # attention projection stored as a 1x1 conv
            entry = common.Entry((name(path + ".weight"),), ((shape[1], shape[0], 1, 1),), lambda w: w[:, :, 0, 0].T)
        elif leaf == "kernel":  # linear: torch (out, in) -> (in, out)
            entry = common.Entry((name(path + ".weight"),), ((shape[1], shape[0]),), lambda w: w.T)
        elif leaf == "scale":
            entry = common.Entry((name(path + ".weight"),), (shape,))
        elif isinstance(var, nnx.BatchStat):  # latent statistics stay float32 whatever --dtype says
            entry = common.Entry((name(key),), (shape,), dtype=np.dtype(np.float32))
        else:  # bias
            entry = common.Entry((name(key),), (shape,))
        out[key] = entry
    return config.to_dict(), out


def convert(src: str, dst: str, dtype: np.dtype) -> None:
    """Checks the whole source against the model before reading data; writes `dst` atomically or not at all."""
    path, config_path = _find(src)
    common.convert(path, dst, dtype, vae.FAMILY, lambda reader: plan(reader, config_path), ignore=IGNORED)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return common.cli("Convert the FLUX.2 VAE (diffusers or BFL layout) for iconface_jax.", convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
