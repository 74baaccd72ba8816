"""The trainer end to end in the paper's training shape (frozen base, LoRA and side pathways trained, the FLUX.2
VAE codec, EMA, the identity loss), with and without the reference cache: what it trains, what it saves and
restores (the EMA included), and that a resumed run continues bitwise."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from helpers import losses, paper_overrides, run_train
from iconface_jax import workdir as workdirs
from iconface_jax import face_system

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

STEPS = 4
# 16 px (4 x 4 tokens), one reference in every batch: every step has the identity loss and one program compiles.
SHAPE = ["--config.data.resolution=16", "--config.data.ref_count_probs=(0.0,1.0,0.0,0.0)",
         "--config.train.lambda_id=1.0", f"--config.train.steps={STEPS}", "--config.log.checkpoint_every=2"]
SIDE_PATHWAYS = ("identity", "structure", "memory_xattn")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "reference_cache"])
def runs(request, tiny_vae_dir, tmp_path_factory):
    """(uninterrupted workdir, resumed workdir): the second restarts from the first's step-2 checkpoint alone."""
    overrides = [*paper_overrides(tiny_vae_dir), *SHAPE, f"--config.model.iconface.reference_cache={request.param}"]
    whole = tmp_path_factory.mktemp("paper_whole")
    run_train(whole, *overrides)
    resumed = tmp_path_factory.mktemp("paper_resumed")
    shutil.copytree(whole / "checkpoints" / "2", resumed / "checkpoints" / "2")
    out = run_train(resumed, *overrides)
    assert "resumed from step 2" in out.stdout
    return whole, resumed


def stored(workdir, item: str) -> dict[str, np.ndarray]:
    """One item of the last checkpoint as saved, read by Orbax without a target: {dotted name: array}."""
    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(STEPS) / item)
    names = (".".join(str(k.key) for k in path).removesuffix(".value") for path, _ in
             jax.tree_util.tree_leaves_with_path(tree))  # NNX variables store their array as `value`
    return {name: np.asarray(leaf) for name, leaf in zip(names, jax.tree.leaves(tree))}


def test_only_lora_and_side_pathways_are_trained_and_saved(runs):
    params = stored(runs[0], "params")
    assert all(k.startswith("model.") for k in params)
    base = [k for k in params if k.startswith("model.backbone.") and not k.endswith(("lora_a", "lora_b"))]
    assert not base, base[:5]
    assert {k.split(".")[1] for k in params if not k.startswith("model.backbone.")} == set(SIDE_PATHWAYS)
    assert any(k.endswith("lora_b") for k in params)


def test_identity_loss_is_active_every_step(runs):
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["refs"] == 1 and r["loss_id"] > 0 and r["finite"] == 1.0 for r in rows)


def test_resumed_run_continues_bitwise_with_its_ema(runs):
    whole, resumed = runs
    assert losses(resumed) == {s: v for s, v in losses(whole).items() if s > 2}
    for item in ("params", "ema"):
        a, b = stored(whole, item), stored(resumed, item)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{item} {k}")


def test_restore_prefers_the_ema(runs):
    whole = runs[0]
    ema, raw = stored(whole, "ema"), stored(whole, "params")
    assert any(not np.array_equal(ema[k], raw[k]) for k in raw)  # decay 0.9 over 4 steps: the two differ
    for prefer_ema, want in ((True, ema), (False, raw)):
        system, cfg, step = workdirs.load(str(whole), prefer_ema=prefer_ema)
        assert step == STEPS
        params = nnx.state(system, face_system.trainable_filter(cfg))
        got = {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)}
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"prefer_ema={prefer_ema} {k}")
