"""Submit ``parcae_megatron.train`` to SLURM: write a run directory, then ``sbatch`` it.

    python -m launch.submit --config configs/parcae-1.3b.yaml --nodes 2 --gpus-per-node 8 \\
        --partition batch --account proj --time 04:00:00 -- \\
        --data-path 1.0 data/fineweb_text_document --tokenizer-model data/tokenizer.model

Flags after ``--`` go to the trainer. Several ``--config`` (or ``--sweep FILE``) make a job
array with one run directory per element. The run directory gets the sbatch script
(``job.sbatch``), a copy of the config (``config.yaml``, what the job reads), ``launch.json``
(git commit, the exact commands, the settings) and, once running, ``checkpoints/``,
``telemetry.jsonl``, ``launch.log`` and ``logs/attempt-N/rank-R.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from launch import sweep as sweeps
from launch.sbatch import WARNING_SIGNALS, JobSpec, LaunchError, RunSpec, check_output_dir, render
from parcae_megatron import cli
from parcae_megatron.config_file import ConfigFileError, flag_value, load_config, standalone_text

REPO = Path(__file__).resolve().parents[1]
TRAINER = "parcae_megatron.train"  # the module each rank runs unless --module says otherwise


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m launch.submit", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--config", action="append", type=Path, default=[],
                      help="training config (YAML); repeat for a job array")
    what.add_argument("--sweep", type=Path, help="sweep file: a list of configs as a job array")
    what.add_argument("--run-dir", type=Path,
                      help="new directory for this submission (default RUNS_ROOT/NAME-TIME)")
    what.add_argument("--runs-root", type=Path, default=Path("runs"),
                      help="where new run directories go (default ./runs)")
    what.add_argument("--python", help="python on the nodes (default: the repo's .venv/bin/python"
                      "; with --container-image, that venv if install.sh --container made it"
                      ", else python)")
    what.add_argument("--module", default=TRAINER,
                      help="module each rank runs (the default check of the training flags "
                           "applies to the trainer only)")
    res = p.add_argument_group("cluster")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=0, help="0 for a CPU job (gloo)")
    res.add_argument("--procs-per-node", type=int,
                     help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    res.add_argument("--cpus-per-task", type=int)
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--time", help="time limit, e.g. 04:00:00")
    res.add_argument("--job-name", help="default: the config's (or sweep's) name")
    res.add_argument("--container-image", help="pyxis/enroot image for the training step")
    res.add_argument("--container-mounts", action="append", default=[],
                     help="extra SRC:DST mount for the container (the repo is always mounted)")
    res.add_argument("--sbatch", action="append", default=[], metavar="FLAG",
                     help="extra sbatch flag, e.g. --sbatch=--exclusive (repeatable)")
    res.add_argument("--srun", action="append", default=[], metavar="FLAG",
                     help="extra srun flag for the training step, e.g. --srun=--cpu-bind=none")
    res.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for the job (repeatable)")
    job = p.add_argument_group("preemption, restarts, arrays")
    job.add_argument("--warning-signal", choices=WARNING_SIGNALS, default="USR1",
                     help="signal SLURM sends before the time limit (default USR1)")
    job.add_argument("--warning-time", type=int, default=300,
                     help="seconds before the time limit to send it; leave time for a "
                          "checkpoint (default 300)")
    job.add_argument("--max-crash-restarts", type=int, default=2,
                     help="requeues in a row after a crash, or after a stop that wrote no "
                          "new checkpoint (default 2); then the job gives up")
    job.add_argument("--master-port", type=int, help="rendezvous port (default: from job id)")
    job.add_argument("--array-limit", type=int,
                     help="array elements running at once (default: sweep's concurrency)")
    act = p.add_argument_group("action")
    act.add_argument("--validate", action="store_true",
                     help="check every run's configuration with the trainer first, as the "
                          "job's ranks (slower; adds Megatron's own validation)")
    act.add_argument("--no-check", dest="check", action="store_false",
                     help="skip the default check of the training flags, config keys, paths "
                          "and layout (one process, before anything is written), e.g. when "
                          "this machine cannot see the data")
    act.add_argument("--dry-run", action="store_true",
                     help="write the run directory and print the script; do not submit")
    return p


def config_keys(config: Path) -> set[str]:
    """The flags a YAML config sets, as ``--flag-name`` (empty if it is not a mapping)."""
    try:
        data = load_config(config)
    except ConfigFileError as exc:
        raise LaunchError(str(exc)) from exc
    return {"--" + str(k).replace("_", "-") for k in data}


def train_args(run_dir: Path, user: tuple[str, ...], config: Path) -> tuple[list[str], Path]:
    """The trainer's arguments for a run and its checkpoint directory.

    Defaults (checkpoints and telemetry in the run directory) come first so that the user's
    flags win; ``--load`` follows ``--save`` so a requeued job resumes from its own checkpoints.
    Megatron needs a ``--save-interval`` with ``--save``: 1000 unless the config or the flags
    give one (a checkpoint is also written on the warning signal and at the end).
    """
    save = flag_value(user, "--save")
    load = flag_value(user, "--load")
    ckpt = Path(save).resolve() if save else run_dir / "checkpoints"
    args = ["--config", str(run_dir / "config.yaml")]
    if save is None:
        args += ["--save", str(ckpt)]
    if load is None:
        args += ["--load", str(ckpt)]
    if flag_value(user, "--save-interval") is None and "--save-interval" not in config_keys(config):
        args += ["--save-interval", "1000"]
    if flag_value(user, "--telemetry-path") is None:
        args += ["--telemetry-path", str(run_dir / "telemetry.jsonl")]
    args.append("--exit-signal-handler")
    if load is not None and Path(load).resolve() != ckpt:
        print(f"warning: --load {load} differs from the checkpoint directory {ckpt}: "
              "a requeued job resumes from --load", file=sys.stderr)
    return args + list(user), ckpt


def git_state(repo: Path) -> dict[str, object]:
    """Commit and whether tracked files differ from it (``None`` outside git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    diff = git("diff", "HEAD") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": bool(diff), "diff": diff}


def default_python(container: str | None) -> str:
    """The repository's .venv python; in a container, only a venv that sees the image's
    packages (``scripts/install.sh --container``), else the image's ``python``."""
    venv = REPO / ".venv" / "bin" / "python"
    if container:
        cfg = REPO / ".venv" / "pyvenv.cfg"
        made_for_image = cfg.exists() and "include-system-site-packages = true" in \
            cfg.read_text().splitlines()
        return str(venv) if made_for_image else "python"
    return str(venv) if venv.exists() else sys.executable


def parse_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"--env expects NAME=VALUE, got {item!r}")
        pairs.append((key, value))
    return tuple(pairs)


def new_dir(path: Path) -> Path:
    """Create ``path``; it must not exist already (or be empty)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LaunchError(f"run directory {path} already exists; choose a new --run-dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def validate_config(job: JobSpec, run: RunSpec, config: Path) -> None:
    """Run the trainer's ``--validate-only`` as ``job.world_size`` ranks, on this machine and
    with the source config (the run directory does not exist yet)."""
    env = dict(os.environ, WORLD_SIZE=str(job.world_size), RANK="0", LOCAL_RANK="0",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(job.repo))
    args = [job.python, "-m", job.module, *run.train_args, "--config", str(config),
            "--validate-only"]
    proc = subprocess.run(args, cwd=job.repo, env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        detail = lines[-1].removeprefix("error: ") if lines else proc.stderr.strip()[-2000:]
        raise LaunchError(f"{config.name}: configuration rejected: {detail}")


def check_flags(job: JobSpec, run: RunSpec, config: Path) -> None:
    """The trainer's checks that need no rank (config keys, flags, paths, refusals, layout
    for the job's world size), in this process and with the source config."""
    import logging
    import warnings

    # A CPU job's trainer runs the CPU backend, which puts these first (train.py).
    cpu = ["--transformer-impl", "local", "--distributed-backend", "gloo"]
    argv = [*(cpu if not job.gpus_per_node else []), *run.train_args, "--config", str(config)]
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Megatron's import notes on missing TE / Apex
        from parcae_megatron.training import megatron_patches
        from parcae_megatron.training.validation import check_command_line
        megatron_patches.install("check", argv)
        try:
            check_command_line(argv, world_size=job.world_size)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None


def plan_of(opts: argparse.Namespace) -> sweeps.Sweep:
    if opts.sweep and opts.config:
        raise LaunchError("give --config or --sweep, not both")
    if opts.sweep:
        return sweeps.load(opts.sweep)
    if opts.config:
        return sweeps.Sweep(name=None, elements=[sweeps.element(c) for c in opts.config])
    raise LaunchError("nothing to run: give --config (or --sweep)")


def job_of(opts: argparse.Namespace, plan: sweeps.Sweep) -> JobSpec:
    array = len(plan.elements) > 1
    return JobSpec(
        repo=REPO, python=opts.python or default_python(opts.container_image),
        module=opts.module, job_name=opts.job_name or plan.name or plan.elements[0].name,
        nodes=opts.nodes, gpus_per_node=opts.gpus_per_node,
        procs_per_node=opts.procs_per_node or opts.gpus_per_node or 1,
        cpus_per_task=opts.cpus_per_task, partition=opts.partition, account=opts.account,
        qos=opts.qos, time=opts.time, container_image=opts.container_image,
        container_mounts=tuple(opts.container_mounts), sbatch_flags=tuple(opts.sbatch),
        srun_flags=tuple(opts.srun), env=parse_env(opts.env),
        warning_signal=opts.warning_signal, warning_seconds=opts.warning_time,
        max_crash_restarts=opts.max_crash_restarts, master_port=opts.master_port,
        array_limit=opts.array_limit or (plan.concurrency if array else None))


def write_run_dirs(root: Path, job: JobSpec, plan: sweeps.Sweep, runs: list[RunSpec],
                   script: str, argv: list[str]) -> dict:
    """The submission directory (script, provenance) and one directory per run; the record
    that goes to ``launch.json``."""
    array = len(runs) > 1
    new_dir(root)
    git = git_state(REPO)
    if git["dirty"]:
        (root / "git.diff").write_text(str(git["diff"]))
    script_path = root / "job.sbatch"
    script_path.write_text(script)
    script_path.chmod(0o755)
    if plan.source:
        shutil.copyfile(plan.source, root / "sweep.yaml")
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "git": {"commit": git["commit"], "dirty": git["dirty"]},
              "submit_command": [sys.executable, "-m", "launch.submit", *argv],
              "sbatch_command": ["sbatch", "--parsable", str(script_path)],
              "job": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()},
              "sweep": str(plan.source.resolve()) if plan.source else None, "runs": []}
    for index, (elem, run) in enumerate(zip(plan.elements, runs)):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # self-contained (a base: chain merged): the job does not depend on other config files
        (run.run_dir / "config.yaml").write_text(standalone_text(elem.config))
        entry = {"array_index": index if array else None, "name": elem.name,
                 "run_dir": str(run.run_dir), "config_source": str(elem.config),
                 "checkpoint_dir": str(run.checkpoint_dir),
                 "train_command": [job.python, "-m", "launch.rank", "--module", job.module,
                                   "--", *run.train_args]}
        record["runs"].append(entry)
        if array:
            (run.run_dir / "launch.json").write_text(json.dumps(
                {**entry, "sweep_dir": str(root), "git": record["git"]}, indent=2) + "\n")
    (root / "launch.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def submit(argv: list[str] | None = None) -> Path:
    """Parse, write the run directory, submit unless --dry-run. Returns the directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser().parse_args(argv[:split])
    plan = plan_of(opts)
    job = job_of(opts, plan)
    root = opts.run_dir or opts.runs_root / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = check_output_dir(root.resolve())
    array = len(plan.elements) > 1
    runs = []
    for index, elem in enumerate(plan.elements):
        run_dir = root / f"{index}-{elem.name}" if array else root
        user = (*plan.args, *argv[split + 1:], *elem.args)
        args, ckpt = train_args(run_dir, user, elem.config)
        runs.append(RunSpec(run_dir=run_dir, checkpoint_dir=ckpt, train_args=tuple(args)))
    script = render(job, runs, root)
    # Before anything is written, a job that cannot start is never queued. The check is the
    # trainer's: another --module takes flags the trainer does not know.
    if opts.check and job.module == TRAINER:
        for elem, run in zip(plan.elements, runs):
            check_flags(job, run, elem.config)
    if opts.validate:
        for elem, run in zip(plan.elements, runs):
            validate_config(job, run, elem.config)
    record = write_run_dirs(root, job, plan, runs, script, argv)
    if opts.dry_run:
        print(script, end="")
        print(f"# dry run: wrote {root}; submit with: sbatch {shlex.quote(str(root))}/job.sbatch",
              file=sys.stderr)
        return root
    proc = subprocess.run(record["sbatch_command"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    record["job_id"] = proc.stdout.strip().split(";")[0]
    (root / "launch.json").write_text(json.dumps(record, indent=2) + "\n")
    kind = f"job array of {len(runs)}" if array else "job"
    print(f"submitted {kind} {record['job_id']}: {root}")
    return root


def main(argv: list[str] | None = None) -> None:
    try:
        submit(argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
