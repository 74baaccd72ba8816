"""Training checkpoints: Orbax CheckpointManager (asynchronous, keep-last-N) of the train state and data position.

A checkpoint holds the trainable parameters (and their EMA), the optimizer state, step and RNG key, and
the data iterator's state (JSON). Orbax finalises a step only when all of it is written, so a run killed during a
save resumes from the last complete step. A step that no longer reads (a file lost or damaged) is set aside under
`checkpoints/corrupt/` once an older one has read, never deleted; a failed save (a full disk) ends in one line
with the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from iconface_jax import storage

PARAM_ITEMS = ("params", "ema")
# Model fields that say how the model runs or where its files lie, not what a checkpoint holds: they may change when a
# run resumes (on another machine, with another memory budget).
RUNTIME_FIELDS = ("weights", "precision", "attention", "remat", "lora_init", "autoencoder.weights",
                  "autoencoder.remat_decoder", "face_encoder.weights", "text.embeddings")
PARTIAL_SAVES = "*.orbax-checkpoint-tmp*"  # Orbax's directories of a save in progress, finalised by a rename
CORRUPT_DIR = "corrupt"  # not a step number: Orbax does not list it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, explained in one line."""


def config_conflicts(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """'model.FIELD: stored A, given B' for each model field (`RUNTIME_FIELDS` aside) in which the config a workdir's
    checkpoints were trained with (its config.json) and the given one (both as JSON) differ, and for EMA kept or not.
    A field only one of them has is not compared: configs written before it existed lack it."""
    old, new = _fields(stored.get("model", {}), "model."), _fields(given["model"], "model.")
    conflicts = [f"{k}: stored {old[k]!r}, given {new[k]!r}" for k in old.keys() & new.keys()
                 if old[k] != new[k] and k.removeprefix("model.") not in RUNTIME_FIELDS]
    ema = [cfg.get("train", {}).get("ema_decay", 0) > 0 for cfg in (stored, given)]
    if ema[0] != ema[1]:
        conflicts.append(f"train.ema_decay: stored {stored['train']['ema_decay']!r}, given "
                         f"{given['train']['ema_decay']!r} (an EMA kept or not)")
    return sorted(conflicts)


def _fields(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A nested dict's leaves under dotted names."""
    out = {}
    for key, value in tree.items():
        out.update(_fields(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _without_background_tracebacks(record: logging.LogRecord) -> bool:
    # Orbax logs a failed background save with its traceback, several times; `wait` raises the same error again,
    # as one line.
    return not (record.exc_info and "orbax" in record.pathname)


class Checkpoints:
    """Save and restore `(train_state, data_state)` under `workdir/checkpoints` (local or `gs://`)."""

    def __init__(self, workdir: str, keep: int, asynchronous: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)
        self.manager = ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options)
        self.pending: int | None = None  # the step of the save in flight
        logging.getLogger("absl").addFilter(_without_background_tracebacks)  # added once however often called

    def remove_partial_saves(self) -> list[str]:
        """Deletes what dead saves left (Orbax's temporary directories) and returns their names. Only the workdir's
        one trainer may call it (iconface_jax/lock.py): another's save in progress looks the same."""
        removed = []
        for partial in self.manager.directory.glob(PARTIAL_SAVES):
            partial.rmtree()
            removed.append(partial.name)
        return sorted(removed)

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
        self.wait()  # a failure of the previous save is reported as that step's
        try:
            started = self.manager.save(step, force=force, args=ocp.args.Composite(**items))
        except Exception as e:  # any failure of a save is reported in one line
            raise self._save_failed(step, e) from e
        self.pending = step if started else None
        return started

    def restore(self, abstract_state: dict[str, Any], step: int | None = None) -> tuple[int, dict[str, Any], Any]:
        """(step, state laid out like `abstract_state` with its shardings, data state) of `step`, or of the newest
        step that reads: a newer one that does not is named (step and file) and, once an older one has read, set
        aside under checkpoints/corrupt/. A tree that does not fit `abstract_state` (another config) is no read
        error: its KeyError or the error of every step is raised, and nothing is set aside."""
        if step is not None:
            return self._restore(abstract_state, step)
        unreadable = []
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore(abstract_state, candidate)
            except (ValueError, OSError) as e:  # tensorstore's read errors are ValueErrors, JSON's too
                unreadable.append(candidate)
                print(f"checkpoint of step {candidate} does not read: {self._read_error(abstract_state, candidate, e)}",
                      flush=True)
                continue
            if unreadable:
                aside = self._set_aside(unreadable)
                print(f"resuming from step {candidate}, the newest checkpoint that reads; set aside: "
                      f"{', '.join(aside)}", flush=True)
            return restored
        raise CheckpointError(f"no checkpoint under {self.manager.directory} reads (steps "
                              f"{', '.join(map(str, unreadable))}, errors above); if the config changed since they "
                              f"were written, compare it with the workdir's config.json")

    def _restore(self, abstract_state: dict[str, Any], step: int) -> tuple[int, dict[str, Any], Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(**_restore_args(abstract_state)))
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
        items = {name: ocp.args.StandardRestore(abstract_params)}
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return step, restored[name]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete; a failed one raises `CheckpointError`."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # any failure of a save is reported in one line
            raise self._save_failed(self.pending, e) from e
        finally:
            self.pending = None

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to stop and save at `step` after one of them got SIGTERM (JAX's preemption
        sync manager, started by `jax.distributed.initialize`, catches it); False in a single process. Every
        process must call it after every step."""
        return self.manager.reached_preemption(step)

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        """The one-line error of a failed save; the partial save is removed (its space given back)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # the same failure, reported below
            pass
        if jax.process_index() == 0:
            # A save that failed as it started may still be writing its other items, untracked: remove what it left
            # until a look finds nothing (at most 10 s; the next start removes anything later).
            for _ in range(40):
                try:
                    if not self.remove_partial_saves():
                        break
                except OSError:  # a file written while the directory was being removed
                    pass
                time.sleep(0.25)
        self.manager.reload()
        kept = self.manager.latest_step()
        cause = "no space left on device" if _is_disk_full(error) else _first_line(error)
        return CheckpointError(f"checkpoint of step {step} not saved under {self.manager.directory}: {cause}; "
                               + (f"the checkpoint of step {kept} is intact" if kept is not None else
                                  "no earlier checkpoint"))

    def _read_error(self, abstract_state: dict[str, Any], step: int, error: Exception) -> str:
        """Where a step fails to read: the file the error names, else the first item that fails alone."""
        named = re.findall(r'file "([^"]+)"', str(error))
        if named:
            return f"{named[-1]}: {_first_line(error)}"
        for name, arg in _restore_args(abstract_state).items():
            try:
                self.manager.restore(step, args=ocp.args.Composite(**{name: arg}))
            except Exception:  # this is the item that fails
                return f"{self.manager.directory / str(step) / name}: {_first_line(error)}"
        return f"{self.manager.directory / str(step)}: {_first_line(error)}"

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Moves `steps` to checkpoints/corrupt/<step>[-n] (the chief; every process then reloads the list)."""
        corrupt = self.manager.directory / CORRUPT_DIR
        names = []
        for step in steps:
            target, n = corrupt / str(step), 1
            while target.exists():
                n += 1
                target = corrupt / f"{step}-{n}"
            if jax.process_index() == 0:
                corrupt.mkdir(parents=True, exist_ok=True)
                (self.manager.directory / str(step)).rename(target)
            names.append(str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()
        return names


def _restore_args(abstract_state: dict[str, Any]) -> dict[str, Any]:
    """Orbax's restore arguments of each item of a checkpoint of `abstract_state`."""
    items = {name: ocp.args.StandardRestore(abstract_state[name]) for name in PARAM_ITEMS if name in abstract_state}
    items["train"] = ocp.args.StandardRestore({k: v for k, v in abstract_state.items() if k not in PARAM_ITEMS})
    items["data"] = ocp.args.JsonRestore()
    return items


def _first_line(error: Exception) -> str:
    """An error's message up to its first line break, without tensorstore's spec, at most 300 characters."""
    text = str(error).split("\n")[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text[:300]}"


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether ENOSPC is in `error`'s chain (tensorstore reports it inside a ValueError's message)."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "[os_error_code='28']" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _jsonable(data_state: Any) -> Any:
    # Grain iterators report their state as bytes of JSON.
    if isinstance(data_state, bytes):
        return {"bytes": data_state.decode()}
    return {"value": json.loads(json.dumps(data_state))}


def _unjsonable(stored: Any) -> Any:
    return stored["bytes"].encode() if "bytes" in stored else stored["value"]
