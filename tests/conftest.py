"""Shared fixtures: one single-process Megatron setup (gloo, CPU backend) per test session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def megatron_single():
    """torch.distributed (world 1) + Megatron parallel state with TP = PP = 1."""
    from parcae_megatron.platform.dist import init_distributed

    init_distributed(1, 1, seed=1234)
    yield


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter so zero-initialised projections do real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main job at its default length (300 steps), run once per session and
    shared by the quickstart, conversion and evaluation tests: (run dir, stdout)."""
    import subprocess
    import sys

    from tests.distributed import ROOT

    run_dir = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.quickstart", "--run-dir",
                           str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run_dir, proc.stdout
