"""`python -m iconface_jax.bench [--config FILE.py[:ARG]] [--config.a.b=value ...] [--shapes 4x0,1x3,2x3]`: speed of
the FLUX.2 backbone, the trainer's IConFace step and restoration.

The system is the trainer's, `face_system.build` of a training config (default configs/demo.py: minutes on two CPU
cores, mostly compiles; configs/iconface_klein4b.py is the paper's setup), on random weights whatever weights the
config names (speed does not depend on values). Rows per shape BxR (batch x reference count), on the first device:
(a) the system's backbone: its forward and a LoRA step with the flow-matching loss only, the like-for-like
    comparison with the PyTorch anchor (diffusers + peft) when the LoRA targets are the anchor's
    (--config.model.lora.targets=attention);
(b) the trainer's own step, `train.jit_train_step` (side pathways, the identity loss through the decoder and
    AdaFace, EMA as configured) at batch B;
(c) the sample grids' guided restoration of one face, `train.jit_restore` (wall time with encode and decode), in
    full attention and with the reference-token cache.
Prints one table (ms/step, samples/s, MFU against a matmul peak measured in the same run, compile s: the first
call) with the peak device memory, and writes it as JSON.

Earlier releases' flags are config fields now (what they timed on a GPU by default: --config
configs/iconface_klein4b.py --config.model.lora.targets=attention):
  --preset P       --config.model.backbone.preset=P     --precision P    --config.model.precision=P
  --image-size N   --config.data.resolution=N            --attention A    --config.model.attention=A
  --text-len N     --config.model.text.length=N          --remat R        --config.model.remat=R
  --lora-rank N    --config.model.lora.rank=N and --config.model.lora.alpha=N (the flag set both)
`--restore-steps N` sets --config.log.sample_steps. `--plan` is `python -m iconface_jax.aot`: compile-only plans
of the trainer's programs with XLA's FLOP count beside the formula.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from iconface_jax import aot, config, face_system, flow, sequence, sharding, train
from iconface_jax.flops import measure_peak, model_flops, sampling_flops, train_flops
from iconface_jax.models import lora
from iconface_jax.models.layers import Precision

# The flags of earlier releases and what replaced them.
REPLACED = {f"--{flag}": f"--config.{field}=VALUE" for flag, field in [
    ("preset", "model.backbone.preset"), ("image-size", "data.resolution"), ("text-len", "model.text.length"),
    ("precision", "model.precision"), ("attention", "model.attention"), ("remat", "model.remat"),
    ("lora-rank", "model.lora.rank")]} | {"--plan": "python -m iconface_jax.aot (compile-only plans)"}


def _timed(fn, steps: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles; median seconds per call over `steps` more calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def _row(kind: str, batch: int, refs: int, tokens: int, timing: tuple[float, float], flops: float) -> dict:
    """One table row from `_timed`'s (compile, step) seconds and the step's model FLOPs."""
    compile_s, seconds = timing
    return dict(kind=kind, B=batch, R=refs, tokens=tokens, ms=seconds * 1e3, samples_s=batch / seconds, flops=flops,
                compile_s=compile_s)


def peak_memory_gb() -> float | None:
    """Peak bytes in use on the first device, where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**30, 2) if "peak_bytes_in_use" in stats else None


def lora_train_step(graphdef, tx: optax.GradientTransformation, n_img: int, img_ids, txt_ids):
    """The jitted LoRA step (flow-matching loss on the first `n_img` image tokens, a frozen base):
    (trainable, opt_state, frozen, x, ctx, eps, sigma) -> (trainable, opt_state, loss)."""
    def loss_fn(trainable, frozen, x, ctx, eps, sigma):
        z = x.at[:, :n_img].set(flow.interpolate(x[:, :n_img], eps, sigma))
        velocity = nnx.merge(graphdef, trainable, frozen)(z, ctx, sigma, img_ids, txt_ids)[:, :n_img]
        return jnp.mean(flow.loss(velocity, x[:, :n_img], eps))

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as the trainer: updated in place
    def train_step(trainable, opt_state, frozen, x, ctx, eps, sigma):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, ctx, eps, sigma)  # none for frozen
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss
    return train_step


def bench_backbone(model, lora_rank: int, batch: int, refs: int, grid: tuple[int, int], text_len: int, steps: int):
    """(a) forward and LoRA train-step rows of the backbone for one (batch, refs) shape, yielded as measured."""
    cfg, n_img = model.config, grid[0] * grid[1]
    img_ids = sequence.image_segment_ids(*grid, refs)
    txt_ids = sequence.text_ids(text_len)
    dtype, tokens = model.precision.dtype, text_len + len(img_ids)
    k1, k2, k3 = jax.random.split(jax.random.key(batch * 10 + refs), 3)
    x = jax.random.normal(k1, (batch, len(img_ids), cfg.in_channels), dtype)
    ctx = jax.random.normal(k2, (batch, text_len, cfg.joint_attention_dim), dtype)
    eps = jax.random.normal(k3, (batch, n_img, cfg.in_channels), dtype)
    sigma = jnp.full((batch,), 0.5, jnp.float32)

    graphdef, trainable, frozen = nnx.split(model, lora.trainable, ...)
    tx = optax.adamw(1e-4)
    state = (trainable, tx.init(trainable))

    @jax.jit
    def forward(frozen, trainable, x, ctx):
        return nnx.merge(graphdef, trainable, frozen)(x, ctx, sigma, img_ids, txt_ids)

    lin, att = model_flops(cfg, text_len, len(img_ids))
    timing = _timed(lambda: forward(frozen, state[0], x, ctx), steps)
    yield _row("forward", batch, refs, tokens, timing, batch * (lin + att))
    train_step = lora_train_step(graphdef, tx, n_img, img_ids, txt_ids)

    def one_step():
        nonlocal state
        state = train_step(*state[:2], frozen, x, ctx, eps, sigma)
        return state
    timing = _timed(one_step, steps)
    nnx.update(model, state[0])  # the step donated the LoRA arrays the model held
    yield _row(f"train lora r{lora_rank}", batch, refs, tokens, timing,
               batch * train_flops(cfg, text_len, len(img_ids)))


def random_batch(spec: dict[str, jax.ShapeDtypeStruct], refs: int, key: jax.Array) -> dict[str, jax.Array]:
    """A batch of `train.batch_spec`'s shapes: images (and any latents) uniform in [-1, 1], `refs` references each."""
    arrays = {k: s for k, s in spec.items() if k != "num_refs"}
    batch = {k: jax.random.uniform(k_, s.shape, s.dtype, -1, 1)
             for (k, s), k_ in zip(arrays.items(), jax.random.split(key, len(arrays)))}
    return batch | {"num_refs": jnp.full(spec["num_refs"].shape, refs, spec["num_refs"].dtype)}


def bench_full(system: face_system.FaceSystem, cfg: ml_collections.ConfigDict, mesh, batch: int, refs: int,
               tokens: int, steps: int):
    """(b) the trainer's step at batch `batch` and (c) the sample grids' restoration of one face, without and with
    the reference cache; rows yielded as each is measured."""
    cfg = cfg.copy_and_resolve_references()  # with this shape's batch size
    cfg.train.batch_size = batch
    bb, text_len = system.model.backbone.config, system.prompt.shape[0]
    n_img = (2 + refs) * tokens
    trainable = face_system.trainable_filter(cfg)
    graphdef, params, rest = nnx.split(system, trainable, ...)
    tx = train.make_optimizer(cfg.train)
    state = train.init_state(params, tx, cfg.train, cfg.seed)
    step_fn = train.jit_train_step(graphdef, tx, cfg, mesh, state, rest)
    encode, embed = train.jit_encoders(graphdef, cfg, mesh, params, rest)
    arrays = random_batch(train.batch_spec(cfg, refs), refs, jax.random.key(batch * 10 + refs + 1))

    def one_step():  # as the trainer runs it: the frozen encoders' programs, then the step
        nonlocal state
        inputs = train.step_inputs(arrays, encode, embed, state["params"], rest, cfg.train)
        state, metrics = step_fn(state, rest, inputs)
        return metrics
    timing = _timed(one_step, steps)
    nnx.update(system, state["params"])  # the step donated the arrays the system held
    yield _row("train iconface", batch, refs, text_len + n_img, timing, batch * train_flops(bb, text_len, n_img))

    deg, ref_images = arrays["deg"][:1], arrays["refs"][:1]
    key, configured, sample_steps = jax.random.PRNGKey(0), system.model.config, cfg.log.sample_steps
    for cached in (False, True):
        # The cache is a model option (static, in the graphdef): switching it recompiles, the weights stay the same.
        system.model.config = dataclasses.replace(configured, reference_cache=cached)
        graphdef, params, rest = nnx.split(system, trainable, ...)
        run = train.jit_restore(graphdef, cfg, mesh, params, rest)
        timing = _timed(lambda: run(params, rest, deg, ref_images, key), max(1, steps // 2))
        yield _row(f"restore {sample_steps} st" + (" cache" if cached else ""), 1, refs, text_len + n_img, timing,
                   sum(sampling_flops(bb, text_len, tokens, refs, sample_steps, cached)))
    system.model.config = configured


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """The command line: bench's own flags and the training config with its `--config.a.b=value` overrides, on
    random weights and validated (a bad flag or field exits in one line)."""
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(prog="python -m iconface_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py",
                   help="training config FILE.py[:ARG]; set a field with --config.a.b=value")
    p.add_argument("--shapes", default="1x0,2x3" if on_cpu else "4x0,1x3,2x3",
                   help="comma-separated BxR: batch size x reference count")
    p.add_argument("--steps", type=int, default=3 if on_cpu else 10, help="timed calls per row after the first")
    p.add_argument("--no-full", action="store_true",
                   help="skip (b) the trainer's step and (c) restoration (codec, AdaFace, side pathways)")
    p.add_argument("--restore-steps", type=int, default=None,
                   help="sampling steps of (c), --config.log.sample_steps (default: the config's)")
    p.add_argument("--out", default="bench.json", help="JSON results")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag in REPLACED:
            p.error(f"{flag} is gone: {REPLACED[flag]}")
        if not arg.startswith("--config."):
            p.error(f"unrecognized argument {arg!r} (config fields are set as --config.a.b=value)")
        overrides.append(arg)
    args.overrides = overrides
    try:
        shapes = [tuple(int(v) for v in shape.lower().split("x", 1)) for shape in args.shapes.split(",")]
    except ValueError:
        p.error(f"--shapes {args.shapes}: expected comma-separated BxR, e.g. 4x0,1x3")
    args.shapes = shapes
    try:
        cfg = aot.without_weights(config.load(args.config, overrides))
        if args.restore_steps is not None:
            cfg.log.sample_steps = args.restore_steps
        config.validate(cfg)
    except config.ConfigError as e:
        p.error(str(e))
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: builds the system, runs each shape and prints the table."""
    args, cfg = parse_args(argv)
    peak = measure_peak(Precision.named(cfg.model.precision).dtype, 1024 if jax.default_backend() == "cpu" else 8192)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])  # the trainer's programs, on one device
    system = face_system.build(cfg)
    size, text_len = cfg.data.resolution, system.prompt.shape[0]
    tokens = jax.eval_shape(system.encode, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[1]
    grid = face_system.grid_of(size, size, tokens)
    rows = []
    with jax.set_mesh(mesh):  # splash attention runs per chip in a shard_map over the trainer's mesh
        for batch, refs in args.shapes:
            rows_of_shape = bench_backbone(system.model.backbone, cfg.model.lora.rank, batch, refs, grid, text_len,
                                           args.steps)
            if not args.no_full:
                rows_of_shape = itertools.chain(rows_of_shape,
                                                bench_full(system, cfg, mesh, batch, refs, tokens, args.steps))
            for row in rows_of_shape:  # printed as measured: a run cut short still reports what it finished
                row["mfu"] = row["flops"] / (row["ms"] / 1e3) / peak
                rows.append(row)
                print(f"  {row['kind']:<14} B={batch} R={refs}: {row['ms']:.1f} ms, {row['samples_s']:.2f} "
                      f"samples/s, MFU {row['mfu']:.3f}, compile {row['compile_s']:.1f} s", file=sys.stderr,
                      flush=True)
    result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), config=args.config,
                  overrides=args.overrides, preset=cfg.model.backbone.preset, precision=cfg.model.precision,
                  lora_targets=cfg.model.lora.targets, image_size=size, text_len=text_len, peak_tflops=peak / 1e12,
                  peak_memory_gb=peak_memory_gb(), rows=rows)
    print(f"{args.config} ({result['preset']} backbone, {size} px, text {text_len}) on {result['device']} "
          f"({cfg.model.precision}); measured matmul peak {peak / 1e12:.2f} TFLOP/s; peak memory "
          f"{result['peak_memory_gb']} GB")
    print(f"{'kind':<22}{'B':>3}{'R':>3}{'tokens':>8}{'ms/step':>11}{'samples/s':>11}{'MFU':>11}{'compile s':>11}")
    for r in rows:
        print(f"{r['kind']:<22}{r['B']:>3}{r['R']:>3}{r['tokens']:>8}{r['ms']:>11.1f}{r['samples_s']:>11.2f}"
              f"{r['mfu']:>11.3f}{r['compile_s']:>11.1f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
