"""A workdir that bad starts, faults and a second trainer leave intact: the lock, corrupt and partial checkpoints, a
full disk, a config that does not fit the checkpoints, and the exit codes of a run stopped by a signal."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import ROOT, env_with, losses, run_train, toy_flags
from test_storage import BUCKET, gcs_env  # noqa: F401 (a fixture)

from iconface_jax import checkpointing, lock, storage

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

NO_ID = "--config.train.lambda_id=0.0"


# --- the lock ---


def write_lock(workdir, **record) -> None:
    """A lock file as a trainer of `record` (pid, host, started, heartbeat) would have written it."""
    now = time.time()
    record = dict(dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now, token="other"), **record)
    (storage.path(workdir) / lock.LOCK_FILE).write_text(json.dumps(record))


def holder(workdir) -> dict:
    return json.loads((storage.path(workdir) / lock.LOCK_FILE).read_text())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_a_second_lock_naming_it(tmp_path):
    write_lock(tmp_path, pid=1, host="other-host", started=0.0)
    with pytest.raises(lock.LockHeld, match=r"in use by the trainer of pid 1 on other-host, started 1970-01-01 "
                                             r"00:00:00 UTC, heartbeat \d s ago"):
        lock.WorkdirLock(str(tmp_path), settle_s=0).acquire()
    assert holder(tmp_path)["token"] == "other"


@pytest.mark.parametrize("dead", ["heartbeat", "pid"])
def test_a_dead_holder_is_taken_over(tmp_path, dead):
    if dead == "heartbeat":  # another host's trainer, silent for longer than the stale timeout
        write_lock(tmp_path, host="other-host", pid=7, heartbeat=time.time() - 700)
        reason = r"took over the lock of pid 7 on other-host, .*: its heartbeat is 700 s old \(stale after 600 s\)"
    else:  # this host's, its process gone
        write_lock(tmp_path, pid=dead_pid())
        reason = r"took over the lock of pid \d+ on .*: process \d+ on this host has exited"
    taken = lock.WorkdirLock(str(tmp_path), settle_s=0)
    assert re.fullmatch(reason, taken.acquire())
    assert holder(tmp_path)["pid"] == os.getpid()
    taken.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_the_heartbeat_is_refreshed_and_a_lock_taken_over_is_not_released(tmp_path):
    held = lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05, settle_s=0)
    assert held.acquire() is None
    first = holder(tmp_path)["heartbeat"]
    time.sleep(0.5)
    assert holder(tmp_path)["heartbeat"] > first
    write_lock(tmp_path, host="other-host")  # as a trainer that took it over would
    time.sleep(0.2)
    held.release()
    assert holder(tmp_path)["host"] == "other-host"


def test_of_two_trainers_starting_together_one_gets_the_lock(tmp_path):
    """Each writes its record, waits and reads it back: only the last writer finds its own."""
    locks = [lock.WorkdirLock(str(tmp_path), settle_s=0.5) for _ in range(2)]
    outcomes = []

    def take(held):
        try:
            held.acquire()
            outcomes.append("held")
        except lock.LockHeld as e:
            outcomes.append(str(e))
    threads = [threading.Thread(target=take, args=(held,)) for held in locks]
    for t in threads:
        t.start()
        time.sleep(0.1)  # the second starts while the first waits to read its record back
    for t in threads:
        t.join()
    assert sorted(outcomes)[1] == "held" and "was locked at the same time by the trainer of pid" in sorted(outcomes)[0]
    for held in locks:
        held.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_the_lock_works_in_a_bucket(gcs_env):
    workdir = f"gs://{BUCKET}/runs/locked"
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    write_lock(workdir, host="other-host", pid=1)
    with pytest.raises(lock.LockHeld, match="in use by the trainer of pid 1 on other-host"):
        lock.WorkdirLock(workdir, settle_s=0).acquire()
    write_lock(workdir, host="other-host", pid=1, heartbeat=time.time() - 601)
    taken = lock.WorkdirLock(workdir, settle_s=0)
    assert "heartbeat is 601 s old" in taken.acquire()
    assert holder(workdir)["pid"] == os.getpid()
    taken.release()
    assert not (storage.path(workdir) / lock.LOCK_FILE).exists()


# --- checkpoints ---


def tiny_state(step: int) -> dict:
    return dict(params={"w": jnp.full((8, 8), float(step))}, step=jnp.int32(step), key=jax.random.PRNGKey(step))


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_state(0))


@pytest.fixture
def three_steps(tmp_path):
    """A workdir with checkpoints of steps 1, 2 and 3 (parameters filled with the step)."""
    ckpt = checkpointing.Checkpoints(str(tmp_path), keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, tiny_state(step), {"position": step}, force=True)
    ckpt.close()
    return tmp_path


def delete_array_file(step_dir) -> str:
    victim = next(p for p in sorted((step_dir / "params" / "d").iterdir()))
    victim.unlink()
    return str(victim)


def truncate_array_file(step_dir) -> str:
    victim = next(p for p in sorted((step_dir / "params" / "d").iterdir()))
    victim.write_bytes(victim.read_bytes()[:10])
    return str(victim)


def overwrite_data_state(step_dir) -> str:
    (step_dir / "data" / "metadata").write_text("garbage")
    return str(step_dir / "data")


@pytest.mark.parametrize("corrupt", [delete_array_file, truncate_array_file, overwrite_data_state])
def test_a_corrupt_checkpoint_is_named_set_aside_and_the_previous_one_read(three_steps, corrupt, capsys):
    where = corrupt(three_steps / "checkpoints" / "3")
    ckpt = checkpointing.Checkpoints(str(three_steps), keep=3)
    step, state, data_state = ckpt.restore(ABSTRACT)
    out = capsys.readouterr().out
    assert (step, data_state) == (2, {"position": 2}) and float(state["params"]["w"][0, 0]) == 2.0
    assert f"checkpoint of step 3 does not read: {where}" in out
    aside = f"{three_steps}/checkpoints/corrupt/3"
    assert f"resuming from step 2, the newest checkpoint that reads; set aside: {aside}" in out
    assert (three_steps / "checkpoints" / "corrupt" / "3" / "params").is_dir()
    ckpt.save(4, tiny_state(4), {"position": 4}, force=True)  # keep=3 of the steps it lists, the set-aside one not
    ckpt.close()
    assert sorted(os.listdir(three_steps / "checkpoints")) == ["1", "2", "4", "corrupt"]


def test_a_tree_of_another_config_is_no_corruption(three_steps):
    """A state with an EMA the checkpoints lack: the error is raised and no checkpoint is set aside."""
    ckpt = checkpointing.Checkpoints(str(three_steps), keep=3)
    with pytest.raises(KeyError, match="ema"):
        ckpt.restore(dict(ABSTRACT, ema=ABSTRACT["params"]))
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint under .* reads"):
        ckpt.restore(dict(ABSTRACT, params={"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}))
    assert sorted(os.listdir(three_steps / "checkpoints")) == ["1", "2", "3"]


def test_partial_saves_are_removed(three_steps):
    for name in ("4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1765"):
        (three_steps / "checkpoints" / name / "params").mkdir(parents=True)
    removed = checkpointing.Checkpoints(str(three_steps), keep=3).remove_partial_saves()
    assert removed == ["4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1765"]
    assert sorted(os.listdir(three_steps / "checkpoints")) == ["1", "2", "3"]


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_reads(tmp_path, monkeypatch):
    ckpt = checkpointing.Checkpoints(str(tmp_path), keep=3)
    ckpt.save(1, tiny_state(1), {"position": 1}, force=True)
    ckpt.wait()

    def full(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full)
    with pytest.raises(checkpointing.CheckpointError) as failed:
        ckpt.save(2, tiny_state(2), {"position": 2}, force=True)
        ckpt.close()
    assert str(failed.value) == (f"checkpoint of step 2 not saved under {tmp_path}/checkpoints: no space left on "
                                 "device; the checkpoint of step 1 is intact")
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # the partial save removed
    monkeypatch.undo()
    assert checkpointing.Checkpoints(str(tmp_path), keep=3).restore(ABSTRACT)[0] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (skips where this user cannot mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_that_fills_during_an_asynchronous_save_is_one_line(small_disk):
    """The error surfaces at the next save, in the background writer: it is still reported as the step that failed."""
    ckpt = checkpointing.Checkpoints(str(small_disk), keep=3)
    ckpt.save(1, tiny_state(1), {"position": 1}, force=True)
    big = dict(tiny_state(2), params={"w": jax.random.normal(jax.random.PRNGKey(0), (300, 300))})  # 360 KB
    ckpt.save(2, big, {"position": 2}, force=True)
    with pytest.raises(checkpointing.CheckpointError) as failed:
        ckpt.save(3, tiny_state(3), {"position": 3}, force=True)
    assert str(failed.value) == (f"checkpoint of step 2 not saved under {small_disk}/checkpoints: no space left on "
                                 "device; the checkpoint of step 1 is intact")
    assert os.listdir(small_disk / "checkpoints") == ["1"]
    ckpt.close()


def test_config_conflicts_name_each_model_field():
    stored = {"model": {"remat": "none", "iconface": {"variant": "full", "memory_tokens": 16},
                        "lora": {"rank": 8}}, "train": {"ema_decay": 0.0, "learning_rate": 1e-3}}
    given = {"model": {"remat": "full", "iconface": {"variant": "concat", "memory_tokens": 16, "new": 1},
                       "lora": {"rank": 16}}, "train": {"ema_decay": 0.999, "learning_rate": 1e-4}}
    assert checkpointing.config_conflicts(stored, given) == [
        "model.iconface.variant: stored 'full', given 'concat'", "model.lora.rank: stored 8, given 16",
        "train.ema_decay: stored 0.0, given 0.999 (an EMA kept or not)"]
    given["model"]["iconface"]["variant"], given["model"]["lora"]["rank"], given["train"]["ema_decay"] = "full", 8, 0.5
    stored["train"]["ema_decay"] = 0.9
    assert checkpointing.config_conflicts(stored, given) == []


# --- the trainer ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy workdir with checkpoints of steps 2 and 4."""
    path = tmp_path_factory.mktemp("trained")
    run_train(path, "--config.train.steps=4", "--config.log.checkpoint_every=2", NO_ID)
    assert sorted(os.listdir(path / "checkpoints")) == ["2", "4"]
    return path


@pytest.fixture
def workdir(trained, tmp_path):
    """A copy of `trained` to damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def assert_refused_in_one_line(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert message in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_another_model_is_refused_and_config_json_kept(workdir):
    before = (workdir / "config.json").read_bytes()
    out = run_train(workdir, "--config.train.steps=6", "--config.log.checkpoint_every=2", NO_ID,
                    "--config.model.iconface.variant=concat", "--config.model.lora.rank=4", check=False, timeout=300)
    assert_refused_in_one_line(out, f"{workdir}/config.json: its checkpoints hold another model than the config "
                                    "given: model.iconface.variant: stored 'full', given 'concat'; model.lora.rank: "
                                    "stored 8, given 4; give the stored values, or another workdir")
    assert (workdir / "config.json").read_bytes() == before
    assert not (workdir / lock.LOCK_FILE).exists()  # released on the way out


def test_a_second_trainer_is_refused_in_one_line(workdir):
    before = (workdir / "config.json").read_bytes()
    write_lock(workdir, started=0.0)
    out = run_train(workdir, "--config.train.steps=6", "--config.log.checkpoint_every=2", NO_ID, check=False,
                    timeout=300)
    assert_refused_in_one_line(out, f"{workdir} is in use by the trainer of pid {os.getpid()} on "
                                    f"{socket.gethostname()}, started 1970-01-01 00:00:00 UTC")
    assert (workdir / "config.json").read_bytes() == before and holder(workdir)["token"] == "other"


def test_the_trainer_resumes_past_a_corrupt_checkpoint(workdir):
    bad = delete_array_file(workdir / "checkpoints" / "4")
    (workdir / "checkpoints" / "7.orbax-checkpoint-tmp-99" / "params").mkdir(parents=True)
    write_lock(workdir, pid=dead_pid())  # a trainer killed without releasing it
    out = run_train(workdir, "--config.train.steps=5", "--config.log.checkpoint_every=2", NO_ID)
    assert "took over the lock of pid" in out.stdout
    assert "removed partial saves of a run that died saving: 7.orbax-checkpoint-tmp-99" in out.stdout
    assert f"checkpoint of step 4 does not read: {bad}" in out.stdout
    assert "resumed from step 2" in out.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "5", "corrupt"]
    assert os.listdir(workdir / "checkpoints" / "corrupt") == ["4"]
    assert max(losses(workdir)) == 5 and not (workdir / lock.LOCK_FILE).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_exits_128_plus_its_number(tmp_path, signum):
    cmd = [sys.executable, "-m", "iconface_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
           f"--config.workdir={tmp_path}", *toy_flags("--config.train.steps=100000",
                                                      "--config.log.checkpoint_every=100000", NO_ID)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_with())
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 3/"):
            break
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, "".join(lines) + rest
    name = signal.Signals(signum).name
    assert f"{name} at step" in rest and "Traceback" not in rest, rest
    step = int(rest.split(f"{name} at step ")[1].split(":")[0])
    assert (tmp_path / "checkpoints" / str(step)).is_dir() and not (tmp_path / lock.LOCK_FILE).exists()
    assert np.isfinite(losses(tmp_path)[step])


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    """Where the workdir cannot be made (here a file stands in its way: root writes everywhere else), the trainer
    says so in one line and exits 1, before it builds or compiles anything."""
    (tmp_path / "file").write_text("")
    out = run_train(tmp_path / "file" / "run", "--config.train.steps=1", check=False, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (f"config.workdir {tmp_path}/file/run: cannot be created or written "
                                                   "(Not a directory)")
