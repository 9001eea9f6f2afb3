"""Per-GPU memory estimate of a training run: weights, gradients, optimizer state, activations.

Arithmetic, not a measurement (nothing here has been checked on a GPU yet):

- **Weights**: 2 bytes per parameter in bf16 (4 in fp32), split evenly over TP × PP; FP8 adds
  the FP8 copy and its transpose Transformer Engine caches for every layer matrix (2 bytes).
- **Gradients**: Megatron's DDP buffer holds fp32 gradients for every local parameter (bf16
  runs accumulate and all-reduce in fp32), also with the distributed optimizer.
- **Optimizer state**: AdamW keeps m and v (8 bytes) plus, in bf16, the fp32 master copy (4);
  Muon keeps the momentum (4) plus the master copy; the authors' Muon (``parcae_muon``) also
  keeps its second moment stored parameter-shaped (4, training/muon_optimizer.py). The routing
  is the authors': Muon for the layer matrices, AdamW for embeddings, value-embedding tables, norms,
  the injection and the readout. The distributed optimizer shards the state over DP: Megatron
  runs Muon + ``--use-distributed-optimizer`` as its layer-wise distributed optimizer (each
  rank owns whole matrices) beside a distributed AdamW, so both parts are divided by DP.
- **Activations** (Korthikanti et al., bf16, flash attention: no s² term): per layer that runs
  with gradient s·b·d·(10 + 24/t) bytes, 34·s·b·d/t with sequence parallelism; a looped model
  runs L_P + μ_bwd·L_R + L_C such layers (iterations without gradient keep nothing). Loop
  checkpointing (``recompute_loop_iterations``) replaces the μ_bwd·L_R loop-layer activations by
  the fp32 loop state at each gradient iteration's boundary plus the injected input
  (benchmarks/activation_memory.py measures 0.40x of no recompute at the 1:1:1 split, μ_bwd=4);
  Megatron's full recompute keeps each layer's input (2·s·b·d) plus one layer's working set;
  selective recompute only drops the attention scores, which flash attention never stores.
  The logits cost s·b·V/t·6 bytes (bf16 logits + fp32 softmax), 8 in fp32. Pipeline
  parallelism: 1F1B keeps PP micro-batches in flight on the first stage, each with 1/PP of the
  layers, so the peak is about one micro-batch of the whole model (that is what is counted).

Not counted: the CUDA context, NCCL buffers, allocator fragmentation and temporary buffers
(typically a few GB).
"""

from __future__ import annotations

from dataclasses import dataclass

from parcae_megatron.model.accounting import count_parameters_from_config
from parcae_megatron.model.config import ParcaeConfig

GIB = 2.0**30
OPTIMIZERS = ("parcae_muon", "muon", "adam")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one training run (see module doc for what each part counts)."""

    params: int
    grads: int
    optimizer_state: int
    activations: int
    layers_with_grad: int
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Sum of the four parts."""
        return self.params + self.grads + self.optimizer_state + self.activations

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) in table order, total last."""
        return [("weights", self.params), ("gradients", self.grads),
                ("optimizer state", self.optimizer_state), ("activations", self.activations),
                ("total", self.total)]

    def format_table(self) -> str:
        """A small text table in GiB (and GB), total last, then the notes."""
        lines = [f"{'part':<16} {'GiB':>8} {'GB':>8}"]
        lines += [f"{name:<16} {n / GIB:8.2f} {n / 1e9:8.2f}" for name, n in self.rows()]
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def _split_params(config: ParcaeConfig) -> tuple[int, int]:
    """(all parameters, layer matrices) of the full model: the layer matrices (value-embedding
    gates included) are what the authors' routing gives Muon."""
    counts = count_parameters_from_config(config)
    layers = (config.num_prelude_layers + config.num_recurrent_layers
              + config.num_coda_layers)
    stacks = counts["prelude_params"] + counts["recurrent_params"] + counts["coda_params"]
    matrices = stacks - 2 * config.hidden_size * layers  # minus each layer's two norm vectors
    return counts["total_params"], matrices


def activation_bytes(config: ParcaeConfig, *, micro_batch_size: int, seq_length: int,
                     tp: int = 1, bf16: bool = True, recompute_loop_iterations: bool = False,
                     recompute_granularity: str | None = None) -> tuple[int, int]:
    """(bytes kept for the backward by one micro-batch, layers run with gradient)."""
    s, b, d, t = seq_length, micro_batch_size, config.hidden_size, tp
    width = 1 if bf16 else 2  # fp32 doubles every saved tensor
    sbd = s * b * d
    per_layer = (34 * sbd // t if config.sequence_parallel or t == 1
                 else sbd * 10 + 24 * sbd // t) * width
    n_pre, n_rec, n_coda = (config.num_prelude_layers, config.num_recurrent_layers,
                            config.num_coda_layers)
    grad_iters = config.mean_backprop_depth if config.is_looped else 0
    layers = n_pre + n_coda + n_rec * grad_iters
    full = recompute_granularity == "full"
    layer_cost = (2 * width * sbd // (t if config.sequence_parallel else 1)) if full \
        else per_layer
    if config.is_looped and recompute_loop_iterations:
        # loop: fp32 state per gradient iteration + the fp32 injected input e, kept once
        loop = 4 * sbd * (grad_iters + 1)
    else:
        loop = layer_cost * n_rec * grad_iters
    activations = layer_cost * (n_pre + n_coda) + loop
    if full or (config.is_looped and recompute_loop_iterations):
        activations += per_layer  # the one layer (or iteration) recomputed at a time
    logits = s * b * config.vocab_size // t * (6 if bf16 else 8)
    return activations + logits, layers


def estimate_memory(config: ParcaeConfig, *, micro_batch_size: int, seq_length: int,
                    tp: int = 1, pp: int = 1, dp: int = 1, bf16: bool = True,
                    fp8: bool = False, distributed_optimizer: bool = True,
                    recompute_loop_iterations: bool = False,
                    recompute_granularity: str | None = None,
                    optimizer: str = "parcae_muon") -> MemoryEstimate:
    """Per-GPU memory of training ``config`` at this micro-batch, sequence, layout, precision,
    recompute and optimizer (module doc: what is and is not counted)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if min(micro_batch_size, seq_length, tp, pp, dp) < 1:
        raise ValueError("micro_batch_size, seq_length, tp, pp and dp must be >= 1")
    total, matrices = _split_params(config)
    muon = 0 if optimizer == "adam" else matrices
    adamw = total - muon
    shard = tp * pp
    weight_bytes = 2 if bf16 else 4
    params = total * weight_bytes + (2 * matrices if fp8 else 0)
    grads = total * 4
    master = 4 if bf16 else 0
    muon_state = {"parcae_muon": 8, "muon": 4, "adam": 0}[optimizer] + master
    state = (muon * muon_state + (8 + master) * adamw) / (dp if distributed_optimizer else 1)
    activations, layers = activation_bytes(
        config, micro_batch_size=micro_batch_size, seq_length=seq_length, tp=tp, bf16=bf16,
        recompute_loop_iterations=recompute_loop_iterations,
        recompute_granularity=recompute_granularity)
    notes = [f"{layers} layer passes with gradient per micro-batch; "
             f"params {total:,} over TP x PP = {shard}"]
    if optimizer != "adam" and distributed_optimizer and dp > 1:
        notes.append(f"optimizer state sharded over DP = {dp} (Muon: whole matrices per rank)")
    notes.append("not counted: CUDA context, NCCL buffers, fragmentation (a few GB)")
    return MemoryEstimate(params=round(params / shard), grads=round(grads / shard),
                          optimizer_state=round(state / shard), activations=activations,
                          layers_with_grad=layers, notes=tuple(notes))
