"""Parcae's "scaled-zero" orthogonal initialisation (spec §1.7).

Matrices are truncated-normal draws orthogonalised by QR and scaled by
``std * sqrt(max(rows, cols))`` so their entries have RMS ≈ std, with
std = sqrt(2 / (5 d)). Attention-out and MLP-down projections start at zero.
The callables follow Megatron's ``init_method(tensor)`` convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


@torch.no_grad()
def _orthogonal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    if tensor.device.type == "meta":
        return tensor
    rows, cols = tensor.shape
    draw = torch.nn.init.trunc_normal_(torch.empty(rows, cols, dtype=torch.float32),
                                       std=1.0, a=-3.0, b=3.0)
    tall = draw if rows >= cols else draw.T
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    q = q if rows >= cols else q.T
    tensor.copy_(q * (std * math.sqrt(max(rows, cols))))
    return tensor


def orthogonal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Megatron init_method: scaled orthogonal matrix with entry RMS ``std``."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return _orthogonal_(tensor, std)

    init_.std = std  # lets callers (and tests) read the scale back
    return init_


def qkv_orthogonal_init(head_dim: int, std: float) -> Callable:
    """Init for Megatron's fused QKV weight: Q, K and V are each orthogonal (spec §1.7).

    Megatron lays the fused weight out per head as [q, k, v] rows; a shard holding whole
    heads (GPU init under TP) is handled the same way.
    """

    @torch.no_grad()
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        rows, cols = tensor.shape
        if rows % (3 * head_dim):
            return _orthogonal_(tensor, std)
        heads = rows // (3 * head_dim)
        parts = []
        for _ in range(3):
            part = torch.empty(heads * head_dim, cols, dtype=torch.float32)
            parts.append(_orthogonal_(part, std).view(heads, 1, head_dim, cols))
        tensor.copy_(torch.cat(parts, dim=1).view(rows, cols))
        return tensor

    init_.std = std
    return init_


@torch.no_grad()
def zeros_init(tensor: torch.Tensor) -> torch.Tensor:
    """Megatron init_method that zeroes the tensor (attention-out / MLP-down projections)."""
    if tensor.device.type != "meta":
        tensor.zero_()
    return tensor


def truncated_normal_(tensor: torch.Tensor, std: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Truncated normal at ±3σ (the `like_init` loop-state draw, spec §1.6)."""
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std,
                                       generator=generator)
