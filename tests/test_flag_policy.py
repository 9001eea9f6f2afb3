"""Megatron flags: each one either works or is refused in validation (one `error:` line naming
it, exit 2); fusions adapt to missing kernels; FP8 is safe for a looped model by construction.

Validation runs in-process through ``parse_args_or_exit`` (what ``--validate-only`` and every
start run); one refusal also goes through the real entry point without ``--validate-only`` to
show that nothing is trained.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from parcae_megatron.training import fusions, megatron_patches
from parcae_megatron.training.arguments import parcae_config_from_args
from parcae_megatron.training.config_expansion import BLOCK_ARGS
from parcae_megatron.training.validation import parse_args_or_exit
from tests.distributed import ROOT
from tests.training_runs import train

# What train.main prepends when the CPU backend activates (no --no-gradient-accumulation-fusion:
# the fusion is switched off by detection, as on a GPU without APEX; no
# --use-cpu-initialization: the GPU init path runs there too).
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo"]
DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511"]
TINY = ["--config", str(ROOT / "configs/parcae-tiny-cpu.yaml"), *DATA]
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def parse(monkeypatch, *argv: str):
    """``parse_args_or_exit`` as rank 0 of 1; Megatron's globals are reset afterwards."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import destroy_global_vars

    monkeypatch.setattr(sys, "argv", ["parcae_megatron.train"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    megatron_patches.install("check", list(argv))
    try:
        return parse_args_or_exit(list(argv))
    finally:
        destroy_global_vars()
        destroy_num_microbatches_calculator()


def refused(monkeypatch, capsys, *argv: str) -> str:
    """Assert ``argv`` is refused with exit 2 and exactly one `error:` line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        parse(monkeypatch, *argv)
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flags, named", [
    (["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights"),
    (["--num-experts", "4"], "--num-experts"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers"),
    (["--multi-latent-attention"], "--multi-latent-attention"),
    (["--context-parallel-size", "2"], "--context-parallel-size"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "--num-layers-per-virtual-pipeline-stage"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], "--num-virtual-stages-per-pipeline-rank"),
    (["--pipeline-model-parallel-layout", "Et|tL"], "--pipeline-model-parallel-layout"),
    (["--decoder-first-pipeline-num-layers", "1"], "--decoder-first-pipeline-num-layers"),
    (["--decoder-last-pipeline-num-layers", "1"], "--decoder-last-pipeline-num-layers"),
    (["--account-for-embedding-in-pipeline-split"], "--account-for-embedding-in-pipeline-split"),
    (["--account-for-loss-in-pipeline-split"], "--account-for-loss-in-pipeline-split"),
    (["--cuda-graph-impl", "local"], "--cuda-graph-impl"),
    (["--enable-cuda-graph"], "--enable-cuda-graph"),
    (["--external-cuda-graph"], "--external-cuda-graph"),
    (["--init-method-std", "0.02"], "--init-method-std"),
    (["--init-method-xavier-uniform"], "--init-method-xavier-uniform"),
    (["--embedding-init-method-std", "0.02"], "--embedding-init-method-std"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
    (["--rotary-percent", "0.5"], "--rotary-percent"),
    (["--rotary-interleaved"], "--rotary-interleaved"),
    (["--rotary-seq-len-interpolation-factor", "2"], "--rotary-seq-len-interpolation-factor"),
    (["--use-rope-scaling"], "--use-rope-scaling"),
    (["--normalization", "LayerNorm"], "--normalization"),
    (["--swiglu"], "--swiglu"),
    (["--squared-relu"], "--squared-relu"),
    (["--quick-geglu"], "--quick-geglu"),
    (["--add-qkv-bias"], "--add-qkv-bias"),
    (["--attention-output-gate"], "--attention-output-gate"),
    (["--softmax-type", "learnable"], "--softmax-type"),
    (["--window-size", "16,0"], "--window-size"),
    (["--qk-l2-norm"], "--qk-l2-norm"),
    (["--apply-residual-connection-post-layernorm"], "--apply-residual-connection-post-layernorm"),
    (["--spec", "my.module", "my_spec"], "--spec"),
    (["--yaml-cfg", "x.yaml"], "--yaml-cfg"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--overlap-grad-reduce"], "--recompute-granularity"),
    (["--first-last-layers-bf16"], "--first-last-layers-bf16"),
    (["--reset-position-ids"], "--reset-position-ids"),
    (["--reset-attention-mask"], "--reset-attention-mask"),
    (["--dataloader-inter-document-masking"], "--dataloader-inter-document-masking"),
    (["--sft"], "--sft"),
    (["--fim-data"], "--fim-data"),
    # FP8/FP4: the local spec has no low-precision GEMMs; delayed scaling needs TP-only amaxes.
    (["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], "--fp8-format"),
    (["--bf16", "--fp4-format", "e2m1"], "--fp4-format"),
    (["--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"],
     "--fp8-recipe delayed"),
    (["--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "e4m3",
      "--fp8-recipe", "custom", "--fp8-quantizer-factory", "x.y"], "--fp8-recipe custom"),
    (["--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
      "--fp8-recipe", "tensorwise", "--seq-length", "60", "--max-position-embeddings", "60"],
     "--seq-length 60"),
    # The loop's checkpoint is not TE's: delayed scaling would see each FP8 iteration twice.
    (["--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
      "--fp8-recipe", "delayed", "--tp-only-amax-red", "--recompute-loop-iterations"],
     "--recompute-loop-iterations"),
    # Userbuffer GEMM overlap needs fixed GEMM shapes; compaction changes them per iteration.
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--tp-comm-overlap"],
     "--tp-comm-overlap"),
    # Long runs: raw step times mislead with sampled depths; CUDA-only tools on the CPU backend.
    (["--log-straggler"], "--log-straggler"),
    (["--inprocess-restart"], "--inprocess-restart"),
    (["--record-memory-history"], "--record-memory-history"),
    (["--profile"], "--profile"),
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler"),
])
def test_unsupported_flag_is_refused(monkeypatch, capsys, flags, named):
    line = refused(monkeypatch, capsys, *CPU_FLAGS, *TINY, *flags)
    assert named in line, line
    assert "is not supported by Parcae" in line or "FP8" in line or "fp8" in line \
        or "fp4" in line, line


@pytest.mark.parametrize("flags, named", [
    (["--straggler-factor", "1.0"], "--straggler-factor 1.0 must be above 1"),
    (["--straggler-window", "-1"], "--straggler-window -1 must be"),
])
def test_bad_straggler_settings_are_refused(monkeypatch, capsys, flags, named):
    assert named in refused(monkeypatch, capsys, *CPU_FLAGS, *TINY, *flags)


def test_pytorch_profiler_with_a_tensorboard_dir_is_accepted_on_cpu(monkeypatch, tmp_path):
    args = parse(monkeypatch, *CPU_FLAGS, *TINY, "--profile", "--use-pytorch-profiler",
                 "--tensorboard-dir", str(tmp_path))
    assert args.profile and args.use_pytorch_profiler


def test_refused_flag_trains_nothing_through_the_entry_point(tmp_path):
    save = tmp_path / "ckpt"
    proc = train(1, *TINY, "--train-iters", "2", "--save", str(save), "--num-experts", "2",
                 check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--num-experts" in errors[0], proc.stderr[-2000:]
    assert "iteration" not in proc.stdout and not save.exists()


def test_output_layer_builds_without_apex_on_the_default_fusion_path(monkeypatch, capsys,
                                                                     megatron_single):
    """No --no-gradient-accumulation-fusion: Megatron's default (fusion on) is detected as
    unavailable, switched off with one log line, and the model's output layer builds."""
    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec

    assert not fusions.apex_wgrad_fusion_available()  # the CPU machine has no APEX
    args = parse(monkeypatch, *CPU_FLAGS, *TINY)
    out = capsys.readouterr().out
    notes = [ln for ln in out.splitlines() if "gradient-accumulation fusion" in ln]
    assert notes == ["parcae: APEX fused_weight_gradient_mlp_cuda not found: "
                     "gradient-accumulation fusion turned off"]
    assert args.gradient_accumulation_fusion is False
    cfg = parcae_config_from_args(args, vocab_size=512)
    model = ParcaeModel(cfg, get_parcae_layer_local_spec(), dp_rank=0, dp_size=1)
    assert model.output_layer.gradient_accumulation_fusion is False


def test_te_layers_keep_fused_wgrad_while_the_output_layer_runs_unfused(monkeypatch, capsys,
                                                                        megatron_single):
    """With Transformer Engine the model config keeps the fusion for TE's own wgrad
    accumulation; Megatron's output layer gets an unfused copy and builds."""
    from megatron.core import tensor_parallel

    from parcae_megatron.model.parcae_model import output_layer_config

    args = parse(monkeypatch, *TINY, "--transformer-impl", "transformer_engine")
    assert args.gradient_accumulation_fusion is True
    assert "Transformer Engine layers keep their fused wgrad" in capsys.readouterr().out
    cfg = parcae_config_from_args(args, vocab_size=512)
    assert cfg.gradient_accumulation_fusion is True
    out_cfg = output_layer_config(cfg)
    assert out_cfg.gradient_accumulation_fusion is False and out_cfg.hidden_size == cfg.hidden_size
    layer = tensor_parallel.ColumnParallelLinear(cfg.hidden_size, 512, config=out_cfg,
                                                 init_method=cfg.init_method, bias=False)
    assert layer.weight.shape == (512, cfg.hidden_size)


def test_rope_fusion_is_on_unless_its_kernel_is_missing(monkeypatch, capsys):
    assert "--no-rope-fusion" not in BLOCK_ARGS
    args = parse(monkeypatch, *CPU_FLAGS, *TINY)
    assert args.apply_rope_fusion is fusions.rope_fusion_available()
    if not HAVE_TE:
        assert "RoPE fusion turned off" in capsys.readouterr().out


@pytest.mark.skipif(not (HAVE_TE and torch.cuda.is_available()),
                    reason="fused RoPE is Transformer Engine's CUDA kernel (GPU only)")
def test_fused_rope_is_the_same_map_as_unfused():
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        fused_apply_rotary_pos_emb,
    )
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    torch.manual_seed(0)
    freqs = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=50000)(128)
    t = torch.randn(128, 2, 4, 64, device="cuda")
    fused = fused_apply_rotary_pos_emb(t, freqs.cuda())
    unfused = _apply_rotary_pos_emb_bshd(t, freqs.cuda(), rotary_interleaved=False)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_fp8_config_passes_validation(monkeypatch):
    """The GPU command line (no CPU flags) of configs/parcae-1.3b-fp8.yaml validates; TE is
    not needed to validate it."""
    args = parse(monkeypatch, "--config", str(ROOT / "configs/parcae-1.3b-fp8.yaml"),
                 *DATA, "--global-batch-size", "8", "--micro-batch-size", "8")
    cfg = parcae_config_from_args(args, vocab_size=512)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.bf16) == ("hybrid", "tensorwise", True)
    assert args.transformer_impl == "transformer_engine"


def test_delayed_fp8_with_tp_only_amax_reduction_is_accepted(monkeypatch):
    args = parse(monkeypatch, *TINY, "--bf16", "--transformer-impl", "transformer_engine",
                 "--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--tp-only-amax-red")
    assert parcae_config_from_args(args, vocab_size=512).tp_only_amax_red is True


def test_current_scaling_fp8_with_loop_recompute_is_accepted(monkeypatch):
    """Current scaling quantises from the tensors' own values: re-running an iteration in the
    backward gives the forward's bits and updates no FP8 state."""
    args = parse(monkeypatch, *TINY, "--bf16", "--transformer-impl", "transformer_engine",
                 "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise",
                 "--recompute-loop-iterations")
    cfg = parcae_config_from_args(args, vocab_size=512)
    assert (cfg.fp8_recipe, cfg.recompute_loop_iterations) == ("tensorwise", True)


def test_dataset_config_carries_megatron_data_flags(monkeypatch):
    from parcae_megatron.training.data import gpt_dataset_config_from_args

    class Tok:
        vocab_size = 511

    args = parse(monkeypatch, *CPU_FLAGS, *TINY, "--eod-mask-loss", "--mid-level-dataset-surplus",
                 "0.01", "--num-dataset-builder-threads", "2")
    cfg = gpt_dataset_config_from_args(args, Tok())
    assert cfg.eod_mask_loss is True and cfg.mid_level_dataset_surplus == 0.01
    assert cfg.num_dataset_builder_threads == 2
    assert (cfg.reset_position_ids, cfg.reset_attention_mask) == (False, False)


@pytest.mark.parametrize("flags", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform",
     "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block",
     "--recompute-num-layers", "1", "--overlap-grad-reduce", "--recompute-loop-iterations"],
    ["--recompute-granularity", "selective", "--recompute-loop-iterations"],
])
def test_recompute_modes_are_accepted(monkeypatch, flags):
    """Value-embedding rows travel as an argument, so every recompute mode is valid
    (tests/test_recompute.py checks the gradients)."""
    args = parse(monkeypatch, *CPU_FLAGS, *TINY, *flags)
    cfg = parcae_config_from_args(args, vocab_size=512)
    assert cfg.recompute_granularity == flags[1]
    assert cfg.recompute_loop_iterations == ("--recompute-loop-iterations" in flags)


# Model structure is an allow-list (flag_policy.SUPPORTED_STRUCTURE).
def test_a_structure_flag_not_on_the_list_is_refused(monkeypatch, capsys):
    line = refused(monkeypatch, capsys, *CPU_FLAGS, *TINY, "--apply-layernorm-1p")
    assert line.startswith("error: --apply-layernorm-1p is not supported by Parcae: "
                           "it changes the model's structure"), line


def test_a_future_structure_flag_is_refused_until_listed(monkeypatch):
    """A flag a future megatron-core adds to a structure group (simulated here) is refused."""
    from parcae_megatron.model.config import ParcaeConfigError
    from parcae_megatron.training import flag_policy
    from parcae_megatron.training.config_expansion import expand_argv
    from parcae_megatron.training.validation import trainer_parser

    megatron_patches.install("check")
    parser = trainer_parser()
    group = next(g for g in parser._action_groups if g.title == "network size")
    group.add_argument("--future-block-variant", type=str, default=None)
    argv = expand_argv([*TINY, "--future-block-variant", "x"])
    with pytest.raises(ParcaeConfigError, match="^--future-block-variant is not supported"):
        flag_policy.refuse_unlisted_structure(parser.parse_args(argv), argv, parser)
    monkeypatch.setattr(flag_policy, "SUPPORTED_STRUCTURE",
                        flag_policy.SUPPORTED_STRUCTURE | {"future_block_variant"})
    flag_policy.refuse_unlisted_structure(parser.parse_args(argv), argv, parser)


def test_every_shipped_config_uses_only_listed_structure_flags():
    from parcae_megatron.training import flag_policy
    from parcae_megatron.training.config_expansion import expand_argv
    from parcae_megatron.training.validation import trainer_parser

    megatron_patches.install("check")
    parser = trainer_parser()
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        argv = expand_argv(["--config", str(config), *DATA])
        flag_policy.refuse_unlisted_structure(parser.parse_args(argv), argv, parser)
