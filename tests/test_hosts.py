"""Multi-host start-up: each launcher's variables are recognised (and a single process, a job's shell or a GPU VM's
Google NIC are not), processes started by Open MPI or by the three override variables join, and the mesh keeps
fsdp groups inside a slice."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from helpers import ROOT, env_with, free_port
from iconface_jax import hosts, sharding

pytestmark = pytest.mark.subprocess

SRUN = dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS="16", SLURM_PROCID="3",
            SLURM_LOCALID="3")
MPIRUN = dict(OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_LOCAL_RANK="3",
              OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.0.0.1:34911")


def fake_pci(root, *functions: tuple[str, str]) -> str:
    """A /sys/bus/pci/devices with these (vendor, device) functions."""
    for i, (vendor, device) in enumerate(functions):
        (root / f"0000:00:{i:02x}.0").mkdir(parents=True)
        (root / f"0000:00:{i:02x}.0" / "vendor").write_text(vendor + "\n")
        (root / f"0000:00:{i:02x}.0" / "device").write_text(device + "\n")
    return str(root)


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    (dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"), "explicit"),
    (dict(SRUN, JAX_COORDINATOR_ADDRESS="10.0.0.1:1234"), "explicit"),  # the variables override the launcher
    (SRUN, "slurm"),
    (dict(SRUN, SLURM_NTASKS="1"), None),  # one task: nothing to join
    ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}, None),  # the job's batch shell, not a step
    (MPIRUN, "ompi"),
    (dict(MPIRUN, OMPI_COMM_WORLD_SIZE="1"), None),
])
def test_launcher_from_the_environment(environ, expected, tmp_path):
    assert hosts.launcher(environ, pci_devices=str(tmp_path)) == expected


@pytest.mark.parametrize("functions,expected", [
    ([("0x1ae0", "0x0063")] * 4 + [("0x1af4", "0x1000")], "tpu"),  # a v5e host: four chips beside virtio
    ([("0x1ae0", "0x005e")], "tpu"),  # v4
    ([("0x1ae0", "0x0042"), ("0x1ae0", "0x001f"), ("0x10de", "0x2330")], None),  # GPU VM: gVNIC, NVMe, H100
])
def test_cloud_tpu_vm_from_its_pci_devices(functions, expected, tmp_path):
    """A GCE TPU VM needs its chips and metadata server, which a CPU box has not: the predicate alone is tested."""
    assert hosts.launcher({}, pci_devices=fake_pci(tmp_path / "pci", *functions)) == expected


def test_override_variables_must_come_together(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        hosts.init_distributed()


def test_a_launch_jax_cannot_follow_is_named():
    """Open MPI 5 (PRRTE: no `OMPI_MCA_orte_hnp_uri`) with a JAX that reads only Open MPI 4's variables. In a
    fresh process: `jax.distributed.initialize` refuses any process whose backend already started."""
    env = {k: v for k, v in env_with(**MPIRUN).items()
           if k not in ("OMPI_MCA_orte_hnp_uri", "PRTE_LAUNCHED", "JAX_COORDINATOR_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", "from iconface_jax import hosts; hosts.init_distributed()"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert re.search(r"RuntimeError: the 'ompi' launch, but this JAX cannot find its coordinator .* JAX_PROC",
                     out.stderr), out.stderr[-3000:]


JOIN = """
import json
from iconface_jax import hosts
launch = hosts.init_distributed()
import jax
print(json.dumps([launch, jax.process_index(), jax.process_count(), jax.device_count()]))
"""


@pytest.mark.parametrize("launch", ["ompi", "explicit"])
def test_two_processes_join(launch):
    """Two CPU processes with Open MPI's variables (as `mpirun -n 2` sets them) or the three overrides join one
    run (SLURM's start the trainer in tests/test_train.py)."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = (dict(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK=str(pid), OMPI_COMM_WORLD_LOCAL_RANK=str(pid),
                    OMPI_MCA_orte_hnp_uri="1234567.0;tcp://127.0.0.1:1", JAX_COORDINATOR_PORT=str(port))
               if launch == "ompi" else
               dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)))
        procs.append(subprocess.Popen([sys.executable, "-c", JOIN], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env=env_with(XLA_FLAGS="--xla_force_host_platform_device_count=2", **env)))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert [json.loads(out.splitlines()[-1]) for out, _ in outs] == [[launch, 0, 2, 4], [launch, 1, 2, 4]]


@dataclasses.dataclass(frozen=True)
class FakeGpu:
    id: int
    slice_index: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "NVIDIA H100 80GB HBM3"


def test_mesh_across_hosts_keeps_fsdp_inside_one(monkeypatch):
    """2 hosts x 8 GPUs (JAX gives each host its own slice_index, and `jax.make_mesh` refuses such a device set):
    each fsdp group lies on one host, the data axis spans them; an fsdp group larger than a host is refused."""
    monkeypatch.setattr(sharding, "Mesh", lambda grid, names, axis_types: grid)  # fake devices make no real Mesh
    devices = [FakeGpu(8 * host + i, host, host) for host in (1, 0) for i in range(8)]
    for data, fsdp in [(2, 8), (4, 4), (16, 1)]:
        grid = sharding.make_mesh(data, fsdp, devices)
        assert grid.shape == (data, fsdp)
        assert all(len({d.slice_index for d in row}) == 1 for row in grid), grid
        assert sorted(d.id for d in grid.flat) == list(range(16))
    with pytest.raises(ValueError, match="fsdp=16 does not fit in one of the 2 slices"):
        sharding.make_mesh(1, 16, devices)


def test_mesh_axes_are_auto():
    """The trainer places arrays by in/out shardings, not on explicit axes (`jax.make_mesh`'s default)."""
    from jax.sharding import AxisType

    assert sharding.make_mesh().axis_types == (AxisType.Auto, AxisType.Auto)
