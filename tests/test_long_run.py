"""Watching a long run: one telemetry sink (telemetry.jsonl, TensorBoard, W&B), a W&B failure
that does not stop training, the straggler report that knows loop depth, and the PyTorch
profiler on the CPU backend.

Two 2-rank launches of the tiny config share the assertions: a slowed rank (``slow`` fault) with
W&B offline and the profiler on, and a rank that samples twice the depths (``deep`` fault) with a
W&B that fails to start.
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
from pathlib import Path

import pytest

from parcae_megatron.training import faults
from parcae_megatron.training.straggler import judge
from tests.training_runs import TINY, records, train

# A loaded 2-core test machine times a tiny model noisily; the default factor is 1.2.
FACTOR = "1.5"
# Windows: steps 2-5 and 6-10 (step 1 is warm-up, 11-12 an unreported partial window).
LAUNCH = [*TINY, "--train-iters", "12", "--eval-interval", "100", "--save-interval", "100",
          "--straggler-window", "5", "--straggler-factor", FACTOR, "--wandb-project", "parcae"]


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """Rank 1 sleeps 3 s per step from step 6 on; W&B offline; steps 2-3 profiled."""
    root = tmp_path_factory.mktemp("slow")
    proc = train(2, *LAUNCH, "--save", str(root / "ckpt"), "--tensorboard-dir",
                 str(root / "tb"), "--profile", "--use-pytorch-profiler",
                 "--profile-step-start", "2", "--profile-step-end", "3",
                 env={"WANDB_MODE": "offline", "PARCAE_FAULT": "slow@step=6,rank=1,ms=3000"})
    return root, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """Rank 0 runs twice its drawn loop depths from step 1 on; W&B fails to start."""
    root = tmp_path_factory.mktemp("deep")
    proc = train(2, *LAUNCH, "--save", str(root / "ckpt"),
                 env={"WANDB_MODE": "not-a-mode", "PARCAE_FAULT": "deep@step=1,rank=0"})
    return root, proc.stdout + proc.stderr


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``run-*.wandb`` transaction log
    (LevelDB log framing: 32 KiB blocks of 7-byte-headed chunks) with wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, chunks, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full / last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _stragglers(root: Path) -> list[dict]:
    return records(root / "ckpt" / "telemetry.jsonl", "straggler")


@pytest.mark.slow
def test_wandb_offline_holds_parcae_and_megatron_metrics(slow_run):
    root, _ = slow_run
    history = wandb_history(root / "ckpt" / "wandb" / "wandb")
    telemetry = {r["iteration"]: r for r in records(root / "ckpt" / "telemetry.jsonl", "train")}
    logged = {row["_step"]: row for row in history if "parcae/loss" in row}
    assert sorted(logged) == sorted(telemetry) == list(range(1, 13))
    for step, row in logged.items():  # the same numbers as the file, through the same sink
        for key in ("loss", "depth_mean", "executed_flops", "grad_norm"):
            assert row[f"parcae/{key}"] == pytest.approx(telemetry[step][key], rel=1e-12)
    keys = {k for row in history for k in row}
    assert {"lm loss", "learning-rate", "parcae/executed_over_sampled",
            "parcae-straggler/max_ratio"} <= keys  # Megatron's own metrics are there too


@pytest.mark.slow
def test_tensorboard_gets_the_same_parcae_metrics(slow_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = slow_run
    events = EventAccumulator(str(root / "tb")).Reload()
    telemetry = {r["iteration"]: r for r in records(root / "ckpt" / "telemetry.jsonl", "train")}
    losses = {e.step: e.value for e in events.Scalars("parcae/loss")}
    assert losses == pytest.approx({i: r["loss"] for i, r in telemetry.items()}, rel=1e-6)
    assert "parcae-straggler/num_flagged" in events.Tags()["scalars"]


@pytest.mark.slow
def test_slowed_rank_is_flagged_with_its_host(slow_run):
    root, log = slow_run
    windows = _stragglers(root)
    assert [(w["first_iteration"], w["iteration"]) for w in windows] == [(2, 5), (6, 10)]
    slow = windows[-1]
    assert [(f["rank"], f["host"]) for f in slow["flagged"]] == [(1, socket.gethostname())]
    ranks = slow["ranks"]
    # the fast rank waits in the gradient sync: equal step times, unequal compute
    assert ranks[0]["step_time_s"] == pytest.approx(ranks[1]["step_time_s"], rel=0.05)
    assert ranks[1]["compute_s"] > ranks[0]["compute_s"] + 1.5
    assert f"straggler: rank 1 on {socket.gethostname()} takes" in log


@pytest.mark.slow
def test_deep_sampling_rank_is_not_flagged_and_wandb_failure_is_one_warning(deep_run):
    root, log = deep_run
    windows = _stragglers(root)
    assert len(windows) == 2
    for window in windows:
        assert window["flagged"] == [], window
        deep, normal = window["ranks"]
        # twice its own draws (the draws are seeded, so these numbers are fixed)
        assert deep["executed_iterations"] > 1.2 * normal["executed_iterations"], window
        assert deep["executed_flops"] > normal["executed_flops"]
    assert log.count("warning: W&B disabled") == 1
    assert not (root / "ckpt" / "wandb" / "wandb").exists() or not list(
        (root / "ckpt" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(records(root / "ckpt" / "telemetry.jsonl", "train")) == 12  # trained on


@pytest.mark.slow
def test_pytorch_profiler_writes_a_trace_per_rank_on_cpu(slow_run):
    root, _ = slow_run
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((root / "torch_profile" /
                                            f"rank-{rank}.json.gz").read_bytes()))
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("ProfilerStep#" in n for n in names)
        assert any(n.startswith("aten::mm") or n.startswith("aten::addmm") for n in names)


def test_judge_normalises_by_the_replicas_executed_flops():
    flops = lambda depth, grad: 10.0 * depth + 20.0 * grad  # per token
    # rows: dp rank, steps, compute s, wall s, sequences, executed and grad iterations.
    # Rank 0 runs twice the loop depth (240 vs 160 FLOPs/token) in 1.5x the time: not a
    # straggler; rank 2 does rank 1's work in 1.5x the time: a straggler.
    rows = [[0, 4, 6.0, 9.0, 16, 256, 64], [1, 4, 4.0, 9.0, 16, 128, 64],
            [2, 4, 6.0, 9.0, 16, 128, 64]]
    rec = judge(rows, ["a", "b", "c"], flops, 8, 1.2, 1, 4)
    assert [r["ratio"] for r in rec["ranks"]] == pytest.approx([1.0, 1.0, 1.5])
    assert rec["flagged"] == [{"rank": 2, "host": "c", "ratio": pytest.approx(1.5)}]
    assert rec["ranks"][0]["executed_flops"] == pytest.approx(240 * 16 * 8 / 4)
    assert rec["ranks"][0]["executed_iterations"] == 64
    # two ranks of one replica (tensor parallel: only one owns the loop) share its work
    rows = [[0, 1, 1.0, 1.0, 4, 32, 8], [0, 1, 1.0, 1.0, 0, 0, 0]]
    ranks = judge(rows, None, flops, 8, 1.2, 1, 1)["ranks"]
    assert ranks[0]["executed_flops"] == ranks[1]["executed_flops"] > 0


def test_slow_and_deep_faults_last_from_their_step_on():
    slow = faults.parse("slow@step=3,rank=1,ms=250")
    assert (slow.action, slow.step, slow.rank, slow.ms) == ("slow", 3, 1, 250)
    assert not slow.matches(2, 1, 1) and slow.matches(3, 1, 1) and slow.matches(9, 1, 1)
    assert not slow.matches(5, 0, 1)
    assert faults.parse("deep@step=1").ms == 1000 and faults.parse("deep@step=1").rank == 0
    with pytest.raises(faults.FaultSpecError):
        faults.parse("slow@step=1,ms=-5")
