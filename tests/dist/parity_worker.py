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
    ddp = DistributedDataParallel(
        config=cfg, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=distopt))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=distopt, adam_eps=1e-8), [ddp])
    return ddp, optimizer, None


def recipe_optimizer(cfg, model, distopt: bool):
    """The authors' recipe: parcae_muon + AdamW, momentum warm-up (over 2 steps here, so the
    run sees several values), Muon wd 0.2 → 0, clip 1. With ``distopt`` Megatron uses its
    layer-wise distributed optimizer (whole matrices per DP rank), as ``pretrain`` does."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.training.training import wrap_model_chunks_with_ddp

    from parcae_megatron.training import megatron_patches, muon_optimizer

    megatron_patches.register_parcae_muon()
    ddp = wrap_model_chunks_with_ddp(
        [model], cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        use_layer_wise_distributed_optimizer=distopt)[0]
    config = OptimizerConfig(optimizer="parcae_muon", lr=3e-3, min_lr=0.0, weight_decay=0.0,
                             clip_grad=1.0, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-10,
                             use_layer_wise_distributed_optimizer=distopt,
                             muon_tp_mode="duplicated", muon_nesterov=True,
                             muon_fp32_matmul_prec="high",
                             # megatron-core 0.19.2's layer-wise optimizer wraps its torch
                             # optimizers (giving them a config) only when bf16 is set, and
                             # its ChainedOptimizer asserts equal configs: with the model in
                             # fp32 the "bf16" wrapper keeps every parameter fp32.
                             bf16=distopt)
    config.muon_ns_dtype = "fp32"  # --muon-ns-dtype fp32: exact comparisons on CPU
    overrides = muon_optimizer.recipe_overrides(get_standard_config_overrides(config), muon_lr=5e-3,
                                      muon_start_wd=0.2, muon_end_wd=0.0)
    optimizer = get_megatron_optimizer(config, [ddp], config_overrides=overrides)
    scheduler = muon_optimizer.RecipeParamScheduler(
        optimizer, init_lr=0.0, max_lr=3e-3, min_lr=0.0, lr_warmup_steps=0,
        lr_decay_steps=STEPS * GLOBAL_BATCH, lr_decay_style="constant", start_wd=0.0,
        end_wd=0.0, wd_incr_steps=STEPS * GLOBAL_BATCH, wd_incr_style="linear",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False,
        momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_iters=2,
        samples_per_iteration=GLOBAL_BATCH)
    return ddp, optimizer, scheduler


def check_init(model: ParcaeModel, ckpt: str) -> dict:
    """Compare this rank's freshly initialised shard with the reference checkpoint (the TP=1
    full weights), and TP shards of the row-sharded matrices with each other."""
    fresh = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    loaded = model.state_dict()
    mismatches = [k for k, v in fresh.items() if not torch.equal(v, loaded[k])]
    model.load_state_dict(fresh, strict=False)  # train from the fresh init
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sharded = [k for k in fresh if k.endswith(("linear_qkv.weight", "linear_fc1.weight",
                                               "word_embeddings.weight", "value_embedding.weight"))]
    same = []
    for k in sharded:
        shards = [torch.empty_like(fresh[k]) for _ in range(tp)]
        dist.all_gather(shards, fresh[k].contiguous(),
                        group=parallel_state.get_tensor_model_parallel_group())
        same += [k] if any(torch.equal(shards[0], s) for s in shards[1:]) else []
    return {"init_mismatches": mismatches, "identical_shards": same, "checked": len(fresh),
            "checked_sharded": len(sharded)}


def check_initial_state(model: ParcaeModel) -> dict | None:
    """h0 of one training micro-batch on this TP group: the digest of the full state (the
    shards concatenated under sequence parallelism), whether TP ranks hold the same state
    (without SP), and whether it lives on the model's device."""
    if not model.has_loop:
        return None
    cfg = model.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model.train()
    model.depth_sampler.start_step(STEPS + 7)
    local = SEQ // tp if cfg.sequence_parallel else SEQ
    x = torch.empty(local, MBS, cfg.hidden_size, device=next(model.parameters()).device)
    _, h0 = model._depths_and_state(x, None, None, None, None)
    shards = [torch.empty_like(h0) for _ in range(tp)]
    dist.all_gather(shards, h0.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    full = torch.cat(shards) if cfg.sequence_parallel else shards[0]
    return {"digest": hashlib.sha256(full.cpu().numpy().tobytes()).hexdigest(),
            "shape": list(full.shape), "tp_identical": all(torch.equal(shards[0], t)
                                                           for t in shards),
            "on_model_device": h0.device == next(model.parameters()).device,
            "dp_rank": parallel_state.get_data_parallel_rank()}


def train(tp: int, pp: int, distopt: bool, preset: str, ckpt: str, save: bool,
          flags: str = "") -> dict:
    init_distributed(tp, pp, seed=1234)
    cfg = make_config(tp, pp, preset, sp="s" in flags, cpu_init="c" in flags)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    result = {"tp": tp, "pp": pp, "distopt": distopt, "flags": flags,
              "dp": parallel_state.get_data_parallel_world_size()}
    if save:
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    elif "n" in flags or "i" in flags:
        checks = check_init(model, ckpt)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, checks)
        result["init"] = gathered
        if "i" in flags:
            dist.barrier()
            return result
    else:
        state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
        model.load_state_dict(state)
    inner = model
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
