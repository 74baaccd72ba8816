"""The trainer end to end on a toy config: resume exactness, preemption, multi-device and multi-process runs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from conftest import ROOT, env_with, losses, run_train, toy_flags

# Runs that test something else skip the identity-loss path (decode + AdaFace gradients): less to compile.
NO_ID = "--config.train.lambda_id=0.0"

@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """The same six steps in two stages: stopped after step 3, then resumed."""
    path = tmp_path_factory.mktemp("staged_run")
    first = run_train(path, "--config.train.steps=6", "--config.train.stop_at=3", "--config.log.checkpoint_every=100")
    second = run_train(path, "--config.train.steps=6", "--config.log.checkpoint_every=100")
    return path, first.stdout, second.stdout


def test_resumed_run_continues_the_loss_curve_bitwise(toy_run, staged_run):
    staged, first, second = staged_run
    assert "stop_at=3 at step 3" in first
    assert "resumed from step 3" in second
    assert losses(staged) == losses(toy_run)
    assert len(losses(staged)) == 6
    assert sorted(os.listdir(staged / "checkpoints")) == ["3", "6"]


def test_interrupted_save_resumes_from_last_complete_checkpoint(staged_run):
    staged = staged_run[0]
    # A save killed half way leaves Orbax's temporary directory, never a finalised step.
    partial = staged / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"\0" * 100)
    out = run_train(staged, "--config.train.steps=7", "--config.log.checkpoint_every=100")
    assert "resumed from step 6" in out.stdout
    assert max(losses(staged)) == 7


def test_sigterm_saves_and_exits_cleanly(tmp_path):
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
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "SIGTERM at step" in rest
    step = int(rest.split("SIGTERM at step ")[1].split(":")[0])
    assert (tmp_path / "checkpoints" / str(step)).is_dir()


def test_eight_simulated_devices_with_fsdp_match_one_device(tmp_path):
    same = ["--config.train.steps=2", "--config.train.batch_size=8", "--config.data.ref_count_probs=(0.0,1.0,0.0,0.0)",
            NO_ID]
    out = run_train(tmp_path / "eight", *same, "--config.mesh.data=4", "--config.mesh.fsdp=2",
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert "8 device(s), mesh {'data': 4, 'fsdp': 2}" in out.stdout
    run_train(tmp_path / "one", *same)
    sharded, single = losses(tmp_path / "eight"), losses(tmp_path / "one")
    assert sharded.keys() == single.keys() == {1, 2}
    for step in single:  # same global batch; only the reduction order differs
        assert abs(sharded[step] - single[step]) <= 1e-5 * abs(single[step]), (sharded, single)


def test_two_processes_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "iconface_jax.train", "--config", str(ROOT / "configs" / "demo.py"),
            f"--config.workdir={tmp_path}", *toy_flags("--config.train.steps=3", "--config.log.checkpoint_every=3",
                                                       "--config.data.ref_count_probs=(0.0,1.0,0.0,0.0)", NO_ID)]
    procs = []
    for pid in range(2):
        env = env_with(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env))
        time.sleep(0.5)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    finals = [[line.split("loss ")[1].split()[0] for line in out.splitlines() if "step 3/3" in line] for out in outs]
    assert finals[0] and finals[0] == finals[1], outs
    assert "4 device(s)" in outs[0]
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_nonfinite_steps_stop_the_run_with_a_message(tmp_path):
    out = run_train(tmp_path, "--config.train.steps=20", "--config.train.learning_rate=1e30",
                    "--config.data.ref_count_probs=(1.0,0.0,0.0,0.0)", NO_ID,
                    "--config.train.grad_clip=1e30", "--config.train.max_nonfinite=3", check=False)
    assert out.returncode != 0
    assert "non-finite" in out.stdout + out.stderr
    assert "3 non-finite steps in a row" in out.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.fsdp=3", "mesh"),
    ("--config.model.weights=/nonexistent/klein", "/nonexistent/klein"),
    ("--config.model.iconface.variant=two_route", "variant"),
    ("--config.model.remat=some", "remat"),
])
def test_config_errors_before_compiling(tmp_path, override, message):
    from iconface_jax import train
    from configs import demo

    cfg = demo.get_config()
    key, value = override[len("--config."):].split("=")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.validate(cfg)


def test_codec_and_transformer_channels_must_agree():
    from configs import demo
    from iconface_jax import system as face_system

    cfg = demo.get_config()
    cfg.model.autoencoder.factor = 4  # 48-channel tokens for a 192-channel transformer
    with pytest.raises(ValueError, match="patchify codec makes 48-channel tokens .* takes 192"):
        face_system.build(cfg)


def test_batch_must_divide_the_devices(tmp_path):
    out = run_train(tmp_path, "--config.train.batch_size=3", check=False, timeout=120,
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out.returncode != 0
    assert "batch_size=3 is not divisible by the 2 devices" in out.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.train.bacth_size=4", "flag --config.train.bacth_size=4: the config has no field 'bacth_size'; "
                                    "Did you mean \"batch_size\" instead of \"bacth_size\"?"),
    ("--config.train.stepz=3", "flag --config.train.stepz=3: the config has no field 'stepz'; "
                               "Did you mean \"steps\" instead of \"stepz\"?"),
    ("--config.data.ref_count_probs=(0.0,1.0,0.0,0.0) --config.data.ref_count_probs=(1.0,0.0,0.0,0.0)",
     "flag --config.data.ref_count_probs is given twice (--config.data.ref_count_probs=(0.0,1.0,0.0,0.0), "
     "--config.data.ref_count_probs=(1.0,0.0,0.0,0.0)); give it once"),
])
def test_bad_config_flags_are_refused_in_one_line(tmp_path, override, message):
    out = run_train(tmp_path, *override.split(), check=False, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"FATAL Flags parsing error: {message}", out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_demo_config_is_a_configdict():
    from configs import demo
    assert isinstance(demo.get_config(), ml_collections.ConfigDict)


def test_a_few_hundred_steps_lower_the_loss(tmp_path):
    run_train(tmp_path, "--config.train.steps=200", "--config.log.checkpoint_every=1000",
              "--config.train.warmup_steps=20")
    curve = [loss for _, loss in sorted(losses(tmp_path).items())]
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    assert last < 0.5 * first, (first, last)
