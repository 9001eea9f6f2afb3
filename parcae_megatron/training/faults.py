"""Fault injection for failure drills and tests: ``PARCAE_FAULT``, off unless set.

    PARCAE_FAULT="raise@step=3,rank=1"          rank 1 raises RuntimeError in training step 3
    PARCAE_FAULT="kill@step=3,rank=1"           rank 1 SIGKILLs itself in step 3
    PARCAE_FAULT="hang@step=3,rank=1"           rank 1 stops responding in step 3
    PARCAE_FAULT="nan@step=3,rank=1"            rank 1's loss (so its gradients) is NaN in
                                                step 3: the step must be skipped and counted
    PARCAE_FAULT="nan_grad@step=3,rank=1"       after step 3's backward, rank 1 makes the
                                                gradient of one Muon matrix it owns NaN (the
                                                other ranks' gradients stay finite): every
                                                rank must skip the step
    PARCAE_FAULT="slow@step=3,rank=1,ms=500"    from step 3 on, rank 1 sleeps 500 ms (default
                                                1000) in every training micro-batch: a slow
                                                device, for the straggler report
    PARCAE_FAULT="deep@step=3,rank=1"           from step 3 on, rank 1 runs every sequence
                                                twice as many loop iterations as drawn (depth
                                                imbalance, which is not a straggler)
    PARCAE_FAULT="kill_in_save@step=4,rank=1"   rank 1 SIGKILLs itself right after it has
                                                handed the asynchronous save (--async-save)
                                                of the iteration-4 checkpoint to its writer,
                                                before the save is finalized
    PARCAE_FAULT="raise@step=3,rank=1,attempt=1"   ... only in the job's first attempt

``rank`` is the global rank (default 0); the fault fires in the forward pass of the step's
first micro-batch, so mid-step (``nan_grad``: once the gradients are reduced, just before the
optimizer step; ``kill_in_save``: in the checkpoint save after step ``step``). ``attempt``
counts a SLURM job's attempts from 1: the launcher (``launch.submit``) exports
``PARCAE_ATTEMPT``; elsewhere ``SLURM_RESTART_COUNT + 1``, else 1.
A fault limited to the first attempt lets a requeued job complete. A malformed value is a
configuration error (``error:`` line, exit 2) found before training starts.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

ENV = "PARCAE_FAULT"
FORWARD_ACTIONS = ("raise", "kill", "hang", "nan")
PERSISTENT_ACTIONS = ("slow", "deep")  # from their step on, every training micro-batch
ACTIONS = (*FORWARD_ACTIONS, "nan_grad", "kill_in_save", *PERSISTENT_ACTIONS)
_KEYS = ("step", "rank", "attempt", "ms")


class FaultSpecError(ValueError):
    """A malformed ``PARCAE_FAULT``."""


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault raises."""


@dataclass(frozen=True)
class Fault:
    """What to do, in which training step, on which rank, in which attempt (None: every)."""

    action: str
    step: int
    rank: int = 0
    attempt: int | None = None
    spec: str = ""
    ms: int = 1000  # the sleep of a ``slow`` fault

    def matches(self, step: int, rank: int, attempt: int) -> bool:
        """Whether the fault fires in ``step`` on ``rank`` during ``attempt`` (a persistent
        action: in ``step`` or any later one)."""
        due = step >= self.step if self.action in PERSISTENT_ACTIONS else step == self.step
        return (due and rank == self.rank
                and (self.attempt is None or attempt == self.attempt))


def parse(spec: str) -> Fault:
    """``ACTION@step=N[,rank=R][,attempt=A]`` -> :class:`Fault`."""
    action, sep, rest = spec.strip().partition("@")
    if action not in ACTIONS or not sep:
        raise FaultSpecError(f"{ENV}={spec!r}: expected ACTION@step=N[,rank=R][,attempt=A] "
                             f"with ACTION one of {', '.join(ACTIONS)}")
    values: dict[str, int] = {}
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        if key not in _KEYS or not eq or key in values:
            raise FaultSpecError(f"{ENV}={spec!r}: bad or repeated setting {item!r} "
                                 f"(settings: {', '.join(_KEYS)})")
        try:
            values[key] = int(value)
        except ValueError:
            raise FaultSpecError(f"{ENV}={spec!r}: {key} must be an integer") from None
    if "step" not in values:
        raise FaultSpecError(f"{ENV}={spec!r}: step=N is required")
    least = {"step": 1, "rank": 0, "attempt": 1, "ms": 0}
    for key, value in values.items():
        if value < least[key]:
            raise FaultSpecError(f"{ENV}={spec!r}: {key} must be at least {least[key]}")
    return Fault(action=action, spec=spec.strip(), **values)


def from_env(environ: Mapping[str, str] = os.environ) -> Fault | None:
    """The configured fault, or None when ``PARCAE_FAULT`` is unset or empty."""
    spec = environ.get(ENV, "").strip()
    return parse(spec) if spec else None


def current_attempt(environ: Mapping[str, str] = os.environ) -> int:
    """This job's attempt, counted from 1 (see module doc)."""
    if environ.get("PARCAE_ATTEMPT", "").isdigit():
        return int(environ["PARCAE_ATTEMPT"])
    if environ.get("SLURM_RESTART_COUNT", "").isdigit():
        return int(environ["SLURM_RESTART_COUNT"]) + 1
    return 1


def fire(fault: Fault, step: int, rank: int, detail: str = "") -> None:
    """Carry the fault out (announced first, with a timestamp, on stderr); ``nan`` and
    ``nan_grad`` are only announced here: :func:`inject` poisons the loss,
    :func:`grad_poisoner` the gradient."""
    stamp = datetime.now().isoformat(timespec="milliseconds")
    what = (f"fault injection ({ENV}={fault.spec}): {fault.action} on rank {rank} at step {step}"
            + (f" ({detail})" if detail else ""))
    print(f"{what} [{stamp}]", file=sys.stderr, flush=True)
    if fault.action in ("kill", "kill_in_save"):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action in ("nan", "nan_grad", *PERSISTENT_ACTIONS):
        return
    elif fault.action == "hang":
        while True:  # not even SIGTERM ends it (Megatron's handler only sets a flag)
            time.sleep(3600)
    raise InjectedFault(what)


def inject(forward_step: Callable, fault: Fault | None) -> Callable:
    """``forward_step`` that carries out ``fault`` in its training step; itself if None or
    the fault is not one of the forward pass."""
    if fault is not None and fault.action in PERSISTENT_ACTIONS:
        return _persistent(forward_step, fault)
    if fault is None or fault.action not in FORWARD_ACTIONS:
        return forward_step
    attempt = current_attempt()
    fired = False

    @functools.wraps(forward_step)
    def forward_step_with_fault(data_iterator, model):
        nonlocal fired
        if not fired and model.training:
            import torch.distributed as dist
            from megatron.training import get_args

            step = get_args().curr_iteration + 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if fault.matches(step, rank, attempt):
                fired = True
                fire(fault, step, rank)
                if fault.action == "nan":
                    output, loss_func = forward_step(data_iterator, model)
                    return output, _poisoned(loss_func)
        return forward_step(data_iterator, model)

    return forward_step_with_fault


def _persistent(forward_step: Callable, fault: Fault) -> Callable:
    """``forward_step`` that, from the fault's step on, on its rank, sleeps (``slow``) or
    doubles the drawn loop depths (``deep``) in every training micro-batch."""
    attempt = current_attempt()
    announced = False

    @functools.wraps(forward_step)
    def forward_step_with_fault(data_iterator, model):
        nonlocal announced
        if model.training:
            import torch.distributed as dist
            from megatron.core.utils import unwrap_model
            from megatron.training import get_args

            step = get_args().curr_iteration + 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if fault.matches(step, rank, attempt):
                if not announced:
                    announced = True
                    fire(fault, step, rank, "from this step on")
                if fault.action == "slow":
                    time.sleep(fault.ms / 1000)
                else:
                    _deepen(unwrap_model(model).depth_sampler)
        return forward_step(data_iterator, model)

    return forward_step_with_fault


def _deepen(sampler) -> None:
    """Make ``sampler`` draw twice the depths (gradient depths unchanged) from now on."""
    if getattr(sampler, "deepened", False):
        return
    draw = sampler.next

    def next_deeper(batch_size: int):
        depths, seed = draw(batch_size)
        return type(depths)(depths.total * 2, depths.grad), seed

    sampler.next, sampler.deepened = next_deeper, True


def _poisoned(loss_func: Callable) -> Callable:
    """``loss_func`` whose loss is NaN (the reported figures stay finite)."""

    @functools.wraps(loss_func)
    def nan_loss(*args, **kwargs):
        loss, *rest = loss_func(*args, **kwargs)
        return (loss * float("nan"), *rest)

    return nan_loss


def grad_poisoner(fault: Fault | None, optimizer, names: Callable[[], dict]) \
        -> Callable[[], None] | None:
    """For a ``nan_grad`` fault, the function to call between the backward and the optimizer
    step: in the fault's step, on its rank, it makes the whole gradient of the first Muon
    matrix that this rank's part of ``optimizer`` steps NaN (the first parameter it steps if
    none is Muon's). ``names()``: model parameter -> (key, name). None for other faults."""
    if fault is None or fault.action != "nan_grad":
        return None
    attempt = current_attempt()
    fired = False

    def poison() -> None:
        nonlocal fired
        import torch.distributed as dist
        from megatron.training import get_args

        from parcae_megatron.training.guards import leaf_optimizers, param_pairs

        step = get_args().curr_iteration + 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if fired or not fault.matches(step, rank, attempt):
            return
        fired = True
        leaves = leaf_optimizers(optimizer)
        leaves.sort(key=lambda leaf: "muon" not in type(leaf.optimizer).__name__.lower()
                    if getattr(leaf, "optimizer", None) is not None else True)
        pairs = [pair for leaf in leaves for pair in param_pairs(leaf)]
        if not pairs:
            raise InjectedFault(f"{ENV}={fault.spec}: rank {rank} steps no parameter")
        model = pairs[0][1]
        grad = model.main_grad if getattr(model, "main_grad", None) is not None else model.grad
        name = names().get(model, (None, f"a parameter of shape {tuple(model.shape)}"))[1]
        fire(fault, step, rank, f"gradient of {name} set to NaN")
        grad.fill_(float("nan"))

    return poison


def kill_in_save(fault: Fault | None) -> None:
    """Called once an asynchronous checkpoint save has been handed to the writer: for a
    ``kill_in_save`` fault due in this save (the checkpoint of iteration ``step``), on its rank,
    SIGKILL this process while the save is in flight."""
    if fault is None or fault.action != "kill_in_save":
        return
    import torch.distributed as dist
    from megatron.training import get_args

    step = get_args().curr_iteration + 1  # the step just taken: the checkpoint's iteration
    rank = dist.get_rank() if dist.is_initialized() else 0
    if fault.matches(step, rank, current_attempt()):
        fire(fault, step, rank, "asynchronous checkpoint save in flight")


def from_env_or_exit() -> Fault | None:
    """:func:`from_env`; a malformed value prints ``error:`` and exits 2 (configuration)."""
    try:
        return from_env()
    except FaultSpecError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
