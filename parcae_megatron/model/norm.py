"""RMSNorm for the local (non-Transformer-Engine) spec, with sequence-parallel support.

Megatron's local norm (``WrappedTorchNorm``) refuses ``sequence_parallel``. The maths of a
norm is per token, so it runs unchanged on a sequence shard; the only thing sequence
parallelism needs is that the weight's gradient, a sum over this rank's tokens, is summed
over the TP group. Megatron's ``finalize_model_grads`` does that for every parameter flagged
``sequence_parallel`` (as TE's norms flag theirs), so this norm flags its weight.
"""

from __future__ import annotations

import torch

from parcae_megatron.hf.loop_math import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a Megatron config (same checkpoint key ``weight``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"Parcae's local norm is RMSNorm, not {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        mark_sequence_parallel(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shared norm (``hf/loop_math.py``), as the Hugging Face model computes it."""
        return rms_norm(x, self.eps, self.weight)


def mark_sequence_parallel(module: torch.nn.Module, config) -> None:
    """Flag ``module``'s parameters as replicated over TP but fed sequence shards, so Megatron
    all-reduces their gradients over the TP group when ``config.sequence_parallel``."""
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel
