"""Render the sbatch script of a job: ``#SBATCH`` header, settings, the job body.

Every user-supplied value reaches bash through :func:`shlex.quote` (assignments, arrays,
exports), so no value can run a command. ``#SBATCH`` lines are read by sbatch, not by the
shell; their values are checked instead (no line breaks, a conservative character set for
names and paths, where ``%`` would also be a SLURM filename pattern).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

BODY = Path(__file__).with_name("job_body.sh")
WARNING_SIGNALS = ("USR1", "USR2")

_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # job name, partition, account, qos
_TIME = re.compile(r"[0-9][0-9:-]*")  # SLURM time formats: M, M:S, H:M:S, D-H, D-H:M:S
_PATH = re.compile(r"/[A-Za-z0-9_./+@=-]*")  # absolute path used in #SBATCH --output
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """A job setting that cannot be rendered safely; the message says which and why."""


@dataclass(frozen=True)
class JobSpec:
    """Cluster resources and launcher settings shared by every run of a submission."""

    repo: Path
    python: str
    module: str = "parcae_megatron.train"
    job_name: str = "parcae"
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int = 1
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    sbatch_flags: tuple[str, ...] = ()
    srun_flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    warning_signal: str = "USR1"
    warning_seconds: int = 300
    max_crash_restarts: int = 2
    master_port: int | None = None
    array_limit: int | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class RunSpec:
    """One training run: its directory, checkpoint directory and full training arguments."""

    run_dir: Path
    checkpoint_dir: Path
    train_args: tuple[str, ...] = ()


def _check_line(what: str, value: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise LaunchError(f"{what} must not contain a line break or NUL: {value!r}")
    return value


def _check(what: str, value: str, pattern: re.Pattern[str], allowed: str) -> str:
    _check_line(what, value)
    if not pattern.fullmatch(value):
        raise LaunchError(f"{what} {value!r} is not allowed: use {allowed}")
    return value


def check_output_dir(path: Path) -> Path:
    """A directory that appears in ``#SBATCH --output`` (SLURM expands ``%`` there)."""
    _check("the run directory", str(path), _PATH,
           "an absolute path of letters, digits and _ . / + @ = -")
    return path


def validate(job: JobSpec, runs: list[RunSpec]) -> None:
    """Raise :class:`LaunchError` for any setting that cannot go into the script."""
    if not runs:
        raise LaunchError("nothing to run")
    for what, number, least in (("--nodes", job.nodes, 1),
                                ("--gpus-per-node", job.gpus_per_node, 0),
                                ("--procs-per-node", job.procs_per_node, 1),
                                ("--warning-time", job.warning_seconds, 1),
                                ("--max-crash-restarts", job.max_crash_restarts, 0)):
        if number < least:
            raise LaunchError(f"{what} must be at least {least} (got {number})")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise LaunchError("--cpus-per-task must be at least 1")
    if job.array_limit is not None and job.array_limit < 1:
        raise LaunchError("--array-limit must be at least 1")
    if job.master_port is not None and not 1024 <= job.master_port <= 65535:
        raise LaunchError("--master-port must be in 1024..65535")
    if job.warning_signal not in WARNING_SIGNALS:
        raise LaunchError(f"--warning-signal must be one of {', '.join(WARNING_SIGNALS)}")
    _check("--job-name", job.job_name, _NAME, "letters, digits and _ . + -")
    for what, value in (("--partition", job.partition), ("--account", job.account),
                        ("--qos", job.qos)):
        if value is not None:
            _check(what, value, _NAME, "letters, digits and _ . + -")
    if job.time is not None:
        _check("--time", job.time, _TIME, "a SLURM time such as 04:00:00 or 2-00:00:00")
    for flag in job.sbatch_flags:
        _check_line("an --sbatch flag", flag)
        if not flag.startswith("-"):
            raise LaunchError(f"an --sbatch flag must start with '-': {flag!r}")
    for key, _ in job.env:
        if not _ENV_KEY.fullmatch(key):
            raise LaunchError(f"--env name {key!r} is not a valid variable name")
    for run in runs:
        check_output_dir(run.run_dir)


# srun flags that choose how GPUs are bound to tasks; one of them in --srun replaces ours.
GPU_BINDING_FLAGS = ("--gpu-bind", "--gpus-per-task", "--gpus", "--gpus-per-node", "--gres",
                     "--tres-per-task")


def srun_flags(job: JobSpec, runs: list[RunSpec], output_dir: Path) -> list[str]:
    """Flags for the training step: GPU binding, the container (pyxis/enroot), the user's extras.

    A GPU job's tasks each see all of their node's GPUs (``--gpus-per-node=N
    --gpu-bind=none``), whatever a site's default binding is: CUDA peer-to-peer (NVLink)
    between the ranks of a node needs every rank to see the other GPUs; ``launch.rank`` then
    gives each rank its own device. A binding flag among ``--srun`` replaces this. The
    container sees the repository, the submission directory and every checkpoint directory at
    their own paths, plus ``--container-mounts``.
    """
    flags: list[str] = []
    if job.gpus_per_node and not any(f.split("=")[0] in GPU_BINDING_FLAGS
                                     for f in job.srun_flags):
        flags += [f"--gpus-per-node={job.gpus_per_node}", "--gpu-bind=none"]
    if job.container_image:
        dirs = [job.repo, output_dir]
        dirs += [r.checkpoint_dir for r in runs if not r.checkpoint_dir.is_relative_to(output_dir)]
        for path in dirs:
            if any(c in str(path) for c in ":,\n"):
                raise LaunchError(f"cannot mount {path} in the container (':' or ',' in it)")
        mounts = [f"{path}:{path}" for path in dict.fromkeys(dirs)] + list(job.container_mounts)
        flags += [f"--container-image={job.container_image}",
                  f"--container-mounts={','.join(mounts)}", f"--container-workdir={job.repo}"]
    return flags + list(job.srun_flags)


def header(job: JobSpec, output: str, array_size: int) -> list[str]:
    """The ``#SBATCH`` lines."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
             f"#SBATCH --ntasks-per-node={job.procs_per_node}"]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    for flag, value in (("partition", job.partition), ("account", job.account),
                        ("qos", job.qos), ("time", job.time)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH --signal=B:{job.warning_signal}@{job.warning_seconds}",
              "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={output}"]
    if array_size > 1:
        limit = f"%{job.array_limit}" if job.array_limit else ""
        lines.append(f"#SBATCH --array=0-{array_size - 1}{limit}")
    return lines + [f"#SBATCH {flag}" for flag in job.sbatch_flags]


def _array(values: list[str] | tuple[str, ...], indent: str = "") -> str:
    """A bash array literal; long ones get one flag (with its values) per line."""
    words = [shlex.quote(v) for v in values]
    if sum(len(w) + 1 for w in words) < 70:
        return "(" + " ".join(words) + ")"
    groups: list[list[str]] = []
    for value, word in zip(values, words):
        if not groups or (value.startswith("-") and not value.lstrip("-")[:1].isdigit()):
            groups.append([word])
        else:
            groups[-1].append(word)
    body = "".join(f"{indent}    {' '.join(group)}\n" for group in groups)
    return f"(\n{body}{indent})"


def settings(job: JobSpec, runs: list[RunSpec], output_dir: Path) -> list[str]:
    """Bash assignments of every setting, each value quoted."""
    q = shlex.quote
    lines = ["# Settings written by launch.submit; every value is shell-quoted.",
             f"PARCAE_REPO={q(str(job.repo))}",
             f"PARCAE_PYTHON={q(job.python)}",
             f"PARCAE_MODULE={q(job.module)}",
             f"PARCAE_GPUS_PER_NODE={job.gpus_per_node}",
             f"PARCAE_PROCS_PER_NODE={job.procs_per_node}",
             f"PARCAE_WARNING_SIGNAL={job.warning_signal}",
             f"PARCAE_MAX_CRASH_RESTARTS={job.max_crash_restarts}",
             f"PARCAE_MASTER_PORT={job.master_port or ''}",
             f"PARCAE_SRUN_FLAGS={_array(srun_flags(job, runs, output_dir))}"]
    lines += [f"export {key}={q(value)}" for key, value in job.env]
    lines.append('case "${SLURM_ARRAY_TASK_ID:-0}" in')
    for index, run in enumerate(runs):
        lines += [f"    {index})",
                  f"        RUN_DIR={q(str(run.run_dir))}",
                  f"        CKPT_DIR={q(str(run.checkpoint_dir))}",
                  f"        TRAIN_ARGS={_array(run.train_args, 8 * ' ')}",
                  "        ;;"]
    lines += ['    *) echo "no run for array task ${SLURM_ARRAY_TASK_ID:-}" >&2; exit 2 ;;',
              "esac"]
    return lines


def render(job: JobSpec, runs: list[RunSpec], output_dir: Path) -> str:
    """The complete sbatch script for ``runs`` (more than one: a job array).

    ``output_dir`` receives SLURM's batch log (``slurm-<job>.out``).
    """
    validate(job, runs)
    check_output_dir(output_dir)
    pattern = "slurm-%A_%a.out" if len(runs) > 1 else "slurm-%j.out"
    parts = header(job, str(output_dir / pattern), len(runs))
    parts += [""] + settings(job, runs, output_dir)
    return "\n".join(parts) + "\n\n" + BODY.read_text()
