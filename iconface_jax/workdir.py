"""A training workdir as a trained model: its config.json and checkpoints rebuilt into a `FaceSystem`."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from iconface_jax import checkpointing, config, storage
from iconface_jax import face_system
from iconface_jax.face_system import FaceSystem


def load(workdir: str, prefer_ema: bool = True, step: int | None = None, lora_init: str = "",
         overrides: list[str] | tuple[str, ...] = ()) -> tuple[FaceSystem, ml_collections.ConfigDict, int]:
    """The trained system of a training workdir (its config.json and the checkpoint of `step`, default the
    latest), and its step; or, for a config `FILE.py[:ARG]` with `--config.a.b=value` `overrides`, its model with
    the adapter of `model.lora_init` (step 0), `lora_init` overriding the config's (the authors' released LoRA on
    the concat config). A workdir's model is the one its checkpoints hold: overrides are refused there."""
    if workdir.partition(":")[0].endswith(".py"):
        cfg = config.load(workdir, overrides)
        cfg.model.lora_init = lora_init or cfg.model.lora_init
        if not cfg.model.lora_init:
            raise ValueError(f"{workdir}: a config alone is an untrained model; name a converted LoRA "
                             f"(--lora-init DIR) or give a training workdir")
        return face_system.build(cfg), cfg, 0
    if overrides:
        raise ValueError(f"{workdir}: a training workdir restores the model its checkpoints hold; --config.* overrides "
                         f"({' '.join(overrides)}) apply to a config FILE.py given as --checkpoint")
    path = os.path.join(workdir, "config.json")  # a local path or gs://
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
    stored = json.loads(storage.path(path).read_text())
    if "model" not in stored:
        kind = f"a converted {stored['family']} weight directory" if "family" in stored else "not a training config"
        raise ValueError(f"{path}: {kind}; --checkpoint takes a training workdir")
    cfg = config.upgrade(stored)  # as it trained, whichever release wrote it
    cfg.model.lora_init = ""  # the checkpoint holds the trained adapters
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    step, params = checkpointing.Checkpoints(workdir, keep=1).restore_params(abstract, prefer_ema, step)
    return nnx.merge(graphdef, params, rest), cfg, step
