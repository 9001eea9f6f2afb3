"""Refuse to fall back to the CPU in a job that asked for GPUs.

The CPU backend (``cpu_backend``) is for machines where no GPU was asked for: the quickstart,
the tests, CPU jobs. Where a job asked for GPUs and torch finds none usable (a torch built for
a CUDA the driver does not run, no driver, a CPU-only torch), running on the host CPUs would be
hours per step; the rank stops instead, before Megatron initialises, with one line that names
torch's CUDA, the driver's, and the install command that fits: the build ``install.sh``
picks for that driver, natively or through CUDA minor-version compatibility.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["GpuUnavailableError", "gpu_requested", "no_gpu_message"]

TABLE = Path(__file__).with_name("cuda_drivers.txt")
# SLURM's variables of a job or step with GPUs (--gpus, --gpus-per-node, --gpus-per-task,
# --gres=gpu:N); a CPU job has none of them.
SLURM_GPU_VARS = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE",
                  "SLURM_GPUS_PER_TASK", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
# launch/job_body.sh exports it in every job submitted with --gpus-per-node > 0.
EXPECT_GPU = "PARCAE_EXPECT_GPU"


class GpuUnavailableError(RuntimeError):
    """GPUs were asked for and torch has no usable CUDA device; the message is one line."""


def gpu_requested(env: Mapping[str, str]) -> str | None:
    """Which setting of ``env`` asks for GPUs (``NAME=value``), or None for a CPU run.

    ``PARCAE_EXPECT_GPU`` (set by ``launch`` in GPU jobs) decides first. Then a
    ``CUDA_VISIBLE_DEVICES`` that is set decides: devices listed ask for GPUs, empty or
    negative (``-1``) hides them on purpose (CPU runs inside a GPU allocation: the tests, the
    rehearsal). Unset, SLURM's GPU variables of the job or step decide.
    """
    if env.get(EXPECT_GPU, "") not in ("", "0"):
        return f"{EXPECT_GPU}={env[EXPECT_GPU]}"
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = env["CUDA_VISIBLE_DEVICES"].strip()
        return f"CUDA_VISIBLE_DEVICES={visible}" \
            if visible and not visible.startswith("-") else None
    for name in SLURM_GPU_VARS:
        value = env.get(name, "").strip()
        if value and value not in ("0", "(null)"):
            return f"{name}={value}"
    return None


def _versions(numbers: str) -> tuple[int, ...]:
    return tuple(int(p) for p in numbers.split(".") if p.isdigit())


def _table() -> list[list[str]]:
    return [line.split() for line in TABLE.read_text().splitlines()
            if line.split() and not line.startswith("#")]


def driver_table() -> list[tuple[str, str, bool]]:
    """``(cuda, minimum driver, installable)`` release rows of ``cuda_drivers.txt``, oldest
    first; the minimum is the release's own (GA) driver, which runs it natively."""
    return [(fields[0], fields[1], fields[2:] == ["wheel"]) for fields in _table()
            if fields[2:] != ["family"]]


def family_minimum(cuda: str) -> str | None:
    """The oldest driver that runs ``cuda`` through CUDA minor-version compatibility: the
    minimum of its major release family (the table's ``family`` rows), None if not listed."""
    family = f"{cuda.split('.')[0]}.x"
    return next((fields[1] for fields in _table()
                 if fields[0] == family and fields[2:] == ["family"]), None)


def newest_cuda(driver: str, installable: bool = False) -> str | None:
    """The newest CUDA release of the table that ``driver`` runs natively (an installable one)."""
    fits = [cuda for cuda, minimum, wheel in driver_table()
            if _versions(driver) >= _versions(minimum) and (wheel or not installable)]
    return fits[-1] if fits else None


NATIVELY = "natively"
COMPATIBLY = "through CUDA minor-version compatibility"


def runs(driver: str, cuda: str) -> str | None:
    """How ``driver`` runs a build for ``cuda``: ``NATIVELY`` (the release's own driver or
    newer), ``COMPATIBLY`` (at least the minimum of ``cuda``'s major family: a limited feature
    set, no JIT of PTX newer than the driver's CUDA), or None when it does not."""
    native = next((minimum for c, minimum, _ in driver_table() if c == cuda), None)
    if native is not None and _versions(driver) >= _versions(native):
        return NATIVELY
    family = family_minimum(cuda)
    return COMPATIBLY if family and _versions(driver) >= _versions(family) else None


def install_choice(driver: str) -> tuple[str, str] | None:
    """``(cuda, how)``: what ``scripts/install.sh --gpu`` installs for ``driver`` and how the
    driver runs it (``runs``): the newest build it runs natively, else the newest it runs
    through minor-version compatibility; None when it runs none."""
    builds = [cuda for cuda, _, wheel in driver_table() if wheel]
    for how in (NATIVELY, COMPATIBLY):
        fits = [cuda for cuda in builds if runs(driver, cuda) == how]
        if fits:
            return fits[-1], how
    return None


def upgrade_hint() -> str:
    """The driver to upgrade to when no installable build runs on the present one."""
    builds = [(cuda, minimum) for cuda, minimum, wheel in driver_table() if wheel]
    floors = sorted(((family_minimum(cuda) or minimum, cuda) for cuda, minimum in builds),
                    key=lambda floor: _versions(floor[0]))
    floor, oldest = floors[0]
    newest, newest_minimum = builds[-1]
    return (f"upgrade the driver to >= {floor} (the CUDA {oldest.split('.')[0]}.x builds, "
            f"through minor-version compatibility) or >= {newest_minimum} (every build "
            f"natively, --cuda {newest})")


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, None when there is none or it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines and _versions(lines[0].strip()) else None


def no_gpu_message(reason: str, torch_version: str, torch_cuda: str | None,
                   driver: str | None) -> str:
    """The one line a rank prints when ``reason`` asked for GPUs and CUDA is unusable."""
    built = f"torch {torch_version} is built for CUDA {torch_cuda}" if torch_cuda \
        else f"torch {torch_version} is a CPU-only build"
    if driver is None:
        return (f"error: GPUs were asked for ({reason}) but torch sees no usable CUDA device: "
                f"{built}, and no NVIDIA driver found (no working nvidia-smi); on a GPU node, "
                "install with `bash scripts/install.sh --gpu --cuda X` for the CUDA X of its "
                "driver; for a CPU run, ask for no GPU (unset CUDA_VISIBLE_DEVICES)")
    supports = newest_cuda(driver)
    driver_says = f"the NVIDIA driver is {driver}" + (f" (CUDA up to {supports})"
                                                      if supports else "")
    choice = install_choice(driver)
    how = runs(driver, torch_cuda) if torch_cuda else None
    if how:
        # Reinstalling would not help: the driver runs this build, something else is wrong.
        fix = (f"this driver runs CUDA {torch_cuda} {how}, so the cause is elsewhere: check "
               "that `nvidia-smi` lists the job's GPUs and CUDA_VISIBLE_DEVICES names them")
    elif choice:
        cuda, how = choice
        fix = f"reinstall with `bash scripts/install.sh --gpu --cuda {cuda}`" + (
            "" if how == NATIVELY else f" (it runs on this driver {how})")
    else:
        fix = f"{upgrade_hint()}, then `bash scripts/install.sh --gpu`"
    return (f"error: GPUs were asked for ({reason}) but torch sees no usable CUDA device: "
            f"{built}, {driver_says}; {fix}")
