"""`python -m convert.lora --src lora_weights.safetensors [--config adapter_config.json] --dst DIR`.

Converts a FLUX.2 LoRA into an adapter directory for our diffusers-named layers. Two namings are read:

- The IConFace authors' release (their `flux_restoration/lora.py` format, Black Forest Labs' module
  names, e.g. `double_blocks.0.img_attn.qkv`). Their file holds, per module, `<module>.lora_A.weight`
  (rank x in), `<module>.lora_B.weight` (out x rank) and `<module>.alpha` (a scalar);
  `adapter_config.json` holds `lora_target_preset`, `lora_rank` and `lora_alpha`, and their loader
  scales every update by alpha / rank. A fused BFL qkv becomes three adapters (to_q, to_k, to_v) that
  share A, each with its third of B: the same update exactly.
- diffusers/peft names, our Linears' own paths behind `transformer.` (diffusers' `save_lora_weights`, so
  `convert.export` and diffusers' trainers) or `base_model.model.` (peft's `save_pretrained`), e.g.
  `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`. Rank and alpha come from the file's
  `lora_adapter_metadata` or peft's `adapter_config.json` (`r`, `lora_alpha`); without either, alpha is
  the rank, as diffusers' loader assumes (and `convert.export` writes, its scale folded into B).

`adapter_config.json` is read from beside the file unless `--config` names one; a directory `--src` is
searched for `lora_weights.safetensors`, `pytorch_lora_weights.safetensors` or `adapter_model.safetensors`.
The output is a weight directory of family "lora" (rank, alpha and our preset name in its config.json)
that `lora.restore` loads onto a model with those adapters (config `model.lora_init`).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from flax import nnx
from safetensors import safe_open

from convert.common import ConversionError, Entry, cli, convert
from convert.export import LORA_FILE
from convert.flux2 import bfl_source
from convert.safetensors_file import Reader
from iconface_jax.models import flux2, lora

WEIGHTS_FILE, CONFIG_FILE = "lora_weights.safetensors", "adapter_config.json"
WEIGHT_FILES = (WEIGHTS_FILE, LORA_FILE, "adapter_model.safetensors")  # the authors', diffusers', peft's
A, B, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
# Key prefixes of diffusers/peft names: diffusers' pipelines, peft's save_pretrained, a bare transformer.
PEFT_PREFIXES = ("transformer.", "base_model.model.", "")
# Per naming: its (double, single) block lists; a pattern of the modules whose input is the transformer's width;
# and the modules whose input gives the MLP's width, each with whether that input also holds the width.
BLOCKS = {"bfl": ("double_blocks", "single_blocks"), "diffusers": ("transformer_blocks", "single_transformer_blocks")}
HIDDEN_INPUT = {"bfl": r"(attn\.qkv|attn\.proj|linear1|mlp\.0)$",
                "diffusers": r"(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|to_qkv_mlp_proj|linear_in)$"}
MLP_INPUT = {"bfl": ((r"linear2$", True), (r"mlp\.2$", False)),
             "diffusers": ((r"single_transformer_blocks\.\d+\.attn\.to_out$", True), (r"linear_out$", False))}
NAMINGS = ("the authors' BFL names (double_blocks.N.img_attn.qkv.lora_A.weight, ...) or diffusers/peft names "
           "(transformer.transformer_blocks.N.attn.to_q.lora_A.weight, ...)")
# Their preset names -> ours ("attn_ffn", their older name, targets the same Linears as flux2_klein_full).
PRESET_NAMES = {"flux2_klein": "flux2_klein", "flux2_klein_full": "flux2_klein_full", "attn_ffn": "flux2_klein_full"}


def abstract_model(num_double: int, num_single: int, hidden: int = 16, mlp: int = 32) -> flux2.Flux2Transformer:
    """A shape-only transformer with these block counts and Linear sizes (one head: heads leave no trace)."""
    # mlp + 0.5 so that int(hidden * ratio), the model's MLP width, is `mlp` despite float rounding.
    cfg = flux2.Flux2Config(num_layers=num_double, num_single_layers=num_single, attention_head_dim=hidden,
                            num_attention_heads=1, axes_dims_rope=(hidden, 0, 0, 0), mlp_ratio=(mlp + 0.5) / hidden)
    return nnx.eval_shape(lambda: flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0)))


def our_modules(model: flux2.Flux2Transformer, naming: str = "bfl",
                prefix: str = "") -> dict[str, list[tuple[str, int | None]]]:
    """The file's module name -> our Linears it holds, each with its slot in a fused qkv (None when not fused)."""
    if naming == "diffusers":  # our own names
        return {prefix + name: [(name, None)] for name in lora.linears(model)}
    out: dict[str, list[tuple[str, int | None]]] = {}
    for name in lora.linears(model):
        bfl, slot, _ = bfl_source(f"{name}.weight")
        out.setdefault(bfl.removesuffix(".weight"), []).append((name, slot))
    return out


def naming_of(modules: list[str], where: str) -> tuple[str, str]:
    """("bfl" | "diffusers", key prefix) of the file's module names, all of one naming; else an error saying
    which namings this reads."""
    def fits(module: str, naming: str, prefix: str) -> bool:
        return re.match(rf"{re.escape(prefix)}({'|'.join(BLOCKS[naming])})\.\d+\.", module) is not None

    found = next(((n, p) for n, prefixes in (("bfl", ("",)), ("diffusers", PEFT_PREFIXES)) for p in prefixes
                  if fits(modules[0], n, p)), None)
    stray = modules[0] if found is None else next((m for m in modules if not fits(m, *found)), None)
    if stray is not None:
        raise ConversionError(f"{where}: module {stray!r} is not a FLUX.2 block module in "
                              f"{'a naming this reads' if found is None else 'the naming of ' + repr(modules[0])}; "
                              f"expected {NAMINGS}")
    return found


def peft_settings(metadata: dict[str, str], stored: dict, where: str) -> dict:
    """A diffusers/peft file's rank and alpha, in the authors' adapter-config keys (`lora_rank`, `lora_alpha`):
    from the file's `lora_adapter_metadata` (diffusers' keys prefixed `transformer.`), else the adapter config."""
    config = stored
    if "lora_adapter_metadata" in metadata:
        try:
            packed = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise ConversionError(f"{where}: unreadable lora_adapter_metadata ({e})") from None
        config = {k.removeprefix("transformer."): v for k, v in packed.items()}
    uneven = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if uneven:
        raise ConversionError(f"{where}: {uneven[0]} gives modules their own rank or alpha; one of each is supported")
    keys = {"r": "lora_rank", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
            "lora_target_preset": "lora_target_preset"}
    return {keys[k]: v for k, v in config.items() if k in keys}


def read_adapter_config(path: str | None) -> dict:
    """`adapter_config.json` as a dict (empty when there is none)."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(stored, dict):
        raise ConversionError(f"{path}: not an adapter config (a JSON object)")
    return stored


def _modules(reader: Reader, where: str) -> list[str]:
    """The modules of the file, each with both factors; errors name a stray tensor or a missing factor."""
    modules = []
    for key in sorted(reader.infos):
        suffix = next((s for s in (A, B, ALPHA) if key.endswith(s)), None)
        if suffix is None:
            raise ConversionError(f"{where}: unexpected tensor {key!r} (expected <module>{A}, {B} or {ALPHA})")
        module = key.removesuffix(suffix)
        for need in (A, B):
            if module + need not in reader.infos:
                raise ConversionError(f"{where}: module {module!r} has no {module + need!r}: missing A/B pair")
        if suffix == A:
            modules.append(module)
    if not modules:
        raise ConversionError(f"{where}: no LoRA tensors (<module>{A})")
    return modules


def _hidden_and_mlp(reader: Reader, modules: list[str], naming: str) -> tuple[int, int]:
    """The transformer's width and MLP width, read off the factor shapes (MLP width: the width when unseen)."""
    inputs = {m: reader.infos[m + A].shape[1] for m in modules}
    hidden = next((n for m, n in inputs.items() if re.search(HIDDEN_INPUT[naming], m)), None)
    if hidden is None:
        raise ConversionError(f"{reader.infos[modules[0] + A].path}: no module whose input is the transformer's "
                              f"width (attention q, k, v or output, an MLP's input)")
    mlp = next((n - hidden * holds_hidden for pattern, holds_hidden in MLP_INPUT[naming]
                for m, n in inputs.items() if re.search(pattern, m)), hidden)
    return hidden, mlp


def _scalar(reader: Reader, key: str) -> float:
    value = reader.read(key)
    if value.size != 1:
        where = reader.infos[key].path
        raise ConversionError(f"{where}: tensor {key!r} has shape {value.shape}, expected a scalar")
    return float(value.astype(np.float32).reshape(()))


def _rank_and_alpha(reader: Reader, modules: list[str], stored: dict, where: str) -> tuple[int, float]:
    """One rank and one alpha for every module, agreeing with adapter_config.json where it gives them."""
    ranks = {reader.infos[m + A].shape[0] for m in modules}
    if len(ranks) != 1:
        raise ConversionError(f"{where}: modules of different ranks {sorted(ranks)}: rank disagreement")
    rank = ranks.pop()
    if "lora_rank" in stored and int(stored["lora_rank"]) != rank:
        raise ConversionError(f"{where}: the adapter config says lora_rank {stored['lora_rank']}, the tensors have "
                              f"rank {rank}: rank disagreement")
    alphas = {m: _scalar(reader, m + ALPHA) for m in modules if m + ALPHA in reader.infos}
    if alphas and len(alphas) != len(modules):
        missing = next(m for m in modules if m not in alphas)
        raise ConversionError(f"{where}: missing tensor {missing + ALPHA!r} (other modules have theirs)")
    values = set(alphas.values())
    if "lora_alpha" in stored:
        values.add(float(stored["lora_alpha"]))
    if not values:
        raise ConversionError(f"{where}: no alpha: neither {ALPHA} tensors nor lora_alpha in {CONFIG_FILE}")
    if len(values) != 1:
        raise ConversionError(f"{where}: alpha disagreement: the {ALPHA} tensors and the adapter config's lora_alpha "
                              f"give {sorted(values)}")
    return rank, values.pop()


def _preset(chosen: set[str], model: flux2.Flux2Transformer, stored: dict, where: str) -> str:
    """Our preset for the adapter config's `lora_target_preset`, else the one whose Linears the file covers."""
    expected = {p: {n for n in lora.linears(model) if any(lora.matches(n, t) for t in lora.PRESETS[p])}
                for p in lora.PRESETS}
    if "lora_target_preset" not in stored:
        found = [p for p, names in expected.items() if names == chosen]
        if not found:
            raise ConversionError(f"{where}: its modules match none of the presets {sorted(lora.PRESETS)}; "
                                  f"name one in {CONFIG_FILE}")
        return found[0]
    theirs = stored["lora_target_preset"]
    if theirs not in PRESET_NAMES:
        raise ConversionError(f"{where}: unknown lora_target_preset {theirs!r}; supported: {sorted(PRESET_NAMES)}")
    preset = PRESET_NAMES[theirs]
    extra, missing = sorted(chosen - expected[preset]), sorted(expected[preset] - chosen)
    if extra:
        raise ConversionError(f"{where}: module for {extra[0]!r} is outside preset {theirs!r}: unknown module")
    if missing:
        raise ConversionError(f"{where}: preset {theirs!r} targets {missing[0]!r} but the file has no adapter for it: "
                              f"missing module")
    return preset


def plan(reader: Reader, stored: dict) -> tuple[dict, dict[str, Entry]]:
    """The adapter directory's config and one Entry per factor (A transposed; B sliced for a fused qkv)."""
    where = ", ".join(sorted({i.path for i in reader.infos.values()}))
    modules = _modules(reader, where)
    naming, prefix = naming_of(modules, where)
    counts = [1 + max((int(m[len(prefix):].split(".")[1]) for m in modules if m.startswith(f"{prefix}{kind}.")),
                      default=-1) for kind in BLOCKS[naming]]
    names = our_modules(abstract_model(*counts), naming, prefix)
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise ConversionError(f"{where}: unknown module {unknown[0]!r} (not a Linear of a FLUX.2 transformer)")
    assumed = ""
    if naming == "diffusers":
        with safe_open(reader.infos[modules[0] + A].path, framework="np") as f:
            stored = peft_settings(f.metadata() or {}, stored, where)
        if "lora_alpha" not in stored and not any(m + ALPHA in reader.infos for m in modules):
            # diffusers' loader (and convert.export, which folds the scale into B) take alpha = rank.
            stored["lora_alpha"], assumed = reader.infos[modules[0] + A].shape[0], " (no alpha given: the rank)"
    rank, alpha = _rank_and_alpha(reader, modules, stored, where)
    model = abstract_model(*counts, *_hidden_and_mlp(reader, modules, naming))
    layers = lora.linears(model)
    entries, chosen = {}, set()
    for module in modules:
        targets = names[module]
        inputs = layers[targets[0][0]].in_features
        outputs = sum(layers[name].out_features for name, _ in targets)
        # The alpha (read and checked above) rides along with B, so the source check counts it as used.
        b_keys = (module + B, *[module + ALPHA] * (module + ALPHA in reader.infos))
        b_shapes = ((outputs, rank), *(reader.infos[k].shape for k in b_keys[1:]))
        for name, slot in targets:
            n = layers[name].out_features
            entries[f"{name}.lora_a"] = Entry((module + A,), ((rank, inputs),), lambda a: a.T)
            entries[f"{name}.lora_b"] = Entry(b_keys, b_shapes, lambda b, *_, s=slot or 0, n=n: b[s * n:(s + 1) * n].T)
            chosen.add(name)
    preset = _preset(chosen, model, stored, where)
    print(f"{where}: {len(modules)} modules ({naming} names), preset {preset}, rank {rank}, alpha {alpha:g}{assumed} "
          f"(scale {alpha / rank:g})", file=sys.stderr)
    return {"rank": rank, "alpha": alpha, "targets": preset}, entries


def convert_lora(src: str, dst: str, dtype: np.dtype, config: str | None = None) -> None:
    """Converts the LoRA at `src` (a file, or a directory holding one of `WEIGHT_FILES`) to `dst`."""
    path = src
    if os.path.isdir(src):
        found = [os.path.join(src, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(src, f))]
        if not found:
            raise ConversionError(f"{src}: holds none of {', '.join(WEIGHT_FILES)}")
        path = found[0]
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    stored = read_adapter_config(config or (beside if os.path.isfile(beside) else None))
    convert(path, dst, dtype, lora.FAMILY, lambda reader: plan(reader, stored))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    return cli(__doc__.splitlines()[0], convert_lora, argv, default_dtype="float32",
               options=[("--config", f"the adapter's {CONFIG_FILE} (default: the one beside --src, if any)")])


if __name__ == "__main__":
    raise SystemExit(main())
