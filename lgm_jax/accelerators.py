"""An accelerator on this machine that JAX does not use: the warning a run gives at its start.

    warning = accelerators.cpu_only_warning(jax.default_backend())  # str, or None

When JAX falls back to the CPU on a machine with an NVIDIA GPU or a Cloud TPU, a distillation
step takes hours instead of a second; this says so before anything slow, and how to fix it
(the install extras of pyproject.toml, docs/accelerators.md). The probes are the ones JAX's own
start-up uses to suggest a missing plugin (jax._src.hardware_utils), plus the NVIDIA driver's
/proc entry, `nvidia-smi` on PATH and the environment a TPU VM or GKE TPU pod sets; every probe
takes its root directory, environment and PATH lookup as arguments so that tests can fake them.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable, Mapping

# Device nodes of the NVIDIA driver: bare metal, Docker/Kubernetes, WSL2 (as JAX checks them).
NVIDIA_NODES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg")
NVIDIA_DRIVER = "proc/driver/nvidia/version"
# Google's PCI vendor id, and the device ids of TPU chips (v3 .. TPU7x), as JAX reads them.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {
    "0x0027": "v3",
    "0x005e": "v4",
    "0x0062": "v5p",
    "0x0063": "v5e",
    "0x006f": "v6e",
    "0x0076": "tpu7x",
}
# Set on Cloud TPU VMs and in GKE TPU pods (the worker id and hostnames jax.distributed reads).
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES")

FIX = {
    "gpu": 'pip install -e ".[cuda12]" (or ".[cuda13]" with a CUDA 13 driver)',
    "tpu": 'pip install -e ".[tpu]"',
}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def nvidia_gpu(root: str = "/", which: Callable[[str], str | None] = shutil.which) -> str | None:
    """What shows an NVIDIA GPU here (a device node, the driver, nvidia-smi), or None."""
    for node in NVIDIA_NODES:
        if os.path.exists(os.path.join(root, node)):
            return "/" + node
    if os.path.exists(os.path.join(root, NVIDIA_DRIVER)):
        return "/" + NVIDIA_DRIVER
    if which("nvidia-smi"):
        return "nvidia-smi on PATH"
    return None


def tpu(root: str = "/", environ: Mapping[str, str] | None = None) -> str | None:
    """What shows a Cloud TPU here (TPU chips on the PCI bus, however their driver exposes them:
    /dev/accel* on v4 and older, /dev/vfio/* from v5e on; /dev/accel* nodes; a TPU VM's
    environment), or None."""
    environ = os.environ if environ is None else environ
    chips = []
    for vendor in sorted(glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor"))):
        if _read(vendor) == GOOGLE_PCI_VENDOR:
            device = _read(os.path.join(os.path.dirname(vendor), "device"))
            if device in TPU_PCI_DEVICES:
                chips.append(TPU_PCI_DEVICES[device])
    if chips:
        return f"{len(chips)} TPU {chips[0]} chip(s) on the PCI bus"
    if glob.glob(os.path.join(root, "dev/accel[0-9]*")):
        return "/dev/accel*"
    found = [k for k in TPU_ENV if environ.get(k)]
    if found:
        return "$" + found[0]
    return None


def cpu_only_warning(
    backend: str,
    root: str = "/",
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> str | None:
    """The warning for a run whose JAX backend is `backend` (jax.default_backend()) on this
    machine: text naming the accelerator found and the fix when JAX only sees the CPU, else
    None. Nothing either when JAX_PLATFORMS=cpu asks for the CPU on purpose."""
    environ = os.environ if environ is None else environ
    if backend != "cpu" or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    for kind, found in (("gpu", nvidia_gpu(root, which)), ("tpu", tpu(root, environ))):
        if found:
            return (
                f"this machine has a {kind.upper()} ({found}) but JAX sees only the CPU, so every "
                f"step will be slow: install JAX for it, {FIX[kind]}, and check with "
                'python -c "import jax; print(jax.devices())" (docs/accelerators.md)'
            )
    return None
