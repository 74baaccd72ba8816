"""IConFace in JAX/Flax NNX.

With libtpu installed (the `tpu` extra, for ahead-of-time compiles) JAX would probe for a TPU at start-up
on every run and print libtpu's warnings where there is none. On a machine with no TPU and no GPU, JAX
ends on the CPU anyway: importing the package says so up front (JAX_PLATFORMS=cpu, inherited by
subprocesses) unless the user chose platforms, so nothing gets noisier for having the extra installed.
"""
import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (JAX's hardware_utils checks the same)
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _cpu_only_host() -> bool:
    if any(os.path.exists(path) for path in _GPU_DEVICE_FILES):
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == _GOOGLE_PCI_VENDOR:
                return False
    return True


if "JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None and _cpu_only_host():
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before us: its config has read the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")
