"""The benchmark runs end to end on the demo config (all of (a) to (e)) and reports sane figures; the FLOP formulas."""
from __future__ import annotations

import json

import numpy as np
import pytest

from iconface_jax import bench, flops
from iconface_jax.models import flux2


def test_bench_demo_config(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # One shape with references exercises every row kind (the 1x0 shape only doubles the compile time); 32 px
    # images are 16 tokens per segment.
    assert bench.main(["--shapes", "1x2", "--steps", "1", "--restore-steps", "2", "--out", str(out),
                       "--config.data.resolution=32"]) == 0
    result = json.loads(out.read_text())
    kinds = ["forward", "train lora r8", "train iconface", "restore 2 st", "restore 2 st cache"]
    assert [(r["kind"], r["B"], r["R"]) for r in result["rows"]] == [(k, 1, 2) for k in kinds]
    for row in result["rows"]:
        assert np.isfinite(row["ms"]) and row["ms"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0
    assert result["rows"][0]["tokens"] == 8 + 4 * 16
    assert (result["config"], result["overrides"], result["image_size"]) == (
        "configs/demo.py", ["--config.data.resolution=32"], 32)
    assert "samples/s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny"], "--config.model.backbone.preset"),
    (["--remat=full"], "--config.model.remat"),
    (["--plan"], "python -m iconface_jax.aot"),
    (["--frobnicate"], "unrecognized argument '--frobnicate'"),
    (["--config.model.remat=bogus"], "config.model.remat 'bogus'"),
    (["--shapes", "2y3"], "--shapes 2y3"),
])
def test_flags_of_earlier_releases_and_bad_fields_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_flop_formula_matches_design():
    # docs/design.md#flops: linear 2 L x 122.6M x 25 blocks, attention 4 L^2 x 3072 x 25 for klein-base-4B.
    cfg = flux2.PRESETS["klein-base-4b"]
    lin, att = flops.model_flops(cfg, 512, 1024 * 5)
    assert abs(lin / (2 * 5632 * 25) / 122.6e6 - 1) < 1e-3
    assert att == 4 * 5632**2 * 3072 * 25
    # With the reference cache a step has 512 + 1024 queries over 5632 keys.
    assert flops.model_flops(cfg, 512, 1024, cached_len=4096)[1] == 4 * 1536 * 5632 * 3072 * 25
    # A 12-step guided restoration at R = 3: 24 sample-forwards, 1063 TFLOP; 320 with the reference cache.
    assert sum(flops.sampling_flops(cfg, 512, 1024, 3, 12)) == 24 * sum(flops.model_flops(cfg, 512, 1024 * 5))
    assert round(sum(flops.sampling_flops(cfg, 512, 1024, 3, 12)) / 1e12) == 1063
    assert round(sum(flops.sampling_flops(cfg, 512, 1024, 3, 12, cached=True)) / 1e12) == 320
