"""`python -m parcae_megatron.rehearse CONFIG [--nodes N --gpus-per-node G] [training flags]`
(console command ``parcae-rehearse``): everything about a GPU run that a CPU can check.

Stages, each a row of the printed table (pass / skip / fail, seconds):

1. ``config``  the configuration validated as the trainer does at the real world size
   (N x G ranks) and layout, with the GPU command line (Transformer Engine spec);
2. ``model``   the full-size model on the meta device: parameters, FLOPs/token, and the
   per-GPU memory estimate (model/memory.py) for the configured micro-batch, recompute,
   precision and optimizer;
3. ``data``    the run's data pipeline at full scale (``--data-fraction`` of the samples):
   Megatron's indices and, with ``packing: bestfit``, the packing, through the trainer's
   dataset-build path, on ``--data-path`` or a synthetic corpus of the run's token count
   (lognormal document lengths, mean 1.1k tokens, sparse ``.bin``); time and peak memory;
4. ``train``   the real entry point with everything as shipped except the model (the tiny
   preset of its family), the layout (TP/PP as configured, DP capped so <= --max-ranks ranks)
   and the sizes (sequence 64, micro-batch 2, 4 steps): a checkpoint at step 2 and a resume
   that must repeat steps 3-4 bit for bit;
5. ``slurm``   the SLURM script ``launch.submit`` writes for N x G, checked with ``bash -n``.

Exits 0 when every stage passes or is skipped; at the first failure prints the table and one
``error:`` line (exit 2 for an invalid configuration, 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from parcae_megatron import cli
from parcae_megatron.config_file import ConfigFileError, flag_value, load_config
from parcae_megatron.paths import PROJECT_ROOT, resolve_config
from parcae_megatron.rehearse import tiny
from parcae_megatron.rehearse.tiny import RehearsalError

STAGES = ("config", "model", "data", "train", "slurm")
GIB = 2.0**30


@dataclass
class Row:
    """One stage's outcome."""

    stage: str
    status: str
    seconds: float
    detail: str


def parser() -> argparse.ArgumentParser:
    """The rehearsal's own options; everything else is a training flag."""
    p = cli.ArgumentParser(prog="parcae-rehearse", description=__doc__.split("\n\n")[0],
                                epilog="Unknown flags are training flags (as for "
                                       "parcae_megatron.train), e.g. --data-path, "
                                       "--tokenizer-model, --tensor-model-parallel-size.")
    p.add_argument("config", help="run config (YAML), e.g. configs/parcae-1.3b.yaml")
    p.add_argument("--nodes", type=int,
                   help="default: the config's own shape (see cluster_shape)")
    p.add_argument("--gpus-per-node", type=int, help="default: 8, or fewer for a small run")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="fraction of the run's samples the data stage builds (default 1.0: "
                        "full scale)")
    p.add_argument("--max-ranks", type=int, default=4,
                   help="most CPU ranks of the training stage (default 4)")
    p.add_argument("--skip", action="append", default=[], choices=STAGES,
                   help="skip a stage (repeatable)")
    p.add_argument("--work-dir", type=Path,
                   help="keep everything here (default: a temporary directory, removed)")
    p.add_argument("--train-cache", type=Path,
                   help="directory of passed training stages: a rehearsal whose tiny run is "
                        "identical (same YAML, flags and ranks) reuses the result instead of "
                        "training again (for test suites that rehearse many configs)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds allowed to each subprocess (default 1800)")
    return p


def cluster_shape(resolved: dict, flags: list[str]) -> tuple[int, int]:
    """(nodes, GPUs per node) a config is written for: one micro-batch per data-parallel rank
    and step (global batch / micro-batch replicas, as the paper configs' comments say) times
    TP x PP; 8 GPUs per node, fewer when the whole run needs fewer."""
    def value(key: str, default: int) -> int:
        given = flag_value(flags, f"--{key}")
        return int(given if given is not None else resolved.get(key, default))

    world = (value("global-batch-size", 1) // max(value("micro-batch-size", 1), 1)
             * value("tensor-model-parallel-size", 1) * value("pipeline-model-parallel-size", 1))
    world = max(world, 1)
    per_node = min(8, world)
    return -(-world // per_node), per_node


def _child(stage: str, argv: list[str], env: dict, log: Path,
           timeout: float) -> tuple[dict, float]:
    """Run a ``rehearse.child`` stage; (its JSON, its peak RSS in bytes)."""
    cmd = [sys.executable, "-m", "parcae_megatron.rehearse.child", stage, *argv]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:  # os.wait4 reaps it with its resource usage (peak RSS)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                proc.wait()
                raise RehearsalError(f"{stage} did not finish in {timeout:.0f} s (log: {log})")
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = RehearsalError(tiny.first_error(log))
        err.exit_code = 2 if proc.returncode == 2 else 1
        raise err
    lines = log.read_text().strip().splitlines()
    return json.loads(lines[-1]), usage.ru_maxrss * 1024


def _env(world_size: int) -> dict:
    return dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


class Rehearsal:
    """Runs the stages in order and keeps the table."""

    def __init__(self, opts: argparse.Namespace, flags: list[str], workdir: Path) -> None:
        self.opts, self.workdir = opts, workdir
        self.config = resolve_config(opts.config)
        self.resolved = load_config(self.config)
        self.has_data = "--data-path" in flags
        data = [] if self.has_data else ["--mock-data", "--tokenizer-type", "NullTokenizer",
                                         "--vocab-size", "32768"]
        self.user_flags = flags
        self.argv = ["--config", str(self.config), *data, *flags]
        if opts.nodes is None and opts.gpus_per_node is None:
            opts.nodes, opts.gpus_per_node = cluster_shape(self.resolved, flags)
        opts.nodes = opts.nodes or 1
        opts.gpus_per_node = opts.gpus_per_node or 8
        self.world = opts.nodes * opts.gpus_per_node
        self.rows: list[Row] = []
        self.layout: dict = {}

    def run(self) -> None:
        """Every stage; raises RehearsalError at the first failure."""
        for stage in STAGES:
            start = time.time()
            if stage in self.opts.skip:
                self._row(stage, "skip", 0.0, "--skip")
                continue
            try:
                status, detail = getattr(self, f"stage_{stage}")()
            except RehearsalError as exc:
                self._row(stage, "fail", time.time() - start, str(exc))
                raise
            self._row(stage, status, time.time() - start, detail)

    def _row(self, stage: str, status: str, seconds: float, detail: str) -> None:
        self.rows.append(Row(stage, status, seconds, detail))
        print(f"[rehearse] {stage}: {status} ({seconds:.1f} s)", flush=True)

    def stage_config(self) -> tuple[str, str]:
        info, _ = _child("inspect", self.argv, _env(self.world), self.workdir / "inspect.log",
                         self.opts.timeout)
        self.layout = info
        if "model_error" in info:
            return "pass", f"validated in {info['validate_s']:.1f} s"
        return "pass", (f"{info['world_size']} ranks = TP {info['tp']} x PP {info['pp']} x "
                        f"DP {info['dp']}; micro-batch {info['micro_batch_size']}, global "
                        f"{info['global_batch_size']}, sequence {info['seq_length']}, "
                        f"{info['transformer_impl']}"
                        + (f", FP8 {info['fp8']}" if info["fp8"] else "")
                        + f" (validated in {info['validate_s']:.1f} s)")

    def stage_model(self) -> tuple[str, str]:
        if not self.layout:
            raise RehearsalError("needs the config stage")
        if "model_error" in self.layout:
            raise RehearsalError(self.layout["model_error"])
        info, mem = self.layout, self.layout["memory"]
        return "pass", (f"{info['params']:,} params, {info['flops_per_token']:.3g} FLOPs/token;"
                        f" memory/GPU {mem['total'] / GIB:.1f} GiB allocated (weights "
                        f"{mem['weights'] / GIB:.1f}, grads {mem['gradients'] / GIB:.1f}, "
                        f"optimizer {mem['optimizer state'] / GIB:.1f}, activations "
                        f"{mem['activations'] / GIB:.1f}), {mem['reserved'] / GIB:.1f} "
                        f"reserved, {mem['device'] / GIB:.1f} on the device")

    def stage_data(self) -> tuple[str, str]:
        fraction = self.opts.data_fraction
        info, rss = _child("data", [str(fraction), str(self.workdir), *self.argv],
                           _env(self.world), self.workdir / "data.log", self.opts.timeout)
        source = "--data-path"
        if info["synthetic"]:
            syn = info["synthetic"]
            source = (f"synthetic {syn['tokens'] / 1e9:.3g}B tokens, {syn['documents']:,} docs "
                      f"(mean {syn['mean_length']:.0f}), written in {syn['write_s']:.1f} s")
        scale = "full scale" if fraction >= 1 else f"{fraction:g} of the run's samples"
        packing = "best-fit packing" if info["packing"] == "bestfit" else "concat"
        return "pass", (f"{info['dataset']} ({packing}), {scale}: train/valid/test "
                        f"{'/'.join(f'{n:,}' for n in info['built'])} samples built in "
                        f"{info['build_s']:.1f} s, peak RSS {rss / GIB:.2f} GiB; {source}")

    def stage_train(self) -> tuple[str, str]:
        if not self.layout:
            raise RehearsalError("needs the config stage")
        plan = tiny.plan(self.resolved, self.layout, self.user_flags, self.opts.max_ranks,
                         self.has_data)
        cached = None
        if self.opts.train_cache is not None:
            cached = self.opts.train_cache / f"{tiny.plan_key(plan)}.txt"
            if cached.is_file():
                return "pass", "; ".join([f"same tiny run as {cached.read_text().strip()}",
                                          *plan.skipped])
        detail = tiny.run(plan, self.workdir / "train", self.opts.timeout)
        detail += "; changed: " + ", ".join(plan.changes)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(f"{self.opts.config}: {detail}\n")
        if plan.skipped:
            detail += "; " + "; ".join(plan.skipped)
        return "pass", detail

    def stage_slurm(self) -> tuple[str, str]:
        run_dir = self.workdir / "slurm"
        # --no-check: the rehearsal's check stage has run the trainer's checks already
        cmd = [sys.executable, "-m", "launch.submit", "--config", str(self.config),
               "--nodes", str(self.opts.nodes), "--gpus-per-node", str(self.opts.gpus_per_node),
               "--run-dir", str(run_dir), "--dry-run", "--no-check", "--", *self.user_flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT,
                              timeout=self.opts.timeout)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            raise RehearsalError("launch.submit: " + (lines[0][7:] if lines
                                                      else proc.stderr.strip()[-300:]))
        script = run_dir / "job.sbatch"
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RehearsalError(f"bash -n {script}: {check.stderr.strip()}")
        return "pass", (f"{self.opts.nodes} node(s) x {self.opts.gpus_per_node} GPUs: "
                        f"{len(script.read_text().splitlines())}-line job.sbatch, bash -n clean")

    def table(self) -> str:
        """The stages as a text table."""
        lines = [f"rehearsal of {self.opts.config} at {self.opts.nodes} node(s) x "
                 f"{self.opts.gpus_per_node} GPUs",
                 f"{'stage':<7} {'status':<6} {'time':>8}  detail"]
        lines += [f"{r.stage:<7} {r.status:<6} {r.seconds:7.1f}s  {r.detail}" for r in self.rows]
        if self.layout.get("memory_table"):
            lines += ["", "memory estimate per GPU (model/memory.py):",
                      self.layout["memory_table"]]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse, rehearse, print the table; one ``error:`` line and a non-zero exit on failure."""
    opts, flags = parser().parse_known_args(argv)
    if (opts.nodes or 1) < 1 or (opts.gpus_per_node or 1) < 1 or opts.max_ranks < 1 \
            or not 0 < opts.data_fraction <= 1:
        print("error: --nodes, --gpus-per-node, --max-ranks must be >= 1 and --data-fraction "
              "in (0, 1]", file=sys.stderr)
        raise SystemExit(2)
    workdir = opts.work_dir or Path(tempfile.mkdtemp(prefix="parcae-rehearse-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rehearsal = Rehearsal(opts, flags, workdir)
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    code = 0
    try:
        rehearsal.run()
    except RehearsalError as exc:
        code = getattr(exc, "exit_code", 1)
        failed = rehearsal.rows[-1].stage
        print(rehearsal.table(), flush=True)
        print(f"error: rehearsal stage {failed}: {exc}", file=sys.stderr, flush=True)
    else:
        print(rehearsal.table(), flush=True)
    finally:
        if opts.work_dir is None and code == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        elif code:
            print(f"logs: {workdir}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
