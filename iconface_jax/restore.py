"""`python -m iconface_jax.restore`: restore face images with a trained model, with or without references.

    python -m iconface_jax.restore --checkpoint WORKDIR --input deg.png [--ref a.png ...] --output out.png
    python -m iconface_jax.restore --checkpoint WORKDIR --input-dir DIR [--ref-dir REFS] --output-dir OUT
    python -m iconface_jax.restore --checkpoint WORKDIR --csv test_references.csv --image-dir IMGS --output-dir OUT

Aligned face crops (`--mode crop`) of any square size are resized to the model's resolution, and the result
back to the input's; a non-square input is refused, never stretched. Before the model loads, the command
checks what it will write (an image extension PIL writes, a writable folder, no output replacing an input,
no two inputs written to one output: `a.jpg` and `a.png` both make `a.png`) and that every input is a
readable square image. Into a folder, outputs already there are kept and counted (they may come from
another checkpoint or other settings; `--overwrite` redoes them). The exit status is 1 when any image
failed, after a line "N of M images failed"; 0 when all were restored or kept.
The sampling itself is `iconface_jax.sampling.restore_faces`; loading a workdir is `iconface_jax.workdir.load`.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from functools import partial

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from iconface_jax import alignment, compilation, images, landmarks, photos, sampling, storage, workdir

Job = tuple[str, list[str], str]  # (degraded path, reference paths, output path)


def jobs_from_args(args) -> list[Job]:
    """(degraded path, reference paths, output path) for every image the command line names."""
    if args.input:
        return [(args.input, list(args.ref), args.output)]
    if args.input_dir:  # the inputs (and references) local or gs://, the outputs local
        def image_names(folder: str) -> list[str]:
            return sorted(p.name for p in storage.path(folder).iterdir() if p.name.lower().endswith(images.IMAGE_EXTS))

        jobs = []
        for name in image_names(args.input_dir):
            stem = os.path.splitext(name)[0]
            ref_dir = os.path.join(args.ref_dir, stem) if args.ref_dir else ""
            has_refs = ref_dir and storage.path(ref_dir).is_dir()
            refs = [os.path.join(ref_dir, r) for r in image_names(ref_dir)] if has_refs else []
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


def outputs_of(job: Job, strip: bool) -> list[str]:
    """The files a job writes: its output, and with --strip its strip."""
    return [job[2], *[os.path.splitext(job[2])[0] + "_strip.png"] * strip]


def check_crop(path: str) -> None:
    """Raises ValueError unless `path` is a readable square image, as an aligned face crop is."""
    height, width = images.image_size(path)
    if height != width:
        raise ValueError(f"{path}: {width}x{height} is not a square aligned face crop; whole photos: --mode photo")


def checked_jobs(jobs: list[Job], max_refs: int, mode: str = "crop") -> list[Job]:
    """The jobs whose inputs can be restored (readable; in crop mode the input and its references square, as aligned
    crops are); each other one is named on stderr with its reason."""
    ok = []
    for job in jobs:
        try:
            if is_photo(job[0], mode):
                check = images.image_size  # a photo's references are found and aligned as its faces are
            else:
                check = check_crop  # a crop's references are read as crops too
                check(job[0])
            for path in job[1][:max_refs]:
                check(path)
            ok.append(job)
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)
    return ok


def restore_crop(run, system, size: int, job: Job, args: argparse.Namespace) -> None:
    """Restores one aligned face crop and writes its output (and strip); errors name the file."""
    degraded_path, ref_paths, out_path = job
    degraded, shape = images.read_face(degraded_path, size)
    refs = [images.read_face(r, size)[0] for r in ref_paths[: args.max_refs]]
    refs = np.stack(refs)[None] if refs else np.zeros((1, 0, size, size, 3), np.float32)
    out = run(system, degraded[None], refs, jax.random.PRNGKey(args.seed))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    Image.fromarray(images.from_model(out[0], (size, size) if args.model_size else shape)).save(out_path)
    if args.strip:
        row = [degraded, *refs[0], np.asarray(out[0])]
        strip = images.from_model(np.concatenate(row, axis=1), (size, size * len(row)))
        Image.fromarray(strip).save(outputs_of(job, strip=True)[1])


def is_photo(path: str, mode: str) -> bool:
    """Whether `path` is restored as a whole photo: --mode photo, or --mode auto and not square."""
    if mode == "auto":
        height, width = images.image_size(path)
        return height != width
    return mode == "photo"


def finders(args: argparse.Namespace) -> tuple[photos.Finder, photos.Finder | None]:
    """The face finders of the photos and of whole-photo references (none with --landmarks-json)."""
    if args.landmarks_json:
        given = photos.given_faces(landmarks.from_json(args.landmarks_json))
        return (lambda photo: given), None
    if args.detector:
        find = photos.retinaface_finder(args.detector, 0.6 if args.score_threshold is None else args.score_threshold)
    elif args.landmarks == "dlib":
        find = photos.dlib_finder(0.0 if args.score_threshold is None else args.score_threshold)
    else:
        raise ValueError("whole photos need a face finder: --detector DIR (RetinaFace), --landmarks dlib or "
                         "--landmarks-json FILE")
    return find, find


def restore_whole(run, system, size: int, job: Job, args: argparse.Namespace, find, ref_find) -> None:
    """Restores every face of one whole photo (`photos.restore_file`), progress lines per face."""
    degraded_path, ref_paths, out_path = job
    params = args.params_json
    if params and not args.input:
        params = os.path.join(params, os.path.splitext(os.path.basename(out_path))[0] + ".json")
    result = photos.restore_file(system, run, size, degraded_path, ref_paths, out_path, find=find,
                                 ref_finder=ref_find, key=jax.random.PRNGKey(args.seed), crop_scale=args.crop_scale,
                                 match_threshold=args.match_threshold, max_refs=args.max_refs,
                                 crops_dir=args.save_crops, params_path=params,
                                 log=lambda line: print(line, file=sys.stderr))
    print(f"{degraded_path}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: restore one image, a folder, or the rows of a CSV."""
    p = argparse.ArgumentParser(description="Restore degraded faces with IConFace, with or without references.",
                                epilog="--config.a.b=value (as train takes them) overrides a field of a config FILE.py "
                                       "given as --checkpoint, e.g. --config.model.lora.alpha=32")
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
    p.add_argument("--overwrite", action="store_true", help="redo outputs already in --output-dir")
    p.add_argument("--mode", choices=("crop", "photo", "auto"), default="crop",
                   help="crop: square aligned face crops, restored whole; photo: whole photos, every face found, "
                        "aligned, restored and pasted back; auto: square inputs as crops, others as photos")
    photo = p.add_argument_group("whole photos (--mode photo|auto)")
    finder = photo.add_mutually_exclusive_group()
    finder.add_argument("--detector", help="converted RetinaFace weights (python -m convert.retinaface)")
    finder.add_argument("--landmarks", choices=("dlib",), help="dlib's detector and landmarks (the landmarks extra)")
    finder.add_argument("--landmarks-json", help="with --input: the faces' landmarks (the release's align_params JSON)")
    photo.add_argument("--score-threshold", type=float, default=None,
                       help="faces scoring below are left alone (default: RetinaFace 0.6, dlib 0)")
    photo.add_argument("--crop-scale", type=float, default=alignment.CROP_SCALE,
                       help=f"aligned crop size over FFHQ's (default {alignment.CROP_SCALE}, our training data's; "
                            f"the release's {alignment.RELEASE_CROP_SCALE})")
    photo.add_argument("--match-threshold", type=float, default=photos.MATCH_THRESHOLD,
                       help="a reference goes to the face most like it (AdaFace cosine) if at least this")
    photo.add_argument("--save-crops", default="", help="folder for each face's aligned crop and its restoration")
    photo.add_argument("--params-json", default="",
                       help="the alignments as JSON (with --input-dir/--csv: a folder, one NAME.json each)")
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
    compilation.add_flag(p)
    args, overrides = p.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Only programs that take a second or more to compile (the restoration): eager ops are not worth a file each.
    compilation.enable(args.compile_cache, min_compile_s=1.0)
    if args.input and not args.output:
        p.error("--input needs --output")
    if not args.input and not args.output_dir:
        p.error("--input-dir and --csv need --output-dir")
    if storage.is_remote(args.output or args.output_dir):
        p.error("--output and --output-dir are local paths (the checkpoint and --input/--ref images may be gs://)")
    if args.steps < 1 or args.max_refs < 0:
        p.error("--steps must be at least 1 and --max-refs at least 0")
    if args.landmarks_json and not args.input:
        p.error("--landmarks-json gives one photo's faces: use it with --input")
    try:
        jobs = jobs_from_args(args)
        # What will be written, before anything is read or loaded.
        if args.output_dir:
            images.check_output_dir(args.output_dir)
        else:
            images.check_output(args.output)
        images.check_distinct([(out, job[0]) for job in jobs for out in outputs_of(job, args.strip)],
                              [path for degraded, refs, _ in jobs for path in (degraded, *refs[: args.max_refs])])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kept = set() if args.overwrite or not args.output_dir else {out for _, _, out in jobs if os.path.exists(out)}
    if kept:
        print(f"kept {len(kept)} earlier output(s) in {args.output_dir}, not redone (they may come from another "
              f"checkpoint or other settings; --overwrite redoes them)", file=sys.stderr)
    todo = checked_jobs([job for job in jobs if job[2] not in kept], args.max_refs, args.mode)
    failed = len(jobs) - len(kept) - len(todo)
    if todo:
        try:
            system, cfg, step = workdir.load(args.checkpoint, prefer_ema=not args.no_ema, step=args.step,
                                             lora_init=args.lora_init, overrides=overrides)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"restoring {len(todo)} image(s) with the step-{step} model of {args.checkpoint}", file=sys.stderr)
        if cfg.data.source == "synthetic":
            print("note: this model was trained on synthetic faces (the CPU demo): it shows the pipeline learning, "
                  "it is not a restorer for photographs", file=sys.stderr)
        size = cfg.data.resolution
        # One image: a bar over its sampling steps; many: a bar over the images.
        step_bar = tqdm(total=args.steps, unit="step", file=sys.stderr) if len(todo) == 1 else None
        run = nnx.jit(partial(sampling.restore_faces, steps=args.steps, guidance=args.guidance,
                              on_step=(lambda i: step_bar.update(1)) if step_bar else None))
        find = ref_find = None
        if args.mode != "crop":
            try:
                find, ref_find = finders(args)
            except (ImportError, OSError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        for job in tqdm(todo, unit="image", file=sys.stderr, disable=len(todo) < 2):
            try:
                if is_photo(job[0], args.mode):
                    restore_whole(run, system, size, job, args, find, ref_find)
                else:
                    restore_crop(run, system, size, job, args)
            except (OSError, ValueError) as e:
                print(f"skipped: {e}", file=sys.stderr)
                failed += 1
        if step_bar is not None:
            step_bar.close()
    attempted = len(jobs) - len(kept)
    if failed:
        print(f"{failed} of {attempted} image{'s' if attempted > 1 else ''} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
