"""Group-by-reference-count versus pad-and-mask batching, on the cost model of docs/design.md#flops.

    python -m tools.batching_cost

A sample with R references has L = 512 text + 1024 * (2 + R) tokens. Forward FLOPs of the
klein-4B transformer: linear 2 L x 122.6M x 25 blocks, attention 4 L^2 x 3072 x 25; a LoRA
training step costs about 2 x linear + 3.5 x attention. Padded reference slots cost as much as
real ones (a mask removes their influence, not their FLOPs), so:

- group (this pipeline): every batch has one R, a sample costs step(R_sample);
- pad to the maximum (3 slots, one compiled shape): every sample costs step(3);
- pad to the batch's largest R (up to four shapes): a sample costs step(max R over its batch).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iconface_jax.data.references import DEFAULT_PROBS

TEXT_TOKENS, IMAGE_TOKENS = 512, 1024
LINEAR_PARAMS, BLOCKS, HIDDEN = 122.6e6, 25, 3072
H100_BF16_PEAK = 790e12  # FLOP/s, measured (docs/performance.md#h100-starting-figures)


def step_flops(num_refs: int) -> float:
    """Training-step FLOPs of one sample with `num_refs` references."""
    tokens = TEXT_TOKENS + IMAGE_TOKENS * (2 + num_refs)
    linear = 2 * tokens * LINEAR_PARAMS * BLOCKS
    attention = 4 * tokens**2 * HIDDEN * BLOCKS
    return 2 * linear + 3.5 * attention


def grouped(probs: Sequence[float]) -> float:
    """Expected FLOPs per sample when batches are grouped by reference count."""
    return float(sum(p * step_flops(r) for r, p in enumerate(probs)))


def padded_to_batch_max(probs: Sequence[float], batch: int) -> float:
    """Expected FLOPs per sample when a batch of `batch` samples is padded to its largest count."""
    cdf = np.cumsum(probs) / np.sum(probs)
    p_max = np.diff(np.concatenate([[0.0], cdf**batch]))  # P(max of `batch` draws == r)
    return float(sum(p * step_flops(r) for r, p in enumerate(p_max)))


def table(probs: Sequence[float] = DEFAULT_PROBS, batches: Sequence[int] = (1, 4, 16, 64),
          mfu: float = 0.6) -> str:
    """The comparison as a markdown table (samples/s: one H100 at `mfu`)."""
    base = grouped(probs)
    rows = [("group by R (chosen)", base, len(probs))]
    rows += [(f"pad to batch max, batch {b}", padded_to_batch_max(probs, b), len(probs)) for b in batches]
    rows.append((f"pad to {len(probs) - 1} always", step_flops(len(probs) - 1), 1))
    counts = range(len(probs))
    lines = [
        "| references R | " + " | ".join(str(r) for r in counts) + " |",
        "|---|" + "---|" * len(probs),
        "| tokens L | " + " | ".join(str(TEXT_TOKENS + IMAGE_TOKENS * (2 + r)) for r in counts) + " |",
        "| step TFLOP / sample | " + " | ".join(f"{step_flops(r) / 1e12:.1f}" for r in counts) + " |",
        "",
        "| batching | TFLOP / sample | vs grouped | padding waste | samples/s (H100, MFU %.1f) | compiled shapes |"
        % mfu,
        "|---|---|---|---|---|---|",
    ]
    for name, flops, shapes in rows:
        lines.append(f"| {name} | {flops / 1e12:.1f} | {flops / base:.2f}x | {1 - base / flops:.0%} "
                     f"| {mfu * H100_BF16_PEAK / flops:.1f} | {shapes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
