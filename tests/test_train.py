"""The training entry point on Megatron's loop (CPU, gloo): learning, telemetry, exact resume
after kill -9, SIGTERM checkpointing, crash-safe checkpoints, layout parity, fail-fast config
errors."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT
from tests.training_runs import (
    TINY,
    command,
    kill,
    losses,
    records,
    start,
    train,
    wait_for_iteration,
)

pytestmark = pytest.mark.slow
ITERS = 12


def run_args(run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, "--train-iters", str(ITERS), "--lr-wsd-decay-iters", "6",
            "--eval-interval", str(ITERS), "--save", str(run_dir), "--load", str(run_dir),
            "--save-interval", "4", "--telemetry-interval", "2",
            "--tensorboard-dir", str(run_dir / "tb"), *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted 12-step run: the reference for every resume test."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(1, *run_args(run_dir))
    return run_dir


def test_loss_decreases_and_telemetry_complete(straight):
    telemetry = straight / "telemetry.jsonl"
    steps = records(telemetry, "train")
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)
    every = {"loss", "lr", "grad_norm", "skipped", "skipped_total", "tokens_per_s",
             "executed_flops", "depth_mean", "depth_max", "executed_iterations",
             "executed_over_sampled", "grad_depth_mean"}
    for r in steps[1:]:
        assert every <= r.keys(), every - r.keys()
        assert r["executed_over_sampled"] == 1.0 and r["depth_max"] >= 1
    stability = {"state_norm", "residual_norm", "residual_ratio", "decay_min", "decay_mean",
                 "decay_max", "delta_min", "delta_mean", "delta_max", "bbar_spectral_norm",
                 "c_spectral_norm"}
    measured = [r for r in steps if r["iteration"] % 2 == 0]
    assert measured and all(stability <= r.keys() for r in measured)
    assert all(0 < r["decay_max"] < 1 for r in measured)
    validation = records(telemetry, "validation")[0]
    for t in (1, 2, 4, 8):  # default loop counts 1, 2, 4, μ_rec (=4), 2·μ_rec
        assert f"lm_loss_T={t}" in validation
    assert (straight / "tb").is_dir() and any((straight / "tb").iterdir())
    assert (straight / "latest_checkpointed_iteration.txt").read_text().strip() == "12"


def test_kill9_resume_is_bit_exact(straight, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start(1, *run_args(run_dir), log=tmp_path / "first.log")
    wait_for_iteration(proc, run_dir / "telemetry.jsonl", 6)
    assert kill(proc, signal.SIGKILL) != 0
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    train(1, *run_args(run_dir))
    expected, got = losses(straight / "telemetry.jsonl"), losses(run_dir / "telemetry.jsonl")
    assert set(got) == set(range(1, ITERS + 1))
    for it in range(5, ITERS + 1):
        assert got[it] == expected[it], f"iteration {it}: {got[it]!r} != {expected[it]!r}"


def test_sigterm_checkpoints_and_exits_cleanly(straight, tmp_path):
    run_dir = tmp_path / "sigterm"
    proc = start(1, *run_args(run_dir, "--save-interval", "100"), log=tmp_path / "term.log")
    wait_for_iteration(proc, run_dir / "telemetry.jsonl", 3)
    assert kill(proc, signal.SIGTERM) == 0, (tmp_path / "term.log").read_text()[-3000:]
    stopped_at = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped_at < ITERS
    train(1, *run_args(run_dir, "--save-interval", "100"))
    expected, got = losses(straight / "telemetry.jsonl"), losses(run_dir / "telemetry.jsonl")
    for it in range(stopped_at + 1, ITERS + 1):
        assert got[it] == expected[it], it


CRASH_SCRIPT = """
import os, sys
import megatron.core.dist_checkpointing as dist_ckpt
original = dist_ckpt.save
def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
    out = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
    if checkpoint_dir.rstrip('/').endswith('iter_0000008'):
        os._exit(9)  # die after writing the shards, before the checkpoint is recorded
    return out
dist_ckpt.save = save
from parcae_megatron.train import main
main(sys.argv[1:])
"""


def test_crash_during_checkpoint_write_keeps_previous(straight, tmp_path):
    run_dir = tmp_path / "crash"
    script = tmp_path / "crash_in_save.py"
    script.write_text(CRASH_SCRIPT)
    cmd, env = command(1, *run_args(run_dir))
    log = tmp_path / "crash.log"
    proc = subprocess.Popen([sys.executable, str(script), *cmd[3:]], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    returncode = proc.wait(timeout=600)
    with contextlib.suppress(ProcessLookupError):  # helper processes the crash orphaned
        os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == 9, log.read_text()[-3000:]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    train(1, *run_args(run_dir))  # resumes from iteration 4, not the half-recorded 8
    expected, got = losses(straight / "telemetry.jsonl"), losses(run_dir / "telemetry.jsonl")
    for it in range(5, ITERS + 1):
        assert got[it] == expected[it], it


def parity_run(nproc: int, ckpt: Path, out: Path, *layout: str) -> dict[int, float]:
    train(nproc, *TINY, "--train-iters", "4", "--lr-wsd-decay-iters", "2", "--load", str(ckpt),
          "--finetune", "--eval-interval", "100", "--eval-iters", "0", "--optimizer", "adam",
          "--telemetry-path", str(out), *layout)
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in records(out, "train")}


def test_layouts_match_single_process_through_entry_point(straight, tmp_path):
    # The common starting point of the three runs: the straight run's trained weights (its
    # newest checkpoint, loaded with --finetune; none of these runs saves).
    start_checkpoint = straight
    reference = parity_run(1, start_checkpoint, tmp_path / "ref.jsonl")
    # The flags reach Megatron through the entry point; the parallel maths of every layout
    # (TP=2 without SP, DP=2 with the distributed optimizer, from scratch, 4 ranks) is
    # test_parallel_parity.py's, and DP=2 + distributed optimizer through this entry point
    # trains and resumes bit-exactly in the 1.3B rehearsal (tests/test_rehearse.py).
    layouts = {"tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2": ["--pipeline-model-parallel-size", "2"]}
    for name, flags in layouts.items():
        got = parity_run(2, start_checkpoint, tmp_path / f"{name}.jsonl", *flags)
        assert got.keys() == reference.keys() == {1, 2, 3, 4}
        for it, (loss, norm) in got.items():
            ref_loss, ref_norm = reference[it]
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (name, it, loss, ref_loss)
            assert abs(norm - ref_norm) <= 1e-5 * abs(ref_norm), (name, it, norm, ref_norm)


@pytest.mark.parametrize("flags, message", [
    (["--mean-backprop-depth", "9"], "mean_backprop_depth (9) must be in [1, mean_recurrence=4]"),
    (["--preset", "parcae-9b"], "unknown preset 'parcae-9b'"),
    (["--tensor-model-parallel-size", "2"], "world size (1) is not divisible"),
    (["--injection-type", "mamba"], "invalid choice: 'mamba'"),
])
def test_invalid_configs_fail_fast(flags, message):
    proc = train(1, *TINY, *flags, "--validate-only", check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr[-2000:]


def test_missing_data_fails_fast():
    args = [a for a in TINY if a != "--mock-data"]
    proc = train(1, *args, "--data-path", "/nonexistent/corpus_text_document",
                 "--validate-only", check=False, timeout=120)
    assert proc.returncode == 2
    assert "dataset prefix '/nonexistent/corpus_text_document' has no .bin / .idx" in proc.stderr


NAN_SCRIPT = """
import sys
from megatron.training import get_args
import parcae_megatron.train as train
bad = {int(i) for i in sys.argv.pop(1).split(",")}
original = train.loss_func
def loss_func(loss_mask, output_tensor):
    loss, num_tokens, report = original(loss_mask, output_tensor)
    if get_args().curr_iteration + 1 in bad:
        loss = loss * float("nan")
    return loss, num_tokens, report
train.loss_func = loss_func
train.main(sys.argv[1:])
"""


def _nan_run(tmp_path: Path, bad: str, *extra: str) -> tuple[int, str, Path]:
    script = tmp_path / "nan_loss.py"
    script.write_text(NAN_SCRIPT)
    telemetry = tmp_path / "nan.jsonl"
    cmd, env = command(1, *TINY, "--train-iters", "8", "--eval-interval", "100",
                       "--eval-iters", "0", "--telemetry-path", str(telemetry), *extra)
    proc = subprocess.run([sys.executable, str(script), bad, *cmd[3:]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr, telemetry


def test_non_finite_loss_skips_step(tmp_path):
    code, err, telemetry = _nan_run(tmp_path, "3,4")
    assert code == 0, err[-3000:]
    steps = {r["iteration"]: r for r in records(telemetry, "train")}
    assert [i for i, r in steps.items() if r["skipped"]] == [3, 4]
    assert steps[8]["skipped_total"] == 2
    assert steps[5]["loss"] is not None
    # the LR schedule does not advance on skipped steps (it decays every step here)
    assert steps[2]["lr"] == steps[3]["lr"] == steps[4]["lr"] != steps[5]["lr"]


def test_too_many_consecutive_non_finite_steps_stop_the_run(tmp_path):
    code, err, _ = _nan_run(tmp_path, "2,3,4,5", "--max-consecutive-skipped", "2")
    assert code == 3
    # A NaN loss makes every gradient NaN: the first parameter in model order is named.
    assert ("error: 3 consecutive optimizer steps had non-finite gradients (iterations 2-4; "
            "the first non-finite gradient in iteration 2: embedding.word_embeddings.weight)"
            ) in err, err[-3000:]


def test_global_depth_balance_through_entry_point(tmp_path):
    """``--depth-balance global`` with gradient accumulation (4 micro-batches of 2): each step
    runs exactly the dealt global batch's depths (the sampler learns the micro-batch count
    from Megatron's calculator)."""
    from parcae_megatron.model.depth import global_batch_depths

    telemetry = tmp_path / "t.jsonl"
    train(1, *TINY, "--train-iters", "2", "--micro-batch-size", "2", "--eval-iters", "0",
          "--depth-balance", "global", "--telemetry-path", str(telemetry))
    for r in records(telemetry, "train"):
        layout = global_batch_depths(514229, r["iteration"] - 1, 4, 1, 4, 2)
        assert abs(r["depth_mean"] * 8 - int(layout.sum())) < 1e-6, r
        assert r["depth_max"] == int(layout.max())


# One rank's non-finite Muon gradient, skipped on every rank (the 1.3B config's tiny run on two
# data-parallel ranks): tests/test_async_save.py::
# test_one_ranks_non_finite_muon_gradient_is_skipped_on_every_rank, on that file's resumed
# launch of the same configuration (one launch fewer).
