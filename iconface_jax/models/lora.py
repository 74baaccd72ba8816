"""LoRA on any model built from `layers.Linear`: attach, select, count and merge low-rank adapters.

Targets are named as diffusers and peft name modules; a target matches a Linear whose dotted path
equals it or ends with "." + target (peft's rule), and `*` matches one path component. Trainable
LoRA state is everything of type `nnx.LoRAParam`, so optimizers and checkpoints select it by filter.
`PRESETS` names the target sets a config chooses from (`model.lora.targets`); `restore` fills a model's
adapters from a directory written by `python -m convert.lora`.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
from flax import nnx

from iconface_jax import weights
from iconface_jax.models.layers import Linear

# The first default (docs/decisions.md#lora-targets): every attention map of both block kinds, 18,677,760
# parameters at rank 16 on klein-base-4B. In the double blocks the image output map is `to_out.0`; the single
# blocks' is `to_out`.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")
FEED_FORWARD_TARGETS = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# The IConFace authors' presets (their lora.py), in diffusers terms. `flux2_klein`: BFL's img_attn.qkv and
# img_attn.proj (image-side double-block attention) and the single blocks' fused linear1 / linear2;
# `flux2_klein_full` adds the text side and both MLPs, i.e. every Linear of every block.
FLUX2_KLEIN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out")
PRESETS = {
    "attention": DEFAULT_TARGETS,
    "flux2_klein": FLUX2_KLEIN_TARGETS,
    "flux2_klein_full": DEFAULT_TARGETS + FEED_FORWARD_TARGETS,
}
FAMILY = "lora"  # converted adapter directories (`python -m convert.lora`)

trainable = nnx.LoRAParam  # the NNX filter that selects LoRA factors


def linears(model: nnx.Module) -> dict[str, Linear]:
    """Every `Linear` in the model, keyed by its dotted path."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}


def matches(path: str, target: str) -> bool:
    """peft's rule (equal, or a dotted suffix), with `*` standing for one path component."""
    parts, want = path.split("."), target.split(".")
    return len(parts) >= len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts[-len(want):], want))


def add_lora(model: nnx.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
             seed: int = 0) -> list[str]:
    """Attaches rank-`rank` adapters (scale alpha / rank) to the targeted Linears; returns their paths."""
    rngs = nnx.Rngs(seed)
    chosen = [name for name, layer in linears(model).items() if any(matches(name, t) for t in targets)]
    if not chosen:
        raise ValueError(f"no Linear matches the LoRA targets {list(targets)}")
    unused = [t for t in targets if not any(matches(name, t) for name in chosen)]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no Linear of the model")
    layers = linears(model)
    for name in chosen:
        layers[name].add_lora(rank, alpha, rngs)
    return chosen


def preset_targets(name: str) -> tuple[str, ...]:
    """The targets of a preset named in a config (`model.lora.targets`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown LoRA target preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def restore(model: nnx.Module, path: str, rank: int, alpha: float, targets: str) -> nnx.Module:
    """Fills the adapters that `add_lora(model, rank, alpha, preset_targets(targets))` attached from a converted
    adapter directory, refusing one of another rank, alpha or preset (the scale alpha / rank would change)."""
    stored = weights.read_config(path, FAMILY)
    want = {"rank": rank, "alpha": float(alpha), "targets": targets}
    got = {k: stored.get(k) for k in want}
    if got != want:
        raise weights.WeightsError(f"{path}: the adapter has {got}, the config asks for {want} "
                                   f"(set config.model.lora to match)")
    return weights.restore(model, path, kinds=(nnx.LoRAParam,))


def count(model: nnx.Module) -> int:
    """Number of LoRA parameters in the model."""
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, trainable)))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel (for export or faster inference); returns the model."""
    for layer in linears(model).values():
        if layer.lora_a is not None:
            layer.merge_lora()
    return model
