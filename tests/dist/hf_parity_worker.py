"""Multi-rank worker for the Megatron ↔ Hugging Face parity test (run under torchrun; CPU, gloo).

For every model kind (each registered injection type and the Transformer baseline) all ranks
build the tiny preset at TP = world size, move every weight off its init (noise keyed by the
parameter's name, and by the TP rank for sharded tensors), run one evaluation forward with a
fixed h₀ and gather the vocab-parallel logits. Each kind's weights are saved as a Megatron
dist checkpoint ``<out>/<kind>`` and rank 0 writes the logits to ``<out>/logits.pt``; the
pytest side converts the checkpoints to Hugging Face and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from parcae_megatron.hf.loop_math import INJECTION_TYPES
from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

KINDS = (*INJECTION_TYPES, "transformer")
BATCH, SEQ, HIDDEN, VOCAB, ITERATIONS = 2, 16, 64, 512, 3


def kind_config(kind: str, tp: int = 1):
    """The tiny preset of ``kind`` (an injection type, or the Transformer baseline) at TP."""
    if kind == "transformer":
        return preset_config("transformer-tiny", tensor_model_parallel_size=tp)
    return preset_config("parcae-tiny", injection_type=kind, tensor_model_parallel_size=tp)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, s] and h₀ [s, b, d], the same on every rank and in the test."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, torch.randn(SEQ, BATCH, HIDDEN, generator=gen) * 0.05


def perturb_(model: torch.nn.Module) -> None:
    """Noise on every weight: replicated tensors get the same noise on every TP rank."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            rank = tp_rank if getattr(p, "tensor_model_parallel", False) else 0
            seed = int.from_bytes(hashlib.sha256(f"{name}/{rank}".encode()).digest()[:6], "big")
            gen = torch.Generator().manual_seed(seed)
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    tp = int(os.environ["WORLD_SIZE"])
    init_distributed(tp, 1, seed=1234)
    ids, h0 = inputs()
    logits = {}
    for kind in KINDS:
        model = ParcaeModel(kind_config(kind, tp), get_parcae_layer_local_spec()).eval()
        perturb_(model)
        with torch.no_grad():
            local = model(ids, num_iterations=ITERATIONS, initial_state=h0)
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(),
                        group=parallel_state.get_tensor_model_parallel_group())
        logits[kind] = torch.cat(shards, dim=-1)
        os.makedirs(f"{args.out}/{kind}", exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), f"{args.out}/{kind}")
    if dist.get_rank() == 0:
        torch.save(logits, f"{args.out}/logits.pt")


if __name__ == "__main__":
    main()
