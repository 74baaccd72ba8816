"""Weight directories: chunked (streamed) writes round-trip exactly, failures leave nothing, bad directories are
named."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from iconface_jax import weights


class Tiny(nnx.Module):
    def __init__(self, param_dtype=np.float32):
        self.a = nnx.Linear(16, 32, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(32, 8, param_dtype=param_dtype, rngs=nnx.Rngs(1))


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.get_value().shape).astype(np.float32)
            for k, v in weights.base_params(Tiny()).items()}


def test_streamed_save_round_trips_in_chunks(tmp_path, partial_saves):
    params = _params(0)
    weights.save(str(tmp_path / "w"), "tiny", {"n": 1}, iter(params.items()), chunk_bytes=16 * 32 * 4)
    # A chunk is written once it reaches chunk_bytes (a.kernel's size); the rest goes out at the end.
    assert partial_saves == [["a.bias", "a.kernel"], ["b.bias", "b.kernel"]]
    model = weights.restore(Tiny(), str(tmp_path / "w"))
    for key, var in weights.base_params(model).items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), params[key])
    assert weights.read_config(str(tmp_path / "w"), "tiny") == {"n": 1}
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_restore_places_each_array_with_its_sharding(tmp_path):
    """`place(shape)` is the sharding Orbax restores each array into (the trainer's fsdp shardings; here on a
    one-device mesh, which tells them apart from the default single-device placement)."""
    from iconface_jax import sharding

    params = _params(0)
    weights.save(str(tmp_path / "w"), "tiny", {"n": 1}, params)
    mesh, shapes = sharding.make_mesh(), []
    place = lambda shape: (shapes.append(shape), sharding.param_sharding(shape, mesh))[1]
    model = weights.restore(Tiny(), str(tmp_path / "w"), place=place)
    for key, var in weights.base_params(model).items():
        assert var.get_value().sharding == sharding.param_sharding(var.get_value().shape, mesh), key
        np.testing.assert_array_equal(np.asarray(var.get_value()), params[key])
    assert sorted(shapes) == sorted(v.shape for v in params.values())


def test_failing_stream_leaves_nothing(tmp_path, partial_saves):
    def stream():
        yield from list(_params(0).items())[:2]
        raise RuntimeError("source tensor unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        weights.save(str(tmp_path / "w"), "tiny", {}, stream(), chunk_bytes=1)
    assert partial_saves  # something had been written before the failure
    assert os.listdir(tmp_path) == []


def test_empty_stream_and_missing_checkpoint_are_refused(tmp_path):
    with pytest.raises(weights.WeightsError, match="no parameters"):
        weights.save(str(tmp_path / "w"), "tiny", {}, iter(()))
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / weights.CONFIG_FILE).write_text('{"family": "tiny", "config": {}}')
    with pytest.raises(weights.WeightsError, match="params/state"):
        weights.restore(Tiny(), str(tmp_path / "old"))


def test_restore_casts_to_the_model_dtype_like_numpy(tmp_path):
    params = _params(1)
    # Halfway cases between two bfloat16 values: round to nearest even, as numpy/ml_dtypes do.
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130], np.float32)
    params["b.bias"][:4] = ties
    weights.save(str(tmp_path / "w"), "tiny", {}, params)
    model = weights.restore(Tiny(param_dtype=ml_dtypes.bfloat16), str(tmp_path / "w"))
    for key, var in weights.base_params(model).items():
        got = np.asarray(var.get_value())
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), params[key].astype(ml_dtypes.bfloat16).view(np.uint16))


class Wider(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(16, 48, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(48, 8, rngs=nnx.Rngs(1))


class Deeper(Tiny):
    def __init__(self):
        super().__init__()
        self.c = nnx.Linear(8, 8, rngs=nnx.Rngs(2))


def test_weights_that_do_not_fit_the_model_are_named(tmp_path):
    """A directory whose parameters have other shapes or other names than the model's: the error names the
    directory, the parameter and both shapes (or the missing and unexpected names); the model is not touched."""
    weights.save(str(tmp_path / "w"), "tiny", {}, _params(0))
    model = Wider()
    before = np.asarray(model.a.kernel[...]).copy()
    with pytest.raises(weights.WeightsError, match=r"/w: a.bias has shape \(32,\), the model expects \(48,\)"):
        weights.restore(model, str(tmp_path / "w"))
    np.testing.assert_array_equal(np.asarray(model.a.kernel[...]), before)
    with pytest.raises(weights.WeightsError, match=r"/w: parameters do not fit the model; missing \['c.bias', "
                                                   r"'c.kernel'\], unexpected \[\]"):
        weights.restore(Deeper(), str(tmp_path / "w"))
