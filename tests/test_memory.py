"""The per-GPU memory estimate (model/memory.py) against figures computed by hand."""

from __future__ import annotations

import pytest

from parcae_megatron.model.memory import estimate_memory
from parcae_megatron.model.presets import preset_config

P = 1_338_591_744  # parcae-1.3b parameters (paper Table 19)
STACK = 226_518_528  # one stack (8 layers, value-embedding gates included)
MATRICES = 3 * STACK - 2 * 1536 * 24  # minus the two norm vectors of each of the 24 layers
SBD = 2048 * 8 * 1536
LAYER = 34 * SBD  # bf16, flash attention, TP = 1
LOGITS = 2048 * 8 * 32768 * 6  # bf16 logits + fp32 softmax


def test_1p3b_recipe_at_32_gpus():
    cfg = preset_config("parcae-1.3b")
    none = estimate_memory(cfg, micro_batch_size=8, seq_length=2048, dp=32)
    assert none.params == 2 * P and none.grads == 4 * P
    # parcae_muon: master + momentum + parameter-shaped V for the matrices; AdamW master + m
    # + v for the rest; both sharded over 32 DP ranks (Megatron's layer-wise distributed
    # optimizer for Muon beside a distributed AdamW)
    assert none.optimizer_state == round((12 * MATRICES + 12 * (P - MATRICES)) / 32)
    assert none.layers_with_grad == 8 + 8 + 8 * 4
    assert none.activations == 48 * LAYER + LOGITS  # ≈ 41 GB + 3.2 GB (docs/training.md)
    loop = estimate_memory(cfg, micro_batch_size=8, seq_length=2048, dp=32,
                           recompute_loop_iterations=True)
    assert loop.activations == 16 * LAYER + 4 * SBD * 5 + LAYER + LOGITS
    # close to the 0.40x measured by benchmarks/activation_memory.py (layers only)
    assert 0.35 < (loop.activations - LOGITS) / (none.activations - LOGITS) < 0.45
    assert loop.total == loop.params + loop.grads + loop.optimizer_state + loop.activations
    assert 26.8e9 < loop.total < 26.9e9
    table = loop.format_table()
    assert "activations" in table and "total" in table and f"{loop.total / 1e9:8.2f}" in table


def test_layout_precision_and_optimizer_variants():
    cfg = preset_config("transformer-140m")
    p = 143_141_184
    # 6 layers: QKV + output projection + MLP (d = 768, 6 heads of 128, ffn 3072), and the
    # value-embedding gates (6 groups x 32 channels) of the 3 layers with value embeddings
    matrices = 6 * (768 * (768 + 2 * 768) + 768 * 768 + 2 * 768 * 3072) + 3 * 6 * 32
    sbd = 1024 * 4 * 768
    e = estimate_memory(cfg, micro_batch_size=4, seq_length=1024, tp=2, pp=1, dp=1,
                        bf16=False, distributed_optimizer=False, optimizer="adam")
    assert e.params == round(4 * p / 2) and e.grads == round(4 * p / 2)
    assert e.optimizer_state == round(8 * p / 2)  # fp32 Adam: m and v, no master copy
    # TP 2 without sequence parallelism: (10 + 24/2)·sbd per layer, doubled in fp32
    assert e.activations == 6 * (10 * sbd + 12 * sbd) * 2 + 1024 * 4 * 32768 // 2 * 8
    f = estimate_memory(cfg, micro_batch_size=4, seq_length=1024, fp8=True, optimizer="muon",
                        recompute_granularity="full")
    assert f.params == 2 * p + 2 * matrices
    assert f.optimizer_state == 8 * matrices + 12 * (p - matrices)  # dp = 1
    assert f.activations == 6 * 2 * sbd + 34 * sbd + 1024 * 4 * 32768 * 6


def test_bad_arguments():
    cfg = preset_config("parcae-tiny")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_memory(cfg, micro_batch_size=1, seq_length=32, optimizer="sgd")
    with pytest.raises(ValueError, match=">= 1"):
        estimate_memory(cfg, micro_batch_size=0, seq_length=32)
