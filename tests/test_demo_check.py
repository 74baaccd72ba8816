"""The CPU demo's check (`iconface_jax.demo_check`): held-out synthetic identities, the trait error, the posterior
mean, its CLI's defaults and output check."""
from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iconface_jax import demo_check, images, metrics, sampling, workdir
from iconface_jax.data import synthetic

pytestmark = pytest.mark.slow


def test_trait_mse_by_hand():
    gt = np.zeros((4, 4, 3), np.uint8)
    image = gt.copy()
    image[0, 0] = (255, 0, 0)  # inside the mask: one of 2 pixels x 3 channels is off by 1.0
    image[3, 3] = 255  # outside the mask: ignored
    traits = np.zeros((4, 4), bool)
    traits[0, :2] = True
    assert demo_check.trait_mse(image, gt, traits) == pytest.approx(1.0 / 6)


def test_synthetic_evaluation_end_to_end(toy_run, tmp_path, capsys):
    out = tmp_path / "synthetic"
    args = ["--checkpoint", str(toy_run), "--count", "3", "--steps", "2", "--step", "6", "--output-dir", str(out),
            "--degradation", "moderate"]
    assert demo_check.main(args) == 0
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["Input (LQ)"] * 3 + ["IConFace, no references"] * 3 + \
        ["IConFace, 1 reference"] * 3 + ["Posterior mean, no references"] * 3 + ["Posterior mean, 1 reference"] * 3
    assert all(float(r["trait_mse"]) > 0 and 0 < float(r["psnr"]) < 100 for r in rows)
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    lq = [float(r["psnr"]) for r in rows[:3]]
    assert float(summary[0]["psnr"]) == pytest.approx(np.mean(lq), abs=1e-5)
    assert (out / "contact_sheet.png").is_file() and "Trait MSE" in (out / "summary.md").read_text()
    assert "degraded by the moderate preset" in (out / "summary.md").read_text()
    # The held-out identities come after the run's training identities, and the inputs are degraded.
    cfg = workdir.load(str(toy_run))[1]
    cases = demo_check.synthetic_cases(cfg, 3, 1)
    assert cases["gt"].shape == (3, 32, 32, 3) and cases["refs"].shape == (3, 1, 32, 32, 3)
    first = cfg.data.synthetic.num_identities
    gt = synthetic.render(synthetic.identity_traits(cfg.data.synthetic.seed, first),
                          synthetic.view_params(cfg.data.synthetic.seed, first, 0), 32)
    assert np.array_equal(cases["gt"][0], gt) and not np.array_equal(cases["deg"][0], gt)
    # --degradation picks one preset (the mix draws each case's from the same stream): moderate (2-6x) keeps more
    # of the target than severe (8-20x), and each mixed case is one of the two.
    mixed = demo_check.synthetic_cases(cfg, 6, 1)
    by_preset = {p: demo_check.synthetic_cases(cfg, 6, 1, p)["deg"] for p in ("moderate", "severe")}
    psnr = {p: np.mean([metrics.psnr(d, g) for d, g in zip(deg, mixed["gt"])]) for p, deg in by_preset.items()}
    assert psnr["moderate"] > psnr["severe"] + 1, psnr
    assert all(any(np.array_equal(m, by_preset[p][i]) for p in by_preset) for i, m in enumerate(mixed["deg"]))
    with pytest.raises(SystemExit):
        demo_check.main(["--checkpoint", str(toy_run), "--count", "3", "--refs", "0"])
    assert "--refs (1-3" in capsys.readouterr().err


def test_posterior_mean_is_one_unguided_euler_step(toy_run):
    """From sigma 1 the sampler's single step with guidance 1 lands on z - v, the one-step clean estimate."""
    system, cfg, _ = workdir.load(str(toy_run))
    cases = demo_check.synthetic_cases(cfg, 2, 1)
    deg, refs = jnp.asarray(images.to_model(cases["deg"])), jnp.asarray(images.to_model(cases["refs"]))
    key = jax.random.PRNGKey(3)
    mean = sampling.posterior_mean(system, deg, refs, key)
    one_step = sampling.restore_faces(system, deg, refs, key, steps=1, guidance=1.0)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(one_step), atol=1e-5)
    assert float(jnp.abs(mean - sampling.posterior_mean(system, deg, refs[:, :0], key)).max()) > 0


def test_cli_defaults_are_the_documented_ones(monkeypatch, tmp_path):
    """The paper's sampler settings (README "Restoring faces"; docs/design.md): 12 steps, guidance 4.0, seed 42;
    one reference for the second restoration (the --refs help), SSIM on luma, the EMA weights, the latest
    checkpoint and the run's own degradation mix."""
    seen = {}
    monkeypatch.setattr(demo_check, "evaluate_synthetic", lambda args: seen.update(vars(args)) or 0)
    assert demo_check.main(["--checkpoint", str(tmp_path), "--count", "4"]) == 0
    assert (seen["steps"], seen["guidance"], seen["seed"]) == (12, 4.0, 42)
    assert (seen["ssim_channels"], seen["no_ema"], seen["step"]) == ("y", False, None)
    assert (seen["degradation"], seen["lora_init"]) == ("",) * 2
    assert seen["refs"] == 1  # test_synthetic_evaluation_end_to_end
    seen.clear()
    assert demo_check.main(["--checkpoint", str(tmp_path)]) == 0
    assert seen["count"] == 48  # the demo's check (docs/demo.md)


def test_output_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(workdir, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "file").write_text("")
    assert demo_check.main(["--checkpoint", str(tmp_path), "--count", "2",
                            "--output-dir", str(tmp_path / "file")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
