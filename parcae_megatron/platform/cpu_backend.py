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

PATCHES: tuple[Patch, ...] = (GET_CUDA_RNG_STATE, SET_CUDA_RNG_STATE, INITIALIZE_MEGATRON,
                              GET_DEVICE_ARCH_VERSION, SET_JIT_FUSION_OPTIONS,
                              GET_WRITE_RESULTS_QUEUE)

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


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


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
    import torch.autograd
    import torch.autograd.graph
    from torch.overrides import _get_current_function_mode_stack

    engine_run = torch.autograd.graph._engine_run_backward

    def run_backward_on_cpu(*args, **kwargs):
        if _MODE is None or _MODE in _get_current_function_mode_stack():
            return engine_run(*args, **kwargs)
        with _MODE:
            return engine_run(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = run_backward_on_cpu
    torch.autograd._engine_run_backward = run_backward_on_cpu


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


def patch_megatron_training() -> None:
    """Extra redirections for the Megatron-LM loop (``megatron.training``) on CPU.

    * ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda``;
    * model-parallel init and RNG seeding are skipped when ``device_count() == 0``, so one
      (CPU) device is reported and ``set_device`` does nothing;
    * ``get_device_arch_version`` reads the GPU (TP > 1 argument checks);
    * ``set_jit_fusion_options`` compiles warm-up kernels for ~25 s: pointless on CPU;
    * the async checkpoint writer's result queue starts a manager by ``spawn`` (7-14 s per
      run on CPU); ``fork`` is safe here because no CUDA context exists.
    """
    if not is_active():
        activate()
    import functools

    # Megatron-LM's modules are imported (by the originals' look-up) before the device stubs.
    original = INITIALIZE_MEGATRON.original()
    write_results_queue = GET_WRITE_RESULTS_QUEUE.original()
    GET_DEVICE_ARCH_VERSION.original()
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device=None: None

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    INITIALIZE_MEGATRON.apply(initialize_megatron)
    GET_DEVICE_ARCH_VERSION.apply(lambda: 9)
    SET_JIT_FUSION_OPTIONS.apply(lambda *args, **kwargs: None)
    GET_WRITE_RESULTS_QUEUE.apply(functools.partial(write_results_queue, mp_mode="fork"))
