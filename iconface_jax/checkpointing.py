"""Training checkpoints: Orbax CheckpointManager (asynchronous, keep-last-N) of the train state and data position.

A checkpoint holds the trainable parameters (and their EMA), the optimizer state, step and RNG key, and
the data iterator's state (JSON). Orbax finalises a step only when all of it is written, so a run killed during a
save resumes from the last complete step.
"""
from __future__ import annotations

import json
from typing import Any

import orbax.checkpoint as ocp

from iconface_jax import storage

PARAM_ITEMS = ("params", "ema")


class Checkpoints:
    """Save and restore `(train_state, data_state)` under `workdir/checkpoints` (local or `gs://`)."""

    def __init__(self, workdir: str, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)
        self.manager = ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: Any, force: bool = False) -> bool:
        """Starts saving (returns at once when asynchronous); True if a save was started.

        `state` holds `params` (and `ema` when kept) and the rest of the train state; the parameters
        are items of their own so that restoration can read them alone.
        """
        items = {name: ocp.args.StandardSave(state[name]) for name in PARAM_ITEMS if name in state}
        items["train"] = ocp.args.StandardSave({k: v for k, v in state.items() if k not in PARAM_ITEMS})
        items["data"] = ocp.args.JsonSave(_jsonable(data_state))
        return self.manager.save(step, force=force, args=ocp.args.Composite(**items))

    def restore(self, abstract_state: dict[str, Any], step: int | None = None) -> tuple[int, dict[str, Any], Any]:
        """(step, state laid out like `abstract_state` with its shardings, data state) of `step` or the latest."""
        step = self.manager.latest_step() if step is None else step
        items = {name: ocp.args.StandardRestore(abstract_state[name]) for name in PARAM_ITEMS if name in abstract_state}
        items["train"] = ocp.args.StandardRestore({k: v for k, v in abstract_state.items() if k not in PARAM_ITEMS})
        items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = dict(restored["train"], **{name: restored[name] for name in PARAM_ITEMS if name in abstract_state})
        return step, state, _unjsonable(restored["data"])

    def restore_params(self, abstract_params: Any, prefer_ema: bool = True, step: int | None = None) -> tuple[int, Any]:
        """(step, trainable parameters) alone: the EMA copy when one was kept and `prefer_ema`."""
        if step is not None and step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} under {self.manager.directory} "
                                    f"(kept: {sorted(self.manager.all_steps())})")
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.manager.directory}")
        has_ema = (self.manager.directory / str(step) / "ema").exists()
        name = "ema" if prefer_ema and has_ema else "params"
        restored = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract_params)}))
        return step, restored[name]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop and save at `step` after one of them got SIGTERM (JAX's preemption
        sync manager, started by `jax.distributed.initialize`, catches it); False in a single process. Every
        process must call it after every step."""
        return self.manager.reached_preemption(step)


def _jsonable(data_state: Any) -> Any:
    # Grain iterators report their state as bytes of JSON.
    if isinstance(data_state, bytes):
        return {"bytes": data_state.decode()}
    return {"value": json.loads(json.dumps(data_state))}


def _unjsonable(stored: Any) -> Any:
    return stored["bytes"].encode() if "bytes" in stored else stored["value"]
