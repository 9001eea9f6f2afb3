"""Named model sizes (docs/design.md §7, paper Table 19) and tiny presets for tests.

``parcae-*`` are looped models (L_P / L_R / L_C, μ_rec = 8, μ_bwd = 4); ``transformer-*``
are the fixed-depth baselines with 3× the per-stage layer count and the same width.
"""

from __future__ import annotations

from typing import Any

from parcae_megatron.model.config import ParcaeConfig, ParcaeConfigError

# name: (d_model, heads, stage layers)
_SIZES = {
    "140m": (768, 6, 2),
    "370m": (1024, 8, 4),
    "770m": (1280, 10, 6),
    "1.3b": (1536, 12, 8),
}


def _paper(d: int, heads: int, per_stage: int, looped: bool) -> dict[str, Any]:
    layers = (per_stage, per_stage, per_stage) if looped else (3 * per_stage, 0, 0)
    return dict(hidden_size=d, num_attention_heads=heads, num_query_groups=heads,
                kv_channels=128, ffn_hidden_size=4 * d, num_prelude_layers=layers[0],
                num_recurrent_layers=layers[1], num_coda_layers=layers[2],
                mean_recurrence=8, mean_backprop_depth=4, vocab_size=32768, seq_length=2048)


PRESETS: dict[str, dict[str, Any]] = {}
for _name, (_d, _h, _n) in _SIZES.items():
    PRESETS[f"parcae-{_name}"] = _paper(_d, _h, _n, looped=True)
    PRESETS[f"transformer-{_name}"] = _paper(_d, _h, _n, looped=False)

_TINY = dict(hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=16,
             ffn_hidden_size=256, vocab_size=512, seq_length=32)
PRESETS["parcae-tiny"] = dict(_TINY, num_prelude_layers=2, num_recurrent_layers=2,
                              num_coda_layers=2, mean_recurrence=4, mean_backprop_depth=2)
PRESETS["transformer-tiny"] = dict(_TINY, num_prelude_layers=6, num_recurrent_layers=0,
                                   num_coda_layers=0)


def preset_names() -> list[str]:
    """All known preset names."""
    return sorted(PRESETS)


def preset_config(name: str, **overrides: Any) -> ParcaeConfig:
    """Build the ``ParcaeConfig`` of preset ``name``, with keyword overrides."""
    if name not in PRESETS:
        raise ParcaeConfigError(f"unknown preset {name!r}; known presets: {preset_names()}")
    return ParcaeConfig(**{**PRESETS[name], **overrides})
