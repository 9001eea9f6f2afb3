"""Asynchronous checkpoints (``--async-save``) with the shipped 1.3B settings on the CPU backend.

One pair of 2-rank launches of the 1.3B config as the rehearsal runs it (tiny model; bf16,
the distributed optimizer with layer-wise Muon, best-fit packing, per-sequence depth
sampling, asynchronous saves every 3 steps) shares the slow assertions: rank 1 is SIGKILLed
while its save of the step-6 checkpoint is in flight (``PARCAE_FAULT=kill_in_save``), the
previous checkpoint stays the recorded one, and the next start resumes from it and repeats
the killed run's steps bit for bit. After those steps the resumed launch also makes one Muon
gradient of rank 0 NaN (``PARCAE_FAULT=nan_grad``): both ranks must skip that step. The unit
tests cover the snapshot a save takes, the fault's parsing and the refusals of an
``--async-save`` Megatron would not honour.
"""

from __future__ import annotations

import functools
import pickle
import re
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from parcae_megatron.config_file import load_config
from parcae_megatron.rehearse import tiny
from parcae_megatron.training import faults, megatron_patches
from parcae_megatron.training.validation import check_command_line
from tests.distributed import ROOT
from tests.training_runs import TINY, records, train

ASYNC = ["--async-save", "--use-persistent-ckpt-worker", "--async-strategy", "mcore"]
ITERS, INTERVAL, KILLED_AT = 9, 3, 6
NAN_AT = 7  # the resumed launch's NaN gradient: after the steps it repeats, 2 before its end


def shipped_1p3b(tmp: Path) -> list[str]:
    """The 1.3B config's tiny run on 2 data-parallel ranks, as the rehearsal derives it."""
    resolved = load_config(ROOT / "configs" / "parcae-1.3b.yaml")
    dp = resolved["global-batch-size"] // resolved["micro-batch-size"]
    layout = {"tp": 1, "pp": 1, "dp": dp, "global_batch_size": resolved["global-batch-size"],
              "micro_batch_size": resolved["micro-batch-size"],
              "train_iters": resolved["train-iters"]}
    plan = tiny.plan(resolved, layout, [], max_ranks=2, has_data=False)
    config = plan.config
    assert plan.ranks == 2 and config["bf16"] and config["use-distributed-optimizer"]
    assert config["packing"] == "bestfit" and config["optimizer"] == "parcae_muon"
    path = tmp / "tiny-1.3b.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["--config", str(path), *plan.flags, *ASYNC, "--train-iters", str(ITERS),
            "--save-interval", str(INTERVAL), "--eval-interval", "100",
            "--distributed-timeout-minutes", "1"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> dict:
    """Launch 1: killed in the step-6 save (rank 1); launch 2: the same command, resumed, with
    a NaN gradient on rank 0 at step 7."""
    root = tmp_path_factory.mktemp("async")
    run = root / "ckpt"
    base = [*shipped_1p3b(root), "--save", str(run), "--load", str(run)]
    killed = train(2, *base, "--telemetry-path", str(root / "killed.jsonl"), check=False,
                   env={"PARCAE_FAULT": f"kill_in_save@step={KILLED_AT},rank=1"})
    time.sleep(1)  # the kernel's SIGKILL of the killed rank's helpers is asynchronous
    orphans = [p.pid for p in psutil.process_iter(["cmdline"])
               if str(run) in " ".join(p.info["cmdline"] or [])]
    tracker_after_kill = (run / "latest_checkpointed_iteration.txt").read_text().strip()
    in_flight = sorted(p.name for p in (run / f"iter_{KILLED_AT:07d}").iterdir()) \
        if (run / f"iter_{KILLED_AT:07d}").is_dir() else []
    resumed = train(2, *base, "--telemetry-path", str(root / "resumed.jsonl"), check=False,
                    env={"PARCAE_FAULT": f"nan_grad@step={NAN_AT},rank=0"})
    return {"run": run, "killed": killed, "resumed": resumed, "tracker": tracker_after_kill,
            "in_flight": in_flight, "orphans": orphans,
            "first": records(root / "killed.jsonl", "train"),
            "second": records(root / "resumed.jsonl", "train")}


@pytest.mark.slow
def test_kill_during_async_save_keeps_the_previous_checkpoint(killed_and_resumed):
    r = killed_and_resumed
    log = r["killed"].stdout + r["killed"].stderr
    assert r["killed"].returncode != 0, log[-4000:]
    assert (f"kill_in_save on rank 1 at step {KILLED_AT} (asynchronous checkpoint save in "
            "flight)") in log, log[-4000:]
    assert "scheduled an async checkpoint save at iteration" in log
    # The step-6 save was never finalized: no global metadata, not recorded.
    assert ".metadata" not in r["in_flight"], r["in_flight"]
    assert int(r["tracker"]) == KILLED_AT - INTERVAL, log[-4000:]
    assert [x["iteration"] for x in r["first"]] == list(range(1, KILLED_AT + 1))
    # Its writer and the writer's queue manager died with it (nothing left orphaned).
    assert r["orphans"] == [], r["orphans"]


@pytest.mark.slow
def test_resume_after_async_save_is_bit_exact(killed_and_resumed):
    r = killed_and_resumed
    log = r["resumed"].stdout + r["resumed"].stderr
    assert r["resumed"].returncode == 0, log[-4000:]
    start = int(r["tracker"])
    assert re.search(rf"successfully loaded checkpoint from {re.escape(str(r['run']))} "
                     rf"\[.*\] at iteration {start}\n", log), log[-4000:]
    second = {x["iteration"]: x for x in r["second"]}
    assert sorted(second) == list(range(start + 1, ITERS + 1))
    first = {x["iteration"]: x for x in r["first"]}
    for it in range(start + 1, KILLED_AT + 1):  # the same steps, bit for bit
        for key in ("loss", "grad_norm", "lr", "depth_mean", "depth_max"):
            assert second[it][key] == first[it][key], (it, key, second[it][key], first[it][key])
    # The resumed run rewrote the abandoned step-6 save and finished its own saves.
    assert (r["run"] / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    for it in (KILLED_AT, ITERS):
        assert (r["run"] / f"iter_{it:07d}" / ".metadata").is_file()


@pytest.mark.slow
def test_one_ranks_non_finite_muon_gradient_is_skipped_on_every_rank(killed_and_resumed):
    """The 1.3B config with the model swapped for the tiny preset, as the rehearsal runs it on
    two data-parallel ranks (bf16, Muon + distributed optimizer: Megatron's ChainedOptimizer
    of a layer-wise Muon part and a distributed Adam part). After step 7's backward, rank 0
    makes one Muon matrix it owns NaN (``PARCAE_FAULT=nan_grad@...``); rank 1's gradients
    stay finite. Both ranks must skip that step (one decision: a rank that skipped alone
    left the other in a collective until the 1-minute distributed timeout) and count it
    once. (Moved here from tests/test_train.py to share this file's resumed launch.)"""
    r = killed_and_resumed
    log = r["resumed"].stdout + r["resumed"].stderr
    assert r["resumed"].returncode == 0, log[-4000:]
    assert ("non-finite guard on ChainedOptimizer[LayerWiseDistributedOptimizer["
            "Float16OptimizerWithFloat16Params[ParcaeMuon]], DistributedOptimizer[") in log, log
    poisoned = re.search(rf"nan_grad on rank 0 at step {NAN_AT} \(gradient of (\S+) set to "
                         r"NaN\)", log)
    assert poisoned, log[-4000:]
    assert ".layers." in poisoned[1] and poisoned[1].endswith(".weight"), poisoned[1]
    # The last rank writes the telemetry: it learned the skip and the culprit from rank 0.
    steps = {x["iteration"]: x for x in r["second"]}
    assert sorted(steps) == list(range(int(r["tracker"]) + 1, ITERS + 1))
    assert [i for i, x in steps.items() if x["skipped"]] == [NAN_AT]
    assert steps[NAN_AT]["first_non_finite"] == poisoned[1]
    assert steps[NAN_AT]["grad_norm"] is None and steps[NAN_AT + 1]["grad_norm"] is not None
    assert steps[ITERS]["skipped_total"] == 1
    assert all(steps[i]["loss"] is not None for i in range(NAN_AT + 1, ITERS + 1))


def test_an_async_save_snapshots_host_tensors():
    """A host tensor handed to the writer is copied while the trainer waits: the trainer's
    next in-place update does not reach the checkpoint. The staging function travels to the
    persistent writer process inside the request, so it must pickle."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    megatron_patches.install_async_checkpointing()
    live = torch.arange(6, dtype=torch.float32)
    buckets = [("f.distcp", "f", ([], [("item", live)]))]
    staged = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=False)
    live.add_(100.0)  # the next optimizer step
    assert torch.equal(staged[0][2][1][0][1], torch.arange(6, dtype=torch.float32))
    pickle.loads(pickle.dumps(functools.partial(FileSystemWriterAsync.preload_tensors, [])))


def test_kill_in_save_fault_parses():
    fault = faults.parse("kill_in_save@step=6,rank=1")
    assert (fault.action, fault.step, fault.rank) == ("kill_in_save", 6, 1)
    assert fault.matches(6, 1, 1) and not fault.matches(7, 1, 1)
    assert faults.inject(lambda *a: a, fault)(1, 2) == (1, 2)  # not a forward-pass fault


@pytest.mark.parametrize("flags, message", [
    (["--async-save", "--async-strategy", "mcore"],
     "--async-save needs --use-persistent-ckpt-worker"),
    (["--async-save", "--use-persistent-ckpt-worker", "--async-strategy", "mcore",
      "--ckpt-format", "torch"], "--async-save needs --ckpt-format torch_dist"),
    (["--async-save", "--use-persistent-ckpt-worker"],
     "--async-strategy mcore (Megatron-Core's own writer)"),
])
def test_async_save_megatron_would_not_honour_is_refused(flags, message):
    pytest.importorskip("megatron.training")
    if "--async-strategy" not in flags:
        import importlib.util

        if importlib.util.find_spec("nvidia_resiliency_ext") is not None:
            pytest.skip("nvidia-resiliency-ext is installed: nvrx is usable")
    megatron_patches.install("check")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_command_line([*TINY, *flags], world_size=1)
    check_command_line([*TINY, *ASYNC], world_size=1)  # the shipped combination passes


def test_shipped_long_run_configs_save_asynchronously():
    for name in ("parcae-770m", "parcae-1.3b", "parcae-1.3b-fp8", "transformer-770m",
                 "transformer-1.3b"):
        resolved = load_config(ROOT / "configs" / f"{name}.yaml")
        assert resolved.get("async-save") is True, name
        assert resolved.get("use-persistent-ckpt-worker") is True, name
        assert resolved.get("async-strategy") == "mcore", name
