"""launch: sbatch rendering, quoting, --dry-run, sweeps, and the job body's signal, requeue and
restart logic run by bash against stand-ins for srun/scontrol/scancel (no cluster needed).
The jobs on a real SLURM cluster are in test_launch_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.rank import bind_device, rank_env
from launch.sbatch import JobSpec, LaunchError, RunSpec, render
from tests.distributed import ROOT

TINY = ROOT / "configs" / "parcae-tiny-cpu.yaml"
EVIL = ["$(touch MARKS/a)", "`touch MARKS/b`", "x; touch MARKS/c", "'; touch MARKS/d; '",
        '"; touch MARKS/e; "', "a\nb\\ $HOME * ?", "--flag=$(touch MARKS/f)", "\\", "${IFS}",
        "x\n touch MARKS/g"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m launch.submit --no-check ARGS`` as a user runs it (the default check of the
    training flags, which needs data, is in test_cli_errors.py)."""
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--no-check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.submit failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def stubs(tmp_path) -> dict[str, str]:
    """An environment whose srun/scontrol/scancel are the recording stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = (ROOT / "tests" / "launch_fixtures" / "stub_slurm.py").read_text()
    for name in ("srun", "scontrol", "scancel"):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{stub}")
        path.chmod(0o755)
    drop = ("SLURM", "OMP_NUM_THREADS", "CUDA_", "NCCL_", "MASTER_", "PARCAE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return dict(env, PATH=f"{bin_dir}:{os.environ['PATH']}",
                STUB_LOG=str(tmp_path / "calls.jsonl"), SLURM_JOB_ID="77",
                SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2")


def records(env: dict[str, str], cmd: str) -> list[dict]:
    """The stand-in's record of every call of ``cmd``: argv and selected environment."""
    path = Path(env["STUB_LOG"])
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if r["cmd"] == cmd]


def calls(env: dict[str, str], cmd: str) -> list[list[str]]:
    return [r["argv"] for r in records(env, cmd)]


def run_job(script: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**env, **extra}, capture_output=True,
                          text=True, timeout=60)


def dry_run(run_dir: Path, *args: str, train: tuple[str, ...] = ()) -> Path:
    cli("--config", str(TINY), "--run-dir", str(run_dir), "--dry-run", *args, "--", *train)
    return run_dir / "job.sbatch"


def test_dry_run_writes_run_dir_with_key_lines(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("--config", str(TINY), "--nodes", "4", "--gpus-per-node", "8", "--partition",
               "batch", "--account", "proj", "--qos", "high", "--time", "04:00:00",
               "--job-name", "p13b", "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3",
               "--sbatch=--exclusive", "--srun=--cpu-bind=none", "--run-dir", str(run_dir),
               "--warning-time", "600", "--dry-run", "--",
               "--tensor-model-parallel-size", "2", "--train-iters", "10")
    script = proc.stdout
    for line in ["#!/bin/bash", "#SBATCH --job-name=p13b", "#SBATCH --nodes=4",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=batch", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --time=04:00:00", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/slurm-%j.out",
                 "#SBATCH --exclusive", "PARCAE_GPUS_PER_NODE=8", "PARCAE_PYTHON=python",
                 f"        RUN_DIR={run_dir}", f"        CKPT_DIR={run_dir}/checkpoints",
                 f"            --config {run_dir}/config.yaml",
                 f"            --save {run_dir}/checkpoints",
                 f"            --load {run_dir}/checkpoints",
                 "            --exit-signal-handler", "            --tensor-model-parallel-size 2"]:
        assert line in script.splitlines(), line
    assert ("PARCAE_SRUN_FLAGS=(\n    --gpus-per-node=8\n    --gpu-bind=none\n"
            "    '--container-image=nvcr.io#nvidia/pytorch:25.01-py3'\n"
            f"    --container-mounts={ROOT}:{ROOT},{run_dir}:{run_dir}\n"
            f"    --container-workdir={ROOT}\n    --cpu-bind=none\n)\n") in script
    for fragment in ['STEP_FLAGS=(--nodes="$SLURM_JOB_NUM_NODES"',
                     '--output="$LOG_DIR/rank-%t.log"', 'scontrol requeue "$SLURM_JOB_ID"',
                     'scancel --signal=TERM "$SLURM_JOB_ID"',
                     "export NCCL_DEBUG=", "export CUDA_DEVICE_MAX_CONNECTIONS="]:
        assert fragment in script, fragment
    assert (run_dir / "job.sbatch").read_text() == script
    assert (run_dir / "config.yaml").read_text() == TINY.read_text()
    record = json.loads((run_dir / "launch.json").read_text())
    assert len(record["git"]["commit"]) == 40 and "job_id" not in record
    assert record["submit_command"][-4:] == ["--tensor-model-parallel-size", "2",
                                             "--train-iters", "10"]
    assert record["runs"][0]["train_command"][:3] == ["python", "-m", "launch.rank"]
    assert "dry run" in proc.stderr and "sbatch" in proc.stderr
    assert subprocess.run(["bash", "-n", str(run_dir / "job.sbatch")]).returncode == 0


def test_job_runs_one_task_per_rank_with_cpu_defaults(tmp_path, stubs):
    script = dry_run(tmp_path / "run", "--nodes", "2", "--procs-per-node", "2",
                     "--env", "PARCAE_TEST_VALUE=42", train=("--train-iters", "3"))
    proc = run_job(script, stubs, SLURM_CPUS_PER_TASK="3")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    [record] = records(stubs, "srun")
    srun, env = record["argv"], record["env"]
    assert env["PARCAE_TEST_VALUE"] == "42" and env["CUDA_VISIBLE_DEVICES"] == ""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert env["MASTER_ADDR"] == "n1" and 10000 <= int(env["MASTER_PORT"]) < ephemeral_low
    assert env["OMP_NUM_THREADS"] == "3" and "NCCL_DEBUG" not in env
    assert "PARCAE_EXPECT_GPU" not in env  # a CPU job may use the CPU backend
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    args = json.loads((run_dir / "launch.json").read_text())["runs"][0]["train_command"]
    assert srun == ["--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
                    f"--output={run_dir}/logs/attempt-1/rank-%t.log", "--cpus-per-task=3",
                    *args]
    assert args[:5] == [str(ROOT / ".venv" / "bin" / "python"), "-m", "launch.rank",
                        "--module", "parcae_megatron.train"]
    assert (run_dir / "state" / "status").read_text().strip() == "completed"
    assert "training finished" in (run_dir / "launch.log").read_text()


def test_gpu_job_sees_the_nodes_gpus_and_expects_cuda(tmp_path, stubs):
    """A GPU job: every task sees all of its node's GPUs (CUDA P2P between ranks), the ranks
    are told to expect CUDA, and the rendezvous port is below the ephemeral range."""
    script = dry_run(tmp_path / "run", "--nodes", "2", "--gpus-per-node", "4")
    proc = run_job(script, stubs)
    assert proc.returncode == 0, proc.stderr
    [record] = records(stubs, "srun")
    assert record["argv"][4:6] == ["--gpus-per-node=4", "--gpu-bind=none"]
    assert record["env"]["PARCAE_EXPECT_GPU"] == "1" and "CUDA_VISIBLE_DEVICES" not in record["env"]
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert int(record["env"]["MASTER_PORT"]) == 10000 + (77 % ((low - 10000) // 4)) * 4 + 1
    # A binding of the user's own replaces the default.
    script = dry_run(tmp_path / "own", "--gpus-per-node", "8", "--srun=--gpu-bind=closest")
    assert "--gpu-bind=none" not in script.read_text()
    assert "--gpu-bind=closest" in script.read_text()


def test_rank_environment_from_slurm(tmp_path):
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    assert rank_env(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                               "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "1"}
    env = dict(os.environ, **slurm, PYTHONPATH=str(ROOT), MASTER_ADDR="n1", MASTER_PORT="123",
               SLURMD_NODENAME="n2")
    proc = subprocess.run([sys.executable, "-m", "launch.rank", "--module",
                           "tests.launch_fixtures.crash", "--", "--x", "a b"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "[launch.rank] rank 5/8 local 1/4 node n2 (1) master n1:123" in proc.stderr
    assert "crash fixture started with ['--x', 'a b']" in proc.stdout
    assert "RuntimeError: launch test: simulated crash" in proc.stderr


def test_shell_metacharacters_cannot_execute(tmp_path, stubs):
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = [e.replace("MARKS", str(marks)) for e in EVIL]
    config = tmp_path / f"c {evil[0]}; {evil[2]}.yaml".replace("/", "_")
    config.write_text(f"# {evil[1]}\n" + TINY.read_text() + f'data-cache-path: "{evil[0]}"\n')
    run_dir = tmp_path / "run"
    cli("--config", str(config), "--run-dir", str(run_dir), "--dry-run", "--nodes", "2",
        "--env", f"PARCAE_TEST_EVIL={evil[3]}", "--srun", evil[0], "--python", evil[2],
        "--module", evil[1], "--", *evil)
    proc = run_job(run_dir / "job.sbatch", stubs)
    assert proc.returncode == 0, proc.stderr
    assert list(marks.iterdir()) == []
    [record] = records(stubs, "srun")
    srun = record["argv"]
    assert record["env"]["PARCAE_TEST_EVIL"] == evil[3]
    assert srun[4:] == [evil[0], evil[2], "-m", "launch.rank", "--module", evil[1], "--",
                        "--config", str(run_dir / "config.yaml"),
                        "--save", str(run_dir / "checkpoints"),
                        "--load", str(run_dir / "checkpoints"), "--save-interval", "1000",
                        "--telemetry-path", str(run_dir / "telemetry.jsonl"),
                        "--exit-signal-handler", *evil]
    assert (run_dir / "config.yaml").read_text() == config.read_text()
    script = (run_dir / "job.sbatch").read_text()
    assert f"export PARCAE_TEST_EVIL={evil[3]}" not in script


@pytest.mark.parametrize("args, message", [
    (["--job-name", "a;b"], "--job-name 'a;b' is not allowed"),
    (["--partition", "gpu $(id)"], "--partition 'gpu $(id)' is not allowed"),
    (["--time", "1h"], "--time '1h' is not allowed"),
    (["--sbatch", "--comment=x\n#SBATCH --wrap=id"], "must not contain a line break"),
    (["--sbatch", "exclusive"], "must start with '-'"),
    (["--env", "A;B=1"], "not a valid variable name"),
    (["--env", "NOVALUE"], "--env expects NAME=VALUE"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--master-port", "80"], "--master-port must be in"),
])
def test_unsafe_or_invalid_settings_are_refused(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc = cli("--config", str(TINY), "--run-dir", str(run_dir), "--dry-run", *args,
               check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("name", ["with space", "pct%j", "semi;colon", "dollar$x"])
def test_run_dir_with_special_characters_is_refused(tmp_path, name):
    proc = cli("--config", str(TINY), "--run-dir", str(tmp_path / name), "--dry-run",
               check=False)
    assert proc.returncode == 2 and "the run directory" in proc.stderr, proc.stderr
    assert not (tmp_path / name).exists()


def test_existing_run_dir_and_missing_config_are_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    proc = cli("--config", str(TINY), "--run-dir", str(tmp_path / "run"), "--dry-run",
               check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = cli("--config", "nope.yaml", "--dry-run", check=False)
    assert proc.returncode == 2 and "config file not found: nope.yaml" in proc.stderr


def test_user_checkpoint_settings_are_kept(tmp_path):
    script = dry_run(tmp_path / "run", train=("--save", str(tmp_path / "ck"))).read_text()
    assert f"        CKPT_DIR={tmp_path}/ck" in script
    assert f"            --load {tmp_path}/ck" in script
    assert script.count("--save ") == 1
    assert "            --save-interval 1000\n" in script  # Megatron needs one with --save
    script = dry_run(tmp_path / "own", train=("--save-interval", "3")).read_text()
    assert "--save-interval 1000" not in script and "--save-interval 3" in script
    big = cli("--config", "configs/parcae-1.3b.yaml", "--run-dir", str(tmp_path / "big"),
              "--dry-run").stdout
    assert "--save-interval" not in big  # the config sets it


def test_sweep_file_becomes_an_array(tmp_path):
    sweep = tmp_path / "isoflop.yaml"
    sweep.write_text(
        "concurrency: 2\nargs: [--train-iters, 3]\nruns:\n"
        f"  - {TINY}\n"
        "  - config: configs/transformer-tiny-cpu.yaml\n    name: base line\n"
        "    args: [--lr, 0.001]\n")
    root = tmp_path / "sweep"
    proc = cli("--sweep", str(sweep), "--run-dir", str(root), "--dry-run", "--", "--seed", "7")
    script = proc.stdout
    assert "#SBATCH --job-name=isoflop" in script
    assert "#SBATCH --array=0-1%2" in script
    assert f"#SBATCH --output={root}/slurm-%A_%a.out" in script
    assert f"        RUN_DIR={root}/0-parcae-tiny-cpu" in script
    assert f"        RUN_DIR={root}/1-base-line" in script
    assert script.count("            --train-iters 3\n            --seed 7\n") == 2
    assert "            --seed 7\n            --lr 0.001\n" in script
    assert (root / "1-base-line" / "config.yaml").read_text() == (
        ROOT / "configs" / "transformer-tiny-cpu.yaml").read_text()
    assert (root / "sweep.yaml").read_text() == sweep.read_text()
    element = json.loads((root / "0-parcae-tiny-cpu" / "launch.json").read_text())
    assert element["array_index"] == 0 and element["sweep_dir"] == str(root)
    two = cli("--config", str(TINY), "--config", "configs/transformer-tiny-cpu.yaml",
              "--array-limit", "1", "--run-dir", str(tmp_path / "two"), "--dry-run").stdout
    assert "#SBATCH --array=0-1%1" in two and "1-transformer-tiny-cpu" in two


@pytest.mark.parametrize("text, message", [
    ("runs: []\n", "expected a list of runs"),
    ("runs: [missing.yaml]\n", "config file not found: missing.yaml"),
    ("runs: [configs/parcae-tiny-cpu.yaml]\nlimit: 2\n", "unknown keys ['limit']"),
    ("runs: [{config: configs/parcae-tiny-cpu.yaml, args: --x}]\n", "args must be a list"),
    ("concurrency: 0\nruns: [configs/parcae-tiny-cpu.yaml]\n", "concurrency must be"),
])
def test_bad_sweep_files_are_refused(tmp_path, text, message):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(text)
    proc = cli("--sweep", str(sweep), "--run-dir", str(tmp_path / "r"), "--dry-run",
               check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_render_validates_programmatic_specs(tmp_path):
    job = JobSpec(repo=ROOT, python="python", job_name="x y")
    with pytest.raises(LaunchError, match="--job-name"):
        render(job, [RunSpec(run_dir=tmp_path, checkpoint_dir=tmp_path)], tmp_path)
    with pytest.raises(LaunchError, match="nothing to run"):
        render(JobSpec(repo=ROOT, python="python"), [], tmp_path)


def warn_during_step(script: Path, env: dict[str, str],
                     sig: int = signal.SIGUSR1) -> subprocess.CompletedProcess:
    """Run the job body and send it the warning signal while its step runs."""
    before = len(calls(env, "srun"))
    job = subprocess.Popen(["bash", str(script)], env={**env, "STUB_SRUN_SLEEP": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(calls(env, "srun")) == before:
        assert time.time() < deadline, "srun was not called"
        time.sleep(0.05)
    time.sleep(0.2)
    job.send_signal(sig)
    out, err = job.communicate(timeout=60)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def test_warning_signal_stops_ranks_then_requeues(tmp_path, stubs):
    run_dir = tmp_path / "run"
    script = dry_run(run_dir, "--warning-signal", "USR2")
    proc = warn_during_step(script, stubs, signal.SIGUSR2)
    assert proc.returncode == 0, proc.stderr
    assert calls(stubs, "scancel") == [["--signal=TERM", "77"]]
    assert ["requeue", "77"] in calls(stubs, "scontrol")
    assert (run_dir / "state" / "status").read_text().strip() == "requeued"
    log = (run_dir / "launch.log").read_text()
    assert "got SIGUSR2" in log and "requeueing" in log
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("6")
    proc = run_job(script, stubs)  # SLURM starts the requeued job again
    assert proc.returncode == 0, proc.stderr
    log = (run_dir / "launch.log").read_text()
    assert "job 77 attempt 2: start" in log and "newest checkpoint: iteration 6" in log
    assert (run_dir / "state" / "status").read_text().strip() == "completed"
    assert (run_dir / "logs" / "attempt-2").is_dir()


def test_stops_without_new_checkpoints_are_bounded(tmp_path, stubs):
    run_dir = tmp_path / "run"
    script = dry_run(run_dir, "--max-crash-restarts", "1")
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
    proc = warn_during_step(script, stubs)  # a new checkpoint (4): progress
    assert proc.returncode == 0 and "iteration 4; requeueing" in proc.stderr, proc.stderr
    proc = warn_during_step(script, stubs)  # still 4, e.g. the time limit is too short
    assert proc.returncode == 0 and "restart 1 of 1; requeueing" in proc.stderr
    proc = warn_during_step(script, stubs)
    assert proc.returncode == 1 and "giving up: 2 attempts in a row" in proc.stderr
    assert (run_dir / "state" / "status").read_text().strip() == "failed"
    assert calls(stubs, "scontrol").count(["requeue", "77"]) == 2


def test_sigterm_cancels_without_requeue(tmp_path, stubs):
    run_dir = tmp_path / "run"
    warn_during_step(dry_run(run_dir), stubs, signal.SIGTERM)
    assert ["requeue", "77"] not in calls(stubs, "scontrol")
    assert (run_dir / "state" / "status").read_text().strip() == "cancelled"


def test_crashes_are_requeued_a_bounded_number_of_times(tmp_path, stubs):
    run_dir = tmp_path / "run"
    script = dry_run(run_dir, "--max-crash-restarts", "2")
    crash = {"STUB_SRUN_EXIT": "1",
             "STUB_RANK_LOG_TEXT": "Traceback (most recent call last):\nRuntimeError: boom\n"}
    for attempt in (1, 2):
        proc = run_job(script, stubs, **crash)
        assert proc.returncode == 0, proc.stderr
        assert (run_dir / "state" / "status").read_text().strip() == "requeued"
        assert f"restart {attempt} of 2" in proc.stderr
    proc = run_job(script, stubs, **crash)
    assert proc.returncode == 1
    assert (run_dir / "state" / "status").read_text().strip() == "failed"
    log = (run_dir / "launch.log").read_text()
    assert "rank-0.log:RuntimeError: boom" in log and "giving up" in log
    assert calls(stubs, "scontrol").count(["requeue", "77"]) == 2
    ckpt = run_dir / "checkpoints"  # a run that made progress gets its restarts back
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("40")
    proc = run_job(script, stubs, **crash)
    assert proc.returncode == 0 and "restart 1 of 2" in proc.stderr


@pytest.mark.slow
def test_validate_checks_configs_as_the_job_world_size(tmp_path):
    tiny = ("--", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511")
    layout = ("--config", str(TINY), "--nodes", "2", "--procs-per-node", "2", "--validate",
              "--dry-run")
    proc = cli(*layout, "--run-dir", str(tmp_path / "bad"), *tiny,
               "--tensor-model-parallel-size", "3", check=False)
    assert proc.returncode == 2
    assert ("parcae-tiny-cpu.yaml: configuration rejected: world size (4) is not divisible"
            in proc.stderr), proc.stderr
    assert not (tmp_path / "bad").exists()
    cli(*layout, "--run-dir", str(tmp_path / "good"), *tiny, "--tensor-model-parallel-size", "2")
    assert (tmp_path / "good" / "job.sbatch").exists()


@pytest.mark.parametrize("code", [2, 3])
def test_invalid_config_or_divergence_is_not_restarted(tmp_path, stubs, code):
    run_dir = tmp_path / "run"
    proc = run_job(dry_run(run_dir), stubs, STUB_SRUN_EXIT=str(code),
                   STUB_RANK_LOG_TEXT="error: 11 consecutive optimizer steps had non-finite\n")
    assert proc.returncode == code
    assert (run_dir / "state" / "status").read_text().strip() == "failed"
    assert f"a rank exited with exit code {code}" in proc.stderr and "not restarting" in proc.stderr
    assert "rank-0.log:error: 11 consecutive" in proc.stderr
    assert ["requeue", "77"] not in calls(stubs, "scontrol")


@pytest.mark.parametrize("visible, local, expected", [
    ("3", "1", "0"),          # --gpus-per-task=1 / map_gpu: the task's only device is cuda:0
    ("GPU-5d2e", "3", "0"),   # the same with a UUID
    ("0,1,2,3", "2", "2"),    # every task sees the node's GPUs: device = local rank
    ("", "1", "1"),           # a CPU job (job_body.sh exports an empty list)
    (None, "1", "1"),
])
def test_local_rank_indexes_the_visible_devices(visible, local, expected):
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": "4",
           "NODE_RANK": "1"}
    bound = bind_device(env, visible)
    assert bound["LOCAL_RANK"] == expected
    assert {k: v for k, v in bound.items() if k not in ("LOCAL_RANK", "PARCAE_TASK_LOCAL_RANK")} \
        == {k: v for k, v in env.items() if k != "LOCAL_RANK"}


SOCKETS = ("0,1,2,3", "4,5,6,7")
# --gpu-bind=closest on 2 sockets x 4 GPUs, 8 tasks: each task sees its socket's GPUs. SLURM
# spreads tasks over sockets in blocks (block:block) or in turn (its default, block:cyclic).
CLOSEST = {"block": {t: SOCKETS[t // 4] for t in range(8)},
           "cyclic": {t: SOCKETS[t % 2] for t in range(8)}}


@pytest.mark.parametrize("layout, devices", [
    ("block", ["0", "1", "2", "3", "4", "5", "6", "7"]),
    ("cyclic", ["0", "4", "1", "5", "2", "6", "3", "7"]),
])
def test_closest_binding_gives_each_task_its_own_gpu_of_its_socket(layout, devices):
    peers = CLOSEST[layout]
    chosen = []
    for local in range(8):
        env = {"RANK": str(8 + local), "WORLD_SIZE": "16", "LOCAL_RANK": str(local),
               "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1"}
        bound = bind_device(env, peers[local], lambda: peers)
        assert bound["PARCAE_TASK_LOCAL_RANK"] == str(local)
        chosen.append(peers[local].split(",")[int(bound["LOCAL_RANK"])])
    assert chosen == devices  # the physical GPU of each local task: all different


def test_map_gpu_and_one_gpu_per_task_need_no_exchange():
    """``--gpu-bind=map_gpu:3,2,1,0`` / ``--gpus-per-task=1``: one device each, cuda:0."""
    def no_exchange():
        raise AssertionError("one visible device needs no exchange")
    for local, gpu in enumerate("3210"):
        env = {"RANK": str(local), "WORLD_SIZE": "4", "LOCAL_RANK": str(local),
               "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "0"}
        assert bind_device(env, gpu, no_exchange)["LOCAL_RANK"] == "0"


def test_more_tasks_than_gpus_in_a_shared_list_is_refused():
    peers = {t: "0,1" for t in range(4)}
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
           "NODE_RANK": "0"}
    with pytest.raises(ValueError, match="4 tasks of this node see the 2 GPUs 0,1"):
        bind_device(env, "0,1", lambda: peers)


def test_closest_binding_through_launch_rank(tmp_path):
    """Four real ``launch.rank`` tasks of one node, two per socket list (SLURM's cyclic
    spread), exchange their lists through files and each takes a different GPU."""
    out = tmp_path / "out"
    out.mkdir()
    procs = []
    for local in range(4):
        slurm = {"SLURM_PROCID": str(local), "SLURM_NTASKS": "4", "SLURM_LOCALID": str(local),
                 "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                 "SLURM_JOB_ID": "91", "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "n1"}
        env = dict(os.environ, **slurm, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path),
                   CUDA_VISIBLE_DEVICES=("0,1", "2,3")[local % 2])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.rank", "--module", "tests.launch_fixtures.rank_env",
             "--", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    seen = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("rank-*")}
    gpus = [seen[r]["CUDA_VISIBLE_DEVICES"].split(",")[int(seen[r]["LOCAL_RANK"])]
            for r in range(4)]
    assert gpus == ["0", "2", "1", "3"]


def test_a_task_whose_peers_never_report_is_one_error_line(tmp_path, monkeypatch):
    import launch.rank
    monkeypatch.setattr(launch.rank.time, "monotonic", iter([0.0, 0.0, 500.0]).__next__)
    with pytest.raises(ValueError, match="only 1 of the 4 tasks of this node said which GPUs"):
        launch.rank.node_peers("0,1", 0, 4, "1.0.0.0.n1", tmp_path)
