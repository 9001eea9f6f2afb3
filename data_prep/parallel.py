"""Worker pools for the CLIs: fork where the platform has it, so workers start instantly."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from multiprocessing.pool import Pool


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def pool_context() -> mp.context.BaseContext:
    """The multiprocessing context pools use (fork where available)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def make_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Pool:
    """A pool of ``workers`` processes.

    Fork is preferred: the parent has already paid for importing torch and megatron-core
    (seconds), and forked workers inherit them. Spawn (macOS/Windows) works too, slower to
    start. ``maxtasksperchild`` is unset: a worker's state is only its tokenizer.
    """
    return pool_context().Pool(processes=workers, initializer=initializer, initargs=initargs)
