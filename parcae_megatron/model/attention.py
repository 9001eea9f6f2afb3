"""Parcae self-attention: Megatron `SelfAttention` plus gated value embeddings.

Value embeddings (docs/design.md §2.3): some layers own a token-indexed table E ∈ R^{V × n_kv·hd};
their values become v + g ⊙ E[s] with a per-head gate g = 2·sigmoid(W_g · x[..., :32]) on the
normed block input x. Recurrent layers reuse their table on every loop iteration because the
table lives in the (shared) layer. Under tensor parallelism the table and the gate are sharded
by heads, like the values they are added to. With sequence parallelism the block input is
sharded along the sequence while the values (after the QKV all-gather) cover the whole
sequence, so the gate's 32 input channels are all-gathered along the sequence too (their
gradient is reduce-scattered back, as for the QKV input).

No side channel carries the token ids. The model looks up a stack's table rows E[s] once
per forward (``ParcaeModel.value_embedding_rows``, a `ValueRows`) and hands them to the stack
as the ``context`` argument of Megatron's ``TransformerBlock``, which passes ``context`` from layer
to layer and saves it with the inputs of a recomputed chunk (full activation recompute), so
a recomputed layer sees exactly the rows it saw in its forward. ``ParcaeTransformerLayer``
(layer_specs.py) gives them to its attention for the duration of that one call (Megatron's
layer has no argument through to its self-attention). Inside the loop the model selects the
rows of the sequences still iterating, so the compaction index never reaches a layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NewType

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_size

ValueRows = NewType("ValueRows", torch.Tensor)
"""A stack's value-embedding rows: for every value-embedding layer of the stack, in layer
order, its table rows E[s] of this forward's tokens, side by side: [s, b, Σ widths] (see
``ParcaeModel.value_embedding_rows``). Carried as Megatron's ``context`` argument, so it
stays a plain tensor: Megatron's full recompute saves ``context`` with
``save_for_backward``, which takes tensors only."""


class HeadRMSNorm(torch.nn.Module):
    """Parameter-free RMS normalisation over the head dim (the QK-norm of docs/design.md §2.2).

    Parcae applies it after RoPE; RoPE is a rotation of each head vector, which preserves
    its RMS, so normalising before RoPE (where Megatron applies q/k norms) is the same map.
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **kwargs) -> None:
        super().__init__()
        qk_eps = getattr(config, "qk_layernorm_epsilon", None)
        self.eps = eps if qk_eps is None else qk_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dim to unit RMS (computed in fp32)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).type_as(x)


class ValueEmbedding(MegatronModule):
    """A gated value-embedding table for one attention layer, sharded by heads over TP."""

    def __init__(self, config, vocab_size: int, tp_group=None) -> None:
        super().__init__(config=config)
        tp_size = get_pg_size(tp_group)
        groups = config.num_query_groups or config.num_attention_heads
        self.heads = groups // tp_size
        self.head_dim = config.kv_channels
        self.gate_channels = config.value_embedding_gate_channels
        self.tp_group = tp_group
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.empty(vocab_size, self.heads * self.head_dim,
                                                     dtype=dtype))
        self.gate_weight = torch.nn.Parameter(torch.empty(self.heads, self.gate_channels,
                                                          dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        set_tensor_model_parallel_attributes(self.gate_weight, True, 0, 1)
        # Values are set by the model's initialisation pass (init.py), from the full tables.

    @property
    def width(self) -> int:
        """Columns of this rank's table (its heads × head dim)."""
        return self.heads * self.head_dim

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Table rows E[s] of ``input_ids`` ([b, s]) as [s, b, heads·hd]."""
        return F.embedding(input_ids, self.weight).transpose(0, 1)

    def forward(self, normed_input: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """g ⊙ E[s] shaped like Megatron's value tensor [s, b, heads, head_dim], from the
        normed block input and this layer's rows E[s] ([s, b, heads·hd])."""
        table = rows.reshape(*rows.shape[:2], self.heads, self.head_dim)
        # The gate reads the replicated input but writes only this rank's heads: its input
        # gradient must be summed over TP ranks, like a column-parallel linear's. Under
        # sequence parallelism the input is this rank's sequence shard: gather the full
        # sequence (backward: reduce-scatter, which also sums over ranks).
        gate_in = normed_input[..., : self.gate_channels]
        if self.config.sequence_parallel:
            gate_in = gather_from_sequence_parallel_region(
                gate_in, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            gate_in = copy_to_tensor_model_parallel_region(gate_in, group=self.tp_group)
        gate = 2.0 * torch.sigmoid(F.linear(gate_in, self.gate_weight))
        return gate.unsqueeze(-1) * table

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Table sharded along its columns (heads), gate along its rows."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 1, "gate_weight": 0}, sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )


@dataclass
class ParcaeSelfAttentionSubmodules(SelfAttentionSubmodules):
    """`SelfAttentionSubmodules` plus the value-embedding builder."""

    value_embedding: type | None = ValueEmbedding


class ParcaeSelfAttention(SelfAttention):
    """Self-attention with an optional gated value embedding.

    ``first_effective_layer`` is the effective-layer index of this stack's first layer
    (prelude 0, recurrent L_P, coda L_P + L_R); with the layer number it decides whether
    this layer owns a value-embedding table.
    """

    def __init__(self, config, submodules: ParcaeSelfAttentionSubmodules, layer_number: int,
                 first_effective_layer: int = 0, **kwargs) -> None:
        super().__init__(config, submodules, layer_number, **kwargs)
        self.effective_layer = first_effective_layer + layer_number - 1
        self.value_embedding = None
        self.value_rows_columns: slice | None = None
        """This layer's columns in its stack's value-embedding rows (set by the model)."""
        self._value_rows: torch.Tensor | None = None
        if submodules.value_embedding is not None and config.has_value_embedding(
                self.effective_layer):
            self.value_embedding = submodules.value_embedding(
                config, config.vocab_size, tp_group=self.pg_collection.tp)

    @contextmanager
    def value_rows_bound(self, stack_rows: ValueRows | None) -> Iterator[None]:
        """Use ``stack_rows`` (the stack's rows, this layer's columns) for one call only."""
        if self.value_embedding is None:
            yield
            return
        if stack_rows is None:
            raise RuntimeError("a value-embedding layer was called without its table rows: "
                               "pass context=model.value_embedding_rows(stack, input_ids)")
        self._value_rows = stack_rows[..., self.value_rows_columns]
        try:
            yield
        finally:
            self._value_rows = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate: bool = False, split_qkv: bool = True):
        """Megatron's q, k, v with the gated value embedding added to v (before RoPE)."""
        out = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                  output_gate, split_qkv)
        if self.value_embedding is None:
            return out
        if not split_qkv:
            raise NotImplementedError("value embeddings need split q/k/v (fused-QKV inference "
                                      "kernels are not supported)")
        if self._value_rows is None:
            raise RuntimeError("value embedding rows are bound only inside "
                               "ParcaeTransformerLayer's attention call")
        query, key, value, *rest = out
        value = value + self.value_embedding(hidden_states, self._value_rows).to(value.dtype)
        return (query, key, value, *rest)

