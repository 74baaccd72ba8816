"""The training step on tiny systems: per-term gradient norms, the identity loss's gradient (finite differences,
every trainable group), the non-finite guard, the EMA, text and residual dropout, and AdamW's schedule by hand."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import demo_config, paper_overrides, step_inputs
from iconface_jax import face_system, sharding
from iconface_jax import train
from iconface_jax.models import iconface


def batch(refs: int, size: int = 16, b: int = 2):
    rng = np.random.default_rng(refs)
    images = jnp.asarray(rng.uniform(-1, 1, (b, 2 + refs, size, size, 3)), jnp.float32)
    return dict(gt=images[:, 0], deg=images[:, 1], refs=images[:, 2:], num_refs=jnp.full((b,), refs, jnp.int32))


def name_of(path) -> str:
    """The dotted parameter name of a state leaf's tree path."""
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def flat(tree) -> dict[str, np.ndarray]:
    return {name_of(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_term_gradient_norms_are_those_of_each_term():
    """grad_norm_fm and grad_norm_id equal the norms of jax.grad of L_fm and of lambda_id L_id taken apart, and
    the update is the same with and without computing them."""
    cfg = demo_config("--config.data.resolution=16", "--config.train.lambda_id=0.5",
                      "--config.train.term_grad_norms=True")
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    t, x, key = cfg.train, step_inputs(cfg, graphdef, params, rest, batch(1)), jax.random.key(3)
    tx = optax.sgd(0.1)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=key)

    sub = jax.random.split(key)[1]  # the step's own split of the state key
    # Both terms' gradients in one program: the Jacobian of [L_fm, L_id], one row per term.
    jac = jax.jit(jax.jacrev(lambda p: train.loss_fn(p, rest, graphdef, x, sub, t, 16)[0]))(params)
    want_fm = optax.tree.norm(jax.tree.map(lambda g: g[0], jac))
    want_id = optax.tree.norm(jax.tree.map(lambda g: t.lambda_id * g[1], jac))

    new, metrics = jax.jit(lambda s: train.train_step(s, rest, x, graphdef=graphdef, tx=tx, t=t, resolution=16))(state)
    np.testing.assert_allclose(float(metrics["grad_norm_fm"]), float(want_fm), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm_id"]), float(want_id), rtol=1e-5)
    assert float(metrics["grad_norm_id"]) > 0

    t_off = cfg.train.copy_and_resolve_references()
    t_off.term_grad_norms = False
    plain, plain_metrics = jax.jit(lambda s: train.train_step(s, rest, x, graphdef=graphdef, tx=tx, t=t_off,
                                                                         resolution=16))(state)
    assert "grad_norm_id" not in plain_metrics
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(plain["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_step_inputs_are_each_image_set_through_the_trainers_encoder_programs():
    """`train.step_inputs` over `train.jit_encoders`' programs (one image set at a time, sharded as the trainer runs
    them) gives the tokens and features of the whole batch encoded at once, reference r in slot r; without
    references the anchor's features are the degraded image's, and the identity loss's clean features are there
    only when the step reads them."""
    cfg = demo_config("--config.data.resolution=16", "--config.train.lambda_id=0.5")
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    encode, embed = train.jit_encoders(graphdef, cfg, mesh, params, rest)
    close = lambda got, want: np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with jax.set_mesh(mesh):
        images = batch(3, b=2)
        x = train.step_inputs(images, encode, embed, params, rest, cfg.train)
        assert set(x) == {"gt_latents", "deg_latents", "ref_latents", "ref_features", "gt_features", "num_refs"}
        close(x["ref_latents"], system.encode(images["refs"]))
        close(x["ref_features"], system.embed(images["refs"]))
        close(x["gt_latents"], system.encode(images["gt"]))
        close(x["deg_latents"], system.encode(images["deg"]))
        close(x["gt_features"], system.embed(images["gt"]))
        assert len({float(x["ref_features"][0, r, 0]) for r in range(3)}) == 3  # three different references

        images = batch(0, b=2)
        x = train.step_inputs(images, encode, embed, params, rest, cfg.train)
        assert set(x) == {"gt_latents", "deg_latents", "ref_latents", "ref_features", "deg_features", "num_refs"}
        assert x["ref_latents"].shape == (2, 0, *x["gt_latents"].shape[1:]) and x["ref_features"].shape == (2, 0, 512)
        close(x["deg_features"], system.embed(images["deg"]))


# --- the paper's shape: frozen base, LoRA and side pathways trained, the FLUX.2 VAE codec, EMA ---

GROUPS = ("lora", "identity", "structure", "memory_xattn")


def group_of(path: str) -> str:
    return "lora" if path.endswith(("lora_a", "lora_b")) else path.split(".")[1]


@pytest.fixture(scope="module")
def paper(tiny_vae_dir):
    """(config, graphdef, trained-like parameters, frozen rest) of the paper's shape at 16 px (4 x 4 tokens)."""
    cfg = demo_config(*paper_overrides(tiny_vae_dir), "--config.data.resolution=16", "--config.train.lambda_id=1.0",
                      "--config.train.text_dropout=0.0")
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    # Non-zero values everywhere (as after training), so that every trainable group carries a gradient.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype), params)
    return cfg, graphdef, params, rest


def test_paper_shape_trains_only_lora_and_side_pathways(paper):
    cfg, _, params, rest = paper
    names = flat(params)
    assert {group_of(k) for k in names} == set(GROUPS)
    assert all(k.startswith("model.") for k in names)
    frozen = flat(rest)
    assert any(k.startswith("model.backbone.") and k.endswith("kernel") for k in frozen)
    assert any(k.startswith("autoencoder.decoder.") for k in frozen)
    assert any(k.startswith("face_encoder.") for k in frozen)


def test_identity_loss_gradient_reaches_lora_and_side_pathways(paper):
    """d L_id / d theta through the decoder and AdaFace: non-zero on every trainable group, and along a random
    direction within each group equal to a central finite difference of L_id."""
    cfg, graphdef, params, rest = paper
    x, key = step_inputs(cfg, graphdef, params, rest, batch(1)), jax.random.key(5)
    l_id = jax.jit(lambda p: train.loss_fn(p, rest, graphdef, x, key, cfg.train, 16)[0][1])
    grads = flat(jax.jit(jax.grad(l_id))(params))
    assert float(l_id(params)) > 0
    rng = np.random.default_rng(1)
    for group in GROUPS:
        assert max(np.abs(g).max() for k, g in grads.items() if group_of(k) == group) > 0, group
        direction = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.asarray(rng.standard_normal(v.shape) * (group_of(name_of(path)) == group), v.dtype),
            params)
        predicted = sum(float(np.vdot(grads[k], d)) for k, d in flat(direction).items())
        # L_id is small (~0.05) and float32: a step of norm 1 keeps the difference well above rounding.
        h = 1.0 / math.sqrt(sum(float(np.vdot(d, d)) for d in flat(direction).values()))
        step = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
        estimate = (float(l_id(step(h))) - float(l_id(step(-h)))) / (2 * h)
        np.testing.assert_allclose(estimate, predicted, rtol=0.03, err_msg=group)


@pytest.fixture(scope="module")
def paper_step(paper):
    """The paper-shape train step with the trainer's optimizer and EMA, compiled once for two batches' shape."""
    cfg, graphdef, params, rest = paper
    t = cfg.train
    tx = train.make_optimizer(t)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=jax.random.key(7),
                 ema=jax.tree.map(lambda p: p + 0.01, params))  # an EMA apart from the parameters
    run = jax.jit(lambda s, b: train.train_step(s, rest, b, graphdef=graphdef, tx=tx, t=t, resolution=16))
    return state, lambda s, images: run(s, step_inputs(cfg, graphdef, params, rest, images)), t


def test_nonfinite_step_leaves_the_state_bit_identical(paper_step):
    state, step, _ = paper_step
    bad = batch(1)
    bad["gt"] = bad["gt"].at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    for name in ("params", "opt_state", "ema"):
        before, after = jax.tree.leaves(state[name]), jax.tree.leaves(new[name])
        assert len(before) == len(after)
        for a, b in zip(before, after):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(new["step"]) == 1  # the step still counts, and the key moves on


def test_ema_update_by_hand(paper_step):
    """ema <- decay ema + (1 - decay) params after each update (two steps: the first has a zero learning rate)."""
    state, step, t = paper_step
    for _ in range(2):
        new, metrics = step(state, batch(1))
        assert bool(metrics["finite"])
        leaves = (jax.tree.leaves(state["ema"]), jax.tree.leaves(new["params"]), jax.tree.leaves(new["ema"]))
        for e, p, got in zip(*leaves):
            want = t.ema_decay * np.asarray(e, np.float64) + (1 - t.ema_decay) * np.asarray(p, np.float64)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
        state, before = new, state
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]),
                                                          jax.tree.leaves(state["params"])))


def test_text_dropout_rate(monkeypatch):
    """The empty prompt replaces the prompt for a text_dropout fraction of the samples (binomial bounds), and
    every row is exactly one of the two embeddings."""
    cfg = demo_config("--config.data.resolution=16", "--config.train.text_dropout=0.1")
    system = face_system.build(cfg)
    seen = []

    def fake_model(self, z, x_deg, x_refs, text, sigma, e_id, *, grid, keep_residual):
        seen.append(np.asarray(text))
        return z

    monkeypatch.setattr(iconface.IConFace, "__call__", fake_model)
    monkeypatch.setattr(face_system.FaceSystem, "embed", lambda self, images: jnp.ones((images.shape[0], 512)))
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    n = 1000
    x = step_inputs(cfg, graphdef, params, rest, batch(0, b=n))
    train.loss_fn(params, rest, graphdef, x, jax.random.key(0), cfg.train, 16)
    text = seen[0]
    empty = np.all(text == np.asarray(system.empty[...])[None], axis=(1, 2))
    prompt = np.all(text == np.asarray(system.prompt[...])[None], axis=(1, 2))
    assert np.all(empty ^ prompt)
    std = math.sqrt(n * 0.1 * 0.9)
    assert abs(empty.sum() - 0.1 * n) < 4 * std, empty.sum()


def test_residual_dropout_withholds_the_structure_residual(monkeypatch):
    """residual_dropout 1 trains the model as if W_in's residual were zero; 0 leaves the residual in (so the first
    check can fail); in between, a binomial share of the samples loses it."""
    cfg = demo_config("--config.data.resolution=16", "--config.train.residual_dropout=1.0")
    system = face_system.build(cfg)
    w_in_up = system.model.structure.w_in_up.kernel
    w_in_up[...] = jax.random.normal(jax.random.key(5), w_in_up.shape)  # trained-like: the residual acts
    images, key = batch(1), jax.random.key(2)

    def loss(t):
        graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
        x = step_inputs(cfg, graphdef, params, rest, images)
        return np.asarray(train.loss_fn(params, rest, graphdef, x, key, t, 16)[0])

    t_keep = cfg.train.copy_and_resolve_references()
    t_keep.residual_dropout = 0.0
    dropped, kept = loss(cfg.train), loss(t_keep)
    w_in_up[...] = jnp.zeros(w_in_up.shape)
    without = loss(t_keep)
    np.testing.assert_allclose(dropped, without, rtol=1e-6)
    assert abs(kept[0] - without[0]) > 1e-3 * without[0]

    seen = []
    monkeypatch.setattr(iconface.IConFace, "__call__",
                        lambda self, z, *args, keep_residual, **kw: seen.append(np.asarray(keep_residual)) or z)
    monkeypatch.setattr(face_system.FaceSystem, "embed", lambda self, images: jnp.ones((images.shape[0], 512)))
    t_some = cfg.train.copy_and_resolve_references()
    t_some.residual_dropout = 0.3
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    n = 1000
    x = step_inputs(cfg, graphdef, params, rest, batch(0, b=n))
    train.loss_fn(params, rest, graphdef, x, jax.random.key(0), t_some, 16)
    assert abs((~seen[0]).sum() - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7), (~seen[0]).sum()


def test_warmup_cosine_adamw_with_clipping_by_hand():
    """make_optimizer's updates against AdamW written out: global-norm clipping, bias-corrected moments, decoupled
    weight decay, a learning rate rising linearly over the warmup and then following a cosine to zero."""
    cfg = demo_config("--config.train.steps=10", "--config.train.warmup_steps=3", "--config.train.learning_rate=0.1",
                      "--config.train.weight_decay=0.01", "--config.train.grad_clip=1.0")
    t = cfg.train
    tx = train.make_optimizer(t)
    rng = np.random.default_rng(0)
    p = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
    opt_state = tx.init(params)
    for step in range(t.steps):
        scale = 3.0 if step % 2 else 0.1  # alternate clipped and unclipped gradients
        raw = {k: scale * rng.standard_normal(x.shape) for k, x in p.items()}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in raw.values()))
        g = {k: x * min(1.0, t.grad_clip / norm) for k, x in raw.items()}
        if step < t.warmup_steps:
            lr = t.learning_rate * step / t.warmup_steps
        else:
            lr = t.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - t.warmup_steps) / (t.steps - t.warmup_steps)))
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - 0.9 ** (step + 1)), v[k] / (1 - 0.999 ** (step + 1))
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + t.weight_decay * p[k])
        updates, opt_state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), raw), opt_state, params)
        params = optax.apply_updates(params, updates)
        for k in p:
            np.testing.assert_allclose(np.asarray(params[k]), p[k], rtol=1e-5, atol=1e-6, err_msg=f"step {step}")


def test_identity_term_by_hand(monkeypatch):
    """loss_id is the paper's L_id recomputed in numpy from the model's own outputs: the reference anchor (norm-
    weighted references) in the e_ref slot, the ground truth's embedding in the e_gt slot, lambda_h and
    omega(sigma) as configured, zero for samples without references, averaged over the batch."""
    cfg = demo_config("--config.data.resolution=16", "--config.train.lambda_id=0.5", "--config.train.lambda_h=0.8",
                      "--config.train.omega_min=0.4")
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    images = batch(2, b=3)
    images["num_refs"] = jnp.asarray([2, 0, 2], jnp.int32)
    x = step_inputs(cfg, graphdef, params, rest, images)
    seen = {}
    sample_sigma, decode = train.flow.sample_sigma, face_system.FaceSystem.decode
    monkeypatch.setattr(train.flow, "sample_sigma", lambda *a, **k: seen.setdefault("sigma", sample_sigma(*a, **k)))
    monkeypatch.setattr(face_system.FaceSystem, "decode",
                        lambda self, *a: seen.setdefault("restored", decode(self, *a)))

    @jax.jit
    def run(params):  # one program: the loss, and the embeddings of the recorded sigma and restored images
        terms, metrics = train.loss_fn(params, rest, graphdef, x, jax.random.key(4), cfg.train, 16)
        # The embeddings from the images themselves, not from the step's inputs: a mix-up there would show.
        embedded = [system.embed(faces) for faces in (images["refs"], images["gt"], seen["restored"])]
        return terms, metrics, seen["sigma"], embedded

    terms, metrics, sigma, (z, e_gt, e_out) = jax.tree.map(lambda v: np.asarray(v, np.float64), run(params))
    cos = lambda u, v: np.sum(u * v, -1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    # z (B, R, D): e_ref = normalize(sum_r softmax(log q_r / T) z_r / q_r), q_r = |z_r|
    q = np.linalg.norm(z, axis=-1)
    w = np.exp(np.log(q) / system.model.config.id_temperature)
    e_ref = np.einsum("br,brd->bd", w / w.sum(1, keepdims=True), z / q[..., None])
    lam = 0.8 * (1 - cos(e_ref, e_gt))
    mixed = (1 - lam) * (1 - cos(e_out, e_ref)) + lam * (1 - cos(e_out, e_gt))
    omega = np.maximum(1 - sigma, 0.4) ** 2
    want = np.mean(np.where([True, False, True], omega * mixed, 0.0))
    assert abs(cos(e_ref, e_gt)).max() < 0.99  # anchors that differ, so a swapped slot would show
    np.testing.assert_allclose(float(metrics["loss_id"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(terms[1]), want, rtol=1e-4)
