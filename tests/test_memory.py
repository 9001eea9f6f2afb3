"""The per-GPU memory estimate (model/memory.py) against figures computed by hand: Megatron's
buffer padding rules, the activation peak as the larger of forward end and backward, and the
parts of the 1.3B run at 32 GPUs."""

from __future__ import annotations

import pytest
import torch

from parcae_megatron.config_file import load_config
from parcae_megatron.model.memory import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    NCCL_BYTES_PER_COMMUNICATOR,
    NCCL_COMMUNICATORS,
    activation_phases,
    buffer_layouts,
    ddp_bucket_size,
    estimate_memory,
    meta_parameters,
)
from parcae_megatron.model.presets import preset_config
from tests.distributed import ROOT

SBD = 2048 * 8 * 1536  # s·b·d of the 1.3B run at micro-batch 8
LAYER = 34 * SBD  # bf16, flash attention, TP = 1
LOGITS = 2048 * 8 * 32768 * 6  # bf16 logits + fp32 softmax = 128 SBD
# Kept through the loop with loop checkpointing, in fp32 [s, b, d] tensors (4 bytes): the state
# at each of the 4 gradient iterations' inputs, the readout's input, and the diagonal
# injection's drive, fp32 e and B e; the prelude norm's bf16 input (2); the value-embedding
# rows of the 4 recurrent layers 9, 11, 13, 15 that have one (12 groups x 128, bf16: 8).
LOOP_KEPT = 4 * SBD * (4 + 1 + 3) + 2 * SBD + 8 * SBD


def meta(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    """bf16 meta parameters in forward order (2-D: Muon's, 1-D: AdamW's)."""
    return [torch.nn.Parameter(torch.empty(s, dtype=torch.bfloat16, device="meta"))
            for s in shapes]


def test_layer_wise_padding_by_hand(megatron_single):
    # Muon's shard-aligned layout at DP 2: whole matrices per shard, a bucket is DP shards of
    # its most loaded shard's size (rounded to lcm(64, lcm(DP, 128) / DP) = 64).
    params = meta((128, 64), (64, 64), (64, 64))  # 8192 + 4096 + 4096 elements
    [one] = buffer_layouts(params, dp=2, bucket_size=None)
    # one bucket, largest first: shard 0 = the 8192, shard 1 = 4096 + 4096: no padding
    assert (one.numel, one.padded, one.buckets) == (16384, 16384, 1)
    assert one.owned_per_rank == (8192, 8192) and one.state_bytes == 12  # parcae_muon, bf16
    # bucket size 4096: a chunk closes at max(4096, 0.9 · DP · its largest) elements, walking
    # backwards: the two 4096s close at 8192 >= 7372 (a bucket of 2 x 4096); the 8192 alone
    # needs 14745, so it ends the walk as a bucket of 2 x 8192 with shard 1 empty
    [split] = buffer_layouts(params, dp=2, bucket_size=4096)
    assert (split.padded, split.buckets, split.padding) == (8192 + 16384, 2, 0.5)
    assert split.owned_per_rank == (4096 + 8192, 4096)
    # Adam's byte-level layout: starts aligned to 64 elements, bucket end to lcm(DP, 128);
    # backwards: the 30 at 0, the 100 at 64..164, end 164 -> 256
    [adam] = buffer_layouts(meta((100,), (30,)), dp=2, bucket_size=None)
    assert (adam.name, adam.numel, adam.padded) == ("AdamW bf16", 130, 256)
    assert adam.owned_per_rank == (30 + 64, 36) and adam.state_bytes == 12


def test_bucket_size_is_megatrons(megatron_single):
    # One bucket unless the gradient reduce overlaps the backward; then max(40M, 1M · DP)
    assert ddp_bucket_size(10**9, 32) is None
    assert ddp_bucket_size(10**9, 32, overlap_grad_reduce=True) == 40_000_000
    assert ddp_bucket_size(10**9, 64, overlap_grad_reduce=True) == 64_000_000
    assert ddp_bucket_size(10**9, 32, overlap_grad_reduce=True, num_buckets=4) == 250_000_000


def test_peak_is_the_larger_moment(megatron_single):
    cfg = preset_config("parcae-1.3b")
    p = activation_phases(cfg, micro_batch_size=8, seq_length=2048,
                          recompute_loop_iterations=True)
    # forward end: prelude + coda + loop + logits; backward of the loop: prelude + loop + the
    # 8 recurrent layers of the iteration re-run + fp32 gradients of h and of the drive
    assert p.forward_end == 16 * LAYER + LOOP_KEPT + LOGITS  # 714 SBD
    assert p.backward == 8 * LAYER + LOOP_KEPT + 8 * LAYER + 8 * SBD  # 594 SBD
    assert p.peak == p.forward_end and p.layers_with_grad == 48
    # a short prelude and coda: the loop backward is the peak
    short = preset_config("parcae-1.3b", num_prelude_layers=2, num_coda_layers=2)
    q = activation_phases(short, micro_batch_size=8, seq_length=2048,
                          recompute_loop_iterations=True)
    kept = 4 * SBD * 8 + 2 * SBD + 8 * SBD  # rows: recurrent layers 3, 5, 7, 9 of 12
    assert q.forward_end == 4 * LAYER + kept + LOGITS
    assert q.backward == 2 * LAYER + kept + 8 * LAYER + 8 * SBD
    assert q.peak == q.backward > q.forward_end
    # no recompute: every loop layer is kept; the forward end is the peak
    n = activation_phases(cfg, micro_batch_size=8, seq_length=2048)
    assert n.forward_end == 48 * LAYER + LOOP_KEPT + LOGITS


def test_1p3b_at_32_gpus(megatron_single):
    cfg = preset_config("parcae-1.3b")
    params = meta_parameters(cfg)
    run = dict(micro_batch_size=8, seq_length=2048, dp=32, recompute_loop_iterations=True,
               params=params)
    shipped = load_config(ROOT / "configs/parcae-1.3b.yaml")  # no grad-reduce overlap
    assert shipped["overlap-grad-reduce"] is False and "ddp-bucket-size" not in shipped
    assert ddp_bucket_size(1_338_591_744, 32, overlap_grad_reduce=False) is None  # one bucket
    one = estimate_memory(cfg, **run)
    muon, adamw, fp32 = 679_481_856, 654_388_224, 4_721_664  # injection and readout: fp32
    assert muon + adamw + fp32 == 1_338_591_744  # paper Table 19
    by_name = {b.name: b for b in one.buffers}
    assert by_name["Muon bf16"].numel == muon and by_name["AdamW fp32"].param_bytes == 4
    # Megatron's layer-wise layout: whole matrices over 32 shards pad the Muon buffer 11 %
    assert by_name["Muon bf16"].padded == 754_974_720 == 32 * 23_592_960
    assert by_name["AdamW bf16"].padded == adamw and by_name["AdamW fp32"].padded == fp32
    assert one.params == 2 * (754_974_720 + adamw) + 4 * fp32
    assert one.grads == 4 * (754_974_720 + adamw + fp32)
    assert 12 * (muon + adamw) / 32 < one.optimizer_state <= 12 * (754_974_720 + adamw) / 32 \
        + 8 * fp32 / 32
    assert one.activations == 16 * LAYER + LOOP_KEPT + LOGITS
    assert one.total == one.params + one.grads + one.optimizer_state + one.activations
    assert one.reserved == round(one.total * (1 + FRAGMENTATION))
    assert one.device == one.reserved + CUDA_CONTEXT_BYTES \
        + NCCL_COMMUNICATORS * NCCL_BYTES_PER_COMMUNICATOR
    # with --overlap-grad-reduce: 40M-element buckets pad the Muon buffer 33 %
    overlap = estimate_memory(cfg, overlap_grad_reduce=True, **run)
    padded = {b.name: b.padded for b in overlap.buffers}["Muon bf16"]
    assert padded == 905_969_664 and overlap.bucket_size == 40_000_000
    assert overlap.params - one.params == 2 * (padded - 754_974_720)
    table = one.format_table()
    assert "679,481,856 params -> 754,974,720 elements (+11.1 %)" in table
    assert all(word in table for word in ("reserved", "device", "forward end", "backward"))


def test_layout_precision_and_optimizer_variants(megatron_single):
    cfg = preset_config("transformer-140m")
    p = 143_141_184
    # 6 layers: QKV + output projection + MLP (d = 768, 6 heads of 128, ffn 3072), and the
    # value-embedding gates (6 groups x 32 channels) of the 3 layers with value embeddings
    matrices = 6 * (768 * (768 + 2 * 768) + 768 * 768 + 2 * 768 * 3072) + 3 * 6 * 32
    sbd = 1024 * 4 * 768
    e = estimate_memory(cfg, micro_batch_size=4, seq_length=1024, tp=2, pp=1, dp=1,
                        bf16=False, distributed_optimizer=False, optimizer="adam")
    assert e.params == round(4 * p / 2) and e.grads == round(4 * p / 2)  # no padding
    assert e.optimizer_state == round(8 * p / 2)  # fp32 Adam: m and v, no master copy
    # TP 2 without sequence parallelism: (10 + 24/2)·sbd per layer, doubled in fp32
    assert e.activations == 6 * (10 * sbd + 12 * sbd) * 2 + 1024 * 4 * 32768 // 2 * 8
    f = estimate_memory(cfg, micro_batch_size=4, seq_length=1024, fp8=True, optimizer="muon",
                        recompute_granularity="full", distributed_optimizer=False)
    assert f.params == 2 * p + 2 * matrices
    assert f.optimizer_state == 8 * matrices + 12 * (p - matrices)  # dp = 1
    # full recompute keeps each layer's input; the peak is the forward end with the logits,
    # not that plus the one layer re-run in the backward
    logits = 1024 * 4 * 32768 * 6
    assert f.phases.backward == 6 * 2 * sbd + 34 * sbd
    assert f.activations == 6 * 2 * sbd + logits


def test_bad_arguments(megatron_single):
    cfg = preset_config("parcae-tiny")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_memory(cfg, micro_batch_size=1, seq_length=32, optimizer="sgd")
    with pytest.raises(ValueError, match=">= 1"):
        estimate_memory(cfg, micro_batch_size=0, seq_length=32)


def test_loop_state_as_the_loop_keeps_it(megatron_single):
    """The loop's kept bytes, metered on the real loop (autograd's saved tensors and the
    checkpoints' inputs, fp32, local spec), against ``loop_state_bytes``."""
    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.activation_memory import SavedTensorMeter
    from parcae_megatron.model.depth import DepthSample
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from parcae_megatron.model.memory import loop_state_bytes

    s, b = 32, 2
    for k in (2, 4):
        cfg = preset_config("parcae-tiny", recompute_loop_iterations=True,
                            mean_backprop_depth=k, mean_recurrence=k + 2)
        model = ParcaeModel(cfg, get_parcae_layer_local_spec()).train()
        ids = torch.randint(0, cfg.vocab_size, (b, s))
        rope = model.rotary_pos_emb(s)
        x = model.prelude(hidden_states=model.embedding(input_ids=ids, position_ids=None),
                          attention_mask=None, rotary_pos_emb=rope,
                          context=model.value_embedding_rows(model.prelude, ids))
        rows = model.value_embedding_rows(model.recurrent, ids)
        with SavedTensorMeter(model) as meter:
            model._loop(x, None, rope, rows, None, DepthSample.fixed(b, k + 2, k), None, None)
        expected = loop_state_bytes(cfg, micro_batch_size=b, seq_length=s, bf16=False)
        # the local torch norm also keeps its normalised output (one fp32 [s, b, d]); what is
        # left is small (RoPE table, 1/rms, Ā, indices)
        extra = meter.bytes - expected - 4 * s * b * cfg.hidden_size
        assert 0 <= extra < 0.1 * expected, (k, meter.bytes, expected)
