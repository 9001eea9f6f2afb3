"""Launch the real training entry point (`python -m parcae_megatron.train`) from tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from parcae_megatron.training.telemetry import read_records
from tests.distributed import ROOT

TINY = ["--config", "configs/parcae-tiny-cpu.yaml", "--mock-data", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "511", "--log-interval", "1", "--eval-iters", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc: int, *args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """The command and environment (``env``: extra variables) for ``nproc`` CPU ranks (plain
    python when 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="", **(env or {}))
    if nproc == 1:  # no launcher: signals reach the trainer itself
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        return [sys.executable, "-m", "parcae_megatron.train", *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "parcae_megatron.train", *args], env


def train(nproc: int, *args: str, timeout: int = 600, check: bool = True,
          env: dict | None = None):
    """Run to completion; return the CompletedProcess (raising with the log tail on failure)."""
    cmd, env = command(nproc, *args, env=env)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n"
                             f"{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def start(nproc: int, *args: str, log: Path) -> subprocess.Popen:
    """Start a run in the background (own process group), output to ``log``."""
    cmd, env = command(nproc, *args)
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_iteration(proc: subprocess.Popen, telemetry: Path, iteration: int,
                       timeout: float = 300) -> None:
    """Block until the telemetry file shows ``iteration`` (or fail)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early with {proc.returncode}")
        if any(r["iteration"] >= iteration for r in records(telemetry, "train")):
            return
        time.sleep(0.2)
    raise AssertionError(f"iteration {iteration} not reached in {timeout}s")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to the run's process group and wait for it."""
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=300)


def records(telemetry: Path, kind: str) -> list[dict]:
    """All telemetry records of a type (``train`` / ``validation``), in file order."""
    return read_records(telemetry, kind)


def losses(telemetry: Path) -> dict[int, float]:
    """Per-iteration training loss; a resumed run's later record of an iteration wins."""
    return {r["iteration"]: r["loss"] for r in records(telemetry, "train")}
