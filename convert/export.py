"""`python -m convert.export --checkpoint WORKDIR --out DIR [--merged]`: a trained IConFace for PyTorch.

Writes, atomically (into a sibling temporary directory renamed into place; an existing DIR is refused):

- `pytorch_lora_weights.safetensors`: the backbone's LoRA under diffusers/peft names
  (`transformer.<module>.lora_A.weight` (r, in), `transformer.<module>.lora_B.weight` (out, r)) with
  diffusers' `lora_adapter_metadata` (r, lora_alpha, target_modules), so both
  `Flux2Transformer2DModel.load_lora_adapter(path)` and `Flux2KleinPipeline.load_lora_weights(DIR)` load
  it. The trained scale alpha / r is folded into lora_B (the metadata says alpha = r). It applies to
  the base transformer the run trained on (`config.model.weights`, e.g. FLUX.2-klein-base-4B).
- `iconface_side.safetensors`: the side pathways, which have no diffusers counterpart, plus the prompt
  embeddings, in torch layout (schema: `SIDE_SCHEMA` below; `convert/torch_pathways.py` reads it).
- `base_transformer/` (only for runs that trained the base, `config.model.train_base`, such as the CPU
  demo): the trained base in the diffusers layout (`config.json`, `diffusion_pytorch_model.safetensors`),
  the model the LoRA file applies to.
- `merged_transformer/` (with `--merged`): the base with the LoRA folded in, diffusers layout; load it
  with `Flux2Transformer2DModel.from_pretrained` and no adapter.

With `--release`, instead, the LoRA alone in the IConFace authors' release format, which their
`flux_restoration` code loads (`load_lora_checkpoint`, `temporary_lora`): `lora_weights.safetensors` with
`<BFL module>.lora_A.weight` (R, in), `.lora_B.weight` (out, R) and `.alpha` per module, and
`adapter_config.json` (`lora_target_preset`, `lora_rank` R, `lora_alpha` R: the scale is folded into B).
Their fused qkv has one A; where our q, k and v adapters' A differ (after training), R is three times our rank,
q, k and v each in their own third of A and B, and other modules zero-padded: the same update exactly. Only
runs their code can run: the `concat` variant (no side pathways), a frozen base, their presets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np

from convert.flux2 import bfl_source, diffusers_key
from convert.safetensors_file import Lazy, write_safetensors
from iconface_jax import weights, workdir
from iconface_jax.models import flux2, iconface, lora
from iconface_jax.face_system import FaceSystem

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
RELEASE_FILE, RELEASE_CONFIG = "lora_weights.safetensors", "adapter_config.json"  # the authors' release
RELEASE_PRESETS = ("flux2_klein", "flux2_klein_full")  # our presets that target exactly their presets' modules
SIDE_FILE = "iconface_side.safetensors"
TRANSFORMER_FILE = "diffusion_pytorch_model.safetensors"
SCHEMA_VERSION = 1

SIDE_SCHEMA = """\
iconface_side.safetensors (float32; Linear weights (out, in) as torch.nn.Linear; D = hidden size,
Dm = memory_dim, r = residual_rank, k = xattn_rank; a group is absent when the variant lacks it):
  identity.phi_global.weight (D, 512), identity.phi_global.bias (D,)   h_id = silu(phi_global(e_id))
  identity.psi_dbl.weight (6D, D)       delta of the double-stream image modulation (all image tokens)
  identity.psi_sgl.weight (3D, D)       delta of the single-stream modulation of the image tokens
  structure.w_in_down.weight (r, D), structure.w_in_up.weight (D, r)
                                        scene += residual_scale * w_in_up(w_in_down(resize(x_deg)))
  structure.pool_base.queries (N_b, Dm), structure.pool_base.to_k.weight (Dm, D), .to_v.weight (Dm, D)
  structure.pool_detail.{queries, to_k.weight, to_v.weight}   (two-route variant: over x_deg - smooth(x_deg))
  memory_xattn.<i>.to_q.weight (k, D), .to_k.weight (k, Dm), .to_v.weight (k, Dm), .to_out.weight (D, k),
  memory_xattn.<i>.gamma (D,)           block i = double blocks, then single blocks
  prompt_embeds (T, joint_dim), negative_prompt_embeds (T, joint_dim)   restoration prompt and CFG's empty prompt
__metadata__["iconface"]: JSON {schema_version, config (IConFaceConfig), hidden_size, num_layers,
  num_single_layers, step, base_weights, train_base}."""

def _np(value) -> np.ndarray:
    return np.asarray(value.get_value() if hasattr(value, "get_value") else value)


def lora_state(backbone: flux2.Flux2Transformer) -> tuple[dict[str, np.ndarray], dict]:
    """peft tensors `transformer.<module>.lora_{A,B}.weight` and diffusers' adapter metadata (unprefixed).

    The trained scale alpha / r is folded into lora_B and the metadata says lora_alpha = r (scale 1), so
    every loader reads the same model: `Flux2Transformer2DModel.load_lora_adapter(path)` ignores the
    file's metadata (it takes the non-safetensors branch unless `use_safetensors=True`) and assumes
    alpha = r, as do loaders that know only the tensors.
    """
    layers = {name: layer for name, layer in lora.linears(backbone).items() if layer.lora_a is not None}
    if not layers:
        raise ValueError("the backbone has no LoRA adapters to export")
    ranks = {layer.lora_a.get_value().shape[1] for layer in layers.values()}
    if len(ranks) > 1:
        raise ValueError(f"LoRA ranks must be uniform to export; found {sorted(ranks)}")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"transformer.{name}.lora_A.weight"] = _np(layer.lora_a).astype(np.float32).T
        tensors[f"transformer.{name}.lora_B.weight"] = (_np(layer.lora_b).astype(np.float32) * layer.lora_scale).T
    rank = ranks.pop()
    # LoraConfig keyword arguments; diffusers' pipeline loader builds the adapter's config from exactly these.
    config = {"r": int(rank), "lora_alpha": float(rank), "target_modules": sorted(layers)}
    return tensors, config


def release_state(backbone: flux2.Flux2Transformer) -> tuple[dict[str, np.ndarray], int]:
    """The backbone's LoRA under the release's BFL module names (scale folded into B) and its uniform rank R."""
    modules: dict[str, list[tuple[int | None, np.ndarray, np.ndarray]]] = {}
    for name, layer in lora.linears(backbone).items():
        if layer.lora_a is None:
            continue
        module, slot, _ = bfl_source(f"{name}.weight")
        a = _np(layer.lora_a).astype(np.float32).T  # (r, in)
        b = (_np(layer.lora_b).astype(np.float32) * layer.lora_scale).T  # (out, r)
        modules.setdefault(module.removesuffix(".weight"), []).append((slot, a, b))
    if not modules:
        raise ValueError("the backbone has no LoRA adapters to export")
    fused = {}
    for module, parts in modules.items():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
        a_s, b_s = [a for _, a, _ in parts], [b for _, _, b in parts]
        if all(np.array_equal(a, a_s[0]) for a in a_s):  # one A (a single Linear, or q, k, v sharing it)
            fused[module] = (a_s[0], np.concatenate(b_s))
        else:  # q, k, v each through its own block: A stacked, B block-diagonal
            b = np.zeros((sum(x.shape[0] for x in b_s), sum(x.shape[1] for x in b_s)), np.float32)
            rows = cols = 0
            for x in b_s:
                b[rows:rows + x.shape[0], cols:cols + x.shape[1]] = x
                rows, cols = rows + x.shape[0], cols + x.shape[1]
            fused[module] = (np.concatenate(a_s), b)
    rank = max(a.shape[0] for a, _ in fused.values())
    tensors = {}
    for module, (a, b) in fused.items():  # zero rows of A and columns of B up to the common rank: no update
        tensors[f"{module}.lora_A.weight"] = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
        tensors[f"{module}.lora_B.weight"] = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        tensors[f"{module}.alpha"] = np.asarray(rank, np.float32)
    return tensors, rank


def check_release(cfg: ml_collections.ConfigDict) -> None:
    """Raises, in one line saying why, unless the authors' release code can run this run's model."""
    variant, preset = cfg.model.iconface.variant, cfg.model.lora.targets
    if variant != "concat":
        raise ValueError(f"variant {variant!r} has side pathways the authors' release code cannot run; "
                         f"--release exports only the concat variant")
    if cfg.model.train_base:
        raise ValueError("this run trained the base transformer too; the release format holds only a LoRA for "
                         "the released base")
    if preset not in RELEASE_PRESETS:
        raise ValueError(f"LoRA targets {preset!r} have no release preset; theirs are {', '.join(RELEASE_PRESETS)}")


def export_release(system: FaceSystem, cfg: ml_collections.ConfigDict, out: str) -> list[str]:
    """Writes the LoRA in the release format (module docstring) to `out` atomically; returns the paths written."""
    check_release(cfg)
    tensors, rank = release_state(system.model.backbone)
    config = {"lora_target_preset": cfg.model.lora.targets, "lora_rank": rank, "lora_alpha": float(rank)}

    def write(tmp: str) -> None:
        # The .alpha scalars are 0-d (shape []), as their `torch.tensor(alpha)` saves; the padded A and B may be in
        # Fortran order (np.pad of a transpose), which the writer writes in C order.
        write_safetensors(os.path.join(tmp, RELEASE_FILE), tensors, {"format": "pt"})
        with open(os.path.join(tmp, RELEASE_CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    return _write_atomically(out, write)


def lora_metadata(config: Mapping) -> dict[str, str]:
    """The safetensors `__metadata__` diffusers' `save_lora_weights` writes: keys prefixed `transformer.`."""
    packed = {f"transformer.{k}": v for k, v in config.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def side_state(model: iconface.IConFace) -> dict[str, np.ndarray]:
    """Every side-pathway parameter under its module path, Linear kernels transposed to torch's (out, in)."""
    out = {}
    for part in ("identity", "structure", "memory_xattn"):
        module = getattr(model, part)
        if module is None:
            continue
        if any(layer.lora_a is not None for layer in lora.linears(module).values()):
            raise ValueError(f"the {part} pathway carries LoRA factors, which the export does not support")
        for path, var in weights.named_params(module).items():
            value = _np(var).astype(np.float32)
            if path.endswith(".kernel"):
                path, value = path[: -len("kernel")] + "weight", value.T
            out[f"{part}.{path}"] = np.ascontiguousarray(value)
    return out


def side_metadata(model: iconface.IConFace, step: int, cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """`__metadata__` of the side file: the IConFace config and the backbone's shape (see SIDE_SCHEMA)."""
    bb = model.backbone.config
    info = {"schema_version": SCHEMA_VERSION, "config": dataclasses.asdict(model.config),
            "hidden_size": bb.hidden_size, "num_layers": bb.num_layers, "num_single_layers": bb.num_single_layers,
            "step": int(step), "base_weights": cfg.model.weights, "train_base": bool(cfg.model.train_base)}
    return {"format": "pt", "iconface": json.dumps(info, sort_keys=True)}


def transformer_state(backbone: flux2.Flux2Transformer, merged: bool) -> dict[str, Lazy]:
    """The base transformer under diffusers' keys in its stored dtype; with `merged`, LoRA folded in."""
    layers = lora.linears(backbone)
    out = {}
    for path, var in weights.base_params(backbone).items():
        value = var.get_value()
        is_kernel = path.endswith(".kernel")
        shape = tuple(value.shape[::-1]) if is_kernel else tuple(value.shape)
        layer = layers.get(path.rsplit(".", 1)[0]) if is_kernel else None

        def make(value=value, layer=layer, is_kernel=is_kernel):
            w = np.asarray(value)
            if merged and layer is not None and layer.lora_a is not None:
                delta = (_np(layer.lora_a).astype(np.float32) @ _np(layer.lora_b).astype(np.float32)) * layer.lora_scale
                w = (w.astype(np.float32) + delta).astype(w.dtype)
            return w.T if is_kernel else w

        out[diffusers_key(path)] = Lazy(np.dtype(value.dtype), shape, make)
    return out


def diffusers_config(cfg: flux2.Flux2Config) -> dict:
    """`config.json` of a diffusers `Flux2Transformer2DModel` directory."""
    fields = dataclasses.asdict(cfg)
    return {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "out_channels": None,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def _write_transformer(directory: str, backbone: flux2.Flux2Transformer, merged: bool) -> None:
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(diffusers_config(backbone.config), f, indent=2)
    write_safetensors(os.path.join(directory, TRANSFORMER_FILE), transformer_state(backbone, merged), {"format": "pt"})


def refuse_existing(out: str) -> None:
    """Raises if the destination exists (an export never overwrites)."""
    if os.path.exists(out):
        raise FileExistsError(f"destination {out} already exists; remove it or choose another path")


def export(system: FaceSystem, cfg: ml_collections.ConfigDict, step: int, out: str,
           merged: bool = False) -> list[str]:
    """Writes the export of a loaded system (see the module docstring) to `out`; returns the paths written."""
    model = system.model

    def write(tmp: str) -> None:
        tensors, config = lora_state(model.backbone)
        write_safetensors(os.path.join(tmp, LORA_FILE), tensors, lora_metadata(config))
        side = side_state(model)
        side["prompt_embeds"] = _np(system.prompt).astype(np.float32)
        side["negative_prompt_embeds"] = _np(system.empty).astype(np.float32)
        write_safetensors(os.path.join(tmp, SIDE_FILE), side, side_metadata(model, step, cfg))
        if cfg.model.train_base:
            _write_transformer(os.path.join(tmp, "base_transformer"), model.backbone, merged=False)
        if merged:
            _write_transformer(os.path.join(tmp, "merged_transformer"), model.backbone, merged=True)

    return _write_atomically(out, write)


def _write_atomically(out: str, write: Callable[[str], None]) -> list[str]:
    """`write(tmp)` into a sibling temporary directory renamed to `out` when done; the paths written."""
    out = os.path.abspath(out)
    refuse_existing(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        write(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.path.join(out, p) for p in os.listdir(out))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description="Export a trained IConFace (LoRA, side pathways) for PyTorch/diffusers.",
                                epilog=SIDE_SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training workdir (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--merged", action="store_true", help="also write the transformer with the LoRA folded in")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even where an EMA was kept")
    p.add_argument("--release", action="store_true",
                   help="only the LoRA, in the IConFace authors' release format (concat runs; see above)")
    args = p.parse_args(argv)
    if args.release and args.merged:
        p.error("--release writes only the LoRA; --merged does not apply")
    try:
        refuse_existing(args.out)  # before loading: a klein-4B load takes minutes
        system, cfg, step = workdir.load(args.checkpoint, prefer_ema=not args.no_ema)
        if args.release:
            written = export_release(system, cfg, args.out)
        else:
            written = export(system, cfg, step, args.out, merged=args.merged)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported the step-{step} model of {args.checkpoint}:", file=sys.stderr)
    for path in written:
        print(f"  {path}", file=sys.stderr)
    if args.release or not cfg.model.train_base:
        print(f"the LoRA applies to the base transformer {cfg.model.weights!r} was trained on", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
