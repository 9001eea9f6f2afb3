"""ParcaeConfig: presets, derived values, and clear errors for invalid combinations."""

from __future__ import annotations

import math

import pytest

from parcae_megatron.model import ParcaeConfigError, preset_config, preset_names
from parcae_megatron.model.config import default_stage_layout


def test_presets_exist():
    names = set(preset_names())
    for size in ("140m", "370m", "770m", "1.3b"):
        assert f"parcae-{size}" in names and f"transformer-{size}" in names
    assert {"parcae-tiny", "transformer-tiny"} <= names


def test_paper_recipe_values():
    cfg = preset_config("parcae-770m")
    assert (cfg.num_prelude_layers, cfg.num_recurrent_layers, cfg.num_coda_layers) == (6, 6, 6)
    assert cfg.num_layers == 18
    assert (cfg.mean_recurrence, cfg.mean_backprop_depth) == (8, 4)
    assert cfg.rotary_base == 50000 and cfg.kv_channels == 128
    assert cfg.layernorm_epsilon == 1e-5 and not cfg.add_bias_linear
    assert math.isclose(cfg.init_method_std, math.sqrt(2 / (5 * 1280)))
    assert cfg.injection_type == "diagonal" and cfg.depth_sampling == "per_sequence"
    base = preset_config("transformer-770m")
    assert base.num_layers == 18 and not base.is_looped


def test_value_embedding_placement():
    # docs/design.md §2.3: alternate layers, last always included; 3 tables at 140M (6 layers)
    cfg = preset_config("parcae-140m")
    assert [i for i in range(6) if cfg.has_value_embedding(i)] == [1, 3, 5]
    assert not preset_config("parcae-140m", value_embeddings=False).has_value_embedding(5)


@pytest.mark.parametrize("overrides, message", [
    (dict(mean_backprop_depth=9), "mean_backprop_depth (9) must be in [1, mean_recurrence=8]"),
    (dict(tensor_model_parallel_size=4), "num_attention_heads (6) is not divisible by "
                                         "tensor_model_parallel_size (4)"),
    (dict(injection_type="mamba"), "injection_type must be one of"),
    (dict(depth_sampling="uniform"), "depth_sampling must be one of"),
    (dict(pipeline_model_parallel_size=2, parcae_pipeline_layout="pRp|cc"),
     "must list, in order"),
    (dict(pipeline_model_parallel_size=2, parcae_pipeline_layout="ppRcc"), "has 1 stages"),
    (dict(pipeline_model_parallel_size=6), "exceeds the number of placeable units"),
])
def test_invalid_configs_fail_at_construction(overrides, message):
    with pytest.raises(ParcaeConfigError, match="invalid Parcae config") as info:
        preset_config("parcae-140m", **overrides)
    assert message in str(info.value)


def test_unknown_preset():
    with pytest.raises(ParcaeConfigError, match="unknown preset 'parcae-7b'"):
        preset_config("parcae-7b")


def test_default_pipeline_layouts():
    assert default_stage_layout(2, 2, 2, 1) == ["ppRcc"]
    two = default_stage_layout(2, 2, 2, 2)
    assert len(two) == 2 and "".join(two) == "ppRcc" and all(two)
    four = default_stage_layout(2, 2, 2, 4)
    assert "".join(four) == "ppRcc" and len(four) == 4
    assert sum("R" in s for s in four) == 1
    eight = default_stage_layout(8, 8, 8, 4)  # 1.3B at PP=4: R stage holds 8 layers' weight
    assert "".join(eight) == "p" * 8 + "R" + "c" * 8
    cfg = preset_config("parcae-tiny", pipeline_model_parallel_size=2,
                        parcae_pipeline_layout="p|pRcc")
    assert cfg.stage_layout() == ["p", "pRcc"]
    prelude = cfg.stack_config("prelude").pipeline_model_parallel_layout
    assert [prelude.get_num_layers_to_build(pp_rank=r) for r in (0, 1)] == [1, 1]
    assert prelude.get_layer_offset(pp_rank=1) == 1
    core = cfg.stack_config("recurrent").pipeline_model_parallel_layout
    assert [core.get_num_layers_to_build(pp_rank=r) for r in (0, 1)] == [0, 2]
