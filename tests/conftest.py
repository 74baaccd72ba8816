"""Shared test helpers: the relative-error metric and the location of ../shared."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Test programs are compiled cold and run for a few steps: XLA:CPU's LLVM at -O0 compiles them much faster
# (a cold toy trainer run 76 s -> 46 s, same losses). Set before JAX starts; subprocesses inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """../shared beside the checkout (skips where a user's machine has none)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the project's shared test data lives beside the checkout)")
    return SHARED


# --- trainer runs (tests/test_train.py, tests/test_restore.py) ---

# A toy run: 32 px images (16 tokens per segment), references 0 or 1 only (two compiled shapes).
TOY = ["--config.data.resolution=32", "--config.train.batch_size=4", "--config.data.synthetic.num_identities=40",
       "--config.data.ref_count_probs=(0.5,0.5,0.0,0.0)", "--config.log.every=1", "--config.log.sample_every=1000",
       "--config.train.warmup_steps=2", "--config.log.keep=3"]
# Subprocesses share compiled executables: the same toy programs compile once per test session.
CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "iconface_test_jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def env_with(**extra) -> dict[str, str]:
    """The environment of a trainer subprocess: CPU, the shared compilation cache, `extra` (XLA_FLAGS added
    to this session's)."""
    if "XLA_FLAGS" in extra:
        extra["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {extra['XLA_FLAGS']}"
    return dict(os.environ, JAX_PLATFORMS="cpu", **CACHE, **extra)


def run_train(workdir, *overrides, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """`python -m iconface_jax.train` on the demo config at toy size, with `overrides`."""
    cmd = [sys.executable, "-m", "iconface_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
           f"--config.workdir={workdir}", *TOY, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=env_with(**(env or {})))
    if check and out.returncode != 0:
        raise AssertionError(f"trainer failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def losses(workdir) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


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
