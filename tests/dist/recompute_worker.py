"""Multi-rank worker for the activation-recompute parity test (torchrun; CPU over gloo).

For each layout (TP, PP) and each recompute mode, every rank builds the same tiny Parcae
(same seed, so the same weights per layout), runs one optimizer step's forward/backward
through Megatron's DDP and pipeline schedule (several micro-batches in flight under PP:
1F1B) with per-sequence depths and compaction, and compares its gradient buffers with those
of the no-recompute run. Rank 0 writes, per layout and mode, the largest relative
difference over all parameters and ranks.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

SEQ, MBS, GLOBAL_BATCH, STEP = 16, 4, 16, 3
MODES = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
    "loop": dict(recompute_loop_iterations=True),
    "loop+full": dict(recompute_loop_iterations=True, recompute_granularity="full",
                      recompute_method="uniform", recompute_num_layers=2),
    "loop+selective": dict(recompute_loop_iterations=True, recompute_granularity="selective"),
}


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    output = model(tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous())

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def gradients(tp: int, pp: int, recompute: dict,
              sp: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Gradient buffers of one step on this rank, and loop statistics."""
    init_distributed(tp, pp, seed=1234)
    base = preset_config("parcae-tiny")
    cfg = preset_config("parcae-tiny", tensor_model_parallel_size=tp,
                        pipeline_model_parallel_size=pp, use_cpu_initialization=True,
                        pipeline_dtype=torch.float32, seq_length=SEQ,
                        output_layer_init_method=base.init_method,  # non-zero projections
                        mean_recurrence=4, mean_backprop_depth=2, sequence_parallel=sp,
                        **recompute)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=(
        DistributedDataParallelConfig(grad_reduce_in_fp32=True)))
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro = GLOBAL_BATCH // (MBS * dp)
    gen = torch.Generator().manual_seed(7)
    batch = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    mbs = [batch[(j * dp + dp_rank) * MBS:(j * dp + dp_rank + 1) * MBS] for j in range(micro)]
    ddp.zero_grad_buffer()
    if model.has_loop:
        model.depth_sampler.start_step(STEP, micro)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs),
                                model=[ddp], num_microbatches=micro, seq_length=SEQ,
                                micro_batch_size=MBS, forward_only=False)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    stats = model.loop_stats
    counts = torch.tensor([float(stats.executed_iterations), float(stats.sequences),
                           float(stats.sampled_iterations)])
    dist.all_reduce(counts)  # over every rank (only the loop's stage counts)
    return grads, dict(zip(("executed", "sequences", "sampled"), counts.tolist()))


def compare(tp: int, pp: int, sp: int = 0) -> dict:
    ref, stats = gradients(tp, pp, {}, bool(sp))
    out = {"tp": tp, "pp": pp, "sp": sp, "stats": stats}
    for name, recompute in MODES.items():
        got, _ = gradients(tp, pp, recompute, bool(sp))
        worst = torch.zeros(1, dtype=torch.float64)
        for key, g in ref.items():
            scale = g.double().norm().clamp_min(1e-30)
            worst = torch.maximum(worst, ((got[key].double() - g.double()).norm() / scale)
                                  .reshape(1))
        nonzero = torch.tensor([float(sum(int(g.abs().sum() > 0) for g in ref.values()))])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(nonzero)
        out[name] = {"max_rel_diff": float(worst), "nonzero_grads": float(nonzero)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True,
                        help="';'-separated tp,pp[,sp] layouts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = [compare(*(int(x) for x in spec.split(","))) for spec in args.layouts.split(";")]
    if int(os.environ.get("RANK", 0)) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
