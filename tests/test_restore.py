"""Restoration CLI over a toy-trained workdir: single image, folder and CSV forms, sizes, bad input."""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from iconface_jax import restore
from iconface_jax import workdir as workdirs

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(toy_run):
    return toy_run


def face(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_single_image_with_and_without_references(workdir, tmp_path, capsys):
    deg, ref = face(tmp_path / "deg.png", 40, 0), face(tmp_path / "ref.jpg", 96, 1)
    base = ["--checkpoint", str(workdir), "--input", deg, "--steps", "2"]
    assert restore.main(base + ["--ref", ref, "--output", str(tmp_path / "with.png")]) == 0
    assert "trained on synthetic faces" in capsys.readouterr().err  # the toy run's source: said once, plainly
    assert restore.main(base + ["--output", str(tmp_path / "without.png")]) == 0
    assert restore.main(base + ["--output", str(tmp_path / "again.png")]) == 0
    with_refs, without = (np.asarray(Image.open(tmp_path / n)) for n in ("with.png", "without.png"))
    assert with_refs.shape == without.shape == (40, 40, 3)  # back at the input's size
    np.testing.assert_array_equal(without, np.asarray(Image.open(tmp_path / "again.png")))  # seeded
    assert not np.array_equal(with_refs, without)


def test_three_references_strip_and_model_size(workdir, tmp_path):
    deg = face(tmp_path / "deg.png", 48, 5)
    refs = [face(tmp_path / f"r{i}.png", 32, 6 + i) for i in range(3)]
    args = ["--checkpoint", str(workdir), "--input", deg, "--steps", "2", "--output", str(tmp_path / "o.png"),
            "--strip", "--model-size"]
    for r in refs:
        args += ["--ref", r]
    assert restore.main(args) == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (32, 32, 3)  # the toy model's resolution
    assert np.asarray(Image.open(tmp_path / "o_strip.png")).shape == (32, 32 * 5, 3)  # deg | 3 refs | out


def test_folder_and_csv_forms(workdir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "refs" / "a").mkdir(parents=True)
    face(tmp_path / "in" / "a.png", 32, 2)
    face(tmp_path / "in" / "b.png", 32, 3)
    face(tmp_path / "refs" / "a" / "r1.png", 32, 4)
    assert restore.main(["--checkpoint", str(workdir), "--input-dir", str(tmp_path / "in"), "--ref-dir",
                         str(tmp_path / "refs"), "--output-dir", str(tmp_path / "out"), "--steps", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gt_image", "lq_image", "ref_image"])
        w.writerow(["x.png", "in/a.png", "['refs/a/r1.png']"])
        w.writerow(["y.png", "in/missing.png", "[]"])
    assert restore.main(["--checkpoint", str(workdir), "--csv", str(tmp_path / "rows.csv"), "--image-dir",
                         str(tmp_path), "--output-dir", str(tmp_path / "csv_out"), "--steps", "2"]) == 1
    assert [p.name for p in (tmp_path / "csv_out").iterdir()] == ["a.png"]
    assert "in/missing.png: not a readable image" in capsys.readouterr().err.replace(str(tmp_path) + "/", "")


def test_bad_inputs_name_the_file(workdir, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert restore.main(["--checkpoint", str(workdir), "--input", str(junk), "--output", str(tmp_path / "o.png")]) == 1
    assert "junk.png" in capsys.readouterr().err
    deg = face(tmp_path / "deg.png", 32, 0)
    assert restore.main(["--checkpoint", str(tmp_path / "nowhere"), "--input", deg,
                         "--output", str(tmp_path / "o.png")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    assert restore.main(["--checkpoint", str(workdir), "--input", deg, "--output", str(tmp_path / "o.png"),
                         "--step", "5"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint of step 5" in err and "kept: [6]" in err
    # A workdir restores the model its checkpoints hold: --config.* overrides are for config files.
    assert restore.main(["--checkpoint", str(workdir), "--input", deg, "--output", str(tmp_path / "o.png"),
                         "--config.model.lora.rank=4"]) == 1
    assert "--config.model.lora.rank=4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        restore.main(["--checkpoint", str(workdir), "--input", deg, "--output", str(tmp_path / "o.png"), "--bogus"])
    with pytest.raises(SystemExit) as exit_:
        restore.main(["--checkpoint", str(workdir), "--input", str(junk), "--output", "o.png", "--steps", "0"])
    assert exit_.value.code == 2
    assert "error: --steps must be at least 1 and --max-refs at least 0" in capsys.readouterr().err


def test_crop_mode_refuses_non_square_references(tmp_path, capsys):
    """A crop's reference is read as an aligned crop: a non-square one is refused, never centre-cropped silently;
    in photo mode it is a photo whose faces are found, so it passes."""
    deg, ref = face(tmp_path / "deg.png", 32, 0), str(tmp_path / "ref.png")
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(ref)
    job = (deg, [ref], str(tmp_path / "out.png"))
    assert restore.checked_jobs([job], max_refs=3) == []
    assert f"{ref}: 48x40 is not a square aligned face crop" in capsys.readouterr().err
    assert restore.checked_jobs([job], max_refs=0) == [job]  # references beyond --max-refs are not read
    assert restore.checked_jobs([job], max_refs=3, mode="photo") == [job]


def test_missing_and_corrupt_references_name_the_file(workdir, tmp_path, capsys):
    deg = face(tmp_path / "deg.png", 32, 0)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for ref in (str(tmp_path / "absent.png"), str(corrupt)):
        assert restore.main(["--checkpoint", str(workdir), "--input", deg, "--ref", ref, "--steps", "1",
                             "--output", str(tmp_path / "o.png")]) == 1
        err = capsys.readouterr().err
        assert f"skipped: {ref}: not a readable image" in err and "1 of 1 image failed" in err
    assert not (tmp_path / "o.png").exists()


def test_checkpoint_must_be_a_training_workdir_with_a_checkpoint(workdir, tiny_vae_dir, tmp_path, capsys):
    args = ["--input", face(tmp_path / "deg.png", 32, 0), "--output", str(tmp_path / "o.png")]
    assert restore.main(["--checkpoint", str(tiny_vae_dir), *args]) == 1  # a converted weight directory
    assert (f"error: {tiny_vae_dir}/config.json: a converted flux2_vae weight directory; --checkpoint takes a "
            "training workdir") in capsys.readouterr().err
    empty = tmp_path / "fresh_run"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")  # a run that never reached its first checkpoint
    assert restore.main(["--checkpoint", str(empty), *args]) == 1
    assert f"error: no complete checkpoint under {empty}/checkpoints" in capsys.readouterr().err


def test_workdir_from_before_new_fields_loads_as_it_trained(workdir, tmp_path):
    """A config.json without `memory_readers` or `synthetic.aligned` (written before the fields existed) builds
    the scene-readers model it was trained as and evaluates on the free-pose views it trained on, not today's
    defaults; a config that names them keeps them."""
    old = tmp_path / "old_run"
    shutil.copytree(workdir, old)
    stored = json.loads((old / "config.json").read_text())
    assert stored["model"]["iconface"].pop("memory_readers") == "image"
    assert stored["data"]["synthetic"].pop("aligned") is True
    assert stored.pop("config_version") == 1  # (written since the fields' defaults moved to config.upgrade)
    (old / "config.json").write_text(json.dumps(stored))
    system, cfg, _ = workdirs.load(str(old))
    assert system.model.config.memory_readers == "scene" and cfg.data.synthetic.aligned is False
    system, cfg, _ = workdirs.load(str(workdir))
    assert system.model.config.memory_readers == "image" and cfg.data.synthetic.aligned is True


# --- checks before the work: what is written, colliding names, non-square inputs, failures, reruns ---


@pytest.fixture
def no_load(monkeypatch):
    """`workdir.load` made to fail the test: the check under test must come before the model loads."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(workdirs, "load", load)


def test_outputs_are_checked_before_the_model_loads(no_load, tmp_path, capsys):
    deg, ref = face(tmp_path / "deg.png", 32, 0), face(tmp_path / "ref.png", 32, 1)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "in").mkdir()
    face(tmp_path / "in" / "a.png", 32, 2)
    single = {str(tmp_path / "out"): "no extension is not an image format PIL writes",
              str(tmp_path / "out.xyz"): "'.xyz' is not an image format PIL writes",
              str(tmp_path / "folder.png"): "folder.png: is a folder",
              str(tmp_path / "file.txt" / "out.png"): f"{tmp_path / 'file.txt'} is not a folder",
              deg: f"{deg} is the input {deg}",
              ref: f"{ref} is the input {ref}"}
    for output, needle in single.items():
        assert restore.main(["--checkpoint", "unused", "--input", deg, "--ref", ref, "--output", output]) == 1
        assert needle in capsys.readouterr().err, output
    folder = {str(tmp_path / "file.txt"): "file.txt is a file, not a folder",
              str(tmp_path / "in"): f"is the input {tmp_path / 'in'}"}
    for output_dir, needle in folder.items():
        assert restore.main(["--checkpoint", "unused", "--input-dir", str(tmp_path / "in"),
                             "--output-dir", output_dir]) == 1
        assert needle in capsys.readouterr().err, output_dir
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if not os.access(read_only, os.W_OK):  # root may write anywhere
        assert restore.main(["--checkpoint", "unused", "--input", deg, "--output", str(read_only / "o.png")]) == 1
        assert f"{read_only} is not writable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deg.png", "file.txt", "folder.png", "in", "read_only",
                                                          "ref.png"]


def test_colliding_output_names_are_refused_naming_both(no_load, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    a_jpg, a_png = face(tmp_path / "in" / "a.jpg", 32, 0), face(tmp_path / "in" / "a.png", 32, 1)
    assert restore.main(["--checkpoint", "unused", "--input-dir", str(tmp_path / "in"),
                         "--output-dir", str(tmp_path / "out")]) == 1
    assert f"{a_jpg} and {a_png} would both be written to {tmp_path / 'out' / 'a.png'}" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    face(tmp_path / "x" / "a.png", 32, 2)
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows([["lq_image", "ref_image"], ["in/a.png", "[]"], ["x/a.png", "[]"]])
    assert restore.main(["--checkpoint", "unused", "--csv", str(tmp_path / "rows.csv"), "--image-dir", str(tmp_path),
                         "--output-dir", str(tmp_path / "out")]) == 1
    assert f"in/a.png and {tmp_path}/x/a.png would both be written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_square_input_is_refused_not_stretched(no_load, tmp_path, capsys):
    wide = tmp_path / "deg.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(wide)
    assert restore.main(["--checkpoint", "unused", "--input", str(wide), "--output", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert f"skipped: {wide}: 48x40 is not a square aligned face crop; whole photos: --mode photo" in err
    assert "1 of 1 image failed" in err and not (tmp_path / "o.png").exists()


def test_any_failure_fails_the_run_with_the_count(workdir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    face(tmp_path / "in" / "a.png", 32, 0)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "c.png").write_bytes(b"not an image")
    assert restore.main(["--checkpoint", str(workdir), "--input-dir", str(tmp_path / "in"),
                         "--output-dir", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "b.png: 40x32 is not a square" in err and "c.png: not a readable image" in err
    assert "2 of 3 images failed" in err and "restoring 1 image(s)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_rerun_says_what_it_kept_and_overwrite_redoes_it(workdir, tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()
    for i, name in enumerate("ab"):
        face(tmp_path / "in" / f"{name}.png", 32, i)
    args = ["--checkpoint", str(workdir), "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"),
            "--steps", "1"]
    assert restore.main(args) == 0
    restored = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    Image.fromarray(np.zeros_like(restored)).save(tmp_path / "out" / "a.png")  # an earlier run's output
    capsys.readouterr()
    with monkeypatch.context() as m:  # nothing left to do: the model is not loaded
        m.setattr(workdirs, "load", lambda *a, **k: pytest.fail("loaded with nothing to restore"))
        assert restore.main(args) == 0
    assert "kept 2 earlier output(s)" in capsys.readouterr().err
    assert not np.asarray(Image.open(tmp_path / "out" / "a.png")).any()
    assert restore.main(args + ["--overwrite"]) == 0
    assert "kept" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), restored)  # seeded
