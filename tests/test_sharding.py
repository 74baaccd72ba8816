"""Device prefetch: order and extras kept, runs ahead by `depth`, errors surface in place, early close stops it;
meshes and the frozen weights' shardings."""
from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from iconface_jax import sharding

pytestmark = pytest.mark.subprocess


def _source(n: int, pulled: list[int], fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"batch {i} unreadable")
        pulled.append(i)
        yield {"x": np.full((2, 3), i, np.float32)}, {"batches": i + 1}


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "prefetch_to_device"]


@pytest.mark.parametrize("depth", [0, 2])
def test_order_values_and_extras(depth):
    mesh = sharding.make_mesh()
    out = list(sharding.prefetch_to_device(_source(5, []), mesh, depth))
    assert [extra["batches"] for _, extra in out] == [1, 2, 3, 4, 5]
    for i, (batch, _) in enumerate(out):
        assert batch["x"].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch["x"]), np.full((2, 3), i))
    assert not _threads()


def test_runs_ahead_by_depth_and_stops_on_close():
    pulled = []
    batches = sharding.prefetch_to_device(_source(100, pulled), sharding.make_mesh(), depth=3)
    next(batches)
    deadline = time.monotonic() + 10
    while len(pulled) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # One consumed + three queued + one waiting to be queued: never more than depth + 2 pulled.
    assert len(pulled) == 5
    batches.close()
    assert not _threads()
    assert len(pulled) == 5


def test_error_is_raised_at_its_position():
    batches = sharding.prefetch_to_device(_source(5, [], fail_at=2), sharding.make_mesh(), depth=2)
    assert [extra["batches"] for _, extra in (next(batches), next(batches))] == [1, 2]
    with pytest.raises(OSError, match="batch 2 unreadable"):
        next(batches)
    assert not _threads()


SPLASH_PARITY = """
import functools, json
import jax, jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.sharding import NamedSharding, PartitionSpec as P
from iconface_jax import sharding
from iconface_jax.models import attention

sk.make_splash_mha = functools.partial(sk.make_splash_mha, interpret=True)  # Pallas' interpreter on CPU
mesh = sharding.make_mesh(data=2, fsdp=2)
errors, jaxprs = [], {}
for B in (4, 2):  # split over the 4 chips; whole on each (2 does not divide over 4)
    L, H, D = 136, 2, 64  # not a multiple of the 128-token blocks: padded
    q, k, v = (jax.random.normal(key, (B, L, H, D), jnp.float32) for key in jax.random.split(jax.random.key(B), 3))
    mask = jnp.arange(L)[None] < jnp.asarray([136, 100, 64, 1][:B])[:, None]
    placed = NamedSharding(mesh, P(sharding.BATCH_AXES) if B == 4 else P())
    q, k, v, mask = (jax.device_put(x, placed) for x in (q, k, v, mask))
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))
    for m in (None, mask):
        def loss(backend, q, k, v):
            return (attention.attention(q, k, v, m, backend=backend) * weights).sum()
        step = jax.jit(jax.value_and_grad(functools.partial(loss, "splash"), (0, 1, 2)))
        with jax.set_mesh(mesh):
            got = step(q, k, v)
            jaxprs.setdefault(B, []).append(str(jax.make_jaxpr(step)(q, k, v)))
        want = jax.jit(jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2)))(q, k, v)
        errors += [float(jnp.abs(a - b).max() / jnp.abs(b).max())
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
print(json.dumps(dict(errors=errors, jaxprs=jaxprs)))
"""


def test_splash_under_a_mesh_equals_xla():
    """Splash (Pallas interpret mode) on a 2x2 (data, fsdp) CPU mesh equals the xla backend, forward and
    gradients, with and without a key mask; it runs in a shard_map, on B/4 examples per chip where the
    batch axes divide B and on all of them where they do not."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SPLASH_PARITY], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert len(result["errors"]) == 16 and max(result["errors"]) < 1e-5, result["errors"]
    for batch, per_chip in [("4", "f32[1,136,2,64]"), ("2", "f32[2,136,2,64]")]:
        for jaxpr in result["jaxprs"][batch]:
            assert "shard_map" in jaxpr and per_chip in jaxpr, jaxpr[:2000]


@pytest.mark.tpu
def test_an_fsdp_group_may_split_a_physical_axis():
    """fsdp=4 on a v6e-64 (an 8x8 torus) is no product of whole physical axes, which `jax.make_mesh` refuses;
    the mesh splits one axis instead, each fsdp group a line of four neighbouring chips."""
    pytest.importorskip("libtpu")
    from iconface_jax import aot

    devices = aot.target_devices(aot.parse_target("v6e-64"))
    mesh = sharding.make_mesh(-1, 4, devices)
    assert dict(mesh.shape) == {"data": 16, "fsdp": 4}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    for group in mesh.devices:
        coords = np.array([d.coords for d in group])
        moving = np.flatnonzero(coords.max(0) != coords.min(0))
        assert len(moving) == 1 and sorted(coords[:, moving[0]]) == list(range(coords[:, moving[0]].min(),
                                                                              coords[:, moving[0]].min() + 4))


@pytest.mark.tpu
def test_fsdp_shards_the_transformers_frozen_weights_and_replicates_the_encoders():
    """Under fsdp the transformer's frozen weights are split over the group; the face encoder's and the prompt
    embeddings stay whole on every chip, however large (sharded, libtpu compiled the codec's gather-fused
    convolutions 7 times over)."""
    pytest.importorskip("libtpu")
    from flax import nnx

    from helpers import demo_config
    from iconface_jax import aot, face_system

    cfg = demo_config("--config.model.train_base=False")  # a frozen base transformer, as in the paper
    system = nnx.eval_shape(lambda: face_system.build(cfg))
    _, _, rest = nnx.split(system, face_system.trainable_filter(cfg), ...)
    mesh = sharding.make_mesh(1, 4, aot.target_devices(aot.parse_target("v5e-4")))
    specs = {".".join(str(k.key) for k in path if hasattr(k, "key")): s.spec
             for path, s in jax.tree_util.tree_leaves_with_path(sharding.param_shardings(rest, mesh, min_size=16))}
    parts = {name.split(".")[0] for name in specs}
    assert {"model", "face_encoder"} <= parts
    assert any("fsdp" in spec for name, spec in specs.items() if name.startswith("model."))
    assert all(spec == P() for name, spec in specs.items() if not name.startswith("model.")), specs
