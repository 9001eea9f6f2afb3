"""Every replacement of a Megatron internal a Parcae run makes, each with its record (target,
megatron-core version, what it replaces, what it changes, why) and its install function.

The logic the replacements call lives in the job modules (``telemetry``, ``straggler``, ``guards``,
``distopt_fix``, ``muon_optimizer``); the act of patching happens only here. The CPU backend's
own patches (``platform/cpu_backend.py``) carry the same records, and
``tests/test_megatron_patches.py`` fails, naming the patch, when a target's signature changes.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from typing import Any, Literal

import torch
import torch.distributed as dist

from parcae_megatron.platform import cpu_backend
from parcae_megatron.platform.patching import Patch
from parcae_megatron.training import distopt_fix, faults, guards, muon_optimizer
from parcae_megatron.training.quality import QUALITY
from parcae_megatron.training.straggler import STRAGGLER
from parcae_megatron.training.telemetry import TELEMETRY

_TRAINING = "megatron.training.training"
_DISTOPT = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
_EOPT = "megatron.core.optimizer.emerging_optimizers"

# ------------------------------------------------------------------ before parsing
ADD_MEGATRON_ARGUMENTS = Patch(
    target="megatron.training.arguments:add_megatron_arguments",
    replaces="adds all of Megatron-LM's flags to the parser",
    change="adds them, then appends 'parcae_muon' to the choices of --optimizer",
    why="--optimizer parcae_muon must parse in every parse of the run (Megatron re-parses "
        "sys.argv later, e.g. for fault tolerance)")
HELP_EXPAND = Patch(
    target="argparse:HelpFormatter._expand_help",
    replaces="argparse's %-formatting of a flag's help string",
    change="prints a help string verbatim when formatting it raises",
    why="megatron-core 0.19.2 has a help string with a bare '%' that makes --help raise")
COMPILE_DEPENDENCIES = Patch(
    target="megatron.training.initialize:_compile_dependencies",
    replaces="builds Megatron's C++ dataset helpers with make on rank 0 at initialisation",
    change="does nothing",
    why="the wheel ships the prebuilt helpers but no Makefile: never try to rebuild them")

# ------------------------------------------------------------------ telemetry
TRAINING_LOG = Patch(
    target=f"{_TRAINING}:training_log",
    replaces="Megatron-LM's per-iteration log (loss, LR, grad norm, skipped steps)",
    change="calls it, then TELEMETRY.on_training_log with the same iteration's numbers",
    why="Parcae's per-step telemetry (loop depths, executed FLOPs, MFU, stability signals) "
        "is written next to Megatron's numbers, on every rank")
EVALUATE = Patch(
    target=f"{_TRAINING}:evaluate",
    replaces="Megatron-LM's validation pass, returning the averaged losses",
    change="calls it, then TELEMETRY.on_evaluate with the losses at every loop count",
    why="validation records (loss per loop count, tokens seen, FLOPs) for the scaling fits")
WANDB_WRITER = Patch(
    target="megatron.training.global_vars:_set_wandb_writer",
    replaces="with --wandb-project, starts W&B on the last rank (wandb.init); raises when "
             "--wandb-exp-name is empty, wandb is missing or wandb.init fails",
    change="names the run after the save directory when --wandb-exp-name is empty; any "
           "failure prints one warning line and leaves the W&B writer unset",
    why="W&B is a view of the run: no network, no key or no wandb never stops training "
        "(TensorBoard and telemetry.jsonl go on)")
TRAIN_STEP = Patch(
    target=f"{_TRAINING}:train_step",
    replaces="one training step (forward/backward of every micro-batch, optimizer step)",
    change="notes the step's start time for the straggler report, then calls it",
    why="a rank's compute time per step (start to gradient sync) for time per executed FLOP")
FINALIZE_MODEL_GRADS = Patch(
    target=f"{_TRAINING}:finalize_model_grads",
    replaces="the gradient synchronisation pretrain installs as finalize_model_grads_func",
    change="notes the time it is entered for the straggler report, then calls it",
    why="up to here a rank computes; from here on a fast rank waits for the slowest")

POST_STEP_CALLBACKS = Patch(
    target=f"{_TRAINING}:post_training_step_callbacks",
    replaces="the per-step callbacks after logging and validation (straggler detector, "
             "weight-hash check, profiler stop, manual GC)",
    change="calls them, then QUALITY.after_step: CORE / greedy samples when due",
    why="CORE at several loop counts and samples while training, with the model chunks and "
        "optimizer of the step (training/quality.py)")

# ------------------------------------------------------------------ non-finite steps
GET_MEGATRON_OPTIMIZER = Patch(
    target=f"{_TRAINING}:get_megatron_optimizer",
    replaces="builds the optimizer pretrain trains with (megatron.core.optimizer's, imported "
             "by name into megatron.training.training)",
    change="builds it, then guards its prepare_grads (PREPARE_GRADS)",
    why="non-finite gradients skip the step in bf16/fp32 runs too (training/guards.py)")
PREPARE_GRADS = Patch(
    target="megatron.core.optimizer.optimizer:MegatronOptimizer.prepare_grads",
    replaces="on the optimizer pretrain steps (for a ChainedOptimizer, the chain, which calls "
             "its parts'): copies gradients to the main params and reports inf/nan, which only "
             "fp16 loss scaling ever finds",
    change="also reports any non-finite gradient of any part on any rank (one all-reduce over "
           "the world); a PARCAE_FAULT nan_grad first poisons one Muon matrix's gradient",
    why="Megatron then skips the step through its own path (update, LR schedule, optimizer "
        "state untouched; counted as skipped) on every rank: per-part groups let one rank "
        "skip alone and the job hang",
    relies_on=("megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.prepare_grads",
               "megatron.core.optimizer.optimizer:FP32Optimizer.prepare_grads",
               "megatron.core.optimizer.optimizer:ChainedOptimizer.prepare_grads",
               "megatron.core.optimizer.optimizer:MegatronOptimizer.get_parameters"))

# ------------------------------------------------------------------ distributed optimizer
DISTOPT_INIT = Patch(
    target=f"{_DISTOPT}.__init__",
    replaces="builds the distributed optimizer and its model_param_group_index_map",
    change="renumbers the map in the inner optimizer's order ([fp32..., fp16 copies...])",
    why="with fp32 injection/readout in a bf16 model the map paired parameters with other "
        "parameters' states: the first checkpoint save failed (training/distopt_fix.py)")
DISTOPT_SHARDED_STATE_DICT = Patch(
    target=f"{_DISTOPT}.sharded_state_dict",
    replaces="the optimizer's sharded state dict (saving and, with is_loading, loading)",
    change="without Apex/TE, creates the optimizer states (dummy step) before a load; "
           "accepts model_sharded_state_dict=None as {}",
    why="with torch's Adam the load read each state's 'step' before any state existed",
    relies_on=(f"{_DISTOPT}._init_optimizer_states_with_dummy_values",))
DISTOPT_LOAD_STATE_DICT = Patch(
    target=f"{_DISTOPT}.load_state_dict",
    replaces="loads the param groups and the inner optimizer's state dict",
    change="without Apex/TE, gives every parameter's state its own 'step' tensor",
    why="torch's Adam shared one 'step' tensor, incremented once per parameter: after a "
        "resume the bias correction used an N times too large step")
DISTOPT_SET_MAIN_PARAM = Patch(
    target=f"{_DISTOPT}._set_main_param_and_optimizer_states",
    replaces="copies a loaded main parameter and its optimizer state into the shards",
    change="copies under torch.no_grad() and keeps the already restored 'step'",
    why="an fp32 parameter's shard is a view of the parameter (in-place copy on a leaf that "
        "requires grad failed), and the loaded per-parameter 'step' is a placeholder")

# ------------------------------------------------------------------ asynchronous checkpoints
_FS_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
ASYNC_PRELOAD = Patch(
    target=f"{_FS_ASYNC}:FileSystemWriterAsync.preload_tensors",
    replaces="stages an asynchronous save's tensors in host memory while the trainer waits "
             "(the device-to-host copy); a tensor already in host memory is passed on as is",
    change="copies the tensors already in host memory too",
    why="--use-persistent-ckpt-worker's writer receives them through a multiprocessing queue, "
        "in memory shared with the trainer, whose next optimizer steps changed them while "
        "they were written (every tensor on the CPU backend, host-resident state on a GPU)")
SCHEDULE_ASYNC_SAVE = Patch(
    target="megatron.training.checkpointing:schedule_async_save",
    replaces="hands a checkpoint's asynchronous save request to the writer",
    change="hands it over, then carries out a PARCAE_FAULT kill_in_save when it is due",
    why="failure drill and test: a rank dies while its asynchronous save is in flight")

# ------------------------------------------------------------------ parcae_muon
EMERGING_OPTIMIZERS = Patch(
    target=f"{_EOPT}:_EMERGING_OPTIMIZERS",
    replaces="Megatron-Core's registry of emerging optimizers (muon, adaptive_muon, ...)",
    change="adds 'parcae_muon' and routes the AdamW parameters of muon / adaptive_muon the "
           "authors' way (muon_optimizer.uses_adamw)",
    why="--optimizer parcae_muon is built by get_megatron_optimizer like Megatron's own Muon",
    relies_on=(f"{_EOPT}:EmergingOptimizerEntry", f"{_EOPT}:_eopt_init_state_fn",
               f"{_EOPT}:_muon_config_to_kwargs", f"{_EOPT}:TensorParallelMuon.__init__",
               f"{_EOPT}:TensorParallelMuon._init_group"))
TAG_BUFFER_ROUTING = Patch(
    target="megatron.core.optimizer.layer_wise_optimizer:tag_params_for_buffer_routing",
    replaces="tags which parameters the layer-wise distributed optimizer's Muon manages",
    change="tags them by muon_optimizer.uses_adamw, the optimizer groups' routing",
    why="the DDP buffers must split parameters as the optimizer groups do")
TAG_BUFFER_ROUTING_TRAINING = Patch(
    target=f"{_TRAINING}:tag_params_for_buffer_routing",
    replaces="the same function, imported by name into megatron.training.training",
    change=TAG_BUFFER_ROUTING.change, why=TAG_BUFFER_ROUTING.why)
OPTIMIZER_CONFIG = Patch(
    target=f"{_TRAINING}:get_megatron_optimizer_config",
    replaces="the OptimizerConfig and param-group overrides of the parsed args",
    change="with --optimizer parcae_muon adds --muon-beta2 / --muon-ns-dtype to the config "
           "and the Muon group's LR and weight-decay schedule to the overrides",
    why="Megatron-LM has no flags for a per-group LR and weight-decay schedule")
SCHEDULER_CLASS = Patch(
    target=f"{_TRAINING}:OptimizerParamScheduler",
    replaces="the scheduler class pretrain instantiates (LR and weight decay)",
    change="with --optimizer parcae_muon builds muon_optimizer.RecipeParamScheduler",
    why="the Muon momentum warms up from 0.85 to 0.95 over 300 steps (the authors')")

# ------------------------------------------------------------------ private overrides
# Subclasses that override a private (or internal) method of a Megatron class: never applied
# by ``Patch.apply`` (the subclass is the replacement), recorded so the signature test covers
# the method each override was written against.
FORWARD_ATTENTION = Patch(
    target="megatron.core.transformer.transformer_layer:TransformerLayer._forward_attention",
    replaces="the layer's input norm, self-attention, bias-dropout-add and cross-attention",
    change="model/layer_specs.py ParcaeTransformerLayer: binds the value-embedding rows "
           "(carried in the cross-attention 'context' argument) to the self-attention, calls "
           "it with context=None and returns the rows unchanged",
    why="the block hands the same rows to every layer, and full recompute saves them with "
        "the chunk's inputs")
GET_QUERY_KEY_VALUE_TENSORS = Patch(
    target="megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors",
    replaces="splits the fused QKV projection into query, key and value",
    change="model/attention.py ParcaeSelfAttention: calls it, then adds the gated value "
           "embedding of the bound value rows to v (before RoPE)",
    why="value embeddings enter Parcae's attention through the values")
MODULE_APPLY = Patch(
    target="torch.nn.modules.module:Module._apply",
    replaces="applies a tensor function (dtype/device casts) to every parameter and buffer",
    change="model/injection.py Fp32ParamsModule: applies it, then keeps the parameters fp32",
    why="the injection and readout stay fp32 in a bf16 model (Megatron's Float16Module casts "
        "the whole model)")

OVERRIDES: tuple[Patch, ...] = (FORWARD_ATTENTION, GET_QUERY_KEY_VALUE_TENSORS, MODULE_APPLY)

PATCHES: tuple[Patch, ...] = (
    ADD_MEGATRON_ARGUMENTS, HELP_EXPAND, COMPILE_DEPENDENCIES, TRAINING_LOG, EVALUATE,
    WANDB_WRITER, TRAIN_STEP, FINALIZE_MODEL_GRADS, POST_STEP_CALLBACKS,
    GET_MEGATRON_OPTIMIZER, PREPARE_GRADS, DISTOPT_INIT, DISTOPT_SHARDED_STATE_DICT,
    DISTOPT_LOAD_STATE_DICT, DISTOPT_SET_MAIN_PARAM, ASYNC_PRELOAD, SCHEDULE_ASYNC_SAVE,
    EMERGING_OPTIMIZERS, TAG_BUFFER_ROUTING,
    TAG_BUFFER_ROUTING_TRAINING, OPTIMIZER_CONFIG, SCHEDULER_CLASS)


def accept_parcae_optimizer() -> None:
    """ADD_MEGATRON_ARGUMENTS (idempotent)."""
    if ADD_MEGATRON_ARGUMENTS.applied():
        return
    add = ADD_MEGATRON_ARGUMENTS.original()

    def add_megatron_arguments(parser):
        parser = add(parser)
        for action in parser._actions:
            if "--optimizer" in action.option_strings and action.choices is not None:
                action.choices = [*action.choices, muon_optimizer.NAME]
        return parser

    ADD_MEGATRON_ARGUMENTS.apply(add_megatron_arguments)


def tolerate_bad_help_strings() -> None:
    """HELP_EXPAND."""
    expand = HELP_EXPAND.original()

    def safe_expand(self, action):
        try:
            return expand(self, action)
        except (ValueError, TypeError, KeyError):
            return action.help or ""

    HELP_EXPAND.apply(safe_expand)


def skip_dependency_compilation() -> None:
    """COMPILE_DEPENDENCIES."""
    COMPILE_DEPENDENCIES.apply(lambda: None)


def install_telemetry() -> None:
    """TRAINING_LOG and EVALUATE: every step and validation reports to ``TELEMETRY``."""
    from megatron.training import get_args

    training_log, evaluate = TRAINING_LOG.original(), EVALUATE.original()

    def training_log_with_telemetry(loss_dict, total_loss_dict, learning_rate, iteration,
                                    loss_scale, report_memory_flag, skipped_iter, grad_norm,
                                    *args, **kwargs):
        out = training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                           report_memory_flag, skipped_iter, grad_norm, *args, **kwargs)
        TELEMETRY.on_training_log(get_args(), loss_dict, learning_rate, iteration,
                                  skipped_iter, grad_norm)
        return out

    def evaluate_with_telemetry(*args, **kwargs):
        out = evaluate(*args, **kwargs)
        if out[0] is not None:
            TELEMETRY.on_evaluate(out[0], TELEMETRY.last_iteration)
        return out

    TRAINING_LOG.apply(training_log_with_telemetry)
    EVALUATE.apply(evaluate_with_telemetry)


def install_quality_during_training() -> None:
    """POST_STEP_CALLBACKS: CORE and samples every N steps (``QUALITY``)."""
    callbacks = POST_STEP_CALLBACKS.original()

    def callbacks_then_quality(model, optimizer, opt_param_scheduler, iteration, *args,
                               **kwargs):
        out = callbacks(model, optimizer, opt_param_scheduler, iteration, *args, **kwargs)
        QUALITY.after_step(model, optimizer, iteration)
        return out

    POST_STEP_CALLBACKS.apply(callbacks_then_quality)


def tolerate_wandb_failures() -> None:
    """WANDB_WRITER (idempotent): W&B starts when it can; otherwise one warning and training
    goes on. Megatron starts W&B while validating the arguments, so this precedes parsing."""
    if WANDB_WRITER.applied():
        return
    set_writer = WANDB_WRITER.original()

    def set_wandb_writer(args) -> None:
        if getattr(args, "wandb_project", "") and not args.wandb_exp_name:
            args.wandb_exp_name = os.path.basename(os.path.normpath(args.save or "parcae"))
        try:
            set_writer(args)
        except Exception as exc:  # noqa: BLE001 - any W&B failure: go on without it
            message = " ".join(str(exc).split())[:300]
            print(f"warning: W&B disabled ({type(exc).__name__}: {message}); "
                  "TensorBoard and telemetry.jsonl go on", flush=True)

    WANDB_WRITER.apply(set_wandb_writer)


def install_step_timing() -> None:
    """TRAIN_STEP and FINALIZE_MODEL_GRADS: per-rank compute time for the straggler report."""
    train_step, finalize = TRAIN_STEP.original(), FINALIZE_MODEL_GRADS.original()

    def timed_train_step(*args, **kwargs):
        STRAGGLER.on_step_start()
        return train_step(*args, **kwargs)

    def timed_finalize_model_grads(*args, **kwargs):
        STRAGGLER.on_gradient_sync()
        return finalize(*args, **kwargs)

    TRAIN_STEP.apply(timed_train_step)
    FINALIZE_MODEL_GRADS.apply(timed_finalize_model_grads)


def guard_non_finite_grads(optimizer, model_chunks=(),
                           fault: faults.Fault | None = None) -> guards.NonFiniteGuard:
    """PREPARE_GRADS on ``optimizer`` (for a ``ChainedOptimizer``, on the chain: its parts keep
    Megatron's own checks, the guard adds one decision for all of them over the world)."""
    guard = guards.NonFiniteGuard(optimizer, model_chunks)
    poison = faults.grad_poisoner(fault, optimizer, guard.names)
    original = optimizer.prepare_grads

    def prepare_grads() -> bool:
        if poison is not None:
            poison()
        return guard.check(bool(original()))

    PREPARE_GRADS.apply(prepare_grads, instance=optimizer)
    return guard


def install_guards(fault: faults.Fault | None = None) -> None:
    """GET_MEGATRON_OPTIMIZER: the optimizer ``pretrain`` builds is guarded (and carries out a
    ``nan_grad`` fault: ``fault``, or else the run's ``PARCAE_FAULT``, read when the optimizer
    is built, after the command line has been checked)."""
    build = GET_MEGATRON_OPTIMIZER.original()

    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        optimizer = build(config, model_chunks, *args, **kwargs)
        TELEMETRY.guard = guard_non_finite_grads(
            optimizer, model_chunks, fault if fault is not None else faults.from_env())
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"non-finite guard on {guards.describe(optimizer)}: one decision over "
                  f"{dist.get_world_size() if dist.is_initialized() else 1} rank(s)", flush=True)
        return optimizer

    GET_MEGATRON_OPTIMIZER.apply(get_megatron_optimizer)


def install_distopt_fixes() -> None:
    """The four ``DistributedOptimizer`` patches (idempotent)."""
    if DISTOPT_INIT.applied():
        return
    init = DISTOPT_INIT.original()

    def __init__(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if hasattr(self, "model_fp32_groups"):
            distopt_fix.align_group_index_map(self)

    DISTOPT_INIT.apply(__init__)
    sharded = DISTOPT_SHARDED_STATE_DICT.original()

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False,
                           *args, **kwargs):
        distopt_fix.init_states_before_loading(self, is_loading)
        return sharded(self, {} if model_sharded_state_dict is None
                       else model_sharded_state_dict, is_loading, *args, **kwargs)

    DISTOPT_SHARDED_STATE_DICT.apply(sharded_state_dict)
    load = DISTOPT_LOAD_STATE_DICT.original()

    def load_state_dict(self, state_dict) -> None:
        load(self, state_dict)
        distopt_fix.untie_steps(self)

    DISTOPT_LOAD_STATE_DICT.apply(load_state_dict)
    set_states = DISTOPT_SET_MAIN_PARAM.original()

    @torch.no_grad()
    def set_main_param_and_optimizer_states(self, model_param, tensors) -> None:
        set_states(self, model_param, distopt_fix.keep_restored_step(self, model_param, tensors))

    DISTOPT_SET_MAIN_PARAM.apply(set_main_param_and_optimizer_states)


def snapshot_preload_tensors(write_buckets, non_blocking: bool = True):
    """ASYNC_PRELOAD's replacement. Module-level: the save request carries it to the writer
    process, which unpickles it by name (a closure made the request unpicklable and the
    trainer waited for the writer forever)."""
    # A host tensor is copied here, while the trainer waits, as a device tensor is by the
    # original's .to("cpu"): the save is a snapshot of its step.
    snapshot = [(path, key, (data, [(item, t.detach().clone() if t.device.type == "cpu"
                                     else t) for item, t in tensors]))
                for path, key, (data, tensors) in write_buckets]
    return ASYNC_PRELOAD.original()(snapshot, non_blocking)


def install_async_checkpointing(fault: faults.Fault | None = None) -> None:
    """ASYNC_PRELOAD and SCHEDULE_ASYNC_SAVE (idempotent): an asynchronous save writes the
    state of the step it was taken at, and a ``kill_in_save`` fault (``fault``, or else the
    run's ``PARCAE_FAULT``, read at the first save) fires once the save is in flight."""
    if ASYNC_PRELOAD.applied():
        return
    ASYNC_PRELOAD.apply(staticmethod(snapshot_preload_tensors))
    schedule = SCHEDULE_ASYNC_SAVE.original()

    def schedule_async_save(async_request) -> None:
        schedule(async_request)
        faults.kill_in_save(fault if fault is not None else faults.from_env())

    SCHEDULE_ASYNC_SAVE.apply(schedule_async_save)


def register_parcae_muon() -> None:
    """EMERGING_OPTIMIZERS and TAG_BUFFER_ROUTING(_TRAINING): ``--optimizer parcae_muon`` is
    known to Megatron-Core, and Megatron's own Muons route parameters the authors' way."""
    from megatron.core.optimizer import emerging_optimizers

    registry = emerging_optimizers._EMERGING_OPTIMIZERS
    for name in ("muon", "adaptive_muon"):  # Megatron's own Muons: same routing
        if name in registry:
            registry[name].default_param_overrides = muon_optimizer.adamw_routing()
    # megatron.training.training imports the function by name: patch it there first, so its
    # import (if this is the first) binds, and its record keeps, Megatron's own function.
    TAG_BUFFER_ROUTING_TRAINING.apply(muon_optimizer.tag_params_for_buffer_routing)
    TAG_BUFFER_ROUTING.apply(muon_optimizer.tag_params_for_buffer_routing)
    registry[muon_optimizer.NAME] = muon_optimizer.registry_entry()


def install_muon_recipe() -> None:
    """``register_parcae_muon``, OPTIMIZER_CONFIG and SCHEDULER_CLASS: ``pretrain`` builds the
    recipe's param groups and momentum warm-up when ``--optimizer parcae_muon``."""
    from megatron.training import get_args

    register_parcae_muon()
    build_config = OPTIMIZER_CONFIG.original()

    def get_megatron_optimizer_config(args):
        config, overrides = build_config(args)
        return muon_optimizer.recipe_optimizer_config(args, config, overrides)

    def scheduler_class(*a: Any, **kw: Any):
        return muon_optimizer.scheduler_for(get_args(), *a, **kw)

    OPTIMIZER_CONFIG.apply(get_megatron_optimizer_config)
    SCHEDULER_CLASS.apply(scheduler_class)


def install_training_patches(fault: faults.Fault | None = None) -> None:
    """Everything ``parcae_megatron.train`` installs before Megatron's ``pretrain`` (``fault``:
    the run's ``PARCAE_FAULT``, for the faults carried out by the optimizer)."""
    install_telemetry()
    install_quality_during_training()
    install_step_timing()
    install_guards(fault)
    install_distopt_fixes()
    install_async_checkpointing(fault)
    install_muon_recipe()


# ------------------------------------------------------------------ the patch phase
PHASES = ("train", "check", "convert", "evaluate")
ALLOW_VERSION_ENV = "PARCAE_ALLOW_MEGATRON_VERSION"


def check_megatron_version(environ: dict[str, str] | None = None) -> None:
    """Exit 2 with one ``error:`` line unless the installed megatron-core is the release every
    record was written for (or ``PARCAE_ALLOW_MEGATRON_VERSION=1`` says to run anyway)."""
    environ = os.environ if environ is None else environ
    installed = version("megatron-core")
    recorded = {p.version for p in (*PATCHES, *OVERRIDES, *cpu_backend.PATCHES)}
    if recorded == {installed} or environ.get(ALLOW_VERSION_ENV, "") == "1":
        return
    if int(environ.get("RANK", "0")) == 0:
        print(f"error: megatron-core {installed} is installed, but Parcae's patches of Megatron "
              f"were written for megatron-core {', '.join(sorted(recorded))}: install that "
              f"release, or set {ALLOW_VERSION_ENV}=1 to run anyway", file=sys.stderr,
              flush=True)
    raise SystemExit(2)


def install(phase: Literal["train", "check", "convert", "evaluate"],
            argv: list[str] | None = None) -> list[str]:
    """The one patch phase of an entry point: everything it needs of Megatron is replaced
    here, before Megatron parses a flag. Returns ``argv`` with the flags the CPU backend needs.

    * ``train`` (``parcae_megatron.train``): the CPU backend where there is no CUDA, the
      dependency-compilation skip, W&B tolerance (Megatron starts W&B while parsing),
      ``--optimizer parcae_muon`` and every training patch (telemetry, step timing, the
      non-finite guard, the distributed-optimizer fixes, asynchronous checkpoint snapshots,
      the Muon recipe);
    * ``check`` (parsing and validating a trainer command line without starting a rank:
      ``launch``'s flag check, the rehearsal's stages): ``--optimizer parcae_muon``;
    * ``convert`` (building Megatron arguments for a converted model with Megatron-LM's
      parser): the CPU backend where there is no CUDA with its Megatron-LM patches, and
      ``--optimizer parcae_muon``;
    * ``evaluate`` (reading a Megatron checkpoint into one process: evaluation, the probe,
      ``convert to-hf``; and ``platform.dist.init_distributed``, for the tools, benchmarks
      and tests that build a model in one process): the CPU backend where there is no CUDA
      (Megatron-Core only).

    In every phase, an ``argv`` asking for ``--help`` gets Megatron's help printed even where
    one of its help strings cannot be %-formatted.

    Checks the megatron-core version first (``check_megatron_version``); raises
    ``gpu_check.GpuUnavailableError`` where GPUs were asked for and CUDA is unusable.
    ``report`` is the line naming the active patches (printed once the command line is known
    to be valid, so that a mistake's output stays its one ``error:`` line).
    """
    if phase not in PHASES:
        raise ValueError(f"unknown patch phase {phase!r} (one of {', '.join(PHASES)})")
    argv = list(argv or [])
    check_megatron_version()
    if "-h" in argv or "--help" in argv:
        tolerate_bad_help_strings()
    if phase == "check":
        accept_parcae_optimizer()
        return argv
    cpu = cpu_backend.maybe_activate()
    if phase == "evaluate":
        return argv
    if cpu:
        cpu_backend.patch_megatron_training()
    accept_parcae_optimizer()
    if phase == "train":
        if cpu:
            # No --use-cpu-initialization: the GPU init path runs on the CPU backend too, and
            # the initial weights do not depend on it (model/init.py). Gradient-accumulation
            # and RoPE fusion are switched off by fusions.adapt_fusions when their kernels are
            # missing, as on a GPU without APEX / Transformer Engine.
            argv = ["--transformer-impl", "local", "--distributed-backend", "gloo", *argv]
        skip_dependency_compilation()  # the wheel has no Makefile for them
        tolerate_wandb_failures()
        install_training_patches()
    return argv


def active() -> list[str]:
    """The names of the patches applied in this process (CPU backend's included)."""
    return [p.target.rsplit(":", 1)[-1] for p in (*cpu_backend.PATCHES, *PATCHES)
            if p.applied()]


def report(phase: str) -> str:
    """One line naming the megatron-core release and every patch active in this process."""
    return f"parcae: {phase} patches of megatron-core {version('megatron-core')}: " \
           f"{', '.join(active())}"
