"""Ahead-of-time compiles: target names to topologies (Cloud TPU's slice shapes), the trainer's programs for
a compile-only v5e 2x2 (libtpu) and a float32 step for an H100 (CUDA plugin), the FLOP audit on this machine's
CPU, cuDNN's dtype rule, and a quiet start-up with libtpu installed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import ROOT
from iconface_jax import aot, config, sharding
from iconface_jax.models import attention

pytestmark = [pytest.mark.subprocess, pytest.mark.slow, pytest.mark.tpu]

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and importlib.util.find_spec(
    "jax_plugins.xla_cuda12") is not None


def demo_config(**mesh):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.train.batch_size = 4
    cfg.mesh.update(mesh)
    return cfg


@pytest.mark.parametrize("name, chips, topology, host_bounds", [
    # Cloud TPU docs: v4 and v5p names count TensorCores (2 per chip), v5e and v6e chips; hosts of multi-host
    # slices hold 2x2 chips, single-host v5e/v6e slices up to 8.
    ("v4-8", 4, "v4:2x2x1", (2, 2, 1)),
    ("v5e-8", 8, "v5e:2x4", (2, 4, 1)),
    ("v5e-64", 64, "v5e:8x8", (2, 2, 1)),
    ("v5e-256", 256, "v5e:16x16", (2, 2, 1)),
    ("v5p-8", 4, "v5p:2x2x1", (2, 2, 1)),
    ("v5p-128", 64, "v5p:4x4x4", (2, 2, 1)),
    ("v6e-8", 8, "v6e:2x4", (2, 4, 1)),
    ("v6e-64", 64, "v6e:8x8", (2, 2, 1)),
    ("h100-1", 1, "1x1x1", (1, 1, 1)),
    ("h100-8", 8, "1x1x8", (1, 1, 8)),
])
def test_targets(name, chips, topology, host_bounds):
    target = aot.parse_target(name)
    assert (target.chips, target.topology, target.host_bounds) == (chips, topology, host_bounds)


@pytest.mark.parametrize("name", ["v5e", "v7-8", "v5p-3", "v5e-12"])
def test_bad_target_is_named(name):
    with pytest.raises(ValueError, match=name):
        aot.parse_target(name)


def test_too_big_names_program_and_numbers():
    plan = dict(topology="v5e-8", hbm_gb=16, programs=[
        dict(name="train R=0", total_gb=12.0, arguments_gb=8.0, temp_gb=4.0),
        dict(name="train R=3", total_gb=20.5, arguments_gb=8.0, temp_gb=12.5)])
    assert aot.too_big(plan) == ["train R=3: 20.5 GB per chip (arguments 8.0, temporaries 12.5) > 16 GB HBM on v5e-8"]


def test_cudnn_only_for_16_and_8_bit_floats():
    """cuDNN rejects float32: the cudnn backend computes it on the XLA path (equal to it); bf16 goes to
    cuDNN, which this CPU-only machine does not have."""
    q, k, v = (jax.random.normal(key, (2, 16, 2, 8), jnp.float32) for key in jax.random.split(jax.random.key(0), 3))
    np.testing.assert_array_equal(attention.attention(q, k, v, backend="cudnn"),
                                  attention.attention(q, k, v, backend="xla"))
    with pytest.raises(RuntimeError, match="cuDNN"):
        attention.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), backend="cudnn")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_v5e_2x2_compiles_train_steps_and_restoration():
    """The demo config on a compile-only v5e 2x2 with mesh.data=4: splash attention sharded per chip (it
    fails to compile unsharded), the identity loss at R = 3, the restoration; plans per chip."""
    plan = aot.compile_plan(demo_config(data=4), aot.parse_target("v5e-4"), references=(0, 3))
    assert (plan["devices"], plan["mesh"], plan["attention"]) == (4, {"data": 4, "fsdp": 1}, "splash")
    assert [p["name"] for p in plan["programs"]] == [
        "encode images", "embed faces", "train R=0", "train R=3", "restore 12 steps"]
    encode, embed, train0, train3, restore = plan["programs"]
    for p in plan["programs"]:
        assert p["compile_s"] > 0 and p["total_gb"] < plan["hbm_gb"], p
    for p in (train0, train3, restore):  # the demo's patchify codec has no weights: its encoder plans ~0 GB
        assert p["total_gb"] > 0 and p["tflop"] > 0 and p["roofline_samples_per_s"] > 0, p
    assert encode["formula_tflop"] == embed["formula_tflop"] == 0  # no transformer in the frozen encoders
    assert train3["tflop"] > train0["tflop"] and train3["bytes_accessed_gb"] > train0["bytes_accessed_gb"]  # refs, L_id
    assert 0 < train0["formula_tflop"] < train3["formula_tflop"] and restore["formula_tflop"] > 0
    # XLA counts the sampler's loop body once: 12 steps are the formula's, not XLA's one-step count
    assert restore["xla_tflop"] * 4 < restore["tflop"] == restore["formula_tflop"], restore
    assert not aot.too_big(plan)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the CUDA plugin is not installed (pip install -e '.[cuda-aot]', "
                                                "~180 MB; CI does not install it)")
def test_h100_compiles_the_float32_demo_step():
    """cuDNN rejects float32, so on a GPU the float32 demo's attention takes the XLA path and compiles."""
    plan = aot.compile_plan(demo_config(), aot.parse_target("h100-1"), references=(0,), restoration=False)
    [step] = [p for p in plan["programs"] if p["name"] == "train R=0"]
    assert plan["attention"] == "cudnn" and step["total_gb"] > 0 and step["tflop"] > 0


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="the CUDA plugin is not installed (pip install -e '.[cuda-aot]')")
def test_h100_flops_count_cublas_dots_and_cudnn_convolutions():
    """XLA:GPU turns dots and convolutions into cuBLAS / cuDNN custom calls, which XLA's cost model counts as 0
    FLOPs: the plan must still count them (2 MNK per dot, 2 x outputs x window x input channels per conv)."""
    target = aot.parse_target("h100-8")
    mesh = jax.sharding.Mesh(aot.target_devices(target), ("data",))
    rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def f(x, w, image, kernel):
        conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.einsum("bij,jk->bik", x, w), conv

    args = [jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=whole),
            jax.ShapeDtypeStruct((8, 34, 34, 64), jnp.bfloat16, sharding=rows),
            jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.bfloat16, sharding=whole)]
    lowered = jax.jit(f).lower(*args)
    cost = aot._cost(lowered, lowered.compile({"xla_gpu_enable_triton_gemm": False}), target)
    per_chip = (2 * 8 * 256 * 512 * 1024 + 2 * 8 * 32 * 32 * 128 * 9 * 64) / 8
    assert cost["flops"] == pytest.approx(per_chip, rel=1e-3)
    assert cost["bytes accessed"] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: nothing probes for a TPU")
def test_libtpu_installed_start_up_is_quiet():
    """With libtpu installed JAX would probe for a TPU and print libtpu's warnings; importing the package on
    a machine without one keeps JAX on the CPU, silently."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", "import iconface_jax, jax; print(jax.default_backend())"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
    assert "TPU" not in out.stderr, out.stderr


def test_command_compiles_only_the_programs_named(monkeypatch, tmp_path):
    """`--references=3 --norestoration` asks `compile_plan` for the R = 3 train step alone and writes what it
    returns; a reference count that is not a number is refused by name. (The compiles themselves: above.)"""
    asked = []

    def plan(cfg, target, references, restoration, on_row=None):
        asked.append((target.name, references, restoration))
        row = dict(name="train R=3", R=3, global_batch=4, compile_s=1.0, arguments_gb=1.0, temp_gb=1.0, total_gb=2.0,
                   tflop=1.0, formula_tflop=1.0, bytes_accessed_gb=1.0, roofline_ms=1.0, roofline_samples_per_s=4.0)
        return dict(topology=target.name, devices=4, hbm_gb=16, programs=[row], mesh={"data": 4}, attention="splash",
                    remat="none")

    monkeypatch.setattr(aot, "compile_plan", plan)
    argv = ["aot", f"--config={ROOT / 'configs' / 'demo.py'}", "--topology=v5e-4", "--norestoration"]
    with flagsaver.flagsaver():
        aot.main(flags.FLAGS(argv + ["--references=3", f"--out={tmp_path / 'plan.json'}"]))
    assert asked == [("v5e-4", (3,), False)]
    assert [p["name"] for p in json.loads((tmp_path / "plan.json").read_text())["programs"]] == ["train R=3"]
    with flagsaver.flagsaver(), pytest.raises(SystemExit, match="--references=0,three"):
        aot.main(flags.FLAGS(argv + ["--references=0,three"]))


def test_a_run_cut_short_keeps_the_programs_it_finished(monkeypatch, tmp_path):
    """`--out` is rewritten after every program: when the second one's compiler dies, the first one's row is on
    disk and the command ends in one line naming the program."""
    def plan(cfg, target, references, restoration, on_row=None):
        done = dict(topology=target.name, programs=[dict(name="train R=0")])
        on_row(done)
        raise RuntimeError(f"compiling train R=3 for {target.name}: the compiler's process died")

    monkeypatch.setattr(aot, "compile_plan", plan)
    argv = ["aot", f"--config={ROOT / 'configs' / 'demo.py'}", "--topology=v5e-4", f"--out={tmp_path / 'plan.json'}"]
    with flagsaver.flagsaver(), pytest.raises(SystemExit, match="compiling train R=3 for v5e-4"):
        aot.main(flags.FLAGS(argv))
    assert json.loads((tmp_path / "plan.json").read_text())["programs"] == [dict(name="train R=0")]
    assert not (tmp_path / "plan.json.tmp").exists()


def test_flop_audit_sees_a_frozen_weight_given_a_gradient():
    """The FLOP audit, XLA's count of the trainer's compiled step beside the formula (a LoRA step on a frozen base):
    training LoRA alone skips the frozen weights' gradient matmuls (~2x the linear forward instead of train_base's
    ~3x) and matches the formula; remat's recompute shows. Compiled from abstract shapes on this machine's CPU, the
    demo's concat variant at R = 0, whose side pathways are slight: the transformer's linear layers dominate."""
    cpu = aot.Target("cpu", aot.CHIPS["v5e"], "cpu", 1, "", (1, 1, 1))  # a roofline is not asserted on
    mesh = sharding.make_mesh(1, 1, jax.devices("cpu")[:1])
    rows = {}
    for train_base, remat in [(False, "none"), (True, "none"), (False, "full")]:
        cfg = config.load(f"{ROOT / 'configs' / 'demo.py'}:concat", [
            f"--config.model.train_base={train_base}", f"--config.model.remat={remat}", "--config.train.batch_size=1"])
        [program] = [p for p in aot.programs(aot.without_weights(cfg), mesh, references=(0,), restoration=False)
                     if p.name == "train R=0"]
        rows[train_base, remat] = aot._measure(program, mesh, cpu, kernel_attention=False)
    lora, every, remat = rows[False, "none"], rows[True, "none"], rows[False, "full"]
    assert 0.6 < lora["tflop"] / every["tflop"] < 0.72, rows
    assert 0.9 < lora["tflop"] / lora["formula_tflop"] < 1.15, lora
    assert remat["tflop"] > 1.1 * lora["tflop"], rows
    for row in rows.values():
        assert row["compile_s"] > 0 and row["arguments_gb"] >= 0 and row["total_gb"] >= row["temp_gb"], row


@pytest.mark.parametrize("batch, chips, planned", [(16, 4, 16), (16, 64, 64), (96, 64, 128), (1, 1, 1)])
def test_a_batch_the_slice_cannot_split_is_planned_at_the_next_multiple(batch, chips, planned):
    assert aot.planned_batch(batch, chips) == planned


def test_host_memory_peak_sees_an_allocation_inside_the_block():
    """The sampler reports the block's peak, which a 400 MB array held for 0.5 s raises by about its size."""
    with aot.HostMemoryPeak() as idle:
        time.sleep(0.3)
    with aot.HostMemoryPeak() as busy:
        block = np.ones(400 * 2**20 // 8)
        time.sleep(0.5)
        del block
    assert busy.peak_gb - idle.peak_gb > 0.3, (idle.peak_gb, busy.peak_gb)
