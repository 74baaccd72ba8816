"""`python -m iconface_jax.bench`: speed of the FLUX.2 backbone, the full IConFace step and restoration.

Random weights (speed does not depend on values). Each sample is the hybrid sequence (docs/design.md#hybrid-sequence):
text, scene, degraded and R reference segments. Rows per (B, R): (a) backbone forward and LoRA step
(flow-matching loss only), (b) the full IConFace training step (side pathways, identity loss through
the VAE decoder and AdaFace), (c) a guided restoration of one face (wall time with VAE encode and
decode), in full attention and with the reference-token cache. Prints one table (ms/step, samples/s, MFU against a
matmul peak measured in the same run,
(d) compile time, (e) peak device memory) and writes it as JSON.
On CPU the defaults shrink to the tiny preset and small images so the run takes seconds.
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
import numpy as np
import optax
from flax import nnx

from iconface_jax import config, flow, sampling, sequence, text, train
from iconface_jax.flops import measure_peak, model_flops, train_flops
from iconface_jax.models import adaface, flux2, iconface, lora, vae
from iconface_jax.models.layers import Precision
from iconface_jax.face_system import FaceSystem


def _timed(fn, steps: int) -> float:
    """Median seconds per call over `steps` calls (after the caller's warm-up)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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


def bench_shape(model, cfg, batch: int, refs: int, grid: int, text_len: int, steps: int, lora_rank: int):
    """Forward and LoRA train-step rows for one (batch, refs) shape, yielded as each is measured."""
    n_img = grid * grid
    img_ids = sequence.image_segment_ids(grid, grid, refs)
    txt_ids = sequence.text_ids(text_len)
    dtype = model.precision.dtype
    key = jax.random.key(batch * 10 + refs)
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (batch, len(img_ids), cfg.in_channels), dtype)
    ctx = jax.random.normal(k2, (batch, text_len, cfg.joint_attention_dim), dtype)
    eps = jax.random.normal(k3, (batch, n_img, cfg.in_channels), dtype)
    sigma = jnp.full((batch,), 0.5, jnp.float32)

    graphdef, trainable, frozen = nnx.split(model, lora.trainable, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(trainable)

    @jax.jit
    def forward(frozen, trainable, x, ctx):
        return nnx.merge(graphdef, trainable, frozen)(x, ctx, sigma, img_ids, txt_ids)

    train_step = lora_train_step(graphdef, tx, n_img, img_ids, txt_ids)
    lin, att = model_flops(cfg, text_len, len(img_ids))
    start = time.perf_counter()
    forward(frozen, trainable, x, ctx).block_until_ready()
    compile_fwd = time.perf_counter() - start
    t_fwd = _timed(lambda: forward(frozen, trainable, x, ctx), steps)
    yield dict(kind="forward", B=batch, R=refs, tokens=text_len + len(img_ids), ms=t_fwd * 1e3,
               samples_s=batch / t_fwd, flops=batch * (lin + att), compile_s=compile_fwd)
    start = time.perf_counter()
    state = train_step(trainable, opt_state, frozen, x, ctx, eps, sigma)
    jax.block_until_ready(state)
    compile_train = time.perf_counter() - start

    def one_step():
        nonlocal state
        state = train_step(state[0], state[1], frozen, x, ctx, eps, sigma)
        return state
    t_train = _timed(one_step, steps)
    nnx.update(model, state[0])  # the step donated the LoRA arrays the model held
    yield dict(kind=f"train lora r{lora_rank}", B=batch, R=refs, tokens=text_len + len(img_ids),
               ms=t_train * 1e3, samples_s=batch / t_train,
               flops=batch * train_flops(cfg, text_len, len(img_ids)), compile_s=compile_train)


def plan(cfg: flux2.Flux2Config, precision: Precision, batch: int, refs: int, grid: int, text_len: int,
         lora_rank: int, remat: str, attention: str | None, trainable: nnx.filterlib.Filter = lora.trainable) -> dict:
    """Compiles the LoRA train step from abstract shapes (no weights allocated) and returns the compile time,
    XLA's memory plan in GB (arguments, outputs, temporaries, and their sum less donated aliases) and XLA's
    FLOP count of the step beside the formula (docs/design.md#flops; a frozen weight given a gradient would show as
    ~1.5x).
    `trainable` selects what the step updates (the LoRA factors; `nnx.Param` for every weight)."""
    def build():
        model = flux2.build(cfg, precision, attention_backend=attention, remat=remat)
        lora.add_lora(model, lora_rank, float(lora_rank))
        return model
    graphdef, params, frozen = nnx.split(nnx.eval_shape(build), trainable, ...)
    tx = optax.adamw(1e-4)
    img_ids = sequence.image_segment_ids(grid, grid, refs)
    step = lora_train_step(graphdef, tx, grid * grid, img_ids, sequence.text_ids(text_len))
    shape = lambda *s, dtype=precision.dtype: jax.ShapeDtypeStruct(s, dtype)
    args = (params, jax.eval_shape(tx.init, params), frozen, shape(batch, len(img_ids), cfg.in_channels),
            shape(batch, text_len, cfg.joint_attention_dim), shape(batch, grid * grid, cfg.in_channels),
            shape(batch, dtype=jnp.float32))
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    gb = lambda n: round(n / 2**30, 2)
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list per program in older JAX
    return dict(kind=f"plan remat={remat}", B=batch, R=refs, tokens=text_len + len(img_ids), compile_s=compile_s,
                arguments_gb=gb(m.argument_size_in_bytes), outputs_gb=gb(m.output_size_in_bytes),
                temp_gb=gb(m.temp_size_in_bytes), total_gb=gb(total), xla_tflop=cost.get("flops", 0.0) / 1e12,
                formula_tflop=batch * train_flops(cfg, text_len, len(img_ids)) / 1e12)


def face_system(cfg: flux2.Flux2Config, precision: Precision, on_cpu: bool, text_len: int, lora_rank: int,
                attention: str | None) -> FaceSystem:
    """The full IConFace system on random weights: side pathways, VAE and AdaFace (tiny ones on CPU)."""
    backbone = flux2.build(cfg, precision, attention_backend=attention)
    lora.add_lora(backbone, lora_rank, float(lora_rank))
    model = iconface.IConFace(backbone, iconface.IConFaceConfig())
    codec = vae.init(vae.TINY if on_cpu else vae.DEFAULT, dtype=precision.dtype, param_dtype=precision.param_dtype)
    arch = adaface.AdaFaceConfig(units=(1, 1, 1, 1), channels=(8, 8, 16, 16)) if on_cpu else adaface.AdaFaceConfig()
    face = adaface.AdaFace(arch, dtype=precision.dtype, rngs=nnx.Rngs(0))
    return FaceSystem(model, codec, face, *text.random_prompt_embeddings(text_len, cfg.joint_attention_dim))


def bench_full(system: FaceSystem, cfg, batch: int, refs: int, grid: int, text_len: int, steps: int,
               restore_steps: int):
    """(b) the full IConFace training step and (c) a guided restoration, wall time including VAE encode/decode;
    rows yielded as each is measured."""
    stride = vae.token_grid(system.autoencoder.config, 256, 256)
    size = grid * 256 // stride[0]
    key = jax.random.key(batch * 10 + refs + 1)
    images = jax.random.uniform(key, (batch, 2 + refs, size, size, 3), jnp.float32, -1, 1)
    batch_arrays = dict(gt=images[:, 0], deg=images[:, 1], refs=images[:, 2:],
                        num_refs=jnp.full((batch,), refs, jnp.int32))
    t = config.defaults().train  # the paper's recipe (the step keeps no EMA: the state has none)
    graphdef, params, rest = nnx.split(system, iconface.trainable, ...)
    tx = optax.adamw(1e-4)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(0))
    step_fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, t=t), donate_argnums=(0,))
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step_fn(state, rest, batch_arrays))
    compile_s = time.perf_counter() - start

    def one_step():
        nonlocal state
        state, metrics = step_fn(state, rest, batch_arrays)
        return metrics
    t_step = _timed(one_step, steps)
    nnx.update(system, state["params"])  # the step donated the arrays the system held
    n_img = (2 + refs) * grid * grid
    yield dict(kind="train iconface", B=batch, R=refs, tokens=text_len + n_img, ms=t_step * 1e3,
               samples_s=batch / t_step, flops=batch * train_flops(cfg, text_len, n_img), compile_s=compile_s)
    deg, ref_images = images[:1, 1], images[:1, 2:]
    n_scene, n_cond = grid * grid, (1 + refs) * grid * grid
    for cached in (False, True):
        # The cache is a model option; switching it here retraces, the weights stay the same.
        system.model.config = dataclasses.replace(system.model.config, reference_cache=cached)
        run = nnx.jit(functools.partial(sampling.restore_faces, steps=restore_steps, guidance=4.0))
        start = time.perf_counter()
        jax.block_until_ready(run(system, deg, ref_images, jax.random.key(0)))
        compile_s = time.perf_counter() - start
        t_restore = _timed(lambda: run(system, deg, ref_images, jax.random.key(0)), max(1, steps // 2))
        if cached:  # one pass of the conditioning tokens, then steps over text + scene reading their cache
            flops = (sum(model_flops(cfg, 0, n_cond))
                     + restore_steps * 2 * sum(model_flops(cfg, text_len, n_scene, n_cond)))
        else:
            flops = restore_steps * 2 * sum(model_flops(cfg, text_len, n_img))
        yield dict(kind=f"restore {restore_steps} st" + (" cache" if cached else ""), B=1, R=refs,
                   tokens=text_len + n_img, ms=t_restore * 1e3, samples_s=1 / t_restore, flops=flops,
                   compile_s=compile_s)
    system.model.config = dataclasses.replace(system.model.config, reference_cache=False)


def main(argv=None) -> int:
    """Command-line entry point: parses the shape list, runs each shape and prints the table."""
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny" if on_cpu else "klein-base-4b", choices=sorted(flux2.PRESETS))
    p.add_argument("--shapes", default="1x0,2x3" if on_cpu else "4x0,1x3,2x3",
                   help="comma-separated BxR: batch size x reference count")
    p.add_argument("--image-size", type=int, default=128 if on_cpu else 512,
                   help="pixels; the transformer sees (size / 16)^2 tokens per image segment")
    p.add_argument("--text-len", type=int, default=64 if on_cpu else 512)
    p.add_argument("--precision", default="float32" if on_cpu else "bf16", choices=["float32", "bf16"])
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3 if on_cpu else 10)
    p.add_argument("--attention", default=None, help="attention backend: xla, cudnn or splash")
    p.add_argument("--no-full", action="store_true",
                   help="skip (b) the full IConFace step and (c) restoration (VAE + AdaFace + side pathways)")
    p.add_argument("--restore-steps", type=int, default=12)
    p.add_argument("--remat", default="none",
                   help="block remat policy: none, full or save_dots; with --plan a comma-separated list")
    p.add_argument("--plan", action="store_true",
                   help="compile the LoRA step from abstract shapes per --remat policy and print XLA's memory "
                        "plan and compile time instead of timing (no weights allocated: any preset on any machine)")
    p.add_argument("--out", default="bench.json", help="JSON results")
    args = p.parse_args(argv)

    cfg, precision = flux2.PRESETS[args.preset], Precision.named(args.precision)
    shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes.split(",")]
    if args.plan:
        return print_plan(args, cfg, precision, shapes)
    peak = measure_peak(precision.dtype, 1024 if on_cpu else 8192)
    model = flux2.build(cfg, precision, attention_backend=args.attention, remat=args.remat)
    lora.add_lora(model, args.lora_rank, float(args.lora_rank))
    grid = args.image_size // 16
    rows = []
    system = None if args.no_full else face_system(cfg, precision, on_cpu, args.text_len, args.lora_rank,
                                                    args.attention)
    for batch, refs in shapes:
        rows_of_shape = bench_shape(model, cfg, batch, refs, grid, args.text_len, args.steps, args.lora_rank)
        if system is not None:
            full = bench_full(system, cfg, batch, refs, grid, args.text_len, args.steps, args.restore_steps)
            rows_of_shape = itertools.chain(rows_of_shape, full)
        for row in rows_of_shape:  # printed as measured: a run cut short still reports what it finished
            row["mfu"] = row["flops"] / (row["ms"] / 1e3) / peak
            rows.append(row)
            print(f"  {row['kind']:<14} B={batch} R={refs}: {row['ms']:.1f} ms, {row['samples_s']:.2f} samples/s, "
                  f"MFU {row['mfu']:.3f}, compile {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
    result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), preset=args.preset,
                  precision=args.precision, image_size=args.image_size, text_len=args.text_len,
                  peak_tflops=peak / 1e12, peak_memory_gb=peak_memory_gb(), rows=rows)
    print(f"{args.preset} on {result['device']} ({args.precision}); measured matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s; peak memory {result['peak_memory_gb']} GB")
    print_table(rows, [("ms/step", "ms", ".1f"), ("samples/s", "samples_s", ".2f"), ("MFU", "mfu", ".3f"),
                       ("compile s", "compile_s", ".1f")])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Rows as a table: kind, B, R, tokens, then (header, key, format) columns."""
    print(f"{'kind':<22}{'B':>3}{'R':>3}{'tokens':>8}" + "".join(f"{h:>11}" for h, _, _ in columns))
    for r in rows:
        print(f"{r['kind']:<22}{r['B']:>3}{r['R']:>3}{r['tokens']:>8}"
              + "".join(f"{r[k]:>11{fmt}}" for _, k, fmt in columns))


def print_plan(args, cfg: flux2.Flux2Config, precision: Precision, shapes: list[tuple[int, int]]) -> int:
    """`--plan`: compile time and XLA's memory plan of the LoRA step per shape and remat policy."""
    grid = args.image_size // 16
    rows = [plan(cfg, precision, batch, refs, grid, args.text_len, args.lora_rank, remat, args.attention)
            for batch, refs in shapes for remat in args.remat.split(",")]
    print(f"{args.preset} ({args.precision}) on {jax.devices()[0].device_kind}: LoRA step compiled from abstract "
          f"shapes; memory as XLA plans it (GB); FLOPs per step as XLA counts them and by formula")
    print_table(rows, [("compile s", "compile_s", ".1f"), ("args", "arguments_gb", ".2f"), ("temp", "temp_gb", ".2f"),
                       ("total", "total_gb", ".2f"), ("XLA TFLOP", "xla_tflop", ".4g"),
                       ("formula", "formula_tflop", ".4g")])
    with open(args.out, "w") as f:
        json.dump(dict(device=str(jax.devices()[0].device_kind), preset=args.preset, precision=args.precision,
                       image_size=args.image_size, text_len=args.text_len, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
