"""The accelerator checks a GPU session runs as one command: `python -m pytest -m gpu` (they skip elsewhere).

cuDNN attention against the XLA path (bf16, with a key mask), the benchmark end to end on the tiny preset on the
GPU, and a klein-width LoRA step's compiled memory plan within the GPU's memory.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_err
from iconface_jax import bench
from iconface_jax.models import attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_attention_matches_xla(masked):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 384, 4, 128)), jnp.bfloat16) for _ in range(3))
    mask = jnp.asarray(rng.uniform(size=(2, 384)) > 0.2) if masked else None
    got = attention.attention(q, k, v, mask, backend="cudnn")
    want = attention.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, backend="xla")
    assert rel_err(got.astype(jnp.float32), want) < 1e-2  # bf16 inputs and output


def test_bench_runs_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--shapes", "1x1", "--image-size", "64", "--text-len", "16",
                       "--steps", "2", "--restore-steps", "2", "--precision", "bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(np.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)


def test_lora_step_memory_plan_fits_the_gpu(tmp_path):
    out = tmp_path / "plan.json"
    assert bench.main(["--plan", "--preset", "klein-base-4b", "--shapes", "1x0", "--image-size", "512",
                       "--text-len", "512", "--precision", "bf16", "--remat", "full", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    limit = jax.devices()[0].memory_stats()["bytes_limit"] / 1e9
    assert 0 < row["total_gb"] < limit, (row["total_gb"], limit)
