"""The reference protocol and the epoch plan that groups samples into static-shape batches.

Protocol (paper, training data): each sample draws its number of references k from
`probs` (default 30% 0, 30% 1, 20% 2, 20% 3); a target with fewer than k usable references gets
the number it has, and references are never duplicated to fill a slot. So a sample's reference
count is a = min(k, available).

Plan: jit needs one reference count R per batch, and every process of a multi-host run must agree
on it. The plan of an epoch is a pure function of (seed, epoch) over record *metadata* (how many
references each target has), so every process computes the same plan without communicating:
shuffle the records, draw each one's k and a = min(k, available), bucket the records by a, cut each
bucket into global batches of `global_batch` samples, and shuffle the batches. Every batch then
has a single R and no padding; each sample still follows the protocol exactly. A bucket's
remainder (< one global batch) waits for a later epoch's reshuffle; to give every epoch the same
number of batches (which makes (epoch, step) arithmetic and resumption trivial), each epoch keeps
`len(records) // global_batch - (len(probs) - 1)` batches, never more than the buckets fill.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_PROBS = (0.3, 0.3, 0.2, 0.2)  # references 0, 1, 2, 3
_PLAN_STREAM = 0x5EED  # separates the plan's random stream from the per-sample ones


def check_probs(probs: Sequence[float]) -> np.ndarray:
    """`probs` (probability of 0, 1, ... references) as float64, refused unless non-negative and summing to 1."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(p < 0) or abs(p.sum() - 1) > 1e-6:
        raise ValueError(f"reference-count probabilities must be non-negative and sum to 1, got {tuple(probs)}")
    return p


def draw_counts(rng: np.random.Generator, probs: Sequence[float], n: int) -> np.ndarray:
    """Draw n protocol reference counts k (int64 in 0..len(probs)-1)."""
    p = check_probs(probs)
    return rng.choice(p.size, size=n, p=p / p.sum())


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """One epoch: `records[j, g]` is the record at slot g of global batch j, `counts[j]` that batch's
    reference count; `buckets[r]` lists every record whose count this epoch is r, and
    `bucket_pos[j, g]` is where `records[j, g]` sits in its bucket (deterministic substitutes for
    unreadable images are taken from the bucket, onwards from there)."""

    records: np.ndarray  # (steps, global_batch) int64
    counts: np.ndarray  # (steps,) int64
    bucket_pos: np.ndarray  # (steps, global_batch) int64
    buckets: tuple[np.ndarray, ...]


def steps_per_epoch(num_records: int, global_batch: int, num_counts: int) -> int:
    """Batches in every epoch (see the module docstring); raises if the data cannot fill one."""
    steps = num_records // global_batch - (num_counts - 1)
    if steps < 1:
        raise ValueError(
            f"{num_records} usable targets cannot fill a global batch of {global_batch} for each of "
            f"{num_counts} reference counts; need at least {(num_counts) * global_batch}")
    return steps


def plan_epoch(available: np.ndarray, probs: Sequence[float], global_batch: int, seed: int, epoch: int,
               shuffle: bool = True) -> EpochPlan:
    """The plan of one epoch; `available[i]` is record i's number of candidate references."""
    available = np.asarray(available, np.int64)
    n, num_counts = available.size, len(probs)
    steps = steps_per_epoch(n, global_batch, num_counts)
    rng = np.random.default_rng([seed, epoch, _PLAN_STREAM])
    order = rng.permutation(n) if shuffle else np.arange(n)
    actual = np.minimum(draw_counts(rng, probs, n), available[order])
    buckets = tuple(order[actual == r] for r in range(num_counts))
    batches = [(r, start) for r, bucket in enumerate(buckets)
               for start in range(0, len(bucket) - global_batch + 1, global_batch)]
    assert len(batches) >= steps  # sum_r floor(|bucket_r| / B) >= floor(n / B) - (K - 1)
    if shuffle:
        chosen = rng.permutation(len(batches))[:steps]
    else:  # in record order, the buckets interleaved
        chosen = np.argsort([buckets[r][start] for r, start in batches], kind="stable")[:steps]
    counts = np.asarray([batches[i][0] for i in chosen], np.int64)
    starts = np.asarray([batches[i][1] for i in chosen], np.int64)
    bucket_pos = starts[:, None] + np.arange(global_batch)[None, :]
    records = np.stack([buckets[r][p] for r, p in zip(counts, bucket_pos)]).astype(np.int64)
    return EpochPlan(records=records, counts=counts, bucket_pos=bucket_pos, buckets=buckets)
