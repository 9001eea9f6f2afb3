"""`ParcaeModel`: prelude → (prelude norm, injection, recurrent block) × T → readout C → coda.

Built from Megatron-Core pieces: vocab-parallel embedding, three `TransformerBlock` stacks
sharing one layer spec, RoPE, a tied vocab-parallel output layer. Pipeline parallelism cuts
the model along ``config.stage_layout()``; the whole loop always lives on one stage.

The loop runs per-sequence depths with *compaction*: iteration j runs the recurrent block
only on the sequences still iterating (gather/scatter on the batch dim), so executed work
follows Σ T_i instead of b · max T_i (the authors' masking, kept as ``loop_execution='masked'``).

Sequence parallelism works as in Megatron's GPTModel: the embedding reduce-scatters to
sequence shards, every norm and the whole loop (h, injection, readout) run on this rank's
shard, attention/MLP gather and reduce-scatter inside their linears, and the output layer
gathers the sequence. h₀ of a shard is that shard of the replica's full h₀, so the model
computes the same function at any TP size, with or without SP.

Value-embedding rows reach the layers as the blocks' ``context`` argument (attention.py): each
stack's rows are looked up once per forward, and the loop passes each iteration the rows of
the sequences it runs. With ``recompute_loop_iterations`` every gradient iteration is a
non-reentrant checkpoint: only the loop state at iteration boundaries is kept for backward.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor

from parcae_megatron.hf.loop_math import truncated_normal_
from parcae_megatron.model.attention import ParcaeSelfAttention, ValueEmbedding, ValueRows
from parcae_megatron.model.config import ParcaeConfig
from parcae_megatron.model.depth import DepthSample, DepthSampler
from parcae_megatron.model.init import deferred_initialization, init_parameters
from parcae_megatron.model.injection import Prepared, Readout, build_injection
from parcae_megatron.model.layer_specs import get_parcae_layer_spec, spec_for_stack

CHECKPOINT_NAME = "core"
"""The recurrent block's name in checkpoint keys (its name before it became ``recurrent``):
Megatron checkpoints keep it, so those written before and after the rename load alike."""


@dataclass
class LoopStats:
    """Counters of the loops run since the last ``pop_loop_stats`` (for telemetry)."""

    sequences: int = 0
    sampled_iterations: int = 0
    """Σ T_i: what the sampled depths ask for."""
    executed_iterations: int = 0
    """Sequence-iterations the recurrent block actually ran (Σ T_i when compacted)."""
    grad_iterations: int = 0
    """Σ k_i: sequence-iterations run with gradient."""
    max_depth: int = 0
    forwards: int = 0
    state_norm: list = field(default_factory=list)
    """Mean over tokens of ‖h_T‖ per forward (only while ``record_state_stats``)."""
    residual_norm: list = field(default_factory=list)
    """Mean over tokens of ‖h_T − h_{T−1}‖ per forward (only while ``record_state_stats``)."""


def output_layer_config(config: ParcaeConfig) -> ParcaeConfig:
    """``config`` for Megatron's own output layer: without APEX's fused wgrad kernel it runs
    unfused, while Transformer Engine layers keep their own fused wgrad accumulation."""
    if not config.gradient_accumulation_fusion or \
            tensor_parallel.layers._grad_accum_fusion_available:
        return config
    unfused = copy.copy(config)
    unfused.gradient_accumulation_fusion = False
    return unfused


class ParcaeModel(LanguageModule):
    """Parcae looped language model (or, with no recurrent layers, its Transformer baseline).

    Args:
        config: the model configuration.
        transformer_layer_spec: spec of one block; defaults to TE when importable, else local.
        pre_process / post_process: whether this pipeline stage holds the embedding / the
            output layer (default: first / last stage).
        dp_rank / dp_size: data-parallel coordinates for the depth sampler (default: from
            ``parallel_state``).
    """

    def __init__(self, config: ParcaeConfig, transformer_layer_spec: ModuleSpec | None = None,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 dp_rank: int | None = None, dp_size: int | None = None) -> None:
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.pre_process = pp_rank == 0 if pre_process is None else pre_process
        self.post_process = pp_rank == pp_size - 1 if post_process is None else post_process
        self.share_embeddings_and_output_weights = True
        self.vocab_size = config.vocab_size
        self.stage = config.stage_layout()[pp_rank]
        spec = transformer_layer_spec or get_parcae_layer_spec()
        self.input_tensor: Tensor | None = None
        self._state_generators: dict[torch.device, torch.Generator] = {}
        n_pre, n_rec = config.num_prelude_layers, config.num_recurrent_layers
        self.first_effective_layer = {"prelude": 0, "recurrent": n_pre, "coda": n_pre + n_rec}
        """Effective-layer index of each stack's first layer (its layers' init keys)."""
        with deferred_initialization(config) as initialise:
            self._build(config, spec, dp_rank, dp_size)
        if initialise:
            self.init_weights()
        self.register_load_state_dict_pre_hook(_rename_checkpoint_keys)
        if self.pre_process or self.post_process:
            # On a last stage without the embedding, Megatron copies the first stage's
            # embedding into the output layer (an all-reduce with a zeroed copy).
            self.setup_embeddings_and_output_layer()
        for module in self.modules():
            if isinstance(module, ValueEmbedding):
                module.weight.is_embedding_or_output_parameter = True
        for stack in (self.prelude, self.recurrent, self.coda):
            if stack is not None:
                self._assign_value_rows_columns(stack)
        if self.has_loop:
            # docs/design.md §6.1: B and C (like A_log, dt_bias) are in the AdamW group. Their own
            # flag (read by the optimizer routing), not Megatron's embedding flag, which would
            # also give them --decoupled-lr.
            for param in (*self.injection.parameters(), *self.readout.parameters()):
                param.adamw_only = True

    def _build(self, config: ParcaeConfig, spec: ModuleSpec, dp_rank: int | None,
               dp_size: int | None) -> None:
        """This stage's modules, their weights left empty (`init_weights` sets them)."""
        norm = spec.submodules.input_layernorm
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=config.vocab_size,
                max_sequence_length=config.seq_length, position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0,
            rotary_base=config.rotary_base, use_cpu_initialization=config.use_cpu_initialization)

        def stack(name: str, first_layer: int) -> TransformerBlock | None:
            token = {"prelude": "p", "recurrent": "R", "coda": "c"}[name]
            if token not in self.stage:
                return None
            return TransformerBlock(config=config.stack_config(name),
                                    spec=spec_for_stack(spec, first_layer),
                                    post_layer_norm=False, pre_process=True, post_process=False)

        first = self.first_effective_layer
        self.prelude = stack("prelude", first["prelude"])
        self.recurrent = stack("recurrent", first["recurrent"])
        self.coda = stack("coda", first["coda"])
        self.has_loop = self.recurrent is not None
        if self.has_loop:
            hidden = config.hidden_size
            self.prelude_norm = (norm(config=config, hidden_size=hidden,
                                      eps=config.layernorm_epsilon)
                                 if config.prelude_norm else None)
            self.injection = build_injection(config)
            self.readout = Readout(config)
            if dp_rank is None:
                dp_rank = parallel_state.get_data_parallel_rank()
                dp_size = parallel_state.get_data_parallel_world_size()
            self.depth_sampler = DepthSampler(config, dp_rank, dp_size or 1)
        self.loop_stats = LoopStats()
        self.record_state_stats = False

        if self.post_process:
            self.final_norm = norm(config=config, hidden_size=config.hidden_size,
                                   eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, config.vocab_size, config=output_layer_config(config),
                init_method=config.embedding_init_method, bias=False, skip_bias_add=False,
                gather_output=False, skip_weight_param_allocation=self.pre_process)

    def init_keys(self) -> Iterator[tuple[str, Tensor]]:
        """Every parameter of this stage with its layout-independent key: a layer's
        parameters are ``layers.<effective layer>.…`` (the same on any pipeline stage), the
        output layer's copy of the tied embedding is ``embedding.word_embeddings.weight``,
        the rest keep their names."""
        layer = re.compile(r"(prelude|recurrent|coda)\.layers\.(\d+)\.(.*)")
        for name, param in self.named_parameters():
            match = layer.fullmatch(name)
            if match:
                stack, index, rest = match.groups()
                number = getattr(self, stack).layers[int(index)].layer_number  # PP-global
                name = f"layers.{self.first_effective_layer[stack] + number - 1}.{rest}"
            elif name == "output_layer.weight":
                name = "embedding.word_embeddings.weight"
            yield name, param

    def init_weights(self) -> None:
        """Set every parameter to its initial value, from its key alone (model/init.py): the
        same weights on any TP/PP layout. Meta tensors are skipped (``to_empty`` them first)."""
        init_parameters(self.init_keys(), self.config)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """Megatron's sharded state dict with the recurrent block under its checkpoint name
        (``core.layers.…``); only the checkpoint keys change, not the module names."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        ours = f"{prefix}recurrent."
        replace_prefix_for_sharding({k: v for k, v in state.items() if k.startswith(ours)},
                                    ours, f"{prefix}{CHECKPOINT_NAME}.")
        return state

    # ---------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """Activation received from the previous pipeline stage."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "ParcaeModel takes a single pipeline input"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    @staticmethod
    def _value_attentions(stack: TransformerBlock) -> list[ParcaeSelfAttention]:
        return [layer.self_attention for layer in stack.layers
                if getattr(layer.self_attention, "value_embedding", None) is not None]

    def _assign_value_rows_columns(self, stack: TransformerBlock) -> None:
        start = 0
        for attention in self._value_attentions(stack):
            width = attention.value_embedding.width
            attention.value_rows_columns = slice(start, start + width)
            start += width

    def value_embedding_rows(self, stack: TransformerBlock,
                             input_ids: Tensor) -> ValueRows | None:
        """The rows E[s] of every value-embedding layer of ``stack`` for ``input_ids`` ([b, s]),
        side by side ([s, b, Σ widths]), or None when the stack has none: the ``context`` the
        stack's layers read."""
        tables = [a.value_embedding.lookup(input_ids) for a in self._value_attentions(stack)]
        return ValueRows(torch.cat(tables, dim=-1)) if tables else None

    def pop_loop_stats(self) -> LoopStats:
        """Return and reset the loop counters."""
        stats, self.loop_stats = self.loop_stats, LoopStats()
        return stats

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None, *,
                num_iterations: int | None = None, depths: DepthSample | None = None,
                initial_state: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Per-token loss [b, s] if ``labels`` are given, else logits [b, s, V/TP].

        Loop depth: ``depths`` if given; else ``num_iterations`` for every sequence; else
        sampled per ``config.depth_sampling`` in training mode and μ_rec in eval mode.
        ``initial_state`` ([s, b, d], the full sequence; a sequence-parallel rank takes its
        shard) or ``generator`` make h₀ reproducible; by default h₀ is drawn on the device.
        """
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            hidden = self.input_tensor
        rope = self.rotary_pos_emb(self._full_sequence_length(hidden))
        if self.prelude is not None:
            hidden = self.prelude(hidden_states=hidden, attention_mask=attention_mask,
                                  rotary_pos_emb=rope,
                                  context=self.value_embedding_rows(self.prelude, input_ids))
        if self.has_loop:
            rows = self.value_embedding_rows(self.recurrent, input_ids)
            hidden = self._loop(hidden, attention_mask, rope, rows, num_iterations, depths,
                                initial_state, generator)
        if self.coda is not None:
            hidden = self.coda(hidden_states=hidden, attention_mask=attention_mask,
                               rotary_pos_emb=rope,
                               context=self.value_embedding_rows(self.coda, input_ids))
        if not self.post_process:
            return hidden
        hidden = self.final_norm(hidden)
        logits, _ = self.output_layer(hidden, weight=self.shared_embedding_or_output_weight())
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    # ---------------------------------------------------------------------------------
    def _full_sequence_length(self, x: Tensor) -> int:
        """The sequence length of ``x`` ([s, b, ...]) before sequence-parallel sharding."""
        if self.config.sequence_parallel:
            return x.shape[0] * parallel_state.get_tensor_model_parallel_world_size()
        return x.shape[0]

    def _sequence_shard(self, full: Tensor, local_length: int) -> Tensor:
        """This TP rank's sequence shard of ``full`` (itself without sequence parallelism)."""
        if full.shape[0] == local_length:
            return full
        rank = parallel_state.get_tensor_model_parallel_rank()
        return full.narrow(0, rank * local_length, local_length)

    def state_generator(self, device: torch.device, seed: int) -> torch.Generator:
        """This replica's generator on ``device``, reseeded with ``seed`` (one per device,
        reused: reseeding is cheap, allocating a CUDA generator per micro-batch is not)."""
        gen = self._state_generators.get(device)
        if gen is None:
            gen = self._state_generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def _depths_and_state(self, x: Tensor, num_iterations, depths, initial_state, generator):
        cfg = self.config
        batch = x.shape[1]
        state_seed = None
        if depths is None:
            if num_iterations is not None:
                depths = DepthSample.fixed(batch, num_iterations,
                                           cfg.mean_backprop_depth if self.training else 0)
            elif self.training:
                depths, state_seed = self.depth_sampler.next(batch)
            else:
                depths = DepthSample.fixed(batch, cfg.mean_recurrence, 0)
        full_shape = (self._full_sequence_length(x), *x.shape[1:])
        if initial_state is not None:
            h0 = initial_state.to(device=x.device, dtype=torch.float32)
        elif cfg.state_init == "zero":
            h0 = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        else:
            if generator is None:
                # On the model's device from the replica's keyed generator: identical on all
                # TP ranks, reproducible from (seed, step, micro-batch), no host copy.
                if state_seed is None:
                    state_seed = self.depth_sampler.eval_state_seed()
                generator = self.state_generator(x.device, state_seed)
            h0 = truncated_normal_(torch.empty(full_shape, dtype=torch.float32,
                                               device=generator.device),
                                   cfg.init_method_std, generator).to(x.device)
        return depths, self._sequence_shard(h0, x.shape[0])

    def _loop(self, x: Tensor, mask, rope, rows: ValueRows | None, num_iterations, depths,
              initial_state, generator) -> Tensor:
        depths, h = self._depths_and_state(x, num_iterations, depths, initial_state, generator)
        e = self.prelude_norm(x) if self.prelude_norm is not None else x
        prepared = self.injection.prepare(e)
        block_dtype = torch.float32 if self.config.fp32_residual_connection else x.dtype
        no_grad, grad = depths.no_grad.cpu(), depths.grad.cpu()  # host-side: no device syncs
        record = self.record_state_stats
        prev = h.detach().clone() if record else None
        checkpointed = self.config.recompute_loop_iterations and torch.is_grad_enabled()

        def run(h: Tensor, active: Tensor, checkpoint: bool = False) -> Tensor:
            batch, n_active = h.shape[1], int(active.sum())
            index = active.nonzero().squeeze(1).to(h.device, non_blocking=True)
            if prev is not None:
                prev.index_copy_(1, index, h.detach().index_select(1, index))
            self.loop_stats.executed_iterations += (
                n_active if self.config.loop_execution == "compact" else batch)
            args = (h, prepared, rows, active, index, mask, rope, block_dtype)
            if checkpoint:  # keep h only; the iteration is re-run in the backward
                return torch.utils.checkpoint.checkpoint(self._iterate, *args,
                                                         use_reentrant=False)
            return self._iterate(*args)

        with torch.no_grad():
            for j in range(int(no_grad.max())):
                h = run(h, no_grad > j)
        for j in range(int(grad.max())):
            h = run(h, grad > j, checkpointed)

        stats = self.loop_stats
        stats.forwards += 1
        stats.sequences += len(depths.total)
        stats.sampled_iterations += int(depths.total.sum())
        stats.grad_iterations += int(depths.grad.sum()) if torch.is_grad_enabled() else 0
        stats.max_depth = max(stats.max_depth, int(depths.total.max()))
        if record:
            with torch.no_grad():
                hd = h.detach()
                norms = torch.stack([hd.norm(dim=-1).mean(), (hd - prev).norm(dim=-1).mean()])
                if self.config.sequence_parallel:  # equal shards: the mean of the means
                    torch.distributed.all_reduce(
                        norms, group=parallel_state.get_tensor_model_parallel_group())
                    norms /= parallel_state.get_tensor_model_parallel_world_size()
                stats.state_norm.append(float(norms[0]))
                stats.residual_norm.append(float(norms[1]))
        return self.readout(h).to(x.dtype)

    def _iterate(self, h: Tensor, prepared: Prepared, rows: ValueRows | None, active: Tensor,
                 index: Tensor, mask, rope, block_dtype) -> Tensor:
        """One loop iteration on the active sequences: h ← F_R(Ā h + B̄ e).

        ``active`` is a host-side bool mask (``index`` its positions on the device), so
        choosing the sub-batch never syncs the device. A function of its arguments only, so
        it can be re-run as a checkpoint.
        """
        batch = h.shape[1]
        n_active = len(index)
        compact = self.config.loop_execution == "compact" and n_active < batch
        if compact:
            sub = h.index_select(1, index)
            sub_prepared = Prepared(prepared.decay, prepared.drive.index_select(1, index))
            rows = rows.index_select(1, index) if rows is not None else None
        else:
            sub, sub_prepared = h, prepared
        u = self.injection.step(sub, sub_prepared)
        out = self.recurrent(hidden_states=u.to(block_dtype), attention_mask=mask,
                             rotary_pos_emb=rope, context=rows).float()
        if compact:
            return h.index_copy(1, index, out)
        if n_active < batch:  # masked execution: inactive sequences keep their state
            return torch.where(active.to(h.device).view(1, -1, 1), out, h)
        return out


def _rename_checkpoint_keys(module: ParcaeModel, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: a plain state dict (Megatron's ``torch`` checkpoint format, a
    saved ``state_dict()``) with the recurrent block under its checkpoint name loads too."""
    old = f"{prefix}{CHECKPOINT_NAME}."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[f"{prefix}recurrent.{key[len(old):]}"] = state_dict.pop(key)
