"""scripts/install.sh --dry-run: the commands each route would run (Transformer Engine cannot
build on a CPU machine, so the GPU and container routes are checked by what they would
execute, in order). An ``nvidia-smi`` stand-in on PATH plays the driver."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import container_pins  # noqa: E402

CHECK = (".venv/bin/python -c 'import torch, megatron.core; print(\"torch\", torch.__version__, "
         "\"CUDA\", torch.version.cuda, \"megatron-core\", megatron.core.__version__)'")


def install(*flags: str, driver: str | None = None, tmp: Path | None = None
            ) -> subprocess.CompletedProcess:
    """``bash scripts/install.sh FLAGS --dry-run``; with ``driver``, an nvidia-smi stand-in
    that prints it comes first on PATH (without, PATH has no nvidia-smi at all)."""
    env = dict(os.environ)
    if driver is not None:
        assert tmp is not None
        smi = tmp / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho {driver}\n")
        smi.chmod(0o755)
        env["PATH"] = f"{tmp}:{env['PATH']}"
    return subprocess.run(["bash", "scripts/install.sh", *flags, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def commands(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_route_is_requirements_then_the_project():
    steps = commands(install())
    assert steps[0].endswith(" -m venv .venv")
    assert steps[1:] == [
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        ".venv/bin/python -m pip install --quiet -r requirements.txt",
        ".venv/bin/python -m pip install --quiet --no-deps -e .",
        CHECK]
    assert not any("transformer" in c or "download.pytorch.org" in c for c in steps)


def test_gpu_route_installs_torch_for_the_chosen_cuda_then_te_for_its_major(tmp_path):
    steps = commands(install("--gpu", "--cuda", "12.8", driver="570.86.10", tmp=tmp_path))
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.startswith("torch=="))
    torch_step = steps.index(".venv/bin/python -m pip install --quiet --force-reinstall "
                             "--index-url "
                             f"https://download.pytorch.org/whl/cu128 {pinned}")
    cuda_check = torch_step + 1
    assert "torch.version.cuda" in steps[cuda_check] and "'12.8'" in steps[cuda_check]
    requirements = steps.index(".venv/bin/python -m pip install --quiet -r requirements.txt")
    te_steps = [i for i, c in enumerate(steps) if "pip install" in c and "transformer" in c]
    assert len(te_steps) == 1 and torch_step < cuda_check < requirements < te_steps[0]
    te = steps[te_steps[0]]
    assert te.startswith("env NVTE_FRAMEWORK=pytorch .venv/bin/python -m pip install "
                         "--no-build-isolation -v ")
    pin = re.search(r"'transformer-engine\[pytorch,core_cu12\]==([0-9.]+)'", te)
    assert pin, te
    required = (ROOT / "requirements-gpu.txt").read_text()
    assert f"transformer-engine[pytorch]=={pin.group(1)}" in required.splitlines()
    # The editable project and the import checks (TE's included) come last.
    assert steps[te_steps[0] + 1:] == [
        ".venv/bin/python -m pip install --quiet --no-deps -e .", CHECK,
        ".venv/bin/python -c 'import transformer_engine.pytorch as te, transformer_engine; "
        "print(\"transformer-engine\", transformer_engine.__version__)'"]


@pytest.mark.parametrize("driver, cuda, te", [
    ("570.86.10", "128", "core_cu12"),   # CUDA 12.8's driver; 12.9 needs 575.51.03
    ("575.57.08", "129", "core_cu12"),
    ("580.82.07", "130", "core_cu13"),
    ("560.35.03", "126", "core_cu12"),
])
def test_without_cuda_the_driver_picks_the_newest_build_it_runs(tmp_path, driver, cuda, te):
    proc = install("--gpu", driver=driver, tmp=tmp_path)
    steps = commands(proc)
    assert any(f"https://download.pytorch.org/whl/cu{cuda} torch==" in c for c in steps)
    assert any(f"[pytorch,{te}]" in c for c in steps)
    assert f"NVIDIA driver {driver}: installing the CUDA " in proc.stdout
    assert "note:" not in proc.stdout  # a build the driver runs natively


def compat_note(driver: str, supports: str, cuda: str) -> str:
    return (f"note: NVIDIA driver {driver} supports CUDA up to {supports} natively; the CUDA "
            f"{cuda} build runs on it through CUDA minor-version compatibility (limited: no JIT "
            "of PTX newer than the driver's CUDA); confirm on a GPU node with "
            "`.venv/bin/python benchmarks/gpu_acceptance.py`")


@pytest.mark.parametrize("driver, supports", [("535.104.05", "12.2"), ("550.54.15", "12.4"),
                                              ("525.60.13", "12.0")])
def test_a_driver_older_than_every_build_gets_the_newest_12x_build_with_a_note(
        tmp_path, driver, supports):
    """No build here runs natively on it, but the 12.x family's minimum (525.60.13) is met:
    the newest 12.x build, through minor-version compatibility, said in one note line."""
    proc = install("--gpu", driver=driver, tmp=tmp_path)
    steps = commands(proc)
    assert any("https://download.pytorch.org/whl/cu129 torch==" in c for c in steps)
    assert any("[pytorch,core_cu12]" in c for c in steps)
    lines = proc.stdout.splitlines()
    chosen = lines.index(f"NVIDIA driver {driver}: installing the CUDA 12.9 build "
                         "(pass --cuda to choose)")
    assert lines[chosen + 1] == compat_note(driver, supports, "12.9")
    assert [line for line in lines if line.startswith("note:")] == [lines[chosen + 1]]
    assert (ROOT / "benchmarks" / "gpu_acceptance.py").is_file()  # the script the note names


@pytest.mark.parametrize("driver, cuda, supports", [
    ("550.54.15", "12.8", "12.4"),
    ("565.57.01", "12.8", "12.6"),
    ("570.25", "12.8", "12.6"),   # a hair below 12.8's GA driver
    ("535.104.05", "12.6", "12.2"),
])
def test_a_driver_below_the_cudas_own_but_in_its_family_proceeds_with_a_note(
        tmp_path, driver, cuda, supports):
    proc = install("--gpu", "--cuda", cuda, driver=driver, tmp=tmp_path)
    steps = commands(proc)
    assert any(f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')} torch==" in c
               for c in steps)
    assert [line for line in proc.stdout.splitlines() if not line.startswith("+ ")][0] == \
        compat_note(driver, supports, cuda)
    assert proc.stdout.count("note:") == 1 and proc.stderr == ""


UPGRADE = ("upgrade the driver to >= 525.60.13 (the CUDA 12.x builds, through minor-version "
           "compatibility) or >= 580.65.06 (every build natively, --cuda 13.0)")


@pytest.mark.parametrize("driver, cuda, expected", [
    # The driver's own CUDA first, as without --cuda (12.9 would run too, with a limited set).
    ("570.86.10", "13.0", "error: CUDA 13.0 needs NVIDIA driver >= 580.65.06, this node has "
     "570.86.10 (CUDA up to 12.8): use --cuda 12.8"),
    ("575.57.08", "13.0", "error: CUDA 13.0 needs NVIDIA driver >= 580.65.06, this node has "
     "575.57.08 (CUDA up to 12.9): use --cuda 12.9"),
    ("550.54.15", "13.0", "error: CUDA 13.0 needs NVIDIA driver >= 580.65.06, this node has "
     "550.54.15 (CUDA up to 12.4): use --cuda 12.9 (through minor-version compatibility)"),
    ("520.61.05", "12.8", "error: CUDA 12.8 needs NVIDIA driver >= 570.26 (>= 525.60.13 "
     f"through minor-version compatibility), this node has 520.61.05: {UPGRADE}"),
])
def test_a_driver_too_old_for_the_cuda_is_one_error_line(tmp_path, driver, cuda, expected):
    proc = install("--gpu", "--cuda", cuda, driver=driver, tmp=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == expected
    assert "+ " not in proc.stdout  # refused before any command


def test_a_driver_older_than_every_family_and_no_driver_at_all_are_refused(tmp_path):
    proc = install("--gpu", driver="520.61.05", tmp=tmp_path)
    assert proc.returncode == 1 and "+ " not in proc.stdout
    assert proc.stderr == ("error: NVIDIA driver 520.61.05 is older than every CUDA build "
                           f"installed here: {UPGRADE}\n")
    proc = subprocess.run(["bash", "scripts/install.sh", "--gpu", "--dry-run"], cwd=ROOT,
                          env=dict(os.environ, PATH="/usr/bin:/bin"), capture_output=True,
                          text=True, timeout=60)
    if proc.returncode == 0:  # an nvidia-smi in /usr/bin: this is a GPU machine
        pytest.skip("this machine has nvidia-smi")
    assert proc.stderr.startswith("error: no working nvidia-smi here to read the driver "
                                  "version from: pass --cuda 12.6|12.8|12.9|13.0")


def test_a_failing_nvidia_smi_is_no_driver_reading(tmp_path):
    """nvidia-smi without a working driver prints its complaint on stdout: not a version."""
    failing = '"NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver"'
    proc = install("--gpu", driver=failing, tmp=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no working nvidia-smi")
    steps = commands(install("--gpu", "--cuda", "12.9", driver=failing, tmp=tmp_path))
    assert any("https://download.pytorch.org/whl/cu129 torch==" in c for c in steps)


def test_container_route_keeps_the_images_cuda_stack():
    steps = commands(install("--container"))
    assert steps == [
        "python3 -m venv --system-site-packages .venv",
        ".venv/bin/python scripts/container_pins.py requirements.txt "
        ".venv/container-constraints.txt .venv/container-requirements.txt",
        "env PIP_CONSTRAINT= .venv/bin/python -m pip install --quiet "
        "-c .venv/container-constraints.txt -r .venv/container-requirements.txt",
        "env PIP_CONSTRAINT= .venv/bin/python -m pip install --quiet --no-deps -e .",
        CHECK,
        ".venv/bin/python -c 'import transformer_engine.pytorch as te, transformer_engine; "
        "print(\"transformer-engine\", transformer_engine.__version__)'"]
    assert not any("download.pytorch.org" in c or "requirements-gpu" in c for c in steps)


def test_container_pins_cover_the_cuda_stack_and_leave_the_rest():
    image = [("torch", "2.8.0a0+5228986c39.nv25.6"), ("transformer_engine", "2.4.0+3cd6870"),
             ("apex", "0.1"), ("pytorch-triton", "3.3.0+git96316ce5"),
             ("nvidia-cudnn-frontend", "1.12.0"), ("numpy", "1.26.4"), ("torchmetrics", "1.0"),
             ("Flash_Attn", "2.7.3")]
    pins = container_pins.stack_pins(image)
    assert pins == ["apex==0.1", "flash-attn==2.7.3", "nvidia-cudnn-frontend==1.12.0",
                    "pytorch-triton==3.3.0+git96316ce5", "torch==2.8.0a0+5228986c39.nv25.6",
                    "transformer-engine==2.4.0+3cd6870"]
    requirements = (ROOT / "requirements.txt").read_text()
    rest = container_pins.without(requirements, {p.split("==")[0] for p in pins})
    assert not any(line.startswith("torch") for line in rest.splitlines())
    assert "megatron-core==0.19.2" in rest.splitlines()
    assert len(rest.splitlines()) == len(requirements.splitlines()) - 1


def test_container_pins_refuse_a_python_without_the_images_stack(tmp_path):
    """This venv's torch (CPU-only, or PyPI's CUDA build) comes without Transformer Engine."""
    proc = subprocess.run([sys.executable, "scripts/container_pins.py", "requirements.txt",
                           str(tmp_path / "c.txt"), str(tmp_path / "r.txt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(("error: no Transformer Engine in this image",
                                   "error: torch ")), proc.stderr
    assert not (tmp_path / "c.txt").exists() and not (tmp_path / "r.txt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--gpus"], "error: unknown option --gpus"),
    (["--gpu", "--cuda", "12.4"], "error: --cuda 12.4 is not one of 12.6, 12.8, 12.9, 13.0"),
    (["--cuda", "12.8"], "error: --cuda goes with --gpu"),
    (["--gpu", "--container"], "error: --gpu and --container are two routes"),
])
def test_bad_options_are_one_error_line(flags, message):
    proc = subprocess.run(["bash", "scripts/install.sh", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1
