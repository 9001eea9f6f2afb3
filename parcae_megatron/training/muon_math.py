"""The authors' Muon update (docs/design.md §6.1) as pure functions of tensors: no Megatron imports.

One step on a 2-D matrix W (rows × cols) with gradient G, as in the released MuonAdamW:

1. Nesterov momentum: M ← lerp(M, G, 1−μ); U ← lerp(G, M, μ) (``momentum_update_``). μ is
   warmed up linearly from 0.85 to 0.95 over the first 300 optimizer steps (``momentum_at``).
2. Polar Express: X = U / (1.02·‖U‖_F + 1e-6), then 5 fixed-coefficient quintic iterations
   in bf16 (the authors') or fp32 (``polar_express``).
3. Factored variance reduction (NorMuon style): with d the longer axis (cols if rows ≥ cols),
   m = mean_d(X²); V ← lerp(V, m, 1−β₂); X ← X·rsqrt(max(V, 1e-10)), rescaled so that
   ‖X‖_F is unchanged (``variance_rescale``).
4. Cautious decoupled weight decay with the per-matrix LR multiplier s = √max(1, rows/cols):
   W ← W − lr·s·(X + wd·W·[X·W ≥ 0]) (``cautious_step_``).

Steps 2-3 run per matrix; a fused QKV parameter is three matrices (``orthogonalised_update``).
The Megatron optimizer around these functions is ``training/muon_optimizer.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Polar Express coefficients of the released MuonAdamW (5 iterations).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
VARIANCE_EPS = 1e-10
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --muon-ns-dtype


@torch.no_grad()
def momentum_update_(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float,
                     nesterov: bool) -> torch.Tensor:
    """Step 1: advance ``momentum_buffer`` in place; returns the update U to orthogonalise."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer.clone()


def polar_express(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximate orthogonal polar factor of a 2-D matrix (returned in fp32)."""
    x = update.to(dtype)
    x = x / (x.norm() * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.float()


def reduce_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """Axis the second moment averages over: the columns unless the matrix is wide."""
    return -1 if shape[-2] >= shape[-1] else -2


def variance_rescale(x: torch.Tensor, moment2: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon-style rescale of the orthogonalised ``x``; updates ``moment2`` in place.

    ``moment2`` has ``x``'s shape with the reduced statistic broadcast along ``reduce_dim``.
    """
    dim = reduce_dim(x.shape)
    v_mean = x.square().mean(dim=dim, keepdim=True)
    norm = (v_mean.sum() * x.size(dim)).sqrt()
    v = moment2.narrow(dim, 0, 1).lerp(v_mean, 1 - beta2)
    moment2.copy_(v.expand_as(moment2))
    scale = v.clamp_min(VARIANCE_EPS).rsqrt()
    new_norm = ((v_mean * x.size(dim)) * scale.square()).sum().sqrt()
    return x * (scale * (norm / new_norm.clamp_min(VARIANCE_EPS)))


def matrix_pieces(shape: tuple[int, int],
                  qkv_split: Sequence[int] | None) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon treats separately in a (global) parameter: q, k, v of a
    fused QKV (Megatron interleaves them per query group), else the parameter itself."""
    rows, cols = shape
    if qkv_split is None:
        return [(rows, cols)]
    groups = rows // sum(qkv_split)
    return [(groups * n, cols) for n in qkv_split]


def lr_multiplier(rows: int, cols: int) -> float:
    """√max(1, rows/cols): the authors' per-matrix LR scale (×2 for the 4d×d up-projection)."""
    return math.sqrt(max(1.0, rows / cols))


def orthogonalised_update(update: torch.Tensor, moment2: torch.Tensor,
                          qkv_split: Sequence[int] | None, beta2: float, steps: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 on a full (unsharded) matrix; returns (X, lr-multiplier column of shape
    (rows, 1)) and updates ``moment2`` in place.

    With ``qkv_split`` (q, k, v row counts per query group) the interleaved pieces of a fused
    QKV are orthogonalised and rescaled as separate matrices.
    """
    rows, cols = update.shape
    if qkv_split is None:
        x = variance_rescale(polar_express(update, steps, dtype), moment2, beta2)
        return x, torch.full((rows, 1), lr_multiplier(rows, cols), dtype=x.dtype,
                             device=x.device)
    total = sum(qkv_split)
    groups = rows // total
    u_parts = update.view(groups, total, cols).split(list(qkv_split), dim=1)
    m_parts = moment2.view(groups, total, cols).split(list(qkv_split), dim=1)
    xs, mults = [], []
    for u, m in zip(u_parts, m_parts, strict=True):
        m_flat = m.reshape(-1, cols)
        x = variance_rescale(polar_express(u.reshape(-1, cols), steps, dtype), m_flat, beta2)
        m.copy_(m_flat.view_as(m))
        xs.append(x.view(groups, -1, cols))
        mults.append(torch.full((groups, u.shape[1], 1), lr_multiplier(*m_flat.shape),
                                dtype=x.dtype, device=x.device))
    return (torch.cat(xs, dim=1).view(rows, cols),
            torch.cat(mults, dim=1).view(rows, 1))


@torch.no_grad()
def cautious_step_(param: torch.Tensor, x: torch.Tensor, lr: float,
                   multiplier: torch.Tensor, weight_decay: float) -> None:
    """Step 4 in place: W ← W − lr·s·(X + wd·W·[X·W ≥ 0]), ``multiplier`` s shaped like X."""
    step_lr = lr * multiplier
    mask = (x * param) >= 0
    param.sub_(step_lr * x + step_lr * weight_decay * param * mask)


def momentum_at(step: float, start: float, end: float, warmup_iters: int) -> float:
    """Linear warm-up of the Muon momentum over ``warmup_iters`` optimizer steps."""
    if warmup_iters <= 0:
        return end
    frac = min(step / warmup_iters, 1.0)
    return start + frac * (end - start)
