"""Process-group and model-parallel setup shared by tools, tests and benchmarks.

The training entry point uses Megatron's own initialisation; this is for everything else
(describe, conversion, benchmarks, tests) that needs `parallel_state` without the loop.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from parcae_megatron.platform import cpu_backend


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1,
                     seed: int = 1234) -> None:
    """Initialise torch.distributed (env:// under torchrun, else a 1-process group) and
    Megatron's model-parallel groups; seed every RNG Megatron uses.

    Installs the Megatron-Core-only patch phase (``megatron_patches.install("evaluate")``):
    on a machine without CUDA the CPU backend is activated and gloo is used.
    """
    from parcae_megatron.training import megatron_patches  # not at import: training is above

    megatron_patches.install("evaluate")
    cpu = cpu_backend.is_active()
    if not dist.is_initialized():
        backend = "gloo" if cpu else "nccl"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        and not cpu_backend.is_active() else torch.device("cpu")
