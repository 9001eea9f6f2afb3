"""No silent CPU fallback: where GPUs were asked for and CUDA is unusable, a rank stops with one
``error:`` line (torch's CUDA, the driver's, the install command that fits)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from parcae_megatron.platform import gpu_check
from tests.distributed import ROOT


@pytest.mark.parametrize("env, reason", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),          # launch/job_body.sh's CPU jobs
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),        # the usual "hide every GPU"
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5d2e,GPU-77a1"}, "CUDA_VISIBLE_DEVICES=GPU-5d2e,GPU-77a1"),
    ({"PARCAE_EXPECT_GPU": "1", "CUDA_VISIBLE_DEVICES": ""}, "PARCAE_EXPECT_GPU=1"),
    ({"PARCAE_EXPECT_GPU": "0"}, None),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS=0,1,2,3"),
    ({"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": ""}, None),  # hidden on purpose
    ({"SLURM_STEP_GPUS": "2", "CUDA_VISIBLE_DEVICES": "2"}, "CUDA_VISIBLE_DEVICES=2"),
    ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_GPUS_PER_TASK": "1"}, "SLURM_GPUS_PER_TASK=1"),
    # A CPU job on the local SLURM cluster: task variables, no GPU ones.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_CPUS_PER_TASK": "1",
      "SLURM_TRES_PER_TASK": "cpu=1", "CUDA_VISIBLE_DEVICES": ""}, None),
])
def test_what_asks_for_gpus(env, reason):
    assert gpu_check.gpu_requested(env) == reason


@pytest.mark.parametrize("driver, supports, fits, choice", [
    ("580.82.07", "13.0", "13.0", ("13.0", gpu_check.NATIVELY)),
    ("575.51.03", "12.9", "12.9", ("12.9", gpu_check.NATIVELY)),
    ("570.86.10", "12.8", "12.8", ("12.8", gpu_check.NATIVELY)),
    ("570.25", "12.6", "12.6", ("12.6", gpu_check.NATIVELY)),
    ("560.28.03", "12.6", "12.6", ("12.6", gpu_check.NATIVELY)),
    # Older than every build install.sh offers, within the 12.x family: minor-version
    # compatibility runs the newest 12.x build.
    ("550.54.15", "12.4", None, ("12.9", gpu_check.COMPATIBLY)),
    ("535.104.05", "12.2", None, ("12.9", gpu_check.COMPATIBLY)),
    ("525.60.13", "12.0", None, ("12.9", gpu_check.COMPATIBLY)),
    ("520.61.05", None, None, None),   # CUDA 11.8's driver: below the 12.x family
])
def test_newest_cuda_of_a_driver(driver, supports, fits, choice):
    assert gpu_check.newest_cuda(driver) == supports
    assert gpu_check.newest_cuda(driver, installable=True) == fits
    assert gpu_check.install_choice(driver) == choice


@pytest.mark.parametrize("driver, cuda, how", [
    ("550.54.15", "12.8", gpu_check.COMPATIBLY),
    ("570.86.10", "12.8", gpu_check.NATIVELY),
    ("580.82.07", "12.6", gpu_check.NATIVELY),   # an older CUDA on a newer driver
    ("570.86.10", "13.0", None),                 # 13.x needs a 13.x driver (>= 580.65.06)
    ("520.61.05", "12.6", None),
    ("580.82.07", "11.8", None),                 # not in the table: not claimed
])
def test_how_a_driver_runs_a_build(driver, cuda, how):
    assert gpu_check.runs(driver, cuda) == how


def test_family_minimums_come_from_the_one_table():
    assert gpu_check.family_minimum("12.9") == "525.60.13"
    assert gpu_check.family_minimum("13.0") == "580.65.06"
    assert gpu_check.family_minimum("11.8") is None
    assert all(cuda[0].isdigit() and not cuda.endswith(".x")
               for cuda, _, _ in gpu_check.driver_table())


def test_messages_name_torchs_cuda_the_drivers_and_the_fix():
    prefix = ("error: GPUs were asked for (CUDA_VISIBLE_DEVICES=0) but torch sees no usable "
              "CUDA device: ")
    assert gpu_check.no_gpu_message("CUDA_VISIBLE_DEVICES=0", "2.13.0+cu130", "13.0",
                                    "570.86.10") == (
        f"{prefix}torch 2.13.0+cu130 is built for CUDA 13.0, the NVIDIA driver is 570.86.10 "
        "(CUDA up to 12.8); reinstall with `bash scripts/install.sh --gpu --cuda 12.8`")
    # A 550 driver: the newest 12.x build through minor-version compatibility, no upgrade.
    compat = gpu_check.no_gpu_message("SLURM_JOB_GPUS=0", "2.13.0", None, "550.54.15")
    assert "torch 2.13.0 is a CPU-only build, the NVIDIA driver is 550.54.15 (CUDA up to " \
           "12.4); reinstall with `bash scripts/install.sh --gpu --cuda 12.9` (it runs on " \
           "this driver through CUDA minor-version compatibility)" in compat
    old = gpu_check.no_gpu_message("CUDA_VISIBLE_DEVICES=0", "2.13.0+cu130", "13.0",
                                   "520.61.05")
    assert old == (f"{prefix}torch 2.13.0+cu130 is built for CUDA 13.0, the NVIDIA driver is "
                   "520.61.05; upgrade the driver to >= 525.60.13 (the CUDA 12.x builds, "
                   "through minor-version compatibility) or >= 580.65.06 (every build "
                   "natively, --cuda 13.0), then `bash scripts/install.sh --gpu`")
    # torch's CUDA already runs on this driver: reinstalling would not help.
    runs = gpu_check.no_gpu_message("CUDA_VISIBLE_DEVICES=0", "2.13.0+cu129", "12.9",
                                    "550.54.15")
    assert "; this driver runs CUDA 12.9 through CUDA minor-version compatibility, so the " \
           "cause is elsewhere" in runs and "install.sh" not in runs
    none = gpu_check.no_gpu_message("PARCAE_EXPECT_GPU=1", "2.13.0", "13.0", None)
    assert "no NVIDIA driver found" in none and "bash scripts/install.sh --gpu --cuda" in none
    for line in (compat, old, runs, none):
        assert line.startswith("error: ") and "\n" not in line


def stand_in_smi(tmp_path, driver: str) -> str:
    """A PATH whose first directory has an nvidia-smi that prints ``driver``."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {driver}\n")
    smi.chmod(0o755)
    return f"{tmp_path}:{os.environ['PATH']}"


def test_driver_version_reads_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", stand_in_smi(tmp_path, "570.86.10"))
    assert gpu_check.driver_version() == "570.86.10"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_check.driver_version() is None


def test_the_trainer_stops_in_a_gpu_job_without_cuda(tmp_path):
    """``CUDA_VISIBLE_DEVICES=0`` on this CPU machine, with a driver that is too old for this
    torch's CUDA: the tiny run stops before Megatron initialises, with that one line."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore", PATH=stand_in_smi(tmp_path, "570.86.10"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.train", "--config",
                           "configs/parcae-tiny-cpu.yaml", "--save", str(tmp_path / "ckpt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    cuda = torch.version.cuda
    built = f"is built for CUDA {cuda}" if cuda else "is a CPU-only build"
    assert errors == [
        "error: GPUs were asked for (CUDA_VISIBLE_DEVICES=0) but torch sees no usable CUDA "
        f"device: torch {torch.__version__} {built}, the NVIDIA driver is 570.86.10 (CUDA up "
        "to 12.8); reinstall with `bash scripts/install.sh --gpu --cuda 12.8`"], proc.stderr
    assert "initializing torch distributed" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ckpt").exists()
