"""scripts/install.sh --dry-run: the commands each route would run (Transformer Engine cannot
build on a CPU machine, so the GPU route is checked by what it would execute, in order)."""

from __future__ import annotations

import re
import subprocess

from tests.distributed import ROOT


def dry_run(*flags: str) -> list[str]:
    proc = subprocess.run(["bash", "scripts/install.sh", *flags, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_route_is_requirements_then_the_project():
    commands = dry_run()
    assert commands[0].endswith(" -m venv .venv")
    assert commands[1:] == [
        ".venv/bin/python -m pip install --quiet --upgrade pip",
        ".venv/bin/python -m pip install --quiet -r requirements.txt",
        ".venv/bin/python -m pip install --quiet --no-deps -e .",
        ".venv/bin/python -c 'import torch, megatron.core; print(\"torch\", torch.__version__, "
        "\"megatron-core\", megatron.core.__version__)'"]
    assert not any("transformer" in c for c in commands)


def test_gpu_route_builds_pinned_te_after_torch_without_isolation_and_visibly():
    commands = dry_run("--gpu")
    torch_step = commands.index(".venv/bin/python -m pip install --quiet -r requirements.txt")
    te_steps = [i for i, c in enumerate(commands) if "pip install" in c and "transformer" in c]
    assert len(te_steps) == 1
    te = commands[te_steps[0]]
    assert te_steps[0] > torch_step  # torch is there when TE's extension builds against it
    assert "--no-build-isolation" in te and "--quiet" not in te and " -v " in te
    assert "NVTE_FRAMEWORK=pytorch" in te
    pin = re.search(r'"transformer-engine\[pytorch,core_cu\$\{CUDA_MAJOR\}\]==([0-9.]+)"', te)
    assert pin, te
    required = (ROOT / "requirements-gpu.txt").read_text()
    assert f"transformer-engine[pytorch]=={pin.group(1)}" in required.splitlines()
    # The CUDA major of the installed torch picks TE's core wheel, probed before the build.
    probe = commands.index(next(c for c in commands if c.startswith("CUDA_MAJOR=")))
    assert torch_step < probe < te_steps[0]
    assert "torch.version.cuda" in commands[probe]
    # The editable project and the import checks (TE's included) come last.
    assert commands[te_steps[0] + 1] == ".venv/bin/python -m pip install --quiet --no-deps -e ."
    assert "import transformer_engine.pytorch" in commands[-1]


def test_unknown_option_is_one_error_line():
    proc = subprocess.run(["bash", "scripts/install.sh", "--gpus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown option --gpus")
