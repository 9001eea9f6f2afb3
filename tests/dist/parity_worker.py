"""Multi-rank worker for the layout-parity test (run under torchrun; CPU over gloo).

``reference``: one process builds a tiny Parcae (Megatron's GPU-style init path, as on a GPU
without --use-cpu-initialization), saves it with dist_checkpointing and trains a few optimizer
steps. ``layouts``: for each TP/PP/DP(/SP) layout, every rank builds its shard, loads the
reference checkpoint (Megatron reshards it) or, for from-scratch layouts, keeps its own
initialisation after checking it against the checkpoint, and trains the same steps on the
same data through Megatron's DDP, optimizer and pipeline schedules. Rank 0 writes per-step
loss and grad norm (and the init checks) to JSON; the pytest side compares them.

A layout is ``tp,pp,distopt[,flags]``; flags: ``s`` sequence parallel, ``n`` from scratch
(no checkpoint load), ``c`` --use-cpu-initialization, ``i`` check the init only (no training),
``r`` the authors' optimizer recipe (parcae_muon) instead of Adam.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from parcae_megatron.platform.dist import init_distributed

SEQ, MBS, GLOBAL_BATCH, STEPS = 16, 2, 8, 4


def make_config(tp: int, pp: int, preset: str, sp: bool = False, cpu_init: bool = False):
    return preset_config(
        preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sp, use_cpu_initialization=cpu_init, pipeline_dtype=torch.float32,
        seq_length=SEQ,
        # exercise every part of the block from step 0: non-zero output projections
        output_layer_init_method=preset_config(preset).init_method)


def global_batches(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen) for _ in range(STEPS)]


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    output = model(inputs, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def adam_optimizer(cfg, model, distopt: bool):
    ddp, optimizer, scheduler = (recipe_optimizer if "r" in flags else adam_optimizer)(
        cfg, model, distopt)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro = GLOBAL_BATCH // (MBS * dp)
    forward_backward = get_forward_backward_func()
    losses, norms = [], []
    for step, batch in enumerate(global_batches(cfg.vocab_size)):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        if inner.has_loop:
            inner.depth_sampler.start_step(step)
        mbs = [batch[(j * dp + dp_rank) * MBS:(j * dp + dp_rank + 1) * MBS] for j in range(micro)]
        out = forward_backward(forward_step_func=forward_step, data_iterator=iter(mbs),
                               model=[ddp], num_microbatches=micro, seq_length=SEQ,
                               micro_batch_size=MBS, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        if scheduler is not None:
            scheduler.step(GLOBAL_BATCH)
        loss = torch.zeros(1)
        if parallel_state.is_pipeline_last_stage():
            loss += sum(o["lm loss"] for o in out) / micro
        dist.all_reduce(loss)  # sum over all ranks; only last-stage ranks contribute
        losses.append(float(loss) / (dp * tp))
        norms.append(float(grad_norm))
    h0 = check_initial_state(inner)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, h0)
    dist.barrier()
    return {**result, "loss": losses, "grad_norm": norms, "h0": gathered,
            "executed_iterations": inner.loop_stats.executed_iterations}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True,
                        help="';'-separated tp,pp,distopt[,flags], e.g. '1,1,0;2,1,0,sn;2,1,1,r'")
    parser.add_argument("--preset", default="parcae-tiny")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--save", action="store_true", help="write the reference checkpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = []
    for i, spec in enumerate(args.layouts.split(";")):
        tp, pp, distopt, *flags = spec.split(",")
        results.append(train(int(tp), int(pp), bool(int(distopt)), args.preset, args.ckpt,
                             args.save and i == 0, "".join(flags)))
    if int(os.environ.get("RANK", 0)) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
