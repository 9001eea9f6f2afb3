"""The README's main job, shortened: corpus → tokenizer → datasets → 2-process training →
test-time report with plot; a second invocation finds the finished run and only reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end(tmp_path):
    run_dir = tmp_path / "qs"
    cmd = [sys.executable, "-m", "parcae_megatron.quickstart", "--run-dir", str(run_dir),
           "--train-iters", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Parcae quickstart report" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 16 and report["loss_end"] < report["loss_start"]
    assert sorted(map(int, report["validation_loss_by_T"])) == list(range(1, 9))
    assert (run_dir / "report.png").stat().st_size > 10_000
    for path in ("data/train.bin", "data/valid.idx", "data/tokenizer.model",
                 "checkpoints/latest_checkpointed_iteration.txt", "telemetry.jsonl"):
        assert (run_dir / path).exists(), path
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training already finished" in again.stdout
