"""launch on a real SLURM cluster (launch/local_cluster.sh: two emulated nodes): a 2 x 2 CPU
job of the tiny Parcae config, preemption with requeue and exact resume, a job array of two
configs, bounded restarts after crashes (given up after --max-crash-restarts), and a crash
injected mid-training (PARCAE_FAULT): seen at once, requeued and resumed.

Skipped when no cluster answers, unless PARCAE_REQUIRE_SLURM=1 (CI) makes that a failure.
Start one with ``bash launch/local_cluster.sh start`` (root; installs SLURM if needed).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.distributed import ROOT

pytestmark = pytest.mark.slow
TINY = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "511",
        "--log-interval", "1", "--eval-iters", "1"]
ITERS = 12
TWO_BY_TWO = ["--nodes", "2", "--procs-per-node", "2", "--config", "configs/parcae-tiny-cpu.yaml",
              "--", *TINY, "--train-iters", str(ITERS), "--eval-interval", str(ITERS),
              "--save-interval", "5", "--tensor-model-parallel-size", "2"]
FINAL = {"completed", "failed", "cancelled"}


def cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (start one: bash launch/local_cluster.sh start)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    if "is UP" not in ping.stdout:
        return "no slurmctld answers (start one: bash launch/local_cluster.sh start)"
    idle = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    if len(set(idle.stdout.split())) < 2:
        return "the cluster has fewer than 2 nodes (LOCAL_SLURM_NODES=2)"
    return None


@pytest.fixture(scope="module")
def cluster():
    """A running cluster; jobs submitted through ``submit`` are cancelled at the end."""
    problem = cluster_problem()
    if problem:
        if os.environ.get("PARCAE_REQUIRE_SLURM") == "1":
            pytest.fail(f"PARCAE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)


def submit(cluster: list[str], run_dir: Path, *args: str) -> str:
    """``python -m launch.submit --run-dir RUN_DIR ARGS`` (the CLI users run); the job id."""
    split = args.index("--") if "--" in args else len(args)
    cmd = [sys.executable, "-m", "launch.submit", "--run-dir", str(run_dir), *args[:split],
           "--", *args[split + 1:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = json.loads((run_dir / "launch.json").read_text())["job_id"]
    cluster.append(job)
    return job


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True, timeout=30)
    return out.returncode == 0 and bool(out.stdout.strip())


def status(run_dir: Path) -> str | None:
    path = run_dir / "state" / "status"
    return path.read_text().strip() if path.exists() else None


def diagnostics(run_dir: Path) -> str:
    parts = []
    for path in sorted(run_dir.rglob("*.log")) + sorted(run_dir.rglob("slurm-*.out")):
        parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)[-12000:]


def wait_done(job: str, run_dirs: list[Path], timeout: float = 600) -> None:
    """Until the job has left the queue and every run directory reports a final status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not in_queue(job) and all(status(d) in FINAL for d in run_dirs):
            return
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True, timeout=60)
    raise AssertionError(f"job {job} not done in {timeout}s:\n"
                         + "\n".join(diagnostics(d) for d in run_dirs))


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "telemetry.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("type") == "train":
            out.append(record)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per iteration; a resumed attempt's later record of an iteration wins."""
    return {r["iteration"]: r["loss"] for r in train_records(run_dir)}


def trained(run_dir: Path, attempt: int) -> list[int]:
    """Iterations an attempt trained, from Megatron's log line on the last rank."""
    text = (run_dir / "logs" / f"attempt-{attempt}" / "rank-3.log").read_text()
    return [int(m) for m in re.findall(rf"\] iteration +(\d+)/ *{ITERS} \|", text)]


def checkpoint_iteration(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory) -> Path:
    """One uninterrupted 2-node x 2-process job: checked below and the reference losses."""
    run_dir = tmp_path_factory.mktemp("launch") / "straight"
    job = submit(cluster, run_dir, *TWO_BY_TWO)
    wait_done(job, [run_dir])
    return run_dir


def test_two_node_job_runs_all_ranks_and_checkpoints(straight):
    assert status(straight) == "completed", diagnostics(straight)
    logs = straight / "logs" / "attempt-1"
    nodes = set()
    for rank in range(4):
        text = (logs / f"rank-{rank}.log").read_text()
        first = text.splitlines()[0]
        assert first.startswith(f"[launch.rank] rank {rank}/4 local {rank % 2}/2 node "), first
        nodes.add(first.split(" node ")[1].split()[0])
    assert nodes == {"n1", "n2"}
    rank0 = (logs / "rank-0.log").read_text()
    assert "using world size: 4" in rank0 and "tensor-model-parallel size: 2" in rank0
    assert trained(straight, 1) == list(range(1, ITERS + 1))
    steps = train_records(straight)
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert checkpoint_iteration(straight) == ITERS
    assert (straight / "checkpoints" / f"iter_{ITERS:07d}").is_dir()
    assert "training finished" in (straight / "launch.log").read_text()
    assert list(straight.glob("slurm-*.out"))


def test_preempted_job_requeues_and_resumes_exactly(cluster, straight, tmp_path):
    run_dir = tmp_path / "preempted"
    job = submit(cluster, run_dir, *TWO_BY_TWO)
    deadline = time.time() + 300
    while not any(r["iteration"] >= 2 for r in train_records(run_dir)):
        assert time.time() < deadline and status(run_dir) not in FINAL, diagnostics(run_dir)
        time.sleep(0.2)
    # What SLURM does ahead of the time limit (#SBATCH --signal=B:USR1@...):
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)
    wait_done(job, [run_dir])
    log = (run_dir / "launch.log").read_text()
    assert status(run_dir) == "completed", diagnostics(run_dir)
    assert (run_dir / "state" / "attempts").read_text().strip() == "2", log
    assert "attempt 1: got SIGUSR1" in log and "requeueing" in log
    stopped = re.search(r"attempt 1: training stopped \(exit code 0\) with its newest "
                        r"checkpoint at iteration (\d+); requeueing", log)
    assert stopped, log
    checkpoint = int(stopped.group(1))
    assert 2 <= checkpoint < ITERS
    assert trained(run_dir, 1) == list(range(1, checkpoint + 1))
    assert trained(run_dir, 2) == list(range(checkpoint + 1, ITERS + 1))
    assert f"newest checkpoint: iteration {checkpoint}" in log.split("attempt 2: start")[1]
    rank0 = (run_dir / "logs" / "attempt-2" / "rank-0.log").read_text()
    assert f"successfully loaded checkpoint from {run_dir / 'checkpoints'}" in rank0
    assert f"at iteration {checkpoint}" in rank0
    expected, got = losses(straight), losses(run_dir)
    assert got.keys() == expected.keys() == set(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert got[it] == expected[it], f"iteration {it}: {got[it]!r} != {expected[it]!r}"


def test_array_of_two_configs_runs_both(cluster, tmp_path):
    sweep = tmp_path / "pair.yaml"
    sweep.write_text("concurrency: 2\nruns:\n  - configs/parcae-tiny-cpu.yaml\n"
                     "  - config: configs/transformer-tiny-cpu.yaml\n    name: baseline\n")
    root = tmp_path / "pair"
    job = submit(cluster, root, "--sweep", str(sweep), "--", *TINY, "--train-iters", "3",
                 "--eval-interval", "3")
    runs = [root / "0-parcae-tiny-cpu", root / "1-baseline"]
    wait_done(job, runs)
    for run_dir, preset in zip(runs, ("parcae-tiny", "transformer-tiny")):
        assert status(run_dir) == "completed", diagnostics(run_dir)
        assert f"preset: {preset}" in (run_dir / "config.yaml").read_text()
        assert [r["iteration"] for r in train_records(run_dir)] == [1, 2, 3]
        assert checkpoint_iteration(run_dir) == 3
    assert sorted(p.name for p in root.glob("slurm-*.out")) == [f"slurm-{job}_0.out",
                                                                f"slurm-{job}_1.out"]


def test_crashing_job_is_restarted_a_bounded_number_of_times(cluster, tmp_path):
    run_dir = tmp_path / "crash"
    job = submit(cluster, run_dir, "--config", "configs/parcae-tiny-cpu.yaml", "--module",
                 "tests.launch_fixtures.crash", "--max-crash-restarts", "1")
    wait_done(job, [run_dir], timeout=300)
    log = (run_dir / "launch.log").read_text()
    assert status(run_dir) == "failed", log
    assert (run_dir / "state" / "attempts").read_text().strip() == "2", log
    reason = "rank-0.log:RuntimeError: launch test: simulated crash"
    assert "attempt 1: training crashed (exit code 1)" in log and "restart 1 of 1" in log
    assert "attempt 2: training crashed (exit code 1)" in log and "giving up" in log
    assert log.count(reason) == 2, log


# --- a crash mid-training (training/faults.py): seen at once, requeued, resumed ----------------
FAULTY = ["--nodes", "2", "--procs-per-node", "1", "--config", "configs/parcae-tiny-cpu.yaml"]
FAULTY_TRAIN = ["--", *TINY, "--train-iters", "4", "--eval-interval", "4", "--save-interval", "2"]
FAULT_LINE = re.compile(r"fault injection \(PARCAE_FAULT=[^)]*\): raise on rank 1 at step 3 "
                        r"\[([0-9T:.-]+)\]")


def fault_to_attempt_end(run_dir: Path, attempt: int) -> float:
    """Seconds from the injected fault (rank 1's stamp) to launch.log's crash line."""
    rank1 = (run_dir / "logs" / f"attempt-{attempt}" / "rank-1.log").read_text()
    match = FAULT_LINE.search(rank1)
    assert match, rank1[-3000:]
    fired = datetime.fromisoformat(match.group(1)).timestamp()
    log = (run_dir / "launch.log").read_text()
    end = re.search(rf"\[launch ([0-9-]+ [0-9:]+)\] job \d+ attempt {attempt}: training "
                    r"crashed", log)
    assert end, log
    seconds = datetime.strptime(end.group(1), "%Y-%m-%d %H:%M:%S").timestamp() - fired
    print(f"{run_dir.name} attempt {attempt}: fault -> attempt ended in {seconds:.0f} s")
    return seconds


def test_crash_in_first_attempt_requeues_resumes_and_completes(cluster, tmp_path):
    run_dir = tmp_path / "crash-once"
    job = submit(cluster, run_dir, *FAULTY, "--env", "PARCAE_FAULT=raise@step=3,rank=1,attempt=1",
                 *FAULTY_TRAIN)
    wait_done(job, [run_dir], timeout=600)
    log = (run_dir / "launch.log").read_text()
    assert status(run_dir) == "completed", diagnostics(run_dir)
    assert (run_dir / "state" / "attempts").read_text().strip() == "2", log
    reason = ("rank-1.log:error: rank 1 failed at step 3: InjectedFault: fault injection "
              "(PARCAE_FAULT=raise@step=3,rank=1,attempt=1): raise on rank 1 at step 3; "
              "restart 1 of 2; requeueing")
    assert "attempt 1: training crashed (exit code " in log and reason in log, log
    assert fault_to_attempt_end(run_dir, 1) < 60
    assert "attempt 2: start" in log and "newest checkpoint: iteration 2" in log.split(
        "attempt 2: start")[1]
    rank0 = (run_dir / "logs" / "attempt-2" / "rank-0.log").read_text()
    assert "successfully loaded checkpoint" in rank0 and "at iteration 2" in rank0
    assert "fault injection" not in rank0 + (run_dir / "logs" / "attempt-2" / "rank-1.log"
                                             ).read_text()
    assert [r["iteration"] for r in train_records(run_dir)] == [1, 2, 3, 4]
    assert checkpoint_iteration(run_dir) == 4


def rank_environments(tmp_path: Path, visible: str) -> dict[int, dict]:
    """srun 2 nodes x 2 tasks of ``launch.rank`` with the environment-recording fixture; each
    task's shell first sets CUDA_VISIBLE_DEVICES to ``visible`` (bash, per task)."""
    out = tmp_path / visible.replace("$", "").replace(",", "_")
    out.mkdir()
    body = (f'export CUDA_VISIBLE_DEVICES="{visible}"; exec {sys.executable} -m launch.rank '
            f'--module tests.launch_fixtures.rank_env -- {out}')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=2", "--job-name=bind-test",
                           "bash", "-c", body], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("rank-*.json")}


def test_one_gpu_per_task_binding_maps_every_rank_to_device_0(cluster, tmp_path):
    """``--gpus-per-task=1``: SLURM gives each task one device, which the task sees as cuda:0.
    This cluster has no GPUs, so each task's shell sets the list SLURM would set (one device
    id, the task's own); launch.rank must then hand Megatron LOCAL_RANK 0 on every rank, and
    with the node's whole list visible LOCAL_RANK stays SLURM's local index."""
    bound = rank_environments(tmp_path, "$SLURM_LOCALID")
    assert sorted(bound) == [0, 1, 2, 3]
    for rank, seen in bound.items():
        assert seen["LOCAL_RANK"] == "0", seen  # torch.cuda.set_device(0): the only device
        assert seen["CUDA_VISIBLE_DEVICES"] == seen["SLURM_LOCALID"] == str(rank % 2), seen
        assert seen["PARCAE_TASK_LOCAL_RANK"] == str(rank % 2)
        assert (seen["WORLD_SIZE"], seen["LOCAL_WORLD_SIZE"]) == ("4", "2")
        assert seen["NODE_RANK"] == str(rank // 2)
        assert seen["SLURMD_NODENAME"] == f"n{rank // 2 + 1}"
    shared = rank_environments(tmp_path, "0,1")
    for rank, seen in shared.items():
        assert seen["LOCAL_RANK"] == seen["SLURM_LOCALID"] == str(rank % 2), seen
