"""Read and write Megatron distributed checkpoints of ParcaeModel in one process.

Reading builds the model at TP = PP = 1 and lets ``dist_checkpointing`` reshard whatever layout
the checkpoint was saved with (torch_dist checkpoints store global tensors). Writing produces a
*release* checkpoint (``release/`` + tracker), the Megatron convention for converted weights:
``--load`` starts from it at iteration 0 without optimizer state, at any TP/PP.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from parcae_megatron.convert.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
# torch DCP raises CheckpointException, a BaseException, for unreadable files.
_READ_ERRORS = (Exception, CheckpointException)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    tail = lines[-1] if lines else ""  # DCP puts the cause last, after a traceback
    return f"{type(exc).__name__}: {tail}"


def resolve_checkpoint_dir(load: Path, iteration: int | None = None) -> Path:
    """The directory holding one checkpoint: ``load`` itself, or the iteration the tracker
    (or ``iteration``) names inside a Megatron ``--save`` directory."""
    load = Path(load)
    if not load.exists():
        raise ConversionError(f"checkpoint not found: {load}")
    if (load / "metadata.json").exists() or (load / ".metadata").exists():
        return load
    if iteration is not None:
        name = f"iter_{iteration:07d}"
    else:
        tracker = load / TRACKER
        if not tracker.exists():
            raise ConversionError(f"{load} is not a Megatron checkpoint directory "
                                  f"(no {TRACKER} and no checkpoint metadata)")
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
    path = load / name
    if not path.is_dir():
        raise ConversionError(f"checkpoint {path} is missing (named by {TRACKER})")
    return path


def load_checkpoint_args(ckpt_dir: Path) -> argparse.Namespace:
    """The training arguments stored in a checkpoint (read with ``weights_only`` unpickling)."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except _READ_ERRORS as exc:  # corrupt or foreign files: say which and why
        raise ConversionError(f"cannot load the checkpoint metadata in {ckpt_dir}: "
                              f"{_first_line(exc)}") from exc
    args = common.get("args") if isinstance(common, dict) else None
    if args is None or getattr(args, "num_prelude_layers", None) is None:
        raise ConversionError(f"{ckpt_dir} was not written by parcae_megatron.train "
                              "(no Parcae arguments in it)")
    return args


def single_process_config(args: argparse.Namespace):
    """The ParcaeConfig of ``args`` rebuilt for one process (TP = PP = 1)."""
    from parcae_megatron.training.arguments import parcae_config_from_args

    args = copy.copy(args)
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.sequence_parallel = False
    args.parcae_pipeline_layout = None
    args.use_cpu_initialization = True
    args.perform_initialization = False
    args.transformer_impl = "local"
    # GPU-only kernels/recipes of the training run do not change the weights.
    args.gradient_accumulation_fusion = False
    args.apply_rope_fusion = False
    args.fp8 = None
    for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                 "pipeline_model_parallel_layout", "virtual_pipeline_model_parallel_size"):
        if hasattr(args, name):
            setattr(args, name, None)
    cfg = parcae_config_from_args(args)
    cfg.perform_initialization = False
    return cfg


def build_model(cfg):
    """A whole ParcaeModel (embedding to head) on this process, uninitialised."""
    from parcae_megatron.model import ParcaeModel
    from parcae_megatron.model.layer_specs import get_parcae_layer_local_spec
    from parcae_megatron.platform.dist import init_distributed

    _ensure_single_process(init_distributed)
    return ParcaeModel(cfg, get_parcae_layer_local_spec(), pre_process=True, post_process=True,
                       dp_rank=0, dp_size=1)


def _ensure_single_process(init_distributed) -> None:
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        init_distributed(1, 1)


def load_megatron_model(load: Path, iteration: int | None = None):
    """(model, args, checkpoint dir): the full model with the checkpoint's weights."""
    from megatron.core import dist_checkpointing

    from parcae_megatron.training import megatron_patches

    megatron_patches.install("evaluate")

    ckpt_dir = resolve_checkpoint_dir(load, iteration)
    args = load_checkpoint_args(ckpt_dir)
    model = build_model(single_process_config(args))
    try:
        metadata = dist_checkpointing.load_content_metadata(str(ckpt_dir)) or {}
        # Tensors only: ShardedObjects (TE's FP8 `_extra_state`) would be unpickled without
        # weights_only by torch DCP, and conversion does not need them.
        tensors = {k: v for k, v in model.sharded_state_dict(metadata=metadata).items()
                   if not isinstance(v, ShardedObject)}
        loaded = dist_checkpointing.load({"model": tensors}, str(ckpt_dir))
    except _READ_ERRORS as exc:
        raise ConversionError(f"cannot load the model weights from {ckpt_dir}: "
                              f"{_first_line(exc)}") from exc
    model.load_state_dict(loaded["model"], strict=False)
    return model.eval(), args, ckpt_dir


def save_release_checkpoint(model, args: argparse.Namespace, save: Path) -> Path:
    """Write ``model`` as a release checkpoint (tracker + ``release/``) into ``save``."""
    from megatron.core import dist_checkpointing

    (save / "release").mkdir(parents=True)
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
             "iteration": 0}
    dist_checkpointing.save(state, str(save / "release"))
    (save / TRACKER).write_text("release")
    return save / "release"


def args_for_model(overrides: dict, tensor_parallel: int, pipeline_parallel: int,
                   tokenizer_model: Path | None, padded_vocab_size: int) -> argparse.Namespace:
    """A complete Megatron+Parcae argument namespace for a model described by ``overrides``
    (ParcaeConfig fields), as ``parcae_megatron.train`` would have parsed it."""
    from megatron.training.arguments import parse_args, validate_args

    from parcae_megatron.platform import cpu_backend
    from parcae_megatron.training import megatron_patches
    from parcae_megatron.training.arguments import add_parcae_args, set_megatron_argv
    from parcae_megatron.training.config_expansion import expand_argv

    megatron_patches.install("convert")  # on CPU, validate_args asks for the device arch
    cpu = cpu_backend.is_active()
    flags = {"hidden-size": overrides["hidden_size"],
             "ffn-hidden-size": overrides["ffn_hidden_size"],
             "num-attention-heads": overrides["num_attention_heads"],
             "num-query-groups": overrides["num_query_groups"],
             "kv-channels": overrides["kv_channels"],
             "num-prelude-layers": overrides["num_prelude_layers"],
             "num-recurrent-layers": overrides["num_recurrent_layers"],
             "num-coda-layers": overrides["num_coda_layers"],
             "mean-recurrence": overrides["mean_recurrence"],
             "mean-backprop-depth": overrides["mean_backprop_depth"],
             "injection-type": overrides["injection_type"],
             "state-init": overrides["state_init"],
             "seq-length": overrides["seq_length"],
             "max-position-embeddings": overrides["seq_length"],
             "norm-epsilon": overrides["layernorm_epsilon"],
             "rotary-base": overrides["rotary_base"],
             "tensor-model-parallel-size": tensor_parallel,
             "pipeline-model-parallel-size": pipeline_parallel,
             "micro-batch-size": 1, "ckpt-format": "torch_dist",
             "transformer-impl": "local", "use-cpu-initialization": True}
    argv = [item for key, value in flags.items()
            for item in ([f"--{key}"] if value is True else [f"--{key}", str(value)])]
    if cpu:
        argv += ["--no-gradient-accumulation-fusion", "--distributed-backend", "gloo"]
    if not overrides["prelude_norm"]:
        argv.append("--no-prelude-norm")
    if not overrides["value_embeddings"]:
        argv.append("--no-value-embeddings")
    if overrides.get("qk_layernorm_epsilon") is not None:
        argv += ["--qk-layernorm-epsilon", repr(overrides["qk_layernorm_epsilon"])]
    if tokenizer_model is not None:
        from data_prep.tokenizer import megatron_tokenizer_args

        argv += megatron_tokenizer_args(tokenizer_model)
    else:
        argv += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(padded_vocab_size)]
    saved_argv = set_megatron_argv(expand_argv(argv))
    try:
        args = parse_args(add_parcae_args)
    finally:
        set_megatron_argv(saved_argv[1:])
    args.world_size = tensor_parallel * pipeline_parallel
    args.rank = 0
    with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
        validate_args(args)
    args.padded_vocab_size = padded_vocab_size
    return args
