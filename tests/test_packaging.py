"""The project is installed (scripts/install.sh: `pip install -e . --no-deps`): its modules,
benchmarks, console commands and documented config paths work from any directory.

Subprocesses run with ``cwd`` outside the checkout and the environment as given, so they rely
on the installation, not on the repository root being the working directory (pytest's own
``pythonpath = .`` applies to this process only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.distributed import ROOT

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")


def run(tmp_path: Path, *cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_a_benchmark_runs_outside_the_checkout(tmp_path):
    """`python benchmarks/loop_overhead.py` (the documented usage) imports parcae_megatron
    with neither the checkout as working directory nor PYTHONPATH pointing at it."""
    proc = run(tmp_path, sys.executable, str(ROOT / "benchmarks" / "loop_overhead.py"), "--help")
    assert "--quick" in proc.stdout


def test_documented_config_path_resolves_outside_the_checkout(tmp_path, monkeypatch):
    from parcae_megatron.paths import resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/parcae-1.3b.yaml") == ROOT / "configs" / "parcae-1.3b.yaml"
    assert not resolve_config("configs/nope.yaml").is_file()


def test_console_commands_are_installed(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    bin_dir = Path(sysconfig.get_path("scripts"))
    if not (bin_dir / "parcae-train").exists():
        pytest.skip(f"the project is not installed in {sys.prefix} "
                    "(scripts/install.sh installs it; .ci/run does)")
    assert all((bin_dir / name).exists() for name in scripts), sorted(scripts)
    proc = run(tmp_path, str(bin_dir / "parcae-submit"), "--help")
    assert "--config" in proc.stdout
