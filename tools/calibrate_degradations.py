"""Calibrate the degradation presets on the real benchmark faces (`../shared/faces`).

    python -m tools.calibrate_degradations [--faces ../shared/faces] [--seeds 0 1 2 3]

Degrades every `gt.jpg` once per seed with each preset and prints the median PSNR against the
FFHQ-Ref Moderate (25.2 dB) and Severe (19.6 dB) targets, beside the medians of the benchmarks' own
`deg.jpg` inputs as a check of the PSNR code itself.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from PIL import Image

from iconface_jax.data import degrade

TARGETS = {"moderate": 25.2, "severe": 19.6}  # FFHQ-Ref input medians (docs/decisions.md#degradation-mix)
TOLERANCE_DB = 1.5
DEFAULT_FACES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "faces")


def load_ground_truths(faces_dir: str) -> list[np.ndarray]:
    """The benchmark `gt.jpg` images (all splits, sorted by path) as uint8 RGB."""
    paths = sorted(glob.glob(os.path.join(faces_dir, "*", "*", "gt.jpg")))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def preset_psnrs(images: list[np.ndarray], preset: str | degrade.Preset, seed: int) -> np.ndarray:
    """PSNR of one degradation of each image; image i uses the generator seeded by (seed, i)."""
    out = []
    for i, gt in enumerate(images):
        deg = degrade.apply(gt, preset, np.random.default_rng([seed, i]))
        out.append(degrade.psnr(deg, gt))
    return np.asarray(out)


def benchmark_psnrs(faces_dir: str) -> dict[str, float]:
    """Median PSNR(deg.jpg, gt.jpg) per benchmark split, to compare with the medians that ../shared/faces publishes."""
    result = {}
    for split in sorted(os.listdir(faces_dir)):
        cases = sorted(glob.glob(os.path.join(faces_dir, split, "*", "gt.jpg")))
        if cases:
            values = [degrade.psnr(np.asarray(Image.open(c.replace("gt.jpg", "deg.jpg")).convert("RGB")),
                                   np.asarray(Image.open(c).convert("RGB"))) for c in cases]
            result[split] = float(np.median(values))
    return result


def main() -> None:
    """Print the calibration table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", default=DEFAULT_FACES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    images = load_ground_truths(args.faces)
    if not images:
        raise SystemExit(f"no */*/gt.jpg under {args.faces}")
    print(f"{len(images)} ground truths from {os.path.abspath(args.faces)}")
    for split, value in benchmark_psnrs(args.faces).items():
        print(f"  benchmark {split:28s} median PSNR(deg, gt) {value:5.1f} dB")
    for name, target in TARGETS.items():
        medians = [float(np.median(preset_psnrs(images, name, seed))) for seed in args.seeds]
        status = "ok" if all(abs(m - target) <= TOLERANCE_DB for m in medians) else "OUT OF TOLERANCE"
        print(f"  preset {name:9s} target {target:4.1f} dB  medians per seed "
              + " ".join(f"{m:5.2f}" for m in medians) + f"  [{status}]")


if __name__ == "__main__":
    main()
