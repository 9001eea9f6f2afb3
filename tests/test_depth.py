"""Depth sampling: distribution, truncation, keys (TP/PP-identical, DP/micro-batch-distinct),
reproducibility and resume state."""

from __future__ import annotations

import math

import torch

from parcae_megatron.model import preset_config
from parcae_megatron.model.depth import (
    DepthSampler,
    depth_generator,
    expected_max_depth,
    sample_depths,
)


def test_per_sequence_poisson_truncated_at_one():
    gen = torch.Generator().manual_seed(0)
    d = sample_depths("per_sequence", 200_000, 8, 4, gen)
    assert int(d.total.min()) >= 1
    assert torch.equal(d.grad, d.total.clamp_max(4))
    assert torch.equal(d.no_grad + d.grad, d.total)
    # E[max(1, Poisson(8))] = 8 + P(N=0) = 8 + e^-8; sd of the mean = sqrt(8/2e5) ≈ 0.0063
    assert abs(float(d.total.float().mean()) - (8 + math.exp(-8))) < 0.03
    assert abs(float(d.total.float().var()) - 8.0) < 0.15
    # P(T = 1) = P(N=0) + P(N=1) = 9 e^-8
    assert abs(float((d.total == 1).float().mean()) - 9 * math.exp(-8)) < 5e-4


def test_expected_max_depth_matches_spec():
    # spec §2.1: E[max_i T_i] ≈ 14.4 for 32 sequences and ≈ 12.2 for 8 (Poisson(8))
    assert round(expected_max_depth(8, 32), 1) == 14.4
    assert round(expected_max_depth(8, 8), 1) == 12.2
    gen = torch.Generator().manual_seed(1)
    maxes = [int(sample_depths("per_sequence", 32, 8, 4, gen).total.max()) for _ in range(4000)]
    assert abs(sum(maxes) / len(maxes) - expected_max_depth(8, 32)) < 0.1


def test_per_batch_and_fixed():
    gen = torch.Generator().manual_seed(2)
    draws = [sample_depths("per_batch", 4, 8, 4, gen) for _ in range(3000)]
    for d in draws[:20]:
        assert len(set(d.total.tolist())) == 1 and set(d.grad.tolist()) == {4}
    # n ~ Poisson(e^τ) + 1 with E[e^τ] = μ_rec - μ_bwd, so E[T] = μ_rec + 1
    mean_total = sum(float(d.total[0]) for d in draws) / len(draws)
    assert abs(mean_total - 9.0) < 0.2
    fixed = sample_depths("fixed", 3, 8, 4, gen)
    assert fixed.total.tolist() == [8, 8, 8] and fixed.grad.tolist() == [4, 4, 4]


def test_keys_identical_across_model_parallel_ranks_distinct_across_replicas():
    cfg = preset_config("parcae-tiny")
    # Two TP/PP ranks of the same replica construct samplers with the same DP coordinates.
    a, b = DepthSampler(cfg, dp_rank=1, dp_size=2), DepthSampler(cfg, dp_rank=1, dp_size=2)
    other = DepthSampler(cfg, dp_rank=0, dp_size=2)
    for s in (a, b, other):
        s.start_step(5)
    da, ga = a.next(64)
    db, gb = b.next(64)
    do, _ = other.next(64)
    assert torch.equal(da.total, db.total)
    assert ga == gb  # the h0 seed
    assert not torch.equal(da.total, do.total)
    assert not torch.equal(a.next(64)[0].total, da.total)  # next micro-batch differs


def test_dp_layout_invariance_and_resume():
    cfg = preset_config("parcae-tiny")
    single = DepthSampler(cfg)
    single.start_step(3)
    one = [single.next(8)[0].total for _ in range(4)]
    # DP=2: replica r's local micro-batch j is global micro-batch j*2 + r
    for r in range(2):
        s = DepthSampler(cfg, dp_rank=r, dp_size=2)
        s.start_step(3)
        for j in range(2):
            assert torch.equal(s.next(8)[0].total, one[j * 2 + r])
    # resume: restoring the state reproduces the next draw
    single.start_step(3)
    single.next(8)
    state = single.state_dict()
    expected = single.next(8)[0].total
    fresh = DepthSampler(cfg)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next(8)[0].total, expected)
    g1, g2, g3 = depth_generator(1, 2, 3), depth_generator(1, 2, 3), depth_generator(2, 2, 3)
    x1, x2, x3 = (torch.randint(0, 2**30, (4,), generator=g) for g in (g1, g2, g3))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
