"""Stand-in for srun, scontrol and scancel (installed under those names on PATH).

Each call appends ``{"cmd": NAME, "argv": [...], "env": {...}}`` to the JSON-lines file
``$STUB_LOG`` (env: the rendezvous, device and thread variables and any ``PARCAE_TEST_*``).
``srun`` writes ``$STUB_RANK_LOG_TEXT`` to its ``--output`` file (``%t`` -> 0), sleeps
``$STUB_SRUN_SLEEP`` seconds and exits with ``$STUB_SRUN_EXIT`` (reporting it the way srun
does); ``scontrol show hostnames`` prints n1 and n2.
"""

import json
import os
import sys
import time
from pathlib import Path

KEEP = {"MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_DEBUG",
        "CUDA_DEVICE_MAX_CONNECTIONS", "PYTHONPATH", "PARCAE_EXPECT_GPU"}
name = Path(sys.argv[0]).name
env = {k: v for k, v in os.environ.items() if k in KEEP or k.startswith("PARCAE_TEST_")}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"cmd": name, "argv": sys.argv[1:], "env": env}) + "\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("n1\nn2")
elif name == "srun":
    for arg in sys.argv[1:]:
        if arg.startswith("--output="):
            Path(arg.split("=", 1)[1].replace("%t", "0")).write_text(
                os.environ.get("STUB_RANK_LOG_TEXT", ""))
    time.sleep(float(os.environ.get("STUB_SRUN_SLEEP", "0")))
    code = int(os.environ.get("STUB_SRUN_EXIT", "0"))
    if code:
        print(f"srun: error: n1: task 0: Exited with exit code {code}", file=sys.stderr)
    sys.exit(code)
