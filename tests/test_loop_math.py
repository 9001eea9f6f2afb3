"""The injection registry (parcae_megatron/hf/loop_math.py) is what every part reads: the
Megatron and HF modules hold exactly its parameters, accounting counts them, the command line
offers its types and conversion maps their keys."""

from __future__ import annotations

import argparse

import pytest
import torch

from parcae_megatron.convert.mapping import _TOP
from parcae_megatron.hf.configuration_parcae import ParcaeConfig as HFConfig
from parcae_megatron.hf.loop_math import INJECTION_TYPES, INJECTIONS, injection
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM
from parcae_megatron.model import preset_config
from parcae_megatron.model.accounting import count_parameters, count_parameters_from_config


@pytest.mark.parametrize("name", INJECTION_TYPES)
def test_megatron_and_hf_hold_the_registered_parameters(megatron_single, name):
    from parcae_megatron.describe import build_on_meta

    cfg = preset_config("parcae-tiny", injection_type=name)
    shapes = injection(name).shapes(cfg.hidden_size)
    model = build_on_meta(cfg)
    assert {n: tuple(p.shape) for n, p in model.injection.named_parameters()} == shapes
    assert all(p.dtype == torch.float32 for p in model.injection.parameters())
    assert count_parameters(model) == count_parameters_from_config(cfg)
    assert count_parameters(model)["injection_params"] == injection(name).num_parameters(64)
    with torch.device("meta"):
        hf = ParcaeForCausalLM(HFConfig(vocab_size=512, hidden_size=64, intermediate_size=256,
                                        num_attention_heads=4, head_dim=16,
                                        injection_type=name))
    assert {n: tuple(p.shape) for n, p in hf.transformer.adapter.named_parameters()} == shapes
    for param in shapes:  # every parameter has a Megatron ↔ HF key
        assert _TOP[f"injection.{param}"] == f"transformer.adapter.{param}"


def test_command_line_offers_the_registry():
    from parcae_megatron.training.arguments import add_parcae_args

    parser = add_parcae_args(argparse.ArgumentParser())
    action = next(a for a in parser._actions if a.dest == "injection_type")
    assert tuple(action.choices) == INJECTION_TYPES == tuple(INJECTIONS)


def test_unknown_types_are_named_in_the_error():
    with pytest.raises(ValueError, match="injection_type must be one of .*'lstm'"):
        injection("lstm")


def test_init_rules_give_the_documented_start():
    """Ā = √0.2 and B̄ = Δ·I at init for the diagonal types (docs/design.md §3.1, §5)."""
    from parcae_megatron.hf import loop_math

    kind = INJECTIONS["diagonal"]
    params = {n: torch.empty(s) for n, s in kind.shapes(8).items()}
    for n, rule in kind.init.items():
        loop_math.init_injection_parameter_(rule, params[n], loop_math.INIT_DECAY, None)
    torch.testing.assert_close(loop_math.decay(params, 1e-6), torch.full((8,), 0.2 ** 0.5))
    torch.testing.assert_close(params["B"], torch.eye(8))


def test_init_pass_takes_injection_inits_from_the_registry(monkeypatch):
    """The Megatron init pass (``init.parameter_init``) initialises ``injection.*`` by the
    registry entry's rules: a new entry needs no init code elsewhere, and a parameter the
    configured type does not have is an error."""
    import copy
    import math

    from parcae_megatron.hf import loop_math
    from parcae_megatron.model.init import InitMethod, parameter_init

    additive = INJECTIONS["additive"]
    entry = loop_math.Injection(
        "probe", lambda d: {"gain": (d,), "mix": (d, d), "w": (d, 2 * d), "off": (d,)},
        {"gain": "dt_bias", "mix": "eye", "w": "normal", "off": "zeros"},
        additive.prepare, additive.step)
    monkeypatch.setitem(INJECTIONS, "probe", entry)
    cfg = copy.copy(preset_config("parcae-tiny"))
    cfg.injection_type, d = "probe", cfg.hidden_size
    got = {n: parameter_init(f"injection.{n}", cfg)(torch.full(s, math.nan))
           for n, s in entry.shapes(d).items()}
    torch.testing.assert_close(got["gain"], torch.full((d,), loop_math.initial_dt_bias(
        cfg.init_decay)), rtol=0, atol=0)
    assert torch.equal(got["mix"], torch.eye(d)) and torch.equal(got["off"], torch.zeros(d))
    keyed = InitMethod("trunc_normal", cfg.init_method_std, cfg.init_seed, "injection.w",
                       (d, 2 * d))
    assert torch.equal(got["w"], keyed.full())
    with pytest.raises(ValueError, match="no initialisation rule for parameter 'injection.B'"):
        parameter_init("injection.B", cfg)


def test_memory_estimate_takes_the_injections_kept_tensors_from_the_registry(monkeypatch):
    """A new entry needs no memory-estimate code: the loop's fp32 tensors kept for the
    backward come from its ``kept_fp32``."""
    import copy
    import dataclasses

    from parcae_megatron.model.memory import loop_state_bytes

    monkeypatch.setitem(INJECTIONS, "probe",
                        dataclasses.replace(INJECTIONS["additive"], name="probe", kept_fp32=5))
    cfg = copy.copy(preset_config("parcae-tiny", injection_type="additive"))
    sizes = dict(micro_batch_size=2, seq_length=16, bf16=False)
    additive = loop_state_bytes(cfg, **sizes)
    cfg.injection_type = "probe"
    assert loop_state_bytes(cfg, **sizes) - additive == (5 - 1) * 4 * 2 * 16 * cfg.hidden_size
