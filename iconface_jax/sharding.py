"""One device mesh with named axes (`data`, `fsdp`) and the shardings of parameters and batches.

The transformer's frozen weights are sharded along `fsdp` on their largest divisible axis (ZeRO-3 style:
gathered per use by XLA), small or indivisible ones and the codec's and face encoder's replicated; batches
are split over both axes, and placed on the devices ahead of use by `prefetch_to_device`. Multi-host runs
call `jax.distributed.initialize` before building the mesh, which then spans every process's devices.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # a batch is split over every axis
MIN_SHARD_SIZE = 2**22  # elements; smaller frozen weights are replicated (config.mesh.shard_min_size)


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes); -1 means 'the rest'.

    `jax.make_mesh` lays the axes on the chips' physical topology (an fsdp group on neighbouring TPU chips),
    which a reshape of the device list does not; an fsdp size that is no product of whole physical axes (4 on an
    8x8 torus) splits one, still along neighbouring chips. Devices of several slices (TPU slices, or GPU hosts: JAX
    gives each its own `slice_index`) have no fast links between them, and `jax.make_mesh` refuses them: then
    each fsdp group stays inside one slice and `data` spans the slices. The axes are Auto: the trainer places
    arrays by in/out shardings, not by sharding-in-types (this JAX's default is Explicit)."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match the {n} devices")
    axis_types = (AxisType.Auto, AxisType.Auto)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        try:
            return jax.make_mesh((data, fsdp), MESH_AXES, axis_types, devices=devices)
        except NotImplementedError:  # fsdp=4 on an 8x8 torus: the group takes half of one physical axis
            grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if data % slices:
        raise ValueError(f"mesh fsdp={fsdp} does not fit in one of the {slices} slices (hosts) of {n // slices} "
                         "devices: an fsdp group must not span the slow links between them")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """Shard the largest axis divisible by the fsdp size; replicate small (under `min_size` elements) or
    indivisible arrays."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def param_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> NamedSharding:
    """The fsdp sharding of a frozen weight of this shape (`param_spec`) on `mesh`."""
    return NamedSharding(mesh, param_spec(shape, mesh.shape["fsdp"], min_size))


def param_shardings(tree, mesh: Mesh, min_size: int = MIN_SHARD_SIZE):
    """The sharding of every array (or abstract array) of a face system's frozen state: the transformer's (under
    `model`) by `param_sharding`, the rest (codec, face encoder, prompt embeddings; 0.35 GB for klein-4B)
    replicated: sharded, XLA gathered the codec's weights before each convolution, which on a v5e-64 cost 2 GB
    per chip of the R = 1 step and a third of the encoders' compile
    (docs/performance.md#compile-time-and-host-memory)."""
    replicated = NamedSharding(mesh, P())

    def one(path, x) -> NamedSharding:
        in_transformer = bool(path) and getattr(path[0], "key", None) == "model"
        return param_sharding(x.shape, mesh, min_size) if in_transformer else replicated
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(tree, mesh: Mesh, min_size: int = MIN_SHARD_SIZE):
    """Places every array of a face system's frozen state with its sharding (`param_shardings`)."""
    return jax.device_put(tree, param_shardings(tree, mesh, min_size))


def replicate(tree, mesh: Mesh):
    """Places every array of `tree` fully replicated."""
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over data and fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def prefetch_to_device(batches: Iterator[tuple[dict[str, np.ndarray], Any]], mesh: Mesh,
                       depth: int = 2) -> Iterator[tuple[dict[str, jax.Array], Any]]:
    """Yields (global batch, extra) for each (host batch, extra) of `batches`, in order, with up to `depth`
    batches already loaded and placed on the devices by a background thread, so loading and the host-to-device
    copy overlap the running step. `extra` rides along unchanged (the trainer passes the data state after each
    batch). `depth` 0 places each batch on request. An error in `batches` is raised here, at its position."""
    if depth <= 0:
        yield from ((global_batch(host, mesh), extra) for host, extra in batches)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for host, extra in batches:
                if not put(((global_batch(host, mesh), extra), None)):
                    return
            put((None, None))
        except BaseException as e:  # handed to the consumer, which raises it
            put((None, e))

    thread = threading.Thread(target=fill, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is None:
                return
            yield item
    finally:
        stop.set()
        thread.join()
