"""Latents of the clean images (targets and references), encoded once so that training skips the encoder.

    python -m iconface_jax.data.latents --config configs/iconface_klein4b.py --out latents/ffhq_ref_512
    python -m iconface_jax.train --config configs/iconface_klein4b.py --config.data.latents=latents/ffhq_ref_512

Clean images are only decoded and resized (no augmentation), so a latent is a function of the image key,
the resolution and the autoencoder; degraded images are drawn per sample and are still encoded on the
device. The directory holds `latents.npy` (N, L, C) float32, written row by row into a memory map,
`keys.json` (the image key of each row) and `meta.json` (resolution, autoencoder, token shape). It is
written under a temporary name and renamed when complete. Images the pipeline cannot use are skipped and
reported, as the pipeline skips them.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from tqdm import tqdm

from iconface_jax import storage
from iconface_jax.data.catalog import make_source
from iconface_jax.data.sources import ImageError, Key, decode

ARRAY, KEYS, META = "latents.npy", "keys.json", "meta.json"


def autoencoder_identity(model_cfg: ml_collections.ConfigDict) -> dict:
    """What makes latents reusable: the codec kind, its patch factor and bands, and its weights (resolved path)."""
    a = model_cfg.autoencoder
    weights = os.path.realpath(a.weights) if a.weights and not storage.is_remote(a.weights) else a.weights
    identity = dict(kind=a.kind, factor=int(a.factor), weights=weights, precision=model_cfg.precision)
    if a.bands:  # (absent otherwise, so stores written before bands existed stay valid)
        identity["bands"] = [int(b) for b in a.bands]
    return identity


def clean_keys(records: Iterable) -> list[Key]:
    """Every target and reference key of the records, once each, in first-seen order."""
    return list(dict.fromkeys(k for r in records for k in (r.gt, *r.refs)))


def precompute(cfg: ml_collections.ConfigDict, out: str, batch_size: int = 16) -> dict:
    """Encodes every clean image of `cfg.data`'s source with `cfg.model`'s autoencoder into `out`."""
    from iconface_jax import face_system  # (not at import: the input pipeline needs no model code)

    _require_local(out)
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose a new --out")
    source = make_source(cfg.data)
    keys = clean_keys(source.records)
    autoencoder = face_system.build_autoencoder(cfg.model)
    codec = face_system.codec_of(autoencoder)
    encode = jax.jit(lambda x: codec.encode_tokens(autoencoder, x))
    resolution = int(cfg.data.resolution)
    min_side = int(round(cfg.data.min_side_fraction * resolution))
    token_shape = jax.eval_shape(encode, jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)).shape[1:]

    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        rows = np.lib.format.open_memmap(os.path.join(tmp, ARRAY), "w+", np.float32, (len(keys), *token_shape))
        skipped, pending = {}, []  # pending: (row, uint8 image)

        def flush():  # the last, short batch is padded: one compiled shape
            images = np.zeros((batch_size, resolution, resolution, 3), np.float32)
            images[:len(pending)] = np.stack([img for _, img in pending]).astype(np.float32) * np.float32(2 / 255) - 1
            rows[[i for i, _ in pending]] = np.asarray(encode(jnp.asarray(images)))[:len(pending)]
            pending.clear()

        for i, key in enumerate(tqdm(keys, desc="encoding clean images", unit="img", file=sys.stdout)):
            try:
                pending.append((i, decode(source.fetch(key), resolution, min_side)[0]))
            except ImageError as e:  # its row stays zero and out of the index
                skipped[str(key)] = e.kind
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        rows.flush()
        meta = dict(resolution=resolution, min_side=min_side, autoencoder=autoencoder_identity(cfg.model),
                    token_shape=list(token_shape), count=len(keys) - len(skipped), skipped=skipped)
        with open(os.path.join(tmp, KEYS), "w") as f:  # row i holds keys[i]; null where skipped
            json.dump([None if str(k) in skipped else k for k in keys], f)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class LatentStore:
    """Read access to a precomputed directory by image key; opens its memory map lazily (in each worker)."""

    def __init__(self, path: str):
        _require_local(path)
        for name in (ARRAY, KEYS, META):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path} is not a latents directory: {name} is missing "
                                        f"(python -m iconface_jax.data.latents writes one)")
        self.path = path
        with open(os.path.join(path, META)) as f:
            self.meta = json.load(f)
        with open(os.path.join(path, KEYS)) as f:
            self.rows = {key: i for i, key in enumerate(json.load(f)) if key is not None}
        self._array = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def check(self, cfg: ml_collections.ConfigDict) -> None:
        """Fails unless the latents were made at this config's resolution with its autoencoder."""
        want = dict(resolution=int(cfg.data.resolution), autoencoder=autoencoder_identity(cfg.model))
        have = {k: self.meta[k] for k in want}
        if have != want:
            raise ValueError(f"config.data.latents {self.path}: made for {have}, but this config needs {want}")

    def missing(self, keys: Iterable[Key]) -> list[Key]:
        """The keys that have no latent, other than images found unusable when they were encoded."""
        skipped = self.meta["skipped"]
        return [k for k in keys if k not in self.rows and str(k) not in skipped]

    def get(self, key: Key) -> np.ndarray:
        """The (L, C) float32 tokens of image `key`."""
        if self._array is None:
            self._array = np.load(os.path.join(self.path, ARRAY), mmap_mode="r")
        return np.asarray(self._array[self.rows[key]])


def _require_local(path: str) -> None:
    if storage.is_remote(path):
        raise ValueError(f"latents directory {path}: must be local (training reads it as a memory map); "
                         "copy it from the bucket to the host's disk")


def main(argv) -> None:
    """`python -m iconface_jax.data.latents --config CONFIG --out DIR`."""
    del argv
    meta = precompute(flags.FLAGS.config, flags.FLAGS.out, flags.FLAGS.batch_size)
    print(f"wrote {meta['count']} latents {tuple(meta['token_shape'])} to {flags.FLAGS.out}"
          + (f"; skipped {len(meta['skipped'])} unusable images" if meta["skipped"] else ""))


if __name__ == "__main__":
    from iconface_jax import config  # (it validates latents with this module)

    # Defined here, not at import: the trainer, imported beside this module, owns `--config` there.
    config.define_flag("config")
    flags.DEFINE_string("out", None, "new directory for the latents", required=True)
    flags.DEFINE_integer("batch_size", 16, "images encoded per call")
    app.run(main, flags_parser=config.parse_flags)
