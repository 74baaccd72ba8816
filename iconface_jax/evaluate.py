"""Benchmark evaluation: restore every row of a CSV and score it as the paper does.

    python -m iconface_jax.evaluate --checkpoint WORKDIR --csv test_references.csv --image-dir IMAGES \\
        [--lq-dir LQ] [--refs 0|1|2|3] [--output-dir OUT] [--adaface weights/adaface-ir50] \\
        [--arcface weights/arcface-r50] [--ssim-channels y|rgb]

The CSV has FFHQ-Ref's columns: `gt_image`, optional `lq_image`, `ref_image` (a Python list literal of
file names, the protocol order), and optionally `dataset` (the summary groups rows by it); any other
column is refused, naming the ones that look like typos (a misspelt `lq_image` would otherwise be ignored
and its rows degraded here). Targets and references are resolved in `--image-dir` (`--ref-dir`), given
degraded images in `--lq-dir` (default: `--image-dir`). A row with no `lq_image` is degraded from its
target with the run's configured degradation (`--degradation` picks one preset), seeded by row; a row
with no `gt_image` (real-world sets) gets the no-reference metrics only. The first `--refs` references
are given to the model; Ref metrics always use the row's first reference (the paper's Ref_1).

Metrics, all at the model's resolution (`config.data.resolution`), on the restored image and, as a
baseline, on the degraded input: Ref-AdaFace and GT-AdaFace (cosine of AdaFace embeddings to the first
reference's and to the ground truth's; the run's own face encoder unless `--adaface` names a converted
AdaFace IR-50), Ref-ArcFace and GT-ArcFace (the same with the raw features of an ArcFace IResNet
converted by `convert.arcface`, when `--arcface` names one), PSNR and SSIM as pyiqa's default `psnr`
and `ssim` compute them (`iconface_jax.metrics`: SSIM on luma; `--ssim-channels rgb` for pyiqa's
per-channel `ssimc`), and MUSIQ, CLIP-IQA, MANIQA through pyiqa when it is installed and its weights
are present (else left empty, with a message). Both recognisers read the identity crop of ReF-LDM's
identity metric (rows and columns 6.25%-93.75%, area-resized to 112).

Before the model loads, OUT is checked (a writable folder, no output that would replace an input).
Writes into OUT: `per_image.csv` (one row per image, appended as it goes: a rerun resumes where it
stopped and refuses other settings; an unreadable image stops the run naming the file), `restored/`
(and `degraded/` for synthesised inputs), `summary.md` and `summary.csv` (means per dataset in the
layout of the paper's Table 1, or Table 2 with `--refs 0`), and `contact_sheet.png` (LQ | Ref_1 |
restored | GT for the first rows).

The CPU demo's check on held-out synthetic identities is `iconface_jax.demo_check`; it shares this command's
checkpoint and sampler options (`add_checkpoint_options`, `add_run_options`, `parse`, `run`).
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from iconface_jax import compilation, images, metrics, sampling, storage, workdir
from iconface_jax.data import degrade, sources
from iconface_jax.models import adaface, arcface
from iconface_jax.face_system import FaceSystem

SETTINGS_FILE = "settings.json"
PER_IMAGE_FILE = "per_image.csv"
CSV_COLUMNS = ("gt_image", "lq_image", "ref_image", "dataset")  # any other is refused: a typo would drop a column
METRICS = ("ref_arcface", "ref_adaface", "gt_arcface", "gt_adaface", "psnr", "ssim", "musiq", "clipiqa", "maniqa")
COLUMNS = (["index", "dataset", "gt_image", "lq_image", "ref1_image", "refs_used", "degradation", "restored",
            "seconds"]
           + list(METRICS) + [f"lq_{m}" for m in METRICS])
# Column headers of the summary (the paper's names) and their decimals.
LABELS = {"ref_arcface": ("Ref-ArcFace", 3), "ref_adaface": ("Ref-AdaFace", 3), "gt_arcface": ("GT-ArcFace", 3),
          "gt_adaface": ("GT-AdaFace", 3), "psnr": ("PSNR", 2), "ssim": ("SSIM", 4), "musiq": ("MUSIQ", 3),
          "clipiqa": ("CLIP-IQA", 3), "maniqa": ("MANIQA", 3)}
# Reference-aware: the paper's Table 1 columns first, then the supplement's GT identity and structure checks.
TABLE1 = ("ref_arcface", "ref_adaface", "musiq", "clipiqa", "maniqa", "gt_arcface", "gt_adaface", "psnr", "ssim")
TABLE2 = ("musiq", "clipiqa", "maniqa", "psnr", "ssim", "gt_arcface", "gt_adaface")  # no-reference
SHEET_TILE = 192


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row with resolved paths (None where the CSV gives no such image)."""

    index: int
    dataset: str
    gt: str | None
    lq: str | None
    refs: tuple[str, ...]


def read_rows(csv_path: str, image_dir: str, lq_dir: str, ref_dir: str, dataset: str) -> list[Row]:
    """The CSV's rows with resolved paths; a missing file or malformed row is an error naming row and file.

    An optional `dataset` column groups the rows in the summary (else every row belongs to `dataset`).
    """
    reader = storage.read_csv(csv_path)  # local or gs://
    unknown = [c for c in reader.fieldnames or () if c not in CSV_COLUMNS]
    if unknown:
        named = [f"{c!r}" + "".join(f" (a typo of {m!r}?)" for m in difflib.get_close_matches(c, CSV_COLUMNS, 1))
                 for c in unknown]
        raise ValueError(f"{csv_path}: unknown column(s) {', '.join(named)}; the columns are {', '.join(CSV_COLUMNS)}")
    if not {"gt_image", "lq_image"} & set(reader.fieldnames or ()):
        raise ValueError(f"{csv_path}: needs a gt_image or lq_image column (has {reader.fieldnames})")
    rows = []
    for i, raw in enumerate(reader):
        where = f"{csv_path} row {i + 2}"  # the header is line 1

        def resolve(name: str, directory: str) -> str:
            # FFHQ's nested layout (00000/00000.png) is found as the training pipeline finds it.
            path = sources.resolve_image(name, directory)
            if path is None:
                raise ValueError(f"{where}: {os.path.join(directory, name)} does not exist")
            return path

        try:
            ref_names = ast.literal_eval((raw.get("ref_image") or "").strip() or "[]")
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: ref_image {raw.get('ref_image')!r} is not a Python list literal") from None
        ref_names = [ref_names] if isinstance(ref_names, str) else list(ref_names)
        gt_name, lq_name = (raw.get("gt_image") or "").strip(), (raw.get("lq_image") or "").strip()
        if not gt_name and not lq_name:
            raise ValueError(f"{where}: neither gt_image nor lq_image is given")
        rows.append(Row(i, (raw.get("dataset") or "").strip() or dataset,
                        resolve(gt_name, image_dir) if gt_name else None,
                        resolve(lq_name, lq_dir) if lq_name else None,
                        tuple(resolve(str(r), ref_dir) for r in ref_names)))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


def output_name(row: Row) -> str:
    """The file name of a row's restored (and synthesised degraded) image: unique by the row's index."""
    return f"{row.index:05d}_{os.path.splitext(os.path.basename(row.gt or row.lq))[0]}.png"


def degradation_for(cfg: ml_collections.ConfigDict,
                    preset: str) -> Callable[[np.ndarray, int], tuple[np.ndarray, str]]:
    """(gt uint8, row index) -> (degraded uint8, preset name): one preset, or the config's mix; seeded by row."""
    deg = cfg.data.degradation
    if preset and preset not in deg.params:
        raise ValueError(f"--degradation {preset!r}: the config has presets {sorted(deg.params)}")
    names = (preset,) if preset else tuple(deg.presets)
    probs = np.ones(1) if preset else np.asarray(deg.preset_probs, np.float64) / np.sum(deg.preset_probs)
    presets = {name: degrade.Preset.from_dict(deg.params[name]) for name in names}

    def apply(gt: np.ndarray, index: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([cfg.data.seed, index])
        name = names[rng.choice(len(names), p=probs)]
        return degrade.apply(gt, presets[name], rng), name

    return apply


def identity_embedders(system: FaceSystem, adaface_dir: str,
                        arcface_dir: str) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """{recogniser: images (N, S, S, 3) in [-1, 1] -> features (N, 512)}: "adaface" (a converted AdaFace, or
    the run's encoder) and, when `arcface_dir` names a converted IResNet, "arcface" (raw features)."""
    if adaface_dir:
        model, run = adaface.load(adaface_dir), nnx.jit(lambda m, x: adaface.embed_faces(m, x)[0])
    else:
        model, run = system, nnx.jit(lambda s, x: s.embed(x))
    embedders = {"adaface": lambda x: np.asarray(run(model, jnp.asarray(x)))}
    if arcface_dir:
        arc_model, run_arc = arcface.load(arcface_dir), nnx.jit(arcface.embed_faces)
        embedders["arcface"] = lambda x: np.asarray(run_arc(arc_model, jnp.asarray(x)))
    return embedders


def score(image: np.ndarray, gt: np.ndarray | None, features: dict[str, dict[str, np.ndarray | None]],
          iqa: dict[str, Callable[[np.ndarray], float]], key: str, ssim_channels: str) -> dict[str, float]:
    """Metrics of one uint8 image whose features by recogniser are `features[recogniser][key]` (the restored
    image or the input); metrics whose reference image is absent give no entry."""
    out = {}
    for recogniser, feats in features.items():
        if feats["ref1"] is not None:
            out[f"ref_{recogniser}"] = float(metrics.cosine(feats[key], feats["ref1"]))
        if gt is not None:
            out[f"gt_{recogniser}"] = float(metrics.cosine(feats[key], feats["gt"]))
    if gt is not None:
        out["psnr"] = metrics.psnr(image, gt)
        out["ssim"] = metrics.ssim(image, gt, channels=ssim_channels)
    for label, fn in iqa.items():
        out[metrics.IQA_METRICS[label]] = fn(image)  # the column is pyiqa's name
    return out


def read_done(path: str) -> dict[int, dict[str, str]]:
    """Rows already in a per-image CSV, by index."""
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {int(r["index"]): r for r in csv.DictReader(f)}


def check_settings(out_dir: str, settings: dict) -> None:
    """Records the run's settings in OUT, or refuses to resume a run made with other settings."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{path}: {out_dir} holds an evaluation with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                             "choose another --output-dir")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def mean_of(rows: list[dict[str, str]], column: str) -> tuple[float | None, int]:
    """(mean of the column's non-empty values or None, their count)."""
    values = [float(r[column]) for r in rows if r.get(column, "") != ""]
    return (float(np.mean(values)) if values else None), len(values)


def summary(rows: list[dict[str, str]], method: str, refs: int) -> tuple[str, list[dict[str, str]]]:
    """(markdown table in the paper's layout, the same as CSV records): per dataset, the mean metrics of
    the inputs and of the restored images."""
    columns = TABLE1 if refs else TABLE2
    table = [f"| Method | Dataset | {' | '.join(LABELS[c][0] + ' ↑' for c in columns)} |",
             "|" + "---|" * (len(columns) + 2)]
    records, notes = [], []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):  # in order of appearance
        group = [r for r in rows if r["dataset"] == dataset]
        for name, prefix in (("Input (LQ)", "lq_"), (method, "")):
            cells, record = [], {"method": name, "dataset": dataset, "images": str(len(group))}
            for c in columns:
                value, n = mean_of(group, prefix + c)
                cells.append("–" if value is None else f"{value:.{LABELS[c][1]}f}")
                record[LABELS[c][0]] = "" if value is None else f"{value:.6g}"
                if value is not None and n < len(group):
                    notes.append(f"{dataset} {name} {LABELS[c][0]}: mean of {n} of {len(group)} rows")
            table.append(f"| {name} | {dataset} | {' | '.join(cells)} |")
            records.append(record)
    text = "\n".join(table) + "\n"
    text += (f"\n{len(rows)} images; references given: {refs}; – : not available (no pyiqa, no --arcface, "
             "no GT or no reference).\n")
    if notes:
        text += "".join(f"- {n}\n" for n in notes)
    return text, records


def contact_sheet(rows: list[dict[str, str]], out_dir: str, size: int, count: int) -> np.ndarray:
    """LQ | Ref_1 | restored | GT tiles of the first `count` rows (blank where absent), with a header."""
    tile, header = SHEET_TILE, 28
    labels = ("LQ", "Ref_1", "restored", "GT")
    chosen = sorted(rows, key=lambda r: int(r["index"]))[:count]
    sheet = np.full((header + tile * len(chosen), tile * len(labels), 3), 255, np.uint8)
    for j, label in enumerate(labels):
        cv2.putText(sheet, label, (j * tile + 8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for i, r in enumerate(chosen):
        paths = (r["lq_image"], r["ref1_image"], os.path.join(out_dir, "restored", r["restored"]), r["gt_image"])
        for j, path in enumerate(paths):
            if not path:
                continue
            image = images.read_uint8(path, size)
            interp = cv2.INTER_AREA if size > tile else cv2.INTER_NEAREST
            sheet[header + i * tile:header + (i + 1) * tile, j * tile:(j + 1) * tile] = cv2.resize(
                image, (tile, tile), interpolation=interp)
    return sheet


@dataclasses.dataclass
class Evaluator:
    """What scoring one row needs: the jitted restoration and embeddings, the IQA metrics and the settings."""

    system: FaceSystem
    size: int
    refs: int
    out_dir: str
    restore: Callable
    embedders: dict[str, Callable[[np.ndarray], np.ndarray]]
    iqa: dict[str, Callable[[np.ndarray], float]]
    synthesise: Callable[[np.ndarray, int], tuple[np.ndarray, str]]
    key: jax.Array
    ssim_channels: str

    def __call__(self, row: Row) -> dict[str, str]:
        """Restores one row, saves the result, and returns its per-image CSV record (formatted strings)."""
        start, size = time.perf_counter(), self.size
        gt = images.read_uint8(row.gt, size) if row.gt else None
        name = output_name(row)
        if row.lq:
            lq, how, lq_path = images.read_uint8(row.lq, size), "given", row.lq
        else:
            lq, how = self.synthesise(gt, row.index)
            lq_path = os.path.join(self.out_dir, "degraded", name)
            Image.fromarray(lq).save(lq_path)
        used = row.refs[: self.refs]
        refs = (np.stack([images.to_model(images.read_uint8(p, size)) for p in used])[None] if used
                else np.zeros((1, 0, size, size, 3), np.float32))
        restored = images.from_model(self.restore(self.system, images.to_model(lq)[None], refs, self.key)[0],
                                     (size, size))
        Image.fromarray(restored).save(os.path.join(self.out_dir, "restored", name))

        ref1 = images.read_uint8(row.refs[0], size) if row.refs else None
        # One embedding call of fixed shape per recogniser (absent images as blanks, their features dropped).
        shown = {"restored": restored, "lq": lq, "gt": gt, "ref1": ref1}
        batch = np.stack([images.to_model(x if x is not None else np.zeros_like(lq)) for x in shown.values()])
        feats = {name: {k: (e if shown[k] is not None else None) for k, e in zip(shown, embed(batch))}
                 for name, embed in self.embedders.items()}
        values = score(restored, gt, feats, self.iqa, "restored", self.ssim_channels)
        values.update({f"lq_{k}": v for k, v in score(lq, gt, feats, self.iqa, "lq", self.ssim_channels).items()})
        record = {"index": row.index, "dataset": row.dataset, "gt_image": row.gt or "", "lq_image": lq_path,
                  "ref1_image": row.refs[0] if row.refs else "", "refs_used": len(used), "degradation": how,
                  "restored": name, "seconds": f"{time.perf_counter() - start:.2f}"}
        record.update({k: f"{v:.6f}" for k, v in values.items()})
        return {k: str(v) for k, v in record.items()}


def evaluate(args: argparse.Namespace) -> int:
    """Restores and scores every row not yet in OUT/per_image.csv, then writes the summary and contact sheet."""
    dataset = args.dataset or os.path.splitext(os.path.basename(args.csv))[0]
    rows = read_rows(args.csv, args.image_dir, args.lq_dir or args.image_dir, args.ref_dir or args.image_dir, dataset)
    if args.limit:
        rows = rows[: args.limit]
    out_dir = args.output_dir or os.path.join(
        args.checkpoint, "eval", f"{os.path.splitext(os.path.basename(args.csv))[0]}_refs{args.refs}")
    # What will be written, before the model loads.
    images.check_output_dir(out_dir)
    written = [os.path.join(out_dir, f) for f in (SETTINGS_FILE, PER_IMAGE_FILE, "summary.md", "summary.csv",
                                                  "contact_sheet.png")]
    images.check_distinct([*[(path, args.csv) for path in written],
                           *[(os.path.join(out_dir, sub, output_name(r)), r.gt or r.lq) for r in rows
                             for sub in ("restored", "degraded")]],
                          [args.csv, *[p for r in rows for p in (r.gt, r.lq, *r.refs) if p]])
    system, cfg, step = workdir.load(args.checkpoint, prefer_ema=not args.no_ema, step=args.step,
                                     lora_init=args.lora_init)
    size = cfg.data.resolution
    for sub in ("restored", "degraded"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    check_settings(out_dir, {"checkpoint": os.fspath(storage.path(args.checkpoint)), "step": step,
                             "csv": os.path.abspath(args.csv), "refs": args.refs, "steps": args.steps,
                             "guidance": args.guidance, "seed": args.seed, "degradation": args.degradation,
                             "adaface": args.adaface, "arcface": args.arcface, "ssim_channels": args.ssim_channels,
                             "ema": not args.no_ema, "resolution": size})
    per_image = os.path.join(out_dir, PER_IMAGE_FILE)
    done = read_done(per_image)
    todo = [r for r in rows if r.index not in done]
    print(f"evaluating the step-{step} model of {args.checkpoint} on {len(rows)} rows of {args.csv} "
          f"({len(rows) - len(todo)} already done) -> {out_dir}", file=sys.stderr)

    iqa, messages = metrics.load_iqa() if not args.no_iqa else ({}, ["--no-iqa: MUSIQ, CLIP-IQA, MANIQA left empty"])
    for message in messages:
        print(f"note: {message}", file=sys.stderr)
    if not args.adaface and not cfg.model.face_encoder.weights:
        print("note: the run's face encoder is randomly initialised: AdaFace scores are not meaningful "
              "(pass --adaface with a converted AdaFace IR-50)", file=sys.stderr)
    evaluator = Evaluator(system, size, args.refs, out_dir,
                          nnx.jit(partial(sampling.restore_faces, steps=args.steps, guidance=args.guidance)),
                          identity_embedders(system, args.adaface, args.arcface), iqa,
                          degradation_for(cfg, args.degradation), jax.random.PRNGKey(args.seed), args.ssim_channels)

    new_file = not os.path.isfile(per_image)
    with open(per_image, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        bar = tqdm(todo, unit="image", file=sys.stderr, initial=len(rows) - len(todo), total=len(rows))
        for row in bar:
            done[row.index] = evaluator(row)
            writer.writerow(done[row.index])
            f.flush()  # a killed run keeps every finished row
            ref_mean = mean_of(list(done.values()), "ref_adaface")[0]
            if ref_mean is not None:
                bar.set_postfix(ref_adaface=f"{ref_mean:.3f}")

    finished = [done[r.index] for r in rows if r.index in done]
    text, records = summary(finished, args.method or f"IConFace (step {step})", args.refs)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    Image.fromarray(contact_sheet(finished, out_dir, size, args.sheet_rows)).save(
        os.path.join(out_dir, "contact_sheet.png"))
    print(text, end="")
    print(f"wrote {out_dir}/{{{PER_IMAGE_FILE}, summary.md, summary.csv, contact_sheet.png}}", file=sys.stderr)
    return 0


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """`--checkpoint` and `--lora-init`: the model, as `evaluate` and `demo_check` load it."""
    p.add_argument("--checkpoint", required=True, help="training workdir (config.json + checkpoints/), or a config "
                                                       "FILE.py[:ARG] with --lora-init and --output-dir")
    p.add_argument("--lora-init", default="", help="converted LoRA (python -m convert.lora) the model starts from")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options `evaluate` and `demo_check` share after their own: SSIM's channels, the sampler, the contact
    sheet, the checkpoint's weights and step, the compilation cache."""
    p.add_argument("--ssim-channels", choices=metrics.SSIM_CHANNELS, default="y",
                   help="SSIM on luma as pyiqa's default `ssim` (y), or per RGB channel as its `ssimc` (rgb)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sheet-rows", type=int, default=8, help="rows of the contact sheet")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even where an EMA was kept")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    compilation.add_flag(p)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`argv` parsed by `p`, the compilation cache enabled; a config checkpoint without `--output-dir` and a gs://
    output are refused (exit 2)."""
    args = p.parse_args(argv)
    # Only programs that take a second or more to compile (the restoration): eager ops are not worth a file each.
    compilation.enable(args.compile_cache, min_compile_s=1.0)
    if args.checkpoint.partition(":")[0].endswith(".py") and not args.output_dir:
        p.error("a config as --checkpoint needs --output-dir")
    if storage.is_remote(args.output_dir or args.checkpoint):  # the default output is inside the workdir
        p.error("results are written to a local --output-dir: name one (the checkpoint may be gs://)")
    return args


def run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`command(args)`; an OSError or ValueError (a bad file or setting) is one line "error: ..." and exit 1."""
    try:
        return command(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description="Evaluate IConFace on a benchmark CSV (Ref/GT-ArcFace and -AdaFace, "
                                            "PSNR, SSIM, IQA).")
    add_checkpoint_options(p)
    p.add_argument("--csv", required=True, help="CSV with gt_image, optional lq_image, ref_image (list literal)")
    p.add_argument("--image-dir", default="", help="folder the CSV's gt_image (and ref_image) names are relative to")
    p.add_argument("--lq-dir", default="", help="folder of the given degraded images (default: --image-dir)")
    p.add_argument("--ref-dir", default="", help="folder of the references (default: --image-dir)")
    p.add_argument("--refs", type=int, choices=(0, 1, 2, 3), default=3,
                   help="references given to the model (default 3)")
    p.add_argument("--output-dir", default="", help="default: CHECKPOINT/eval/<csv name>_refs<k>")
    p.add_argument("--dataset", default="", help="dataset name in the summary for rows without a `dataset` "
                                                 "column (default: the CSV's name)")
    p.add_argument("--method", default="", help="method name in the summary (default: 'IConFace (step N)')")
    p.add_argument("--degradation", default="", help="preset for rows without lq_image (default: the config's mix)")
    p.add_argument("--adaface", default="", help="converted AdaFace directory for the identity metrics "
                                                 "(default: the run's face encoder)")
    p.add_argument("--arcface", default="", help="converted ArcFace IResNet directory (python -m convert.arcface) "
                                                 "for the Ref-ArcFace and GT-ArcFace columns (default: left empty)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows (0: all)")
    p.add_argument("--no-iqa", action="store_true", help="skip MUSIQ, CLIP-IQA and MANIQA even if pyiqa is present")
    add_run_options(p)
    args = parse(p, argv)
    if not args.image_dir:
        p.error("--csv needs --image-dir")
    return run(evaluate, args)


if __name__ == "__main__":
    raise SystemExit(main())
