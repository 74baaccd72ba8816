"""Pytest fixtures and session set-up shared by the test modules. Plain helpers (the relative-error metric, the
skips that guard ../shared, trainer runs, golden weights) are in tests/helpers.py."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from helpers import SHARED, require, run_train

# Test programs are compiled cold and run for a few steps: XLA:CPU's LLVM at -O0 compiles them much faster
# (a cold toy trainer run 76 s -> 46 s, same losses). Set before JAX starts; subprocesses inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the checkout (skips where a user's machine has none; fails under CI)."""
    return require(SHARED, "the project's shared test data")


# --- trainer runs (tests/test_train.py, tests/test_restore.py) ---


@pytest.fixture
def partial_saves(monkeypatch):
    """Records the parameter names of each Orbax partial save `weights.save` makes (one list per chunk)."""
    import orbax.checkpoint.experimental.v1 as ocp_v1

    calls, real = [], ocp_v1.partial.save
    monkeypatch.setattr(ocp_v1.partial, "save", lambda path, tree: (calls.append(sorted(tree)), real(path, tree))[1])
    return calls


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """Six uninterrupted toy steps (the resume test's reference and the restore tests' model)."""
    path = tmp_path_factory.mktemp("toy_run")
    run_train(path, "--config.train.steps=6", "--config.log.checkpoint_every=100")
    return path


# --- the paper's training shape at toy size (tests/test_train_step.py, tests/test_train.py) ---


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> pathlib.Path:
    """A converted weight directory of a tiny random FLUX.2 VAE: 16-channel tokens, 4 pixels per token side."""
    from flax import nnx

    from iconface_jax import weights
    from iconface_jax.models import vae

    config = vae.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    model = vae.init(config, seed=3)
    model.bn.running_var.set_value(model.bn.running_var[...] + 0.5)  # a non-trivial token normalisation
    stored = weights.base_params(model, (nnx.Param, nnx.BatchStat))
    path = tmp_path_factory.mktemp("tiny_vae") / "vae"
    weights.save(str(path), vae.FAMILY, config.to_dict(), {k: np.asarray(v.get_value()) for k, v in stored.items()})
    return path
