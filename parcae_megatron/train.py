"""Parcae pretraining on Megatron-LM's training loop (`megatron.training.pretrain`).

    torchrun --nproc-per-node 8 -m parcae_megatron.train --config configs/parcae-1.3b.yaml \\
        --tensor-model-parallel-size 2 --data-path 1.0 data/fineweb_text_document \\
        --save ckpt/ --load ckpt/

Like Megatron-LM's ``pretrain_gpt.py``: a Parcae ``model_provider``, a ``forward_step`` with
the masked LM loss, and a datasets provider over indexed datasets. Every Megatron flag works;
Parcae adds its own (``--mean-recurrence``, ``--injection-type``, ... see --help). On a machine
without CUDA the CPU backend is activated and the run uses gloo.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

from parcae_megatron.platform import cpu_backend
from parcae_megatron.platform.gpu_check import GpuUnavailableError
from parcae_megatron.training import failfast, faults, guards, megatron_patches
from parcae_megatron.training.arguments import parcae_config_from_args
from parcae_megatron.training.quality import QUALITY
from parcae_megatron.training.telemetry import TELEMETRY
from parcae_megatron.training.validation import parse_args_or_exit


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None,
                   config=None, pg_collection=None):
    """Build this pipeline stage of the Parcae model from the parsed arguments."""
    from megatron.training import get_args, print_rank_0

    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.layer_specs import get_parcae_layer_spec

    args = get_args()
    if vp_stage is not None:
        raise ValueError("virtual pipeline parallelism is not supported by ParcaeModel yet")
    cfg = parcae_config_from_args(args)
    print_rank_0(f"building Parcae model: stage layout {cfg.stage_layout()}")
    model = ParcaeModel(cfg, get_parcae_layer_spec(args.transformer_impl),
                        pre_process=pre_process, post_process=post_process)
    TELEMETRY.register_model(model)
    return model


def get_batch(data_iterator):
    """Tokens, labels and loss mask on every rank: read on TP rank 0, broadcast in TP.

    Unlike GPT, every pipeline stage needs the token ids (value embeddings on all stages).
    """
    from megatron.core import mpu
    from megatron.training import get_args

    args = get_args()
    shape = (args.micro_batch_size, args.seq_length)
    device = torch.device("cpu") if cpu_backend.is_active() else torch.cuda.current_device()
    if mpu.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        tokens = data["tokens"].long().to(device)
        labels = data["labels"].long().to(device)
        loss_mask = data["loss_mask"].float().to(device)
    else:
        tokens = torch.empty(shape, dtype=torch.long, device=device)
        labels = torch.empty(shape, dtype=torch.long, device=device)
        loss_mask = torch.empty(shape, dtype=torch.float, device=device)
    if mpu.get_tensor_model_parallel_world_size() > 1:
        src, group = mpu.get_tensor_model_parallel_src_rank(), mpu.get_tensor_model_parallel_group()
        for t in (tokens, labels, loss_mask):
            torch.distributed.broadcast(t, src, group=group)
    return tokens, labels, loss_mask


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses, token count, and the report Megatron averages."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def multi_depth_loss_func(loss_mask: torch.Tensor, loop_counts: list[int],
                          output_tensor: torch.Tensor):
    """Validation at several loop counts: the first (μ_rec) is 'lm loss'."""
    loss, num_tokens, report = loss_func(loss_mask, output_tensor[0])
    for count, losses in zip(loop_counts, output_tensor, strict=True):
        report[f"lm loss T={count}"] = loss_func(loss_mask, losses)[2]["lm loss"]
    return loss, num_tokens, report


def eval_loop_counts(args, config) -> list[int]:
    """Loop counts for validation, μ_rec first (default: μ_rec, 1, 2, 4, 2·μ_rec)."""
    mu = config.mean_recurrence
    counts = args.eval_loop_counts or [1, 2, 4, 2 * mu]
    return [mu] + sorted(set(counts) - {mu})


def forward_step(data_iterator, model):
    """One micro-batch: sample depths (training), run the model, return the loss closure.

    In evaluation (single pipeline stage) the loss is measured at several loop counts.
    """
    from megatron.core import mpu
    from megatron.core.utils import unwrap_model
    from megatron.training import get_args, get_timers

    args = get_args()
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask = get_batch(data_iterator)
    timers("batch-generator").stop()
    inner = unwrap_model(model)
    if model.training:
        if inner.has_loop:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            sampler, count = inner.depth_sampler, get_num_microbatches()
            if sampler.step != args.curr_iteration or sampler.num_microbatches != count:
                sampler.start_step(args.curr_iteration, count)
            # Megatron logs the step that starts at curr_iteration as iteration curr + 1.
            inner.record_state_stats = TELEMETRY.record_state_now(args.curr_iteration + 1)
        return model(tokens, labels=labels), partial(loss_func, loss_mask)
    if not inner.config.is_looped or mpu.get_pipeline_model_parallel_world_size() > 1:
        return model(tokens, labels=labels), partial(loss_func, loss_mask)
    counts = eval_loop_counts(args, inner.config)
    outputs = torch.stack([model(tokens, labels=labels, num_iterations=t) for t in counts])
    return outputs, partial(multi_depth_loss_func, loss_mask, counts)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT-style datasets (indexed .bin/.idx, blends, or --mock-data) for Parcae."""
    from megatron.core import mpu
    from megatron.training import get_args, get_tokenizer, print_rank_0

    from parcae_megatron.training.data import build_datasets

    print_rank_0("> building train/valid/test datasets")
    dataset_type, datasets = build_datasets(
        get_args(), get_tokenizer(), train_val_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0)
    print_rank_0(f"> built {dataset_type.__name__} train/valid/test datasets")
    return datasets


datasets_provider.is_distributed = True


def main(argv: list[str] | None = None) -> None:
    """Parse (config + flags), validate, and run Megatron's pretrain loop.

    ``--validate-only`` checks the configuration (as ``WORLD_SIZE`` ranks) and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    validate_only = "--validate-only" in argv
    argv = [a for a in argv if a != "--validate-only"]
    try:
        argv = megatron_patches.install("train", argv)
    except GpuUnavailableError as exc:  # a GPU job without usable CUDA: stop, every rank
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # 2: the launcher does not restart it (job_body.sh)
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    args = parse_args_or_exit(argv)
    fault = faults.from_env_or_exit()
    if validate_only:
        print("configuration is valid", flush=True)
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(megatron_patches.report("train"), flush=True)
    failfast.helpers_die_with_rank()  # no helper outlives a killed rank
    TELEMETRY.configure(args)
    QUALITY.configure(args)
    cfg = pretrain_cfg_container_from_args(args)
    # Any failure ends this rank within seconds (training/failfast.py), never a hang.
    with failfast.exit_on_failure():
        try:
            pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder,
                     faults.inject(forward_step, fault), model_provider=model_provider)
        except guards.DivergenceError as exc:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None


if __name__ == "__main__":
    main()
