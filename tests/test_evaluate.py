"""The benchmark evaluation: pyiqa's offline guard, and the CLI end to end on ../shared/faces (PSNR/SSIM:
test_metrics.py; the CPU demo's synthetic check: test_demo_check.py)."""
from __future__ import annotations

import csv
import dataclasses
import socket
import sys
import types

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from iconface_jax import evaluate, metrics, weights, workdir
from iconface_jax.models import adaface, arcface

pytestmark = pytest.mark.slow


def test_iqa_without_pyiqa_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError
    scorers, messages = metrics.load_iqa()
    assert scorers == {} and "pyiqa is not installed" in messages[0]


def test_iqa_never_downloads(monkeypatch):
    """A metric whose weights are absent (pyiqa would download them) is reported and skipped, offline."""
    pytest.importorskip("torch", reason="pyiqa scores torch tensors")
    def create_metric(name, device, as_loss):
        if name == "musiq":
            return lambda x: x.mean(dim=(1, 2, 3))
        if name == "clipiqa":
            socket.create_connection(("127.0.0.1", 9), timeout=1)  # what a download starts with
        raise FileNotFoundError(f"no weights for {name}")

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    connect = socket.socket.connect
    scorers, messages = metrics.load_iqa()
    assert sorted(scorers) == ["MUSIQ"]
    assert scorers["MUSIQ"](np.full((8, 8, 3), 255, np.uint8)) == pytest.approx(1.0)
    assert "CLIP-IQA" in messages[0] and "network access is disabled" in messages[0]
    assert "MANIQA" in messages[1] and "no weights for maniqa" in messages[1]
    assert socket.socket.connect is connect


@pytest.fixture
def faces_csv(shared_dir, tmp_path):
    """Four rows over ../shared/faces: two with the benchmark's degraded image (and their own dataset names),
    one degraded here, one whose 'degraded' image is its ground truth (PSNR at the cap)."""
    faces = shared_dir / "faces"
    cases = [sorted((faces / split).iterdir())[0] for split in ("supp_ref_ffhq_moderate", "supp_ref_celeba_test_ref")]
    rel = lambda p: str(p.relative_to(faces))
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["gt_image", "lq_image", "ref_image", "dataset"])
        for case, name in zip(cases, ("FFHQ-Ref Moderate", "CelebA-Test-Ref")):
            w.writerow([rel(case / "gt.jpg"), rel(case / "deg.jpg"), repr([rel(case / "ref1.jpg")]), name])
        w.writerow([rel(cases[0] / "gt.jpg"), "", repr([rel(cases[0] / "ref1.jpg")])])
        w.writerow([rel(cases[1] / "gt.jpg"), rel(cases[1] / "gt.jpg"), repr([rel(cases[1] / "ref1.jpg")])])
    return path, faces


def test_evaluate_end_to_end(toy_run, faces_csv, tmp_path, capsys):
    csv_path, faces = faces_csv
    out = tmp_path / "eval"
    args = ["--checkpoint", str(toy_run), "--csv", str(csv_path), "--image-dir", str(faces), "--refs", "1",
            "--steps", "2", "--output-dir", str(out), "--no-iqa"]
    assert evaluate.main(args) == 0
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert [r["degradation"] for r in rows] == ["given", "given", rows[2]["degradation"], "given"]
    assert rows[2]["degradation"] in ("moderate", "severe") and (out / "degraded" / rows[2]["restored"]).is_file()
    for r in rows:
        for m in ("ref_adaface", "gt_adaface", "psnr", "ssim"):
            assert np.isfinite(float(r[m])) and np.isfinite(float(r["lq_" + m])), (m, r)
        assert r["musiq"] == "" and int(r["refs_used"]) == 1
        assert (out / "restored" / r["restored"]).is_file()
    assert float(rows[3]["lq_psnr"]) == pytest.approx(80.0) and float(rows[3]["lq_ssim"]) == pytest.approx(1.0)
    assert float(rows[3]["lq_gt_adaface"]) == pytest.approx(1.0, abs=1e-5)
    summary = (out / "summary.md").read_text()
    assert ("| Method | Dataset | Ref-ArcFace ↑ | Ref-AdaFace ↑ | MUSIQ ↑ | CLIP-IQA ↑ | MANIQA ↑ | GT-ArcFace ↑ | "
            "GT-AdaFace ↑ | PSNR ↑ | SSIM ↑ |") in summary
    for dataset in ("FFHQ-Ref Moderate", "CelebA-Test-Ref", "rows"):  # rows without a dataset: the CSV's name
        assert f"| IConFace (step 6) | {dataset} |" in summary and f"| Input (LQ) | {dataset} |" in summary
    assert (out / "summary.csv").is_file() and (out / "contact_sheet.png").stat().st_size > 0
    assert "Ref-AdaFace" in capsys.readouterr().out

    # Resumable: nothing is redone; other settings in the same folder are refused.
    assert evaluate.main(args) == 0
    assert "4 already done" in capsys.readouterr().err
    with open(out / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert evaluate.main([*args[:-3], "--steps", "3", "--output-dir", str(out), "--no-iqa"]) == 1
    assert "other settings" in capsys.readouterr().err

    # --adaface: identity metrics from a converted AdaFace directory instead of the run's encoder;
    # --arcface: the ArcFace columns from a converted IResNet (both tiny random networks here).
    for config_cls, model_cls, family in ((adaface.AdaFaceConfig, adaface.AdaFace, adaface.FAMILY),
                                         (arcface.ArcFaceConfig, arcface.ArcFace, arcface.FAMILY)):
        config = config_cls(units=(1, 1, 1, 1), channels=(8, 8, 16, 16))
        model = model_cls(config, rngs=nnx.Rngs(3))
        params = {k: np.asarray(v.get_value()) for k, v in weights.base_params(model).items()}
        weights.save(str(tmp_path / family), family, dataclasses.asdict(config), params)
    assert evaluate.main([*args[:-3], "--output-dir", str(tmp_path / "eval2"), "--no-iqa", "--limit", "1",
                          "--adaface", str(tmp_path / "adaface"), "--arcface", str(tmp_path / "arcface")]) == 0
    assert "randomly initialised" not in capsys.readouterr().err
    with open(tmp_path / "eval2" / "per_image.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert np.isfinite(float(row["ref_adaface"])) and row["ref_adaface"] != rows[0]["ref_adaface"]
    assert rows[0]["ref_arcface"] == "" and np.isfinite(float(row["ref_arcface"]))
    assert np.isfinite(float(row["lq_gt_arcface"])) and row["ref_arcface"] != row["ref_adaface"]
    assert "| IConFace (step 6) | FFHQ-Ref Moderate | 0." in (tmp_path / "eval2" / "summary.md").read_text()


def test_bad_rows_name_row_and_file(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("gt_image,lq_image,ref_image\nmissing.png,,[]\n")
    assert evaluate.main(["--checkpoint", str(tmp_path), "--csv", str(path), "--image-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.csv row 2" in err and "missing.png" in err
    path.write_text("gt_image,ref_image\nmissing.png,not a list\n")
    assert evaluate.main(["--checkpoint", str(tmp_path), "--csv", str(path), "--image-dir", str(tmp_path)]) == 1
    assert "not a Python list literal" in capsys.readouterr().err


def test_ref_columns_use_the_first_reference(tmp_path):
    """Ref-* is the cosine to the row's first reference's features, GT-* to the ground truth's, for the restored
    image and (lq_*) the input: recomputed in numpy with features (the pixels themselves) that tell them apart."""
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("gt", "lq", "ref1", "ref2"):
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[name])
    (tmp_path / "restored").mkdir()
    pixels = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)
    restore = lambda system, lq, refs, key: 0.5 * (lq + refs[:, 0])
    evaluator = evaluate.Evaluator(None, 16, 1, str(tmp_path), restore, {"adaface": pixels}, {}, None, None, "y")
    record = evaluator(evaluate.Row(0, "d", paths["gt"], paths["lq"], (paths["ref1"], paths["ref2"])))

    feature = lambda path: np.asarray(Image.open(path), np.float64).ravel() / 127.5 - 1
    out, lq, gt, ref1 = (feature(p) for p in (str(tmp_path / "restored" / record["restored"]), paths["lq"],
                                              paths["gt"], paths["ref1"]))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    want = {"ref_adaface": cos(out, ref1), "gt_adaface": cos(out, gt), "lq_ref_adaface": cos(lq, ref1),
            "lq_gt_adaface": cos(lq, gt)}
    assert abs(want["ref_adaface"] - want["gt_adaface"]) > 0.1  # the columns differ where the features do
    for column, value in want.items():
        assert float(record[column]) == pytest.approx(value, abs=2e-6), column
    assert record["ref1_image"] == paths["ref1"] and record["refs_used"] == "1"


def test_cli_defaults_are_the_documented_ones(monkeypatch, tmp_path):
    """The paper's sampler settings (README "Restoring faces"; docs/design.md): 12 steps, guidance 4.0, seed 42;
    three references for a CSV (the --refs help), SSIM on luma, the EMA weights, every row, the latest checkpoint
    and the run's own degradation mix, face encoder and no ArcFace."""
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda args: seen.update(vars(args)) or 0)
    assert evaluate.main(["--checkpoint", str(tmp_path), "--csv", "rows.csv", "--image-dir", str(tmp_path)]) == 0
    assert (seen["steps"], seen["guidance"], seen["seed"]) == (12, 4.0, 42)
    assert (seen["ssim_channels"], seen["no_ema"], seen["step"]) == ("y", False, None)
    assert (seen["degradation"], seen["adaface"], seen["arcface"], seen["lora_init"]) == ("",) * 4
    assert seen["refs"] == 3 and seen["limit"] == 0 and not seen["no_iqa"]


def test_unknown_csv_columns_are_refused_naming_typos(tmp_path, capsys, monkeypatch):
    """A misspelt lq_image would leave the given degraded images unread: the run stops, before the model loads."""
    monkeypatch.setattr(workdir, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "gt.png")
    path = tmp_path / "rows.csv"
    path.write_text("gt_image,lq_imag,ref_image,notes\ngt.png,gt.png,[],x\n")
    args = ["--checkpoint", str(tmp_path), "--csv", str(path), "--image-dir", str(tmp_path),
            "--output-dir", str(tmp_path / "out")]
    assert evaluate.main(args) == 1
    assert (f"{path}: unknown column(s) 'lq_imag' (a typo of 'lq_image'?), 'notes'; the columns are gt_image, "
            "lq_image, ref_image, dataset") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outputs_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(workdir, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "gt.png")
    (tmp_path / "out").mkdir()
    rows = tmp_path / "out" / "summary.csv"  # the CSV where the summary would go
    rows.write_text("gt_image,ref_image\ngt.png,[]\n")
    (tmp_path / "file").write_text("")
    base = ["--checkpoint", str(tmp_path), "--csv", str(rows), "--image-dir", str(tmp_path)]
    assert evaluate.main([*base, "--output-dir", str(tmp_path / "file")]) == 1
    assert f"--output-dir {tmp_path / 'file'}: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert evaluate.main([*base, "--output-dir", str(tmp_path / "out")]) == 1
    assert f"{rows} is the input {rows}: writing it would replace the input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]
