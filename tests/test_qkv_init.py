"""Parcae's QKV init under grouped-query attention (docs/design.md §5: Q, K and V each orthogonal).

Megatron's fused QKV weight holds, per query group, the rows of that group's query heads, then
its key head, then its value head. Every Q, K and V head must be a block of rows of an
orthogonal Q, K or V matrix, at any heads / groups ratio, and a TP=2 shard (built on
Megatron's GPU-style init path, which sees only the shard) must equal its slice of the TP=1
weight."""

from __future__ import annotations

import math

import pytest
import torch

from parcae_megatron.model import ParcaeModel
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from tests.dist.qkv_init_worker import qkv_config
from tests.distributed import torchrun

CASES = [(4, 1, 16, 64), (8, 2, 8, 64), (6, 6, 16, 96)]  # heads, groups, head dim, hidden


def split_qkv(weight: torch.Tensor, heads: int, groups: int, hd: int):
    """Q [heads·hd, d], K and V [groups·hd, d] from Megatron's per-group fused layout."""
    per_group = heads // groups
    blocks = weight.view(groups, (per_group + 2) * hd, -1)
    q, k, v = blocks.split([per_group * hd, hd, hd], dim=1)
    return (q.reshape(heads * hd, -1), k.reshape(groups * hd, -1), v.reshape(groups * hd, -1))


def build_qkv(heads: int, groups: int, hd: int, hidden: int) -> torch.Tensor:
    model = ParcaeModel(qkv_config(heads, groups, hd, hidden), get_parcae_layer_local_spec())
    return model.prelude.layers[0].self_attention.linear_qkv.weight.detach()


@pytest.mark.parametrize("heads,groups,hd,hidden", CASES, ids=["4-1", "8-2", "6-6"])
def test_every_qkv_head_orthogonal(megatron_single, heads, groups, hd, hidden):
    weight = build_qkv(heads, groups, hd, hidden)
    assert weight.shape == ((heads + 2 * groups) * hd, hidden)
    std = math.sqrt(2 / (5 * hidden))
    for name, part, n in zip("QKV", split_qkv(weight, heads, groups, hd),
                             (heads, groups, groups)):
        # The whole matrix is (semi-)orthogonal with entry RMS std …
        svals = torch.linalg.svdvals(part)
        expect = std * math.sqrt(max(part.shape))
        assert torch.allclose(svals, torch.full_like(svals, expect), rtol=1e-4), name
        # … so every head's hd rows are orthogonal to each other (and, when the matrix is
        # not taller than wide, to every other head's rows).
        gram = part @ part.T / expect**2
        if part.shape[0] <= part.shape[1]:
            assert torch.allclose(gram, torch.eye(len(gram)), atol=1e-4), name
        for h in range(n):
            rows = slice(h * hd, (h + 1) * hd)
            assert torch.allclose(gram[rows, rows], torch.eye(hd), atol=1e-4), (name, h)


@pytest.mark.slow
def test_tp2_shards_are_tp1_slices(megatron_single, tmp_path):
    tp_cases = [c for c in CASES if c[1] % 2 == 0]  # TP=2 splits the groups
    spec = ";".join(",".join(map(str, c)) for c in tp_cases)
    torchrun(2, "tests/dist/qkv_init_worker.py", "--cases", spec, "--out", str(tmp_path),
             timeout=900)
    for heads, groups, hd, hidden in tp_cases:
        full = build_qkv(heads, groups, hd, hidden)
        shards = [torch.load(tmp_path / f"qkv-{heads}-{groups}-r{r}.pt") for r in range(2)]
        assert not torch.equal(shards[0], shards[1])
        for rank, shard in enumerate(shards):
            rows = full.shape[0] // 2
            assert torch.equal(shard, full[rank * rows:(rank + 1) * rows]), (heads, groups, rank)
        # Each shard is whole groups, so Megatron's per-rank split gives heads of full Q/K/V.
        q_half, k_half, v_half = split_qkv(shards[1], heads // 2, groups // 2, hd)
        q, k, v = split_qkv(full, heads, groups, hd)
        assert torch.equal(q_half, q[heads * hd // 2:])
        assert torch.equal(k_half, k[groups * hd // 2:])
        assert torch.equal(v_half, v[groups * hd // 2:])
