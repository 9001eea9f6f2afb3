"""Hugging Face configuration of a Parcae looped language model.

Self-contained (``transformers`` and the shared ``loop_math.py``): this file is copied next to
exported weights so ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works offline.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .loop_math import INJECTION_TYPES

EXIT_CRITERIA = ("residual", "kl", "argmax")


class ParcaeConfig(PretrainedConfig):
    """Prelude / recurrent block (looped) / coda Transformer (docs/design.md §2).

    Loop count: ``num_iterations`` is the default number of recurrent iterations T at
    inference (the training mean μ_rec unless set); every forward and ``generate`` call can
    override it. Initial state h₀: ``state_init`` is ``"like-init"`` (truncated normal,
    std ``state_std``, ±3σ) or ``"zero"``; with ``state_seed`` set, h₀ at position p is a fixed
    function of (seed, p), so evaluation is reproducible and cached generation equals
    uncached generation; ``state_seed=None`` draws afresh on every forward (the authors' way).

    Adaptive depth: ``exit_criterion`` (``None``, ``"residual"``, ``"kl"`` or ``"argmax"``),
    ``exit_threshold`` (ε) and ``exit_patience`` (k) are the defaults of the forward arguments
    of the same names; ``num_iterations`` is then the maximum loop count.
    """

    model_type = "parcae"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32768,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_attention_heads: int = 6,
        num_key_value_heads: int | None = None,
        head_dim: int = 128,
        num_prelude_layers: int = 2,
        num_recurrent_layers: int = 2,
        num_coda_layers: int = 2,
        mean_recurrence: int = 8,
        mean_backprop_depth: int = 4,
        num_iterations: int | None = None,
        injection_type: str = "diagonal",
        min_decay_rate: float = 1e-6,
        prelude_norm: bool = True,
        state_init: str = "like-init",
        state_std: float | None = None,
        state_seed: int | None = 0,
        value_embeddings: bool = True,
        value_embedding_gate_channels: int = 32,
        rms_norm_eps: float = 1e-5,
        qk_norm_eps: float = 1e-5,
        rope_theta: float = 50000.0,
        rope_interleaved: bool = False,
        max_position_embeddings: int = 2048,
        initializer_range: float | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        exit_criterion: str | None = None,
        exit_threshold: float = 0.0,
        exit_patience: int = 2,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim
        self.num_prelude_layers = num_prelude_layers
        self.num_recurrent_layers = num_recurrent_layers
        self.num_coda_layers = num_coda_layers
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.num_iterations = num_iterations if num_iterations is not None else mean_recurrence
        self.injection_type = injection_type
        self.min_decay_rate = min_decay_rate
        self.prelude_norm = prelude_norm
        self.state_init = state_init
        self.state_std = state_std if state_std is not None else math.sqrt(2 / (5 * hidden_size))
        self.state_seed = state_seed
        self.value_embeddings = value_embeddings
        self.value_embedding_gate_channels = value_embedding_gate_channels
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm_eps = qk_norm_eps
        self.rope_theta = rope_theta
        self.rope_interleaved = rope_interleaved
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = (initializer_range if initializer_range is not None
                                  else math.sqrt(2 / (5 * hidden_size)))
        self.use_cache = use_cache
        self.exit_criterion = None if exit_criterion == "none" else exit_criterion
        self.exit_threshold = exit_threshold
        self.exit_patience = exit_patience
        kwargs.pop("num_hidden_layers", None)  # derived, see below
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.validate_parcae()

    @property
    def num_hidden_layers(self) -> int:
        """Attention layers unrolled at the default loop count (= KV-cache layers)."""
        return self.unrolled_layers(self.num_iterations)

    def unrolled_layers(self, num_iterations: int) -> int:
        """L_P + T·L_R + L_C: the layers one forward at T iterations runs (one KV cache each)."""
        return (self.num_prelude_layers + num_iterations * self.num_recurrent_layers
                + self.num_coda_layers)

    @property
    def num_effective_layers(self) -> int:
        """L_P + L_R + L_C: prelude, one copy of the recurrent block, coda (value-embedding
        placement)."""
        return self.num_prelude_layers + self.num_recurrent_layers + self.num_coda_layers

    def has_value_embedding(self, effective_layer: int) -> bool:
        """Effective layer n owns a value-embedding table iff n ≡ n_eff − 1 (mod 2)."""
        return self.value_embeddings and (effective_layer % 2
                                          == (self.num_effective_layers - 1) % 2)

    def validate_parcae(self) -> None:
        """Raise ValueError on an inconsistent configuration."""
        if self.injection_type not in INJECTION_TYPES:
            raise ValueError(f"injection_type must be one of {INJECTION_TYPES}, "
                             f"got {self.injection_type!r}")
        if self.state_init not in ("like-init", "zero"):
            raise ValueError(f"state_init must be 'like-init' or 'zero', got {self.state_init!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_recurrent_layers and self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.exit_criterion is not None and self.exit_criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA} or None, "
                             f"got {self.exit_criterion!r}")
        if self.exit_threshold < 0 or self.exit_patience < 1:
            raise ValueError("exit_threshold must be >= 0 and exit_patience >= 1")
        if self.value_embedding_gate_channels > self.hidden_size:
            raise ValueError("value_embedding_gate_channels exceeds hidden_size")
