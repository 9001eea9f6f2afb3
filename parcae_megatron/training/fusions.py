"""Kernel fusions adapted to the installed extensions: a fusion whose kernel (APEX, Transformer
Engine) is missing is switched off with one log line instead of failing at model construction.
"""

from __future__ import annotations

import argparse
import importlib.util


def apex_wgrad_fusion_available() -> bool:
    """Whether APEX's ``fused_weight_gradient_mlp_cuda`` (Megatron's fused wgrad) imports."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def rope_fusion_available() -> bool:
    """Whether Megatron's fused RoPE kernel (from Transformer Engine) is importable."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def adapt_fusions(args: argparse.Namespace) -> list[str]:
    """Switch off fusions whose kernels are missing; returns one log line per change.

    * Gradient-accumulation fusion (Megatron's default): Megatron's own linear layers need
      APEX's ``fused_weight_gradient_mlp_cuda`` and ``ColumnParallelLinear`` raises at
      construction without it. With the local spec every linear is Megatron's, so the fusion
      is turned off; with Transformer Engine the flag stays on for TE's own fused wgrad
      accumulation and ParcaeModel builds its (Megatron) output layer unfused.
    * RoPE fusion: Megatron's fused RoPE is Transformer Engine's kernel; rotate-half, the
      same map as the unfused path (computed in fp32 instead of the input dtype).
    """
    notes: list[str] = []
    if args.gradient_accumulation_fusion and not apex_wgrad_fusion_available():
        if args.transformer_impl == "transformer_engine":
            notes.append("APEX fused_weight_gradient_mlp_cuda not found: the output layer "
                         "runs without gradient-accumulation fusion (Transformer Engine layers "
                         "keep their fused wgrad accumulation)")
        else:
            args.gradient_accumulation_fusion = False
            notes.append("APEX fused_weight_gradient_mlp_cuda not found: gradient-accumulation "
                         "fusion turned off")
    if args.apply_rope_fusion and not rope_fusion_available():
        args.apply_rope_fusion = False
        notes.append("RoPE fusion turned off: its kernel comes from Transformer Engine, "
                     "which is not installed")
    return notes
