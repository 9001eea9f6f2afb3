"""Megatron ParcaeModel state dict ↔ Hugging Face ParcaeForCausalLM state dict.

Megatron fuses Q, K and V into ``linear_qkv`` laid out per query group as
[q heads of the group, k, v] rows; HF (and the authors) keep ``c_q``/``c_k``/``c_v``. Value
embedding tables move from the attention module to ``value_embeds.{effective layer}``. Both
directions are pure re-indexing: no arithmetic touches a value, so round trips are bit-exact.
"""

from __future__ import annotations

import torch

from parcae_megatron.convert.errors import ConversionError
from parcae_megatron.hf.configuration_parcae import ParcaeConfig as HFConfig
from parcae_megatron.hf.loop_math import INJECTIONS
from parcae_megatron.model.config import ParcaeConfig, half_squared_relu

STAGES = ("prelude", "recurrent", "coda")
"""The three stacks: Megatron's ``{stage}.layers.{i}`` is HF's ``transformer.{stage}.{i}``."""

_BLOCK = {
    "input_layernorm.weight": "norm_1.weight",
    "self_attention.linear_proj.weight": "attn.c_proj.weight",
    "self_attention.value_embedding.gate_weight": "attn.ve_gate.weight",
    "pre_mlp_layernorm.weight": "norm_2.weight",
    "mlp.linear_fc1.weight": "mlp.fc.weight",
    "mlp.linear_fc2.weight": "mlp.proj.weight",
}
_TOP = {
    "embedding.word_embeddings.weight": "transformer.wte.weight",
    "prelude_norm.weight": "transformer.ln_prelude.weight",
    # every registered injection type's parameters: injection.X ↔ transformer.adapter.X
    **{f"injection.{name}": f"transformer.adapter.{name}"
       for kind in INJECTIONS.values() for name in kind.shapes(1)},
    "readout.weight": "transformer.C.weight",
    "final_norm.weight": "transformer.ln_f.weight",
}


def check_supported(cfg: ParcaeConfig) -> None:
    """Refuse Megatron configs the HF model does not reproduce."""
    problems = []
    if cfg.activation_func is not half_squared_relu or cfg.gated_linear_unit:
        problems.append("the MLP must be the ungated 0.5·ReLU² MLP")
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        problems.append("linear biases are not supported")
    if not cfg.qk_layernorm or cfg.normalization != "RMSNorm":
        problems.append("Parcae blocks need RMSNorm and QK-norm")
    if cfg.num_moe_experts:
        problems.append("MoE layers are not supported")
    if problems:
        raise ConversionError("cannot convert this model to Hugging Face: " + "; ".join(problems))


def hf_config_from_megatron(cfg: ParcaeConfig, max_positions: int, **extra) -> HFConfig:
    """The HF config describing the same model as the Megatron ``cfg``."""
    check_supported(cfg)
    return HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
        head_dim=cfg.kv_channels, num_prelude_layers=cfg.num_prelude_layers,
        num_recurrent_layers=cfg.num_recurrent_layers, num_coda_layers=cfg.num_coda_layers,
        mean_recurrence=cfg.mean_recurrence, mean_backprop_depth=cfg.mean_backprop_depth,
        injection_type=cfg.injection_type, min_decay_rate=cfg.min_decay_rate,
        prelude_norm=cfg.prelude_norm, state_init=cfg.state_init.replace("_", "-"),
        state_std=cfg.init_method_std, value_embeddings=cfg.value_embeddings,
        value_embedding_gate_channels=cfg.value_embedding_gate_channels,
        rms_norm_eps=cfg.layernorm_epsilon,
        qk_norm_eps=(cfg.layernorm_epsilon if cfg.qk_layernorm_epsilon is None
                     else cfg.qk_layernorm_epsilon),
        rope_theta=float(cfg.rotary_base), rope_interleaved=False,
        max_position_embeddings=max_positions, initializer_range=cfg.init_method_std, **extra)


def megatron_overrides_from_hf(hf: HFConfig) -> dict:
    """ParcaeConfig fields that rebuild the HF model in Megatron (vocab is padded already)."""
    if hf.rope_interleaved:
        raise ConversionError("this HF model uses interleaved RoPE (the authors' layout); "
                              "import the release with `convert official-import --rope "
                              "rotate-half` to train it in Megatron")
    return dict(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads, kv_channels=hf.head_dim,
        num_layers=hf.num_prelude_layers + hf.num_recurrent_layers + hf.num_coda_layers,
        num_prelude_layers=hf.num_prelude_layers, num_recurrent_layers=hf.num_recurrent_layers,
        num_coda_layers=hf.num_coda_layers, mean_recurrence=hf.mean_recurrence,
        mean_backprop_depth=hf.mean_backprop_depth, injection_type=hf.injection_type,
        min_decay_rate=hf.min_decay_rate, prelude_norm=hf.prelude_norm,
        state_init=hf.state_init.replace("-", "_"), value_embeddings=hf.value_embeddings,
        value_embedding_gate_channels=hf.value_embedding_gate_channels,
        layernorm_epsilon=hf.rms_norm_eps,
        qk_layernorm_epsilon=None if hf.qk_norm_eps == hf.rms_norm_eps else hf.qk_norm_eps,
        rotary_base=int(hf.rope_theta),
        seq_length=hf.max_position_embeddings)


def _qkv_rows(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = getattr(cfg, "num_query_groups", None) or getattr(cfg, "num_key_value_heads", heads)
    return groups, heads // groups, getattr(cfg, "kv_channels", None) or cfg.head_dim


def _effective_first(cfg, stage: str) -> int:
    return {"prelude": 0, "recurrent": cfg.num_prelude_layers,
            "coda": cfg.num_prelude_layers + cfg.num_recurrent_layers}[stage]


def megatron_to_hf_state(state: dict[str, torch.Tensor],
                         cfg: ParcaeConfig) -> dict[str, torch.Tensor]:
    """HF tensors from a full (TP = PP = 1) Megatron model state dict."""
    groups, q_per_group, hd = _qkv_rows(cfg)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for m_name, h_name in _TOP.items():
        if m_name in state:
            out[h_name] = state[m_name]
            used.add(m_name)
    for stage in STAGES:
        prefix = f"{stage}.layers."
        layers = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                         if k.startswith(prefix)})
        for i in layers:
            src, dst = f"{prefix}{i}.", f"transformer.{stage}.{i}."
            for m_key, h_key in _BLOCK.items():
                if src + m_key in state:
                    out[dst + h_key] = state[src + m_key]
                    used.add(src + m_key)
            qkv = state[src + "self_attention.linear_qkv.weight"]
            used.add(src + "self_attention.linear_qkv.weight")
            per = qkv.view(groups, q_per_group + 2, hd, qkv.shape[-1])
            out[dst + "attn.c_q.weight"] = per[:, :q_per_group].reshape(-1, qkv.shape[-1])
            out[dst + "attn.c_k.weight"] = per[:, q_per_group].reshape(-1, qkv.shape[-1])
            out[dst + "attn.c_v.weight"] = per[:, q_per_group + 1].reshape(-1, qkv.shape[-1])
            table = src + "self_attention.value_embedding.weight"
            if table in state:
                out[f"value_embeds.{_effective_first(cfg, stage) + i}.weight"] = state[table]
                used.add(table)
    leftover = [k for k in state if k not in used and not k.endswith("_extra_state")]
    if leftover:
        raise ConversionError(f"unexpected Megatron tensors (not converted): {leftover[:8]}")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_megatron_state(hf_state: dict[str, torch.Tensor],
                         cfg: ParcaeConfig) -> dict[str, torch.Tensor]:
    """Full Megatron tensors (TP = PP = 1 names) from HF tensors; inverse of the above."""
    state = dict(hf_state)
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise ConversionError("lm_head.weight differs from transformer.wte.weight; Parcae "
                              "ties them, so an untied head cannot be converted")
    reverse_top = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for h_name in list(state):
        if h_name in reverse_top:
            out[reverse_top[h_name]] = state.pop(h_name)
    reverse_block = {v: k for k, v in _BLOCK.items()}
    for stage in STAGES:
        prefix = f"transformer.{stage}."
        layers = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                         if k.startswith(prefix)})
        for i in layers:
            src, dst = f"{prefix}{i}.", f"{stage}.layers.{i}."
            for h_key, m_key in reverse_block.items():
                if src + h_key in state:
                    out[dst + m_key] = state.pop(src + h_key)
            q, k, v = (state.pop(src + f"attn.c_{x}.weight") for x in "qkv")
            groups, q_per_group, hd = _qkv_rows(cfg)
            fused = torch.cat([q.view(groups, q_per_group, hd, -1), k.view(groups, 1, hd, -1),
                               v.view(groups, 1, hd, -1)], dim=1)
            out[dst + "self_attention.linear_qkv.weight"] = fused.reshape(-1, q.shape[-1])
            table = f"value_embeds.{_effective_first(cfg, stage) + i}.weight"
            if table in state:
                out[dst + "self_attention.value_embedding.weight"] = state.pop(table)
    if state:
        raise ConversionError(f"unexpected Hugging Face tensors (not converted): "
                              f"{sorted(state)[:8]}")
    return {k: v.contiguous() for k, v in out.items()}
