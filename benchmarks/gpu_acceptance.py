"""GPU acceptance run: what the first hour on one GPU must show, in one script.

(a) te_vs_local: logits of the Transformer Engine spec against the local spec on the same
    weights (the local model's state dict loaded into the TE model), at the tiny width and at
    the 1.3B width (1/1/1 layers), bf16, fixed depth and h₀.
(b) step_time: a real training step (Megatron DDP, the authors' parcae_muon on Megatron's
    distributed optimizer, loop-iteration recompute as in configs/parcae-1.3b.yaml) of the
    1.3B shape at micro-batch 8, sequence 2048, in bf16 and in FP8 (hybrid, tensorwise
    current scaling); step time, tokens/s and MFU (docs/design.md §8.1 FLOPs at the step's fixed
    depths T = μ_rec, k = μ_bwd, against the GPU's dense bf16 peak, for FP8 too).
    ``--layers N`` runs N/N/N layers instead of 8/8/8 if memory needs it.
(c) vs_gpt: forward + backward of Parcae (full backprop, no value embeddings) against
    Megatron's ``GPTModel`` with the same width and the same executed layers
    (L_P + T·L_R + L_C), same spec family, bf16.
(d) memory: peak allocated and reserved bytes of (b)'s steps (``torch.cuda.max_memory_*``)
    over ``estimate_memory``'s allocated and reserved totals (the estimate the trainer's
    tooling prints, model/memory.py) for the same shape, bf16 and FP8.
(e) initial_state: (b)'s bf16 step with h₀ drawn on the device against drawn on the host and
    copied, and the draw alone at the 1.3B s·b·d.
(f) fp8_vs_bf16_loss: a few hundred steps of a small model on a learnable synthetic stream
    (a fixed random Markov chain), bf16 and FP8 from the same weights and data; the mean loss
    of the last 20 steps must agree within ``LOSS_RTOL`` (relative).
(g) loop_execution: compacted against masked loop execution at the 1.3B layer proportions
    (8/8/8 layers, μ_rec 8, Poisson depths, micro-batch 8), same depth draws in both modes:
    executed recurrent iterations over the mean sampled depth, the wall-time ratio, and the
    fraction of the iteration saving that reaches wall time (as benchmarks/loop_overhead.py).

Timings (b), (c), (e), (g) use benchmarks/timing.py: one warm-up, then ``repeats`` timed
calls (5 on a GPU), the variants of a comparison alternated (A B A B …) with the ratio taken
pair by pair; a time ``key`` is the median, with ``key_min`` and ``key_max`` beside it. FP8 and
bf16 in (b) are separate runs (each has its own memory peak for (d)), so their ratio is one of
medians.

``--cpu-dry-run`` runs every part at a tiny size on the CPU backend (a minute at most);
parts that need CUDA (Transformer Engine, FP8, device memory) report ``skipped: no CUDA``
with their keys present and null values. The last line is one JSON object.

Usage: python benchmarks/gpu_acceptance.py [--cpu-dry-run] [--layers N] [--loss-steps N]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
import traceback
from dataclasses import asdict, is_dataclass

import torch
from loop_execution import compare_loop_execution
from timing import interleave, measure

from parcae_megatron.model import ParcaeModel, preset_config
from parcae_megatron.model.accounting import count_parameters, flops_per_token
from parcae_megatron.model.config import half_squared_relu
from parcae_megatron.model.depth import DepthSample
from parcae_megatron.model.layer_specs import (
    get_parcae_layer_local_spec,
    get_parcae_layer_te_spec,
    te_available,
)
from parcae_megatron.platform.dist import init_distributed

LOSS_RTOL = 0.02  # (f): |mean FP8 loss − mean bf16 loss| / mean bf16 loss over the last 20 steps
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12,
                   "GB200": 2500e12}
NO_CUDA = "skipped: no CUDA"
NO_TE = "skipped: Transformer Engine not importable"

# Every part's keys and value types; a skipped or failed part keeps them with null values.
SCHEMA: dict[str, dict[str, type]] = {
    "te_vs_local": {"tiny_max_abs_diff": float, "tiny_rel_diff": float,
                    "width_1p3b_max_abs_diff": float, "width_1p3b_rel_diff": float},
    "step_time": {"layers": int, "micro_batch": int, "seq": int, "repeats": int,
                  "bf16_step_s": float, "bf16_step_s_min": float, "bf16_step_s_max": float,
                  "bf16_tokens_per_s": float, "bf16_mfu": float, "fp8_step_s": float,
                  "fp8_step_s_min": float, "fp8_step_s_max": float,
                  "fp8_tokens_per_s": float, "fp8_mfu": float, "fp8_over_bf16_time": float,
                  "flops_per_token": float},
    "vs_gpt": {"executed_layers": int, "micro_batch": int, "seq": int, "repeats": int,
               "gpt_step_s": float, "gpt_step_s_min": float, "gpt_step_s_max": float,
               "parcae_step_s": float, "parcae_step_s_min": float, "parcae_step_s_max": float,
               "parcae_over_gpt": float, "parcae_over_gpt_min": float,
               "parcae_over_gpt_max": float},
    "memory": {f"{p}_{k}": kind for p in ("bf16", "fp8") for k, kind in (
        ("peak_bytes", int), ("estimate_bytes", int), ("peak_over_estimate", float),
        ("reserved_bytes", int), ("reserved_estimate_bytes", int),
        ("reserved_over_estimate", float))},
    "initial_state": {"step_device_h0_s": float, "step_host_h0_s": float,
                      "step_host_over_device": float, "draw_device_s": float,
                      "draw_host_s": float, "draw_host_over_device": float},
    "fp8_vs_bf16_loss": {"steps": int, "bf16_first": float, "bf16_last": float,
                         "fp8_first": float, "fp8_last": float, "rel_diff_last": float,
                         "rtol": float, "agree": bool},
    "loop_execution": {"layers": str, "mean_recurrence": int, "micro_batch": int, "seq": int,
                       "repeats": int, "mean_sampled_depth": float,
                       "compact_over_mean_depth": float, "masked_over_mean_depth": float,
                       "compact_s": float, "compact_s_min": float, "compact_s_max": float,
                       "masked_s": float, "masked_s_min": float, "masked_s_max": float,
                       "masked_over_compact_time": float,
                       "masked_over_compact_time_min": float,
                       "masked_over_compact_time_max": float,
                       "masked_over_compact_iterations": float, "saving_reaching_wall": float,
                       "saving_reaching_wall_min": float, "saving_reaching_wall_max": float},
}


def blank(part: str, status: str) -> dict:
    """The part's keys with null values and a status line."""
    return {"status": status, **{key: None for key in SCHEMA[part]}}


def sync_of(cuda: bool):
    """What the timing helper runs around each timed call: queued kernels charged to it."""
    return torch.cuda.synchronize if cuda else None


class Sizes:
    """Shapes of every part: the real ones on a GPU, tiny ones for the CPU dry run."""

    def __init__(self, dry: bool, layers: int, loss_steps: int) -> None:
        self.dry = dry
        tiny = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                    kv_channels=16, ffn_hidden_size=256, value_embedding_gate_channels=16)
        self.tiny = tiny
        if dry:
            self.wide = tiny
            self.big = dict(tiny, num_prelude_layers=1, num_recurrent_layers=1,
                            num_coda_layers=1)
            self.mb, self.seq, self.te_seq = 2, 32, 32
            self.gpt = dict(tiny, layers=(1, 1, 1), T=2, mb=2, seq=32)
            self.loss = dict(tiny, seq=32, mb=4, steps=loss_steps or 20)
            self.loop = dict(tiny, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                             ffn_hidden_size=128, seq=16, mb=8)
            self.draw_shape = (32, 2, 64)
            self.repeats = 1
        else:
            self.wide = {"preset": "parcae-1.3b"}
            self.big = dict(preset="parcae-1.3b", num_prelude_layers=layers,
                            num_recurrent_layers=layers, num_coda_layers=layers)
            self.mb, self.seq, self.te_seq = 8, 2048, 512
            self.gpt = dict(preset="parcae-1.3b", layers=(2, 2, 2), T=4, mb=8, seq=2048)
            self.loss = dict(vocab_size=4096, hidden_size=256, num_attention_heads=4,
                             num_query_groups=4, kv_channels=64, ffn_hidden_size=1024,
                             seq=256, mb=8, steps=loss_steps or 300)
            self.loop = dict(preset="parcae-1.3b", seq=2048, mb=8)
            self.draw_shape = (2048, 8, 1536)
            self.repeats = 5


def config(shape: dict, **overrides):
    """A ParcaeConfig from a preset name (``preset``) or explicit width, plus overrides."""
    shape = dict(shape)
    for key in ("seq", "mb", "steps", "layers", "T"):
        shape.pop(key, None)
    name = shape.pop("preset", "parcae-tiny")
    return preset_config(name, **{**shape, **overrides})


def precision(cuda: bool, fp8: bool = False) -> dict:
    """bf16 on the GPU (fp32 in the CPU dry run: CPU bf16 kernels are slow and say nothing
    about a GPU); FP8 GEMMs (hybrid, current scaling) inside TE layers when asked."""
    out = dict(bf16=True, params_dtype=torch.bfloat16) if cuda else {}
    if fp8:
        out.update(fp8="hybrid", fp8_recipe="tensorwise")
    return out


def spec_for(cuda: bool):
    return get_parcae_layer_te_spec() if cuda and te_available() else get_parcae_layer_local_spec()


def wrap_bf16(cfg, model):
    """Megatron's bf16 wrapper, as the trainer's get_model applies it."""
    from megatron.core.transformer.module import Float16Module

    return Float16Module(cfg, model) if cfg.bf16 else model


class Trainer:
    """Model + Megatron DDP + parcae_muon on Megatron's distributed optimizer: one real step."""

    def __init__(self, cfg, spec, lr: float = 3e-3) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import (
            OptimizerConfig,
            get_megatron_optimizer,
            get_standard_config_overrides,
        )

        from parcae_megatron.training import megatron_patches, muon_optimizer

        self.cfg = cfg
        # On the device as Megatron's get_model puts it (the loop's own parameters and the
        # value embeddings are allocated on the host first).
        self.model = ParcaeModel(cfg, spec).to(device_of())
        self.model.train()
        self.ddp = DistributedDataParallel(
            config=cfg, module=wrap_bf16(cfg, self.model),
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     use_distributed_optimizer=True))
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = self.ddp.no_sync
        megatron_patches.register_parcae_muon()
        opt = OptimizerConfig(optimizer="parcae_muon", muon_tp_mode="duplicated", lr=lr,
                              min_lr=0.0, weight_decay=0.0, clip_grad=1.0, adam_beta1=0.8,
                              adam_beta2=0.95, adam_eps=1e-10, muon_nesterov=True,
                              bf16=cfg.bf16, params_dtype=cfg.params_dtype,
                              use_distributed_optimizer=True)
        overrides = muon_optimizer.recipe_overrides(get_standard_config_overrides(opt), lr,
                                                    0.0, 0.0)
        self.optimizer = get_megatron_optimizer(opt, [self.ddp], config_overrides=overrides)

    def step(self, ids: torch.Tensor, labels: torch.Tensor, depths: DepthSample | None = None,
             generator: torch.Generator | None = None) -> float:
        """One optimizer step on one micro-batch; the mean loss."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(_iterator, model):
            out = model(ids, labels=labels, depths=depths, generator=generator)

            def loss_func(output):
                loss = output.float().mean()
                return loss, {"loss": loss.detach()}
            return out, loss_func

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        result = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[self.ddp],
            num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
            forward_only=False)
        self.optimizer.step()
        return float(result[0]["loss"])


def device_of() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def tokens(cfg, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device_of())


# --- (a) ------------------------------------------------------------------------------------
def logits_diff(shape: dict, seq: int, batch: int) -> tuple[float, float]:
    """Max |Δ| and ‖Δ‖/‖local‖ of TE against local logits on the local model's weights."""
    cfg = config(shape, seq_length=seq, **precision(True), mean_recurrence=4,
                 mean_backprop_depth=2, num_prelude_layers=1, num_recurrent_layers=1,
                 num_coda_layers=1)
    local_model = ParcaeModel(cfg, get_parcae_layer_local_spec())
    te_model = ParcaeModel(cfg, get_parcae_layer_te_spec())
    # The local spec's separate MLP norm is fused into TE's fc1 (same checkpoint key).
    state = {k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v
             for k, v in local_model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = te_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"TE/local key mismatch: missing {missing}, unexpected {unexpected}")
    local = wrap_bf16(cfg, local_model).cuda().eval()
    te = wrap_bf16(cfg, te_model).cuda().eval()
    ids = tokens(cfg, batch, seq, 0)[:, :-1]
    h0 = torch.randn(seq, batch, cfg.hidden_size, device=ids.device) * cfg.init_method_std
    with torch.no_grad():
        a = local(ids, num_iterations=4, initial_state=h0).float()
        b = te(ids, num_iterations=4, initial_state=h0).float()
    return float((a - b).abs().max()), float((a - b).norm() / a.norm())


def part_te_vs_local(sizes: Sizes, cuda: bool) -> dict:
    if not cuda:
        return blank("te_vs_local", NO_CUDA)
    if not te_available():
        return blank("te_vs_local", NO_TE)
    tiny = logits_diff(sizes.tiny, 64, 2)
    wide = logits_diff(sizes.wide, sizes.te_seq, 2)
    return {"status": "ok", "tiny_max_abs_diff": tiny[0], "tiny_rel_diff": tiny[1],
            "width_1p3b_max_abs_diff": wide[0], "width_1p3b_rel_diff": wide[1]}


# --- (b), (d), (e) ----------------------------------------------------------------------------
def peak_flops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)


def estimate(cfg, sizes: Sizes, fp8: bool) -> tuple[int, int]:
    """Allocated and reserved totals of the trainer's memory estimate (model/memory.py) for
    this shape, on one GPU (DP = 1, one bucket: grad-reduce overlap off, as in ``Trainer``)."""
    from parcae_megatron.model.memory import estimate_memory

    est = estimate_memory(cfg, micro_batch_size=sizes.mb, seq_length=sizes.seq, tp=1, pp=1,
                          dp=1, bf16=True, fp8=fp8, distributed_optimizer=True,
                          recompute_loop_iterations=cfg.recompute_loop_iterations,
                          recompute_granularity=None, optimizer="parcae_muon")
    return int(est.total), int(est.reserved)


def run_shape(sizes: Sizes, cuda: bool, fp8: bool) -> dict:
    """(b) steps of the 1.3B shape in one precision; peak memory; (e) on the bf16 model."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = config(sizes.big, seq_length=sizes.seq, recompute_loop_iterations=True,
                 **precision(cuda, fp8))
    trainer = Trainer(cfg, spec_for(cuda))
    batch = tokens(cfg, sizes.mb, sizes.seq, 1)
    ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    depths = DepthSample.fixed(sizes.mb, cfg.mean_recurrence, cfg.mean_backprop_depth)
    if fp8:
        step = measure(lambda: trainer.step(ids, labels, depths), sizes.repeats,
                       sync=sync_of(cuda))
    else:  # (e): h₀ drawn on the host alternated with the default device draw
        host = torch.Generator()
        h0 = interleave({"device": lambda: trainer.step(ids, labels, depths),
                         "host": lambda: trainer.step(ids, labels, depths, host)},
                        sizes.repeats, sync=sync_of(cuda))
        step = h0.time("device")
    flops = flops_per_token(cfg, count_parameters(trainer.model), sizes.seq)
    tps = sizes.mb * sizes.seq / step.median
    peak = peak_flops()
    out = {"cfg": cfg, "step": step, "tokens_per_s": tps, "flops_per_token": flops,
           "mfu": flops * tps / peak if peak else None,
           "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
           "reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None}
    if not fp8:
        out["h0"] = {"step_device_h0_s": step.median,
                     "step_host_h0_s": h0.time("host").median,
                     "step_host_over_device": h0.ratio("host", "device").median}
    cfg.finalize_model_grads_func = cfg.no_sync_func = None  # the config must not keep DDP
    return out


def part_step_time(sizes: Sizes, cuda: bool) -> tuple[dict, dict, dict]:
    """(b), (d) and (e) share the 1.3B-shape runs."""
    bf16 = run_shape(sizes, cuda, fp8=False)
    fp8_ok = cuda and te_available()
    fp8 = run_shape(sizes, cuda, fp8=True) if fp8_ok else None
    cfg = bf16["cfg"]
    step = {"status": "ok" if fp8_ok else f"fp8 {NO_CUDA if not cuda else NO_TE}",
            "layers": cfg.num_prelude_layers, "micro_batch": sizes.mb, "seq": sizes.seq,
            "repeats": sizes.repeats, **bf16["step"].flat("bf16_step_s"),
            "bf16_tokens_per_s": bf16["tokens_per_s"],
            "bf16_mfu": bf16["mfu"], "flops_per_token": bf16["flops_per_token"],
            **(fp8["step"].flat("fp8_step_s") if fp8 else
               dict.fromkeys(("fp8_step_s", "fp8_step_s_min", "fp8_step_s_max"))),
            "fp8_tokens_per_s": fp8 and fp8["tokens_per_s"], "fp8_mfu": fp8 and fp8["mfu"],
            "fp8_over_bf16_time": fp8 and fp8["step"].median / bf16["step"].median}
    # The estimate is arithmetic (also in the dry run); peaks need device memory.
    memory = blank("memory", "ok" if cuda else f"peaks {NO_CUDA}")
    for name, run in (("bf16", bf16), ("fp8", fp8)):
        est, reserved = estimate(cfg, sizes, fp8=name == "fp8")
        memory.update({f"{name}_estimate_bytes": est,
                       f"{name}_reserved_estimate_bytes": reserved})
        if run is not None and cuda:
            memory.update({f"{name}_peak_bytes": run["peak_bytes"],
                           f"{name}_peak_over_estimate": run["peak_bytes"] / est,
                           f"{name}_reserved_bytes": run["reserved_bytes"],
                           f"{name}_reserved_over_estimate": run["reserved_bytes"] / reserved})
    h0 = bf16["h0"]
    draws = draw_times(sizes, cuda)
    h0.update(draws, status="ok")
    return step, memory, h0


def draw_times(sizes: Sizes, cuda: bool) -> dict:
    """The h₀ draw alone at the 1.3B s·b·d: on the device, and on the host plus the copy."""
    from parcae_megatron.hf.loop_math import truncated_normal_

    dev = device_of()
    dev_gen = torch.Generator(device=dev).manual_seed(3)

    def on_device():
        truncated_normal_(torch.empty(sizes.draw_shape, device=dev), 0.02, dev_gen)

    def on_host():
        truncated_normal_(torch.empty(sizes.draw_shape), 0.02,
                          torch.Generator().manual_seed(3)).to(dev)

    draws = interleave({"device": on_device, "host": on_host}, sizes.repeats,
                       sync=sync_of(cuda))
    return {"draw_device_s": draws.time("device").median,
            "draw_host_s": draws.time("host").median,
            "draw_host_over_device": draws.ratio("host", "device").median}


# --- (c) --------------------------------------------------------------------------------------
def part_vs_gpt(sizes: Sizes, cuda: bool) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    g = sizes.gpt
    lp, lr, lc = g["layers"]
    T = g["T"]
    cfg = config(g, seq_length=g["seq"], num_prelude_layers=lp, num_recurrent_layers=lr,
                 num_coda_layers=lc, mean_recurrence=T, mean_backprop_depth=T,
                 value_embeddings=False, **precision(cuda))
    executed = lp + T * lr + lc
    use_te = cuda and te_available()
    gpt_cfg = TransformerConfig(
        num_layers=executed, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size, normalization="RMSNorm", add_bias_linear=False,
        activation_func=half_squared_relu, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, **precision(cuda))
    spec = (get_gpt_layer_with_transformer_engine_spec() if use_te
            else get_gpt_layer_local_spec(normalization="RMSNorm"))
    gpt = wrap_bf16(gpt_cfg, GPTModel(gpt_cfg, spec, vocab_size=cfg.vocab_size,
                                      max_sequence_length=g["seq"],
                                      position_embedding_type="rope",
                                      share_embeddings_and_output_weights=True))
    parcae = wrap_bf16(cfg, ParcaeModel(cfg, spec_for(cuda)))
    dev = device_of()
    gpt.to(dev).train()
    parcae.to(dev).train()
    batch = tokens(cfg, g["mb"], g["seq"], 2)
    ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    full = DepthSample.fixed(g["mb"], T, T)

    def fwd_bwd(model, **kw):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, labels=labels, **kw).float().mean().backward()
        return run

    steps = interleave({"gpt": fwd_bwd(gpt, position_ids=None, attention_mask=None),
                        "parcae": fwd_bwd(parcae, depths=full)}, sizes.repeats,
                       sync=sync_of(cuda))
    return {"status": "ok" if use_te or not cuda else "ok (local spec: no TE)",
            "executed_layers": executed, "micro_batch": g["mb"], "seq": g["seq"],
            **steps.flat({"gpt": "gpt_step_s", "parcae": "parcae_step_s"}),
            **steps.ratio("parcae", "gpt").flat("parcae_over_gpt")}


# --- (f) --------------------------------------------------------------------------------------
def markov_stream(vocab: int, batch: int, seq: int, steps: int, seed: int = 5):
    """A learnable stream: each token follows a fixed random successor with prob. 0.8."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    for _ in range(steps):
        rows = torch.empty(batch, seq + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        noise = torch.rand(batch, seq, generator=gen) > 0.8
        rand = torch.randint(0, vocab, (batch, seq), generator=gen)
        for t in range(seq):
            rows[:, t + 1] = torch.where(noise[:, t], rand[:, t], successor[rows[:, t]])
        yield rows.to(device_of())


def train_losses(sizes: Sizes, cuda: bool, fp8: bool) -> list[float]:
    s = sizes.loss
    cfg = config(s, seq_length=s["seq"], num_prelude_layers=2, num_recurrent_layers=2,
                 num_coda_layers=2, mean_recurrence=4, mean_backprop_depth=2,
                 **precision(cuda, fp8))
    trainer = Trainer(cfg, spec_for(cuda))
    losses = []
    for step, rows in enumerate(markov_stream(cfg.vocab_size, s["mb"], s["seq"], s["steps"])):
        trainer.model.depth_sampler.start_step(step)  # same depth draws in both runs
        losses.append(trainer.step(rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return losses


def part_fp8_loss(sizes: Sizes, cuda: bool) -> dict:
    bf16 = train_losses(sizes, cuda, fp8=False)
    out = blank("fp8_vs_bf16_loss", NO_CUDA if not cuda else NO_TE)
    tail = min(20, len(bf16))
    out.update(steps=len(bf16), bf16_first=bf16[0], bf16_last=sum(bf16[-tail:]) / tail,
               rtol=LOSS_RTOL)
    if cuda and te_available():
        fp8 = train_losses(sizes, cuda, fp8=True)
        fp8_last = sum(fp8[-tail:]) / tail
        rel = abs(fp8_last - out["bf16_last"]) / out["bf16_last"]
        out.update(status="ok", fp8_first=fp8[0], fp8_last=fp8_last, rel_diff_last=rel,
                   agree=rel <= LOSS_RTOL)
    return out


# --- (g) --------------------------------------------------------------------------------------
def part_loop_execution(sizes: Sizes, cuda: bool) -> dict:
    s = sizes.loop
    cfg = config(s, seq_length=s["seq"], num_prelude_layers=8, num_recurrent_layers=8,
                 num_coda_layers=8, mean_recurrence=8, mean_backprop_depth=4,
                 recompute_loop_iterations=not sizes.dry, **precision(cuda))
    model = wrap_bf16(cfg, ParcaeModel(cfg, spec_for(cuda))).to(device_of()).train()
    batch = tokens(cfg, s["mb"], s["seq"], 4)
    ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    row = compare_loop_execution(model, ids, labels, sizes.repeats, sync=sync_of(cuda))
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return {"status": "ok", "layers": "8/8/8", "mean_recurrence": 8, "micro_batch": s["mb"],
            "seq": s["seq"], **row}


# --------------------------------------------------------------------------------------------
SECONDS: dict[str, float] = {}
"""Wall seconds of each part (reported in the JSON as ``part_seconds``)."""


def guarded(part: str, fn, *args) -> dict:
    """Run one part; an exception keeps the part's keys (null) with the error as its status."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        return fn(*args)
    except Exception as exc:  # one failing part must not hide the others' figures
        traceback.print_exc()
        return blank(part, f"error: {type(exc).__name__}: {exc}")
    finally:
        SECONDS[part] = round(time.perf_counter() - start, 2)
        print(f"[gpu_acceptance] {part}: {SECONDS[part]:.1f} s "
              f"({time.process_time() - cpu:.1f} s CPU)", flush=True)


def jsonable(value):
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every part at a tiny size on the CPU backend (CUDA parts skipped)")
    parser.add_argument("--layers", type=int, default=8,
                        help="layers per stack for (b)/(d)/(e) (1.3B: 8; lower if memory needs)")
    parser.add_argument("--loss-steps", type=int, default=0,
                        help="steps of (f) (default 300 on a GPU, 20 in the dry run)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cpu_dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    init_distributed()
    cuda = torch.cuda.is_available() and not args.cpu_dry_run and device_of().type == "cuda"
    if not args.cpu_dry_run and not cuda:
        raise SystemExit("error: no CUDA device; use --cpu-dry-run on a machine without a GPU")
    sizes = Sizes(args.cpu_dry_run, args.layers, args.loss_steps)
    results: dict = {"benchmark": "gpu_acceptance",
                     "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu",
                     "device": torch.cuda.get_device_name() if cuda else "cpu",
                     "transformer_engine": te_available(),
                     "precision": "bf16" if cuda else "fp32 (dry run: the bf16_* keys are fp32)"}
    results["te_vs_local"] = guarded("te_vs_local", part_te_vs_local, sizes, cuda)
    shared = guarded("step_time", part_step_time, sizes, cuda)
    if isinstance(shared, dict):  # the run failed: every part it feeds gets the error
        shared = tuple(blank(p, shared["status"]) for p in ("step_time", "memory",
                                                              "initial_state"))
    results.update(zip(("step_time", "memory", "initial_state"), shared))
    results["vs_gpt"] = guarded("vs_gpt", part_vs_gpt, sizes, cuda)
    results["fp8_vs_bf16_loss"] = guarded("fp8_vs_bf16_loss", part_fp8_loss, sizes, cuda)
    results["loop_execution"] = guarded("loop_execution", part_loop_execution, sizes, cuda)
    results["part_seconds"] = SECONDS
    results["wall_s"] = time.perf_counter() - start
    for part in SCHEMA:
        row = results[part]
        print(f"({chr(ord('a') + list(SCHEMA).index(part))}) {part:17s} {row['status']}")
        print("      " + "  ".join(f"{k}={fmt(row[k])}" for k in SCHEMA[part]))
    print(json.dumps(results, default=jsonable))


if __name__ == "__main__":
    main()
