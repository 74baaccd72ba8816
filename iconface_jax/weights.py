"""Converted weight directories: `config.json` (model family and config) beside an Orbax `params/` checkpoint.

Every converter writes through `save` and every model's `load(dir)` reads through `restore`, so the
on-disk layout, the atomic write and the error messages live in one place. Directories are read locally
or from `gs://`; they are written locally (the atomic rename has no Cloud Storage equivalent). Parameters are stored as
a flat dict keyed by the dotted module path (`transformer_blocks.0.attn.to_q.kernel`), the tree item
`state` of the checkpoint in `params/` (the item name Orbax's partial save gives it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from flax import nnx

from iconface_jax import storage

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
PARAMS_ITEM = "state"
CHUNK_BYTES = 512 * 2**20
Placement = Callable[[tuple[int, ...]], jax.sharding.Sharding]  # a weight's shape -> its sharding


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


def save(dst: str, family: str, config: Mapping[str, Any],
         params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], chunk_bytes: int | None = None) -> None:
    """Writes `dst` atomically: into a sibling temporary directory renamed into place at the end.

    `params` may be a stream of (name, array) pairs: they are written in chunks of about `chunk_bytes`
    (default `CHUNK_BYTES`; Orbax partial saves, committed once at the end), so a converter never holds
    the whole model.
    Refuses an existing `dst` and a `gs://` one; on any failure, the stream's own errors included, nothing is
    left behind.
    """
    if storage.is_remote(dst):
        raise WeightsError(f"destination {dst}: converted weights are written to a local directory (renamed into "
                           "place, which Cloud Storage cannot do atomically); copy it to the bucket afterwards")
    dst, chunk_bytes = os.path.abspath(dst), chunk_bytes or CHUNK_BYTES
    if os.path.exists(dst):
        raise WeightsError(f"destination {dst} already exists; remove it or choose another path")
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    except OSError as e:  # a read-only disk or folder, a file in the way
        raise WeightsError(f"destination {dst}: cannot write in {parent} ({e.strerror or e})") from None
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump({"family": family, "config": dict(config)}, f, indent=1, default=list)
        path, chunk, size, written = os.path.join(tmp, PARAMS_DIR), {}, 0, 0
        for name, array in params.items() if isinstance(params, Mapping) else params:
            chunk[name] = array
            size += array.nbytes
            if size >= chunk_bytes:
                ocp_v1.partial.save(path, chunk)
                written, chunk, size = written + len(chunk), {}, 0
        if not written and not chunk:
            raise WeightsError(f"{dst}: no parameters to write")
        if chunk:
            ocp_v1.partial.save(path, chunk)
        ocp_v1.partial.finalize(path)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(src: str, family: str) -> dict[str, Any]:
    """The model config stored in `src`, checking that it holds a `family` model."""
    path = os.path.join(src, CONFIG_FILE)  # a local path or gs://
    if not storage.path(path).is_file():
        raise WeightsError(f"{src} is not a converted weight directory: {CONFIG_FILE} is missing")
    meta = json.loads(storage.path(path).read_text())
    if meta.get("family") != family:
        raise WeightsError(f"{path} holds a {meta.get('family')!r} model, expected {family!r}")
    return meta["config"]


def restore(model: nnx.Module, src: str, kinds: tuple[type, ...] = (nnx.Param,),
            place: Placement | None = None) -> nnx.Module:
    """Fills the model's variables of types `kinds` from `src`, casting to each variable's dtype; each array
    restored with the sharding `place(shape)` (the trainer's fsdp shardings), by default on the first device."""
    targets = base_params(model, kinds)
    path = storage.path(src) / PARAMS_DIR
    if not (path / PARAMS_ITEM).is_dir():
        raise WeightsError(f"{src}: no parameter checkpoint {PARAMS_DIR}/{PARAMS_ITEM}/ (converted by an earlier "
                           f"version, or not a converted weight directory): convert the source again")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{PARAMS_ITEM: ocp.StandardCheckpointHandler()}))
    stored = checkpointer.metadata(path).item_metadata[PARAMS_ITEM].tree
    missing = sorted(set(targets) - set(stored))
    unexpected = sorted(set(stored) - set(targets))
    if missing or unexpected:
        raise WeightsError(f"{src}: parameters do not fit the model; missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for key, var in targets.items():
        if tuple(stored[key].shape) != tuple(var.get_value().shape):
            raise WeightsError(f"{src}: {key} has shape {tuple(stored[key].shape)}, "
                               f"the model expects {var.get_value().shape}")
    # Restored straight onto the devices in each variable's dtype and final sharding, array by array: no host
    # copy of the model, and on a mesh each process reads only its shards (never the whole model on one chip).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                        sharding=place(v.get_value().shape) if place else device)
                for k, v in targets.items()}
    values = checkpointer.restore(path, ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(abstract)}))
    for key, var in targets.items():
        var.set_value(values[PARAMS_ITEM][key])
    return model
