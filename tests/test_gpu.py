"""The accelerator checks a GPU session runs as one command: `python -m pytest -m gpu` (they skip elsewhere).

cuDNN attention against the XLA path (bf16, with a key mask), the benchmark end to end on the demo config in bf16 on
the GPU, and the paper's training step (klein-base-4B) compiled for this GPU from abstract shapes, as `aot` lowers
it, with its memory plan within the GPU's memory.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, rel_err
from iconface_jax import aot, bench, config, sharding
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
    assert bench.main(["--config", str(ROOT / "configs" / "demo.py"), "--shapes", "1x1", "--steps", "2",
                       "--restore-steps", "2", "--config.model.precision=bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(np.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)


def test_train_step_memory_plan_fits_the_gpu():
    """klein-base-4B, bf16, 512 px, B = 1, R = 0, remat full: the trainer's step as XLA plans it for this GPU."""
    cfg = config.load(str(ROOT / "configs" / "iconface_klein4b.py"),
                      ["--config.train.batch_size=1", "--config.model.remat=full"])
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    [program] = [p for p in aot.programs(aot.without_weights(cfg), mesh, references=(0,), restoration=False)
                 if p.name == "train R=0"]
    with jax.set_mesh(mesh):
        plan = aot.memory_plan(program.fn.lower(*program.args).compile())
    limit = jax.devices()[0].memory_stats()["bytes_limit"] / 2**30
    assert 0 < plan["total_gb"] < limit, (plan, limit)
