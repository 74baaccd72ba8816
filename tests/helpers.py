"""Plain helpers shared by the test modules (fixtures and hooks are in conftest.py).

`from helpers import ...` works in any test module, from any working directory: tests/ has no `__init__.py`, so
pytest's default (prepend) import mode puts it on `sys.path` before it imports conftest.py. Here: the
relative-error metric; the location of ../shared and the skips that guard it; trainer runs at toy size and the
paper's training shape; the face recognisers' golden-weight recipe and official state dicts; the authors' tiny
release transformer and config files that `--checkpoint` takes.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import types
from typing import Any

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def on_ci() -> bool:
    """Whether this is a CI run (env CI set), where the shared data and every test dependency must be present."""
    return bool(os.environ.get("CI"))


def require(path: pathlib.Path, what: str) -> pathlib.Path:
    """`path` (under ../shared), or a skip where a user's machine lacks it; under CI a failure, so that a missing or
    partial ../shared cannot turn parity tests into skips."""
    if not path.exists():
        message = f"{what} not found at {path} (../shared is absent or partial)"
        if on_ci():
            pytest.fail(f"{message}; CI needs it", pytrace=False)
        pytest.skip(message)
    return path


def import_or_skip(name: str) -> types.ModuleType:
    """`pytest.importorskip(name)`, but under CI a plain import: a declared test dependency must be there."""
    return importlib.import_module(name) if on_ci() else pytest.importorskip(name)


# --- trainer runs (tests/test_train.py, tests/test_restore.py) ---

# A toy run: 32 px images (16 tokens per segment), references 0 or 1 only (two compiled shapes).
TOY = ["--config.data.resolution=32", "--config.train.batch_size=4", "--config.data.synthetic.num_identities=40",
       "--config.data.ref_count_probs=(0.5,0.5,0.0,0.0)", "--config.log.every=1", "--config.log.sample_every=1000",
       "--config.train.warmup_steps=2", "--config.log.keep=3"]
# Subprocesses share compiled executables: the same toy programs compile once per test session.
CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "iconface_test_jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def env_with(**extra: str) -> dict[str, str]:
    """The environment of a trainer subprocess: CPU, the shared compilation cache, `extra` (XLA_FLAGS added
    to this session's, which conftest.py sets)."""
    if "XLA_FLAGS" in extra:
        extra["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra['XLA_FLAGS']}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", **CACHE, **extra)


def toy_flags(*overrides: str) -> list[str]:
    """TOY and `overrides`, each field once, the last flag of a field winning (the trainer refuses a field given
    twice)."""
    flags = {}
    for flag in (*TOY, *overrides):
        flags.pop(flag.split("=", 1)[0], None)
        flags[flag.split("=", 1)[0]] = flag
    return list(flags.values())


def run_train(workdir: str | os.PathLike, *overrides: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m iconface_jax.train` on the demo config at toy size, with `overrides`."""
    cmd = [sys.executable, "-m", "iconface_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
           f"--config.workdir={workdir}", *toy_flags(*overrides)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=env_with(**(env or {})))
    if check and out.returncode != 0:
        raise AssertionError(f"trainer failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a multi-process run's coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir: str | os.PathLike) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (local or gs://)."""
    from iconface_jax import storage

    rows = [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


# --- the paper's training shape at toy size (tests/test_train_step.py, tests/test_train.py) ---


def paper_overrides(vae_dir: str | os.PathLike) -> list[str]:
    """The demo config turned into the paper's training shape at toy size: a frozen base transformer with LoRA and
    side pathways trained, the FLUX.2 VAE codec (conftest's `tiny_vae_dir`), velocity prediction, klein's sigma
    centre, EMA on, no residual dropout."""
    return ["--config.model.train_base=False", "--config.model.autoencoder.kind=vae",
            "--config.model.autoencoder.bands=()", f"--config.model.autoencoder.weights={vae_dir}",
            "--config.model.backbone.in_channels=16", "--config.model.backbone.num_attention_heads=2",
            "--config.model.iconface.residual_rank=8", "--config.model.iconface.prediction=velocity",
            "--config.train.ema_decay=0.9", "--config.train.sigma_mean=0.0", "--config.train.residual_dropout=0.0"]


def step_inputs(cfg, graphdef, params, rest, images: dict) -> dict:
    """The train step's inputs of a batch of images as the trainer makes them (`train.step_inputs` over the frozen
    encoders, each jitted alone)."""
    import jax
    from flax import nnx

    from iconface_jax import train

    run = lambda method: jax.jit(lambda p, r, x: getattr(nnx.merge(graphdef, p, r), method)(x))
    return train.step_inputs(images, run("encode"), run("embed"), params, rest, cfg.train)


def demo_config(*overrides: str):
    """configs/demo.py with `--config.a.b=value` overrides applied as the trainer's command line applies them."""
    from iconface_jax import config

    return config.load(str(ROOT / "configs" / "demo.py"), overrides)


def write_config(cfg, path: pathlib.Path) -> str:
    """`cfg` (a ConfigDict) written as a config file that `--checkpoint` takes; its path."""
    path.write_text(f"import json, ml_collections\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
    return str(path)


# --- face recognisers (tests/test_adaface.py, tests/test_arcface.py) ---


class CustomObject:
    """A class a weights-only unpickler must refuse."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def golden_value(i: int, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Entry number `i` of a golden state dict by the recipe that comes with ../shared/golden
    (docs/parity.md#golden-vectors)."""
    rng = np.random.default_rng(i)
    if kind == "conv":
        v = rng.standard_normal(shape) * np.sqrt(0.5 / (shape[1] * shape[2] * shape[3]))
    elif kind == "linear_w":
        v = rng.standard_normal(shape) * np.sqrt(1 / shape[1])
    elif kind == "linear_b":
        v = 0.01 * rng.standard_normal(shape)
    elif kind == "bn_weight":
        v = 1 + 0.1 * rng.standard_normal(shape)
    elif kind in ("bn_bias", "bn_mean"):
        v = 0.1 * rng.standard_normal(shape)
    elif kind == "bn_var":
        v = rng.uniform(0.5, 1.5, shape)
    elif kind == "prelu":
        v = 0.25 + 0.05 * rng.standard_normal(shape)
    elif kind == "bn_count":
        return np.zeros(shape, np.int64)
    else:
        raise AssertionError(kind)
    return v.astype(np.float32)


def golden_state(keys: list[dict]) -> dict:
    """The official state dict (torch tensors) that a golden `*_keys.json` list and the recipe describe."""
    import torch

    return {e["key"]: torch.from_numpy(golden_value(i, e["kind"], tuple(e["shape"]))) for i, e in enumerate(keys)}


def state_from_plan(plan: dict, fill: float | None = None) -> dict:
    """An official-layout state dict (torch tensors, with `num_batches_tracked`) with the keys and shapes of a
    converter's `official_plan`. `fill=None`: random values; `fill=x`: every tensor a zero-stride view of one
    float (tiny on disk)."""
    import torch

    rng = np.random.default_rng(1)
    state = {}
    for key, shape, _ in plan.values():
        if fill is None:
            state[key] = torch.from_numpy((0.05 * rng.standard_normal(shape)).astype(np.float32))
        else:
            state[key] = torch.full((1,) * len(shape), float(fill)).expand(shape)
        if key.endswith(".running_var"):
            state[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(7)
    return state


# --- the authors' released code (tests/test_lora_release.py, tests/test_export_release.py) ---


def their_tiny_flux2(ref: types.SimpleNamespace):
    """Their BFL `Flux2` transformer at the tiny sizes of their README (128-channel tokens, 64 wide, 1 double and 2
    single blocks), random weights from torch's global generator; `ref` is test_lora_release's package fixture."""
    return ref.model.Flux2(ref.model.DebugFlux2Params(
        in_channels=128, context_in_dim=32, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2,
        axes_dim=[4, 4, 4, 4], mlp_ratio=2.0))
