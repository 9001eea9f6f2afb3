"""One srun task = one rank: set torch.distributed's variables from SLURM's, then become the
trainer (``exec``, so signals reach it directly).

    srun ... python -m launch.rank [--module parcae_megatron.train] -- TRAIN_ARGS...

``MASTER_ADDR`` and ``MASTER_PORT`` come from the batch script (the first node of the job).
``LOCAL_RANK`` is the task's device index among the GPUs it sees (``bind_device``), whatever
the binding: the node's whole list, one GPU per task, or a socket's GPUs (``closest``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

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


def device_index(local: int, visible: list[str], peers: Mapping[int, str]) -> int:
    """This task's device: its position among the node's tasks that see the same devices.

    ``peers`` maps every local task of the node to its ``CUDA_VISIBLE_DEVICES``. Where all
    tasks see the node's whole list this is the local rank; with ``--gpu-bind=closest`` (the
    tasks on a socket see that socket's GPUs) it is the task's rank among its socket's tasks,
    whichever way SLURM spread the tasks over the sockets. Raises ``ValueError`` when more
    tasks share a list than it has devices.
    """
    mine = ",".join(visible)
    sharing = sorted(task for task, seen in peers.items() if seen == mine)
    position = sharing.index(local)
    if position >= len(visible):
        raise ValueError(f"{len(sharing)} tasks of this node see the {len(visible)} GPUs "
                         f"{mine}: give each task one GPU of its own")
    return position


def node_peers(visible: str, local: int, local_world: int, key: str, root: Path,
               timeout: float = 120.0) -> dict[int, str]:
    """Every local task's ``CUDA_VISIBLE_DEVICES``, exchanged through files in ``root``.

    Each task of the node writes its list to ``root/parcae-gpu-bind-KEY/LOCAL`` (written
    under a temporary name and renamed, so a reader never sees half of it) and waits until all
    ``local_world`` tasks have. ``root`` must be node-local (``/tmp``); ``KEY`` names the job,
    step, attempt and node, so a requeued job never reads its predecessor's lists.
    """
    folder = root / f"parcae-gpu-bind-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{local}.{os.getpid()}"
    partial.write_text(visible)
    os.replace(partial, folder / str(local))
    deadline = time.monotonic() + timeout
    while True:
        done = [p for p in folder.iterdir() if p.name.isdigit()]
        if len(done) >= local_world:
            return {int(p.name): p.read_text() for p in done}
        if time.monotonic() > deadline:
            raise ValueError(f"only {len(done)} of the {local_world} tasks of this node said "
                             f"which GPUs they see within {timeout:.0f} s ({folder})")
        time.sleep(0.05)


def bind_device(env: dict[str, str], visible: str | None,
                peers: Callable[[], Mapping[int, str]] | None = None) -> dict[str, str]:
    """``env`` with ``LOCAL_RANK`` made an index into this task's ``CUDA_VISIBLE_DEVICES``.

    Megatron calls ``torch.cuda.set_device(LOCAL_RANK)``, an index among the devices the task
    sees. Where it sees one (``--gpus-per-task=1``, ``--gpu-bind=single:1``, ``map_gpu``) that
    is 0; where it sees at least as many as the node has tasks (the node's whole list, the
    default ``--gpus-per-node`` binding) the local rank; where it sees a part of the node's
    GPUs shared with other tasks (``--gpu-bind=closest``: a socket's GPUs) its position among
    those tasks, from ``peers()`` (every local task's list; :func:`node_peers`). SLURM's own
    local index stays in ``SLURM_LOCALID`` and ``PARCAE_TASK_LOCAL_RANK``. With no devices
    listed (CPU jobs) ``env`` is returned unchanged. Raises ``ValueError`` where tasks would
    have to share a device.
    """
    if not visible or not visible.strip():
        return env
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    local, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    out = dict(env, PARCAE_TASK_LOCAL_RANK=env["LOCAL_RANK"])
    if len(devices) == 1:
        out["LOCAL_RANK"] = "0"
    elif len(devices) < local_world:
        if peers is None:
            raise ValueError(f"this task sees {len(devices)} of its node's GPUs ({visible}) "
                             f"and {local_world} tasks run there: which one is its own "
                             "needs the other tasks' lists")
        out["LOCAL_RANK"] = str(device_index(local, devices, peers()))
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
    env = rank_env(os.environ)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    key = ".".join(os.environ.get(name, "0") for name in (
        "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "PARCAE_ATTEMPT")) + \
        "." + os.environ.get("SLURMD_NODENAME", "node")
    try:
        env = bind_device(env, visible, lambda: node_peers(
            ",".join(d.strip() for d in visible.split(",") if d.strip()),
            int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]), key,
            Path(tempfile.gettempdir())))
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
