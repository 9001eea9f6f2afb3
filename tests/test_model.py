"""ParcaeModel on one process: paper parameter counts, init values, stability of Ā,
per-sequence depth semantics (compaction, truncated backprop) and fp32 loop state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from parcae_megatron.describe import build_on_meta
from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.accounting import count_parameters, flops_per_token
from parcae_megatron.model.depth import DepthSample
from parcae_megatron.model.injection import DiagonalInjection
from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
from tests.conftest import perturb_

# docs/design.md §7 (paper Table 19) and §8.1 (code FLOP formula)
PAPER = {
    "parcae-140m": (144_323_136, 14_159_040, 75_497_472, 1.36e9),
    "parcae-370m": (388_003_328, 50_340_352, 201_326_592, 4.17e9),
    "parcae-770m": (776_655_680, 117_981_120, 377_487_360, 8.86e9),
    "parcae-1.3b": (1_338_591_744, 226_518_528, 603_979_776, 1.58e10),
    "transformer-140m": (143_141_184, 0, 75_497_472, 8.21e8),
    "transformer-370m": (385_903_104, 0, 201_326_592, None),
    "transformer-770m": (773_375_040, 0, 377_487_360, None),
    "transformer-1.3b": (1_333_868_544, 0, 603_979_776, None),
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_parameter_counts_match_paper(megatron_single, preset):
    total, recurrent, ve_tables, flops = PAPER[preset]
    cfg = preset_config(preset)
    model = build_on_meta(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    counts = count_parameters(model)
    assert counts["total_params"] == total
    assert counts["recurrent_params"] == recurrent
    assert counts["value_embedding_params"] == ve_tables
    assert counts["embedding_params"] == ve_tables + 32768 * cfg.hidden_size
    if cfg.is_looped:  # extra params over the baseline: B, C, A_log, dt_bias, prelude norm
        d = cfg.hidden_size
        extra = (counts["injection_params"] + counts["readout_params"]
                 + counts["prelude_norm_params"])
        assert extra == 2 * d * d + 3 * d
    if flops is not None:
        assert f"{flops_per_token(cfg, counts):.2e}" == f"{flops:.2e}"


def tiny_model(**overrides) -> ParcaeModel:
    cfg = preset_config("parcae-tiny", **overrides)
    return ParcaeModel(cfg, get_parcae_layer_local_spec())


def test_init_values(megatron_single):
    model = tiny_model()
    inj = model.injection
    assert torch.allclose(inj.decay(), torch.full((64,), 0.44721), atol=1e-5)
    assert torch.allclose(inj.delta(), torch.full((64,), 0.80472), atol=1e-5)
    assert torch.equal(inj.A_log.detach(), torch.zeros(64))
    assert torch.equal(inj.B.detach(), torch.eye(64))
    for name, p in model.named_parameters():
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            assert torch.count_nonzero(p) == 0, name
    # C and Q/K/V: orthogonal with spectral norm sqrt(2/5) (square d x d)
    svals = torch.linalg.svdvals(model.readout.weight.detach())
    assert torch.allclose(svals, torch.full_like(svals, math.sqrt(0.4)), atol=1e-5)
    qkv = model.prelude.layers[0].self_attention.linear_qkv.weight.detach().view(4, 3, 16, 64)
    for part in range(3):
        s = torch.linalg.svdvals(qkv[:, part].reshape(64, 64))
        assert torch.allclose(s, torch.full_like(s, math.sqrt(0.4)), atol=1e-5)
    fc1 = torch.linalg.svdvals(model.recurrent.layers[0].mlp.linear_fc1.weight.detach())
    assert torch.allclose(fc1, torch.full_like(fc1, math.sqrt(1.6)), atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(arrays("float32", 16, elements=st.floats(-80, 80, width=32)),
       arrays("float32", 16, elements=st.floats(-80, 80, width=32)))
def test_decay_spectral_radius_below_one(a_log, dt_bias):
    cfg = preset_config("parcae-tiny", hidden_size=16, num_attention_heads=1, kv_channels=16,
                        value_embedding_gate_channels=16)
    inj = DiagonalInjection(cfg)
    with torch.no_grad():
        inj.A_log.copy_(torch.from_numpy(a_log))
        inj.dt_bias.copy_(torch.from_numpy(dt_bias))
    decay = inj.decay()
    assert torch.isfinite(decay).all()
    assert float(decay.max()) < 1.0 and float(decay.min()) >= 0.0


def _batch(b: int = 4, s: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (b, s + 1), generator=gen)
    h0 = torch.randn(s, b, 64, generator=gen) * 0.05
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), h0


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_loss(model: ParcaeModel, ids, labels, h0, total: int, grad: int):
    """A naive loop over one sequence built from the model's own submodules."""
    x = model.embedding(input_ids=ids, position_ids=None)
    rope = model.rotary_pos_emb(x.shape[0])
    x = model.prelude(hidden_states=x, attention_mask=None, rotary_pos_emb=rope,
                      context=model.value_embedding_rows(model.prelude, ids))
    prepared = model.injection.prepare(model.prelude_norm(x))
    h = h0
    for t in range(total):
        with torch.set_grad_enabled(t >= total - grad):  # rows looked up per iteration here
            h = model.recurrent(hidden_states=model.injection.step(h, prepared),
                                attention_mask=None, rotary_pos_emb=rope,
                                context=model.value_embedding_rows(model.recurrent, ids))
    x = model.coda(hidden_states=model.readout(h), attention_mask=None, rotary_pos_emb=rope,
                   context=model.value_embedding_rows(model.coda, ids))
    weight = model.embedding.word_embeddings.weight
    logits, _ = model.output_layer(model.final_norm(x), weight=weight)
    return model.compute_language_model_loss(labels, logits)


def test_checkpoints_written_under_the_old_name_load_with_the_same_logits(megatron_single,
                                                                           tmp_path):
    """The recurrent block was ``core`` before it was ``recurrent``: a distributed checkpoint
    written then (keys ``core.layers.…``) and a plain state dict of that time load into
    today's model and give the same logits; today's checkpoints keep those keys."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.common.language_module.language_module import LanguageModule

    old = tiny_model()
    perturb_(old)
    # The model as it was: the stack's attribute named `core`, Megatron's own sharded state
    # dict (ParcaeModel had no override then).
    old.core = old._modules.pop("recurrent")
    old_sharded = LanguageModule.sharded_state_dict(old)
    old_plain = {k: v for k, v in old.state_dict().items() if isinstance(v, torch.Tensor)}
    old.recurrent = old._modules.pop("core")
    assert any(k.startswith("core.layers.") for k in old_plain)
    (tmp_path / "old").mkdir()
    dist_checkpointing.save(old_sharded, str(tmp_path / "old"))

    def keys(sharded: dict) -> set[str]:
        return {v.key for v in sharded.values() if hasattr(v, "key")}

    ids, _, h0 = _batch()
    with torch.no_grad():
        want = old.eval()(ids, num_iterations=3, initial_state=h0)
    for load in ("dist", "plain"):
        new = tiny_model()
        perturb_(new, seed=1)
        assert keys(new.sharded_state_dict()) == keys(old_sharded)
        if load == "dist":
            new.load_state_dict(dist_checkpointing.load(new.sharded_state_dict(),
                                                        str(tmp_path / "old")))
        else:
            result = new.load_state_dict(old_plain, strict=False)  # tensors only
            assert not result.unexpected_keys
            assert all(k.endswith("_extra_state") for k in result.missing_keys)
        with torch.no_grad():
            got = new.eval()(ids, num_iterations=3, initial_state=h0)
        assert torch.equal(got, want), load


def test_per_sequence_depths_match_single_sequences_and_truncated_backprop(megatron_single):
    model = tiny_model()
    perturb_(model)
    model.train()
    ids, labels, h0 = _batch()
    depths = DepthSample(torch.tensor([1, 3, 6, 2]), torch.tensor([1, 2, 2, 2]))
    model.zero_grad()
    loss = model(ids, labels=labels, depths=depths, initial_state=h0)
    loss.sum().backward()
    batch_grads = _grads(model)
    assert model.pop_loop_stats().executed_iterations == 12  # Σ T_i: compaction

    alone_grads: dict[str, torch.Tensor] = {}
    for i in range(4):
        T, k = int(depths.total[i]), int(depths.grad[i])
        model.zero_grad()
        ref = _reference_loss(model, ids[i:i + 1], labels[i:i + 1], h0[:, i:i + 1], T, k)
        assert torch.allclose(loss[i], ref[0], atol=1e-5, rtol=1e-5), i
        ref.sum().backward()
        for n, g in _grads(model).items():
            alone_grads[n] = alone_grads.get(n, 0) + g
    assert batch_grads.keys() == alone_grads.keys()
    for n, g in batch_grads.items():
        assert torch.allclose(g, alone_grads[n], atol=1e-5, rtol=1e-4), n

    # Teeth: full backprop through all T_i iterations gives different gradients.
    model.zero_grad()
    full = DepthSample(depths.total, depths.total)
    model(ids, labels=labels, depths=full, initial_state=h0).sum().backward()
    diff = max(float((g - batch_grads[n]).abs().max()) for n, g in _grads(model).items())
    assert diff > 1e-4


def test_compaction_equals_masking(megatron_single):
    model = tiny_model()
    perturb_(model, seed=3)
    model.train()
    ids, labels, h0 = _batch(b=6, seed=1)
    depths = DepthSample(torch.tensor([5, 1, 3, 7, 2, 4]), torch.tensor([2, 1, 2, 2, 2, 2]))
    results = {}
    for mode in ("compact", "masked"):
        model.config.loop_execution = mode
        model.zero_grad()
        loss = model(ids, labels=labels, depths=depths, initial_state=h0)
        loss.sum().backward()
        results[mode] = (loss.detach(), _grads(model), model.pop_loop_stats())
    model.config.loop_execution = "compact"
    (lc, gc, sc), (lm, gm, sm) = results["compact"], results["masked"]
    assert torch.allclose(lc, lm, atol=1e-6, rtol=1e-5)
    for n in gc:
        assert torch.allclose(gc[n], gm[n], atol=1e-5, rtol=1e-4), n
    assert sc.executed_iterations == int(depths.total.sum()) == 22
    assert sm.executed_iterations == 6 * (5 + 2)  # b · (max n_i + max k_i)
    assert sc.sampled_iterations == sm.sampled_iterations == 22


def test_eval_uses_fixed_depth_and_no_grad_bookkeeping(megatron_single):
    model = tiny_model()
    model.eval()
    ids, _, _ = _batch(b=2)
    with torch.no_grad():
        logits = model(ids, num_iterations=3)
    assert logits.shape == (2, 12, 512)
    stats = model.pop_loop_stats()
    assert stats.executed_iterations == 6 and stats.max_depth == 3
    with torch.no_grad():
        model(ids)
    assert model.pop_loop_stats().max_depth == model.config.mean_recurrence


def test_bf16_keeps_loop_state_and_injection_fp32(megatron_single):
    model = tiny_model(bf16=True, params_dtype=torch.bfloat16)
    model = model.bfloat16()
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    for p in list(model.injection.parameters()) + list(model.readout.parameters()):
        assert p.dtype == torch.float32
    seen = []
    step = model.injection.step

    def spy(h, prepared):
        u = step(h, prepared)
        seen.append((h.dtype, prepared.drive.dtype, prepared.decay.dtype, u.dtype))
        return u

    model.injection.step = spy
    model.train()
    ids, labels, _ = _batch(b=2)
    loss = model(ids, labels=labels, depths=DepthSample.fixed(2, 3, 2))
    loss.float().mean().backward()
    assert len(seen) == 3
    assert all(dtypes == (torch.float32,) * 4 for dtypes in seen)
    assert model.injection.dt_bias.grad.dtype == torch.float32


def test_transformer_baseline_has_no_loop(megatron_single):
    cfg = preset_config("transformer-tiny")
    model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    assert not model.has_loop and model.coda is None
    ids, labels, _ = _batch(b=2)
    assert model(ids, labels=labels).shape == (2, 12)


def test_state_statistics_recorded(megatron_single):
    model = tiny_model()
    perturb_(model)
    model.record_state_stats = True
    model.train()
    ids, labels, _ = _batch(b=3)
    model(ids, labels=labels, depths=DepthSample(torch.tensor([2, 4, 1]), torch.tensor([2, 2, 1])))
    stats = model.pop_loop_stats()
    assert len(stats.state_norm) == 1 and stats.state_norm[0] > 0
    assert 0 < stats.residual_norm[0] < 10 * stats.state_norm[0]


def test_eval_initial_state_fresh_per_forward_and_reproducible(megatron_single):
    model = tiny_model()
    perturb_(model)
    model.eval()
    ids, _, _ = _batch(b=2)
    with torch.no_grad():
        first, second = model(ids), model(ids)
        assert not torch.equal(first, second)  # h0 redrawn per forward (docs/design.md §4.5)
        model.depth_sampler.eval_draws = 0
        assert torch.equal(model(ids), first)  # ...from a keyed generator: reproducible


def test_initial_state_on_device_keyed_by_step_and_microbatch(megatron_single):
    """h0 comes from the replica's generator on the model's device, reseeded from (seed,
    step, micro-batch): reproducible on resume, fresh per micro-batch and step."""
    model = tiny_model()
    model.train()
    device = next(model.parameters()).device
    x = torch.empty(12, 3, 64, device=device)

    def draw(step: int, skip: int = 0) -> torch.Tensor:
        model.depth_sampler.start_step(step)
        for _ in range(skip):
            model.depth_sampler.next(3)
        return model._depths_and_state(x, None, None, None, None)[1]

    h0 = draw(5)
    assert h0.device == device and h0.dtype == torch.float32 and h0.shape == x.shape
    assert set(model._state_generators) == {device}  # one generator per device, reused
    std = model.config.init_method_std
    assert float(h0.abs().max()) <= 3 * std and 0.5 * std < float(h0.std()) < std
    assert torch.equal(draw(5), h0)  # a resumed run redraws the same state
    assert not torch.equal(draw(6), h0) and not torch.equal(draw(5, skip=1), h0)
