"""The rehearsal's stages that need Megatron's global state, each in its own process.

    python -m parcae_megatron.rehearse.child inspect [trainer argv]
    python -m parcae_megatron.rehearse.child data FRACTION WORKDIR [trainer argv]

``inspect`` validates the configuration as the trainer does (``WORLD_SIZE`` ranks, the GPU
command line: no CPU-backend flags) and describes the full-size model on the meta device;
``data`` builds the run's datasets at full scale (or ``FRACTION`` of the samples) through the
trainer's own path (``training/data.py``), on ``--data-path`` or a synthetic corpus of the
run's token count. Each prints one JSON object on its last stdout line; a configuration
error is the trainer's ``error:`` line and exit 2.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

from parcae_megatron.training import megatron_patches
from parcae_megatron.training.arguments import parcae_config_from_args
from parcae_megatron.training.validation import parse_args_or_exit

# The trainer's vocabulary for a run without a tokenizer model: the presets' 32768.
SYNTHETIC_VOCAB = 32768


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _optimizer_kind(name: str) -> str:
    return name if name in ("parcae_muon", "muon") else "adam"


def inspect(argv: list[str]) -> dict:
    """Validate (as the trainer) and describe the full-size model: params, FLOPs, memory
    (``model_error`` when the model cannot be built)."""
    start = time.time()
    args = parse_args_or_exit(argv)
    validated = time.time() - start
    try:
        return {"validate_s": validated, **_describe(args)}
    except Exception as exc:  # reported as the model stage's failure
        return {"validate_s": validated, "model_error": f"{type(exc).__name__}: {exc}"}


def _describe(args) -> dict:
    from parcae_megatron.describe import build_on_meta
    from parcae_megatron.model.accounting import count_parameters, flops_per_token
    from parcae_megatron.model.memory import estimate_memory

    start = time.time()
    # The whole model (TP = PP = 1) in this one process: shapes only.
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    whole = copy.copy(args)
    whole.tensor_model_parallel_size = whole.pipeline_model_parallel_size = 1
    whole.parcae_pipeline_layout, whole.sequence_parallel = None, False
    whole.gradient_accumulation_fusion = False  # the meta model uses the local spec
    cfg = parcae_config_from_args(whole)
    cfg.sequence_parallel = bool(args.sequence_parallel)  # for the activation estimate
    counts = count_parameters(build_on_meta(cfg))
    flops = flops_per_token(cfg, counts)
    memory = estimate_memory(
        cfg, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        dp=args.data_parallel_size, bf16=bool(args.bf16), fp8=args.fp8 is not None,
        distributed_optimizer=bool(args.use_distributed_optimizer
                                   or args.use_layer_wise_distributed_optimizer),
        recompute_loop_iterations=bool(args.recompute_loop_iterations),
        recompute_granularity=args.recompute_granularity,
        optimizer=_optimizer_kind(args.optimizer),
        overlap_grad_reduce=bool(args.overlap_grad_reduce),
        ddp_bucket_size_flag=args.ddp_bucket_size, ddp_num_buckets=args.ddp_num_buckets,
        pad_for_high_nccl_busbw=bool(args.ddp_pad_buckets_for_high_nccl_busbw))
    return {
        "model_s": time.time() - start,
        "world_size": args.world_size, "tp": args.tensor_model_parallel_size,
        "pp": args.pipeline_model_parallel_size, "dp": args.data_parallel_size,
        "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
        "seq_length": args.seq_length, "train_iters": args.train_iters,
        "transformer_impl": args.transformer_impl, "fp8": args.fp8, "bf16": bool(args.bf16),
        "looped": cfg.is_looped, "params": counts["total_params"], "flops_per_token": flops,
        "memory": {name: n for name, n in memory.rows()},
        "memory_table": memory.format_table(),
    }


def data(fraction: float, workdir: Path, argv: list[str]) -> dict:
    """Build the run's train/valid/test datasets (indices, and packing if configured)."""
    from megatron.training import get_args, get_tokenizer
    from megatron.training.training import get_train_valid_test_num_samples

    from parcae_megatron.training.data import build_datasets

    synthetic = None
    if "--data-path" not in argv:
        args = parse_args_or_exit([*argv, "--mock-data"])  # only for the sample counts
        samples = [math.ceil((n or 0) * fraction) for n in get_train_valid_test_num_samples()]
        # The corpus the run would read: its tokens plus 2 % (the split's rounding, the
        # extra token per sample), so one epoch covers the whole run.
        tokens = math.ceil(sum(samples) * (args.seq_length + 1) * 1.02)
        from megatron.training.global_vars import destroy_global_vars

        destroy_global_vars()
        from megatron.core.num_microbatches_calculator import (
            destroy_num_microbatches_calculator,
        )

        destroy_num_microbatches_calculator()
        from parcae_megatron.data.synthetic import write_synthetic_dataset

        start = time.time()
        corpus = write_synthetic_dataset(workdir / "synthetic" / "corpus", tokens)
        synthetic = {"documents": corpus.documents, "tokens": corpus.tokens,
                     "mean_length": corpus.mean_length, "write_s": time.time() - start}
        argv = [*[a for a in argv if a != "--mock-data"], "--data-path", str(corpus.prefix),
                "--data-cache-path", str(workdir / "synthetic" / "cache"), "--tokenizer-type",
                "NullTokenizer", "--vocab-size", str(SYNTHETIC_VOCAB)]
    args = parse_args_or_exit(argv)
    samples = [math.ceil((n or 0) * fraction) for n in get_train_valid_test_num_samples()]
    start = time.time()
    dataset_type, built = build_datasets(get_args(), get_tokenizer(), samples, lambda: True)
    return {"build_s": time.time() - start, "dataset": dataset_type.__name__,
            "samples": samples, "built": [len(d) if d is not None else 0 for d in built],
            "packing": args.packing, "synthetic": synthetic}


def main() -> None:
    """Run one stage and print its JSON line."""
    stage, rest = sys.argv[1], sys.argv[2:]
    megatron_patches.install("check", rest)
    if stage == "inspect":
        result = inspect(rest)
    elif stage == "data":
        result = data(float(rest[0]), Path(rest[1]), rest[2:])
    else:
        raise SystemExit(f"error: unknown stage {stage!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
