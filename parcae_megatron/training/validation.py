"""Parse and validate a Parcae command line before any rank starts: config keys, expansion,
the paths it names, the refusals of ``flag_policy``, the layout arithmetic, Megatron's own
validation, the fusions ``fusions`` adapts, and Parcae's checks. A bad configuration ends in
one ``error:`` line (plus at most a ``did you mean`` line) and exit 2, before Megatron
prints its usage or its argument dump.
"""

from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path

from parcae_megatron import cli
from parcae_megatron.config_file import check_keys, flag_value
from parcae_megatron.model.config import ParcaeConfig, ParcaeConfigError
from parcae_megatron.training import flag_policy, fusions, megatron_patches
from parcae_megatron.training.arguments import (
    add_parcae_args,
    parcae_config_from_args,
    set_megatron_argv,
)
from parcae_megatron.training.config_expansion import expand_argv


def trainer_parser() -> cli.RaisingParser:
    """Megatron's parser plus Parcae's flags, as ``megatron.training.arguments.parse_args``
    builds it, whose mistakes raise ``cli.UsageError`` (one line) instead of printing usage.
    Needs the entry point's patch phase (``megatron_patches.install``, ``train`` or
    ``check``): with it ``--optimizer parcae_muon`` parses."""
    if not megatron_patches.ADD_MEGATRON_ARGUMENTS.applied():
        raise RuntimeError("the trainer's parser needs a patch phase first: "
                           "megatron_patches.install('check') (or 'train')")
    from megatron.training.arguments import add_megatron_arguments

    parser = cli.RaisingParser(description="Megatron-LM Arguments", allow_abbrev=False)
    return add_parcae_args(add_megatron_arguments(parser))


def check_command_line(argv: list[str], world_size: int | None = None) -> list[str]:
    """Every check that needs no rank and no Megatron initialisation: the config's keys and
    values, the flags, the paths, the refusal table and the layout arithmetic for
    ``world_size`` ranks (default ``WORLD_SIZE``). Raises ``ValueError`` (``UsageError``,
    ``ConfigFileError``, ``ParcaeConfigError``) with one message; returns the expanded argv."""
    parser = trainer_parser()
    config = flag_value(argv, "--config")
    if config is not None:
        check_keys(config, parser._option_string_actions)
    expanded = expand_argv(argv)
    flag_policy.refuse_before_parsing(expanded)
    args = parser.parse_args(expanded)
    args.rank = 0
    args.world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_paths(args)
    check_quality_flags(args)
    flag_policy.refuse_unsupported(args, expanded)
    flag_policy.refuse_unlisted_structure(args, expanded, parser)
    check_layout(args)
    return expanded


def parse_args_or_exit(argv: list[str]) -> argparse.Namespace:
    """Megatron's parse + validate with Parcae's checks; one clear message and exit 2 on error.

    The checks that need no initialisation run first (``check_command_line``): no usage
    text or argument dump precedes their message. Fusions are then adapted to the installed
    kernels.
    """
    import sys

    from megatron.training.arguments import parse_and_validate_args

    try:
        argv = check_command_line(argv)
        set_megatron_argv(argv)
        args = parse_and_validate_args(extra_args_provider=add_parcae_args)
        notes = fusions.adapt_fusions(args)
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


def check_layout(args: argparse.Namespace) -> None:
    """The layer counts and the parallel layout's arithmetic; raises ``ParcaeConfigError``."""
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
            f"world size ({args.world_size}) is not divisible by tensor x pipeline parallel "
            f"size ({args.tensor_model_parallel_size} x {args.pipeline_model_parallel_size})")
    replicas = args.world_size // model_parallel * args.micro_batch_size
    if args.global_batch_size is not None and args.global_batch_size % replicas:
        raise ParcaeConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by micro-batch "
            f"size x data-parallel size ({args.micro_batch_size} x "
            f"{args.world_size // model_parallel})")


def validate_parcae_args(args: argparse.Namespace) -> ParcaeConfig:
    """Everything that can be checked before a rank starts; raises ``ParcaeConfigError``
    with one message. Returns the resolved model config."""
    check_layout(args)
    check_paths(args)
    _check_recipe(args)
    check_quality_flags(args)
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


def check_quality_flags(args: argparse.Namespace) -> None:
    """CORE and samples while training: intervals, loop counts, the bundle and its task list,
    and a text tokenizer (prompts are text). Raises ``ParcaeConfigError``."""
    for flag in ("eval_core_interval", "sample_interval", "eval_core_max_per_task",
                 "sample_tokens"):
        if getattr(args, flag) < 0:
            raise ParcaeConfigError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.eval_core_loops and min(args.eval_core_loops) < 1:
        raise ParcaeConfigError("--eval-core-loops must be >= 1")
    needs_text = [f for f in ("eval_core_interval", "sample_interval") if getattr(args, f)]
    if needs_text and (not args.tokenizer_model or args.tokenizer_type == "NullTokenizer"):
        raise ParcaeConfigError(f"--{needs_text[0].replace('_', '-')} needs a text tokenizer: "
                                "pass --tokenizer-model (SentencePiece .model or "
                                "tokenizer.json)")
    if not args.eval_core_interval:
        return
    if not args.eval_core_bundle:
        raise ParcaeConfigError("--eval-core-interval needs --eval-core-bundle DIR (the unzipped "
                                "DCLM/nanochat eval bundle)")
    from parcae_megatron.evaluate.core import load_task_specs, read_baselines

    bundle = Path(args.eval_core_bundle)
    if not bundle.is_dir():
        raise ParcaeConfigError(f"--eval-core-bundle directory not found: {bundle}")
    try:
        read_baselines(bundle)
        specs = load_task_specs(args.eval_core_tasks_yaml)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ParcaeConfigError(f"--eval-core-bundle: {exc}") from exc
    absent = [s.dataset_uri for s in specs if not (bundle / "eval_data" / s.dataset_uri).is_file()]
    if absent:
        raise ParcaeConfigError(f"--eval-core-bundle {bundle} lacks eval_data/{absent[0]}"
                                + (f" and {len(absent) - 1} more task file(s)"
                                   if len(absent) > 1 else ""))


def check_paths(args: argparse.Namespace) -> None:
    """Every input path the flags name exists: each dataset prefix of a blend (weights
    skipped), the data-args files, ``--tokenizer-model`` and ``--load`` (unless it is also
    ``--save``, where a first run starts fresh). Raises ``ParcaeConfigError`` naming each
    missing path."""
    missing: list[str] = []
    if not args.mock_data:
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
            absent = [ext for ext in (".bin", ".idx") if not Path(item + ext).is_file()]
            if absent:
                missing.append(f"dataset prefix {item!r} has no {' / '.join(absent)} file")
        for flag in ("data_args_path", "per_split_data_args_path"):
            value = getattr(args, flag)
            if value and not Path(value).is_file():
                missing.append(f"--{flag.replace('_', '-')} not found: {value}")
    if args.tokenizer_model and not Path(args.tokenizer_model).exists():
        missing.append(f"tokenizer model not found: {args.tokenizer_model}")
    if args.load and not Path(args.load).exists() \
            and (args.save is None or Path(args.load).resolve() != Path(args.save).resolve()):
        missing.append(f"--load checkpoint directory not found: {args.load}")
    if missing:
        raise ParcaeConfigError("; ".join(missing))
