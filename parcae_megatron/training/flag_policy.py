"""Which Megatron flags a Parcae run refuses, and why (the table ``REFUSALS``).

Megatron-LM's command line describes a GPTModel; ``ParcaeModel`` is built from the same
arguments but fixes its block (docs/design.md §2.2), its initialisation (docs/design.md §5) and
its layout (the loop on one pipeline stage). A flag it cannot honour is refused here, before
Megatron's own validation and before any rank starts, with one message naming the flag — never
silently ignored. Kernel fusions that need a missing extension are adapted in
``fusions.py``.

Model structure is an allow-list: a flag that shapes the model (``structure_flags``) given a
value other than its default is refused unless it is in ``SUPPORTED_STRUCTURE``, so a
structure flag a future megatron-core adds is refused until someone lists it.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from parcae_megatron.model.config import ParcaeConfigError

_PIPELINE = "the loop must stay on one stage: place stages with --parcae-pipeline-layout"
_BLOCK = "the Parcae block (docs/design.md §2.2) is fixed, and checkpoints / HF export assume it"
_CUDA_GRAPHS = ("CUDA graphs need static shapes and call counts; the loop's depth and "
                "compacted batch change every micro-batch")
# With delayed scaling Transformer Engine all-reduces amaxes over the amax group (TP x DP by
# default) when an FP8 region exits; every TransformerBlock call is a region, and loop call
# counts differ between data-parallel replicas (depths are drawn per replica).
_FP8_DELAYED = ("delayed scaling reduces amaxes over TP x DP at every FP8 region exit and "
                "loop call counts differ between data-parallel replicas (mismatched "
                "collectives); use --fp8-recipe tensorwise (current scaling) or add "
                "--tp-only-amax-red")

# The loop's checkpoint is torch.utils.checkpoint: its backward re-runs the iteration's FP8
# region outside Transformer Engine's recompute phase. Current and block scaling quantise from
# the tensors' own values, so the re-run gives the forward's bits and updates no state; delayed
# scaling would record the iteration's amaxes twice and re-run with scales updated since.
_FP8_LOOP_RECOMPUTE = ("the loop's checkpoint re-runs each iteration's FP8 region outside "
                       "Transformer Engine's recompute phase, which with delayed scaling "
                       "records amaxes twice and recomputes with other scales; use "
                       "--fp8-recipe tensorwise (current scaling) or drop "
                       "--recompute-loop-iterations")


@dataclass(frozen=True)
class Refusal:
    """A Megatron flag ParcaeModel cannot honour, and why."""

    flag: str
    applies: Callable[[argparse.Namespace, Callable[[str], bool]], bool]
    reason: str


def _set(name: str) -> Callable:
    return lambda args, given: bool(getattr(args, name, None))


def _given(flag: str) -> Callable:
    return lambda args, given: given(flag)


REFUSALS: tuple[Refusal, ...] = (
    # Model structure.
    Refusal("--untie-embeddings-and-output-weights", _set("untie_embeddings_and_output_weights"),
            "Parcae ties the input embedding and the output layer"),
    Refusal("--num-experts", _set("num_experts"), "mixture-of-experts layers are not "
            "part of the Parcae block"),
    Refusal("--mtp-num-layers", _set("mtp_num_layers"), "multi-token prediction is not "
            "supported by ParcaeModel"),
    Refusal("--multi-latent-attention", _set("multi_latent_attention"), _BLOCK),
    Refusal("--experimental-attention-variant", _set("experimental_attention_variant"), _BLOCK),
    Refusal("--heterogeneous-layers-config-path", _set("heterogeneous_layers_config_path"),
            _BLOCK),
    Refusal("--heterogeneous-layers-config-encoded-json",
            _set("heterogeneous_layers_config_encoded_json"), _BLOCK),
    Refusal("--normalization", lambda a, g: a.normalization != "RMSNorm",
            f"Parcae uses RMSNorm; {_BLOCK}"),
    Refusal("--swiglu", _set("swiglu"), f"the Parcae MLP is 0.5·ReLU²; {_BLOCK}"),
    Refusal("--squared-relu", _set("squared_relu"), f"the Parcae MLP is 0.5·ReLU²; {_BLOCK}"),
    Refusal("--quick-geglu", _set("quick_geglu"), f"the Parcae MLP is 0.5·ReLU²; {_BLOCK}"),
    Refusal("--add-qkv-bias", _set("add_qkv_bias"), f"Parcae linears have no bias; {_BLOCK}"),
    Refusal("--attention-output-gate", _set("attention_output_gate"), _BLOCK),
    Refusal("--softmax-type", lambda a, g: a.softmax_type != "vanilla", _BLOCK),
    Refusal("--window-size", _set("window_size"), f"Parcae attention is fully causal; {_BLOCK}"),
    Refusal("--qk-l2-norm", _set("qk_l2_norm"), f"Parcae's QK-norm is RMS; {_BLOCK}"),
    Refusal("--apply-residual-connection-post-layernorm",
            _set("apply_residual_connection_post_layernorm"), f"Parcae is pre-norm; {_BLOCK}"),
    Refusal("--spec", _set("spec"), "the layer spec is chosen by --transformer-impl "
            "(parcae_megatron.model.layer_specs); a custom spec would be ignored"),
    # Position embedding: ParcaeModel always builds full rotate-half RoPE.
    Refusal("--position-embedding-type", lambda a, g: a.position_embedding_type != "rope",
            "ParcaeModel always uses rotary position embeddings"),
    Refusal("--rotary-percent", lambda a, g: a.rotary_percent != 1.0,
            "ParcaeModel rotates the whole head dimension"),
    Refusal("--rotary-interleaved", _set("rotary_interleaved"),
            "Parcae's RoPE is rotate-half (checkpoints and HF export assume it)"),
    Refusal("--rotary-seq-len-interpolation-factor",
            _set("rotary_seq_len_interpolation_factor"), "ParcaeModel does not scale RoPE"),
    Refusal("--use-rope-scaling", _set("use_rope_scaling"), "ParcaeModel does not scale RoPE"),
    # Initialisation (docs/design.md §5) is fixed by ParcaeConfig.
    Refusal("--init-method-std", _given("--init-method-std"),
            "Parcae initialises every matrix with std sqrt(2 / (5 · hidden size)) "
            "(docs/design.md §5); "
            "the value would be overwritten"),
    Refusal("--init-method-xavier-uniform", _set("init_method_xavier_uniform"),
            "Parcae's initialisation is fixed (docs/design.md §5)"),
    Refusal("--embedding-init-method-std", _set("embedding_init_method_std"),
            "Parcae's initialisation is fixed (docs/design.md §5)"),
    # Parallelism.
    Refusal("--context-parallel-size", lambda a, g: a.context_parallel_size > 1,
            "context parallelism is not supported: the batch is never sharded along the "
            "sequence for it"),
    Refusal("--hierarchical-context-parallel-sizes",
            _set("hierarchical_context_parallel_sizes"), "context parallelism is not supported"),
    Refusal("--hybrid-context-parallel", _set("hybrid_context_parallel"),
            "context parallelism is not supported"),
    Refusal("--num-layers-per-virtual-pipeline-stage",
            _set("num_layers_per_virtual_pipeline_stage"),
            f"virtual pipeline stages are not supported; {_PIPELINE}"),
    Refusal("--num-virtual-stages-per-pipeline-rank", _set("num_virtual_stages_per_pipeline_rank"),
            f"virtual pipeline stages are not supported; {_PIPELINE}"),
    Refusal("--pipeline-model-parallel-layout", _set("pipeline_model_parallel_layout"),
            _PIPELINE),
    Refusal("--decoder-first-pipeline-num-layers", _set("decoder_first_pipeline_num_layers"),
            _PIPELINE),
    Refusal("--decoder-last-pipeline-num-layers", _set("decoder_last_pipeline_num_layers"),
            _PIPELINE),
    Refusal("--account-for-embedding-in-pipeline-split",
            _set("account_for_embedding_in_pipeline_split"), _PIPELINE),
    Refusal("--account-for-loss-in-pipeline-split", _set("account_for_loss_in_pipeline_split"),
            _PIPELINE),
    # Megatron's full recompute is reentrant: one backward per recurrent-block call, so DDP's
    # grad-ready hook of a shared loop weight fires once per call and the count follows the
    # sampled depths; an overlapped reduce could start before the last contribution.
    Refusal("--recompute-granularity",
            lambda a, g: (a.recompute_granularity == "full" and a.overlap_grad_reduce
                          and bool(a.num_recurrent_layers)
                          and not a.recompute_loop_iterations),
            "full recompute with --overlap-grad-reduce needs --recompute-loop-iterations "
            "(the loop's layers are then recomputed per iteration inside one backward)"),
    # TE's userbuffer GEMM overlap allocates its communication buffers once, for a fixed
    # [seq × micro-batch, d] input; compaction runs the loop on sub-batches of any size.
    Refusal("--tp-comm-overlap", _set("tp_comm_overlap"),
            "Transformer Engine's userbuffers are sized for a fixed [seq x micro-batch, hidden] "
            "GEMM input, and compaction runs the loop's GEMMs on sub-batches of any size "
            "(with --loop-execution masked the shapes are fixed, but that path has never run "
            "on a GPU: use plain --sequence-parallel)"),
    # CUDA graphs (0.19 names; --enable-cuda-graph / --external-cuda-graph are deprecated).
    Refusal("--cuda-graph-impl", lambda a, g: a.cuda_graph_impl != "none", _CUDA_GRAPHS),
    Refusal("--enable-cuda-graph", _set("enable_cuda_graph"), _CUDA_GRAPHS),
    Refusal("--external-cuda-graph", _set("external_cuda_graph"), _CUDA_GRAPHS),
    # Low precision: layer-selective BF16 counts layers per TransformerBlock (per stack here).
    Refusal("--first-last-layers-bf16", _set("first_last_layers_bf16"),
            "ParcaeModel's prelude, loop and coda are separate blocks, so 'first/last layers' "
            "would be counted per block"),
    # Data: the model takes causal attention over whole sequences and positions 0..s-1.
    Refusal("--reset-position-ids", _set("reset_position_ids"),
            "ParcaeModel applies RoPE at positions 0..s-1 of every sequence and ignores "
            "per-document position ids"),
    Refusal("--reset-attention-mask", _set("reset_attention_mask"),
            "ParcaeModel uses a causal attention kernel and takes no per-document mask"),
    Refusal("--dataloader-inter-document-masking", _set("dataloader_inter_document_masking"),
            "ParcaeModel attends across document boundaries (no packed-sequence masks)"),
    Refusal("--sft", _set("sft"), "the Parcae datasets provider builds GPT pretraining data"),
    Refusal("--fim-data", _set("fim_data"),
            "the Parcae datasets provider builds GPT pretraining data"),
    # Long runs.
    Refusal("--log-straggler", _set("log_straggler"),
            "it compares raw per-rank step times, and a rank's step time follows the loop "
            "depths it sampled (depth imbalance reads as slow hardware); Parcae's straggler "
            "report compares time per executed FLOP (--straggler-window, --straggler-factor)"),
    Refusal("--inprocess-restart", _set("inprocess_restart"),
            "it needs nvidia-resiliency-ext and has never run with Parcae; a failed rank ends "
            "the job and the launcher restarts it from the last checkpoint"),
    Refusal("--record-memory-history", lambda a, g: a.record_memory_history and _cpu(a),
            "it records the CUDA caching allocator, and this run is on the CPU backend"),
    Refusal("--profile", lambda a, g: a.profile and not a.use_pytorch_profiler and _cpu(a),
            "without --use-pytorch-profiler it drives the CUDA profiler (nsys), and this run "
            "is on the CPU backend"),
    Refusal("--use-pytorch-profiler",
            lambda a, g: a.profile and a.use_pytorch_profiler and not a.tensorboard_dir,
            "Megatron writes the trace next to the TensorBoard directory "
            "(TENSORBOARD_DIR/../torch_profile): give --tensorboard-dir"),
)


# Megatron's argument groups that only describe the model's structure.
STRUCTURE_GROUPS = ("network size", "moe", "mla", "experimental_attention_variant",
                    "heterogeneous architecture")
# In Megatron's "transformer configuration" group (every TransformerConfig field, most of them
# parallelism, precision, fusion or recompute settings), the fields that shape the model.
_STRUCTURE_PREFIXES = ("moe_", "mtp_", "dsa_", "linear_", "mamba_", "mup_")
_STRUCTURE_FIELDS = frozenset({
    "num_layers", "hidden_size", "num_attention_heads", "softmax_type", "num_query_groups",
    "ffn_hidden_size", "kv_channels", "fp32_residual_connection",
    "apply_residual_connection_post_layernorm", "layernorm_epsilon",
    "layernorm_zero_centered_gamma", "add_bias_linear", "add_qkv_bias", "glu_linear_offset",
    "activation_func_clamp_value", "rotary_interleaved", "normalization", "qk_layernorm",
    "qk_l2_norm", "attention_output_gate", "multi_latent_attention",
    "experimental_attention_variant", "apply_query_key_layer_scaling", "use_mup",
    "is_hybrid_model", "mrope_section"})
# The structure flags ParcaeModel honours (REFUSALS still apply to some of their values).
SUPPORTED_STRUCTURE = frozenset({
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "group_query_attention", "kv_channels", "layernorm_epsilon", "normalization",
    "qk_layernorm", "add_bias_linear", "position_embedding_type", "rotary_base",
    "max_position_embeddings", "make_vocab_size_divisible_by", "fp32_residual_connection"})


def structure_flags(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """``dest -> option strings`` of every flag of ``parser`` that shapes the model."""
    flags: dict[str, list[str]] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            dest = action.dest
            structural = group.title in STRUCTURE_GROUPS or (
                group.title == "transformer configuration"
                and (dest in _STRUCTURE_FIELDS or dest.startswith(_STRUCTURE_PREFIXES)))
            if action.option_strings and structural:
                flags.setdefault(dest, []).extend(action.option_strings)
    return flags


def refuse_unlisted_structure(args: argparse.Namespace, argv: list[str],
                              parser: argparse.ArgumentParser) -> None:
    """Raise ``ParcaeConfigError`` naming the first structure flag set to a value other than
    its default that is not in ``SUPPORTED_STRUCTURE`` (run after ``refuse_unsupported``, whose
    messages come first)."""
    defaults = vars(parser.parse_args([]))  # per dest (two flags may share one)
    for dest, options in structure_flags(parser).items():
        if dest in SUPPORTED_STRUCTURE or getattr(args, dest, None) == defaults.get(dest):
            continue
        given = [o for o in options if any(a == o or a.startswith(o + "=") for a in argv)]
        raise ParcaeConfigError(f"{(given or options)[0]} is not supported by Parcae: it "
                                f"changes the model's structure, and {_BLOCK}")


def _cpu(args: argparse.Namespace) -> bool:
    """The run is on the CPU backend (train.main makes it gloo there)."""
    return args.distributed_backend == "gloo"


def check_straggler_report(args: argparse.Namespace) -> None:
    """``--straggler-factor`` must be a factor above 1 and the window a step count."""
    factor, window = getattr(args, "straggler_factor", 1.2), getattr(args, "straggler_window", 0)
    if factor <= 1.0:
        raise ParcaeConfigError(f"--straggler-factor {factor} must be above 1 "
                                "(a factor over the median time per executed FLOP)")
    if window < 0:
        raise ParcaeConfigError(f"--straggler-window {window} must be a number "
                                "of steps (0: no straggler report)")


def refuse_before_parsing(argv: list[str]) -> None:
    """Flags Megatron acts on while parsing: ``--yaml-cfg`` replaces the whole command line."""
    if any(a == "--yaml-cfg" or a.startswith("--yaml-cfg=") for a in argv):
        raise ParcaeConfigError("--yaml-cfg is not supported by Parcae: use --config "
                                "(a YAML of flags, expanded before parsing)")


def refuse_unsupported(args: argparse.Namespace, argv: list[str]) -> None:
    """Raise ``ParcaeConfigError`` naming the first flag ParcaeModel cannot honour.

    ``argv`` is the expanded command line (config, preset and flags), used for flags whose
    presence matters rather than their value.
    """
    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    for refusal in REFUSALS:
        if refusal.applies(args, given):
            raise ParcaeConfigError(f"{refusal.flag} is not supported by Parcae: "
                                    f"{refusal.reason}")
    check_low_precision(args)
    check_straggler_report(args)
    check_async_save(args)


def check_async_save(args: argparse.Namespace) -> None:
    """``--async-save`` as Megatron-LM 0.19.2 runs it: torch_dist checkpoints written by the
    persistent writer, with a writer strategy that is installed. Megatron itself would drop
    the flag without a word (no persistent worker), or fail at the first save or at start."""
    if not getattr(args, "async_save", False):
        return
    if args.ckpt_format != "torch_dist":
        raise ParcaeConfigError(f"--async-save needs --ckpt-format torch_dist (not "
                                f"{args.ckpt_format}): Megatron writes only distributed "
                                "checkpoints asynchronously")
    if not args.use_persistent_ckpt_worker:
        raise ParcaeConfigError("--async-save needs --use-persistent-ckpt-worker: without it "
                                "Megatron-LM ignores --async-save and saves synchronously")
    if args.async_strategy == "nvrx" and importlib.util.find_spec(
            "nvidia_resiliency_ext") is None:
        raise ParcaeConfigError("--async-save with --async-strategy nvrx (Megatron's default) "
                                "needs nvidia-resiliency-ext, which is not installed: pass "
                                "--async-strategy mcore (Megatron-Core's own writer)")


def check_low_precision(args: argparse.Namespace) -> None:
    """FP8/FP4 must run on Transformer Engine layers and be safe for a looped model.

    Current scaling (``tensorwise``) and block scaling (``blockwise``, ``mxfp8``) quantise
    each tensor from its own values and reduce nothing across data-parallel replicas, so
    any number of FP8 regions per micro-batch is safe. Delayed scaling (and a custom recipe,
    which may be delayed) is safe only with the amax reduction confined to the tensor-parallel
    group, whose ranks run the same loop.
    """
    for flag, value in (("--fp8-format", args.fp8), ("--fp4-format", args.fp4)):
        if value is not None and args.transformer_impl != "transformer_engine":
            raise ParcaeConfigError(
                f"{flag} needs --transformer-impl transformer_engine: low-precision GEMMs are "
                f"Transformer Engine layers, the {args.transformer_impl} spec would run "
                "in high precision")
    if args.fp8 is not None and args.fp8_recipe in ("delayed", "custom") \
            and not args.tp_only_amax_red:
        raise ParcaeConfigError(f"--fp8-recipe {args.fp8_recipe} is unsafe for a looped model "
                                f"without --tp-only-amax-red: {_FP8_DELAYED}")
    if args.fp8 is not None and args.fp8_recipe in ("delayed", "custom") \
            and getattr(args, "recompute_loop_iterations", False):
        raise ParcaeConfigError(f"--fp8-recipe {args.fp8_recipe} cannot be combined with "
                                f"--recompute-loop-iterations: {_FP8_LOOP_RECOMPUTE}")
    # TE's FP8 GEMMs need the token count divisible by 8 (16 for block scaling); compaction
    # runs the loop on any number of sequences, so the sequence length alone must ensure it.
    if args.fp8 is not None and args.seq_length % 16:
        raise ParcaeConfigError(f"--seq-length {args.seq_length} must be a multiple of 16 under "
                                "FP8: the loop runs on any number of sequences (compaction)")
