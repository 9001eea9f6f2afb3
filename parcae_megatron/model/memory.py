"""Per-GPU memory estimate of a training run: buffers, optimizer state, activation peak, allowance.

Arithmetic, not a measurement (``benchmarks/gpu_acceptance.py`` (d) compares it with a GPU's
peak). Three totals are given: **allocated** (what ``torch.cuda.max_memory_allocated`` reports),
**reserved** (``max_memory_reserved``: allocated plus the caching allocator's fragmentation) and
**device** (what ``nvidia-smi`` shows: reserved plus the CUDA context and NCCL's buffers).

- **Weights and gradients** live in Megatron's DDP buffers, laid out here by Megatron's own
  layout functions on meta-device parameters of the model (``buffer_layouts``): bf16 weights
  (2 bytes) and fp32 gradients (4 bytes; bf16 runs reduce in fp32) for every element of every
  buffer, padding included. With Muon and the distributed optimizer, Megatron's layer-wise
  distributed optimizer puts the Muon matrices in their own buffer, each whole matrix in one
  DP rank's shard (``LayerWiseDistributedOptimizer._compute_per_buffer_param_layout``): every
  bucket is DP shards as long as its most loaded shard, so whole-matrix granularity pads it.
  The other parameters get the distributed optimizer's byte-level layout (64-element
  alignment, bucket ends padded to lcm(DP, 128)). The bucket size is Megatron's
  (``resolve_ddp_bucket_size``): one bucket per buffer unless ``--overlap-grad-reduce``.
- **Optimizer state** of the most loaded DP rank, from the same layout: AdamW m and v (8 bytes)
  plus the fp32 master copy of a bf16 parameter (4); Muon the momentum (4) plus the master; the
  authors' Muon (``parcae_muon``) also its parameter-shaped second moment (4).
- **Activations** (Korthikanti et al., bf16, flash attention: no s² term): a layer that runs
  with gradient keeps s·b·d·(10 + 24/t) bytes, 34·s·b·d/t with sequence parallelism or t = 1.
  The peak is the larger of two moments (``activation_phases``): the *forward end* (prelude,
  loop and coda activations plus the logits, 6 bytes per logit: bf16 logits and the fp32
  softmax) and the *backward* of the loop (the logits and coda are freed; the loop's kept
  tensors plus the working set of the iteration being recomputed).
  ``recompute_loop_iterations`` checkpoints each gradient iteration of the whole recurrent
  block (model/parcae_model.py ``_loop``), so it keeps the fp32 state at each iteration
  boundary and recomputes all L_R layers of one iteration at a time. The loop also keeps the
  injection's loop-invariant fp32 terms, the readout's fp32 input, the prelude norm's input
  and the recurrent block's value-embedding rows.
- **Allowance** (not measured here; constants below): fragmentation of the caching allocator,
  the CUDA context, NCCL's communicator buffers.

Layouts other than TP = PP = 1 are approximated: the whole model's buffers and state divided
by TP × PP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from parcae_megatron.hf.loop_math import injection
from parcae_megatron.model.config import ParcaeConfig

GIB = 2.0**30
OPTIMIZERS = ("parcae_muon", "muon", "adam")

# Allowance outside the tensors counted here. Assumptions, not measurements: no GPU has run
# this stack yet; benchmarks/gpu_acceptance.py (d) reports measured reserved / estimated.
FRAGMENTATION = 0.10
"""Reserved over allocated: the caching allocator rounds block sizes up and splits cached
blocks, so it holds more than the live tensors (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
lowers this). 10 % is an assumed allowance."""
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
"""The CUDA context: driver state and the loaded kernels of torch, cuBLAS and Transformer
Engine, outside the allocator (not in ``max_memory_reserved``, seen by ``nvidia-smi``). An
assumed 0.75 GiB: the context of a torch process on a recent GPU is commonly 0.5-1 GiB."""
NCCL_BYTES_PER_COMMUNICATOR = int(0.5 * GIB)
"""NCCL's device buffers per communicator with traffic: NCCL_BUFFSIZE (4 MiB by default in
NCCL's environment-variable documentation) per channel, peer and protocol; with up to 32
channels on NVLink/InfiniBand that is of the order of 0.5 GiB (assumed)."""
NCCL_COMMUNICATORS = 2
"""Communicators with GPU traffic in a TP = PP = 1 step: the data-parallel group (gradient
reduce-scatter, parameter all-gather) and the world (loss and grad-norm reductions)."""


@dataclass(frozen=True)
class Buffer:
    """One DDP buffer: its elements, padding and each DP rank's owned (state-bearing) elements."""

    name: str
    numel: int
    padded: int
    buckets: int
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    owned_per_rank: tuple[int, ...]

    @property
    def padding(self) -> float:
        """Padded elements over real ones."""
        return self.padded / self.numel - 1 if self.numel else 0.0


@dataclass(frozen=True)
class ActivationPhases:
    """Bytes of saved activations at the two moments that can be the peak (module doc)."""

    forward_end: int
    """Everything the forward keeps plus the logits."""
    backward: int
    """The loop backward (logits and coda freed; prelude and loop state kept, one iteration
    being recomputed) or, with Megatron's full recompute, one layer re-run while every kept
    layer input is still held; 0 for a model without loop or recompute."""
    layers_with_grad: int

    @property
    def peak(self) -> int:
        """The larger of the two: they never coexist."""
        return max(self.forward_end, self.backward)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one training run (module doc: what each part counts)."""

    params: int
    grads: int
    optimizer_state: int
    activations: int
    phases: ActivationPhases
    buffers: tuple[Buffer, ...] = ()
    bucket_size: int | None = None
    context_bytes: int = CUDA_CONTEXT_BYTES + NCCL_COMMUNICATORS * NCCL_BYTES_PER_COMMUNICATOR
    notes: tuple[str, ...] = field(default=())

    @property
    def layers_with_grad(self) -> int:
        """Layer passes with gradient per micro-batch."""
        return self.phases.layers_with_grad

    @property
    def total(self) -> int:
        """Allocated peak: buffers, optimizer state and the activation peak."""
        return self.params + self.grads + self.optimizer_state + self.activations

    @property
    def reserved(self) -> int:
        """The allocator's reserved peak: allocated plus fragmentation."""
        return round(self.total * (1 + FRAGMENTATION))

    @property
    def device(self) -> int:
        """What the GPU holds: reserved plus the CUDA context and NCCL buffers."""
        return self.reserved + self.context_bytes

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in table order: the parts, allocated total, reserved, device."""
        return [("weights", self.params), ("gradients", self.grads),
                ("optimizer state", self.optimizer_state), ("activations", self.activations),
                ("total", self.total), ("reserved", self.reserved), ("device", self.device)]

    def format_table(self) -> str:
        """A small text table in GiB (and GB), then the padding and the notes."""
        lines = [f"{'part':<16} {'GiB':>8} {'GB':>8}"]
        lines += [f"{name:<16} {n / GIB:8.2f} {n / 1e9:8.2f}" for name, n in self.rows()]
        p = self.phases
        lines.append(f"  activations: max(forward end {p.forward_end / GIB:.2f}, backward "
                     f"{p.backward / GIB:.2f} GiB); total = allocated peak")
        lines.append(f"  assumed allowance: reserved = total x {1 + FRAGMENTATION:.2f} (allocator "
                     f"fragmentation); device = reserved + {self.context_bytes / GIB:.2f} GiB "
                     f"(CUDA context {CUDA_CONTEXT_BYTES / GIB:.2f} + NCCL {NCCL_COMMUNICATORS} "
                     f"x {NCCL_BYTES_PER_COMMUNICATOR / GIB:.2f})")
        bucket = "one bucket" if self.bucket_size is None else f"buckets of {self.bucket_size:,}"
        for b in self.buffers:
            lines.append(f"  {b.name} buffer: {b.numel:,} params -> {b.padded:,} elements "
                         f"(+{100 * b.padding:.1f} %), {b.buckets} bucket(s) ({bucket})")
        return "\n".join(lines + [f"  {note}" for note in self.notes])


# --- buffers ------------------------------------------------------------------------------
class _GroupOfSize:
    """Stands in for the data-parallel process group where Megatron only reads its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def ddp_bucket_size(num_parameters: int, dp: int, *, overlap_grad_reduce: bool = False,
                    bucket_size: int | None = None, num_buckets: int | None = None) -> int | None:
    """The bucket size Megatron's trainer uses (``resolve_ddp_bucket_size``; None = one bucket)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.training.training import resolve_ddp_bucket_size

    from parcae_megatron.platform.dist import init_distributed

    if not torch.distributed.is_initialized():  # Megatron reads a group's size only then
        init_distributed()
    ddp = DistributedDataParallelConfig(bucket_size=bucket_size, num_buckets=num_buckets)
    return resolve_ddp_bucket_size(ddp, _GroupOfSize(dp), overlap_grad_reduce, num_parameters)


def meta_parameters(config: ParcaeConfig, *, bf16: bool = True) -> list[torch.nn.Parameter]:
    """The trainable parameters of the whole model (TP = PP = 1) on the meta device, in the
    order and dtypes Megatron's DDP sees them (bf16 through ``Float16Module``)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from parcae_megatron.model.parcae_model import ParcaeModel
    from parcae_megatron.platform.dist import init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed()
    cfg = copy.copy(config)
    cfg.use_cpu_initialization, cfg.bf16 = True, bf16
    cfg.tensor_model_parallel_size = cfg.pipeline_model_parallel_size = 1
    cfg.sequence_parallel = False
    with torch.device("meta"):
        model = ParcaeModel(cfg, get_parcae_layer_local_spec(), pre_process=True,
                           post_process=True, dp_rank=0, dp_size=1)
        if bf16:
            model = Float16Module(cfg, model)
    return [p for p in model.parameters() if p.requires_grad]


def _owned_per_rank(layout, dp: int) -> list[int]:
    """Elements of real parameters in each DP rank's shard of every bucket."""
    owned = [0] * dp
    for start, end, bucket in layout.param_index_map.values():
        first, last = layout.bucket_indices[bucket]
        shard = (last - first) // dp
        for rank in range((start - first) // shard, (end - 1 - first) // shard + 1):
            lo, hi = first + rank * shard, first + (rank + 1) * shard
            owned[rank] += min(end, hi) - max(start, lo)
    return owned


def buffer_layouts(params: list[torch.nn.Parameter], *, dp: int, bucket_size: int | None,
                   optimizer: str = "parcae_muon", distributed_optimizer: bool = True,
                   pad_for_high_nccl_busbw: bool = False) -> list[Buffer]:
    """Megatron's DDP buffers for ``params`` (meta tensors): Megatron's layout function for the
    optimizer in use, at this bucket size and data-parallel size."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import (
        _compute_default_per_buffer_param_layout,
        group_params_for_buffers,
    )
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    from parcae_megatron.training.muon_optimizer import uses_adamw

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    muon = optimizer != "adam"
    for p in params:  # the routing the trainer's buffers use (muon_optimizer.py)
        p.is_managed_by_layer_wise_optimizer = muon and not uses_adamw(p)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                        use_distributed_optimizer=distributed_optimizer,
                                        pad_buckets_for_high_nccl_busbw=pad_for_high_nccl_busbw)
    if distributed_optimizer:
        compute = (LayerWiseDistributedOptimizer if muon else DistributedOptimizer)
        layouts = compute.compute_full_param_layout(params, bucket_size, dp, ddp).layouts
    else:
        layouts = {key: _compute_default_per_buffer_param_layout(group, bucket_size)
                   for key, (group, _) in group_params_for_buffers(params, True).items()}
    buffers = []
    for key, layout in layouts.items():
        numel = sum(end - start for start, end, _ in layout.param_index_map.values())
        padded = layout.bucket_indices[-1][1]
        param_bytes = torch.empty((), dtype=key.param_dtype).element_size()
        master = 4 if param_bytes < 4 else 0
        if key.is_managed_by_layer_wise_optimizer:
            name, state = "Muon", (8 if optimizer == "parcae_muon" else 4) + master
        else:
            name, state = ("AdamW" if muon else "Adam"), 8 + master
        name += " fp32" if param_bytes == 4 else " bf16"
        owned = _owned_per_rank(layout, dp) if distributed_optimizer else [numel] * dp
        buffers.append(Buffer(name=name, numel=numel, padded=padded,
                              buckets=len(layout.bucket_indices), param_bytes=param_bytes,
                              grad_bytes=torch.empty((), dtype=key.grad_dtype).element_size(),
                              state_bytes=state, owned_per_rank=tuple(owned)))
    return buffers


# --- activations --------------------------------------------------------------------------
def loop_state_bytes(config: ParcaeConfig, *, micro_batch_size: int, seq_length: int,
                     tp: int = 1, bf16: bool = True) -> int:
    """Bytes the loop keeps for the backward besides its layers' activations: the fp32 state
    at each gradient iteration's input and the readout's fp32 input, the injection's
    loop-invariant fp32 terms, the prelude norm's input (Transformer Engine's norm keeps only
    that and 1/rms; the local torch norm also its normalised output) and the recurrent block's
    value-embedding rows."""
    s, b, t = seq_length, micro_batch_size, tp
    width = 2 if bf16 else 4
    shard = t if config.sequence_parallel else 1
    sbd = s * b * config.hidden_size // shard
    n_pre, n_rec = config.num_prelude_layers, config.num_recurrent_layers
    rows = sum(config.has_value_embedding(i) for i in range(n_pre, n_pre + n_rec))
    groups = config.num_query_groups or config.num_attention_heads
    # the injection's (its registry entry): e.g. the diagonal's drive B̄e, e in fp32 saved by
    # B's linear and Be saved by the gain multiply
    fp32_tensors = config.mean_backprop_depth + 1 + injection(config.injection_type).kept_fp32
    return (4 * sbd * fp32_tensors + (width * sbd if config.prelude_norm else 0)
            + s * b * rows * groups * config.kv_channels // t * width)


def activation_phases(config: ParcaeConfig, *, micro_batch_size: int, seq_length: int,
                      tp: int = 1, bf16: bool = True, recompute_loop_iterations: bool = False,
                      recompute_granularity: str | None = None) -> ActivationPhases:
    """Saved-activation bytes of one micro-batch at the forward end and in the loop backward."""
    s, b, d, t = seq_length, micro_batch_size, config.hidden_size, tp
    width = 2 if bf16 else 4
    sp = config.sequence_parallel or t == 1
    sbd = s * b * d
    sbd_state = sbd // t if config.sequence_parallel else sbd  # the loop state (fp32)
    layer = (34 * sbd // t if sp else sbd * 10 + 24 * sbd // t) * width // 2
    full = recompute_granularity == "full"
    # Megatron's full recompute keeps each layer's input (one [s, b, d] tensor)
    kept = width * sbd // (t if config.sequence_parallel else 1) if full else layer
    n_pre, n_rec, n_coda = (config.num_prelude_layers, config.num_recurrent_layers,
                            config.num_coda_layers)
    grad_iters = config.mean_backprop_depth if config.is_looped else 0
    logits = s * b * config.vocab_size // t * (6 if bf16 else 8)
    transients = 2 * 4 * sbd_state  # the gradients of h and of the drive, fp32
    loop_kept, working = 0, (layer if full else 0)
    if config.is_looped:
        loop_kept = loop_state_bytes(config, micro_batch_size=b, seq_length=s, tp=t, bf16=bf16)
        if recompute_loop_iterations:
            working = n_rec * layer  # the whole block of one iteration is re-run
        else:
            loop_kept += kept * n_rec * grad_iters
    forward_end = kept * (n_pre + n_coda) + loop_kept + logits
    backward = kept * n_pre + loop_kept + working + transients if config.is_looped else 0
    if full:  # the coda's backward re-runs one layer while every kept input is still there
        backward = max(backward, kept * (n_pre + n_coda) + loop_kept + layer)
    return ActivationPhases(forward_end=forward_end, backward=backward,
                            layers_with_grad=n_pre + n_coda + n_rec * grad_iters)


# --- the estimate --------------------------------------------------------------------------
def estimate_memory(config: ParcaeConfig, *, micro_batch_size: int, seq_length: int,
                    tp: int = 1, pp: int = 1, dp: int = 1, bf16: bool = True,
                    fp8: bool = False, distributed_optimizer: bool = True,
                    recompute_loop_iterations: bool = False,
                    recompute_granularity: str | None = None,
                    optimizer: str = "parcae_muon", overlap_grad_reduce: bool = False,
                    ddp_bucket_size_flag: int | None = None,
                    ddp_num_buckets: int | None = None,
                    pad_for_high_nccl_busbw: bool = False,
                    params: list[torch.nn.Parameter] | None = None) -> MemoryEstimate:
    """Per-GPU memory of training ``config`` at this micro-batch, sequence, layout, precision,
    recompute, optimizer and DDP bucketing (module doc). ``params``: the model's meta
    parameters (``meta_parameters``) when the caller already has them."""
    from parcae_megatron.training.muon_optimizer import uses_adamw

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if min(micro_batch_size, seq_length, tp, pp, dp) < 1:
        raise ValueError("micro_batch_size, seq_length, tp, pp and dp must be >= 1")
    params = params if params is not None else meta_parameters(config, bf16=bf16)
    total_params = sum(p.numel() for p in params)
    bucket = ddp_bucket_size(total_params, dp, overlap_grad_reduce=overlap_grad_reduce,
                             bucket_size=ddp_bucket_size_flag, num_buckets=ddp_num_buckets)
    buffers = buffer_layouts(params, dp=dp, bucket_size=bucket, optimizer=optimizer,
                             distributed_optimizer=distributed_optimizer,
                             pad_for_high_nccl_busbw=pad_for_high_nccl_busbw)
    shard = tp * pp
    weights = sum(b.padded * b.param_bytes for b in buffers)
    if fp8:  # TE's FP8 copy and its transpose of every layer matrix (1 byte each)
        weights += 2 * sum(p.numel() for p in params if not uses_adamw(p))
    grads = sum(b.padded * b.grad_bytes for b in buffers)
    state = max(sum(b.owned_per_rank[r] * b.state_bytes for b in buffers) for r in range(dp))
    phases = activation_phases(
        config, micro_batch_size=micro_batch_size, seq_length=seq_length, tp=tp, bf16=bf16,
        recompute_loop_iterations=recompute_loop_iterations,
        recompute_granularity=recompute_granularity)
    notes = [f"{phases.layers_with_grad} layer passes with gradient per micro-batch; "
             f"params {total_params:,} over TP x PP = {shard}"
             + (" (approximated: whole-model buffers / TP x PP)" if shard > 1 else "")]
    if distributed_optimizer and dp > 1:
        notes.append(f"optimizer state of the most loaded of DP = {dp} ranks"
                     + (" (Muon: whole matrices per rank)" if optimizer != "adam" else ""))
    return MemoryEstimate(params=round(weights / shard), grads=round(grads / shard),
                          optimizer_state=round(state / shard), activations=phases.peak,
                          phases=phases, buffers=tuple(buffers), bucket_size=bucket,
                          notes=tuple(notes))
