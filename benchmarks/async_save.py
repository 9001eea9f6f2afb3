"""Asynchronous vs synchronous checkpoint save: how long the training loop is blocked.

The state is one data-parallel rank's share of the 1.3B run's checkpoint
(``configs/parcae-1.3b.yaml``, DP = 32 with the distributed optimizer and Megatron's fully
parallel save, so each rank writes about 1/32 of it): for every parameter of the model (the
meta-device shapes of the full model) a bf16 weight, an fp32 main weight and two fp32
optimizer moments, 14 bytes per parameter, each tensor cut to 1/``--share`` of its elements.
It is saved with Megatron-Core's ``dist_checkpointing`` (torch_dist) to local disk:

* ``sync``: ``dist_checkpointing.save`` as a run without ``--async-save`` calls it; the loop
  is blocked until the files are written and the checkpoint is finalized;
* ``async``: the same call with ``async_sharded_save=True``, then the request handed to the
  persistent writer (``--use-persistent-ckpt-worker``, ``--async-strategy mcore``, with
  Parcae's snapshot of host tensors); the loop is blocked until the writer holds its copy.
  ``async_total`` adds the background write and the finalization.

The variants alternate round by round (``timing.alternate``); each writes a fresh directory.

Usage: python benchmarks/async_save.py [--share 32] [--repeats 5] [--dir DIR]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import timing
import torch

from parcae_megatron.config_file import load_config
from parcae_megatron.model.memory import meta_parameters
from parcae_megatron.model.presets import preset_config
from parcae_megatron.platform import cpu_backend
from parcae_megatron.platform.dist import init_distributed
from parcae_megatron.training import megatron_patches

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "parcae-1.3b.yaml"
# (dtype, name) of the tensors a parameter contributes to a distributed-optimizer checkpoint.
STATE = ((torch.bfloat16, "weight"), (torch.float32, "main"), (torch.float32, "exp_avg"),
         (torch.float32, "exp_avg_sq"))


def rank_state(share: int) -> tuple[dict, int, int]:
    """The sharded state dict of one rank's share; its bytes and the full model's parameters."""
    from megatron.core.dist_checkpointing import ShardedTensor

    resolved = load_config(CONFIG)
    config = preset_config(resolved["preset"], seq_length=resolved["seq-length"])
    params = meta_parameters(config, bf16=True)
    gen = torch.Generator().manual_seed(0)
    state, nbytes = {}, 0
    for i, p in enumerate(params):
        n = math.ceil(p.numel() / share)
        for dtype, name in STATE:
            data = torch.randn(n, generator=gen).to(dtype)
            state[f"{name}.{i}"] = ShardedTensor.from_rank_offsets(f"{name}.{i}", data)
            nbytes += data.numel() * data.element_size()
    return state, nbytes, sum(p.numel() for p in params)


def main() -> None:
    """Time both saves, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=int, default=32,
                        help="the state is 1/SHARE of the full checkpoint (default 32: one "
                             "rank of the 1.3B config's DP = 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None,
                        help="local directory to write to (default: a temporary directory)")
    opts = parser.parse_args()
    if opts.share < 1 or opts.repeats < 1:
        raise SystemExit("error: --share and --repeats must be at least 1")

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        get_write_results_queue,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    init_distributed()
    if cpu_backend.is_active():  # as the trainer: the writer forked, one (CPU) device
        cpu_backend.patch_megatron_training()
    megatron_patches.install_async_checkpointing()
    get_write_results_queue()
    queue = AsyncCallsQueue(persistent=True)
    AsyncCallsQueue.warmup_persistent_caller(0)
    state, nbytes, full_params = rank_state(opts.share)
    root = Path(tempfile.mkdtemp(prefix="async-save-", dir=opts.dir))
    count = 0

    def target() -> Path:
        nonlocal count
        count += 1
        path = root / f"iter_{count:07d}"
        path.mkdir()
        return path

    def sync_save() -> dict[str, float]:
        path, start = target(), time.perf_counter()
        dist_checkpointing.save(state, str(path), TorchDistSaveShardedStrategy())
        blocked = time.perf_counter() - start
        shutil.rmtree(path)
        return {"blocked": blocked}

    def async_save() -> dict[str, float]:
        path, start = target(), time.perf_counter()
        request = dist_checkpointing.save(state, str(path), TorchDistSaveShardedStrategy(),
                                          async_sharded_save=True, async_strategy="mcore")
        queue.schedule_async_request(request)
        blocked = time.perf_counter() - start
        queue.maybe_finalize_async_calls(blocking=True)
        total = time.perf_counter() - start
        shutil.rmtree(path)
        return {"blocked": blocked, "total": total}

    load_before = os.getloadavg()
    try:
        runs = timing.alternate({"sync": sync_save, "async": async_save}, opts.repeats)
    finally:
        queue.close()
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    sync = timing.Spread.of([r["blocked"] for r in runs["sync"]])
    blocked = timing.Spread.of([r["blocked"] for r in runs["async"]])
    total = timing.Spread.of([r["total"] for r in runs["async"]])
    ratio = timing.Spread.of([a["blocked"] / s["blocked"]
                              for a, s in zip(runs["async"], runs["sync"], strict=True)])
    print(f"1.3B state: {full_params / 1e9:.3f}B parameters x 14 B; saved share 1/{opts.share}"
          f" = {nbytes / 2**30:.3f} GiB to {root.parent}")
    print(f"sync save, loop blocked (s)   {sync.text()}")
    print(f"async save, loop blocked (s)  {blocked.text()}")
    print(f"async save, write done (s)    {total.text()}")
    print(f"async/sync blocked            {ratio.text()}")
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(json.dumps({"share": opts.share, "bytes": nbytes, "full_parameters": full_params,
                      **sync.flat("sync_blocked_s"), **blocked.flat("async_blocked_s"),
                      **total.flat("async_total_s"), **ratio.flat("async_over_sync_blocked"),
                      "repeats": opts.repeats, "load_before": load_before[0],
                      "load_after": load_after[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
