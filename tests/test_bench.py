"""The benchmark runs end to end on the tiny preset (all of (a) to (e)) and reports sane figures."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from flax import nnx

from iconface_jax import bench, flops
from iconface_jax.models import flux2, lora
from iconface_jax.models.layers import Precision


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # One shape with references exercises every row kind (the 1x0 shape only doubles the compile time).
    assert bench.main(["--preset", "tiny", "--shapes", "1x2", "--image-size", "64", "--text-len", "16",
                       "--steps", "2", "--restore-steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    kinds = ["forward", "train lora r16", "train iconface", "restore 2 st", "restore 2 st cache"]
    assert [(r["kind"], r["B"], r["R"]) for r in result["rows"]] == [(k, 1, 2) for k in kinds]
    for row in result["rows"]:
        assert np.isfinite(row["ms"]) and row["ms"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0
    assert result["rows"][0]["tokens"] == 16 + 4 * 16
    assert "samples/s" in capsys.readouterr().out


def test_flop_formula_matches_design():
    # docs/design.md#flops: linear 2 L x 122.6M x 25 blocks, attention 4 L^2 x 3072 x 25 for klein-base-4B.
    cfg = flux2.PRESETS["klein-base-4b"]
    lin, att = flops.model_flops(cfg, 512, 1024 * 5)
    assert abs(lin / (2 * 5632 * 25) / 122.6e6 - 1) < 1e-3
    assert att == 4 * 5632**2 * 3072 * 25
    # With the reference cache a step has 512 + 1024 queries over 5632 keys.
    assert flops.model_flops(cfg, 512, 1024, cached_len=4096)[1] == 4 * 1536 * 5632 * 3072 * 25


def test_plan_compiles_from_abstract_shapes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert bench.main(["--plan", "--preset", "tiny", "--shapes", "1x1", "--image-size", "64", "--text-len", "8",
                       "--remat", "none,full", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["plan remat=none", "plan remat=full"]
    for r in rows:
        assert r["compile_s"] > 0 and r["arguments_gb"] >= 0 and r["total_gb"] >= r["temp_gb"]
    assert "plan remat=full" in capsys.readouterr().out


def test_frozen_weights_get_no_gradient():
    """XLA's FLOP count of the compiled step: training only LoRA skips the frozen weights' gradient matmuls
    (~2x the linear forward instead of ~3x). Small width, so the linear layers dominate."""
    cfg = dataclasses.replace(flux2.PRESETS["tiny"], num_attention_heads=4, attention_head_dim=32,
                              axes_dims_rope=(8, 8, 8, 8))
    flops = {name: bench.plan(cfg, Precision(), 1, 1, 4, 8, 1, "none", None, trainable=f)["xla_tflop"]
             for name, f in [("lora", lora.trainable), ("all", nnx.Param)]}
    assert 0.6 < flops["lora"] / flops["all"] < 0.72, flops
