"""`python -m convert.flux2 --src PATH --dst DIR`: FLUX.2 transformer weights to a JAX weight directory.

Reads the diffusers layout (`transformer/` with sharded safetensors and their index, or one file) and
Black Forest Labs' single-file layout (`flux-2-klein-base-4b.safetensors`, optionally prefixed
`model.diffusion_model.`). BFL fuses q, k, v (split here) and orders the output modulation
(shift, scale) where diffusers has (scale, shift) (swapped here). The preset is inferred from shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from flax import nnx

from convert.common import ConversionError, Entry, cli, convert
from convert.safetensors_file import Reader
from iconface_jax import weights
from iconface_jax.models import flux2

BFL_PREFIX = "model.diffusion_model."

# diffusers name -> BFL name, for every piece that is a plain rename (double-block names are per block).
_BFL_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_BFL_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_BFL_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
            "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
            "attn.add_v_proj": ("txt_attn.qkv", 2)}
_BFL_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
               "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def diffusers_key(param_path: str) -> str:
    """The diffusers state-dict key of one of our parameter paths."""
    module, leaf = param_path.rsplit(".", 1)
    return f"{module}.weight" if leaf in ("kernel", "scale") else param_path


def bfl_source(key: str) -> tuple[str, int | None, bool]:
    """The BFL key holding diffusers `key`: (name, slot in a fused qkv or None, halves swapped)."""
    module, leaf = key.rsplit(".", 1)
    bfl_leaf = "scale" if ".norm_" in module else leaf
    if module == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", None, True
    if module in _BFL_TOP:
        return f"{_BFL_TOP[module]}.{leaf}", None, False
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if not m:
        raise ConversionError(f"internal: no BFL name for {key!r}")
    kind, index, inner = m.groups()
    if kind == "single_transformer_blocks":
        return f"single_blocks.{index}.{_BFL_SINGLE[inner]}.{bfl_leaf}", None, False
    if inner in _BFL_QKV:
        fused, slot = _BFL_QKV[inner]
        return f"double_blocks.{index}.{fused}.{leaf}", slot, False
    return f"double_blocks.{index}.{_BFL_DOUBLE[inner]}.{bfl_leaf}", None, False


def _layout(reader: Reader) -> tuple[str, str]:
    """('diffusers' | 'bfl', key prefix), or an error naming what was found instead."""
    keys = reader.infos
    if "double_stream_modulation_img.linear.weight" in keys:
        return "diffusers", ""
    for prefix in ("", BFL_PREFIX):
        if f"{prefix}double_stream_modulation_img.lin.weight" in keys:
            return "bfl", prefix
    where = ", ".join(sorted({i.path for i in keys.values()}))
    hint = (" (per-block modulation: a FLUX.1 checkpoint?)"
            if any("img_mod.lin" in k or "norm1.linear" in k for k in keys) else "")
    raise ConversionError(f"{where}: not a FLUX.2 transformer checkpoint: no shared modulation "
                          f"'double_stream_modulation_img' found{hint}")


def _diffusers_shapes(reader: Reader, layout: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """Source tensor shapes under diffusers names (fused BFL qkv counted as three)."""
    if layout == "diffusers":
        return {k: v.shape for k, v in reader.infos.items()}
    inverse = {}
    for key, info in reader.infos.items():
        if not key.startswith(prefix):
            continue
        inverse[key[len(prefix):]] = info.shape
    out = {}
    names = [f"{m}.weight" for m in _BFL_TOP] + ["norm_out.linear.weight"]
    for i in {int(k.split(".")[1]) for k in inverse if k.startswith("double_blocks.")}:
        names += [f"transformer_blocks.{i}.{m}.weight" for m in [*_BFL_DOUBLE, *_BFL_QKV]]
    for i in {int(k.split(".")[1]) for k in inverse if k.startswith("single_blocks.")}:
        names += [f"single_transformer_blocks.{i}.{m}.weight" for m in _BFL_SINGLE]
    for name in names:
        src, slot, _ = bfl_source(name)
        if src in inverse:
            shape = inverse[src]
            out[name] = (shape[0] // 3, *shape[1:]) if slot is not None else shape
    return out


def infer_config(shapes: dict[str, tuple[int, ...]], stored: dict | None, where: str) -> tuple[flux2.Flux2Config, str]:
    """The architecture from tensor shapes (and a diffusers config.json when present); the preset's name."""
    def shape(key):
        if key not in shapes:
            raise ConversionError(f"{where}: missing tensor {key!r}")
        return shapes[key]

    hidden, in_channels = shape("x_embedder.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    fields = dict(
        in_channels=in_channels,
        num_layers=len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}),
        num_single_layers=len({k.split(".")[1] for k in shapes if k.startswith("single_transformer_blocks.")}),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("context_embedder.weight")[1],
        timestep_guidance_channels=shape("time_guidance_embed.timestep_embedder.linear_1.weight")[1],
        mlp_ratio=shape("transformer_blocks.0.ff.linear_out.weight")[1] / hidden,
        guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
    )
    # RoPE split, theta and eps have no tensor: take them from config.json, else from the matching preset.
    for name, preset in flux2.PRESETS.items():
        if all(getattr(preset, k) == v for k, v in fields.items()):
            base, found = preset, name
            break
    else:
        base, found = flux2.Flux2Config(axes_dims_rope=(head_dim // 4,) * 4), "custom"
    if stored:
        fields.update({k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
                       if k in ("axes_dims_rope", "rope_theta", "eps")})
    return dataclasses.replace(base, **fields), found


def plan(reader: Reader) -> tuple[dict, dict[str, Entry]]:
    """The output parameters of the model the source holds, each with its source tensor and transform."""
    layout, prefix = _layout(reader)
    where = ", ".join(sorted({i.path for i in reader.infos.values()}))
    config_json = os.path.join(os.path.dirname(next(iter(reader.infos.values())).path), "config.json")
    stored = None
    if layout == "diffusers" and os.path.isfile(config_json):
        with open(config_json) as f:
            stored = json.load(f)
    cfg, found = infer_config(_diffusers_shapes(reader, layout, prefix), stored, where)
    print(f"{where}: {layout} layout, preset {found} ({cfg.num_layers} double + {cfg.num_single_layers} single "
          f"blocks, hidden {cfg.hidden_size})", file=sys.stderr)
    model = nnx.eval_shape(lambda: flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0)))
    entries = {}
    for path, var in weights.base_params(model).items():
        key, shape = diffusers_key(path), tuple(var.get_value().shape)
        torch_shape = shape[::-1] if path.endswith(".kernel") else shape
        transpose = (lambda w: w.T) if path.endswith(".kernel") else (lambda w: w)
        if layout == "diffusers":
            entries[path] = Entry((key,), (torch_shape,), transpose)
            continue
        src, slot, swapped = bfl_source(key)
        if slot is not None:
            n = torch_shape[0]
            entries[path] = Entry((prefix + src,), ((3 * n, *torch_shape[1:]),),
                                  lambda w, s=slot, n=n, t=transpose: t(w[s * n:(s + 1) * n]))
        elif swapped:
            entries[path] = Entry((prefix + src,), (torch_shape,),
                                  lambda w, t=transpose: t(np.concatenate(np.split(w, 2, axis=0)[::-1], axis=0)))
        else:
            entries[path] = Entry((prefix + src,), (torch_shape,), transpose)
    return dataclasses.asdict(cfg), entries


def convert_flux2(src: str, dst: str, dtype: np.dtype) -> None:
    """Converts a FLUX.2 transformer checkpoint at `src` into a weight directory at `dst`."""
    convert(src, dst, dtype, flux2.FAMILY, plan)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return cli(__doc__.splitlines()[0], convert_flux2, argv)


if __name__ == "__main__":
    raise SystemExit(main())
