"""Parameter and FLOP accounting for Parcae models (docs/design.md §7, §8).

Counts come from the real module tree (build it on the meta device to avoid allocating);
categories follow docs/design.md §7: ``embedding_params`` are the token embedding plus
value-embedding tables (lookups, not matmuls); ``recurrent_params`` is one copy of the recurrent
block including its VE gates but not its VE table.
"""

from __future__ import annotations

import torch

from parcae_megatron.hf.loop_math import injection
from parcae_megatron.model.config import ParcaeConfig


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Per-category parameter counts of a (single-stage, unsharded) Parcae model."""
    counts = {"total_params": 0, "embedding_params": 0, "value_embedding_params": 0,
              "prelude_params": 0, "recurrent_params": 0, "coda_params": 0,
              "injection_params": 0, "readout_params": 0, "prelude_norm_params": 0,
              "final_norm_params": 0}
    stage_of = {"prelude": "prelude_params", "recurrent": "recurrent_params",
                "coda": "coda_params", "injection": "injection_params", "readout": "readout_params",
                "prelude_norm": "prelude_norm_params", "final_norm": "final_norm_params"}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # the tied output layer
            continue
        seen.add(id(param))
        n = param.numel()
        counts["total_params"] += n
        if name.startswith("embedding."):
            counts["embedding_params"] += n
        elif ".value_embedding.weight" in name:
            counts["embedding_params"] += n
            counts["value_embedding_params"] += n
        else:
            counts[stage_of[name.split(".")[0]]] += n
    counts["non_embedding_params"] = counts["total_params"] - counts["embedding_params"]
    return counts


def count_parameters_from_config(config: ParcaeConfig) -> dict[str, int]:
    """The same counts as ``count_parameters`` of the full model, from the config alone
    (for code that holds only one pipeline stage or TP shard)."""
    d, ffn, hd = config.hidden_size, config.ffn_hidden_size, config.kv_channels
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    vocab = config.vocab_size
    layer = d * (heads * hd + 2 * groups * hd) + heads * hd * d + 2 * d + 2 * d * ffn
    n_pre, n_rec, n_coda = (config.num_prelude_layers, config.num_recurrent_layers,
                            config.num_coda_layers)
    ve = [config.has_value_embedding(i) for i in range(n_pre + n_rec + n_coda)]
    gate = groups * config.value_embedding_gate_channels
    table = vocab * groups * hd
    stage = lambda lo, hi: (hi - lo) * layer + gate * sum(ve[lo:hi])
    counts = {
        "prelude_params": stage(0, n_pre),
        "recurrent_params": stage(n_pre, n_pre + n_rec),
        "coda_params": stage(n_pre + n_rec, n_pre + n_rec + n_coda),
        "value_embedding_params": table * sum(ve),
        "injection_params": 0, "readout_params": 0, "prelude_norm_params": 0,
        "final_norm_params": d,
    }
    if config.is_looped:
        counts["injection_params"] = injection(config.injection_type).num_parameters(d)
        counts["readout_params"] = d * d
        counts["prelude_norm_params"] = d if config.prelude_norm else 0
    counts["embedding_params"] = vocab * d + counts["value_embedding_params"]
    counts["total_params"] = (counts["embedding_params"] + counts["prelude_params"]
                              + counts["recurrent_params"] + counts["coda_params"]
                              + counts["injection_params"] + counts["readout_params"]
                              + counts["prelude_norm_params"] + d)
    counts["non_embedding_params"] = counts["total_params"] - counts["embedding_params"]
    return counts


def token_embedding_params(config: ParcaeConfig) -> int:
    """Size of the tied token-embedding table."""
    return config.vocab_size * config.hidden_size


def flops_per_token(config: ParcaeConfig, counts: dict[str, int],
                    sequence_length: int | None = None) -> float:
    """Training FLOPs per token with the authors' code formula (docs/design.md §8.1).

    6·N_nc + 3·A·(L_P+L_C) + (2·N_R + A·L_R)·μ_rec + (4·N_R + 2·A·L_R)·μ_bwd, with
    A = 4·d·S forward attention FLOPs per layer per token and
    N_nc = total − token-embedding table − N_R. For the fixed-depth baseline the loop terms
    vanish (N_R = 0, L_R = 0) and every layer counts as a prelude layer.
    """
    seq = sequence_length or config.seq_length
    attn = 4 * config.hidden_size * seq
    n_rec = counts["recurrent_params"]
    n_nc = counts["total_params"] - token_embedding_params(config) - n_rec
    outer_layers = config.num_prelude_layers + config.num_coda_layers
    rec_layers = config.num_recurrent_layers
    flops = 6 * n_nc + 3 * attn * outer_layers
    if config.is_looped:
        flops += (2 * n_rec + attn * rec_layers) * config.mean_recurrence
        flops += (4 * n_rec + 2 * attn * rec_layers) * config.mean_backprop_depth
    return float(flops)


def effective_params(config: ParcaeConfig, counts: dict[str, int]) -> int:
    """N(μ_rec): non-embedding parameters with the recurrent block unrolled μ_rec times.

    The paper's "effective parameter count if all loops were unrolled" (docs/design.md §8.3);
    whether embeddings belong in N is an open question there — we exclude token and value-embedding
    tables (lookups, not matmuls).
    """
    unrolled = config.mean_recurrence if config.is_looped else 1
    return counts["non_embedding_params"] + (unrolled - 1) * counts["recurrent_params"]


def paper_effective_params(config: ParcaeConfig, counts: dict[str, int]) -> tuple[int, int]:
    """(N̂₁, N̂₂) of the paper's App. D formula (docs/design.md §8.2).

    N̂₁ = (μ_rec − μ_bwd)·N_R are the unrolled parameters run without gradient and
    N̂₂ = N_non-R + μ_bwd·N_R those run with backprop. Embedding tables (token and value
    embeddings: lookups) are excluded and the unembedding (the LM-head matmul, tied to the
    token embedding here) is included, as in nanochat; the injection (B̄, C) and norms count
    once, in N_non-R. For the fixed-depth baseline N_R = 0 and N̂₁ = 0.
    """
    n_rec = counts["recurrent_params"]
    n_other = counts["non_embedding_params"] - n_rec + token_embedding_params(config)
    if not config.is_looped:
        return 0, n_other
    mu, bwd = config.mean_recurrence, config.mean_backprop_depth
    return (mu - bwd) * n_rec, n_other + bwd * n_rec


def paper_flops_per_token(config: ParcaeConfig, counts: dict[str, int],
                          sequence_length: int | None = None) -> float:
    """Training FLOPs per token with the paper's App. D formula (docs/design.md §8.2).

    2·N̂₁ + 6·N̂₂ plus nanochat/PaLM-style attention FLOPs: A = 4·h·d_head·S forward per layer
    per token (score and value matmuls, no causal halving), tripled where the layer is
    backpropagated: 3·A·(L_P + L_C) + A·L_R·(μ_rec − μ_bwd) + 3·A·L_R·μ_bwd.

    The attention and loop terms equal the code formula's (``flops_per_token``); the two
    differ only in the constant non-loop parameters: 6·(unembedding − value-embedding tables).
    """
    seq = sequence_length or config.seq_length
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    attn = 4 * config.num_attention_heads * head_dim * seq
    n1, n2 = paper_effective_params(config, counts)
    flops = 2 * n1 + 6 * n2 + 3 * attn * (config.num_prelude_layers + config.num_coda_layers)
    if config.is_looped:
        mu, bwd = config.mean_recurrence, config.mean_backprop_depth
        flops += attn * config.num_recurrent_layers * ((mu - bwd) + 3 * bwd)
    return float(flops)


FLOPS_FORMULAS = {"code": flops_per_token, "paper": paper_flops_per_token}
