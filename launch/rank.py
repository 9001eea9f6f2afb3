"""One srun task = one rank: set torch.distributed's variables from SLURM's, then become the
trainer (``exec``, so signals reach it directly).

    srun ... python -m launch.rank [--module parcae_megatron.train] -- TRAIN_ARGS...

``MASTER_ADDR`` and ``MASTER_PORT`` come from the batch script (the first node of the job).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping


def rank_env(slurm: Mapping[str, str]) -> dict[str, str]:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK`` of a task."""
    world = int(slurm["SLURM_NTASKS"])
    nodes = int(slurm.get("SLURM_JOB_NUM_NODES") or slurm.get("SLURM_NNODES") or 1)
    per_node = slurm.get("SLURM_NTASKS_PER_NODE", "")
    local_world = int(per_node) if per_node.isdigit() else world // nodes
    return {"RANK": slurm["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": slurm["SLURM_LOCALID"], "LOCAL_WORLD_SIZE": str(local_world),
            "NODE_RANK": slurm.get("SLURM_NODEID", "0")}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.rank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="parcae_megatron.train",
                        help="the Python module each rank runs (its arguments follow --)")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    env = rank_env(os.environ)
    os.environ.update(env)
    node = os.environ.get("SLURMD_NODENAME", "?")
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    print(f"[launch.rank] rank {env['RANK']}/{env['WORLD_SIZE']} local {env['LOCAL_RANK']}"
          f"/{env['LOCAL_WORLD_SIZE']} node {node} ({env['NODE_RANK']}) master {master} "
          f"pid {os.getpid()}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", args.module, *train_args])


if __name__ == "__main__":
    main()
