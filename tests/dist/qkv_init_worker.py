"""TP=2 worker for the grouped-query QKV init test (torchrun, CPU over gloo).

For each (heads, groups, head dim, hidden) case every rank builds the first attention layer
of a tiny Parcae at TP = 2 on Megatron's GPU-style init path (the init sees only this rank's
shard) and writes its fused QKV shard to ``OUT/qkv-H-G-rRANK.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed


def qkv_config(heads: int, groups: int, head_dim: int, hidden: int, tp: int = 1):
    """A one-layer-per-stack tiny Parcae with the given attention shape (shared with the test)."""
    return preset_config("parcae-tiny", hidden_size=hidden, num_attention_heads=heads,
                         num_query_groups=groups, kv_channels=head_dim,
                         num_prelude_layers=1, num_recurrent_layers=1, num_coda_layers=1,
                         tensor_model_parallel_size=tp, value_embedding_gate_channels=16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help="H,G,HD,D;... ")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed(2, 1, seed=1234)
    rank = dist.get_rank()
    for case in args.cases.split(";"):
        heads, groups, hd, hidden = map(int, case.split(","))
        model = ParcaeModel(qkv_config(heads, groups, hd, hidden, tp=2),
                            get_parcae_layer_local_spec())
        weight = model.prelude.layers[0].self_attention.linear_qkv.weight.detach().clone()
        torch.save(weight, Path(args.out) / f"qkv-{heads}-{groups}-r{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
