"""Fault injection for failure drills and tests: ``PARCAE_FAULT``, off unless set.

    PARCAE_FAULT="raise@step=3,rank=1"          rank 1 raises RuntimeError in training step 3
    PARCAE_FAULT="kill@step=3,rank=1"           rank 1 SIGKILLs itself in step 3
    PARCAE_FAULT="hang@step=3,rank=1"           rank 1 stops responding in step 3
    PARCAE_FAULT="nan@step=3,rank=1"            rank 1's loss (so its gradients) is NaN in
                                                step 3: the step must be skipped and counted
    PARCAE_FAULT="raise@step=3,rank=1,attempt=1"   ... only in the job's first attempt

``rank`` is the global rank (default 0); the fault fires in the forward pass of the step's
first micro-batch, so mid-step. ``attempt`` counts a SLURM job's attempts from 1: the launcher
(``launch.submit``) exports ``PARCAE_ATTEMPT``; elsewhere ``SLURM_RESTART_COUNT + 1``, else 1.
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
ACTIONS = ("raise", "kill", "hang", "nan")
_KEYS = ("step", "rank", "attempt")


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

    def matches(self, step: int, rank: int, attempt: int) -> bool:
        """Whether the fault fires in ``step`` on ``rank`` during ``attempt``."""
        return (step == self.step and rank == self.rank
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
    least = {"step": 1, "rank": 0, "attempt": 1}
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


def fire(fault: Fault, step: int, rank: int) -> None:
    """Carry the fault out (announced first, with a timestamp, on stderr); ``nan`` is only
    announced here, :func:`inject` poisons the loss."""
    stamp = datetime.now().isoformat(timespec="milliseconds")
    what = f"fault injection ({ENV}={fault.spec}): {fault.action} on rank {rank} at step {step}"
    print(f"{what} [{stamp}]", file=sys.stderr, flush=True)
    if fault.action == "kill":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "nan":
        return
    elif fault.action == "hang":
        while True:  # not even SIGTERM ends it (Megatron's handler only sets a flag)
            time.sleep(3600)
    raise InjectedFault(what)


def inject(forward_step: Callable, fault: Fault | None) -> Callable:
    """``forward_step`` that carries out ``fault`` in its training step; itself if None."""
    if fault is None:
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


def _poisoned(loss_func: Callable) -> Callable:
    """``loss_func`` whose loss is NaN (the reported figures stay finite)."""

    @functools.wraps(loss_func)
    def nan_loss(*args, **kwargs):
        loss, *rest = loss_func(*args, **kwargs)
        return (loss * float("nan"), *rest)

    return nan_loss


def from_env_or_exit() -> Fault | None:
    """:func:`from_env`; a malformed value prints ``error:`` and exits 2 (configuration)."""
    try:
        return from_env()
    except FaultSpecError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
