"""FLOPs per token of the paper's App. D formula next to the code formula (docs/design.md §8),
checked against numbers worked out by hand from the 140M sizes (docs/design.md §7)."""

from __future__ import annotations

import pytest

from parcae_megatron.model.accounting import (
    FLOPS_FORMULAS,
    count_parameters_from_config,
    flops_per_token,
    paper_effective_params,
    paper_flops_per_token,
)
from parcae_megatron.model.presets import preset_config

# 140M Parcae (docs/design.md §7): d = 768, d_ff = 3072, 6 heads x 128, vocab 32768, S = 2048,
# L_P = L_R = L_C = 2, tied embedding, 3 value-embedding (VE) tables, 1 of them in the loop.
#   one layer = 4d² + 2·d·d_ff + 2d = 2,359,296 + 4,718,592 + 1,536 = 7,079,424
#   N_R (2 layers + one VE gate of 32·6) = 14,158,848 + 192 = 14,159,040  (docs/design.md §7)
#   N_non-R = prelude+coda 4 layers 28,317,696 + 2 VE gates 384 + injection 2d + d² 591,360
#             + readout d² 589,824 + prelude norm 768 + final norm 768
#             + unembedding 32768·768 = 25,165,824                      = 54,666,624
# μ_rec = 8, μ_bwd = 4:
#   N̂₁ = (8 − 4)·N_R = 56,636,160          N̂₂ = N_non-R + 4·N_R = 111,302,784
#   2·N̂₁ + 6·N̂₂ = 113,272,320 + 667,816,704 = 781,089,024
#   A = 4·768·2048 = 6,291,456; attention = 3A·(2+2) + A·2·(8−4) + 3A·2·4
#                                          = 75,497,472 + 50,331,648 + 150,994,944 = 276,824,064
#   paper FLOPs/token = 781,089,024 + 276,824,064 = 1,057,913,088
# Code formula: N_nc = 144,323,136 − 25,165,824 − 14,159,040 = 104,998,272 (keeps the three
#   VE tables 75,497,472, drops the LM head), so it is larger by
#   6·(75,497,472 − 25,165,824) = 301,989,888 → 1,359,902,976 (docs/design.md §8.4: 1.36e9).
PAPER_140M = 1_057_913_088
CODE_140M = 1_359_902_976
# Fixed-depth 140M Transformer: N̂₂ = 143,141,184 − 25,165,824 (token table) − 3 VE tables
#   75,497,472 + unembedding 25,165,824 = 67,643,712; 6·N̂₂ = 405,862,272;
#   attention 3A·6 layers = 113,246,208 → 519,108,480 (code formula: 8.21e8, docs/design.md §8.4).
PAPER_140M_TRANSFORMER = 519_108_480


def _counts(name: str, **overrides):
    cfg = preset_config(name, **overrides)
    return cfg, count_parameters_from_config(cfg)


def test_paper_formula_140m_by_hand():
    cfg, counts = _counts("parcae-140m")
    assert counts["total_params"] == 144_323_136 and counts["recurrent_params"] == 14_159_040
    assert paper_effective_params(cfg, counts) == (56_636_160, 111_302_784)
    assert paper_flops_per_token(cfg, counts) == PAPER_140M
    assert flops_per_token(cfg, counts) == CODE_140M  # unchanged code formula
    assert CODE_140M - PAPER_140M == 6 * (75_497_472 - 25_165_824)
    assert FLOPS_FORMULAS["paper"](cfg, counts) == PAPER_140M


def test_paper_formula_transformer_and_depths():
    cfg, counts = _counts("transformer-140m")
    assert paper_effective_params(cfg, counts) == (0, 67_643_712)
    assert paper_flops_per_token(cfg, counts) == PAPER_140M_TRANSFORMER
    # μ_rec = μ_bwd = 2: nothing runs without gradient; each extra no-grad loop adds
    # 2·N_R + A·L_R = 28,318,080 + 12,582,912 = 40,900,992 FLOPs per token.
    cfg2, c2 = _counts("parcae-140m", mean_recurrence=2, mean_backprop_depth=2)
    cfg3, c3 = _counts("parcae-140m", mean_recurrence=3, mean_backprop_depth=2)
    assert paper_effective_params(cfg2, c2)[0] == 0
    assert paper_flops_per_token(cfg3, c3) - paper_flops_per_token(cfg2, c2) == 40_900_992
    # the two formulas differ by the same constant at every depth
    for cfg_, c_ in ((cfg2, c2), (cfg3, c3)):
        assert flops_per_token(cfg_, c_) - paper_flops_per_token(cfg_, c_) == pytest.approx(
            CODE_140M - PAPER_140M)
