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


# --- adaptive depth (per-token early exit) -------------------------------------------------
RULES = [("residual", None, 2), ("kl", None, 2), ("argmax", 0.0, 1)]


def _mixed_threshold(model, ids, criterion: str, patience: int) -> float:
    """A threshold at which tokens stop at different iterations (so the cache rule matters)."""
    for eps in (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 1e-2, 1e-3, 1e-4):
        with torch.no_grad():
            its = model(ids, num_iterations=6, use_cache=False, exit_criterion=criterion,
                        exit_threshold=eps, exit_patience=patience).iterations
        if len(its.unique()) >= 2:
            return eps
    raise AssertionError(f"no threshold mixes exits for {criterion}")


@pytest.mark.parametrize("criterion, threshold, patience", RULES)
def test_adaptive_exit_at_zero_threshold_is_fixed_depth(model, criterion, threshold, patience):
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fixed = model(ids, num_iterations=5, use_cache=False).logits
        out = model(ids, num_iterations=5, use_cache=False, exit_criterion=criterion,
                    exit_threshold=0.0, exit_patience=100)
    assert torch.equal(out.logits, fixed)  # bit for bit
    assert (out.iterations == 5).all() and out.iteration_histogram.tolist() == [0] * 5 + [24]


def test_adaptive_exit_with_a_huge_threshold_stops_at_the_first_comparison(model):
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        res = model(ids, num_iterations=6, use_cache=False, exit_criterion="residual",
                    exit_threshold=1e9)
        kl = model(ids, num_iterations=6, use_cache=False, exit_criterion="kl",
                   exit_threshold=1e9)
        t1 = model(ids, num_iterations=1, use_cache=False).logits
    # residual compares h_1 with h_0: one iteration, and the output is the T = 1 output
    assert (res.iterations == 1).all() and res.iteration_histogram.tolist() == [0, 18, 0, 0, 0,
                                                                                0, 0]
    torch.testing.assert_close(res.logits, t1, rtol=0, atol=0)
    assert (kl.iterations == 2).all()  # KL needs two read-outs


@pytest.mark.parametrize("criterion, threshold, patience", RULES)
def test_adaptive_exit_cached_decoding_equals_one_uncached_forward(model, criterion, threshold,
                                                                  patience):
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(1, 256, (3, 16), generator=torch.Generator().manual_seed(5))
    eps = threshold if threshold is not None else _mixed_threshold(model, ids, criterion,
                                                                   patience)
    rule = dict(num_iterations=6, exit_criterion=criterion, exit_threshold=eps,
                exit_patience=patience)
    with torch.no_grad():
        full = model(ids, use_cache=False, **rule)
        cache = DynamicCache()
        parts = [model(ids[:, :4], cache=cache, use_cache=True, **rule)]  # a prefill, then 1 by 1
        parts += [model(ids[:, t: t + 1], cache=cache, use_cache=True, **rule)
                  for t in range(4, 16)]
    assert len(full.iterations.unique()) >= 2, full.iterations  # exits really differ
    assert torch.equal(torch.cat([p.iterations for p in parts], 1), full.iterations)
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), full.logits,
                               rtol=1e-4, atol=1e-4)
    # the histogram counts every token once, per call and summed over the cache's calls
    assert int(full.iteration_histogram.sum()) == ids.numel()
    assert torch.equal(cache.parcae_iteration_histogram, full.iteration_histogram)
    # generate() under the same rule: cached and uncached give the same tokens
    cached = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, **rule)
    plain = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False,
                           **rule)
    assert torch.equal(cached, plain)
    with pytest.raises(ValueError, match="exit rule"):
        model(ids[:, :1], cache=cache, num_iterations=6)


def test_adaptive_histogram_skips_padding_and_rejects_bad_rules(model):
    ids = torch.randint(1, 256, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, num_iterations=4,
                    exit_criterion="residual", exit_threshold=0.2)
    assert int(out.iteration_histogram.sum()) == 11 and out.iteration_histogram[0] == 0
    with pytest.raises(ValueError, match="exit_criterion"):
        model(ids, exit_criterion="entropy")
    with pytest.raises(ValueError, match="exit_threshold"):
        model(ids, exit_criterion="kl", exit_threshold=-1.0)
    with pytest.raises(ValueError, match="exit_criterion"):
        ParcaeConfig(exit_criterion="entropy")


def test_an_export_under_the_former_recurrent_block_name_loads_with_the_same_logits(
        model, tmp_path):
    """Exports written before the recurrent block was ``transformer.recurrent`` store it under
    the authors' name ``transformer.core_block.*``: the reader and ``load_state_dict`` both
    take such weights, and the model computes the same logits."""
    from safetensors.torch import load_file, save_file

    from parcae_megatron.convert.hf_io import load_hf_model, write_hf_dir
    from parcae_megatron.hf.modeling_parcae import rename_recurrent_keys

    write_hf_dir(model, tmp_path / "hf", None, overwrite=False)
    weights = tmp_path / "hf" / "model.safetensors"
    old = rename_recurrent_keys(load_file(str(weights)), to_authors=True)
    assert "transformer.core_block.1.attn.c_q.weight" in old
    assert not any(k.startswith("transformer.recurrent.") for k in old)
    save_file(old, str(weights), metadata={"format": "pt"})
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids, num_iterations=3, use_cache=False).logits
        loaded = load_hf_model(tmp_path / "hf")
        assert torch.equal(loaded(ids, num_iterations=3, use_cache=False).logits, want)
        fresh = ParcaeForCausalLM(model.config).eval()
        fresh.load_state_dict({**old, "lm_head.weight": old["transformer.wte.weight"]})
        assert torch.equal(fresh(ids, num_iterations=3, use_cache=False).logits, want)
