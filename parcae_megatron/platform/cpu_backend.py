"""CPU/debug backend: run Megatron-Core over gloo on a machine without CUDA.

Megatron-Core assumes CUDA in a handful of places (device="cuda" tensors in the
pipeline schedules and optimizer, ``.cuda()`` calls, CUDA RNG state in the
tensor-parallel RNG tracker, ``Tensor.type()`` checks in gradient clipping,
streams in the DDP buffers). This module redirects exactly those to the CPU so
that the *same* Megatron code paths (TP/PP/DP, distributed optimizer, schedules,
dist_checkpointing) run on a laptop or a CI box for correctness testing.

It is a debug backend, not a performance path, and it refuses to activate when
CUDA is available: on a GPU nothing here is ever applied. ``maybe_activate`` also refuses
where GPUs were asked for and CUDA is unusable (``gpu_check``): a GPU job never runs on the
CPU. Each replacement of a Megatron internal has a ``Patch`` record below (checked by
``tests/test_megatron_patches.py``); the training run's own patches are in
``training/megatron_patches.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import warnings

import torch
from torch.overrides import TorchFunctionMode

from parcae_megatron.platform import gpu_check
from parcae_megatron.platform.patching import Patch

if not torch.cuda.is_available():
    # Without CUDA, Megatron's imports note that Transformer Engine / Apex are missing and torch
    # that there is no CUDA runtime: true of every CPU run, and twenty lines of noise in front
    # of a command's first line (a one-line error included). On a GPU they are still shown.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"(Transformer Engine and Apex are|Apex is) not installed")
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"Only transformer-engine>=\S+ supports MoE experts")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

__all__ = ["activate", "is_active", "maybe_activate"]

_CPU = "there is no CUDA device on the CPU backend"
GET_CUDA_RNG_STATE = Patch(
    target="megatron.core.tensor_parallel.random:_get_cuda_rng_state",
    replaces="reads the CUDA generator's state for the tensor-parallel RNG tracker",
    change="reads the CPU generator's state", why=_CPU)
SET_CUDA_RNG_STATE = Patch(
    target="megatron.core.tensor_parallel.random:_set_cuda_rng_state",
    replaces="sets the CUDA generator's state for the tensor-parallel RNG tracker",
    change="sets the CPU generator's state", why=_CPU)
INITIALIZE_MEGATRON = Patch(
    target="megatron.training.training:initialize_megatron",
    replaces="Megatron-LM's initialisation, which asserts CUDA unless allow_no_cuda",
    change="always passes allow_no_cuda=True", why=_CPU)
GET_DEVICE_ARCH_VERSION = Patch(
    target="megatron.training.arguments:get_device_arch_version",
    replaces="the GPU's compute capability major version (read in argument validation)",
    change="returns 9 (Hopper)", why=f"{_CPU}; TP > 1 argument checks read it")
SET_JIT_FUSION_OPTIONS = Patch(
    target="megatron.training.training:set_jit_fusion_options",
    replaces="sets the JIT fuser and compiles warm-up fusion kernels",
    change="does nothing", why="the warm-up compiles for ~25 s and is pointless on a CPU")
GET_WRITE_RESULTS_QUEUE = Patch(
    target="megatron.core.dist_checkpointing.strategies.filesystem_async:"
           "get_write_results_queue",
    replaces="the async checkpoint writer's result queue, from a manager started by 'spawn'",
    change="starts the manager by 'fork'",
    why="'spawn' costs 7-14 s per run on a CPU; 'fork' is safe without a CUDA context")
PERSISTENT_WRITER_PROCESS = Patch(
    target="megatron.core.dist_checkpointing.strategies.async_utils:"
           "PersistentAsyncCaller._get_process",
    replaces="starts the persistent asynchronous checkpoint writer (--async-save with "
             "--use-persistent-ckpt-worker) by 'forkserver' at start-up, and by 'spawn' for "
             "the save after the loop (the loop's end stops the first writer)",
    change="starts it by 'fork', and stops it at exit if no save ever went through it",
    why="a forkserver or spawned child imports torch without the CPU backend: it found no "
        "CUDA device, died, and the trainer waited for it forever; a forked child inherits "
        "the backend, and with it the trainer's SIGTERM handler, so multiprocessing's exit "
        "handler cannot stop it: a run that never saved waited at exit forever")



def _cuda_stub(name: str, change: str, module: str = "torch.cuda") -> Patch:
    return Patch(target=f"{module}:{name}", replaces=f"{module}.{name} (on the CUDA device)",
                 change=change, why=f"{_CPU}; Megatron calls it")


# torch.cuda's functions Megatron calls, each a CPU stand-in (``_patch_torch_cuda``).
CUDA_STUBS: tuple[Patch, ...] = (
    _cuda_stub("current_device", "returns the CPU device"),
    _cuda_stub("synchronize", "does nothing (CPU work is ordered)"),
    _cuda_stub("current_stream", "returns a null stream"),
    _cuda_stub("default_stream", "returns a null stream"),
    _cuda_stub("Stream", "a null stream class"),
    _cuda_stub("stream", "a null context"),
    _cuda_stub("get_rng_state", "reads the CPU generator's state"),
    _cuda_stub("set_rng_state", "sets the CPU generator's state"),
    _cuda_stub("manual_seed", "seeds the CPU generator (torch.manual_seed calls it)"),
    _cuda_stub("manual_seed_all", "seeds the CPU generator"),
    _cuda_stub("get_rng_state", "reads the CPU generator's state", "torch.cuda.random"),
    _cuda_stub("set_rng_state", "sets the CPU generator's state", "torch.cuda.random"),
    _cuda_stub("empty_cache", "does nothing"),
    _cuda_stub("memory_allocated", "returns 0"),
    _cuda_stub("max_memory_allocated", "returns 0"),
    _cuda_stub("device_count", "returns 1 (one CPU device; patch_megatron_training)"),
    _cuda_stub("set_device", "does nothing (patch_megatron_training)"),
)
ENGINE_RUN_BACKWARD = Patch(
    target="torch.autograd.graph:_engine_run_backward",
    replaces="torch's entry to the autograd engine (every backward)",
    change="runs it under the CPU mode unless the mode is already active",
    why="a TorchFunctionMode is off inside its own handler: a backward (and activation "
        "recompute in it) would meet CUDA devices again")
ENGINE_RUN_BACKWARD_AUTOGRAD = Patch(
    target="torch.autograd:_engine_run_backward",
    replaces="the same function, imported by name into torch.autograd",
    change=ENGINE_RUN_BACKWARD.change, why=ENGINE_RUN_BACKWARD.why)

PATCHES: tuple[Patch, ...] = (GET_CUDA_RNG_STATE, SET_CUDA_RNG_STATE, INITIALIZE_MEGATRON,
                              GET_DEVICE_ARCH_VERSION, SET_JIT_FUSION_OPTIONS,
                              GET_WRITE_RESULTS_QUEUE, PERSISTENT_WRITER_PROCESS,
                              *CUDA_STUBS, ENGINE_RUN_BACKWARD,
                              ENGINE_RUN_BACKWARD_AUTOGRAD)

_MODE: TorchFunctionMode | None = None


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to the CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes ``.cuda()`` a no-op.

    ``Tensor.type()`` reports ``torch.cuda.*`` names so Megatron's dtype checks
    (e.g. in ``clip_grads``) accept CPU tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(_cpu_device(a) if i > 0 else a for i, a in enumerate(args))
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


def _stub(target: str) -> Patch:
    return next(p for p in CUDA_STUBS if p.target == target)


def _patch_torch_cuda() -> None:
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
        return torch.default_generator.manual_seed(int(seed))

    stubs = {
        "current_device": lambda: torch.device("cpu"),
        "synchronize": lambda device=None: None,
        "current_stream": lambda device=None: _NullStream(),
        "default_stream": lambda device=None: _NullStream(),
        "Stream": _NullStream,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "get_rng_state": get_rng_state, "set_rng_state": set_rng_state,
        "manual_seed": manual_seed, "manual_seed_all": manual_seed,
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
    }
    for name, stub in stubs.items():
        _stub(f"torch.cuda:{name}").apply(stub)
    _stub("torch.cuda.random:get_rng_state").apply(get_rng_state)
    _stub("torch.cuda.random:set_rng_state").apply(set_rng_state)


def _patch_megatron() -> None:
    def get_rng(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    GET_CUDA_RNG_STATE.apply(get_rng)
    SET_CUDA_RNG_STATE.apply(set_rng)


def _patch_autograd_engine() -> None:
    """Run every backward under the CPU mode.

    A ``TorchFunctionMode`` is switched off while its own handler runs, so a
    ``loss.backward()`` dispatched through it would run the whole backward without it, and
    activation recompute (forward code re-run inside the backward) would meet CUDA devices
    again. Re-enter the mode around the engine call unless it is already active.
    """
    from torch.overrides import _get_current_function_mode_stack

    engine_run = ENGINE_RUN_BACKWARD.original()

    def run_backward_on_cpu(*args, **kwargs):
        if _MODE is None or _MODE in _get_current_function_mode_stack():
            return engine_run(*args, **kwargs)
        with _MODE:
            return engine_run(*args, **kwargs)

    ENGINE_RUN_BACKWARD.apply(run_backward_on_cpu)
    ENGINE_RUN_BACKWARD_AUTOGRAD.apply(run_backward_on_cpu)


def is_active() -> bool:
    """Whether the CPU backend has been activated in this process."""
    return _MODE is not None


def activate() -> None:
    """Activate the CPU backend (idempotent). Raises if CUDA is available."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("The CPU backend must never be activated on a machine with CUDA.")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _patch_torch_cuda()
    _patch_megatron()
    _patch_autograd_engine()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()


def maybe_activate() -> bool:
    """Activate the CPU backend iff CUDA is unavailable and no GPU was asked for.

    Returns whether it is active. Raises :class:`gpu_check.GpuUnavailableError` (its message
    one ``error:`` line) where the environment asked for GPUs (``CUDA_VISIBLE_DEVICES``, a
    SLURM job with GPUs, ``PARCAE_EXPECT_GPU``) and CUDA is unusable: never a silent fallback.
    """
    if is_active() or torch.cuda.is_available():
        return is_active()
    reason = gpu_check.gpu_requested(os.environ)
    if reason is not None:
        raise gpu_check.GpuUnavailableError(gpu_check.no_gpu_message(
            reason, torch.__version__, torch.version.cuda, gpu_check.driver_version()))
    activate()
    return True


def _stop_idle_writer(caller_class, timeout: float = 60.0) -> None:
    """At exit, stop a persistent checkpoint writer that Megatron never closed.

    Megatron starts the writer at start-up but closes it only once a save went through it, so
    a run that never saved left it waiting for work. ``multiprocessing``'s exit handler then
    SIGTERMs it and joins it; a forked writer inherits the trainer's SIGTERM handler
    (``--exit-signal-handler`` only sets a flag), ignores the signal, and the trainer waited
    at exit forever. The writer's own stop message ends it (after any request still queued);
    SIGKILL if it has not ended within ``timeout`` seconds.
    """
    process = caller_class._persistent_process
    if process is None or not process.is_alive():
        return
    with contextlib.suppress(Exception):
        caller_class._persistent_queue.put("DONE")
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(5)


def patch_megatron_training() -> None:
    """Extra redirections for the Megatron-LM loop (``megatron.training``) on CPU.

    * ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda``;
    * model-parallel init and RNG seeding are skipped when ``device_count() == 0``, so one
      (CPU) device is reported and ``set_device`` does nothing;
    * ``get_device_arch_version`` reads the GPU (TP > 1 argument checks);
    * ``set_jit_fusion_options`` compiles warm-up kernels for ~25 s: pointless on CPU;
    * the async checkpoint writer's result queue starts a manager by ``spawn`` (7-14 s per
      run on CPU); ``fork`` is safe here because no CUDA context exists;
    * the persistent asynchronous checkpoint writer starts by ``forkserver`` or ``spawn``, a
      fresh interpreter without this backend: it starts by ``fork`` instead.
    """
    if not is_active():
        activate()
    import functools

    # Megatron-LM's modules are imported (by the originals' look-up) before the device stubs.
    original = INITIALIZE_MEGATRON.original()
    write_results_queue = GET_WRITE_RESULTS_QUEUE.original()
    start_writer = PERSISTENT_WRITER_PROCESS.original()  # bound to its class
    GET_DEVICE_ARCH_VERSION.original()
    _stub("torch.cuda:device_count").apply(lambda: 1)
    _stub("torch.cuda:set_device").apply(lambda device=None: None)

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    INITIALIZE_MEGATRON.apply(initialize_megatron)
    GET_DEVICE_ARCH_VERSION.apply(lambda: 9)
    SET_JIT_FUSION_OPTIONS.apply(lambda *args, **kwargs: None)
    GET_WRITE_RESULTS_QUEUE.apply(functools.partial(write_results_queue, mp_mode="fork"))
    def start_writer_by_fork(cls, rank, mp_mode="spawn", *args, **kwargs):
        first = cls._persistent_process is None
        process = start_writer(rank, "fork", *args, **kwargs)
        if first:  # after multiprocessing's own exit handler, so it runs before it
            atexit.register(_stop_idle_writer, cls)
        return process

    PERSISTENT_WRITER_PROCESS.apply(classmethod(start_writer_by_fork))
