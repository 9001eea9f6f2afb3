"""Activation memory of one training micro-batch vs loop depth, with and without recompute.

Bytes of tensors kept for the backward pass by one forward (``SavedTensorMeter``: autograd's
saved tensors plus non-reentrant checkpoint inputs, distinct storages, parameters excluded),
for μ_rec ∈ {4, 8, 16, 32} at μ_bwd = 4, every sequence at depth μ_rec (so the comparison
is exact), local spec, fp32. Modes: no recompute; ``--recompute-loop-iterations``
(per-iteration loop checkpoints); Megatron's full recompute (uniform, 1 layer) on every
stack; both. The model has the paper's 1:1:1 prelude/recurrent/coda split.

Targets: without recompute, bytes at μ_rec=32 ≤ 1.05 × μ_rec=8 (no-grad iterations
save nothing); with loop checkpointing, bytes ≤ 1/3 of without (μ_bwd = 4).

Usage: python benchmarks/activation_memory.py [--seq 256] [--batch 2]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from parcae_megatron.model import ParcaeConfig, ParcaeModel
from parcae_megatron.model.activation_memory import SavedTensorMeter
from parcae_megatron.model.depth import DepthSample
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

SHAPE = dict(hidden_size=256, num_attention_heads=4, kv_channels=64, ffn_hidden_size=1024,
             num_prelude_layers=2, num_recurrent_layers=2, num_coda_layers=2, vocab_size=4096)
MODES = {
    "none": {},
    "loop": dict(recompute_loop_iterations=True),
    "full": dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1),
    "loop+full": dict(recompute_loop_iterations=True, recompute_granularity="full",
                      recompute_method="uniform", recompute_num_layers=1),
}
DEPTHS, MU_BWD = (4, 8, 16, 32), 4


def saved_bytes(mode: dict, mu_rec: int, seq: int, batch: int) -> int:
    """Activation bytes of one forward at depth ``mu_rec`` (last μ_bwd with gradient)."""
    cfg = ParcaeConfig(**SHAPE, seq_length=seq, mean_recurrence=mu_rec,
                       mean_backprop_depth=min(MU_BWD, mu_rec), use_cpu_initialization=True,
                       **mode)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    depths = DepthSample.fixed(batch, mu_rec, MU_BWD)
    with SavedTensorMeter(model) as meter:
        loss = model(ids, labels=ids, depths=depths, generator=gen)
    loss.sum().backward()  # the recorded graph is a real, complete one
    return meter.bytes


def main() -> None:
    """Measure every mode and depth; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    init_distributed()
    table = {name: {t: saved_bytes(mode, t, args.seq, args.batch) for t in DEPTHS}
             for name, mode in MODES.items()}
    mib = 2.0**20
    for name, row in table.items():
        print(f"{name:10s} " + "  ".join(f"μ_rec={t:2d}: {b / mib:8.2f} MiB"
                                          for t, b in row.items()), flush=True)
    depth_ratio = table["none"][32] / table["none"][8]
    loop_ratio = {t: table["loop"][t] / table["none"][t] for t in DEPTHS}
    recipe_ratio = {t: table["loop+full"][t] / table["none"][t] for t in DEPTHS}
    print(f"no recompute, μ_rec=32 / μ_rec=8: {depth_ratio:.3f} (target <= 1.05)")
    print(f"loop checkpointing / none: {loop_ratio[8]:.3f} at μ_rec=8 (target <= 0.333); "
          f"loop + full recompute / none: {recipe_ratio[8]:.3f}")
    print(json.dumps({
        "benchmark": "activation_memory", "seq": args.seq, "batch": args.batch,
        "mu_bwd": MU_BWD, "shape": SHAPE,
        "bytes": {name: {str(t): b for t, b in row.items()} for name, row in table.items()},
        "none_32_over_8": round(depth_ratio, 4), "target_none_32_over_8": 1.05,
        "loop_over_none": {str(t): round(r, 4) for t, r in loop_ratio.items()},
        "loop_full_over_none": {str(t): round(r, 4) for t, r in recipe_ratio.items()},
        "target_loop_over_none": round(1 / 3, 4),
    }))


if __name__ == "__main__":
    main()
