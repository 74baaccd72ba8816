"""The compiled training step on a tiny system: per-term gradient norms and the update they sum to."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import ROOT
from iconface_jax import system as face_system
from iconface_jax import train


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.resolution = 32
    cfg.train.lambda_id = 0.5
    cfg.train.term_grad_norms = True
    return cfg


def batch(refs: int, size: int = 32, b: int = 2):
    rng = np.random.default_rng(refs)
    images = jnp.asarray(rng.uniform(-1, 1, (b, 2 + refs, size, size, 3)), jnp.float32)
    return dict(gt=images[:, 0], deg=images[:, 1], refs=images[:, 2:], num_refs=jnp.full((b,), refs, jnp.int32))


@pytest.mark.parametrize("refs", [0, 1])
def test_term_gradient_norms_are_those_of_each_term(refs):
    """grad_norm_fm and grad_norm_id equal the norms of jax.grad of L_fm and of lambda_id L_id taken apart, and
    the update is the same with and without computing them."""
    cfg = demo_config()
    system = face_system.build(cfg)
    graphdef, params, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    t, x, key = cfg.train, batch(refs), jax.random.key(3)
    tx = optax.sgd(0.1)
    state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), key=key)

    sub = jax.random.split(key)[1]  # the step's own split of the state key
    term = lambda i, p: train.loss_fn(p, rest, graphdef, x, sub, t)[0][i]  # noqa: E731
    want_fm = optax.tree.norm(jax.grad(lambda p: term(0, p))(params))
    want_id = optax.tree.norm(jax.grad(lambda p: t.lambda_id * term(1, p))(params)) if refs else 0.0

    new, metrics = jax.jit(lambda s: train.train_step(s, rest, x, graphdef=graphdef, tx=tx, t=t))(state)
    np.testing.assert_allclose(float(metrics["grad_norm_fm"]), float(want_fm), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm_id"]), float(want_id), rtol=1e-5, atol=1e-12)
    if refs:
        assert float(metrics["grad_norm_id"]) > 0

    t_off = cfg.train.copy_and_resolve_references()
    t_off.term_grad_norms = False
    plain, plain_metrics = jax.jit(lambda s: train.train_step(s, rest, x, graphdef=graphdef, tx=tx, t=t_off))(state)
    assert "grad_norm_id" not in plain_metrics
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(plain["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
