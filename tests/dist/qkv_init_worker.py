"""TP=2 / PP=2 worker for the initialisation tests (torchrun, CPU over gloo).

``--cases``: for each (heads, groups, head dim, hidden) case every rank builds the first
attention layer of a tiny Parcae at TP = 2 on Megatron's GPU-style path (each rank allocates
and initialises only its shard) and writes its fused QKV shard to ``OUT/qkv-H-G-rRANK.pt``.

``--variants``: for each layout (TP = 2, then PP = 2) and each named model variant
(`INIT_VARIANTS`), every rank builds its part of the model and writes every checkpoint
shard of it (`checkpoint_shards`) to ``OUT/init-VARIANT-tpTppP-rRANK.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.model.presets import PRESETS
from parcae_megatron.platform.dist import init_distributed


def qkv_config(heads: int, groups: int, head_dim: int, hidden: int, tp: int = 1):
    """A one-layer-per-stack tiny Parcae with the given attention shape (shared with the test)."""
    return preset_config("parcae-tiny", hidden_size=hidden, num_attention_heads=heads,
                         num_query_groups=groups, kv_channels=head_dim,
                         num_prelude_layers=1, num_recurrent_layers=1, num_coda_layers=1,
                         tensor_model_parallel_size=tp, value_embedding_gate_channels=16)


def _variants() -> dict[str, tuple[str, dict[str, Any]]]:
    out = {}
    for name, preset in PRESETS.items():
        # The paper sizes keep their heads and layer counts at a width of 16 per head.
        width = 16 * preset["num_attention_heads"]
        out[name] = (name, {} if name.endswith("-tiny") else dict(
            hidden_size=width, kv_channels=16, ffn_hidden_size=2 * width, vocab_size=256,
            seq_length=16))
    out["parcae-tiny-additive"] = ("parcae-tiny", {"injection_type": "additive"})
    out["parcae-tiny-concat-linear"] = ("parcae-tiny", {"injection_type": "concat_linear"})
    out["parcae-tiny-gqa-no-ve"] = ("parcae-tiny", {"num_query_groups": 2,
                                                    "value_embeddings": False})
    out["parcae-tiny-gated-mlp"] = ("parcae-tiny", {"gated_linear_unit": True})
    return out


INIT_VARIANTS = _variants()
"""Every preset (the paper sizes at a small width), the other injection types, grouped-query
attention without value embeddings, and a gated MLP."""


def variant_model(name: str, tp: int = 1, pp: int = 1, **changes: Any) -> ParcaeModel:
    """Variant ``name`` of `INIT_VARIANTS` built for this rank of a TP × PP layout."""
    preset, overrides = INIT_VARIANTS[name]
    config = preset_config(preset, tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp, **overrides, **changes)
    return ParcaeModel(config, get_parcae_layer_local_spec())


def checkpoint_shards(model: ParcaeModel) -> list[dict[str, Any]]:
    """Every tensor of the model's distributed checkpoint as Megatron shards it: key, global
    offset and shape (stacked-layer axes first), and data. The checkpoint's own layout, not
    the init's parameter keys, so it checks them independently."""
    state = model.sharded_state_dict()
    apply_factories(state)  # a gated fc1 becomes its gate and up halves
    return [{"key": t.key, "offset": tuple(t.global_offset), "shape": tuple(t.global_shape),
             "prepend": t.prepend_axis_num, "data": t.data.detach().clone()}
            for t in nested_values(state) if isinstance(t, ShardedTensor)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="", help="H,G,HD,D;... ")
    parser.add_argument("--variants", default="", help="comma-separated INIT_VARIANTS names")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    init_distributed(2, 1, seed=1234)
    rank = dist.get_rank()
    for case in filter(None, args.cases.split(";")):
        heads, groups, hd, hidden = map(int, case.split(","))
        model = ParcaeModel(qkv_config(heads, groups, hd, hidden, tp=2),
                            get_parcae_layer_local_spec())
        weight = model.prelude.layers[0].self_attention.linear_qkv.weight.detach().clone()
        torch.save(weight, out / f"qkv-{heads}-{groups}-r{rank}.pt")
    for tp, pp in ((2, 1), (1, 2)):
        init_distributed(tp, pp, seed=1234)
        for name in filter(None, args.variants.split(",")):
            shards = checkpoint_shards(variant_model(name, tp, pp))
            torch.save(shards, out / f"init-{name}-tp{tp}pp{pp}-r{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
