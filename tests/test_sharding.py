"""Device prefetch: order and extras kept, runs ahead by `depth`, errors surface in place, early close stops it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from iconface_jax import sharding


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
