"""Loop injection and readout as Megatron modules: fp32 parameters around the shared maths.

The maths of every injection type, and the registry of types, is ``hf/loop_math.py`` (shared
with the Hugging Face model, docs/design.md §3). Here each type becomes a module holding its
parameters under the registry's names (``injection.A_log``, ``injection.weight``, …).

All parameters and arithmetic are fp32 whatever the model dtype (docs/design.md §3.4): the
modules refuse dtype casts of their parameters. Everything is per token, so it runs unchanged
on a sequence-parallel shard; the parameters are replicated over TP and flagged
``sequence_parallel`` so Megatron sums their gradients over the TP group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from parcae_megatron.hf import loop_math
from parcae_megatron.hf.loop_math import Prepared
from parcae_megatron.model.norm import mark_sequence_parallel

__all__ = ["DiagonalInjection", "Injection", "Prepared", "Readout", "build_injection"]


class Fp32ParamsModule(MegatronModule):
    """A MegatronModule whose float parameters stay fp32 through ``.bfloat16()``/``.half()``."""

    def finish_init(self, config) -> None:
        """Flag the parameters for sequence-parallel gradient reduction."""
        mark_sequence_parallel(self, config)

    def _apply(self, fn, recurse=True):
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out.float() if t.is_floating_point() and out.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)


class Injection(Fp32ParamsModule):
    """The injection u = Ā ⊙ h + B̄ e of one registered type (``config.injection_type``)."""

    def __init__(self, config, kind: str | None = None) -> None:
        super().__init__(config=config)
        self.kind = loop_math.injection(kind or config.injection_type)
        self.min_decay_rate = config.min_decay_rate
        # Allocated only: the model's init pass sets each parameter by its registry entry's
        # init rule (model/init.py `parameter_init`).
        for name, shape in self.kind.shapes(config.hidden_size).items():
            self.register_parameter(name, torch.nn.Parameter(
                torch.empty(shape, dtype=torch.float32)))
        self.finish_init(config)

    def params(self) -> dict[str, torch.Tensor]:
        """The parameters by their registry names."""
        return {name: getattr(self, name) for name in self.kind.init}

    def prepare(self, e: torch.Tensor) -> Prepared:
        """Loop-invariant Ā and B̄e (once per forward)."""
        return self.kind.prepare(self.params(), e, self.min_decay_rate)

    def step(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """u from the state h."""
        return self.kind.step(self.params(), h, prepared)


class DiagonalInjection(Injection):
    """Parcae's stable linear control path with a diagonal, strictly contracting Ā, plus the
    accessors the stability telemetry reads."""

    def __init__(self, config, exact_zoh: bool = False) -> None:
        super().__init__(config, "diagonal_exact_zoh" if exact_zoh else "diagonal")
        self.exact_zoh = exact_zoh

    def delta(self) -> torch.Tensor:
        """Δ = softplus(dt_bias), per channel."""
        return loop_math.delta(self.params())

    def rate(self) -> torch.Tensor:
        """Δ ⊙ a with a = exp(A_log), floored so Ā < 1 holds in floating point."""
        return loop_math.rate(self.params(), self.min_decay_rate)

    def decay(self) -> torch.Tensor:
        """Ā = exp(-Δ a) ∈ (0, 1)."""
        return loop_math.decay(self.params(), self.min_decay_rate)

    def input_gain(self) -> torch.Tensor:
        """Δ (Euler) or the exact ZOH gain (1 - exp(-Δa)) / a."""
        return loop_math.input_gain(self.params(), self.min_decay_rate, self.exact_zoh)


class Readout(Fp32ParamsModule):
    """y = C h_T, the linear readout before the coda (orthogonal init, gain √(2/5))."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        d = config.hidden_size
        # Allocated only: the model's init pass sets it (model/init.py `parameter_init`).
        self.weight = torch.nn.Parameter(torch.empty(d, d, dtype=torch.float32))
        self.finish_init(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """C h in fp32."""
        return loop_math.readout(h, self.weight)


def build_injection(config) -> Injection:
    """The injection module selected by ``config.injection_type``."""
    kind = loop_math.injection(config.injection_type)
    if kind.diagonal:
        return DiagonalInjection(config, exact_zoh=kind.exact_zoh)
    return Injection(config)
