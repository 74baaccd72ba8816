"""The host-side training input pipeline: a Grain dataset of degraded faces with references.

    it = make_iterator(config.data, global_batch_size=32)   # per process: 32 / process_count rows
    batch = next(it)            # {"gt", "deg": (B,H,W,3), "refs": (B,R,H,W,3), "num_refs": (B,)}
                                # (+ "gt_latents" (B,L,C), "ref_latents" (B,R,L,C) with data.latents)
    state = it.get_state()      # {"batches": n, ...}; it.set_state(state) resumes exactly

Every batch has one reference count R (0..3) shared by all its rows and by every process at that
step, so shapes are static without padding: the epoch plan (`references.plan_epoch`) groups
samples by their protocol reference count. Images are float32 in [-1, 1]; `num_refs` is int32 and
equals R on every row. A jitted step therefore compiles once per R (four shapes).

Reproducibility: the epoch plan is a function of (seed, epoch); the sample at global position p of
an epoch draws its references, degradation preset and degradation from
`numpy.random.default_rng([seed, epoch, p])`. `FaceSamples.sample(epoch, p)` rebuilds any sample.
A process reads only its own rows (`process_index`-th block of `global_batch_size / process_count`
of every global batch); the global batch does not depend on the number of processes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any

import grain
import ml_collections
import numpy as np

from iconface_jax.data import degrade, latents, references
from iconface_jax.data.catalog import make_source
from iconface_jax.data.sources import ISSUE_KINDS, ImageError, Key, Record, Source, decode

logger = logging.getLogger(__name__)

_MAX_SUBSTITUTES = 64  # records tried in place of one with unreadable images before giving up
_UNBOUNDED_EPOCHS = 1_000_000  # "repeat forever" (the dataset length must be finite)
_LOG_INTERVAL_S = 60.0


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config, with every field documented."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | ffhq_ref | folder | tfds
    c.resolution = 512  # images are centre-cropped to a square and resized to this side
    c.seed = 42  # plan, references and degradations; make_iterator(seed=...) overrides it
    c.shuffle = True  # False: records in source order (evaluation, previews)
    c.num_epochs = 0  # 0: repeat forever
    # Protocol: P(k references) for k = 0, 1, 2, 3; a target with fewer gets what it has.
    c.ref_count_probs = references.DEFAULT_PROBS
    c.min_side_fraction = 0.25  # images with a shorter side below this x resolution are skipped
    c.use_given_lq = False  # use a record's given degraded image (FFHQ-Ref lq_image) if it has one
    # Precomputed latents of the clean images (python -m iconface_jax.data.latents): batches then carry
    # gt_latents (B, L, C) and ref_latents (B, R, L, C), and the trainer skips the encoder for them.
    c.latents = ""
    # Host throughput: worker processes (0: all in the trainer process), batches each process
    # assembles concurrently, and batches it buffers ahead.
    c.num_workers = 8
    c.num_threads = 1
    c.prefetch_batches = 2
    # Global batches the trainer places on the devices ahead of the running step (a background thread;
    # sharding.prefetch_to_device); 0: each batch is loaded and copied when the step needs it.
    c.device_prefetch = 2

    c.degradation = ml_collections.ConfigDict()
    # Each sample picks one preset: one checkpoint serves moderate and severe inputs (our choice; the paper's
    # "single checkpoint, two modes" means with and without references).
    c.degradation.presets = ("moderate", "severe")
    c.degradation.preset_probs = (0.5, 0.5)
    # Full parameters of every named preset (degrade.Preset fields), overridable from the command
    # line, e.g. --config.data.degradation.params.severe.scale_range="(8., 16.)".
    c.degradation.params = ml_collections.ConfigDict(
        {name: p.to_dict() for name, p in degrade.PRESETS.items()})

    # aligned: views are aligned crops as FFHQ's (eyes and mouth in fixed places); False adds free roll, scale
    # and shift (the demo's earlier data; docs/decisions.md#aligned-synthetic-faces).
    c.synthetic = ml_collections.ConfigDict(dict(num_identities=1000, images_per_identity=6, seed=0,
                                                 first_identity=0, aligned=True))
    # FFHQ-Ref (ReF-LDM release): the CSV and image folders; split_file: id_based_ffhq_split/*.txt. The
    # validation CSV and split (val_references.csv, val.txt), if given, feed the training sample grids.
    c.ffhq_ref = ml_collections.ConfigDict(dict(
        csv="", image_dir="", lq_dir="", ref_dir="", split_file="", val_csv="", val_split_file=""))
    c.folder = ml_collections.ConfigDict(dict(root=""))  # root/<identity>/*.{png,jpg,jpeg,webp}
    c.tfds = ml_collections.ConfigDict(dict(
        name="", split="train", data_dir="", image_key="image", identity_key="identity"))
    return c


def validation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The `data` config of held-out data for previews: synthetic identities after the training ones, or
    FFHQ-Ref's validation CSV when `ffhq_ref.val_csv` is set; None where the source has no held-out part."""
    held_out = ml_collections.ConfigDict(config.to_dict())
    if config.source == "synthetic":
        held_out.synthetic.first_identity = config.synthetic.first_identity + config.synthetic.num_identities
        return held_out
    if config.source == "ffhq_ref" and config.ffhq_ref.val_csv:
        held_out.ffhq_ref.csv, held_out.ffhq_ref.split_file = config.ffhq_ref.val_csv, config.ffhq_ref.val_split_file
        return held_out
    return None


@dataclasses.dataclass(frozen=True)
class SampleInfo:
    """What a sample was built from (tests, debugging)."""

    gt: Key
    refs: tuple[Key, ...]
    degradation: str  # a preset name, or "given" for a record's own degraded image
    substitutes: int  # records skipped before this one because of unreadable images


class FaceSamples:
    """Random-access samples of one process, in batch order: element i is row i % B of the local
    batch i // B (B = global_batch // process_count). Grain batches, parallelises and checkpoints it."""

    def __init__(self, source: Source, config: ml_collections.ConfigDict, *, seed: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if not source.records:
            raise ValueError("the data source has no usable targets (see the warnings above)")
        self.source = source
        self.seed = int(seed)
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.resolution = int(config.resolution)
        self.min_side = int(round(config.min_side_fraction * self.resolution))
        try:
            self.probs = tuple(float(p) for p in references.check_probs(config.ref_count_probs))
        except ValueError as e:
            raise ValueError(f"config.data.ref_count_probs: {e}") from None
        self.shuffle = bool(config.shuffle)
        self.use_given_lq = bool(config.use_given_lq)
        deg = config.degradation
        missing = [name for name in deg.presets if name not in deg.params]
        if missing or len(deg.presets) != len(deg.preset_probs):
            raise ValueError(f"degradation: presets {tuple(deg.presets)} need parameters in "
                             f"degradation.params (missing {missing}) and one probability each")
        self.presets = {name: degrade.Preset.from_dict(deg.params[name]) for name in deg.presets}
        self.preset_names = tuple(deg.presets)
        self.preset_probs = np.asarray(deg.preset_probs, np.float64) / np.sum(deg.preset_probs)
        self.available = np.asarray([len(r.refs) for r in source.records], np.int64)
        self.steps_per_epoch = references.steps_per_epoch(len(self.available), global_batch, len(self.probs))
        self.num_epochs = int(config.num_epochs) or _UNBOUNDED_EPOCHS
        self.latents = latents.LatentStore(config.latents) if config.latents else None
        if self.latents is not None:
            missing = self.latents.missing(latents.clean_keys(source.records))
            if missing:
                raise ValueError(f"data.latents {config.latents} has no latents for {len(missing)} images of this "
                                 f"source, e.g. {missing[:3]}; precompute them for this dataset")
        self._plans: dict[int, references.EpochPlan] = {}
        self._bad: dict[Key, str] = {}  # per process: known-bad images are not decoded again

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes start with empty caches.
        return {**self.__dict__, "_plans": {}, "_bad": {}}

    def __len__(self) -> int:
        return self.num_epochs * self.steps_per_epoch * self.local_batch

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, rest = divmod(int(index), self.steps_per_epoch * self.local_batch)
        step, row = divmod(rest, self.local_batch)
        position = step * self.global_batch + self.process_index * self.local_batch + row
        return self.sample(epoch, position)[0]

    def plan(self, epoch: int) -> references.EpochPlan:
        """The epoch's plan (cached: one epoch is read for many consecutive indices)."""
        plan = self._plans.get(epoch)
        if plan is None:
            plan = references.plan_epoch(self.available, self.probs, self.global_batch, self.seed, epoch,
                                         self.shuffle)
            self._plans = {epoch: plan}
        return plan

    def sample(self, epoch: int, position: int) -> tuple[dict[str, np.ndarray], SampleInfo]:
        """The sample at global `position` (step * global_batch + row) of `epoch`, and its provenance."""
        plan = self.plan(epoch)
        step, row = divmod(position, self.global_batch)
        count = int(plan.counts[step])
        bucket = plan.buckets[count]
        start = int(plan.bucket_pos[step, row])
        rng = np.random.default_rng([self.seed, epoch, position])
        issues = np.zeros(len(ISSUE_KINDS), np.int32)
        for attempt in range(min(len(bucket), _MAX_SUBSTITUTES)):
            record = self.source.records[bucket[(start + attempt) % len(bucket)]]
            built = self._build(record, count, rng, issues)
            if built is not None:
                arrays, info = built
                arrays["_issues"] = issues
                return arrays, dataclasses.replace(info, substitutes=attempt)
        raise RuntimeError(f"{_MAX_SUBSTITUTES} records in a row have unreadable images "
                           f"(epoch {epoch}, position {position}); is the dataset readable?")

    def _build(self, record: Record, count: int, rng: np.random.Generator,
               issues: np.ndarray) -> tuple[dict[str, np.ndarray], SampleInfo] | None:
        """One sample from `record` with `count` references; None if its images fall short."""
        gt = self._read(record.gt, issues)
        if gt is None:
            return None
        refs, ref_keys = [], []
        for i in rng.permutation(len(record.refs)):
            if len(refs) == count:
                break
            image = self._read(record.refs[i], issues)
            if image is not None:  # an unreadable reference is replaced by another, never duplicated
                refs.append(image)
                ref_keys.append(record.refs[i])
        if len(refs) < count:
            return None
        deg = self._read(record.lq, issues) if self.use_given_lq and record.lq is not None else None
        name = "given"
        if deg is None:
            name = self.preset_names[rng.choice(len(self.preset_names), p=self.preset_probs)]
            deg = degrade.apply(gt, self.presets[name], rng)
        ref_array = np.stack(refs) if refs else np.zeros((0,) + gt.shape, np.uint8)
        arrays = {"gt": _to_unit(gt), "deg": _to_unit(deg), "refs": _to_unit(ref_array),
                  "num_refs": np.int32(count)}
        if self.latents is not None:
            arrays["gt_latents"] = self.latents.get(record.gt)
            arrays["ref_latents"] = (np.stack([self.latents.get(k) for k in ref_keys]) if ref_keys else
                                     np.zeros((0, *self.latents.meta["token_shape"]), np.float32))
        return arrays, SampleInfo(gt=record.gt, refs=tuple(ref_keys), degradation=name, substitutes=0)

    def _read(self, key: Key, issues: np.ndarray) -> np.ndarray | None:
        """Decoded image, or None (counted, logged once per process and file) if unusable."""
        kind = self._bad.get(key)
        if kind is None:
            try:
                image, converted = decode(self.source.fetch(key), self.resolution, self.min_side)
                if converted:
                    issues[ISSUE_KINDS.index("converted")] += 1
                return image
            except ImageError as e:
                kind = self._bad[key] = e.kind
                logger.warning("data: skipping %s image %s (%s)", e.kind, key, e)
        issues[ISSUE_KINDS.index(kind)] += 1
        return None


def _to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] to float32 [-1, 1]."""
    return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class FaceIterator(grain.DatasetIterator):
    """The trainer's iterator over this process's batches, with Grain doing the work.

    Yields {"gt", "deg", "refs", "num_refs"}. The samples are random access, so the state is just
    the number of batches consumed (plus the issue counts): `set_state` reopens the Grain pipeline
    at that batch. A state therefore restores under any `num_workers` and Grain version, and is
    JSON-able, so `grain.checkpoint.CheckpointSave/Restore` work with Orbax.

    `issues` counts images skipped (`unreadable`, `too_small`) or `converted` while loading;
    `samples.source.issues` what indexing skipped. Skips are logged as warnings at most once a
    minute; the counts are events (a bad file read in two epochs counts twice).
    """

    def __init__(self, samples: FaceSamples, config: ml_collections.ConfigDict):
        super().__init__()
        self.samples = samples
        self.steps_per_epoch = samples.steps_per_epoch
        self._read = grain.ReadOptions(num_threads=int(config.num_threads),
                                       prefetch_buffer_size=int(config.prefetch_batches))
        self._num_workers = int(config.num_workers)
        self.batches = 0
        self.issues: Counter = Counter()
        self._logged: Counter = Counter()
        self._last_log = 0.0
        self._inner = self._open(0)

    def _open(self, start: int) -> grain.DatasetIterator:
        """Grain's iterator from batch `start` on (nothing runs before the first `next`)."""
        batches = grain.MapDataset.source(self.samples).batch(self.samples.local_batch, drop_remainder=True)
        ds = batches[start:].to_iter_dataset(self._read)
        if self._num_workers > 0:
            from absl import flags  # Grain's worker start-up reads absl flags

            if not flags.FLAGS.is_parsed():  # a program that does not use absl: take the defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._inner)
        self.batches += 1
        counts = batch.pop("_issues").sum(axis=0)
        for kind, n in zip(ISSUE_KINDS, counts):
            if n:
                self.issues[kind] += int(n)
        self._maybe_log()
        return batch

    def _maybe_log(self) -> None:
        skipped = {k: v for k, v in self.issues.items() if k != "converted"}
        if skipped == {k: v for k, v in self._logged.items() if k != "converted"}:
            return
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL_S:
            logger.warning("data: images skipped so far (events): %s; converted to RGB uint8: %d",
                           ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())), self.issues["converted"])
            self._logged, self._last_log = Counter(self.issues), now

    def get_state(self) -> dict[str, Any]:
        """{"batches": consumed, "issues": counts}."""
        return {"batches": self.batches, "issues": dict(self.issues)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()`: the following batches equal the uninterrupted run's."""
        self._inner.close()
        self.batches = int(state["batches"])
        self._inner = self._open(self.batches)
        self.issues = Counter(state.get("issues", {}))
        self._logged = Counter(self.issues)

    def start_prefetch(self) -> None:
        """Start the workers before the first `next` (e.g. while the model restores)."""
        self._inner.start_prefetch()

    def close(self) -> None:
        """Stop the worker processes and threads."""
        inner = getattr(self, "_inner", None)  # absent if __init__ failed
        if inner is not None:
            inner.close()
        super().close()


def make_iterator(config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  source: Source | None = None) -> FaceIterator:
    """This process's batch iterator (see the module docstring).

    `seed` overrides `config.seed`; `process_index`/`process_count` default to JAX's;
    `source` overrides `config.source`.
    """
    if process_index is None or process_count is None:
        import jax  # only the multi-host default needs it

        process_index, process_count = jax.process_index(), jax.process_count()
    samples = FaceSamples(source if source is not None else make_source(config), config,
                          seed=config.seed if seed is None else seed, global_batch=global_batch_size,
                          process_index=process_index, process_count=process_count)
    return FaceIterator(samples, config)
