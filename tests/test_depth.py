"""Depth sampling: distribution, truncation, keys (TP/PP-identical, DP/micro-batch-distinct),
reproducibility and resume state."""

from __future__ import annotations

import math

import pytest
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
    # docs/design.md §4.2: E[max_i T_i] ≈ 14.4 for 32 sequences and ≈ 12.2 for 8 (Poisson(8))
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


# ---- loop-balanced data parallelism (depth_balance='global') -------------------------------

def _balance_group(replicas: int, microbatches: int, batch: int):
    """Every element of the balance-preserving group H as a map layout -> layout."""
    import itertools

    rep = list(itertools.permutations(range(replicas)))
    cell = list(itertools.product(itertools.permutations(range(microbatches)),
                                  repeat=replicas))
    pos = list(itertools.product(itertools.permutations(range(batch)),
                                 repeat=replicas * microbatches))
    for pr in rep:
        for pc in cell:
            for pp in pos:
                def apply(layout, pr=pr, pc=pc, pp=pp):
                    out = layout[list(pr)].clone()
                    for r in range(replicas):
                        out[r] = out[r, list(pc[r])]
                        for j in range(microbatches):
                            out[r, j] = out[r, j, list(pp[r * microbatches + j])]
                    return out
                yield apply


def test_balanced_dealing_keeps_marginal_exactly_by_enumeration():
    """Exact check of the argument in depth_balance.py on a 3-point law: every slot of the
    symmetrised layout has the draws' law; the bare balanced layout does not."""
    import itertools

    from parcae_megatron.model.depth_balance import balanced_layout

    law = {1: 0.2, 2: 0.5, 7: 0.3}
    for shape in ((2, 1, 2), (2, 2, 1), (1, 2, 2)):
        group = list(_balance_group(*shape))
        size = math.prod(shape)
        sym = torch.zeros(size, 3, dtype=torch.float64)
        bare = torch.zeros(size, 3, dtype=torch.float64)
        values = sorted(law)
        for draw in itertools.product(values, repeat=size):
            p = math.prod(law[v] for v in draw)
            layout = balanced_layout(list(draw), *shape)
            onehot = torch.stack([(layout.flatten() == v) for v in values], 1).double()
            bare += p * onehot
            for g in group:
                sym += p / len(group) * torch.stack(
                    [(g(layout).flatten() == v) for v in values], 1).double()
        expected = torch.tensor([law[v] for v in values], dtype=torch.float64)
        assert torch.allclose(sym, expected.expand_as(sym), atol=1e-12), shape
        assert not torch.allclose(bare, expected.expand_as(bare), atol=1e-3), shape


def test_balanced_dealing_is_balanced():
    from parcae_megatron.model.depth import global_batch_depths

    for replicas, micro, batch in ((32, 1, 8), (8, 4, 8), (32, 8, 1)):
        worst = 0.0
        for step in range(20):
            layout = global_batch_depths(7, step, 8, replicas, micro, batch)
            load = layout.sum((1, 2)).float()
            worst = max(worst, float(load.max() / load.mean()))
            # the `replicas` largest depths sit in distinct replicas
            top = layout.flatten().sort(descending=True).values[replicas - 1]
            assert int((layout > top).flatten(1).any(1).sum()) == int((layout > top).sum())
        assert worst <= 1.05, (replicas, micro, batch, worst)


def test_global_sampler_marginal_chi_square():
    """Each slot (replica, micro-batch, position) of the real sampler follows
    max(1, Poisson(8)) (chi-square per slot); the unsymmetrised layout fails the same test."""
    from scipy.stats import chi2, poisson

    from parcae_megatron.model.depth import global_batch_depths
    from parcae_megatron.model.depth_balance import balanced_layout

    replicas, micro, batch, steps, mu = 4, 2, 4, 800, 8
    dealt = torch.stack([global_batch_depths(11, s, mu, replicas, micro, batch)
                         for s in range(steps)]).flatten(1)  # [steps, slots]
    bare = torch.stack([balanced_layout(row.tolist(), replicas, micro, batch).flatten()
                        for row in dealt])
    edges = list(range(4, 13))  # bins: <=4, 5..12, >=13
    cdf = poisson.cdf(edges, mu)
    probs = torch.tensor([cdf[0], *(cdf[1:] - cdf[:-1]), 1 - cdf[-1]])  # T=max(1,N) <= 4 iff N <= 4

    def p_value(samples: torch.Tensor) -> float:
        binned = torch.bucketize(samples.double(), torch.tensor(edges).double() + 0.5)
        counts = torch.bincount(binned, minlength=len(probs)).double()
        expected = probs.double() * len(samples)
        stat = float(((counts - expected) ** 2 / expected).sum())
        return float(chi2.sf(stat, len(probs) - 1))

    sym_p = [p_value(dealt[:, s]) for s in range(dealt.shape[1])]
    assert min(sym_p) > 1e-4, sym_p  # 32 slots, deterministic seeds
    means = dealt.double().mean(0)
    assert float((means - (mu + math.exp(-mu))).abs().max()) < 0.3
    assert min(p_value(bare[:, s]) for s in range(bare.shape[1])) < 1e-20


def test_global_sampler_slices_resume_and_dp_invariance():
    cfg = preset_config("parcae-tiny", mean_recurrence=8, depth_balance="global")
    from parcae_megatron.model.depth import global_batch_depths

    # The step's multiset of depths does not depend on the DP layout (global batch 32).
    multisets = [global_batch_depths(cfg.depth_seed, 4, 8, r, 32 // (r * 4), 4).flatten()
                 .sort().values for r in (1, 2, 8)]
    assert all(torch.equal(multisets[0], m) for m in multisets[1:])
    # Each replica's sampler returns its slice, micro-batch by micro-batch, identically on
    # every TP/PP rank of the replica; resume from a state reproduces the next draw.
    layout = global_batch_depths(cfg.depth_seed, 4, 8, 2, 3, 4)
    for r in range(2):
        a, b = DepthSampler(cfg, dp_rank=r, dp_size=2), DepthSampler(cfg, dp_rank=r, dp_size=2)
        for s in (a, b):
            s.start_step(4, num_microbatches=3)
        for j in range(3):
            da, ga = a.next(4)
            db, gb = b.next(4)
            assert torch.equal(da.total, layout[r, j]) and torch.equal(da.total, db.total)
            assert torch.equal(da.grad, da.total.clamp_max(cfg.mean_backprop_depth))
            assert ga == gb  # the h0 seed, identical on every TP/PP rank of the replica
        with pytest.raises(RuntimeError, match="announced 3"):
            a.next(4)
    s = DepthSampler(cfg, dp_rank=1, dp_size=2)
    s.start_step(4, 3)
    s.next(4)
    fresh = DepthSampler(cfg, dp_rank=1, dp_size=2)
    fresh.load_state_dict(s.state_dict())
    fresh.num_microbatches = 3
    assert torch.equal(fresh.next(4)[0].total, s.next(4)[0].total)


def test_global_balance_needs_per_sequence_sampling():
    from parcae_megatron.model.config import ParcaeConfigError

    with pytest.raises(ParcaeConfigError, match="depth_balance 'global'.*per_sequence"):
        preset_config("parcae-tiny", depth_balance="global", depth_sampling="per_batch")
