"""Parcae's initialisation (docs/design.md §5): one pass sets every parameter from its key.

The whole model, for every preset and variant, has the weights recorded before the pass
replaced per-constructor inits, each kind of parameter is its keyed draw, and TP = 2 and
PP = 2 build the same weights as one process.

Q, K and V are each orthogonal under grouped-query attention: Megatron's fused QKV weight
holds, per query group, the rows of that group's query heads, then its key head, then its
value head. Every Q, K and V head must be a block of rows of an orthogonal Q, K or V
matrix, at any heads / groups ratio, and a TP=2 shard (built on Megatron's GPU-style
path, where each rank initialises only its shard) must equal its slice of the TP=1 weight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.init import (
    InitMethod,
    orthogonal_init,
    parameter_init,
    qkv_orthogonal_init,
)
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from tests.dist.qkv_init_worker import (
    INIT_VARIANTS,
    checkpoint_shards,
    qkv_config,
    variant_model,
)
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


TP_CASES = [c for c in CASES if c[1] % 2 == 0]  # TP=2 splits the groups


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """One two-rank launch for every multi-rank check here: the QKV shards of `TP_CASES` at
    TP = 2, and every init variant at TP = 2 and PP = 2 (tests/dist/qkv_init_worker.py)."""
    out = tmp_path_factory.mktemp("init")
    torchrun(2, "tests/dist/qkv_init_worker.py",
             "--cases", ";".join(",".join(map(str, c)) for c in TP_CASES),
             "--variants", ",".join(INIT_VARIANTS), "--out", str(out), timeout=1800)
    return out


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
def test_tp2_shards_are_tp1_slices(megatron_single, two_rank_run):
    for heads, groups, hd, hidden in TP_CASES:
        full = build_qkv(heads, groups, hd, hidden)
        shards = [torch.load(two_rank_run / f"qkv-{heads}-{groups}-r{r}.pt") for r in range(2)]
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


# ---------------------------------------------------------------------------------------
# The whole model: every parameter from its key, the same on every layout
# ---------------------------------------------------------------------------------------
FINGERPRINTS = Path(__file__).parent / "init_fingerprints.json"
"""Per variant and parameter, (sum, first, last) of the TP=1 initial weights, recorded from
the constructors that initialised the model before the initialisation pass replaced them:
the pass must give the same weights. The gated MLP is not recorded: its fc1 was not keyed
then (its values depended on the layout)."""


def fingerprint(model: torch.nn.Module) -> dict[str, list[float]]:
    """(sum, first entry, last entry) of every parameter, by name."""
    out = {}
    for name, param in model.named_parameters():
        flat = param.detach().double().flatten()
        out[name] = [float(flat.sum()), float(flat[0]), float(flat[-1])]
    return out


# The recorded weights are float32 draws through LAPACK's QR (orthogonal inits) and torch's
# vectorised normal sampler, whose rounding depends on the CPU's instruction set (an AVX-512
# machine differed from the recording one by up to ~1e-5 of a parameter's std in an entry).
# A changed init moves an entry by O(std) and the sum by O(std·√numel), so the tolerance is
# 1e-3 of those.
ROUNDING = 1e-3


@pytest.mark.parametrize("variant", sorted(set(INIT_VARIANTS) - {"parcae-tiny-gated-mlp"}))
def test_init_matches_recorded_weights(megatron_single, variant):
    recorded = json.loads(FINGERPRINTS.read_text())[variant]
    model = variant_model(variant)
    got = fingerprint(model)
    assert sorted(got) == sorted(recorded)
    for name, param in model.named_parameters():
        std = float(param.detach().double().std()) if param.numel() > 1 else 0.0
        scale = [std * math.sqrt(param.numel()), std, std]
        for what, value, want, s in zip(("sum", "first", "last"), got[name], recorded[name],
                                        scale, strict=True):
            assert value == pytest.approx(want, rel=1e-6, abs=max(1e-9, ROUNDING * s)), \
                f"{name} {what}"


def test_init_rederived_from_keys(megatron_single):
    """Each kind of parameter equals its init drawn directly from (seed, key, global shape),
    here at TP = 1 (the layouts are compared with it below); the gated MLP's fc1 is its gate
    and up matrices, each orthogonal."""
    model = variant_model("parcae-tiny-gated-mlp")
    cfg = model.config
    std, seed, d, ffn = cfg.init_method_std, cfg.init_seed, cfg.hidden_size, cfg.ffn_hidden_size
    expected = {
        "embedding.word_embeddings.weight": orthogonal_init(std, seed).bind(
            "embedding.word_embeddings.weight", (cfg.vocab_size, d)),
        "recurrent.layers.1.self_attention.linear_qkv.weight": qkv_orthogonal_init(
            16, 4, std, seed).bind("layers.3.self_attention.linear_qkv.weight", (192, d)),
        "coda.layers.1.self_attention.value_embedding.weight": InitMethod(
            "normal", 1.0, seed, "layers.5.self_attention.value_embedding.weight",
            (cfg.vocab_size, 64)),
        "prelude.layers.1.self_attention.value_embedding.gate_weight": InitMethod(
            "uniform", 1 / math.sqrt(32), seed,
            "layers.1.self_attention.value_embedding.gate_weight", (4, 32)),
        "readout.weight": orthogonal_init(std, seed).bind("readout.weight", (d, d)),
    }
    params = dict(model.named_parameters())
    for name, init in expected.items():
        assert torch.equal(params[name].detach(), init.full()), name
    gate, up = params["coda.layers.0.mlp.linear_fc1.weight"].detach().split(ffn)
    for half in (gate, up):
        svals = torch.linalg.svdvals(half)
        assert torch.allclose(svals, torch.full_like(svals, std * math.sqrt(ffn)), rtol=1e-4)
    assert torch.equal(params["injection.B"].detach(), torch.eye(d))
    assert torch.count_nonzero(params["coda.layers.0.mlp.linear_fc2.weight"]) == 0


def test_init_skips_meta_and_sets_materialised_weights(megatron_single):
    """Built on the meta device the pass leaves the model alone; materialised and passed
    again, it is the model built directly."""
    with torch.device("meta"):  # as describe builds it: no allocation at all
        meta = variant_model("parcae-tiny", use_cpu_initialization=True)
    assert all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights()
    direct = dict(variant_model("parcae-tiny").named_parameters())
    for name, param in meta.named_parameters():
        assert torch.equal(param.detach(), direct[name].detach()), name


def test_every_parameter_needs_an_init_rule():
    with pytest.raises(ValueError, match="no initialisation rule for parameter 'extra.w'"):
        parameter_init("extra.w", preset_config("parcae-tiny"))


def assemble(shards: list[dict]) -> dict[tuple, torch.Tensor]:
    """The global tensors of a checkpoint, put together from shards of one or more ranks (a
    replica must equal what another rank wrote there)."""
    full: dict[tuple, torch.Tensor] = {}
    for shard in shards:
        p = shard["prepend"]
        tensor = full.setdefault((shard["key"], shard["offset"][:p]),
                                 torch.full(shard["shape"][p:], float("nan")))
        window = tensor[tuple(slice(o, o + n) for o, n in zip(shard["offset"][p:],
                                                              shard["data"].shape))]
        written = ~window.isnan()
        assert torch.equal(window[written], shard["data"][written]), shard["key"]
        window.copy_(shard["data"])
    return full


@pytest.mark.slow
def test_init_same_on_every_layout(megatron_single, two_rank_run):
    """TP = 2 and PP = 2 build every variant's weights as the single process does: the
    ranks' checkpoint shards put together are the TP = 1 checkpoint (Megatron's own sharding
    of the checkpoint, so the keys are not the init's), every entry written."""
    for variant in INIT_VARIANTS:
        ref = assemble(checkpoint_shards(variant_model(variant)))
        for layout in ("tp2pp1", "tp1pp2"):
            got = assemble([s for r in range(2) for s in
                            torch.load(two_rank_run / f"init-{variant}-{layout}-r{r}.pt")])
            assert sorted(got) == sorted(ref), (variant, layout)
            for where, tensor in got.items():
                assert not tensor.isnan().any(), (variant, layout, where)
                assert torch.equal(tensor, ref[where]), (variant, layout, where)
