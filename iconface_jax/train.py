"""`python -m iconface_jax.train --config configs/demo.py [--config.train.steps=100]`: train IConFace.

Reads top to bottom: config -> mesh -> system (model, codec, face encoder, prompts) -> optimizer ->
data -> restore from the workdir if a checkpoint exists -> compile every program -> loop (step, log,
checkpoint, sample grids).
The same config runs on one CPU, one GPU, many GPUs or a TPU pod: every host runs the same command, and
`hosts.init_distributed` joins the processes a Cloud TPU slice, SLURM or Open MPI started (or those that
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` describe).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from iconface_jax import checkpointing, compilation, config, flops, flow, hosts, images, lock, losses, sampling
from iconface_jax import sharding, storage
from iconface_jax import face_system
from iconface_jax.data import latents, pipeline
from iconface_jax.models import iconface
from iconface_jax.models.layers import Precision

SCHEDULE_STEPS = 12  # the paper's sampling steps, which set the dynamic shift that training matches

config.define_flag("config")


def parse_flags(argv: list[str]) -> list[str]:
    """The command line (`--config FILE.py[:ARG]`, default the demo, `--config.a.b=value`; `--help` lists the
    config's fields), and the config validated in full: a bad flag or field exits in one line before anything
    is written to the workdir or compiled."""
    rest = config.parse_flags(argv, default="configs/demo.py")
    try:
        config.validate(flags.FLAGS.config)
    except config.ConfigError as e:
        sys.stderr.write(f"FATAL config error: {e}\n")
        sys.exit(1)
    return rest


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Fails fast, before anything compiles, on a config that cannot run (`config.validate` on these devices)."""
    config.validate(cfg, jax.device_count())


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps,
                                                  max(t.steps, t.warmup_steps + 1))
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.adamw(schedule, weight_decay=t.weight_decay))


def identity_loss_active(batch: dict, t: ml_collections.ConfigDict) -> bool:
    """Whether a step has the identity loss (static: batches are grouped by reference count)."""
    return batch["ref_latents"].shape[1] > 0 and t.lambda_id > 0


def loss_fn(params, rest, graphdef, batch, key, t: ml_collections.ConfigDict, resolution: int):
    """The loss terms [L_fm, L_id] (batch means; L_id only for samples with references) and the metrics, on the
    step's inputs (`step_inputs`: the frozen encoders' tokens and features of `resolution`-pixel faces)."""
    system = nnx.merge(graphdef, params, rest)
    z0, x_deg, x_refs = batch["gt_latents"], batch["deg_latents"], batch["ref_latents"]
    b = z0.shape[0]
    e_id = iconface.identity_anchor(batch["ref_features"], batch.get("deg_features"),
                                    system.model.config.id_temperature)
    grid = face_system.grid_of(resolution, resolution, z0.shape[1])

    k_sigma, k_eps, k_drop = jax.random.split(key, 3)
    # Shift 0: train where the sampler spends its steps, FLUX.2's dynamic shift exp(mu) at this token count.
    shift = t.sigma_shift or math.exp(sampling.empirical_mu(z0.shape[1], SCHEDULE_STEPS))
    sigma = flow.sample_sigma(k_sigma, b, t.sigma_mean, t.sigma_std, shift, t.sigma_law, t.sigma_unshifted_fraction)
    eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
    z = flow.interpolate(z0, eps, sigma)
    dropped = jax.random.bernoulli(k_drop, t.text_dropout, (b,))  # empty prompt: trains the CFG branch
    text_emb = jnp.where(dropped[:, None, None], system.empty[...][None], system.prompt[...][None])
    # Residual dropout: these samples lose W_in's shortcut to the degraded tokens and must read the degraded image,
    # and with it the references, through attention (docs/decisions.md#residual-dropout). Its key is folded off the
    # step's, so that runs without it keep their random streams.
    keep_residual = None
    if t.residual_dropout > 0:
        keep_residual = jax.random.bernoulli(jax.random.fold_in(key, 7), 1 - t.residual_dropout, (b,))
    velocity = system.model(z, x_deg, x_refs, text_emb, sigma, e_id, grid=grid, keep_residual=keep_residual)
    l_fm = flow.loss(velocity, z0, eps)
    l_id = jnp.zeros_like(l_fm)
    if identity_loss_active(batch, t):
        restored = system.decode(flow.estimate_z0(z, velocity, sigma), resolution, resolution)
        l_id = losses.identity_loss(system.embed(restored), e_id, batch["gt_features"], sigma, batch["num_refs"] > 0,
                                    t.lambda_h, t.omega_min)
    terms = jnp.stack([jnp.mean(l_fm), jnp.mean(l_id)])
    return terms, {"loss": terms[0] + t.lambda_id * terms[1], "loss_fm": terms[0], "loss_id": terms[1]}


def jit_encoders(graphdef, cfg: ml_collections.ConfigDict, mesh, params, rest):
    """The frozen encoders as two programs (params, rest, images (B, H, W, 3)) -> the VAE's tokens (B, L, C), and
    -> AdaFace's raw features (B, D), sharded as the step's batch. Apart from the step, each is one program for
    every reference count: inside it, every R's step compiled them again
    (docs/performance.md#compile-time-and-host-memory). `params` and `rest` may be abstract."""
    replicated = NamedSharding(mesh, P())
    shardings = (jax.tree.map(lambda _: replicated, params),
                 sharding.param_shardings(rest, mesh, cfg.mesh.shard_min_size),
                 sharding.batch_sharding(mesh))

    def encode(params, rest, images):
        return nnx.merge(graphdef, params, rest).encode(images)

    def embed(params, rest, images):
        return nnx.merge(graphdef, params, rest).embed(images)
    return tuple(jax.jit(fn, in_shardings=shardings, out_shardings=sharding.batch_sharding(mesh))
                 for fn in (encode, embed))


def step_inputs(batch: dict, encode, embed, params, rest, t: ml_collections.ConfigDict) -> dict:
    """The step's inputs from a batch of images as the pipeline yields it (on the devices): the clean, degraded
    and reference images through `jit_encoders`' programs one image set (B, H, W, 3) at a time. Latents the
    batch brings (`data.latents`) are taken as they are; features only where the step reads them (the degraded
    image's for the anchor when R = 0, the clean image's for the identity loss)."""
    refs = [batch["refs"][:, r] for r in range(batch["refs"].shape[1])]
    tokens, features = (lambda x: encode(params, rest, x)), (lambda x: embed(params, rest, x))

    def stack(arrays: list[jax.Array], like: jax.Array) -> jax.Array:  # (B, R, ...) along the references
        return jnp.stack(arrays, 1) if arrays else like[:, None][:, :0]  # no references: sharded as `like`
    out = dict(gt_latents=batch["gt_latents"] if "gt_latents" in batch else tokens(batch["gt"]),
               deg_latents=tokens(batch["deg"]), num_refs=batch["num_refs"])
    if "ref_latents" in batch:
        out["ref_latents"] = batch["ref_latents"]
    else:
        out["ref_latents"] = stack([tokens(x) for x in refs], out["gt_latents"])
    if refs:
        out["ref_features"] = stack([features(x) for x in refs], None)
    else:  # without references the anchor is the degraded image's
        out["deg_features"] = features(batch["deg"])
        out["ref_features"] = stack([], out["deg_features"])
    if identity_loss_active(out, t):
        out["gt_features"] = features(batch["gt"])
    return out


def train_step(state, rest, batch, *, graphdef, tx, t, resolution: int):
    """One update; a non-finite loss or gradient skips it (state unchanged, flagged in the metrics).

    The gradient is L_fm's plus lambda_id L_id's; with `t.term_grad_norms` both are also computed apart (one
    more backward pass on steps with the identity loss) and their norms logged as grad_norm_fm, grad_norm_id.
    """
    key, sub = jax.random.split(state["key"])
    _, pullback, metrics = jax.vjp(lambda p: loss_fn(p, rest, graphdef, batch, sub, t, resolution), state["params"],
                                   has_aux=True)
    weights = jnp.asarray([1.0, t.lambda_id], jnp.float32)
    if t.term_grad_norms and identity_loss_active(batch, t):
        fm, ident = (pullback(w)[0] for w in jnp.diag(weights))
        grads = jax.tree.map(jnp.add, fm, ident)
        metrics.update(grad_norm_fm=optax.tree.norm(fm), grad_norm_id=optax.tree.norm(ident))
    else:
        grads = pullback(weights)[0]
        if t.term_grad_norms:  # no identity loss in this step: the whole gradient is L_fm's
            metrics.update(grad_norm_fm=optax.tree.norm(grads), grad_norm_id=jnp.zeros((), jnp.float32))
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b_: jnp.where(finite, a, b_), new, old)
    new = dict(params=keep(params, state["params"]), opt_state=keep(opt_state, state["opt_state"]),
               step=state["step"] + 1, key=key)
    if "ema" in state:
        decay = t.ema_decay
        new["ema"] = keep(jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params), state["ema"])
    return new, dict(metrics, finite=finite, grad_norm=optax.tree.norm(grads))


def init_state(params, tx: optax.GradientTransformation, t: ml_collections.ConfigDict, seed: int) -> dict:
    """The training state: trainable parameters, optimizer state, step, key and (with `t.ema_decay`) EMA."""
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(seed))
    if t.ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def jit_train_step(graphdef, tx: optax.GradientTransformation, cfg: ml_collections.ConfigDict, mesh, state, rest):
    """The jitted step (state, rest, `step_inputs`) -> (state, metrics) with its shardings: training state replicated,
    frozen weights as `sharding.param_shardings` places them (the transformer's over fsdp), the batch over data
    and fsdp; the state donated.
    `state` and `rest` may be abstract: `iconface_jax.aot` lowers this same function for other targets.
    Call it under `jax.set_mesh(mesh)` (splash attention runs per chip in a shard_map over that mesh)."""
    replicated = NamedSharding(mesh, P())
    frozen = sharding.param_shardings(rest, mesh, cfg.mesh.shard_min_size)
    state_shardings = jax.tree.map(lambda _: replicated, state)
    step = partial(train_step, graphdef=graphdef, tx=tx, t=cfg.train, resolution=cfg.data.resolution)
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(state_shardings, frozen, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated))


def reference_counts(data_cfg: ml_collections.ConfigDict) -> range:
    """Every reference count R a batch can have: 0 up to the largest that `ref_count_probs` draws (a sample gets
    fewer references than drawn when its identity has fewer other images)."""
    return range(max(r for r, p in enumerate(data_cfg.ref_count_probs) if p > 0) + 1)


def step_spec(cfg: ml_collections.ConfigDict, refs: int, encode, embed, params, rest) -> dict:
    """The abstract `step_inputs` of a batch with `refs` references (`encode`, `embed` from `jit_encoders`)."""
    return jax.eval_shape(lambda batch: step_inputs(batch, encode, embed, params, rest, cfg.train),
                          batch_spec(cfg, refs))


def batch_spec(cfg: ml_collections.ConfigDict, refs: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract global batch with `refs` references, as `pipeline.make_iterator` yields it."""
    b, size = cfg.train.batch_size, cfg.data.resolution
    spec = dict(gt=(b, size, size, 3), deg=(b, size, size, 3), refs=(b, refs, size, size, 3))
    if cfg.data.latents:
        tokens = tuple(latents.LatentStore(cfg.data.latents).meta["token_shape"])
        spec.update(gt_latents=(b, *tokens), ref_latents=(b, refs, *tokens))
    return dict({k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in spec.items()},
                num_refs=jax.ShapeDtypeStruct((b,), jnp.int32))


def jit_restore(graphdef, cfg: ml_collections.ConfigDict, mesh, params, rest):
    """The sample grids' guided restoration (params, rest, degraded, references, key) -> faces, one program on the
    trainer's mesh and weight shardings. `params` and `rest` may be abstract: `iconface_jax.aot` lowers it too."""
    replicated = NamedSharding(mesh, P())
    frozen = sharding.param_shardings(rest, mesh, cfg.mesh.shard_min_size)

    def run(params, rest, degraded, references, key):
        return sampling.restore_faces(nnx.merge(graphdef, params, rest), degraded, references, key,
                                      steps=cfg.log.sample_steps, guidance=cfg.log.guidance)
    return jax.jit(run, in_shardings=(jax.tree.map(lambda _: replicated, params), frozen, replicated, replicated,
                                      replicated), out_shardings=replicated)


def sample_grid(restorations: dict, weights, rest, preview: dict[str, jax.Array]) -> np.ndarray:
    """Rows of degraded | first reference | restored without references | restored with them | ground truth, by
    the compiled `restorations["sample grid R=r"]`. Every process calls it (the weights may be sharded across
    processes) with the same `preview` (`preview_batch`, replicated, and its key)."""
    deg, refs, gt, key = (preview[k] for k in ("deg", "refs", "gt", "key"))
    without = restorations["sample grid R=0"](weights, rest, deg, refs[:, :0], key)
    with_refs = restorations[f"sample grid R={refs.shape[1]}"](weights, rest, deg, refs, key)
    cols = [deg, refs[:, 0], without, with_refs, gt]
    grid = jnp.concatenate([jnp.concatenate(list(c), axis=0) for c in cols], axis=1)
    return multihost_utils.process_allgather((grid + 1) * 127.5, tiled=True).clip(0, 255).astype(np.uint8)


def preview_batch(cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A fixed batch with references for the sample grids: from held-out data where the source has it
    (`pipeline.validation_config`), else from the training records under another seed."""
    data_cfg = pipeline.validation_config(cfg.data)
    if data_cfg is None:
        print(f"sample grids show training images (data.source {cfg.data.source!r} has no validation split "
              "configured)", flush=True)
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
    # One reference per sample, whatever the training protocol draws (a run may train without references).
    data_cfg.num_workers, data_cfg.latents, data_cfg.ref_count_probs = 0, "", (0.0, 1.0)
    it = pipeline.make_iterator(data_cfg, global_batch_size=cfg.log.sample_count, seed=cfg.seed + 1,
                                process_index=0, process_count=1)
    for _ in range(100):  # targets without a usable reference fill batches of their own
        batch = next(it)
        if batch["refs"].shape[1] > 0:
            return batch
    raise RuntimeError("no preview batch with references in 100 draws: too few identities have a second image")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    cfg = flags.FLAGS.config
    launch = hosts.init_distributed()
    if launch:
        print(f"process {jax.process_index()} of {jax.process_count()} ({launch} launch)", flush=True)
    validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    jax.set_mesh(mesh)  # the context of every program this run compiles (splash attention shards over it)
    t, log = cfg.train, cfg.log
    workdir = storage.path(cfg.workdir)  # local or gs://: every host of a pod writes its checkpoints there
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only disk, a file in the way, a bucket without write access
        sys.exit(f"config.workdir {cfg.workdir}: cannot be created or written ({e.strerror or e})")
    is_chief = jax.process_index() == 0
    checkpoints = checkpointing.Checkpoints(cfg.workdir, keep=log.keep)
    claim_workdir(cfg, checkpoints)
    # Programs an earlier start of this run compiled are read from here, not compiled again.
    print(f"compilation cache: {compilation.enable(cfg.compile_cache) or 'off'}", flush=True)

    # Converted weights are read straight into their fsdp shardings; random ones are placed after the split.
    system = face_system.build(cfg, partial(sharding.param_sharding, mesh=mesh, min_size=cfg.mesh.shard_min_size))
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    rest = sharding.shard_params(rest, mesh, cfg.mesh.shard_min_size)
    params = sharding.replicate(params, mesh)
    tx = make_optimizer(t)
    state = init_state(params, tx, t, cfg.seed)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    frozen_mib = sum(x.nbytes for x in jax.tree.leaves(rest)) / 2**20
    per_device_mib = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                         for x in jax.tree.leaves(rest)) / 2**20

    data = pipeline.make_iterator(cfg.data, global_batch_size=t.batch_size, seed=cfg.seed)
    start_step = 0
    if checkpoints.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        try:
            start_step, state, data_state = checkpoints.restore(abstract)
        except checkpointing.CheckpointError as e:
            sys.exit(str(e))
        data.set_state(data_state)
        print(f"resumed from step {start_step} in {cfg.workdir}", flush=True)
    if is_chief:  # what `python -m iconface_jax.restore --checkpoint WORKDIR` rebuilds the model from; written only
        # now that the checkpoint it describes has read, so that a failed start leaves the workdir's record as it was
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))

    step_fn = jit_train_step(graphdef, tx, cfg, mesh, state, rest)
    encode_fn, embed_fn = jit_encoders(graphdef, cfg, mesh, params, rest)
    restore_fn = jit_restore(graphdef, cfg, mesh, params, rest)
    preview = preview_batch(cfg)  # on every process: all of them compute the sample grids
    preview = sharding.replicate(dict({k: preview[k][:log.sample_count] for k in ("deg", "refs", "gt")},
                                      key=jax.random.PRNGKey(cfg.seed)), mesh)
    # Every program the run can need, compiled now (in parallel) rather than when a batch first needs it: no host
    # of a pod stalls mid-run on a compile, and a restart reads them all from the compilation cache.
    weights = state.get("ema", state["params"])
    images_spec = batch_spec(cfg, 0)["gt"]
    programs = compilation.compile_all(
        {"encode images": partial(encode_fn.lower, params, rest, images_spec),
         "embed faces": partial(embed_fn.lower, params, rest, images_spec)}
        | {f"train step R={r}": partial(step_fn.lower, state, rest,
                                        step_spec(cfg, r, encode_fn, embed_fn, params, rest))
           for r in reference_counts(cfg.data)}
        | {f"sample grid R={r}": partial(restore_fn.lower, weights, rest, preview["deg"], preview["refs"][:, :r],
                                         preview["key"]) for r in (0, preview["refs"].shape[1])})
    hosts.wait_for_all("iconface_jax programs compiled")
    writer = metrics_file = None
    if is_chief:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.fspath(workdir / "tensorboard"))  # gs:// through google-cloud-storage
        metrics_file = storage.open_append(workdir / "metrics.jsonl")
    print(f"training {n_params:,} parameters on {jax.device_count()} device(s), mesh {dict(mesh.shape)}, "
          f"steps {start_step}..{t.steps}; frozen weights {frozen_mib:.2f} MiB, {per_device_mib:.2f} MiB per device",
          flush=True)

    stop = {"signal": None}
    if not jax.distributed.is_initialized():
        # Several processes must stop at one step (the checkpoint save is collective): there JAX's preemption
        # sync manager keeps SIGTERM and `checkpoints.reached_preemption` names the step all processes agreed on.
        def stop_on(signum, frame):
            if stop["signal"] == signum == signal.SIGINT:  # a second Ctrl-C: now, without a checkpoint
                raise KeyboardInterrupt
            stop.update(signal=signum)
        signal.signal(signal.SIGTERM, stop_on)
        signal.signal(signal.SIGINT, stop_on)
    peak = flops.measure_peak(Precision.named(cfg.model.precision).dtype, 512)
    bb = system.model.backbone.config
    tokens_per_image = _tokens_per_image(system, (cfg.data.resolution, cfg.data.resolution))
    nonfinite, window_start, window_steps, window_flops = 0, time.perf_counter(), 0, 0.0
    # Device batches are prepared on a thread ahead of use, each with the data state after it, so a
    # checkpoint records exactly the batches training consumed however far the prefetch has run.
    batches = sharding.prefetch_to_device(
        (({k: v for k, v in host.items() if not k.startswith("_")}, data.get_state()) for host in data),
        mesh, cfg.data.device_prefetch)
    step, done = start_step, None
    while True:
        running = None
        if step < t.steps and not stop["signal"]:
            batch, data_state = next(batches)
            batch = step_inputs(batch, programs["encode images"], programs["embed faces"], state["params"], rest, t)
            state, metrics = programs[f"train step R={batch['ref_latents'].shape[1]}"](state, rest, batch)
            step += 1
            running = (step, metrics, batch["ref_latents"].shape[1])
        if done is not None:
            # The previous step's results are read only now that this step is queued behind it: waiting
            # for them never leaves the device idle while the host loads, logs or dispatches.
            done_step, done_metrics, done_refs = done
            window_steps += 1
            window_flops += t.batch_size * flops.train_flops(bb, system.prompt.shape[0],
                                                             (2 + done_refs) * tokens_per_image)
            if not bool(done_metrics["finite"]):
                nonfinite += 1
                print(f"step {done_step}: non-finite loss or gradient, update skipped ({nonfinite} in a row)",
                      flush=True)
                if nonfinite >= t.max_nonfinite:
                    if metrics_file is not None:
                        metrics_file.close()  # in a bucket, this writes the rows the message points to
                    sys.exit(f"stopping at step {done_step}: {nonfinite} non-finite steps in a row "
                             f"(last loss {float(done_metrics['loss'])}); see {cfg.workdir}/metrics.jsonl")
            else:
                nonfinite = 0
            if done_step % log.every == 0 or done_step == t.steps:
                elapsed = time.perf_counter() - window_start
                row = {k: float(v) for k, v in done_metrics.items()}
                row.update(step=done_step, samples_s=t.batch_size * window_steps / elapsed,
                           mfu=window_flops / elapsed / peak / jax.device_count(),
                           eta_min=(t.steps - done_step) * elapsed / window_steps / 60, refs=done_refs)
                write_row(row, t.steps, writer, metrics_file)
                window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
        if running is None:
            break
        done = running
        if step == t.stop_at:
            stop["signal"] = "stop_at"
        if checkpoints.reached_preemption(step):
            stop["signal"] = "preemption"
        save = step % log.checkpoint_every == 0 or step == t.steps or stop["signal"]
        sample = step % log.sample_every == 0 or step == t.steps
        if save or sample:
            # Checkpoints and sample grids do not count against training throughput, but the step itself does:
            # it runs to its end before the pause is timed (else its time went uncounted: 16,000 samples/s).
            jax.block_until_ready(state)
            paused = time.perf_counter()
            if save:
                try:
                    checkpoints.save(step, state, data_state, force=True)
                except checkpointing.CheckpointError as e:
                    sys.exit(str(e))
            if sample:
                grid = sample_grid(programs, state.get("ema", state["params"]), rest, preview)
                if is_chief:
                    writer.add_image("samples", grid, step, dataformats="HWC")
                    images.write_png(workdir / f"samples_{step:06d}.png", grid)
            window_start += time.perf_counter() - paused
    batches.close()
    if stop["signal"]:
        reason = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", "preemption": "SIGTERM (agreed by all processes)"
                  }.get(stop["signal"], f"train.stop_at={t.stop_at}")
        print(f"{reason} at step {step}: checkpoint saved, exiting", flush=True)
    try:
        checkpoints.close()
    except checkpointing.CheckpointError as e:
        sys.exit(str(e))
    if is_chief:
        writer.close()
        metrics_file.close()
    if stop["signal"] in (signal.SIGTERM, signal.SIGINT, "preemption"):
        # Stopped, not finished: a scheduler that requeues on 128 + the signal (SLURM, a Kubernetes Job) starts it
        # again, to resume; train.stop_at is a deliberate stop and exits 0.
        sys.exit(128 + (signal.SIGTERM if stop["signal"] == "preemption" else stop["signal"]))


def claim_workdir(cfg: ml_collections.ConfigDict, checkpoints: checkpointing.Checkpoints) -> None:
    """Before the workdir is written to: the chief takes its lock (iconface_jax/lock.py), removes what dead saves
    left, and refuses a config whose model differs from the one the checkpoints were trained with (the workdir's
    config.json), naming each field. Every process exits, in one line, when the chief refuses."""
    refusal = ""
    if jax.process_index() == 0:
        try:
            took_over = lock.WorkdirLock(cfg.workdir).acquire()
        except lock.LockHeld as e:
            refusal = str(e)
        else:
            if took_over:
                print(took_over, flush=True)
            removed = checkpoints.remove_partial_saves()
            if removed:
                print(f"removed partial saves of a run that died saving: {', '.join(removed)}", flush=True)
            stored = storage.path(cfg.workdir) / "config.json"
            if checkpoints.latest_step() is not None and stored.exists():
                conflicts = checkpointing.config_conflicts(json.loads(stored.read_text()),
                                                           json.loads(cfg.to_json_best_effort()))
                if conflicts:
                    refusal = (f"{stored}: its checkpoints hold another model than the config given: "
                               f"{'; '.join(conflicts)}; give the stored values, or another workdir")
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(bool(refusal))):
        refusal = refusal or "the chief (process 0) refused this workdir; its log says why"
    if refusal:
        sys.exit(refusal)


def write_row(row: dict, steps: int, writer, metrics_file) -> None:
    """Prints one log row; the chief (which holds `writer` and `metrics_file`) also writes it to
    metrics.jsonl and TensorBoard."""
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    grads = f"  |grad| fm {row['grad_norm_fm']:.3g} id {row['grad_norm_id']:.3g}" if "grad_norm_id" in row else ""
    print(f"{prefix}step {row['step']}/{steps}  loss {row['loss']:.4f} (fm {row['loss_fm']:.4f}, id "
          f"{row['loss_id']:.4f}){grads}  {row['samples_s']:.1f} samples/s  MFU {row['mfu']:.3f}  "
          f"ETA {row['eta_min']:.1f} min", flush=True)
    if metrics_file is not None:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for k in ("loss", "loss_fm", "loss_id", "grad_norm", "grad_norm_fm", "grad_norm_id", "samples_s", "mfu"):
            if k in row:
                writer.add_scalar(f"train/{k}", row[k], row["step"])


def _tokens_per_image(system: face_system.FaceSystem, hw: tuple[int, int]) -> int:
    probe = jax.eval_shape(system.encode, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
    return probe.shape[1]


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
