"""One srun task = one rank: set torch.distributed's variables from SLURM's, then become the
trainer (``exec``, so signals reach it directly).

    srun ... python -m launch.rank [--module parcae_megatron.train] -- TRAIN_ARGS...

``MASTER_ADDR`` and ``MASTER_PORT`` come from the batch script (the first node of the job).
``LOCAL_RANK`` is the task's device index among the GPUs it sees (``bind_device``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from parcae_megatron import cli


def rank_env(slurm: Mapping[str, str]) -> dict[str, str]:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK`` of a task."""
    world = int(slurm["SLURM_NTASKS"])
    nodes = int(slurm.get("SLURM_JOB_NUM_NODES") or slurm.get("SLURM_NNODES") or 1)
    per_node = slurm.get("SLURM_NTASKS_PER_NODE", "")
    local_world = int(per_node) if per_node.isdigit() else world // nodes
    return {"RANK": slurm["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": slurm["SLURM_LOCALID"], "LOCAL_WORLD_SIZE": str(local_world),
            "NODE_RANK": slurm.get("SLURM_NODEID", "0")}


def bind_device(env: dict[str, str], visible: str | None) -> dict[str, str]:
    """``env`` with ``LOCAL_RANK`` made an index into this task's ``CUDA_VISIBLE_DEVICES``.

    Megatron calls ``torch.cuda.set_device(LOCAL_RANK)``. Where SLURM binds one GPU to each
    task (``--gpus-per-task=1``, ``--gpu-bind=single:1``) a task sees one device, cuda:0,
    whatever its local rank, so local rank 1 would fail with "invalid device ordinal": the
    task's device is then 0. SLURM's own local index stays in ``SLURM_LOCALID`` (and in
    ``PARCAE_TASK_LOCAL_RANK``). With no devices listed (CPU jobs) or one device per local
    rank, ``env`` is returned unchanged. Raises ``ValueError`` when several devices are
    visible but fewer than the local rank needs.
    """
    if not visible or not visible.strip():
        return env
    devices = [d for d in visible.split(",") if d.strip()]
    local = int(env["LOCAL_RANK"])
    out = dict(env, PARCAE_TASK_LOCAL_RANK=env["LOCAL_RANK"])
    if len(devices) == 1:
        out["LOCAL_RANK"] = "0"
    elif local >= len(devices):
        raise ValueError(f"local rank {local} but this task sees {len(devices)} GPUs "
                         f"(CUDA_VISIBLE_DEVICES={visible}): give each task one GPU "
                         "(--gpus-per-task=1) or all of the node's")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = cli.ArgumentParser(prog="python -m launch.rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="parcae_megatron.train",
                        help="the Python module each rank runs (its arguments follow --)")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    try:
        env = bind_device(rank_env(os.environ), os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    os.environ.update(env)
    node = os.environ.get("SLURMD_NODENAME", "?")
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = f" gpus {gpus} device {env['LOCAL_RANK']}" if gpus else ""
    print(f"[launch.rank] rank {env['RANK']}/{env['WORLD_SIZE']} local "
          f"{env.get('PARCAE_TASK_LOCAL_RANK', env['LOCAL_RANK'])}/{env['LOCAL_WORLD_SIZE']} "
          f"node {node} ({env['NODE_RANK']}){device} master {master} pid {os.getpid()}",
          file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", args.module, *train_args])


if __name__ == "__main__":
    main()
