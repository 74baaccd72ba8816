"""Cloud Storage paths end to end against a local GCS emulator: a toy run trained, stopped and resumed in a
`gs://` workdir and restored from; converted weights, prompt embeddings and FFHQ-Ref data read from a
bucket; what is written only locally refusing `gs://` by name."""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers import ROOT, losses, run_train

from iconface_jax import evaluate, restore, storage, text, weights
from iconface_jax.data import latents, pipeline, sources, synthetic

pytestmark = pytest.mark.subprocess

BUCKET = "bkt"
# `gcp-storage-emulator start ...`, with media downloads that carry the object's generation in `x-goog-generation`
# as Cloud Storage's do: TensorStore's OCDBT reads its manifest back that way once a checkpoint has more than ~100
# arrays (a trainer checkpoint has hundreds), and fails on "Malformed StorageGeneration" without it.
EMULATOR = """
import sys
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"], response["x-goog-metageneration"] = obj["generation"], obj["metageneration"]
    except NotFound:
        pass
    return plain_download(request, response, storage, *args, **kwargs)

plain_download, objects.download = objects.download, download  # before the server module binds its routes
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def gcs_env(tmp_path_factory):
    """A `gcp-storage-emulator` (`EMULATOR`) on 127.0.0.1 serving bucket `bkt`, and the environment that points
    gcsfs and the Google clients (`STORAGE_EMULATOR_HOST`) and Orbax's TensorStore (`TENSORSTORE_GCS_HTTP_URL`) at
    it, also set in this process for the session."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, "start", "--host=127.0.0.1",
                             f"--port={port}", f"--default-bucket={BUCKET}", "--in-memory", "--quiet"],
                            cwd=tmp_path_factory.mktemp("emulator"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start: {proc.communicate()[1].decode()[-2000:]}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    # No zonal-bucket probe: the emulator has no storage-control API (gcsfs would warn for every bucket).
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    proc.kill()
    proc.wait()


def write_png(path, image: np.ndarray) -> None:
    with storage.path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def test_training_in_a_bucket_resumes_bitwise_and_restores(gcs_env, toy_run, tmp_path):
    workdir = f"gs://{BUCKET}/runs/toy"
    first = run_train(workdir, "--config.train.steps=6", "--config.train.stop_at=3",
                      "--config.log.checkpoint_every=100", env=gcs_env)
    assert "stop_at=3 at step 3" in first.stdout
    second = run_train(workdir, "--config.train.steps=6", "--config.log.checkpoint_every=100", env=gcs_env)
    assert f"resumed from step 3 in {workdir}" in second.stdout
    assert losses(workdir) == losses(toy_run)  # the uninterrupted local run, bit for bit
    run = storage.path(workdir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]
    assert (run / "config.json").is_file() and (run / "samples_000006.png").is_file()
    assert len([p for p in (run / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]) == 2
    assert not (ROOT / "gs:").exists()  # nothing went to a local folder named after the URI (the trainer's cwd)

    deg = f"{workdir}/inputs/deg.png"  # the input in the bucket too
    write_png(deg, np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    out = tmp_path / "out.png"
    assert restore.main(["--checkpoint", workdir, "--input", deg, "--steps", "2", "--output", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (40, 40, 3)


def test_ffhq_ref_csv_and_images_in_a_bucket(gcs_env):
    """Two identities of three images, flat and in FFHQ's thousands folders, one row naming a missing file."""
    root = f"gs://{BUCKET}/ffhq"
    faces = synthetic.SyntheticSource(2, 3, 32)
    names = [f"{k:05d}.png" for k in (0, 1, 2, 1000, 1001, 1002)]
    for k, name in enumerate(names):
        write_png(f"{root}/images/{'01000/' if k >= 3 else ''}{name}", faces.fetch(k))
    rows = [f'{names[k]},"{[n for n in names[k // 3 * 3:k // 3 * 3 + 3] if n != names[k]]}"' for k in range(6)]
    storage.path(f"{root}/refs.csv").write_text("\n".join(["gt_image,ref_image", *rows, '09999.png,"[\'00000.png\']"']))

    config = pipeline.default_config()
    config.resolution, config.num_workers, config.source, config.ref_count_probs = 32, 0, "ffhq_ref", (0.5, 0.5)
    config.ffhq_ref.csv, config.ffhq_ref.image_dir = f"{root}/refs.csv", f"{root}/images"
    it = pipeline.make_iterator(config, global_batch_size=2, process_index=0, process_count=1)
    source = it.samples.source
    assert len(source.records) == 6 and source.issues == {"missing_file": 1}
    assert source.records[3].gt == f"{root}/images/01000/01000.png"
    np.testing.assert_array_equal(sources.decode(source.fetch(source.records[4].gt), 32, 1)[0], faces.fetch(4))
    batch = next(it)
    assert batch["gt"].shape == (2, 32, 32, 3) and np.isfinite(batch["deg"]).all()

    # The same bucket through evaluate's CSV reader and restore's folder and CSV forms.
    storage.path(f"{root}/eval.csv").write_text('gt_image,ref_image\n01001.png,"[\'01000.png\']"\n')
    (row,) = evaluate.read_rows(f"{root}/eval.csv", *[f"{root}/images"] * 3, "bucket")
    assert (row.gt, row.refs) == (f"{root}/images/01000/01001.png", (f"{root}/images/01000/01000.png",))
    folder = argparse.Namespace(input="", input_dir=f"{root}/images/01000", ref_dir=f"{root}/images", output_dir="out")
    assert [job[0] for job in restore.jobs_from_args(folder)] == [f"{root}/images/01000/{n}" for n in names[3:]]
    storage.path(f"{root}/restore.csv").write_text('lq_image,ref_image\n00001.png,"[\'00000.png\']"\n')
    rows = argparse.Namespace(input="", input_dir="", csv=f"{root}/restore.csv", image_dir=f"{root}/images",
                              output_dir="out")
    assert restore.jobs_from_args(rows) == [(f"{root}/images/00001.png", [f"{root}/images/00000.png"], "out/00001.png")]


def test_weights_and_prompt_embeddings_read_from_a_bucket(gcs_env, tmp_path):
    class Tiny(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 8, rngs=nnx.Rngs(0))

    params = {k: np.full(v.get_value().shape, 0.5, np.float32) for k, v in weights.base_params(Tiny()).items()}
    weights.save(str(tmp_path / "w"), "tiny", {"n": 1}, params)
    prompt, empty = text.random_prompt_embeddings(3, 4)
    text.save_prompt_embeddings(str(tmp_path / "p.npz"), prompt, empty, prompt_text="p", layers=(1,), max_length=3,
                                encoder_dtype="x")
    for local in tmp_path.rglob("*"):  # what `gcloud storage cp -r` would upload
        if local.is_file():
            (storage.path(f"gs://{BUCKET}/weights") / local.relative_to(tmp_path)).write_bytes(local.read_bytes())
    remote = f"gs://{BUCKET}/weights/w"
    assert weights.read_config(remote, "tiny") == {"n": 1}
    np.testing.assert_array_equal(np.asarray(weights.restore(Tiny(), remote).a.kernel[...]), params["a.kernel"])
    got = text.load_prompt_embeddings(f"gs://{BUCKET}/weights/p.npz")
    np.testing.assert_array_equal(got[0], prompt)
    with pytest.raises(weights.WeightsError, match=f"gs://{BUCKET}/nowhere is not a converted weight directory"):
        weights.read_config(f"gs://{BUCKET}/nowhere", "tiny")


def test_local_only_writes_refuse_gs_paths():
    with pytest.raises(weights.WeightsError, match="gs://b/w: converted weights are written to a local directory"):
        weights.save("gs://b/w", "tiny", {}, {"a": np.zeros(1)})
    with pytest.raises(text.PromptEmbeddingsError, match="gs://b/p.npz: prompt embeddings are written to a local"):
        text.save_prompt_embeddings("gs://b/p.npz", np.zeros((1, 1)), np.zeros((1, 1)), prompt_text="", layers=(),
                                    max_length=1, encoder_dtype="")
    with pytest.raises(ValueError, match="latents directory gs://b/l: must be local"):
        latents.LatentStore("gs://b/l")
    with pytest.raises(SystemExit):
        restore.main(["--checkpoint", "gs://b/run", "--input", "x.png", "--output", "gs://b/out.png"])
