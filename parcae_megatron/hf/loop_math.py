"""The loop's maths, written once: the injection types, the norm, the readout and the initial state.

u_t = Ā ⊙ h_t + B̄ e feeds the recurrent block, h_{t+1} = F_R(u_t), and y = C h_T feeds the
coda (docs/design.md §2.1, §3):

* ``diagonal`` (Parcae): Ā = exp(-Δ ⊙ exp(A_log)) (ZOH), B̄ e = Δ ⊙ (B e) (Euler),
  Δ = softplus(dt_bias).
* ``diagonal_exact_zoh``: same Ā, input gain (1 - exp(-Δa)) / a instead of Δ (docs/design.md §3.3).
* ``additive``: u = h + e (Ā = B̄ = I, marginally stable).
* ``concat_linear`` (Huginn/RDM): u = W [h; e], state columns first, ρ(Ā) unconstrained.

``INJECTIONS`` is the one registry of injection types: the Megatron config and command line,
parameter accounting, telemetry, checkpoint conversion and the Hugging Face model all read
it. Adding a type means adding its entry (and its two functions) here.

Pure ``torch``. The Megatron model (``model/injection.py``, ``model/parcae_model.py``) and the
Hugging Face model (``modeling_parcae.py``) both call these functions, and every HF export
ships this file next to ``modeling_parcae.py`` (transformers copies the relative imports of
remote code), so the two models compute the loop identically by construction.

All arithmetic is fp32 whatever the model dtype (docs/design.md §3.4). Loop-invariant terms
(Ā and B̄e) are computed once per forward by ``prepare`` and reused by every ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

Params = Mapping[str, torch.Tensor]
INIT_DECAY = math.sqrt(0.2)
"""Ā at initialisation on every channel (docs/design.md §5)."""


class Prepared(NamedTuple):
    """Loop-invariant terms of one forward: ``decay`` ([d] or None), ``drive`` [..., d]."""

    decay: torch.Tensor | None
    drive: torch.Tensor


# -- the diagonal control path ---------------------------------------------------------------
def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y."""
    return y + math.log(-math.expm1(-y))


def initial_dt_bias(init_decay: float = INIT_DECAY) -> float:
    """dt_bias giving Ā = ``init_decay`` with A_log = 0: Δ0 = -ln(init_decay)."""
    return inverse_softplus(-math.log(init_decay))


def delta(params: Params) -> torch.Tensor:
    """Δ = softplus(dt_bias), per channel."""
    return F.softplus(params["dt_bias"].float())


def rate(params: Params, min_decay_rate: float) -> torch.Tensor:
    """Δ ⊙ a with a = exp(A_log), floored so Ā < 1 holds in floating point."""
    return torch.clamp_min(delta(params) * torch.exp(params["A_log"].float()), min_decay_rate)


def decay(params: Params, min_decay_rate: float) -> torch.Tensor:
    """Ā = exp(-Δ a) ∈ (0, 1)."""
    return torch.exp(-rate(params, min_decay_rate))


def input_gain(params: Params, min_decay_rate: float, exact_zoh: bool) -> torch.Tensor:
    """Δ (Euler) or the exact ZOH gain (1 - exp(-Δa)) / a."""
    if not exact_zoh:
        return delta(params)
    a = torch.exp(params["A_log"].float())
    return -torch.expm1(-rate(params, min_decay_rate)) / a


def _diagonal_prepare(exact_zoh: bool) -> Callable[[Params, torch.Tensor, float], Prepared]:
    def prepare(params: Params, e: torch.Tensor, min_decay_rate: float) -> Prepared:
        drive = (F.linear(e.float(), params["B"].float())
                 * input_gain(params, min_decay_rate, exact_zoh))
        return Prepared(decay(params, min_decay_rate), drive)

    return prepare


def _decay_step(params: Params, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """u = Ā ⊙ h + B̄ e (u = h + e when there is no Ā)."""
    return (h if prepared.decay is None else prepared.decay * h) + prepared.drive


# -- additive and concat-linear --------------------------------------------------------------
def _additive_prepare(params: Params, e: torch.Tensor, min_decay_rate: float) -> Prepared:
    """The drive is e itself."""
    return Prepared(None, e.float())


def _concat_prepare(params: Params, e: torch.Tensor, min_decay_rate: float) -> Prepared:
    """W_e e, once per forward."""
    w = params["weight"].float()
    return Prepared(None, F.linear(e.float(), w[:, w.shape[0]:]))


def _concat_step(params: Params, h: torch.Tensor, prepared: Prepared) -> torch.Tensor:
    """u = W_h h + W_e e."""
    w = params["weight"].float()
    return F.linear(h, w[:, :w.shape[0]]) + prepared.drive


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Injection:
    """One injection type.

    ``shapes(d)``: its fp32 parameters (name → shape, in registration order) at width d;
    ``init``: per parameter, ``"zeros"``, ``"eye"``, ``"dt_bias"`` (Ā = ``init_decay``) or
    ``"normal"`` (the model's own normal init); ``official_name``: the authors' name for it
    (None: not in their format) and ``official_keys``: our parameter name → theirs under
    ``transformer.adapter.`` (docs/design.md §12.2); ``diagonal``: Ā is the per-channel
    exp(-Δa) of ``A_log``/``dt_bias`` (stability telemetry applies); ``kept_fp32``: the fp32
    [s, b, d] tensors its ``prepare`` keeps for the whole loop's backward (the memory
    estimate; at least the drive B̄e).
    """

    name: str
    shapes: Callable[[int], dict[str, tuple[int, ...]]]
    init: dict[str, str]
    prepare: Callable[[Params, torch.Tensor, float], Prepared]
    step: Callable[[Params, torch.Tensor, Prepared], torch.Tensor]
    official_name: str | None = None
    official_keys: dict[str, str] = field(default_factory=dict)
    diagonal: bool = False
    exact_zoh: bool = False
    kept_fp32: int = 1

    def __post_init__(self) -> None:
        if set(self.shapes(1)) != set(self.init):
            raise ValueError(f"injection {self.name!r}: every parameter needs one init rule")

    def num_parameters(self, d: int) -> int:
        """Parameter count at width d."""
        return sum(math.prod(shape) for shape in self.shapes(d).values())


def _diagonal_shapes(d: int) -> dict[str, tuple[int, ...]]:
    return {"A_log": (d,), "dt_bias": (d,), "B": (d, d)}


_DIAGONAL_INIT = {"A_log": "zeros", "dt_bias": "dt_bias", "B": "eye"}
_DIAGONAL_KEYS = {"A_log": "A_log", "dt_bias": "dt_bias", "B": "B"}

INJECTIONS: dict[str, Injection] = {
    "diagonal": Injection("diagonal", _diagonal_shapes, _DIAGONAL_INIT,
                          _diagonal_prepare(False), _decay_step, official_name="diagonal",
                          official_keys=_DIAGONAL_KEYS, diagonal=True, kept_fp32=3),
    "diagonal_exact_zoh": Injection("diagonal_exact_zoh", _diagonal_shapes, _DIAGONAL_INIT,
                                    _diagonal_prepare(True), _decay_step, diagonal=True,
                                    exact_zoh=True, kept_fp32=3),
    "additive": Injection("additive", lambda d: {}, {}, _additive_prepare, _decay_step,
                          official_name="add"),
    "concat_linear": Injection("concat_linear", lambda d: {"weight": (d, 2 * d)},
                               {"weight": "normal"}, _concat_prepare, _concat_step,
                               official_name="linear",
                               official_keys={"weight": "adapter.weight"}, kept_fp32=2),
}
INJECTION_TYPES = tuple(INJECTIONS)


def injection(name: str) -> Injection:
    """The registry entry of ``name`` (ValueError naming the known types otherwise)."""
    if name not in INJECTIONS:
        raise ValueError(f"injection_type must be one of {INJECTION_TYPES}, got {name!r}")
    return INJECTIONS[name]


@torch.no_grad()
def init_injection_parameter_(rule: str, tensor: torch.Tensor, init_decay: float,
                              normal_: Callable[[torch.Tensor], object]) -> None:
    """Set ``tensor`` by its ``Injection.init`` rule (``normal_`` draws the ``"normal"`` one)."""
    if rule == "zeros":
        tensor.zero_()
    elif rule == "eye":
        torch.nn.init.eye_(tensor)
    elif rule == "dt_bias":
        tensor.fill_(initial_dt_bias(init_decay))
    elif rule == "normal":
        normal_(tensor)
    else:
        raise ValueError(f"unknown injection init rule {rule!r}")


# -- norm, readout and initial state ---------------------------------------------------------
def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMS normalisation over the last dim (block and prelude norms; QK-norm without gain)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def readout(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = C h in fp32 (no norm on h before C)."""
    return F.linear(h.float(), weight.float())


def truncated_normal_(tensor: torch.Tensor, std: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Truncated normal at ±3σ (the ``like_init`` loop-state draw, docs/design.md §4.5)."""
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std,
                                       generator=generator)


def seeded_state_table(positions: int, hidden: int, std: float, seed: int) -> torch.Tensor:
    """h₀ rows [positions, hidden] of a seeded initial state: row p is the state of the token
    at position p, drawn on the CPU from ``seed`` alone (so any layout and device agree)."""
    table = torch.empty(positions, hidden)
    return truncated_normal_(table, std, torch.Generator().manual_seed(seed))
