"""The CPU demo's check: restore held-out synthetic identities without and with references and score them.

    python -m iconface_jax.demo_check --checkpoint runs/demo [--count 48] [--refs 1] [--degradation severe|moderate]
        [--output-dir OUT] [--steps 12] [--guidance 4.0] [--seed 42] [--step S] [--no-ema] [--ssim-channels y|rgb]
        [--sheet-rows 8] [--lora-init DIR] [--compile-cache DIR]

`--count` identities after the run's training ones (`data.pipeline.validation_config`: never trained on), view 0
the target and views 1..`--refs` its references, degraded by `--degradation` or else the run's degradation mix
(seeded by case). Each is restored with the paper's sampler without references and with `--refs` of them, and
the posterior mean (`sampling.posterior_mean`: the model's one-step estimate from sigma 1, what its samples
scatter around) is scored beside the samples. Metrics against the target, for these and the degraded input:
PSNR, SSIM (`iconface_jax.metrics`, as the benchmark computes them) and the **trait MSE**, the error inside the
identity's fine traits (irises, brows, mole, lips, freckles) that only a reference can restore
(docs/demo.md).

Before the model loads, OUT is checked (a writable folder). Writes into OUT (default
`CHECKPOINT/eval/synthetic<N>_refs<k>_step<S>`): `per_image.csv` (one row per method and image), `summary.csv`
and `summary.md` (the means per method; the table is also printed) and `contact_sheet.png` (LQ | Ref_1 | no
references | with references | GT for the first `--sheet-rows` cases). The checkpoint and sampler options are
the benchmark's (`iconface_jax.evaluate`).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from functools import partial

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from iconface_jax import evaluate, images, metrics, sampling, workdir
from iconface_jax.data import pipeline, synthetic

SYNTHETIC_METRICS = {"psnr": ("PSNR ↑", 2), "ssim": ("SSIM ↑", 4), "trait_mse": ("Trait MSE ↓", 5)}


def synthetic_cases(cfg: ml_collections.ConfigDict, count: int, refs: int,
                    preset: str = "") -> dict[str, np.ndarray]:
    """`count` held-out synthetic cases at the run's resolution: identities after the training ones, view 0
    the target, views 1..refs its references, degraded by `preset` or else the run's degradation mix (seeded
    by case).

    Returns uint8 `gt`, `deg` (N, S, S, 3), `refs` (N, refs, S, S, 3) and bool `traits` (N, S, S): the pixels
    of the identity's fine traits (irises, brows, mole, lips, freckles) in the target.
    """
    s = pipeline.validation_config(cfg.data).synthetic  # the identities after the training ones
    source = synthetic.SyntheticSource(count, refs + 1, cfg.data.resolution, s.seed, s.first_identity, s.aligned)
    degrade_case = evaluate.degradation_for(cfg, preset)
    cases = {"gt": [], "deg": [], "refs": [], "traits": []}
    for i, record in enumerate(source.records[:: refs + 1]):
        gt, traits = source.fetch(record.gt, with_traits=True)
        cases["gt"].append(gt)
        cases["traits"].append(traits)
        cases["deg"].append(degrade_case(gt, i)[0])
        cases["refs"].append(np.stack([source.fetch(k) for k in record.refs]) if refs else
                             np.zeros((0, *gt.shape), np.uint8))
    return {k: np.stack(v) for k, v in cases.items()}


def trait_mse(image: np.ndarray, gt: np.ndarray, traits: np.ndarray) -> float:
    """Mean squared error on the [0, 1] scale over the RGB values of the trait pixels."""
    diff = image.astype(np.float64) / 255.0 - gt.astype(np.float64) / 255.0
    return float(np.mean(np.square(diff[traits])))


def evaluate_synthetic(args: argparse.Namespace) -> int:
    """Restores held-out synthetic identities without and with references and scores them against the
    degraded input: PSNR, SSIM and the trait error (what references should fix). The posterior-mean rows
    (`sampling.posterior_mean`) are the model's regression, which sampling scatters around."""
    images.check_output_dir(args.output_dir or os.path.join(args.checkpoint, "eval"))  # before the model loads
    system, cfg, step = workdir.load(args.checkpoint, prefer_ema=not args.no_ema, step=args.step,
                                     lora_init=args.lora_init)
    if cfg.data.source != "synthetic":
        print(f"note: {args.checkpoint} was trained on {cfg.data.source!r} data; evaluating on synthetic faces",
              file=sys.stderr)
    refs = args.refs  # the restoration without references always runs too
    out_dir = args.output_dir or os.path.join(args.checkpoint, "eval",
                                              f"synthetic{args.count}_refs{refs}_step{step}")
    os.makedirs(out_dir, exist_ok=True)
    cases = synthetic_cases(cfg, args.count, refs, args.degradation)
    print(f"evaluating the step-{step} model of {args.checkpoint} on {args.count} held-out synthetic "
          f"identities ({refs} reference(s)) -> {out_dir}", file=sys.stderr)
    sample = nnx.jit(partial(sampling.restore_faces, steps=args.steps, guidance=args.guidance))
    mean = nnx.jit(sampling.posterior_mean)
    key, batch = jax.random.PRNGKey(args.seed), 16
    deg, ref_images = images.to_model(cases["deg"]), images.to_model(cases["refs"])
    with_refs = f"{refs} reference{'s' if refs > 1 else ''}"
    outputs = {f"IConFace, {r}": [] for r in ("no references", with_refs)}
    outputs |= {f"Posterior mean, {r}": [] for r in ("no references", with_refs)}
    for start in tqdm(range(0, len(deg), batch), unit="batch", file=sys.stderr):
        chunk = slice(start, start + batch)
        for name, r in (("no references", ref_images[chunk][:, :0]), (with_refs, ref_images[chunk])):
            for method, run in (("IConFace", sample), ("Posterior mean", mean)):
                restored = np.asarray(run(system, jnp.asarray(deg[chunk]), jnp.asarray(r), key))
                outputs[f"{method}, {name}"].extend(images.from_model(x, x.shape[:2]) for x in restored)
    methods = {"Input (LQ)": cases["deg"], **{name: np.stack(outs) for name, outs in outputs.items()}}

    per_image, records = [], []
    for name, restored in methods.items():
        scores = [{"psnr": metrics.psnr(x, gt), "ssim": metrics.ssim(x, gt, channels=args.ssim_channels),
                   "trait_mse": trait_mse(x, gt, m)}
                  for x, gt, m in zip(restored, cases["gt"], cases["traits"])]
        per_image += [{"method": name, "index": i, **{k: f"{v:.6f}" for k, v in sc.items()}}
                      for i, sc in enumerate(scores)]
        records.append({"method": name, "images": len(scores),
                        **{k: float(np.mean([sc[k] for sc in scores])) for k in SYNTHETIC_METRICS}})
    table = ["| Method | " + " | ".join(label for label, _ in SYNTHETIC_METRICS.values()) + " |",
             "|" + "---|" * (len(SYNTHETIC_METRICS) + 1)]
    table += [f"| {r['method']} | " + " | ".join(f"{r[k]:.{d}f}" for k, (_, d) in SYNTHETIC_METRICS.items()) + " |"
              for r in records]
    degraded = f"the {args.degradation} preset" if args.degradation else "the run's degradation mix"
    text = (f"Held-out synthetic identities, step {step}: {args.count} images at {cfg.data.resolution} px, "
            f"degraded by {degraded}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}. Posterior "
            "mean: the model's one-step estimate from sigma 1, what its samples scatter around.\n\n"
            + "\n".join(table) + "\n")
    for filename, rows in ((evaluate.PER_IMAGE_FILE, per_image), ("summary.csv", records)):
        with open(os.path.join(out_dir, filename), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    columns = [cases["deg"], cases["refs"][:, 0], *list(methods.values())[1:3], cases["gt"]]
    sheet = np.concatenate([np.concatenate(list(c[: args.sheet_rows]), axis=0) for c in columns], axis=1)
    Image.fromarray(cv2.resize(sheet, None, fx=3, fy=3, interpolation=cv2.INTER_NEAREST)).save(
        os.path.join(out_dir, "contact_sheet.png"))
    print(text, end="")
    print(f"wrote {out_dir}/{{{evaluate.PER_IMAGE_FILE}, summary.md, summary.csv, contact_sheet.png}} "
          "(contact sheet: LQ | Ref_1 | no references | with references | GT)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description="The CPU demo's check: held-out synthetic identities restored without "
                                            "and with references, scored by PSNR, SSIM and the error on their fine "
                                            "traits.")
    evaluate.add_checkpoint_options(p)
    p.add_argument("--count", type=int, default=48, metavar="N",
                   help="held-out synthetic identities (default 48, the demo's check)")
    p.add_argument("--refs", type=int, default=1, metavar="{1,2,3}",
                   help="references the second restoration gets (default 1); the first gets none")
    p.add_argument("--output-dir", default="", help="default: CHECKPOINT/eval/synthetic<N>_refs<k>_step<S>")
    p.add_argument("--degradation", default="", help="preset that degrades the cases (default: the config's mix)")
    evaluate.add_run_options(p)
    args = evaluate.parse(p, argv)
    if args.count < 1:
        p.error("--count needs at least 1 identity")
    if args.refs not in (1, 2, 3):
        p.error("the check restores without references anyway: --refs (1-3, default 1) is what the second "
                "restoration gets")
    return evaluate.run(evaluate_synthetic, args)


if __name__ == "__main__":
    raise SystemExit(main())
