"""Multi-host start-up: which launcher started this process, and joining the other processes.

Every process of a multi-host run executes the same command. On a Cloud TPU slice (`gcloud compute tpus tpu-vm
ssh --worker=all`), under SLURM (`srun`) and under Open MPI (`mpirun`), `jax.distributed.initialize()` finds the
coordinator, the process count and this process's id by itself; `launcher` says when one of them started us,
from the variables the launchers set (and, for TPUs, the chips on the PCI bus), without starting JAX.
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` override what JAX would detect (and
start a multi-process run anywhere else: the tests' two CPU processes).
"""
from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import jax

OVERRIDES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What JAX's SLURM detection reads: a job's batch shell (no step) or `salloc` alone is not a launch.
SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# PCI device ids of Google's TPU chips (vendor 0x1ae0), v3 to TPU7x, as JAX and libtpu count chips. Google's
# other PCI functions (gVNIC 0x0042, local NVMe) are on GPU VMs too, so the vendor alone says nothing.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def launcher(environ: Mapping[str, str] = os.environ, pci_devices: str = "/sys/bus/pci/devices") -> str | None:
    """What started this process as one of several: 'explicit' (`JAX_COORDINATOR_ADDRESS` set), 'slurm' (an
    `srun` step of more than one task), 'ompi' (Open MPI's `mpirun` of more than one process), 'tpu' (a Cloud
    TPU VM: JAX reads its slice's hosts from the metadata server or GKE's `TPU_WORKER_HOSTNAMES`), or None (a
    single process)."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if all(k in environ for k in SLURM_STEP) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if any(_read(os.path.join(os.path.dirname(v), "device")) in TPU_PCI_DEVICES
           for v in glob.glob(os.path.join(pci_devices, "*", "vendor")) if _read(v) == GOOGLE_PCI_VENDOR):
        return "tpu"
    return None


def init_distributed() -> str | None:
    """Joins the other processes when a launcher started this one (`launcher`); returns its name, or None when
    the run is a single process. Call it before anything else touches JAX's devices."""
    found = launcher()
    if found is None or jax.distributed.is_initialized():
        return found
    if found == "explicit" and not all(os.environ.get(k) for k in OVERRIDES):
        missing = [k for k in OVERRIDES if not os.environ.get(k)]
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three on every "
                         "process (or none, under SLURM, Open MPI or on Cloud TPU)")
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need real collectives
    if found == "explicit":
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
        return found
    try:  # JAX reads the coordinator, process count and id from the launcher's variables or the TPU metadata
        jax.distributed.initialize()
    except ValueError as e:  # e.g. Open MPI 5 (PRRTE) with a JAX that knows only Open MPI 4's ORTE variables
        raise RuntimeError(f"the {found!r} launch, but this JAX cannot find its coordinator ({e}): set "
                           f"{', '.join(OVERRIDES)} on every process") from e
    return found


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def wait_for_all(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches the barrier `name` (unique per run); nothing in a single process.

    The barrier is the coordination service's, which waits as long as `timeout_s`: processes that finish a long
    piece of host work (compiling every program) minutes apart would otherwise meet first in a device collective,
    whose transport gives up sooner (gloo's "Connect timeout" on CPU processes)."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)
