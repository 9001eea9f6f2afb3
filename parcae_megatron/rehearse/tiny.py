"""The rehearsal's short training run: the shipped config with the model swapped for the tiny
preset of its family and the layout and sizes scaled to the CPU; a checkpoint and a resume
that must continue bit-exactly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from parcae_megatron.training.telemetry import read_records

STEPS = 4  # steps of the straight run; the checkpoint is written halfway
MICRO_BATCH = 2
SEQ_LENGTH = 64
# Schedule lengths given in iterations: scaled by STEPS / train-iters with the run.
SCHEDULE_KEYS = ("lr-warmup-iters", "lr-wsd-decay-iters", "lr-decay-iters",
                 "muon-momentum-warmup-iters", "weight-decay-incr-iters")
FP8_KEYS = ("fp8-format", "fp8-recipe", "fp8-param-gather", "tp-only-amax-red",
            "no-stream-ckpt-dequant")


class RehearsalError(RuntimeError):
    """A stage failed; the message is the one `error:` line."""


@dataclass
class TinyPlan:
    """The tiny run's YAML, its extra flags, rank count, and what was changed (for the table)."""

    config: dict
    flags: list[str]
    ranks: int
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def tiny_preset(preset: str | None) -> str:
    """The tiny preset of a preset's family."""
    return "transformer-tiny" if (preset or "").startswith("transformer") else "parcae-tiny"


def te_usable() -> bool:
    """Whether Transformer Engine can run here (it needs CUDA)."""
    import torch

    return importlib.util.find_spec("transformer_engine") is not None and \
        torch.cuda.is_available()


def plan(resolved: dict, layout: dict, user_flags: list[str], max_ranks: int,
         has_data: bool) -> TinyPlan:
    """Derive the tiny run from the resolved config and the real layout (``inspect``'s)."""
    config = dict(resolved)
    changes, skipped = [], []

    def change(key: str, value) -> None:
        old = config.get(key)
        if old != value:
            changes.append(f"{key} {old}->{value}")
            config[key] = value

    change("preset", tiny_preset(resolved.get("preset")))
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    if tp * pp > max_ranks:
        raise RehearsalError(f"TP x PP = {tp * pp} ranks exceed --max-ranks {max_ranks}")
    small_dp = max(1, min(dp, max_ranks // (tp * pp)))
    if small_dp != dp:
        changes.append(f"DP {dp}->{small_dp}")
    accumulation = max(1, layout["global_batch_size"]
                       // (layout["micro_batch_size"] * dp))
    micro = min(MICRO_BATCH, layout["micro_batch_size"])
    change("micro-batch-size", micro)
    change("global-batch-size", micro * small_dp * min(accumulation, 2))
    change("seq-length", SEQ_LENGTH)
    change("max-position-embeddings", SEQ_LENGTH)
    iters = layout["train_iters"]
    change("train-iters", STEPS)
    for key in SCHEDULE_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            change(key, max(1, round(config[key] * STEPS / iters)))
    change("save-interval", STEPS // 2)
    change("eval-interval", STEPS)
    change("eval-iters", 1)
    change("log-interval", 1)
    if not has_data:
        for key, value in (("mock-data", True), ("tokenizer-type", "NullTokenizer"),
                           ("vocab-size", 511)):
            change(key, value)
    if config.get("transformer-impl", "transformer_engine") == "transformer_engine" \
            and not te_usable():
        config.pop("transformer-impl", None)
        why = "no CUDA" if importlib.util.find_spec("transformer_engine") else "no CUDA/TE"
        changes.append("transformer-impl local")
        dropped = [k for k in FP8_KEYS if config.pop(k, None) not in (None, False)]
        if dropped:
            skipped.append(f"FP8 skipped ({why}): trained with the local spec and "
                           f"{'bf16' if config.get('bf16') else 'fp32'}")
    flags = [*user_flags, "--tensor-model-parallel-size", str(tp),
             "--pipeline-model-parallel-size", str(pp)]
    return TinyPlan(config, flags, tp * pp * small_dp, changes, skipped)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ranks: int, args: list[str], log: Path, timeout: float) -> None:
    """Run the real entry point on ``ranks`` CPU ranks (gloo); raise with its error line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               CUDA_VISIBLE_DEVICES="")
    if ranks == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        cmd = [sys.executable, "-m", "parcae_megatron.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "parcae_megatron.train", *args]
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RehearsalError(f"training did not finish in {timeout:.0f} s (log: {log})") \
                from None
    if proc.returncode != 0:
        raise RehearsalError(f"training failed ({proc.returncode}): {first_error(log)}")


def first_error(log: Path) -> str:
    """The first ``error:`` line of a log (without the prefix), else its last line."""
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith("error: "):
            return line[len("error: "):]
    return (lines[-1] if lines else "no output") + f" (log: {log})"


def plan_key(tiny: TinyPlan) -> str:
    """A digest of everything the tiny run depends on besides the code: two rehearsals with the
    same key would run the same commands (used by ``--train-cache``)."""
    text = json.dumps([tiny.config, tiny.flags, tiny.ranks], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(tiny: TinyPlan, workdir: Path, timeout: float) -> str:
    """Straight run with a checkpoint at STEPS/2, then a resume from it; the resumed steps
    must repeat the straight run's loss, grad norm and LR exactly. Returns the detail."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny.config, sort_keys=False))
    straight, resumed = workdir / "straight", workdir / "resumed"
    base = ["--config", str(config), *tiny.flags]
    launch(tiny.ranks, [*base, "--save", str(straight), "--telemetry-path",
                        str(workdir / "straight.jsonl")], workdir / "straight.log", timeout)
    half = STEPS // 2
    name = f"iter_{half:07d}"
    if not (straight / name).is_dir():
        raise RehearsalError(f"no checkpoint at iteration {half} in {straight}")
    shutil.copytree(straight / name, resumed / name)
    (resumed / "latest_checkpointed_iteration.txt").write_text(str(half))
    launch(tiny.ranks, [*base, "--load", str(resumed), "--save", str(resumed),
                        "--telemetry-path", str(workdir / "resumed.jsonl")],
           workdir / "resumed.log", timeout)
    a = {r["iteration"]: r for r in read_records(workdir / "straight.jsonl", "train")}
    b = {r["iteration"]: r for r in read_records(workdir / "resumed.jsonl", "train")}
    steps = list(range(half + 1, STEPS + 1))
    if sorted(b) != steps or any(i not in a for i in steps):
        raise RehearsalError(f"resumed run logged iterations {sorted(b)}, expected {steps}")
    for i in steps:
        for key in ("loss", "grad_norm", "lr"):
            if a[i][key] != b[i][key] or a[i][key] is None:
                raise RehearsalError(f"resume is not exact: iteration {i} {key} "
                                     f"{b[i][key]} vs {a[i][key]} in the straight run")
    losses = " ".join(f"{a[i]['loss']:.4f}" for i in sorted(a))
    return (f"{tiny.ranks} rank(s), {STEPS} steps, checkpoint at {half}, resume bit-exact "
            f"(loss {losses})")
