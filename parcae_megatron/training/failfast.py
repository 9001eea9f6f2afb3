"""Fail fast: an exception on any rank ends that rank with a non-zero status within seconds.

What used to keep a failed rank alive forever: the data-loader workers. With
``--exit-signal-handler`` (our configs and ``launch.submit`` turn it on) Megatron installs its
SIGTERM handler, which only sets a flag, in every data-loader worker too (``worker_init_fn`` in
``megatron/training/datasets/data_samplers.py``), so a SLURM SIGTERM reaches the trainer
without killing the workers under it. After an uncaught exception the traceback (kept as
``sys.last_exc``) still references the training frames, so the data iterators are never
closed; at exit ``multiprocessing`` SIGTERMs its daemonic children, which ignore it, and then
joins them: forever. The same holds for an asynchronous checkpoint writer, a forked,
non-daemonic child that ``multiprocessing`` joins at exit.

:func:`exit_on_failure` therefore, on any exception but ``SystemExit`` (Megatron's own exits:
signal handler, ``--exit-interval``, ...):

1. writes one line ``error: rank R failed at step S: Type: message`` and the traceback;
2. SIGKILLs this rank's helper processes (data-loader workers, checkpoint writers and deleters).
   None holds anything worth finishing: an in-flight asynchronous checkpoint is abandoned.
   Megatron writes a checkpoint into its own ``iter_N`` directory and records it in
   ``latest_checkpointed_iteration.txt`` only once every rank has finished writing, so the
   previous complete checkpoint stays the resume point and is never touched;
3. exits with status 1 through the normal interpreter shutdown. As a bound on anything else
   that could hold the interpreter (a library's non-daemon thread, a communicator's destructor
   waiting on peers), a faulthandler watchdog dumps every thread's stack and ends the process
   if it is still alive :data:`EXIT_GRACE_S` seconds later.

A rank that is killed outright (SIGKILL: the OOM killer, ``kill -9``) runs none of this. So
that its helpers never outlive it, :func:`helpers_die_with_rank` has the kernel SIGKILL every
process the rank forks once the rank is gone (Linux): without it the asynchronous checkpoint
writer and its result queue's manager were left orphaned, waiting forever.

The other ranks then fail in their next collective (a dead peer closes its gloo/NCCL
connections) or, stuck, give up after ``--distributed-timeout-minutes``; torchrun and
``srun --kill-on-bad-exit`` also stop the remaining ranks once one exits non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator

EXIT_GRACE_S = 10  # seconds the interpreter gets to shut down after a failure
EXIT_CODE = 1
_PR_SET_PDEATHSIG = 1  # prctl(2)
_forking_pid = 0  # the process about to fork, as its child sees it


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _step() -> int | None:
    """The training step running when the failure happened (Megatron's 1-based count)."""
    try:
        from megatron.training.global_vars import get_args

        args = get_args()
    except (ImportError, AssertionError):  # arguments not parsed yet
        return None
    current = getattr(args, "curr_iteration", None)
    return None if current is None else current + 1


def describe(exc: BaseException, rank: int, step: int | None) -> str:
    """The one-line summary of a failure."""
    where = f"at step {step}" if step is not None else "before training started"
    message = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return f"error: rank {rank} failed {where}: {detail}"


def stop_helper_processes(timeout: float = 5.0) -> int:
    """SIGKILL this process's ``multiprocessing`` children and reap them; how many there were.

    SIGKILL because Megatron makes data-loader workers (and the checkpoint writer it forks)
    ignore SIGTERM under ``--exit-signal-handler``.
    """
    children = multiprocessing.active_children()
    for child in children:
        with contextlib.suppress(Exception):  # it may have exited meanwhile
            child.kill()
    for child in children:
        with contextlib.suppress(Exception):
            child.join(timeout)
    return len(children)


def helpers_die_with_rank() -> bool:
    """From now on every child this process forks (data-loader workers, checkpoint writers,
    their queues' managers, deleters) gets SIGKILL from the kernel when this process ends,
    however it ends. Linux only (elsewhere nothing changes); returns whether it is in place.

    The kernel ties the signal to the forking thread: this process's helpers are forked by
    its main thread, which lives as long as the process."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)

    def note_parent() -> None:
        global _forking_pid
        _forking_pid = os.getpid()

    def die_with_parent() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != _forking_pid:  # the parent died before the prctl took effect
            os._exit(1)

    os.register_at_fork(before=note_parent, after_in_child=die_with_parent)
    return True


def fail(exc: BaseException) -> None:
    """Report ``exc`` (summary line, traceback), stop the helpers, and exit non-zero."""
    rank = _rank()
    summary = describe(exc, rank, _step())
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    trace = "".join(traceback.format_exception(exc))
    # The summary first (what a log scan finds) and once more after the traceback (what a
    # reader sees last), one write each so that ranks sharing a terminal do not interleave.
    sys.stderr.write(f"{summary}\n{trace}{summary}\n")
    sys.stderr.flush()
    stopped = stop_helper_processes()
    if stopped:
        print(f"rank {rank}: stopped {stopped} helper process(es); exiting", file=sys.stderr,
              flush=True)
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True)
    raise SystemExit(EXIT_CODE)


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """Around the training run: any exception ends this rank promptly (see module doc)."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt must not hang either
        fail(exc)
