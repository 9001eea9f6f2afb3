"""The README's main job: corpus → tokenizer → datasets → 2-process training (300 steps) →
test-time report with plot; a second invocation finds the finished run and only reports.
The trained model then goes through the evaluation tool: its loss falls from T=1 to μ_rec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end(quickstart_run):
    run_dir, stdout = quickstart_run
    assert "Parcae quickstart report" in stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 300 and report["loss_end"] < report["loss_start"] - 2.0
    assert sorted(map(int, report["validation_loss_by_T"])) == list(range(1, 9))
    assert (run_dir / "report.png").stat().st_size > 10_000
    for path in ("data/train.bin", "data/valid.idx", "data/tokenizer.model",
                 "checkpoints/latest_checkpointed_iteration.txt", "telemetry.jsonl"):
        assert (run_dir / path).exists(), path
    cmd = [sys.executable, "-m", "parcae_megatron.quickstart", "--run-dir", str(run_dir)]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training already finished" in again.stdout
