"""Loop injection: how the prelude output e enters the state at every iteration.

u_t = Ā ⊙ h_t + B̄ e feeds the recurrent block, h_{t+1} = F_R(u_t) (docs/design.md §2.1, §3).

* ``diagonal`` (Parcae): Ā = exp(-Δ ⊙ exp(A_log)) (ZOH), B̄ e = Δ ⊙ (B e) (Euler),
  Δ = softplus(dt_bias).
* ``diagonal_exact_zoh``: same Ā, input gain (1 - exp(-Δa)) / a instead of Δ (docs/design.md §3.3).
* ``additive``: u = h + e (Ā = B̄ = I, marginally stable).
* ``concat_linear`` (Huginn/RDM): u = W [h; e], ρ(Ā) unconstrained.

All parameters and arithmetic are fp32 whatever the model dtype (docs/design.md §3.4): the modules
refuse dtype casts of their parameters. Loop-invariant terms (Ā and B̄e) are computed once per
forward by ``prepare`` and reused by every ``step``.

Everything here is per token, so it runs unchanged on a sequence-parallel shard; the
parameters are replicated over TP and flagged ``sequence_parallel`` so Megatron sums their
gradients over the TP group.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from parcae_megatron.model.norm import mark_sequence_parallel


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


class Prepared(NamedTuple):
    """Loop-invariant terms of one forward: ``decay`` ([d] or None), ``drive`` [s, b, d]."""

    decay: torch.Tensor | None
    drive: torch.Tensor


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y."""
    return y + math.log(-math.expm1(-y))


class DiagonalInjection(Fp32ParamsModule):
    """Parcae's stable linear control path with a diagonal, strictly contracting Ā."""

    def __init__(self, config, exact_zoh: bool = False) -> None:
        super().__init__(config=config)
        d = config.hidden_size
        self.exact_zoh = exact_zoh
        self.min_decay_rate = config.min_decay_rate
        # Initial values (A_log = 0, Ā = init_decay, B = I) are set by the model's init pass.
        self.A_log = torch.nn.Parameter(torch.empty(d, dtype=torch.float32))
        self.dt_bias = torch.nn.Parameter(torch.empty(d, dtype=torch.float32))
        self.B = torch.nn.Parameter(torch.empty(d, d, dtype=torch.float32))
        self.finish_init(config)

    def delta(self) -> torch.Tensor:
        """Δ = softplus(dt_bias), per channel."""
        return F.softplus(self.dt_bias)

    def rate(self) -> torch.Tensor:
        """Δ ⊙ a with a = exp(A_log), floored so Ā < 1 holds in floating point."""
        return torch.clamp_min(self.delta() * torch.exp(self.A_log), self.min_decay_rate)

    def decay(self) -> torch.Tensor:
        """Ā = exp(-Δ a) ∈ (0, 1)."""
        return torch.exp(-self.rate())

    def input_gain(self) -> torch.Tensor:
        """Δ (Euler) or the exact ZOH gain (1 - exp(-Δa)) / a."""
        if not self.exact_zoh:
            return self.delta()
        a = torch.exp(self.A_log)
        return -torch.expm1(-self.rate()) / a

    def prepare(self, e: torch.Tensor) -> Prepared:
        """Ā and B̄e (once per forward)."""
        drive = F.linear(e.float(), self.B) * self.input_gain()
        return Prepared(self.decay(), drive)

    def step(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """u = Ā ⊙ h + B̄ e."""
        return prepared.decay * h + prepared.drive


class AdditiveInjection(Fp32ParamsModule):
    """u = h + e: Ā = B̄ = I (the marginally stable baseline)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)

    def prepare(self, e: torch.Tensor) -> Prepared:
        """The drive is e itself."""
        return Prepared(None, e.float())

    def step(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """u = h + e."""
        return h + prepared.drive


class ConcatLinearInjection(Fp32ParamsModule):
    """u = W [h; e] with W ∈ R^{d×2d} (Huginn/RDM adapter; Ā = W_h is unconstrained)."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        d = config.hidden_size
        self.weight = torch.nn.Parameter(torch.empty(d, 2 * d, dtype=torch.float32))
        self.finish_init(config)

    def prepare(self, e: torch.Tensor) -> Prepared:
        """W_e e, computed once per forward."""
        d = self.weight.shape[0]
        return Prepared(None, F.linear(e.float(), self.weight[:, d:]))

    def step(self, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """u = W_h h + W_e e."""
        d = self.weight.shape[0]
        return F.linear(h, self.weight[:, :d]) + prepared.drive


class Readout(Fp32ParamsModule):
    """y = C h_T, the linear readout before the coda (orthogonal init, gain √(2/5))."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        d = config.hidden_size
        self.weight = torch.nn.Parameter(torch.empty(d, d, dtype=torch.float32))
        self.finish_init(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """C h in fp32."""
        return F.linear(h.float(), self.weight)


def build_injection(config) -> MegatronModule:
    """The injection module selected by ``config.injection_type``."""
    kind = config.injection_type
    if kind == "diagonal":
        return DiagonalInjection(config)
    if kind == "diagonal_exact_zoh":
        return DiagonalInjection(config, exact_zoh=True)
    if kind == "additive":
        return AdditiveInjection(config)
    if kind == "concat_linear":
        return ConcatLinearInjection(config)
    raise ValueError(f"unknown injection_type {kind!r}")
