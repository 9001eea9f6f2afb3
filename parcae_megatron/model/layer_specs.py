"""The Parcae block's layer spec, on Megatron-Core's local modules or on Transformer Engine.

Both backends build the same block (docs/design.md §2.2): pre-norm RMSNorm, biasless
QKV/out projections, parameter-free QK-norm, gated value embeddings, 0.5·ReLU² MLP.
Checkpoint keys are the same for both, so a run can switch between them.
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from parcae_megatron.model.attention import (
    HeadRMSNorm,
    ParcaeSelfAttention,
    ParcaeSelfAttentionSubmodules,
    ValueEmbedding,
    ValueRows,
)
from parcae_megatron.model.norm import RMSNorm


class ParcaeTransformerLayer(TransformerLayer):
    """Megatron's `TransformerLayer` whose ``context`` argument carries the stack's
    value-embedding rows (`ValueRows`) to its self-attention."""

    def _forward_attention(self, hidden_states, attention_mask=None,
                           context: ValueRows | None = None, *args, **kwargs):
        """``context`` (unused by Megatron here: Parcae has no cross-attention) carries the
        stack's value-embedding rows to this layer's self-attention for this call, and is
        returned unchanged, so the block hands the same rows to every layer and Megatron's
        full recompute saves and restores it with the chunk's inputs (attention.py)."""
        with self.self_attention.value_rows_bound(context):
            hidden_states, _ = super()._forward_attention(hidden_states, attention_mask, None,
                                                          *args, **kwargs)
        return hidden_states, context


def te_available() -> bool:
    """True when Transformer Engine can be imported (a GPU machine with TE installed)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a CPU machine with a half-installed TE raises RuntimeError
        return False
    return True


def get_parcae_layer_spec(transformer_impl: str = "auto") -> ModuleSpec:
    """The Parcae block on 'local' (Megatron-Core's own modules: CPU and GPU) or
    'transformer_engine' modules (GPU; FP8-capable); 'auto': TE when importable, else local.

    The backends differ only in the norms: the local block uses its own `RMSNorm` (unlike
    torch's wrapper, it supports sequence parallelism) before attention and before the
    MLP, mapped to the TE checkpoint key of the MLP norm; TE keeps the attention input norm
    a separate TENorm, because the value-embedding gate reads the normed input, and fuses
    the MLP norm into fc1.
    """
    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if te_available() else "local"
    if transformer_impl == "local":
        backend = LocalSpecProvider()
        input_norm = pre_mlp_norm = RMSNorm
        keys_map = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    elif transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
        input_norm, pre_mlp_norm, keys_map = backend.layer_norm(rms_norm=True), IdentityOp, {}
    else:
        raise ValueError(f"unknown transformer_impl {transformer_impl!r}")
    return ModuleSpec(
        module=ParcaeTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=ParcaeSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=ParcaeSelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=HeadRMSNorm,
                    k_layernorm=HeadRMSNorm,
                    value_embedding=ValueEmbedding,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def get_parcae_layer_local_spec() -> ModuleSpec:
    """The Parcae block on Megatron-Core's local modules (`get_parcae_layer_spec`)."""
    return get_parcae_layer_spec("local")


def get_parcae_layer_te_spec() -> ModuleSpec:
    """The Parcae block on Transformer Engine modules (`get_parcae_layer_spec`)."""
    return get_parcae_layer_spec("transformer_engine")


def spec_for_stack(layer_spec: ModuleSpec, first_effective_layer: int) -> ModuleSpec:
    """A copy of ``layer_spec`` whose attention knows where its stack starts (for VE placement)."""
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.params = {
        **spec.submodules.self_attention.params,
        "first_effective_layer": first_effective_layer,
    }
    return spec
