"""Parcae's command line on top of Megatron-LM's: extra flags, YAML configs, the model config.

A run is ``python -m parcae_megatron.train --config CONFIG.yaml [any Megatron flag ...]``.
The YAML maps Megatron (or Parcae) flag names to values; ``preset:`` expands a named model
size first; ``base:`` names a config this one extends (config_file.py). Precedence:
Parcae's fixed block settings < preset < YAML (base < file) < command line.
"""

from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path
from typing import Any

from parcae_megatron.config_file import load_config
from parcae_megatron.model.config import (
    DEPTH_BALANCES,
    DEPTH_SAMPLINGS,
    INJECTION_TYPES,
    LOOP_EXECUTIONS,
    STATE_INITS,
    ParcaeConfig,
    ParcaeConfigError,
)
from parcae_megatron.model.presets import PRESETS
from parcae_megatron.training import flag_policy

PACKINGS = ("concat", "bestfit")

# The Parcae block (spec §1.3) expressed as Megatron flags; always applied first.
BLOCK_ARGS = [
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--disable-bias-linear",
    "--qk-layernorm", "--position-embedding-type", "rope", "--rotary-base", "50000",
    "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
    # RoPE fusion stays on (Megatron's default): TE's fused kernel is the same rotate-half
    # map; flag_policy.adapt_fusions turns it off where Transformer Engine is missing.
    # Non-finite steps are skipped and counted (training/guards.py) instead of aborting.
    "--no-check-for-nan-in-loss-and-grad",
]

# Preset field -> Megatron flag.
_PRESET_FLAGS = {
    "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups", "kv_channels": "--kv-channels",
    "ffn_hidden_size": "--ffn-hidden-size", "num_prelude_layers": "--num-prelude-layers",
    "num_recurrent_layers": "--num-recurrent-layers", "num_coda_layers": "--num-coda-layers",
    "mean_recurrence": "--mean-recurrence", "mean_backprop_depth": "--mean-backprop-depth",
    "seq_length": "--seq-length",
}


def add_parcae_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: Parcae's own flags."""
    g = parser.add_argument_group("Parcae", "looped prelude / recurrent / coda model")
    g.add_argument("--config", type=str, default=None,
                   help="YAML run config (expanded before parsing; recorded for provenance)")
    g.add_argument("--preset", type=str, default=None, help="named model size (see describe)")
    g.add_argument("--num-prelude-layers", type=int, default=None)
    g.add_argument("--num-recurrent-layers", type=int, default=None)
    g.add_argument("--num-coda-layers", type=int, default=None)
    g.add_argument("--mean-recurrence", type=int, default=8, help="μ_rec")
    g.add_argument("--mean-backprop-depth", type=int, default=4, help="μ_bwd")
    g.add_argument("--injection-type", choices=INJECTION_TYPES, default="diagonal")
    g.add_argument("--state-init", choices=STATE_INITS, default="like_init")
    g.add_argument("--no-prelude-norm", dest="prelude_norm", action="store_false")
    g.add_argument("--depth-sampling", choices=DEPTH_SAMPLINGS, default="per_sequence")
    g.add_argument("--depth-balance", choices=DEPTH_BALANCES, default="independent",
                   help="global: draw the global batch's depths per step and deal them so "
                        "data-parallel replicas do equal loop work")
    g.add_argument("--loop-execution", choices=LOOP_EXECUTIONS, default="compact")
    g.add_argument("--recompute-loop-iterations", action="store_true",
                   help="checkpoint each gradient iteration of the loop (store only the loop "
                        "state between iterations); composes with --recompute-granularity")
    g.add_argument("--no-value-embeddings", dest="value_embeddings", action="store_false")
    g.add_argument("--qk-layernorm-epsilon", type=float, default=None,
                   help="QK-norm epsilon (default: --norm-epsilon)")
    g.add_argument("--depth-seed", type=int, default=514229)
    g.add_argument("--init-seed", type=int, default=None,
                   help="seed of the initial weights (default: --seed); --seed keeps the "
                        "data order, so weights can vary with the data fixed")
    g.add_argument("--parcae-pipeline-layout", type=str, default=None,
                   help="stages separated by '|': p prelude layer, R recurrent block, "
                        "c coda layer (e.g. 'pp|R|cc')")
    g.add_argument("--eval-loop-counts", type=int, nargs="*", default=None,
                   help="validation loop counts T (default 1 2 4 μ_rec 2·μ_rec)")
    g.add_argument("--telemetry-path", type=str, default=None,
                   help="JSONL telemetry file (default: SAVE/telemetry.jsonl)")
    g.add_argument("--telemetry-interval", type=int, default=10,
                   help="steps between stability telemetry (state norms, spectra)")
    g.add_argument("--max-consecutive-skipped", type=int, default=10,
                   help="stop the run after this many non-finite steps in a row")
    # TransformerConfig.tp_only_amax_red has no Megatron-LM flag in 0.19; the config builder
    # copies this attribute into the model config.
    g.add_argument("--tp-only-amax-red", action="store_true",
                   help="FP8 delayed scaling: reduce amaxes within tensor parallelism only "
                        "(required for delayed scaling, see flag_policy)")
    r = parser.add_argument_group("Parcae recipe", "the authors' optimizer and packing "
                                  "(docs/recipe.md)")
    r.add_argument("--muon-lr", type=float, default=None,
                   help="peak LR of the Muon group (default: --lr); same schedule shape")
    r.add_argument("--muon-start-weight-decay", type=float, default=None,
                   help="Muon group's weight decay at step 0 (default: Megatron's schedule); "
                        "follows --weight-decay-incr-style to --muon-end-weight-decay")
    r.add_argument("--muon-end-weight-decay", type=float, default=None,
                   help="Muon group's weight decay at the last step")
    r.add_argument("--muon-beta2", type=float, default=0.95,
                   help="parcae_muon: EMA rate of the factored second moment")
    r.add_argument("--muon-ns-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="parcae_muon: dtype of the Polar Express (Newton-Schulz) iterations "
                        "(default bf16, the authors'); --muon-fp32-matmul-prec keeps "
                        "Megatron's meaning (torch's float32 matmul precision)")
    r.add_argument("--muon-momentum-warmup-start", type=float, default=0.85,
                   help="parcae_muon: momentum at step 0, rising linearly to --muon-momentum")
    r.add_argument("--muon-momentum-warmup-iters", type=int, default=300,
                   help="parcae_muon: optimizer steps of the momentum warm-up (0: none)")
    r.add_argument("--packing", choices=PACKINGS, default="concat",
                   help="concat: Megatron's GPT samples (documents concatenated); bestfit: "
                        "BOS-aligned best-fit packing with crop (the authors')")
    r.add_argument("--packing-buffer", type=int, default=1000,
                   help="bestfit: documents held in the best-fit buffer")
    return parser


def _accept_parcae_optimizer() -> None:
    """Let Megatron's ``--optimizer`` accept ``parcae_muon`` in every parse of the run
    (Megatron re-parses sys.argv later, e.g. for fault tolerance)."""
    import megatron.training.arguments as margs

    if getattr(margs.add_megatron_arguments, "parcae", False):
        return
    add = margs.add_megatron_arguments

    def add_megatron_arguments(parser):
        parser = add(parser)
        for action in parser._actions:
            if "--optimizer" in action.option_strings and action.choices is not None:
                action.choices = [*action.choices, "parcae_muon"]
        return parser

    add_megatron_arguments.parcae = True
    margs.add_megatron_arguments = add_megatron_arguments


def _flag_items(mapping: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in mapping.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _flag_present(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def expand_argv(argv: list[str]) -> list[str]:
    """Turn ``[--config X.yaml] [--preset P] [flags]`` into the full Megatron argv."""
    config_path = _flag_value(argv, "--config")
    from_yaml: list[str] = []
    preset = _flag_value(argv, "--preset")
    if config_path is not None:
        data = load_config(config_path)  # base: chain merged (config_file.py)
        preset = preset or data.pop("preset", None)
        data.pop("preset", None)
        from_yaml = _flag_items(data)
    from_preset: list[str] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ParcaeConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        from_preset = _flag_items({_PRESET_FLAGS[k][2:]: v for k, v in PRESETS[preset].items()
                                   if k in _PRESET_FLAGS})
        from_preset += ["--max-position-embeddings", str(PRESETS[preset]["seq_length"])]
    full = BLOCK_ARGS + from_preset + from_yaml + list(argv)
    if not _flag_present(full, "--num-layers"):
        counts = [_flag_value(full, f) for f in ("--num-prelude-layers",
                                                 "--num-recurrent-layers", "--num-coda-layers")]
        if all(c is not None for c in counts):
            full += ["--num-layers", str(sum(int(c) for c in counts))]
    return full


def parcae_config_from_args(args: argparse.Namespace,
                            vocab_size: int | None = None) -> ParcaeConfig:
    """The model config of a parsed Megatron+Parcae namespace (Megatron's padded vocabulary
    unless ``vocab_size`` is given)."""
    from megatron.training.arguments import core_transformer_config_from_args

    saved = args.vocab_size, getattr(args, "init_seed", None)
    args.vocab_size = vocab_size or args.padded_vocab_size
    # Copied into ParcaeConfig.init_seed by field name; --init-seed defaults to --seed.
    args.init_seed = args.seed if saved[1] is None else saved[1]
    try:
        return core_transformer_config_from_args(args, config_class=ParcaeConfig)
    finally:
        args.vocab_size, args.init_seed = saved


def validate_parcae_args(args: argparse.Namespace) -> ParcaeConfig:
    """Everything that can be checked before a rank starts; raises ``ParcaeConfigError``
    with one message. Returns the resolved model config."""
    layers = (args.num_prelude_layers, args.num_recurrent_layers, args.num_coda_layers)
    if any(n is None for n in layers):
        raise ParcaeConfigError("set --preset or all of --num-prelude-layers, "
                                "--num-recurrent-layers, --num-coda-layers")
    if args.num_layers != sum(layers):
        raise ParcaeConfigError(f"--num-layers ({args.num_layers}) must equal prelude + "
                                f"recurrent + coda layers ({sum(layers)})")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if args.world_size % model_parallel:
        raise ParcaeConfigError(
            f"world size {args.world_size} is not divisible by tensor x pipeline parallel size "
            f"{args.tensor_model_parallel_size} x {args.pipeline_model_parallel_size}")
    _check_data(args)
    _check_recipe(args)
    # The tokenizer (and so the padded vocabulary) is only known after initialisation;
    # check the model with a vocabulary padded the way Megatron will pad it.
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    vocab = -(-(args.vocab_size or 32768) // multiple) * multiple
    try:
        return parcae_config_from_args(args, vocab_size=vocab)
    except ParcaeConfigError:
        raise
    except (AssertionError, ValueError, TypeError) as exc:
        raise ParcaeConfigError(f"invalid configuration: {exc}") from exc


def _check_recipe(args: argparse.Namespace) -> None:
    muon_wd = (args.muon_start_weight_decay, args.muon_end_weight_decay)
    if (muon_wd[0] is None) != (muon_wd[1] is None):
        raise ParcaeConfigError("set both --muon-start-weight-decay and --muon-end-weight-decay")
    if muon_wd[0] is not None and muon_wd[0] != muon_wd[1] \
            and args.weight_decay_incr_style == "constant":
        raise ParcaeConfigError("a Muon weight-decay schedule needs --weight-decay-incr-style "
                                "linear or cosine")
    if args.optimizer != "parcae_muon":
        return
    if args.muon_tp_mode != "duplicated":
        raise ParcaeConfigError("--optimizer parcae_muon orthogonalises whole matrices under "
                                "tensor parallelism: set --muon-tp-mode duplicated")
    if not 1 <= args.muon_num_ns_steps <= 5:
        raise ParcaeConfigError("--optimizer parcae_muon has 5 Polar Express coefficients: "
                                "--muon-num-ns-steps must be 1..5")
    if args.muon_momentum_warmup_iters < 0:
        raise ParcaeConfigError("--muon-momentum-warmup-iters must be >= 0")


def _check_data(args: argparse.Namespace) -> None:
    if args.mock_data:
        return
    paths = [*(args.data_path or []), *(args.train_data_path or []),
             *(args.valid_data_path or []), *(args.test_data_path or [])]
    if not paths and not args.data_args_path and not args.per_split_data_args_path:
        raise ParcaeConfigError("no training data: pass --data-path (or --mock-data)")
    for item in paths:
        try:
            float(item)
            continue  # a blend weight
        except ValueError:
            pass
        missing = [ext for ext in (".bin", ".idx") if not Path(item + ext).is_file()]
        if missing:
            raise ParcaeConfigError(f"dataset prefix {item!r} has no {' / '.join(missing)} file")
    if args.tokenizer_model and not Path(args.tokenizer_model).exists():
        raise ParcaeConfigError(f"tokenizer model not found: {args.tokenizer_model}")


def parse_args_or_exit(argv: list[str]) -> argparse.Namespace:
    """Megatron's parse + validate with Parcae's checks; one clear message and exit 2 on error.

    Flags ParcaeModel cannot honour are refused on the raw parse, before Megatron's
    validation acts on them; fusions are then adapted to the installed kernels.
    """
    import sys

    from megatron.training.arguments import parse_and_validate_args, parse_args

    if "-h" in argv or "--help" in argv:
        _tolerate_bad_help_strings()
    _accept_parcae_optimizer()
    try:
        argv = expand_argv(argv)
        sys.argv = [sys.argv[0], *argv]
        flag_policy.refuse_before_parsing(argv)
        flag_policy.refuse_unsupported(parse_args(extra_args_provider=add_parcae_args), argv)
        args = parse_and_validate_args(extra_args_provider=add_parcae_args)
        notes = flag_policy.adapt_fusions(args)
        validate_parcae_args(args)
    except (ParcaeConfigError, AssertionError, ValueError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {_describe_error(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"parcae: {note}", flush=True)
    return args


def _describe_error(exc: Exception) -> str:
    """The message, or for Megatron's bare asserts the failing check and where it is."""
    if str(exc):
        return str(exc)
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}: check failed: {frame.line}"


def _tolerate_bad_help_strings() -> None:
    # megatron-core 0.19.2 has a help string with a bare '%' that makes argparse's --help
    # raise; print such strings verbatim instead.
    expand = argparse.HelpFormatter._expand_help

    def safe_expand(self, action):
        try:
            return expand(self, action)
        except (ValueError, TypeError, KeyError):
            return action.help or ""

    argparse.HelpFormatter._expand_help = safe_expand
