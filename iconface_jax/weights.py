"""Converted weight directories: `config.json` (model family and config) beside an Orbax `params/` tree.

Every converter writes through `save` and every model's `load(dir)` reads through `restore`, so the
on-disk layout, the atomic write and the error messages live in one place. Parameters are stored as
a flat dict keyed by the dotted module path (`transformer_blocks.0.attn.to_q.kernel`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class WeightsError(ValueError):
    """A weight directory or source file is missing, malformed or does not fit the model."""


def named_params(model: nnx.Module, wanted: Any = nnx.Param) -> dict[str, nnx.Variable]:
    """The model's variables matching `wanted` (an NNX filter), keyed by dotted path."""
    predicate = nnx.filterlib.to_predicate(wanted)
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and predicate(path, node):
            out[".".join(str(p) for p in path)] = node
    return out


def base_params(model: nnx.Module, kinds: tuple[type, ...] = (nnx.Param,)) -> dict[str, nnx.Variable]:
    """The stored weights: variables of exactly these types (so LoRA factors, a Param subclass, are not)."""
    return {k: v for k, v in named_params(model, nnx.Variable).items() if type(v) in kinds}


def save(dst: str, family: str, config: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> None:
    """Writes `dst` atomically: into a sibling temporary directory renamed into place at the end.

    Refuses an existing `dst`; on any failure nothing is left behind.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        raise WeightsError(f"destination {dst} already exists; remove it or choose another path")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump({"family": family, "config": dict(config)}, f, indent=1, default=list)
        # Synchronous: the directory is renamed into place only once every tensor is written.
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=1))
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(dict(params)))
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(src: str, family: str) -> dict[str, Any]:
    """The model config stored in `src`, checking that it holds a `family` model."""
    path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f"{src} is not a converted weight directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("family") != family:
        raise WeightsError(f"{path} holds a {meta.get('family')!r} model, expected {family!r}")
    return meta["config"]


def restore(model: nnx.Module, src: str, kinds: tuple[type, ...] = (nnx.Param,)) -> nnx.Module:
    """Fills the model's variables of types `kinds` from `src`, casting to each variable's dtype."""
    targets = base_params(model, kinds)
    stored = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(src), PARAMS_DIR))
    stored = stored.item_metadata.tree
    missing = sorted(set(targets) - set(stored))
    unexpected = sorted(set(stored) - set(targets))
    if missing or unexpected:
        raise WeightsError(f"{src}: parameters do not fit the model; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, var in targets.items():
        if tuple(stored[key].shape) != tuple(var.get_value().shape):
            raise WeightsError(f"{src}: {key} has shape {tuple(stored[key].shape)}, the model expects {var.get_value().shape}")
    abstract = {k: jax.ShapeDtypeStruct(v.get_value().shape, stored[k].dtype) for k, v in targets.items()}
    values = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(src), PARAMS_DIR), abstract)
    for key, var in targets.items():
        var.set_value(jax.numpy.asarray(values[key], dtype=var.get_value().dtype))
    return model
