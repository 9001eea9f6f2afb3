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
