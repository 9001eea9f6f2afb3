"""The Hugging Face Parcae model on its own (random tiny weights): batching with left
padding, KV-cache bookkeeping per loop count, config validation."""

from __future__ import annotations

import pytest
import torch

from parcae_megatron.hf.configuration_parcae import ParcaeConfig
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM


@pytest.fixture(scope="module")
def model() -> ParcaeForCausalLM:
    cfg = ParcaeConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                       num_attention_heads=2, head_dim=32, num_prelude_layers=2,
                       num_recurrent_layers=2, num_coda_layers=2, mean_recurrence=3,
                       max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    m = ParcaeForCausalLM(cfg).eval()
    with torch.no_grad():  # move the zero-initialised projections
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_left_padded_batch_generates_like_single_prompts(model):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 256, (1, 10), generator=gen), torch.randint(1, 256, (1, 6),
                                                                         generator=gen)
    singles = [model.generate(p, max_new_tokens=6, do_sample=False) for p in (a, b)]
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 10:], singles[0][0, 10:])
    assert torch.equal(out[1, 10:], singles[1][0, 6:])


def test_cache_holds_one_layer_per_executed_attention_layer(model):
    ids = torch.randint(1, 256, (2, 5))
    for T in (1, 2, 5):
        out = model(ids, num_iterations=T, use_cache=True)
        assert len(out.cache.layers) == model.config.unrolled_layers(T) == 4 + 2 * T
        step = model(ids[:, :1], cache=out.cache, num_iterations=T)
        assert step.cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="same loop count"):
        model(ids[:, :1], cache=out.cache, num_iterations=3)


def test_loop_count_changes_the_output_and_defaults_to_config(model):
    ids = torch.randint(1, 256, (1, 8))
    with torch.no_grad():
        by_t = {T: model(ids, num_iterations=T, use_cache=False).logits for T in (1, 3)}
        default = model(ids, use_cache=False).logits
    assert not torch.allclose(by_t[1], by_t[3])
    assert torch.equal(default, by_t[model.config.num_iterations])


@pytest.mark.parametrize("bad, message", [
    (dict(injection_type="lstm"), "injection_type"),
    (dict(state_init="gaussian"), "state_init"),
    (dict(num_attention_heads=3, num_key_value_heads=2), "multiple"),
    (dict(num_iterations=0), "num_iterations"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        ParcaeConfig(**bad)
