"""Hugging Face modeling code for Parcae looped language models (docs/design.md §2, §9).

Self-contained (``torch`` + ``transformers``): copied next to exported weights, with
``configuration_parcae.py`` and ``loop_math.py`` (the loop's maths, shared with the Megatron
model), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works offline.

Parameter names follow the authors' checkpoints (``transformer.prelude.0.attn.c_q.weight``, …)
except for the recurrent block, ``transformer.recurrent.*`` here and ``transformer.core_block.*``
there (``rename_recurrent_keys``), so their released weights load after a rename and at most a
RoPE row permutation. Inference:

* the loop count ``num_iterations`` is a per-call argument (default ``config.num_iterations``);
* the KV cache holds one layer per *executed* attention layer: prelude, every iteration of every
  recurrent layer, coda (L_P + T·L_R + L_C), so a cache is tied to the T it was built with;
* h₀ is seedable: with ``state_seed`` it depends only on (seed, position);
* adaptive depth (``exit_criterion``): each token stops iterating once its state has converged,
  with ``num_iterations`` as the maximum; see ``ParcaeForCausalLM.forward`` for the criteria and
  the KV-cache rule that keeps cached and uncached decoding identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_parcae import EXIT_CRITERIA, ParcaeConfig
from .loop_math import (
    INIT_DECAY,
    Prepared,
    init_injection_parameter_,
    injection,
    readout,
    rms_norm,
    seeded_state_table,
    truncated_normal_,
)

AUTHORS_RECURRENT = "transformer.core_block."
"""The recurrent block's key prefix in the authors' checkpoints, and in our exports written before
it became ``transformer.recurrent.``."""


def rename_recurrent_keys(state: dict, to_authors: bool = False) -> dict:
    """``state`` with the recurrent block's keys moved from the authors' prefix to ours (or,
    with ``to_authors``, back); every other key and every tensor unchanged."""
    old, new = "transformer.recurrent.", AUTHORS_RECURRENT
    if not to_authors:
        old, new = new, old
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}


def _accept_authors_keys(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Load-state-dict pre-hook: a state dict with the authors' recurrent-block keys loads."""
    old = prefix + AUTHORS_RECURRENT
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[f"{prefix}transformer.recurrent.{key[len(old):]}"] = state_dict.pop(key)


@dataclass
class ParcaeCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus, under adaptive exit, the iterations each token used.

    ``iterations`` [b, s]: the loop count at which each token of this call stopped;
    ``iteration_histogram`` [T + 1]: how many (non-padding) tokens of this call stopped at
    each r = 0 … T (entry 0 stays 0); both ``None`` at a fixed loop count.
    """

    iterations: torch.LongTensor | None = None
    iteration_histogram: torch.LongTensor | None = None


class KVHold:
    """The last computed keys/values of this call's tokens, per looped attention role.

    The adaptive-exit rule: at iteration r an exited token's keys/values are the ones of the last
    iteration it computed, so later tokens (in this call or in later cached calls) attend to
    those. ``active`` [b, s] marks the tokens still iterating.
    """

    def __init__(self, active: torch.Tensor) -> None:
        self.active = active
        self.kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, role: tuple, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, heads, s, hd] → the same with exited tokens' entries held."""
        if role in self.kv:
            keep = self.active[:, None, :, None]
            k = torch.where(keep, k, self.kv[role][0])
            v = torch.where(keep, v, self.kv[role][1])
        self.kv[role] = (k, v)
        return k, v


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (block, prelude and final norms)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and scale."""
        return rms_norm(x, self.eps, self.weight)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [b, 1, s, head_dim] for integer ``positions`` [b, s] (fp32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    freqs = (freqs.repeat_interleave(2, dim=-1) if interleaved
             else torch.cat((freqs, freqs), dim=-1))
    return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """Rotate x [b, heads, s, hd]: adjacent pairs (interleaved) or the two halves."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with parameter-free QK-norm and an optional gated value embedding."""

    def __init__(self, config: ParcaeConfig, has_value_embedding: bool) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, hd)
        self.c_q = nn.Linear(d, self.heads * hd, bias=False)
        self.c_k = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.c_v = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.c_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.gate_channels = config.value_embedding_gate_channels
        self.ve_gate = (nn.Linear(self.gate_channels, self.kv_heads, bias=False)
                        if has_value_embedding else None)
        self.qk_eps = config.qk_norm_eps
        self.interleaved = config.rope_interleaved

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, value_embedding: torch.Tensor | None,
                cache: Cache | None, layer_idx: int,
                hold: tuple[KVHold, tuple] | None = None) -> torch.Tensor:
        """x [b, s, d] (already normed) → attention output [b, s, d]; ``hold`` = (store, role)
        applies the adaptive-exit K/V rule before the cache sees the keys."""
        b, s, _ = x.shape
        q = self.c_q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, s, self.kv_heads, self.head_dim)
        if self.ve_gate is not None and value_embedding is not None:
            gate = 2.0 * torch.sigmoid(self.ve_gate(x[..., : self.gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embedding.view_as(v).to(v.dtype)
        v = v.transpose(1, 2)
        # QK-norm (no gain) commutes with RoPE, a per-head rotation.
        q, k = rms_norm(q, self.qk_eps), rms_norm(k, self.qk_eps)
        q = apply_rope(q, *rope, self.interleaved)
        k = apply_rope(k, *rope, self.interleaved)
        if hold is not None:
            k, v = hold[0](hold[1], k, v)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1,
                                                 enable_gqa=self.heads != self.kv_heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 enable_gqa=self.heads != self.kv_heads)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """Ungated MLP with 0.5·ReLU²."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, inner, bias=False)
        self.proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """proj(0.5·relu(fc x)²)."""
        return self.proj(0.5 * F.relu(self.fc(x)).square())


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, config: ParcaeConfig, has_value_embedding: bool) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, has_value_embedding)
        self.norm_2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, mask, value_embedding, cache, layer_idx,
                hold=None) -> torch.Tensor:
        """x + attn(norm x), then + mlp(norm x)."""
        x = x + self.attn(self.norm_1(x), rope, mask, value_embedding, cache, layer_idx, hold)
        return x + self.mlp(self.norm_2(x))


class Adapter(nn.Module):
    """The loop injection of ``config.injection_type`` (maths in ``loop_math.py``; fp32)."""

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__()
        self.kind = injection(config.injection_type)
        self.min_rate = config.min_decay_rate
        for name, shape in self.kind.shapes(config.hidden_size).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters by their registry names."""
        return {name: getattr(self, name) for name in self.kind.init}

    def prepare(self, e: torch.Tensor) -> Prepared:
        """Loop-invariant (Ā, B̄e), computed once per forward in fp32."""
        return self.kind.prepare(self.params(), e, self.min_rate)

    def step(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """u from the state h (fp32)."""
        return self.kind.step(self.params(), h, prepared)


class ParcaePreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by Parcae heads."""

    config_class = ParcaeConfig
    config: ParcaeConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Adapter):
            normal = lambda t: truncated_normal_(t, std)
            for name, rule in module.kind.init.items():
                init_injection_parameter_(rule, getattr(module, name), INIT_DECAY, normal)


class ParcaeForCausalLM(ParcaePreTrainedModel, GenerationMixin):
    """Parcae with a tied LM head: prelude → T × (inject, recurrent block) → readout C → coda →
    head."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__(config)
        d, n_p, n_r = config.hidden_size, config.num_prelude_layers, config.num_recurrent_layers

        def blocks(count: int, first: int) -> nn.ModuleList:
            return nn.ModuleList(Block(config, config.has_value_embedding(first + i))
                                 for i in range(count))

        stages = {"wte": nn.Embedding(config.vocab_size, d),
                  "prelude": blocks(n_p, 0),
                  "coda": blocks(config.num_coda_layers, n_p + n_r),
                  "ln_f": RMSNorm(d, config.rms_norm_eps)}
        if n_r:
            stages["recurrent"] = blocks(n_r, n_p)
            stages["adapter"] = Adapter(config)
            stages["C"] = nn.Linear(d, d, bias=False)
            if config.prelude_norm:
                stages["ln_prelude"] = RMSNorm(d, config.rms_norm_eps)
        self.transformer = nn.ModuleDict(stages)
        table = config.num_key_value_heads * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(n): nn.Embedding(config.vocab_size, table)
            for n in range(config.num_effective_layers) if config.has_value_embedding(n)})
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self._state_tables: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(_accept_authors_keys)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (tied with the head)."""
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head."""
        return self.lm_head

    # ------------------------------------------------------------------------------------
    def initial_state(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      state_seed: int | None) -> torch.Tensor:
        """h₀ [b, s, d] in fp32 for tokens at ``positions`` [b, s]."""
        cfg = self.config
        b, s = input_ids.shape
        shape = (b, s, cfg.hidden_size)
        if cfg.state_init == "zero":
            return torch.zeros(shape, dtype=torch.float32, device=input_ids.device)
        std = cfg.state_std
        if state_seed is None or state_seed < 0:
            h = torch.empty(shape, dtype=torch.float32)
            return truncated_normal_(h, std).to(input_ids.device)
        if int(positions.max()) >= cfg.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} is beyond "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        key = (state_seed, input_ids.device)
        if key not in self._state_tables:
            table = seeded_state_table(cfg.max_position_embeddings, cfg.hidden_size, std,
                                       state_seed)
            self._state_tables[key] = table.to(input_ids.device)
        return self._state_tables[key][positions]

    def _value_embedding(self, effective_layer: int, input_ids: torch.Tensor):
        table = self.value_embeds[str(effective_layer)] if str(effective_layer) in \
            self.value_embeds else None
        return None if table is None else table(input_ids)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_iterations: int | None = None,
        initial_state: torch.Tensor | None = None,
        state_seed: int | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        exit_patience: int | None = None,
        **kwargs,
    ) -> ParcaeCausalLMOutput:
        """Logits [b, s, V] (and the mean next-token loss when ``labels`` are given).

        Args:
            num_iterations: loop count T for this call (default ``config.num_iterations``); the
                maximum under adaptive exit.
            initial_state: h₀ [b, s, d]; overrides ``state_init``/``state_seed``.
            state_seed: seed of h₀ for this call (default ``config.state_seed``); a negative
                seed draws a fresh h₀ from the global RNG, as the authors' code does.
            cache: a ``Cache`` built by an earlier call with the same T (and exit rule).
            exit_criterion: adaptive depth per token (default ``config.exit_criterion``):
                ``"residual"`` stops after iteration r when ‖h_r − h_{r−1}‖/‖h_r‖ <
                ``exit_threshold`` (h_0 is the initial state, so r = 1 can already stop);
                ``"kl"`` when KL(p_r ‖ p_{r−1}) < ``exit_threshold`` between the next-token
                distributions read out after successive iterations (r ≥ 2); ``"argmax"`` when
                the read-out argmax was the same for ``exit_patience`` consecutive iterations
                (r ≥ patience + 1). ``None`` or ``"none"``: every token runs T iterations.
            exit_threshold: ε of ``residual``/``kl`` (default ``config.exit_threshold``);
                ε = 0 never exits early, so the output equals the fixed-T output.
            exit_patience: k of ``argmax`` (default ``config.exit_patience``).

        Under adaptive exit an exited token keeps its last state and, at every later
        iteration r, its keys/values are those of its last computed iteration: a later token
        attending at iteration r to it (in this call, or through the cache) sees those. The
        cache stores them in the iteration-r slots, so token-by-token cached decoding equals
        one uncached forward under the same rule. The read-out for ``kl``/``argmax`` runs the
        coda at every iteration with its own cache slots per iteration (appended after the
        L_P + T·L_R + L_C regular ones), under the same rule. ``iterations`` in the output
        holds each token's count.
        """
        if "past_key_values" in kwargs:  # transformers < 5.40 name
            cache = kwargs.pop("past_key_values")
        cfg = self.config
        T = cfg.num_iterations if num_iterations is None else int(num_iterations)
        if cfg.num_recurrent_layers and T < 1:
            raise ValueError(f"num_iterations must be >= 1, got {T}")
        rule = self._exit_rule(exit_criterion, exit_threshold, exit_patience)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            self._check_cache(cache, T, past, rule)
        b, s = input_ids.shape
        if position_ids is None:  # left-padded batches come with their own position ids
            position_ids = torch.arange(past, past + s, device=input_ids.device)[None]
        positions = position_ids.clamp_min(0).expand(b, s)
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_interleaved)
        mask = self._attention_mask(attention_mask, b, s, past, input_ids.device)

        x = self.transformer.wte(input_ids)
        n_p, n_r = cfg.num_prelude_layers, cfg.num_recurrent_layers
        layer = 0
        for i, block in enumerate(self.transformer.prelude):
            x = block(x, rope, mask, self._value_embedding(i, input_ids), cache, layer)
            layer += 1
        iterations = histogram = None
        if n_r:
            if initial_state is not None:
                h = initial_state.float()
            else:
                seed = cfg.state_seed if state_seed is None else state_seed
                h = self.initial_state(input_ids, positions, seed)
            e = self.transformer.ln_prelude(x) if "ln_prelude" in self.transformer else x
            prepared = self.transformer.adapter.prepare(e)
            ves = [self._value_embedding(n_p + j, input_ids) for j in range(n_r)]
            if rule is None:
                for _ in range(T):
                    u = self.transformer.adapter.step(h, prepared).to(x.dtype)
                    for j, block in enumerate(self.transformer.recurrent):
                        u = block(u, rope, mask, ves[j], cache, layer)
                        layer += 1
                    h = u.float()
            else:
                h, iterations = self._adaptive_loop(h, prepared, ves, x.dtype, rope, mask,
                                                    cache, T, rule, input_ids)
                layer += T * n_r
                valid = (attention_mask[:, -s:].bool() if attention_mask is not None
                         else torch.ones_like(iterations, dtype=torch.bool))
                histogram = torch.bincount(iterations[valid].flatten().cpu(),
                                           minlength=T + 1)
                if cache is not None:  # generate(): the histogram over all its calls
                    total = getattr(cache, "parcae_iteration_histogram", None)
                    cache.parcae_iteration_histogram = (histogram.clone() if total is None
                                                        else total + histogram)
            x = readout(h, self.transformer.C.weight).to(x.dtype)
        for k, block in enumerate(self.transformer.coda):
            x = block(x, rope, mask, self._value_embedding(n_p + n_r + k, input_ids), cache,
                      layer)
            layer += 1
        x = self.transformer.ln_f(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return ParcaeCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                    iterations=iterations, iteration_histogram=histogram)

    def _exit_rule(self, criterion, threshold, patience) -> tuple[str, float, int] | None:
        """(criterion, ε, k) from the call's arguments or the config; None = fixed T."""
        cfg = self.config
        criterion = getattr(cfg, "exit_criterion", None) if criterion is None else criterion
        if criterion in (None, "none") or not cfg.num_recurrent_layers:
            return None
        if criterion not in EXIT_CRITERIA:
            raise ValueError(f"exit_criterion must be one of {EXIT_CRITERIA} or None, "
                             f"got {criterion!r}")
        threshold = getattr(cfg, "exit_threshold", 0.0) if threshold is None else threshold
        patience = getattr(cfg, "exit_patience", 2) if patience is None else patience
        if float(threshold) < 0 or int(patience) < 1:
            raise ValueError(f"exit_threshold must be >= 0 and exit_patience >= 1, got "
                             f"{threshold} and {patience}")
        return criterion, float(threshold), int(patience)

    def _adaptive_loop(self, h, prepared, ves, dtype, rope, mask, cache, T, rule,
                       input_ids) -> tuple[torch.Tensor, torch.LongTensor]:
        """The recurrence with per-token exit; returns (final states, iterations [b, s])."""
        cfg = self.config
        n_p, n_r, n_c = cfg.num_prelude_layers, cfg.num_recurrent_layers, cfg.num_coda_layers
        criterion, threshold, patience = rule
        active = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        iterations = torch.full(h.shape[:2], T, dtype=torch.long, device=h.device)
        hold = KVHold(active)
        probe_base = cfg.unrolled_layers(T)
        prev_logp = prev_arg = None
        stable = torch.zeros_like(iterations)
        ran = 0
        for r in range(1, T + 1):
            hold.active = active
            u = self.transformer.adapter.step(h, prepared).to(dtype)
            for j, block in enumerate(self.transformer.recurrent):
                u = block(u, rope, mask, ves[j], cache, n_p + (r - 1) * n_r + j,
                          (hold, ("recurrent", j)))
            h_new = u.float()
            if criterion == "residual":
                delta = (h_new - h).norm(dim=-1) / h_new.norm(dim=-1).clamp_min(1e-30)
                done = delta < threshold
            else:
                logp = self._readout(h_new, dtype, rope, mask, input_ids, cache,
                                     probe_base + (r - 1) * n_c, hold).log_softmax(-1)
                done = torch.zeros_like(active)
                if criterion == "kl" and prev_logp is not None:
                    kl = (logp.exp() * (logp - prev_logp)).sum(-1).clamp_min(0.0)
                    done = kl < threshold
                elif criterion == "argmax":
                    arg = logp.argmax(-1)
                    if prev_arg is not None:
                        stable = torch.where(arg == prev_arg, stable + 1, 0)
                        done = stable >= patience
                    prev_arg = arg
                prev_logp = logp
            h = torch.where(active[..., None], h_new, h)
            iterations = torch.where(active & done, r, iterations)
            active = active & ~done
            ran = r
            if not bool(active.any()):
                break
        if cache is not None:  # slots of iterations nobody ran hold the last K/V (the rule)
            for r in range(ran + 1, T + 1):
                for j in range(n_r):
                    cache.update(*hold.kv[("recurrent", j)], n_p + (r - 1) * n_r + j)
                if criterion != "residual":
                    for k in range(n_c):
                        cache.update(*hold.kv[("probe", k)], probe_base + (r - 1) * n_c + k)
        return h, iterations

    def _readout(self, h, dtype, rope, mask, input_ids, cache, first_slot, hold) -> torch.Tensor:
        """Logits the model would give if every token stopped at state ``h`` (fp32)."""
        n_pr = self.config.num_prelude_layers + self.config.num_recurrent_layers
        x = readout(h, self.transformer.C.weight).to(dtype)
        for k, block in enumerate(self.transformer.coda):
            x = block(x, rope, mask, self._value_embedding(n_pr + k, input_ids), cache,
                      first_slot + k, (hold, ("probe", k)))
        return self.lm_head(self.transformer.ln_f(x)).float()

    def _check_cache(self, cache: Cache, T: int, past: int, rule=None) -> None:
        needed = self.config.unrolled_layers(T)
        if rule is not None and rule[0] != "residual":
            needed += T * self.config.num_coda_layers  # read-out slots per iteration
        built_for = getattr(cache, "parcae_num_iterations", None)
        if past and built_for is not None and built_for != T:
            raise ValueError(f"this cache was built with num_iterations={built_for}; "
                             f"call again with the same loop count (got {T})")
        if past and getattr(cache, "parcae_exit_rule", None) != rule:
            raise ValueError(f"this cache was built with exit rule "
                             f"{getattr(cache, 'parcae_exit_rule', None)}; call again with "
                             f"the same rule (got {rule})")
        cache.parcae_num_iterations = T
        cache.parcae_exit_rule = rule
        layers = getattr(cache, "layers", None)
        if layers is not None:  # generate() sizes caches by config.num_hidden_layers
            while len(layers) < needed:
                layers.append(DynamicLayer())

    @staticmethod
    def _attention_mask(attention_mask, b: int, s: int, past: int, device) -> torch.Tensor | None:
        """Boolean [b, 1, s, past+s] mask (causal and padding), or None for plain causal."""
        if attention_mask is None and past == 0:
            return None
        total = past + s
        q_pos = torch.arange(past, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        mask = (k_pos <= q_pos)[None, None].expand(b, 1, s, total)
        if attention_mask is not None:
            keep = attention_mask[:, -total:].bool()[:, None, None, :]
            mask = mask & keep
            # A fully padded query row would give NaNs: let it attend to itself only.
            mask = mask | (k_pos == q_pos)[None, None]
        return mask
