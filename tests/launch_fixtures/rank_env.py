"""An entry point that records the environment its rank sees and exits:
`--module tests.launch_fixtures.rank_env -- OUT_DIR` writes OUT_DIR/rank-RANK.json."""

import json
import os
import sys
from pathlib import Path

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_LOCALID",
        "PARCAE_TASK_LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "SLURMD_NODENAME")

if __name__ == "__main__":
    out = Path(sys.argv[1])
    record = {key: os.environ.get(key) for key in KEYS}
    (out / f"rank-{record['RANK']}.json").write_text(json.dumps(record))
