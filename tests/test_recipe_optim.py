"""The authors' optimizer recipe (docs/design.md §6.1) on Megatron: ``parcae_muon`` against the
formulas of tests/test_muon_math.py, the schedules, and the parameter routing of parcae-140m."""

from __future__ import annotations

import math

import pytest
import torch

from parcae_megatron.training import megatron_patches, muon_math, muon_optimizer
from tests.test_muon_math import spec_step


def make_optimizer(params, **kw) -> muon_optimizer.ParcaeMuon:
    return muon_optimizer.ParcaeMuon(
        params, lr=kw.pop("lr", 0.01), momentum=kw.pop("momentum", 0.9), nesterov=True,
        weight_decay=kw.pop("weight_decay", 0.2), fp32_matmul_prec="high", num_ns_steps=5,
        tp_mode="duplicated", ns_dtype=kw.pop("ns_dtype", "fp32"), **kw)


@pytest.mark.parametrize("shape", [(24, 6), (6, 24), (8, 8)], ids=["tall", "wide", "square"])
def test_two_steps_match_the_spec(shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = make_optimizer([p], lr=0.01, momentum=0.9, weight_decay=0.2)
    ref = p.detach().double().clone()
    m = torch.zeros_like(ref)
    v = torch.zeros(shape[0], 1, dtype=torch.float64) if shape[0] >= shape[1] \
        else torch.zeros(1, shape[1], dtype=torch.float64)
    for _ in range(2):  # the second step exercises the momentum and the β₂ EMA
        grad = torch.randn(shape, generator=gen)
        p.grad = grad.clone()
        opt.step()
        ref, m, v = spec_step(ref, grad.double(), m, v, lr=0.01, wd=0.2, mom=0.9)
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-6)
    stored = opt.state[p]["moment2_buffer"].double()  # broadcast to the parameter's shape
    torch.testing.assert_close(stored, v.expand(shape), rtol=1e-4, atol=1e-7)


def test_newton_schulz_dtype_and_megatrons_matmul_precision(monkeypatch):
    """``--muon-ns-dtype`` picks the Polar Express dtype (default bf16, the authors');
    ``--muon-fp32-matmul-prec`` keeps Megatron's meaning: torch's float32 matmul precision
    while the update is computed, restored afterwards."""
    from types import SimpleNamespace

    seen = []
    real = muon_math.polar_express

    def spy(update, steps, dtype):
        seen.append((dtype, torch.get_float32_matmul_precision()))
        return real(update, steps, dtype)

    monkeypatch.setattr(muon_math, "polar_express", spy)
    before = torch.get_float32_matmul_precision()
    for kwargs, dtype in [({}, torch.bfloat16), ({"ns_dtype": "fp32"}, torch.float32)]:
        p = torch.nn.Parameter(torch.randn(8, 4))
        opt = muon_optimizer.ParcaeMuon([p], lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0,
                              fp32_matmul_prec="medium", num_ns_steps=5,
                              tp_mode="duplicated", **kwargs)
        p.grad = torch.randn(8, 4)
        opt.step()
        assert seen.pop() == (dtype, "medium")
        assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="--muon-ns-dtype must be one of bf16, fp32"):
        make_optimizer([torch.nn.Parameter(torch.randn(4, 4))], ns_dtype="fp16")
    # The flag reaches the optimizer through Megatron's config (recipe_optimizer_config).
    config = SimpleNamespace(muon_beta2=0.95, muon_ns_dtype="fp32")
    monkeypatch.setattr(muon_optimizer, "_muon_config_to_kwargs", lambda *a: {})
    to_kwargs = muon_optimizer._parcae_muon_config_to_kwargs
    assert to_kwargs(config, [], None)["ns_dtype"] == "fp32"
    assert to_kwargs(SimpleNamespace(), [], None)["ns_dtype"] == "bf16"


def test_cautious_mask_decays_only_where_signs_agree():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, 6, generator=gen))
    grad = torch.randn(6, 6, generator=gen)
    with_wd, without_wd = (torch.nn.Parameter(p.detach().clone()) for _ in range(2))
    for param, wd in ((with_wd, 0.5), (without_wd, 0.0)):
        opt = make_optimizer([param], lr=0.1, momentum=0.0, weight_decay=wd)
        param.grad = grad.clone()
        opt.step()
    update = (p.detach() - without_wd.detach()) / 0.1        # U (multiplier 1: square)
    decay = (without_wd.detach() - with_wd.detach()) / 0.1    # wd·p·mask
    mask = update * p.detach() >= 0
    assert 0 < int(mask.sum()) < 36  # both cases occur
    torch.testing.assert_close(decay[mask], 0.5 * p.detach()[mask], rtol=1e-4, atol=1e-6)
    assert decay[~mask].abs().max() == 0


def test_fused_qkv_is_three_matrices():
    """q, k, v of a fused QKV (interleaved per query group) update like separate matrices."""
    gen = torch.Generator().manual_seed(2)
    split, groups, cols = [4, 2, 2], 2, 4
    fused = torch.nn.Parameter(torch.randn(groups * 8, cols, generator=gen))
    fused.is_qkv, fused.qkv_split_shapes = True, split
    opt = make_optimizer([fused], split_qkv=True)
    parts = [torch.nn.Parameter(t.reshape(-1, cols).clone()) for t in
             fused.detach().view(groups, 8, cols).split(split, dim=1)]
    singles = [make_optimizer([part]) for part in parts]
    for _ in range(2):  # the second step reads the per-piece second moments back
        grad = torch.randn(groups * 8, cols, generator=gen)
        fused.grad = grad
        opt.step()
        grads = [t.reshape(-1, cols) for t in grad.view(groups, 8, cols).split(split, dim=1)]
        for part, g, single in zip(parts, grads, singles, strict=True):
            part.grad = g.clone()
            single.step()
        got = [t.reshape(-1, cols)
               for t in fused.detach().view(groups, 8, cols).split(split, dim=1)]
        for a, b in zip(got, parts, strict=True):
            torch.testing.assert_close(a, b.detach())


def _scheduler(groups, train_iters=1000, gbs=8):
    # Adam has no "momentum" key: the scheduler must leave such (AdamW) groups alone
    opt = torch.optim.Adam(groups or [{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    return muon_optimizer.RecipeParamScheduler(
        opt, init_lr=0.0, max_lr=1.0, min_lr=0.0, lr_warmup_steps=0,
        lr_decay_steps=train_iters * gbs, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
        wd_incr_steps=train_iters * gbs, wd_incr_style="linear",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False,
        momentum=0.95, momentum_warmup_start=0.85, momentum_warmup_iters=300,
        samples_per_iteration=gbs), opt


def test_momentum_warmup_and_weight_decay_schedule():
    muon_group = {"params": [torch.nn.Parameter(torch.zeros(2, 2))], "momentum": 0.0,
                  "start_wd": 0.2, "end_wd": 0.0}
    adam_group = {"params": [torch.nn.Parameter(torch.zeros(2))], "wd_mult": 0.0}
    sched, opt = _scheduler([muon_group, adam_group])
    muon_g, adam_g = opt.param_groups
    seen = {}
    for step in range(1001):
        if step in (0, 150, 300, 301, 500, 1000):
            seen[step] = (muon_g["momentum"], muon_g["weight_decay"], adam_g["weight_decay"])
        sched.step(8)  # Megatron advances the scheduler by the global batch
    for step, (momentum, wd, adam_wd) in seen.items():
        assert momentum == pytest.approx(0.85 + min(step / 300, 1.0) * (0.95 - 0.85))
        assert wd == pytest.approx(0.2 * (1 - step / 1000))
        assert adam_wd == 0.0
        assert "momentum" not in adam_g
    assert seen[150][0] == pytest.approx(0.90) and seen[301][0] == pytest.approx(0.95)


# parcae-140m: every parameter -> (optimizer, peak LR, LR multiplier per matrix, wd at step 0)
_LAYER = {
    "input_layernorm.weight": ("adam", 6e-3, 1.0, 0.0),
    "self_attention.linear_qkv.weight": ("muon", 8e-3, 1.0, 0.2),  # q, k, v: 768×768 each
    "self_attention.linear_proj.weight": ("muon", 8e-3, 1.0, 0.2),
    "pre_mlp_layernorm.weight": ("adam", 6e-3, 1.0, 0.0),
    "mlp.linear_fc1.weight": ("muon", 8e-3, 2.0, 0.2),  # 3072×768: √4
    "mlp.linear_fc2.weight": ("muon", 8e-3, 1.0, 0.2),
}
_VE = {
    "self_attention.value_embedding.weight": ("adam", 6e-3, 1.0, 0.0),
    # W_g is 2-D: Muon in the authors' code (their paper's table says AdamW; code followed)
    "self_attention.value_embedding.gate_weight": ("muon", 8e-3, 1.0, 0.2),
}
EXPECTED_140M = {
    "embedding.word_embeddings.weight": ("adam", 6e-3, 1.0, 0.0),
    **{f"{stack}.layers.{i}.{name}": row for stack in ("prelude", "recurrent", "coda")
       for i in (0, 1) for name, row in _LAYER.items()},
    **{f"{stack}.layers.1.{name}": row for stack in ("prelude", "recurrent", "coda")
       for name, row in _VE.items()},
    "prelude_norm.weight": ("adam", 6e-3, 1.0, 0.0),
    "injection.A_log": ("adam", 6e-3, 1.0, 0.0),
    "injection.dt_bias": ("adam", 6e-3, 1.0, 0.0),
    "injection.B": ("adam", 6e-3, 1.0, 0.0),
    "readout.weight": ("adam", 6e-3, 1.0, 0.0),
    "final_norm.weight": ("adam", 6e-3, 1.0, 0.0),
}


def _groups_140m(decoupled_lr=None):
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    from parcae_megatron.describe import build_on_meta
    from parcae_megatron.model import preset_config

    megatron_patches.register_parcae_muon()
    model = build_on_meta(preset_config("parcae-140m"))
    config = OptimizerConfig(optimizer="parcae_muon", lr=6e-3, min_lr=0.0, weight_decay=0.0,
                             muon_tp_mode="duplicated", muon_nesterov=True,
                             decoupled_lr=decoupled_lr)
    overrides = muon_optimizer.recipe_overrides(get_standard_config_overrides(config), muon_lr=8e-3,
                                      muon_start_wd=0.2, muon_end_wd=0.0)
    optimizer = get_megatron_optimizer(config, [model], config_overrides=overrides)
    sched, _ = _scheduler([], train_iters=100)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return model, group_of, sched


def test_parcae_140m_parameter_groups():
    model, group_of, sched = _groups_140m()
    table = {}
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        kind = group.get("optimizer", "muon")
        split = getattr(p, "qkv_split_shapes", None) if getattr(p, "is_qkv", False) else None
        mults = {1.0}
        if kind == "muon":
            pieces = muon_math.matrix_pieces(tuple(p.shape), split)
            mults = {muon_math.lr_multiplier(*s) for s in pieces}
        assert len(mults) == 1
        wd = sched.get_wd(group) * group["wd_mult"]
        table[name] = (kind, group["max_lr"], mults.pop(), round(wd, 12))
    assert table == EXPECTED_140M


def test_decoupled_lr_reaches_embeddings_only():
    model, group_of, _ = _groups_140m(decoupled_lr=1e-3)
    decoupled = {n for n, p in model.named_parameters() if group_of[id(p)]["max_lr"] == 1e-3}
    assert decoupled == {"embedding.word_embeddings.weight",
                         *(f"{s}.layers.1.self_attention.value_embedding.weight"
                           for s in ("prelude", "recurrent", "coda"))}


RECIPE_FLAGS = ["--optimizer", "parcae_muon", "--muon-lr", "3e-3", "--muon-tp-mode", "duplicated",
                "--weight-decay-incr-style", "linear", "--start-weight-decay", "0",
                "--end-weight-decay", "0", "--muon-start-weight-decay", "0.2",
                "--muon-end-weight-decay", "0", "--muon-momentum-warmup-iters", "300",
                "--packing", "bestfit"]


@pytest.mark.slow
def test_trainer_runs_the_recipe(tmp_path):
    """The paper configs' optimizer and packing through the real entry point (the tiny CPU
    config keeps the previous optimizer, see docs/recipe.md)."""
    from tests.training_runs import TINY, records, train

    out = tmp_path / "t.jsonl"
    train(1, *TINY, *RECIPE_FLAGS, "--train-iters", "3", "--eval-interval", "100",
          "--telemetry-path", str(out))
    steps = records(out, "train")
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and not r["skipped"]
               for r in steps)
