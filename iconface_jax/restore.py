"""Restoration with or without references: `restore()` and `python -m iconface_jax.restore`.

    python -m iconface_jax.restore --checkpoint WORKDIR --input deg.png [--ref a.png ...] --output out.png
    python -m iconface_jax.restore --checkpoint WORKDIR --input-dir DIR [--ref-dir REFS] --output-dir OUT
    python -m iconface_jax.restore --checkpoint WORKDIR --csv test_references.csv --image-dir IMGS --output-dir OUT

Aligned face crops of any size are resized to the model's resolution, and the result back to the input's.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import os
import sys
from functools import partial

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm


from iconface_jax import checkpointing, flow, sampling, storage
from iconface_jax import system as face_system
from iconface_jax.data import sources
from iconface_jax.system import FaceSystem, grid_of


def restore(system: FaceSystem, degraded: jax.Array, references: jax.Array, key: jax.Array,
            steps: int = 12, guidance: float = 4.0, on_step=None) -> jax.Array:
    """Restored images (B, H, W, 3) in [-1, 1] from degraded (B, H, W, 3) and references (B, R, H, W, 3)."""
    _, h, w, _ = degraded.shape
    noise = jax.random.normal(key, jax.eval_shape(system.encode, degraded).shape, jnp.float32)
    z0 = restore_tokens(system, degraded, references, noise, steps, guidance, on_step)
    return jnp.clip(system.decode(z0, h, w), -1.0, 1.0)


def restore_tokens(system: FaceSystem, degraded: jax.Array, references: jax.Array, noise: jax.Array,
                   steps: int = 12, guidance: float = 4.0, on_step=None) -> jax.Array:
    """Restored scene tokens z0 (B, L, C), sampled from the initial tokens `noise` (B, L, C)."""
    cond, text = conditions(system, degraded, references)
    # Both guidance branches see the same images.
    cond = jax.tree.map(lambda x: jnp.concatenate([x, x]), cond)

    def velocity(z2, sigma2):
        return system.model.velocity(z2, text, sigma2, cond)

    return sampling.sample(velocity, noise, sampling.schedule(steps, noise.shape[1]), guidance, on_step)


def posterior_mean(system: FaceSystem, degraded: jax.Array, references: jax.Array, key: jax.Array) -> jax.Array:
    """The model's one-step clean estimate from pure noise (sigma 1, the prompt's branch), images (B, H, W, 3).

    At sigma 1 the noisy input carries nothing about the image, so a trained model's estimate there is its
    posterior mean E[x | degraded, references]: the regression its samples scatter around. A perfect sampler's
    samples have twice its mean squared error (BUILD_NOTES.md, 2026-12-02), so it separates what the model
    knows from what sampling adds.
    """
    b, h, w, _ = degraded.shape
    cond, text = conditions(system, degraded, references)
    noise = jax.random.normal(key, jax.eval_shape(system.encode, degraded).shape, jnp.float32)
    sigma = jnp.ones((b,), jnp.float32)
    z0 = flow.estimate_z0(noise, system.model.velocity(noise, text[:b], sigma, cond), sigma)
    return jnp.clip(system.decode(z0, h, w), -1.0, 1.0)


def conditions(system: FaceSystem, degraded: jax.Array, references: jax.Array):
    """What every sampling step reuses (`IConFace.condition`) and the text [prompt; empty] (2B, T, C)."""
    b, h, w, _ = degraded.shape
    x_deg, x_refs = system.encode(degraded), system.encode(references)
    e_id = system.anchor(degraded, references)
    text = jnp.concatenate([jnp.broadcast_to(system.prompt[...], (b, *system.prompt.shape)),
                            jnp.broadcast_to(system.empty[...], (b, *system.empty.shape))]).astype(x_deg.dtype)
    # Conditions (and the reference cache) once per image.
    return system.model.condition(x_deg, x_refs, e_id, grid=grid_of(h, w, x_deg.shape[1])), text


def config_from_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config([ARG])` of a config file named as `FILE.py[:ARG]` (absl's config flag syntax)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("restore_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load(workdir: str, prefer_ema: bool = True, step: int | None = None,
         lora_init: str = "") -> tuple[FaceSystem, ml_collections.ConfigDict, int]:
    """The trained system of a training workdir (its config.json and the checkpoint of `step`, default the
    latest), and its step; or, for a config `FILE.py[:ARG]`, its model with the adapter of `model.lora_init`
    (step 0), `lora_init` overriding the config's (the authors' released LoRA on the concat config)."""
    if workdir.partition(":")[0].endswith(".py"):
        cfg = config_from_file(workdir)
        cfg.model.lora_init = lora_init or cfg.model.get("lora_init", "")
        if not cfg.model.lora_init:
            raise ValueError(f"{workdir}: a config alone is an untrained model; name a converted LoRA "
                             f"(--lora-init DIR) or give a training workdir")
        return face_system.build(cfg), cfg, 0
    path = os.path.join(workdir, "config.json")  # a local path or gs://
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
    stored = json.loads(storage.path(path).read_text())
    if "model" not in stored:
        kind = f"a converted {stored['family']} weight directory" if "family" in stored else "not a training config"
        raise ValueError(f"{path}: {kind}; --checkpoint takes a training workdir")
    # Workdirs from before `memory_readers` existed trained with the scene tokens reading the memory.
    stored["model"].get("iconface", {}).setdefault("memory_readers", "scene")
    # ... and before `synthetic.aligned`, on views with free roll, scale and shift.
    stored.get("data", {}).get("synthetic", {}).setdefault("aligned", False)
    stored["model"]["lora_init"] = ""  # the checkpoint holds the trained adapters
    cfg = ml_collections.ConfigDict(stored)
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    step, params = checkpointing.Checkpoints(workdir, keep=1).restore_params(abstract, prefer_ema, step)
    return nnx.merge(graphdef, params, rest), cfg, step


def read_face(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An aligned face crop of any size (grayscale, RGBA, 16-bit converted), local or gs://, as the model's
    square input in [-1, 1], and the file's (height, width); errors name the file."""
    try:
        data = storage.path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        rgb, _ = sources.decode(data, size, 1)
    except (OSError, sources.ImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return rgb.astype(np.float32) / 127.5 - 1.0, (height, width)


def from_model(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The model's output back to uint8 at the input's size."""
    out = ((np.asarray(image) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    if out.shape[:2] != tuple(shape):
        interp = cv2.INTER_AREA if out.shape[0] > shape[0] else cv2.INTER_CUBIC
        out = cv2.resize(out, (shape[1], shape[0]), interpolation=interp)
    return out


def jobs_from_args(args) -> list[tuple[str, list[str], str]]:
    """(degraded path, reference paths, output path) for every image the command line names."""
    if args.input:
        return [(args.input, list(args.ref), args.output)]
    if args.input_dir:  # the inputs (and references) local or gs://, the outputs local
        names = sorted(p.name for p in storage.path(args.input_dir).iterdir() if p.name.lower().endswith(IMAGE_EXTS))
        jobs = []
        for name in names:
            stem = os.path.splitext(name)[0]
            ref_dir = os.path.join(args.ref_dir, stem) if args.ref_dir else ""
            refs = sorted(os.path.join(ref_dir, p.name) for p in storage.path(ref_dir).iterdir()
                          if p.name.lower().endswith(IMAGE_EXTS)) if ref_dir and storage.path(ref_dir).is_dir() else []
            jobs.append((os.path.join(args.input_dir, name), refs, os.path.join(args.output_dir, stem + ".png")))
        return jobs
    rows = list(storage.read_csv(args.csv))
    jobs = []
    for i, row in enumerate(rows):
        if "lq_image" not in row or "ref_image" not in row:
            raise ValueError(f"{args.csv} row {i + 2}: needs columns lq_image and ref_image")
        refs = [os.path.join(args.image_dir, r) for r in ast.literal_eval(row["ref_image"] or "[]")]
        out = os.path.join(args.output_dir, os.path.splitext(os.path.basename(row["lq_image"]))[0] + ".png")
        jobs.append((os.path.join(args.image_dir, row["lq_image"]), refs, out))
    return jobs


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: restore one image, a folder, or the rows of a CSV."""
    p = argparse.ArgumentParser(description="Restore degraded faces with IConFace, with or without references.")
    p.add_argument("--checkpoint", required=True, help="training workdir (config.json + checkpoints/), or a config "
                                                       "FILE.py[:ARG] with --lora-init (the authors' LoRA: README)")
    p.add_argument("--lora-init", default="", help="converted LoRA (python -m convert.lora) the model starts from")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="one degraded, aligned face image")
    src.add_argument("--input-dir", help="a folder of degraded faces")
    src.add_argument("--csv", help="FFHQ-Ref-style CSV with lq_image and ref_image columns")
    p.add_argument("--ref", action="append", default=[], help="reference image (repeatable; none: no-reference mode)")
    p.add_argument("--ref-dir", help="with --input-dir: references of NAME.png in REF_DIR/NAME/")
    p.add_argument("--image-dir", default="", help="with --csv: folder the CSV's file names are relative to")
    p.add_argument("--output", help="with --input: output image path")
    p.add_argument("--output-dir", help="with --input-dir or --csv: output folder (existing outputs are kept)")
    p.add_argument("--max-refs", type=int, default=3, help="use at most this many references per image")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even where an EMA was kept")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    p.add_argument("--model-size", action="store_true",
                   help="keep outputs at the model's resolution instead of resizing back to the input's")
    p.add_argument("--strip", action="store_true",
                   help="also write OUTPUT_strip.png: degraded | references | restored, at the model's resolution")
    args = p.parse_args(argv)
    if args.input and not args.output:
        p.error("--input needs --output")
    if not args.input and not args.output_dir:
        p.error("--input-dir and --csv need --output-dir")
    if storage.is_remote(args.output or args.output_dir):
        p.error("--output and --output-dir are local paths (the checkpoint and --input/--ref images may be gs://)")
    if args.steps < 1 or args.max_refs < 0:
        p.error("--steps must be at least 1 and --max-refs at least 0")
    try:
        jobs = jobs_from_args(args)
        system, cfg, step = load(args.checkpoint, prefer_ema=not args.no_ema, step=args.step, lora_init=args.lora_init)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"restoring {len(jobs)} image(s) with the step-{step} model of {args.checkpoint}", file=sys.stderr)
    if cfg.data.source == "synthetic":
        print("note: this model was trained on synthetic faces (the CPU demo): it shows the pipeline learning, "
              "it is not a restorer for photographs", file=sys.stderr)
    size = cfg.data.resolution
    # One image: a bar over its sampling steps; many: a bar over the images.
    step_bar = tqdm(total=args.steps, unit="step", file=sys.stderr) if len(jobs) == 1 else None
    run = nnx.jit(partial(restore, steps=args.steps, guidance=args.guidance,
                          on_step=(lambda i: step_bar.update(1)) if step_bar else None))
    failed = 0
    for degraded_path, ref_paths, out_path in tqdm(jobs, unit="image", file=sys.stderr, disable=len(jobs) < 2):
        if len(jobs) > 1 and os.path.exists(out_path):
            continue  # resumable over a long list
        try:
            degraded, shape = read_face(degraded_path, size)
            refs = [read_face(r, size)[0] for r in ref_paths[: args.max_refs]]
        except (OSError, ValueError) as e:
            print(f"skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        refs = np.stack(refs)[None] if refs else np.zeros((1, 0, size, size, 3), np.float32)
        out = run(system, degraded[None], refs, jax.random.PRNGKey(args.seed))
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        restored = from_model(out[0], (size, size) if args.model_size else shape)
        Image.fromarray(restored).save(out_path)
        if args.strip:
            row = [degraded, *refs[0], np.asarray(out[0])]
            strip = from_model(np.concatenate(row, axis=1), (size, size * len(row)))
            Image.fromarray(strip).save(os.path.splitext(out_path)[0] + "_strip.png")
    if step_bar is not None:
        step_bar.close()
    if failed:
        print(f"{failed} image(s) skipped", file=sys.stderr)
    return 1 if failed == len(jobs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
