"""A failure during training ends every process within a minute (CPU, gloo, the real entry point).

An exception injected with ``PARCAE_FAULT`` at step 3 (1 rank; 2 ranks with TP=2) ends the run
with a non-zero status promptly, names rank, step and exception, leaves no helper process
behind, and keeps the step-2 checkpoint as the recorded one. (That such a checkpoint resumes
bit-exactly is proven elsewhere, one launch each: 1 rank by tests/test_train.py's kill -9 test,
TP=2 by tests/test_launch_cluster.py's preempted job, DP=2 + distributed optimizer by the
rehearsal and tests/test_async_save.py.) A rank SIGKILLed mid-step makes
the other rank give up by itself (plain processes, no torchrun to tear it down). Fault-spec
parsing is unit-tested.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from parcae_megatron.training import failfast, faults
from tests.distributed import ROOT
from tests.training_runs import TINY, command

ITERS = 4
# nproc, flags, faulty rank. A 2-rank run with a fault on rank 1 is the case torchrun must tear
# down; TP=2 makes that rank hold half of every matrix. A bit-exact resume from a TP=2
# checkpoint is tests/test_launch_cluster.py::test_preempted_job_requeues_and_resumes_exactly
# (TP=2 x DP=2, every loss compared with an uninterrupted job's); 1 rank's is
# tests/test_train.py::test_kill9_resume_is_bit_exact.
LAYOUTS = {"1rank": (1, [], 0),
           "tp2": (2, ["--tensor-model-parallel-size", "2"], 1)}
PROMPT_S = 60  # a failure must end the run within this many seconds
TIMEOUT_MIN = 1  # --distributed-timeout-minutes of the SIGKILL test (the shortest there is)
FAULT_STAMP = re.compile(r"fault injection \(PARCAE_FAULT=[^)]*\): \w+ on rank \d+ at step \d+ "
                         r"\[([0-9T:.-]+)\]")


def run_args(run_dir: Path, flags: list[str]) -> list[str]:
    return [*TINY, "--train-iters", str(ITERS), "--lr-wsd-decay-iters", "2", "--eval-interval",
            str(ITERS), "--save", str(run_dir), "--load", str(run_dir), "--save-interval", "2",
            *flags]


def fault_time(log: str) -> float:
    """When the injected fault fired (the stamp the faulty rank prints)."""
    match = FAULT_STAMP.search(log)
    assert match, log[-3000:]
    return datetime.fromisoformat(match.group(1)).timestamp()


def session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_with_fault(cmd: list[str], env: dict, fault: str, log: Path) -> tuple[int, float, bool]:
    """Run ``cmd`` with ``PARCAE_FAULT=fault``; (status, seconds from fault to exit, whether any
    process of the run, helpers included, was still alive 10 s after the exit)."""
    proc = subprocess.Popen(cmd, env={**env, "PARCAE_FAULT": fault}, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=600)
    finally:
        ended = time.time()
        if proc.returncode is None:
            proc.kill()
    deadline = time.time() + 10
    while session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    lingering = session_alive(proc.pid)
    if lingering:
        os.killpg(proc.pid, signal.SIGKILL)
    return code, ended - fault_time(log.read_text()), lingering


@pytest.fixture(scope="module", params=list(LAYOUTS))
def failed_run(request, tmp_path_factory) -> dict:
    """Per layout: a run failing at step 3 on the faulty rank."""
    nproc, flags, rank = LAYOUTS[request.param]
    base = tmp_path_factory.mktemp(request.param)
    run_dir = base / "failed"
    cmd, env = command(nproc, *run_args(run_dir, flags))
    log = base / "failed.log"
    code, seconds, lingering = run_with_fault(cmd, env, f"raise@step=3,rank={rank}", log)
    print(f"{request.param}: fault -> every process ended in {seconds:.1f} s")
    return {"rank": rank, "nproc": nproc, "code": code, "seconds": seconds,
            "lingering": lingering, "log": log.read_text(), "run_dir": run_dir,
            "checkpoint": (run_dir / "latest_checkpointed_iteration.txt").read_text().strip()}


@pytest.mark.slow
def test_exception_ends_every_process_promptly(failed_run):
    log, rank = failed_run["log"], failed_run["rank"]
    assert failed_run["code"] != 0, log[-3000:]
    assert failed_run["seconds"] < PROMPT_S, (failed_run["seconds"], log[-3000:])
    assert not failed_run["lingering"], "a process of the failed run outlived it"
    summary = (f"error: rank {rank} failed at step 3: InjectedFault: fault injection "
               f"(PARCAE_FAULT=raise@step=3,rank={rank}): raise on rank {rank} at step 3")
    assert summary in log, log[-3000:]
    assert "Traceback (most recent call last)" in log
    if failed_run["nproc"] == 2:  # torchrun names the failed rank and its status
        assert re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*: 1", log)


@pytest.mark.slow
def test_previous_checkpoint_stays_the_recorded_one(failed_run):
    """The step-2 save is recorded and complete; its bit-exact resume: see LAYOUTS."""
    assert failed_run["checkpoint"] == "2"
    assert (failed_run["run_dir"] / "iter_0000002" / ".metadata").is_file()
    assert not (failed_run["run_dir"] / "iter_0000004").exists()


@pytest.mark.slow
def test_killed_rank_makes_the_other_exit_within_the_timeout(tmp_path):
    """No torchrun: rank 0 must notice on its own (dead peer or --distributed-timeout-minutes)."""
    run_dir = tmp_path / "killed"
    cmd, env = command(1, *run_args(run_dir, []), "--distributed-timeout-minutes",
                        str(TIMEOUT_MIN))
    env = {**env, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "PARCAE_FAULT": "kill@step=3,rank=1"}
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank-{rank}.log")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    try:
        killed = procs[1].wait(timeout=600)
        fired = fault_time(logs[1].read_text())
        survivor = procs[0].wait(timeout=TIMEOUT_MIN * 60 + PROMPT_S)
        seconds = time.time() - fired
    finally:
        for proc in procs:  # and helpers the SIGKILLed rank orphaned
            if session_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
    log0 = logs[0].read_text()
    print(f"rank 1 SIGKILLed -> rank 0 ended in {seconds:.1f} s")
    assert killed == -signal.SIGKILL
    assert survivor == 1, log0[-3000:]
    assert seconds < TIMEOUT_MIN * 60 + 15, seconds
    assert "error: rank 0 failed at step 3: RuntimeError:" in log0, log0[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_fault_spec_parsing():
    assert faults.parse("raise@step=3,rank=1") == faults.Fault("raise", 3, 1, None,
                                                                "raise@step=3,rank=1")
    fault = faults.parse(" kill@step=5,attempt=1 ")
    assert (fault.action, fault.step, fault.rank, fault.attempt) == ("kill", 5, 0, 1)
    assert fault.matches(5, 0, 1) and not fault.matches(5, 0, 2) and not fault.matches(4, 0, 1)
    assert faults.parse("nan@step=2,rank=1").action == "nan"
    assert faults.parse("nan_grad@step=2,rank=1").action == "nan_grad"
    assert faults.from_env({}) is None and faults.from_env({"PARCAE_FAULT": " "}) is None
    for bad in ("explode@step=3", "raise", "raise@rank=1", "raise@step=0", "raise@step=x",
                "raise@step=3,step=4", "raise@step=3,node=1", "hang@step=2,rank=-1"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)


def test_attempt_of_a_job():
    assert faults.current_attempt({}) == 1
    assert faults.current_attempt({"SLURM_RESTART_COUNT": "2"}) == 3
    assert faults.current_attempt({"PARCAE_ATTEMPT": "4", "SLURM_RESTART_COUNT": "0"}) == 4


def test_bad_fault_spec_is_a_configuration_error(monkeypatch, capsys):
    """What ``python -m parcae_megatron.train`` does with it, before any rank starts."""
    monkeypatch.setenv("PARCAE_FAULT", "raise@step=three")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        faults.from_env_or_exit()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: PARCAE_FAULT='raise@step=three': step must be an integer\n")


def test_summary_line():
    exc = RuntimeError("view size is not compatible\nwith input tensor's size")
    assert failfast.describe(exc, 1, 3) == ("error: rank 1 failed at step 3: RuntimeError: "
                                            "view size is not compatible")
    assert failfast.describe(KeyboardInterrupt(), 0, None) == (
        "error: rank 0 failed before training started: KeyboardInterrupt")


def _deaf_to_sigterm(ready) -> None:  # what Megatron's worker_init_fn makes a data-loader worker
    signal.signal(signal.SIGTERM, lambda *_: None)
    ready.set()
    while True:
        time.sleep(1)


def _stop_a_deaf_helper() -> None:
    """The scenario, in a process of its own: ``stop_helper_processes`` stops every child of
    the calling process, and pytest's own (a checkpoint writer's queue manager started by an
    earlier test) must survive for the tests after this one."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_deaf_to_sigterm, args=(ready,), daemon=True)
    child.start()
    assert ready.wait(30)
    child.terminate()  # what multiprocessing does at exit, then joins: forever
    child.join(1)
    assert child.is_alive()
    assert failfast.stop_helper_processes() >= 1
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL


def test_helpers_that_ignore_sigterm_are_stopped():
    scenario = multiprocessing.get_context("fork").Process(target=_stop_a_deaf_helper)
    scenario.start()
    scenario.join(60)
    assert scenario.exitcode == 0  # an assertion failed inside it otherwise (its traceback)
