"""`ParcaeConfig`: a Megatron `TransformerConfig` for prelude / recurrent block / coda models.

Block internals follow the Parcae paper (docs/design.md §2.2): pre-norm RMSNorm (eps 1e-5),
no biases, parameter-free QK-norm, RoPE θ = 50,000, 0.5·ReLU² MLP, scaled-zero
orthogonal init. A config with ``num_recurrent_layers == 0`` is the fixed-depth
Transformer baseline.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from parcae_megatron.hf.loop_math import INIT_DECAY, INJECTION_TYPES
from parcae_megatron.model.init import orthogonal_init, zeros_init

StateInit = Literal["like_init", "zero"]
DepthSampling = Literal["per_sequence", "per_batch", "fixed"]
LoopExecution = Literal["compact", "masked"]
DepthBalance = Literal["independent", "global"]

STATE_INITS = ("like_init", "zero")
DEPTH_SAMPLINGS = ("per_sequence", "per_batch", "fixed")
LOOP_EXECUTIONS = ("compact", "masked")
DEPTH_BALANCES = ("independent", "global")


def half_squared_relu(x: torch.Tensor) -> torch.Tensor:
    """The Parcae MLP activation: 0.5 · relu(x)²."""
    return 0.5 * F.relu(x).square()


class ParcaeConfigError(ValueError):
    """An invalid Parcae configuration (raised at construction, before any rank starts)."""


@dataclass
class ParcaeConfig(TransformerConfig):
    """Configuration of a Parcae looped model (or its fixed-depth Transformer baseline).

    ``num_layers`` is derived: it is the number of *physical* layers,
    ``num_prelude_layers + num_recurrent_layers + num_coda_layers``.
    """

    # --- Parcae structure -------------------------------------------------------------
    num_prelude_layers: int = 2
    num_recurrent_layers: int = 2
    num_coda_layers: int = 2
    mean_recurrence: int = 8
    """μ_rec: mean sampled loop depth during training; the default evaluation depth."""
    mean_backprop_depth: int = 4
    """μ_bwd: at most this many final iterations receive gradient."""
    injection_type: str = "diagonal"
    """One of ``INJECTION_TYPES``, the registry in ``hf/loop_math.py`` (docs/design.md §3.3)."""
    state_init: StateInit = "like_init"
    prelude_norm: bool = True
    depth_sampling: DepthSampling = "per_sequence"
    depth_balance: DepthBalance = "independent"
    """``independent``: each replica draws its own micro-batches' depths; ``global``: the
    whole global batch is drawn per step and dealt so replicas do equal loop work."""
    per_batch_lognormal_sigma: float = 0.5
    """σ of Huginn's log-normal Poisson sampler (``depth_sampling='per_batch'``)."""
    loop_execution: LoopExecution = "compact"
    """``compact`` runs each iteration only on the still-active sequences; ``masked``
    runs every sequence for the maximum depth and selects (the authors' behaviour)."""
    init_decay: float = INIT_DECAY
    """Ā at init (docs/design.md §5): Δ₀ = -ln(init_decay), A_log = 0."""
    min_decay_rate: float = 1e-6
    """Floor on Δ·a, so Ā ≤ exp(-1e-6) < 1 holds in floating point for any parameters."""
    depth_seed: int = 514229
    """Seed of the loop's random draws in training and evaluation: the sampled depths and the
    initial loop state h₀ (model/depth.py streams; ``--depth-seed``)."""
    recompute_loop_iterations: bool = False
    """Checkpoint each gradient iteration of the loop (non-reentrant): keep only the loop
    state at iteration boundaries and re-run the iteration in the backward (docs/design.md §4.2)."""
    init_seed: int = 1234
    """Seed of the initial weights: each parameter is drawn from a generator keyed by
    (init_seed, its name), whatever the TP/PP layout (model/init.py). Training sets it to
    ``--init-seed`` (default ``--seed``)."""

    # --- value embeddings -----------------------------------------------------------------
    value_embeddings: bool = True
    value_embedding_gate_channels: int = 32

    # --- vocabulary / sequence / layout -------------------------------------------------
    vocab_size: int = 32768
    seq_length: int = 2048
    rotary_base: int = 50000
    parcae_pipeline_layout: str | None = None
    """Stages separated by '|': 'p' a prelude layer, 'R' the whole recurrent block
    (prelude norm, injection, loop, readout), 'c' a coda layer. E.g. 'ppR|cc'."""

    # --- Megatron defaults that Parcae fixes ----------------------------------------------
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    qk_layernorm_epsilon: float | None = None
    """ε of the parameter-free QK-norm (default ``layernorm_epsilon``); the authors' code uses
    the fp32 machine epsilon, so imported releases keep theirs."""
    add_bias_linear: bool = False
    gated_linear_unit: bool = False
    activation_func: Callable = half_squared_relu
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    apply_rope_fusion: bool = False
    persist_layer_norm: bool = False
    kv_channels: int | None = 128

    def __post_init__(self) -> None:
        self._validate_parcae()
        self.num_layers = self.num_prelude_layers + self.num_recurrent_layers + self.num_coda_layers
        # docs/design.md §5: std = sqrt(2 / (5 d)) for every matrix; output projections start at 0.
        self.init_method_std = math.sqrt(2.0 / (5.0 * self.hidden_size))
        if self.init_method is None:
            self.init_method = orthogonal_init(self.init_method_std, seed=self.init_seed)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = zeros_init
        if self.embedding_init_method is None:
            self.embedding_init_method = self.init_method
        # Value embeddings sit on alternating layers, so layers are not stackable in checkpoints.
        self.hetereogenous_dist_checkpoint = self.value_embeddings
        if self.pipeline_model_parallel_size > 1:
            if self.pipeline_model_parallel_layout is None:
                self.pipeline_model_parallel_layout = self._megatron_layout()
            if self.pipeline_dtype is None:
                self.pipeline_dtype = (torch.bfloat16 if self.bf16 else
                                       torch.float16 if self.fp16 else torch.float32)
        try:
            super().__post_init__()
        except (AssertionError, ValueError) as exc:  # re-raise Megatron's checks as config errors
            raise ParcaeConfigError(f"invalid Parcae config: {exc}") from exc

    # ------------------------------------------------------------------------------------
    @property
    def is_looped(self) -> bool:
        """False for the fixed-depth Transformer baseline."""
        return self.num_recurrent_layers > 0

    @property
    def num_effective_layers(self) -> int:
        """Prelude + one copy of the recurrent block + coda (the value-embedding index space)."""
        return self.num_prelude_layers + self.num_recurrent_layers + self.num_coda_layers

    def has_value_embedding(self, effective_layer: int) -> bool:
        """Layer i has a table iff i mod 2 == (n_eff - 1) mod 2: the last always has one
        (docs/design.md §2.3)."""
        return self.value_embeddings and effective_layer % 2 == (self.num_effective_layers - 1) % 2

    def stage_layout(self) -> list[str]:
        """Per pipeline stage, the string of 'p'/'R'/'c' tokens it holds."""
        pp = self.pipeline_model_parallel_size
        if self.parcae_pipeline_layout is not None:
            return [s.strip() for s in self.parcae_pipeline_layout.split("|")]
        return default_stage_layout(self.num_prelude_layers, self.num_recurrent_layers,
                                    self.num_coda_layers, pp)

    def stack_config(self, stack: str) -> TransformerConfig:
        """A copy of this config describing one stack ('prelude'/'recurrent'/'coda') alone.

        Its ``num_layers`` is the stack's layer count and its pipeline layout places that
        stack's layers on their stages, so Megatron's ``TransformerBlock`` builds the right
        layers with global layer numbers and checkpoint offsets.
        """
        token = {"prelude": "p", "recurrent": "R", "coda": "c"}[stack]
        total = {"prelude": self.num_prelude_layers, "recurrent": self.num_recurrent_layers,
                 "coda": self.num_coda_layers}[stack]
        cfg = copy.copy(self)
        cfg.num_layers = total
        if token == "R" and self.recompute_loop_iterations and cfg.recompute_granularity == "full":
            cfg.recompute_granularity = None  # the loop checkpoint already re-runs these layers
        per_stage = [s.count(token) * (self.num_recurrent_layers if token == "R" else 1)
                     for s in self.stage_layout()]
        cfg.pipeline_model_parallel_layout = PipelineParallelLayerLayout(
            [["decoder"] * n for n in per_stage], self.pipeline_model_parallel_size)
        return cfg

    # ------------------------------------------------------------------------------------
    def _megatron_layout(self) -> PipelineParallelLayerLayout:
        stages = []
        for i, s in enumerate(self.stage_layout()):
            row = ["embedding"] if i == 0 else []
            for tok in s:
                row += ["decoder"] * (self.num_recurrent_layers if tok == "R" else 1)
            if i == len(self.stage_layout()) - 1:
                row.append("loss")
            stages.append(row)
        return PipelineParallelLayerLayout(stages, self.pipeline_model_parallel_size)

    def _validate_parcae(self) -> None:
        def fail(msg: str) -> None:
            raise ParcaeConfigError(f"invalid Parcae config: {msg}")

        for name in ("num_prelude_layers", "num_recurrent_layers", "num_coda_layers"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_prelude_layers + self.num_recurrent_layers + self.num_coda_layers == 0:
            fail("the model has no layers")
        if self.hidden_size <= 0 or self.num_attention_heads <= 0:
            fail("hidden_size and num_attention_heads must be positive")
        if self.injection_type not in INJECTION_TYPES:
            fail(f"injection_type must be one of {INJECTION_TYPES}, got {self.injection_type!r}")
        if self.state_init not in STATE_INITS:
            fail(f"state_init must be one of {STATE_INITS}, got {self.state_init!r}")
        if self.depth_sampling not in DEPTH_SAMPLINGS:
            fail(f"depth_sampling must be one of {DEPTH_SAMPLINGS}, got {self.depth_sampling!r}")
        if self.depth_balance not in DEPTH_BALANCES:
            fail(f"depth_balance must be one of {DEPTH_BALANCES}, got {self.depth_balance!r}")
        if self.depth_balance == "global" and self.depth_sampling != "per_sequence":
            fail("depth_balance 'global' deals per-sequence depths: it needs depth_sampling "
                 f"'per_sequence', got {self.depth_sampling!r}")
        if self.loop_execution not in LOOP_EXECUTIONS:
            fail(f"loop_execution must be one of {LOOP_EXECUTIONS}, got {self.loop_execution!r}")
        if self.num_recurrent_layers > 0:
            if self.mean_recurrence < 1:
                fail(f"mean_recurrence must be >= 1, got {self.mean_recurrence}")
            if not 1 <= self.mean_backprop_depth <= self.mean_recurrence:
                fail(f"mean_backprop_depth ({self.mean_backprop_depth}) must be in "
                     f"[1, mean_recurrence={self.mean_recurrence}]")
            if not 0.0 < self.init_decay < 1.0:
                fail(f"init_decay must be in (0, 1), got {self.init_decay}")
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp:
            fail(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                 f"tensor_model_parallel_size ({tp})")
        if self.vocab_size % tp:
            fail(f"vocab_size ({self.vocab_size}) is not divisible by "
                 f"tensor_model_parallel_size ({tp}); pad the vocabulary")
        if self.value_embeddings and self.value_embedding_gate_channels > self.hidden_size:
            fail("value_embedding_gate_channels exceeds hidden_size")
        if self.recompute_loop_iterations:
            if self.num_recurrent_layers == 0:
                fail("recompute_loop_iterations needs a recurrent block")
            if self.hidden_dropout or self.attention_dropout:
                fail("recompute_loop_iterations needs dropout 0 (a re-run iteration would "
                     "draw other masks)")
        self._validate_layout()

    def _validate_layout(self) -> None:
        pp = self.pipeline_model_parallel_size
        stages = self.stage_layout()
        expected = ("p" * self.num_prelude_layers + ("R" if self.num_recurrent_layers else "")
                    + "c" * self.num_coda_layers)
        where = f"pipeline layout {'|'.join(stages)!r}"
        if len(stages) != pp:
            raise ParcaeConfigError(
                f"invalid Parcae config: {where} has {len(stages)} stages but "
                f"pipeline_model_parallel_size is {pp}")
        if any(not s for s in stages):
            raise ParcaeConfigError(f"invalid Parcae config: {where} has an empty stage")
        if "".join(stages) != expected:
            raise ParcaeConfigError(
                f"invalid Parcae config: {where} must list, in order, {self.num_prelude_layers} "
                f"'p', {'one R, ' if self.num_recurrent_layers else ''}{self.num_coda_layers} 'c' "
                f"(expected the concatenation {expected!r})")


def default_stage_layout(n_pre: int, n_rec: int, n_coda: int, pp: int) -> list[str]:
    """Place the whole recurrent block on one stage and spread prelude/coda over the others.

    Units are the prelude layers, the recurrent block (weighted by its physical layer count)
    and the coda layers, in order; they are cut into ``pp`` contiguous non-empty stages that
    minimise the heaviest stage (ties: the most even split). E.g. 2/2/2 at PP=2 gives
    ['ppR', 'cc']. Balancing the loop's *executed* cost across stages is future work.
    """
    tokens = ["p"] * n_pre + (["R"] if n_rec else []) + ["c"] * n_coda
    if pp > len(tokens):
        raise ParcaeConfigError(
            f"invalid Parcae config: pipeline_model_parallel_size {pp} exceeds the number of "
            f"placeable units ({len(tokens)}: each prelude/coda layer, and the recurrent block)")
    weights = [n_rec if t == "R" else 1 for t in tokens]
    best: tuple | None = None
    for cuts in itertools.combinations(range(1, len(tokens)), pp - 1):
        bounds = (0, *cuts, len(tokens))
        loads = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
        key = (max(loads), sum(x * x for x in loads))
        if best is None or key < best[0]:
            best = (key, bounds)
    bounds = best[1]
    return ["".join(tokens[a:b]) for a, b in zip(bounds, bounds[1:])]
