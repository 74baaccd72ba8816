"""Precomputed clean latents: equal to encoding on the device, the same training loss, errors, the CLI."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers import ROOT, env_with, step_inputs
from iconface_jax import face_system
from iconface_jax import train
from iconface_jax.data import catalog, latents, pipeline

pytestmark = pytest.mark.subprocess


def toy_config(identities: int = 10) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.resolution = 32
    cfg.data.synthetic.num_identities = identities
    return cfg


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
    cfg = toy_config()
    out = tmp_path_factory.mktemp("latents") / "toy"
    meta = latents.precompute(cfg, str(out), batch_size=16)  # 60 images: the last batch is short
    cfg.data.latents = str(out)
    return cfg, meta


def test_precomputed_latents_equal_on_device_encoding(precomputed):
    cfg, meta = precomputed
    assert meta["count"] == 60 and meta["token_shape"] == [16, 33] and not meta["skipped"]
    encode = face_system.FaceSystem.encode
    system = face_system.build(cfg)
    it = pipeline.make_iterator(cfg.data, global_batch_size=4, seed=0)
    seen = set()
    for _ in range(8):
        batch = next(it)
        seen.add(batch["refs"].shape[1])
        np.testing.assert_allclose(batch["gt_latents"], encode(system, jnp.asarray(batch["gt"])), atol=1e-6)
        np.testing.assert_allclose(batch["ref_latents"], encode(system, jnp.asarray(batch["refs"])), atol=1e-6)
    assert len(seen) > 1  # batches with and without references


def test_training_loss_is_the_same_with_precomputed_latents(precomputed):
    cfg, _ = precomputed
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    it = pipeline.make_iterator(cfg.data, global_batch_size=4, seed=1)
    batch = next(b for b in iter(lambda: next(it), None) if b["refs"].shape[1] > 0)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if not k.startswith("_")}
    encoded = {k: v for k, v in batch.items() if not k.endswith("_latents")}
    key = jax.random.PRNGKey(3)
    size = cfg.data.resolution
    with_latents, without = (train.loss_fn(params, rest, graphdef, step_inputs(cfg, graphdef, params, rest, images),
                                           key, cfg.train, size)[1] for images in (batch, encoded))
    for name in ("loss_fm", "loss_id"):
        np.testing.assert_allclose(with_latents[name], without[name], rtol=1e-5)
    assert float(with_latents["loss_id"]) > 0


def test_latents_errors(precomputed, tmp_path):
    cfg, _ = precomputed
    with pytest.raises(FileExistsError, match="already exists"):
        latents.precompute(cfg, cfg.data.latents)
    other = ml_collections.ConfigDict(cfg.to_dict())
    other.data.resolution = 64
    with pytest.raises(ValueError, match="latents"):
        train.validate(other)
    pixels = ml_collections.ConfigDict(cfg.to_dict())  # the DCT bands' coefficients are not pixel tokens
    pixels.model.autoencoder.bands, pixels.model.backbone.in_channels = (), 192
    banded_not_pixels = r"latents .* made for .*'bands': \[6, 3\]}}, but this config needs {[^\[]*}}$"
    with pytest.raises(ValueError, match=banded_not_pixels):
        latents.LatentStore(cfg.data.latents).check(pixels)
    more = ml_collections.ConfigDict(cfg.to_dict())
    more.data.synthetic.num_identities = 12  # identities 10 and 11 were not encoded
    with pytest.raises(ValueError, match="no latents for 12 images"):
        pipeline.make_iterator(more.data, global_batch_size=4, seed=0)
    with pytest.raises(FileNotFoundError, match="latents.npy is missing"):
        latents.LatentStore(str(tmp_path))


def test_unusable_images_are_skipped_and_reported(tmp_path):
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for person in ("a", "b"):
        (root / person).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / person / f"{i}.png")
    (root / "a" / "3.png").write_bytes(b"not an image")
    cfg = toy_config()
    cfg.data.source, cfg.data.folder.root = "folder", str(root)
    meta = latents.precompute(cfg, str(tmp_path / "lat"))
    assert meta["count"] == 6 and list(meta["skipped"].values()) == ["unreadable"]
    store = latents.LatentStore(str(tmp_path / "lat"))
    assert store.missing(latents.clean_keys(catalog.make_source(cfg.data).records)) == []
    keys = json.loads((tmp_path / "lat" / latents.KEYS).read_text())
    assert keys.count(None) == 1 and len(keys) == 7


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, "-m", "iconface_jax.data.latents", "--config", str(ROOT / "configs" / "demo.py"),
           "--config.data.resolution=32", "--config.data.synthetic.num_identities=3", f"--out={tmp_path / 'lat'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env_with(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote 18 latents (16, 33)" in out.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env_with(), timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr
