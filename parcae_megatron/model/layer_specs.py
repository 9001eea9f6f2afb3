"""Layer specs for Parcae blocks: a local spec (any device) and a Transformer Engine spec.

Both build the same block (docs/design.md §2.2): pre-norm RMSNorm, biasless QKV/out projections,
parameter-free QK-norm, gated value embeddings, 0.5·ReLU² MLP. Checkpoint keys are the same
for both, so a run can switch between them.
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from parcae_megatron.model.attention import (
    HeadRMSNorm,
    ParcaeSelfAttention,
    ParcaeSelfAttentionSubmodules,
    ValueEmbedding,
)
from parcae_megatron.model.init import keyed_init
from parcae_megatron.model.norm import RMSNorm


class ParcaeTransformerLayer(TransformerLayer):
    """Megatron's `TransformerLayer` whose MLP inits are bound to this layer's parameters and
    whose ``context`` argument carries the stack's value-embedding rows.

    Megatron's MLP takes its init methods from the config and learns its layer number only
    after construction, so the layer hands it a config copy whose fc1/fc2 inits are keyed by
    the global (effective) layer index: the initial weights do not depend on TP/PP (init.py).
    ``first_effective_layer`` is where this layer's stack starts (prelude 0, recurrent L_P,
    coda L_P + L_R).
    """

    def __init__(self, config, submodules: TransformerLayerSubmodules, layer_number: int = 1,
                 first_effective_layer: int = 0, pg_collection=None, vp_stage=None,
                 **kwargs) -> None:
        pp_group = (pg_collection or ProcessGroupCollection.use_mpu_process_groups()).pp
        number = layer_number + get_transformer_layer_offset(config, vp_stage,
                                                             get_pg_rank(pp_group))
        prefix = f"layers.{first_effective_layer + number - 1}.mlp"
        d, ffn = config.hidden_size, config.ffn_hidden_size
        if not config.gated_linear_unit:  # GLU's interleaved fc1 layout is not keyed
            config = copy.copy(config)
            config.init_method = keyed_init(config.init_method, f"{prefix}.linear_fc1.weight",
                                            (ffn, d), 0)
            config.output_layer_init_method = keyed_init(
                config.output_layer_init_method, f"{prefix}.linear_fc2.weight", (d, ffn), 1)
        super().__init__(config, submodules, layer_number, pg_collection=pg_collection,
                         vp_stage=vp_stage, **kwargs)

    def _forward_attention(self, hidden_states, attention_mask=None, context=None,
                           *args, **kwargs):
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


def get_parcae_layer_local_spec() -> ModuleSpec:
    """Parcae block from Megatron-Core's own modules (runs on CPU and GPU)."""
    backend = LocalSpecProvider()
    norm = RMSNorm  # unlike torch's, supports sequence parallelism
    return ModuleSpec(
        module=ParcaeTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
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
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the TE spec, whose MLP norm is fused into fc1.
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


def get_parcae_layer_te_spec() -> ModuleSpec:
    """Parcae block on Transformer Engine modules (GPU; FP8-capable).

    The attention input norm stays a separate TENorm because the value-embedding gate
    reads the normed input; the MLP norm is fused into fc1.
    """
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    backend = TESpecProvider()
    return ModuleSpec(
        module=ParcaeTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.layer_norm(rms_norm=True),
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
            pre_mlp_layernorm=IdentityOp,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_parcae_layer_spec(transformer_impl: str = "auto") -> ModuleSpec:
    """'local', 'transformer_engine', or 'auto' (TE when importable, else local)."""
    if transformer_impl == "auto":
        transformer_impl = "transformer_engine" if te_available() else "local"
    if transformer_impl == "transformer_engine":
        return get_parcae_layer_te_spec()
    if transformer_impl == "local":
        return get_parcae_layer_local_spec()
    raise ValueError(f"unknown transformer_impl {transformer_impl!r}")


def spec_for_stack(layer_spec: ModuleSpec, first_effective_layer: int) -> ModuleSpec:
    """A copy of ``layer_spec`` whose attention knows where its stack starts (for VE placement)."""
    spec = copy.deepcopy(layer_spec)
    spec.params = {**spec.params, "first_effective_layer": first_effective_layer}
    spec.submodules.self_attention.params = {
        **spec.submodules.self_attention.params,
        "first_effective_layer": first_effective_layer,
    }
    return spec
