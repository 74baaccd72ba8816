"""`python -m iconface_jax.aot --config configs/iconface_klein4b.py --topology v5e-64 [--out plan.json]
[--references=3 --norestoration]`:
compile the trainer's programs for a TPU slice or an H100 host that is not here.

XLA compiles for accelerators it cannot run on: libtpu (the `tpu` extra) describes any Cloud TPU slice
and the CUDA plugin (`cuda-aot`) an H100 host. From abstract shapes (no weights read or allocated) this
lowers exactly what training compiles: the frozen encoders (`train.jit_encoders`), the trainer's own
`train.jit_train_step` (its mesh, shardings, donation and remat) for each reference count R = 0..3, and the
guided restoration of the sample grids; it prints each program's memory plan per chip, its FLOPs as XLA counts
them beside the transformer's by formula (the FLOP audit, docs/performance.md#cpu-compile-plans-and-flop-audit)
and a roofline, writes them as JSON and exits non-zero, naming the program, when one does not fit the chip's
memory.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # compile-only, before JAX is imported: the CUDA plugin must not look for a GPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import functools
import json
import math
import multiprocessing
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from jax.experimental import topologies

from iconface_jax import config, face_system, sharding, train
from iconface_jax.flops import sampling_flops, train_flops_parts
from iconface_jax.models.attention import CUDNN_DTYPES
from iconface_jax.models.layers import Precision

_TOPOLOGY = flags.DEFINE_string("topology", None, "target: v4-8, v5e-64, v5p-128, v6e-64, ... or h100-1, h100-8")
_OUT = flags.DEFINE_string("out", "", "write the plan as JSON here")
_REFERENCES = flags.DEFINE_list("references", ["0", "1", "2", "3"], "the reference counts R to compile train steps for")
_RESTORATION = flags.DEFINE_bool("restoration", True, "also compile the guided restoration (R = 3)")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published facts about one accelerator chip (per chip, bf16 dense peak)."""
    hbm_gb: float  # GiB of HBM
    peak_tflops: float  # bf16 dense matmul TFLOP/s
    hbm_tb_s: float  # HBM bandwidth, TB/s
    cores_per_name: int  # the slice name counts TensorCores (2 per chip) or chips (1)
    libtpu_name: str  # topology prefix libtpu takes; "" for GPUs
    accelerator_type: str  # TPU_ACCELERATOR_TYPE prefix of a real slice
    single_host_chips: int  # the largest slice on one host; larger ones have 4 chips (2x2x1) per host
    source: str


# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "Chip
# specifications") and NVIDIA's H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s bf16 dense, 80 GB at 3.35 TB/s).
CHIPS = {
    "v4": Chip(32, 275, 1.2, 2, "v4", "v4", 4, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(16, 197, 0.819, 1, "v5e", "v5litepod", 8, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95, 459, 2.765, 2, "v5p", "v5p", 4, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32, 918, 1.64, 1, "v6e", "v6e", 8, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip(79.1, 989, 3.35, 1, "", "", 8, "NVIDIA H100 SXM5 datasheet; 79.1 GiB = device_memory_size"),
}
# The H100 (SXM5, 80 GB HBM3) as the CUDA plugin's compile-only topology takes it: a GpuTargetConfigProto
# of hardware facts (the fields of openxla/xla's target_config/specs; this plugin build rejects
# `collective_memory_granularity`, so it is left out).
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A named slice or host: its chip, chip count, and the topology arguments XLA takes."""
    name: str
    chip: Chip
    platform: str  # "tpu" or "cuda" (the tests' FLOP audit: "cpu", this machine)
    chips: int
    topology: str  # libtpu "v5e:8x8" or CUDA "1x1x8"
    host_bounds: tuple[int, int, int]  # chips per host (TPU)


def _pow2_dims(chips: int, rank: int) -> tuple[int, ...]:
    """A slice's torus shape as Cloud TPU names it: powers of two, as even as they go, ascending with unit
    axes last (8 -> 2x4, 4 -> 2x2x1, 64 -> 4x4x4, 128 -> 4x4x8)."""
    dims = [1] * rank
    axis = 0
    while math.prod(dims) < chips:
        dims[axis % rank] *= 2
        axis += 1
    return tuple(sorted(dims, key=lambda d: (d == 1, d)))


def parse_target(name: str) -> Target:
    """`vXX-N` (Cloud TPU slice names: N counts TensorCores on v4/v5p, chips on v5e/v6e) or `h100-N`."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|h100)-(\d+)", name)
    if not match:
        raise ValueError(f"--topology {name!r}: expected one of {sorted(CHIPS)} followed by -N, e.g. v5e-64, h100-8")
    chip, count = CHIPS[match[1]], int(match[2])
    chips = count // chip.cores_per_name
    if chips < 1 or chips * chip.cores_per_name != count or chips & (chips - 1):
        raise ValueError(f"--topology {name!r}: {count} is not a power-of-two slice of {match[1]}")
    if match[1] == "h100":
        hosts = max(1, chips // 8)
        return Target(name, chip, "cuda", chips, f"1x{hosts}x{chips // hosts}", (1, 1, chips // hosts))
    dims = _pow2_dims(chips, 3 if chip.cores_per_name == 2 else 2)
    bounds = (*dims, 1)[:3] if chips <= chip.single_host_chips else (2, 2, 1)
    return Target(name, chip, "tpu", chips, f"{chip.libtpu_name}:{'x'.join(map(str, dims))}", bounds)


def target_devices(target: Target) -> list:
    """The target's devices as a compile-only topology (all processes' devices: multi-host programs)."""
    if target.platform == "cuda":
        return topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                            topology=target.topology).devices
    # libtpu reads the slice from these at load and warns about each one it cannot determine.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{target.chip.accelerator_type}-{target.chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only uses no chip: others may load it too
    chip_config = "megacore" if target.chip.cores_per_name == 2 else "default"  # one device per chip
    return topologies.get_topology_desc(platform="tpu", topology_name=target.topology, chip_config_name=chip_config,
                                        chips_per_host_bounds=target.host_bounds, num_slices=1).devices


def without_weights(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of the config that reads no weights: random parts of the same shapes (abstract ones in a plan; the
    bench times them)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.model.weights = cfg.model.autoencoder.weights = cfg.model.face_encoder.weights = ""
    cfg.model.text.embeddings = ""
    return cfg


def planned_batch(batch_size: int, chips: int) -> int:
    """The global batch a plan for `chips` takes: the config's when the chips divide it, else the next multiple
    (a slice larger than the batch still gets a plan, at one sample per chip, rather than a refusal)."""
    return -(-batch_size // chips) * chips


@dataclasses.dataclass(frozen=True)
class Program:
    """One of the trainer's programs ready to lower: the jitted function and its abstract arguments, and the
    transformer's (linear, attention) FLOPs per chip by formula (docs/design.md#flops)."""
    name: str
    refs: int | None  # None: the encoders, the same program for every R
    global_batch: int
    fn: Callable
    args: tuple
    formula: tuple[float, float]
    looped: bool = False  # a loop over steps (XLA's cost analysis counts its body once): the roofline uses the formula


def program_names(cfg: ml_collections.ConfigDict, references: tuple[int, ...] = (0, 1, 2, 3),
                  restoration: bool = True) -> list[str]:
    """The names of `programs(cfg, mesh, references, restoration)`, in order, without building them."""
    return ["encode images", "embed faces"] + [f"train R={refs}" for refs in references] + (
        [f"restore {cfg.log.sample_steps} steps"] if restoration else [])


def programs(cfg: ml_collections.ConfigDict, mesh, references: tuple[int, ...] = (0, 1, 2, 3),
             restoration: bool = True) -> list[Program]:
    """The trainer's programs on `mesh` from abstract shapes (`cfg` as `without_weights` gives it): the frozen
    encoders of one image set, `train.jit_encoders` (no transformer: 0 by formula); its step, `train.jit_train_step`,
    for each reference count, by formula a LoRA step on a frozen base for the global batch over the chips; and the
    sample grids' restoration of one face with three references, `train.jit_restore`, by the sampling formula
    (every chip computes it whole)."""
    t, size = cfg.train, cfg.data.resolution
    system = nnx.eval_shape(lambda: face_system.build(cfg))
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    tx = train.make_optimizer(t)
    state = jax.eval_shape(lambda p: train.init_state(p, tx, t, cfg.seed), params)
    step = train.jit_train_step(graphdef, tx, cfg, mesh, state, rest)
    encode, embed = train.jit_encoders(graphdef, cfg, mesh, params, rest)
    image = lambda *lead: jax.ShapeDtypeStruct((*lead, size, size, 3), jnp.float32)
    tokens = jax.eval_shape(encode, params, rest, image(t.batch_size)).shape[1]
    backbone, text_len = system.model.backbone.config, system.prompt.shape[0]
    per_chip = t.batch_size / mesh.size
    names = program_names(cfg, references, restoration)
    out = [Program(name, None, t.batch_size, fn, (params, rest, image(t.batch_size)), (0.0, 0.0))
           for name, fn in zip(names, (encode, embed))]
    out += [Program(name, refs, t.batch_size, step,
                    (state, rest, train.step_spec(cfg, refs, encode, embed, params, rest)),
                    tuple(per_chip * f for f in train_flops_parts(backbone, text_len, (2 + refs) * tokens)))
            for name, refs in zip(names[2:], references)]
    if restoration:
        refs, steps = 3, cfg.log.sample_steps
        out.append(Program(names[-1], refs, 1, train.jit_restore(graphdef, cfg, mesh, params, rest),
                           (params, rest, image(1), image(1, refs), jax.ShapeDtypeStruct((2,), jnp.uint32)),
                           sampling_flops(backbone, text_len, tokens, refs, steps,
                                          cfg.model.iconface.reference_cache), looped=True))
    return out


def compile_plan(cfg, target: Target, references: tuple[int, ...] = (0, 1, 2, 3), restoration: bool = True,
                 on_row: Callable[[dict], None] | None = None) -> dict:
    """Compiles the train step for each reference count and the restoration for `target`, each in a process of
    its own; the plan as `main` writes it, handed to `on_row` after each program."""
    cfg = without_weights(cfg)
    cfg.model.attention = cfg.model.attention or {"tpu": "splash", "cuda": "cudnn"}[target.platform]
    devices = target_devices(target)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
    t = cfg.train
    if (planned := planned_batch(t.batch_size, len(devices))) != t.batch_size:
        print(f"config.train.batch_size={t.batch_size} does not divide the {len(devices)} chips: planning a global "
              f"batch of {planned} (set --config.train.batch_size to choose)", flush=True)
        t.batch_size = planned
    # Splash and cuDNN (bf16/fp16/fp8 only; float32 takes XLA) are custom calls XLA's cost model cannot see.
    dtype = Precision.named(cfg.model.precision).dtype
    kernel_attention = cfg.model.attention == "splash" or (cfg.model.attention == "cudnn" and dtype in CUDNN_DTYPES)
    plan = dict(topology=target.name, devices=len(devices), hbm_gb=target.chip.hbm_gb, programs=[],
                mesh=dict(mesh.shape), attention=cfg.model.attention, remat=cfg.model.remat,
                remat_decoder=cfg.model.autoencoder.remat_decoder, peak_tflops=target.chip.peak_tflops,
                hbm_tb_s=target.chip.hbm_tb_s, source=target.chip.source)
    for index, name in enumerate(program_names(cfg, references, restoration)):
        plan["programs"].append(_measure_apart(cfg, target, index, references, restoration, kernel_attention, name))
        if on_row:
            on_row(plan)
    return plan


def _measure_apart(cfg, target: Target, index: int, references: tuple[int, ...], restoration: bool,
                   kernel_attention: bool, name: str) -> dict:
    """`programs(...)[index]` measured in a fresh process. libtpu keeps what a compile allocated: in one process
    klein-4B's v5e-64 train steps left 12.2 GB resident after the second, so each later program started higher
    (docs/performance.md#compile-time-and-host-memory); a process per program ends each with its memory."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_measure_here, cfg, target.name, index, references, restoration,
                               kernel_attention).result()
        except BrokenProcessPool:
            raise RuntimeError(f"compiling {name} for {target.name}: the compiler's process died (killed for "
                               f"host memory?)") from None


def _measure_here(cfg, target_name: str, index: int, references: tuple[int, ...], restoration: bool,
                  kernel_attention: bool) -> dict:
    """The body of `_measure_apart`'s process: the target's mesh and programs rebuilt, one of them measured."""
    jax.config.update("jax_enable_compilation_cache", False)  # see main
    target = parse_target(target_name)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, target_devices(target))
    return _measure(programs(cfg, mesh, references, restoration)[index], mesh, target, kernel_attention)


def _measure(program: Program, mesh, target: Target, kernel_attention: bool) -> dict:
    """Compiles the program under the mesh; memory per chip as XLA plans it, FLOPs (the attention kernels' by
    formula with `kernel_attention`) and bytes per chip, and the transformer's FLOPs by formula."""
    name, global_batch = program.name, program.global_batch
    print(f"compiling {name} (global batch {global_batch}) for {target.name} ...", flush=True)  # minutes at full size
    start = time.perf_counter()
    # Without a device XLA:GPU cannot autotune its Triton GEMM tilings, and for some float32 dots its default
    # finds none ("Couldn't find output tile sizes"): compile those dots as cuBLAS calls.
    options = {"xla_gpu_enable_triton_gemm": False} if target.platform == "cuda" else {}
    with jax.set_mesh(mesh), HostMemoryPeak() as host:
        lowered = program.fn.lower(*program.args)
        compiled = lowered.compile(options)
    compile_s = time.perf_counter() - start
    memory = memory_plan(compiled)
    cost = _cost(lowered, compiled, target)
    xla_flop = cost.get("flops", 0.0)
    flop = sum(program.formula) if program.looped else xla_flop + (program.formula[1] if kernel_attention else 0.0)
    bytes_accessed = cost.get("bytes accessed", 0.0)
    seconds = max(flop / (target.chip.peak_tflops * 1e12), bytes_accessed / (target.chip.hbm_tb_s * 1e12))
    formula = sum(program.formula)
    print(f"  compiled in {compile_s:.0f} s (host memory peak {host.peak_gb:.1f} GB): {memory['total_gb']} GB per "
          f"chip, {flop / 1e12:.4g} TFLOP ({formula / 1e12:.4g} by formula)", flush=True)
    return dict(name=name, R=program.refs, global_batch=global_batch, compile_s=round(compile_s, 1),
                host_peak_gb=round(host.peak_gb, 2), **memory, tflop=_tera(flop), xla_tflop=_tera(xla_flop),
                formula_tflop=_tera(formula),
                bytes_accessed_gb=round(bytes_accessed / 2**30, 2), roofline_ms=round(seconds * 1e3, 2),
                roofline_samples_per_s=round(global_batch / seconds, 2) if seconds else None)


def _tera(flop: float) -> float:
    """TFLOP to four significant digits (a demo's step is 1e-3 TFLOP, klein-4B's 1e2)."""
    return float(f"{flop / 1e12:.4g}")


def memory_plan(compiled) -> dict[str, float]:
    """A compiled program's memory per chip as XLA plans it, in GiB: arguments, temporaries, and the total
    (arguments + outputs + temporaries - the donated buffers outputs reuse)."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    gb = lambda n: round(n / 2**30, 2)
    return dict(arguments_gb=gb(m.argument_size_in_bytes), temp_gb=gb(m.temp_size_in_bytes), total_gb=gb(total))


class HostMemoryPeak:
    """The process's peak resident memory while the block runs (sampled every 0.1 s from /proc; a compile's
    peak lasts seconds). `ru_maxrss` cannot tell one program from the next: it never falls."""

    def __init__(self):
        self.peak_gb, self._stop = 0.0, threading.Event()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as f:
                self.peak_gb = max(self.peak_gb, int(f.read().split()[1]) * page / 2**30)
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> "HostMemoryPeak":
        if os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()


def _cost(lowered, compiled, target: Target) -> dict:
    """XLA's FLOP and byte counts per chip: the compiled program's own cost analysis, except on GPU (none there),
    where XLA's CPU cost model counts FLOPs on the program as lowered, divided over the chips, since the optimised
    one calls cuBLAS and cuDNN for its dots and convolutions (custom calls it counts as 0 FLOPs), and bytes on
    the optimised per-chip program."""
    if target.platform != "cuda":
        cost = compiled.cost_analysis()
        return cost[0] if isinstance(cost, (list, tuple)) else cost
    from jax._src.lib import xla_client  # the cost model over an HLO module has no public entry point

    def count(module, key: str) -> float:
        return xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module).get(key, 0.0)

    return {"flops": count(lowered.compiler_ir("hlo").get_hlo_module(), "flops") / target.chips,
            "bytes accessed": sum(count(m, "bytes accessed") for m in compiled.runtime_executable().hlo_modules())}


def print_plan(plan: dict, target: Target) -> None:
    """One row per program, then what does not fit."""
    print(f"{plan['topology']}: {plan['devices']} chips, mesh {plan['mesh']}, {plan['hbm_gb']} GB HBM per chip, "
          f"attention {plan['attention']}, remat {plan['remat']}; per chip as XLA plans it; roofline at "
          f"{target.chip.peak_tflops} TFLOP/s and {target.chip.hbm_tb_s} TB/s ({target.chip.source})")
    if target.platform == "cuda":
        print("cuDNN's workspace is not in the memory plan (it is sized on a device); FLOPs by XLA's CPU cost "
              "model on the lowered program over the chips, cuDNN attention by formula")
    print("formula: the transformer's FLOPs per chip (docs/design.md#flops; a train step as a LoRA step on a frozen "
          "base: a frozen weight given a gradient shows as ~1.5x); XLA's count also holds the side pathways, the "
          "VAE decoder and AdaFace of the identity loss; it counts the sampler's loop body once, so a restoration's "
          "TFLOP and roofline are the formula's (its HBM bytes are one step's)")
    print(f"{'program':<20}{'B':>5}{'compile s':>11}{'host GB':>9}{'args GB':>9}{'temp GB':>9}{'total GB':>10}"
          f"{'TFLOP':>9}{'formula':>9}{'HBM GB':>9}{'ms':>9}{'samples/s':>11}")
    for r in plan["programs"]:
        print(f"{r['name']:<20}{r['global_batch']:>5}{r['compile_s']:>11.1f}{r.get('host_peak_gb', 0):>9.1f}"
              f"{r['arguments_gb']:>9.2f}{r['temp_gb']:>9.2f}{r['total_gb']:>10.2f}{r['tflop']:>9.4g}"
              f"{r['formula_tflop']:>9.4g}{r['bytes_accessed_gb']:>9.1f}{r['roofline_ms']:>9.1f}"
              f"{r['roofline_samples_per_s'] or 0:>11.2f}")


def too_big(plan: dict) -> list[str]:
    """The programs that do not fit the chip's HBM, each with its numbers."""
    return [f"{r['name']}: {r['total_gb']} GB per chip (arguments {r['arguments_gb']}, temporaries {r['temp_gb']}) "
            f"> {plan['hbm_gb']} GB HBM on {plan['topology']}"
            for r in plan["programs"] if r["total_gb"] > plan["hbm_gb"]]


def main(argv) -> None:
    del argv
    if not _TOPOLOGY.value:
        sys.exit("--topology is required (e.g. v5e-64, v5p-128, v6e-64, h100-8)")
    target = parse_target(_TOPOLOGY.value)
    try:
        references = tuple(int(r) for r in _REFERENCES.value)
    except ValueError:
        sys.exit(f"--references={','.join(_REFERENCES.value)}: expected reference counts, e.g. 0,3")
    # No persistent compilation cache for compile-only targets: JAX writes their executables but cannot read them
    # back ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable", jax 0.10.2, libtpu
    # 0.0.42), so every entry would be written for nothing.
    jax.config.update("jax_enable_compilation_cache", False)
    def write(plan: dict) -> None:  # after every program: a run cut short keeps the programs it finished
        if _OUT.value:
            with open(_OUT.value + ".tmp", "w") as f:
                json.dump(plan, f, indent=1)
            os.replace(_OUT.value + ".tmp", _OUT.value)

    try:
        plan = compile_plan(flags.FLAGS.config, target, references, _RESTORATION.value, on_row=write)
    except RuntimeError as e:
        sys.exit(str(e))
    write(plan)
    print_plan(plan, target)
    if problems := too_big(plan):
        sys.exit("does not fit:\n  " + "\n  ".join(problems) + "\nshard the frozen weights over more chips "
                 "(--config.mesh.fsdp=N) or rematerialise the blocks (--config.model.remat=full)")


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(config.parse_flags, default="configs/demo.py"))
