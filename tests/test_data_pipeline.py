"""The Grain pipeline: the reference protocol's distribution, no duplicate references, static batch
shapes, determinism from (seed, epoch, index), exact resume (threads and worker processes),
multi-process sharding, bad inputs end to end, and the device-mesh layout."""
from __future__ import annotations

import ast
import io
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT

from iconface_jax.data import catalog, pipeline, references, synthetic
from iconface_jax.data.sources import FFHQRefSource, FolderSource

pytestmark = pytest.mark.subprocess

PROBS = (0.3, 0.3, 0.2, 0.2)  # the paper's protocol: 30% no reference, 30% one, 20% two, 20% three


def _config(resolution: int = 32, identities: int = 40, views: int = 4, **overrides):
    c = pipeline.default_config()
    c.resolution = resolution
    c.num_workers = 0
    c.num_threads = 2
    c.synthetic.num_identities = identities
    c.synthetic.images_per_identity = views
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- protocol


def test_default_protocol_is_the_papers():
    assert tuple(references.DEFAULT_PROBS) == PROBS
    assert tuple(pipeline.default_config().ref_count_probs) == PROBS


def test_protocol_count_distribution():
    counts = references.draw_counts(np.random.default_rng(0), references.DEFAULT_PROBS, 200_000)
    freq = np.bincount(counts, minlength=4) / counts.size
    np.testing.assert_allclose(freq, PROBS, atol=0.005)
    custom = references.draw_counts(np.random.default_rng(1), (0.5, 0.5), 50_000)
    assert set(np.unique(custom)) == {0, 1} and abs(custom.mean() - 0.5) < 0.01
    with pytest.raises(ValueError):
        references.draw_counts(np.random.default_rng(0), (0.5, -0.1), 3)
    # Probabilities that do not sum to 1 (a tuple flag given twice concatenates) are refused, not normalised.
    with pytest.raises(ValueError, match=r"config.data.ref_count_probs: .*sum to 1, got \(0.5, 0.5, 0.0, 1.0\)"):
        pipeline.make_iterator(_config(ref_count_probs=(0.5, 0.5, 0.0, 1.0)), global_batch_size=4,
                               process_index=0, process_count=1)


def test_plan_follows_protocol_and_availability():
    """Per record the planned count is min(k, available) with k ~ protocol; batches are uniform."""
    rng = np.random.default_rng(0)
    available = rng.integers(1, 5, 2000)  # 1..4 references per target
    tallies = np.zeros((5, 4))
    for epoch in range(10):
        plan = references.plan_epoch(available, PROBS, 16, seed=3, epoch=epoch)
        assert plan.records.shape == (references.steps_per_epoch(2000, 16, 4), 16)
        assert len(np.unique(plan.records)) == plan.records.size  # each record at most once an epoch
        for recs, count in zip(plan.records, plan.counts):
            assert np.all(available[recs] >= count)
            np.add.at(tallies, (available[recs], count), 1)
    for avail in range(1, 5):
        expected = np.array([PROBS[0], *PROBS[1:avail], sum(PROBS[avail:])])[: min(avail, 3) + 1]
        observed = tallies[avail, : len(expected)] / tallies[avail].sum()
        np.testing.assert_allclose(observed, expected, atol=0.03)


def test_plan_is_a_function_of_seed_and_epoch():
    available = np.full(300, 3)
    a = references.plan_epoch(available, PROBS, 8, seed=1, epoch=2)
    b = references.plan_epoch(available, PROBS, 8, seed=1, epoch=2)
    c = references.plan_epoch(available, PROBS, 8, seed=1, epoch=3)
    np.testing.assert_array_equal(a.records, b.records)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert not np.array_equal(a.records, c.records)
    unshuffled = references.plan_epoch(available, PROBS, 8, seed=1, epoch=2, shuffle=False)
    assert np.all(np.diff(unshuffled.records[:, 0]) > 0)  # batches in record order
    with pytest.raises(ValueError, match="global batch"):
        references.plan_epoch(np.full(20, 3), PROBS, 8, seed=0, epoch=0)


def test_batches_follow_protocol_over_epochs():
    samples = pipeline.FaceSamples(synthetic.SyntheticSource(150, 4, 8), _config(resolution=8), seed=0,
                                   global_batch=4)
    r = np.concatenate([samples.plan(epoch).counts for epoch in range(40)])
    np.testing.assert_allclose(np.bincount(r, minlength=4) / r.size, PROBS, atol=0.015)


def test_identity_with_fewer_references_gives_actual_number():
    config = _config(resolution=8, identities=100, views=2)  # one reference per target
    samples = pipeline.FaceSamples(synthetic.SyntheticSource(100, 2, 8), config, seed=0, global_batch=4)
    r = np.concatenate([samples.plan(epoch).counts for epoch in range(40)])
    assert set(np.unique(r)) == {0, 1}  # never 2 or 3, and never padded
    assert abs(r.mean() - 0.7) < 0.02
    it = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    for batch in _take(it, 6):
        assert batch["refs"].shape[1] == batch["num_refs"][0] <= 1


# ----------------------------------------------------------------------------- samples and batches


def test_no_duplicate_references():
    samples = pipeline.FaceSamples(synthetic.SyntheticSource(20, 5, 32), _config(), seed=0, global_batch=4)
    seen_counts = set()
    for position in range(samples.steps_per_epoch * 4):
        arrays, info = samples.sample(0, position)
        n = len(info.refs)
        seen_counts.add(n)
        assert arrays["refs"].shape == (n, 32, 32, 3) and arrays["num_refs"] == n
        assert len(set(info.refs)) == n and info.gt not in info.refs
        assert {k // 5 for k in info.refs} <= {info.gt // 5}  # same identity
        images = [arrays["gt"], *arrays["refs"]]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert not np.array_equal(images[i], images[j])
    assert seen_counts == {0, 1, 2, 3}


def test_batch_shapes_are_static():
    it = pipeline.make_iterator(_config(), global_batch_size=4, process_index=0, process_count=1)
    seen = set()
    for batch in _take(it, 12):
        r = batch["refs"].shape[1]
        seen.add(r)
        assert set(batch) == {"gt", "deg", "refs", "num_refs"}
        assert batch["gt"].shape == batch["deg"].shape == (4, 32, 32, 3)
        assert batch["refs"].shape == (4, r, 32, 32, 3)
        assert batch["num_refs"].dtype == np.int32 and np.all(batch["num_refs"] == r)
        for k in ("gt", "deg", "refs"):
            assert batch[k].dtype == np.float32
            if batch[k].size:
                assert -1.0 <= batch[k].min() and batch[k].max() <= 1.0
    assert 0 in seen and len(seen) >= 3


def test_every_sample_reproducible_from_seed_epoch_index():
    config = _config()
    it = pipeline.make_iterator(config, global_batch_size=4, seed=5, process_index=0, process_count=1)
    batches = _take(it, it.steps_per_epoch + 2)  # into the second epoch
    fresh = pipeline.FaceSamples(synthetic.SyntheticSource(40, 4, 32), config, seed=5, global_batch=4)
    for step in (0, 3, it.steps_per_epoch + 1):
        epoch, s = divmod(step, it.steps_per_epoch)
        for row in range(4):
            arrays, _ = fresh.sample(epoch, s * 4 + row)
            for k in ("gt", "deg", "refs", "num_refs"):
                np.testing.assert_array_equal(batches[step][k][row], arrays[k])
    other = pipeline.make_iterator(config, global_batch_size=4, seed=6, process_index=0, process_count=1)
    assert not np.array_equal(next(other)["deg"], batches[0]["deg"])


def test_resume_equals_uninterrupted_run():
    config = _config(identities=12)  # 48 targets, batch 4: 9 steps an epoch
    whole = _take(pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1), 14)
    first = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    _take(first, 6)
    state = first.get_state()
    resumed = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 8), whole[6:14])  # across the epoch boundary


def test_worker_processes_match_and_resume():
    """Worker processes give the same batches as the trainer process, and resume exactly."""
    config = _config(resolution=16, identities=12)
    serial = _take(pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1), 8)
    config.num_workers = 2
    it = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    _assert_batches_equal(_take(it, 5), serial[:5])
    state = it.get_state()
    it.close()
    resumed = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), serial[5:8])
    resumed.close()
    config.num_workers = 0  # a state restores under another worker count too
    elsewhere = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    elsewhere.set_state(state)
    _assert_batches_equal(_take(elsewhere, 3), serial[5:8])


def test_orbax_checkpoint_round_trip(tmp_path):
    """The iterator saves and restores through Grain's Orbax handler (as the trainer does)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    config = _config(resolution=16, identities=20)
    it = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
    _take(it, 3)
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 3)
        restored = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(_take(restored, 3), expected)


def test_processes_read_their_own_rows_of_the_same_global_batch():
    config = _config(resolution=16)
    single = _take(pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1), 4)
    halves = [_take(pipeline.make_iterator(config, global_batch_size=4, process_index=p, process_count=2), 4)
              for p in range(2)]
    for step in range(4):
        assert halves[0][step]["gt"].shape[0] == 2
        for k in single[step]:
            np.testing.assert_array_equal(np.concatenate([halves[0][step][k], halves[1][step][k]]), single[step][k])
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_iterator(config, global_batch_size=5, process_index=0, process_count=2)


# ----------------------------------------------------------------------------- bad input end to end


def _png(image: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _write_folder_dataset(root, resolution: int = 32) -> None:
    """Eight good identities of four images plus one of each bad case."""
    src = synthetic.SyntheticSource(9, 4, resolution)
    for ident in range(8):
        os.makedirs(root / f"id{ident}")
        for view in range(4):
            Image.fromarray(src.fetch(ident * 4 + view)).save(root / f"id{ident}" / f"{view}.png")
    face = src.fetch(33)
    jpeg = io.BytesIO()
    Image.fromarray(face).save(jpeg, format="JPEG")
    (root / "id0" / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "id1" / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    (root / "id2" / "tiny.png").write_bytes(_png(face[::8, ::8].copy()))
    (root / "id3" / "gray.png").write_bytes(_png(face.mean(-1).astype(np.uint8), "L"))
    (root / "id4" / "rgba.png").write_bytes(_png(np.dstack([face, np.full(face.shape[:2], 200, np.uint8)]), "RGBA"))
    import cv2

    cv2.imwrite(str(root / "id5" / "deep.png"), face.astype(np.uint16) * 257)
    os.makedirs(root / "loner")
    Image.fromarray(face).save(root / "loner" / "only.png")  # no usable reference


def test_bad_inputs_are_skipped_counted_and_reported(tmp_path, caplog):
    _write_folder_dataset(tmp_path)
    config = _config()
    config.source, config.folder.root = "folder", str(tmp_path)
    with caplog.at_level(logging.WARNING):
        it = pipeline.make_iterator(config, global_batch_size=4, process_index=0, process_count=1)
        batches = _take(it, it.steps_per_epoch * 3)
    assert it.samples.source.issues == {"no_usable_reference": 1}
    assert it.issues["unreadable"] > 0 and it.issues["too_small"] > 0 and it.issues["converted"] > 0
    assert "skipping unreadable image" in caplog.text and "truncated.jpg" in caplog.text
    assert "images skipped so far" in caplog.text
    assert it.get_state()["issues"] == dict(it.issues)
    for b in batches:
        assert np.isfinite(b["gt"]).all() and b["gt"].shape == (4, 32, 32, 3)


def test_unusable_dataset_fails_with_a_clear_error(tmp_path):
    for ident in range(3):
        os.makedirs(tmp_path / f"id{ident}")
        for k in range(4):
            (tmp_path / f"id{ident}" / f"{k}.png").write_bytes(b"not a png")
    config = _config()
    config.source, config.folder.root = "folder", str(tmp_path)
    it = pipeline.make_iterator(config, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="unreadable"):
        next(it)


def test_given_degraded_images(tmp_path):
    src = synthetic.SyntheticSource(2, 10, 32)
    for k in range(20):
        Image.fromarray(src.fetch(k)).save(tmp_path / f"{k:05d}.png")
        Image.fromarray(255 - src.fetch(k)).save(tmp_path / f"lq{k:05d}.png")
    with open(tmp_path / "refs.csv", "w") as f:
        f.write("gt_image,lq_image,ref_image\n")
        for k in range(20):
            others = [f"{j:05d}.png" for j in range(20) if j // 10 == k // 10 and j != k]
            f.write(f'{k:05d}.png,lq{k:05d}.png,"{others}"\n')
    source = FFHQRefSource(str(tmp_path / "refs.csv"), str(tmp_path), lq_dir=str(tmp_path))
    config = _config(use_given_lq=True)
    samples = pipeline.FaceSamples(source, config, seed=0, global_batch=4)
    arrays, info = samples.sample(0, 0)
    assert info.degradation == "given"
    np.testing.assert_allclose(arrays["deg"], -arrays["gt"], atol=1e-6)  # 255 - x maps to -x


# ----------------------------------------------------------------------------- config and layout


def test_default_config_and_sources(tmp_path):
    c = pipeline.default_config()
    assert c.resolution == 512 and tuple(c.ref_count_probs) == PROBS
    assert set(c.degradation.params) == {"moderate", "severe"}
    assert tuple(c.degradation.params.severe.scale_range) == (8.0, 20.0)
    c.degradation.params.severe.scale_range = (30.0, 31.0)  # overrides reach the degradation
    c.degradation.presets, c.degradation.preset_probs = ("severe",), (1.0,)
    c.resolution, c.synthetic.num_identities = 64, 10
    samples = pipeline.FaceSamples(catalog.make_source(c), c, seed=0, global_batch=2)
    assert samples.presets["severe"].scale_range == (30.0, 31.0)
    arrays, info = samples.sample(0, 0)
    detail = lambda x: np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()
    assert info.degradation == "severe" and detail(arrays["deg"]) < 0.5 * detail(arrays["gt"])  # 30x: a blur
    _write_folder_dataset(tmp_path)
    c.source, c.folder.root = "folder", str(tmp_path)
    assert isinstance(catalog.make_source(c), FolderSource)
    c.source = "nope"
    with pytest.raises(ValueError, match="unknown data source"):
        catalog.make_source(c)


def test_host_batches_assemble_on_the_mesh():
    """Four simulated CPU devices (a subprocess: the device count is fixed at JAX start-up)."""
    code = textwrap.dedent("""
        import jax, numpy as np
        from iconface_jax import sharding
        from iconface_jax.data import pipeline
        c = pipeline.default_config()
        c.resolution, c.num_workers, c.synthetic.num_identities = 16, 0, 20
        it = pipeline.make_iterator(c, global_batch_size=4)
        mesh = sharding.make_mesh(data=2, fsdp=2)
        seen = set()
        for _ in range(12):
            batch = next(it)
            seen.add(batch["refs"].shape[1])
            arrays = sharding.global_batch(batch, mesh)
            for k, v in batch.items():
                assert arrays[k].shape == v.shape, k
                assert len(arrays[k].sharding.device_set) == 4
                np.testing.assert_array_equal(np.asarray(arrays[k]), v)
        assert 0 in seen and len(seen) > 1, seen  # empty reference arrays too
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_batching_cost_model_prefers_grouping():
    from tools import batching_cost

    # docs/performance.md#h100-starting-figures: B=4, R=0 at 12.6 samples/s is MFU 0.62 on a 790 TFLOP/s H100,
    # i.e. ~38.9 TFLOP/sample.
    assert batching_cost.step_flops(0) / 1e12 == pytest.approx(38.9, rel=0.02)
    grouped = batching_cost.grouped(PROBS)
    assert grouped < batching_cost.padded_to_batch_max(PROBS, 4) < batching_cost.step_flops(3)
    assert batching_cost.padded_to_batch_max(PROBS, 1) == pytest.approx(grouped)
    assert "group by R" in batching_cost.table()


def test_data_modules_import_each_other_without_cycles():
    """The import graph of iconface_jax.data, function-level imports included, is acyclic (the source factory
    has a home that both the pipeline and the latents tool import)."""
    package = ROOT / "iconface_jax" / "data"
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "iconface_jax.data":
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iconface_jax.data."):
                names.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("iconface_jax.data.")}
        graph[path.stem] = names - {path.stem}

    def visit(module, stack):
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        for dep in graph.get(module, ()):
            visit(dep, [*stack, module])

    assert "catalog" in graph["latents"] and "pipeline" not in graph["latents"]
    for module in graph:
        visit(module, [])
