"""The README's main job: corpus → tokenizer → datasets → 2-process training (300 steps) →
test-time report with plot and fit → the stability comparison (concat-linear vs Parcae's
injection at an aggressive learning rate); a second invocation finds the finished runs and only
reports. (The trained model goes through the evaluation tools in test_evaluate.py and
friends, sharing the same ``quickstart_run``.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end(quickstart_run):
    run_dir, stdout = quickstart_run
    assert "Parcae quickstart report" in stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 300 and report["loss_end"] < report["loss_start"] - 2.0
    assert sorted(map(int, report["validation_loss_by_T"])) == list(range(1, 9))
    fit = report["test_time_fit"]  # the law is fitted, or the report says why it cannot be
    assert fit["form"] == "L(T) = L_inf + Z * exp(-z * T)" and "test-time law" in stdout
    if fit["determined"]:
        assert fit["z"] > 0 and fit["Z"] > 0 and 4.0 < fit["L_inf"] < 6.0
        assert fit["rmse"] < 0.01 and "fit: L(T) = " in stdout
    else:
        assert fit["reason"] and fit["L_inf"] is None and "fit not determined" in stdout
    assert (run_dir / "report.png").stat().st_size > 10_000
    for path in ("data/train.bin", "data/valid.idx", "data/tokenizer.model",
                 "checkpoints/latest_checkpointed_iteration.txt", "telemetry.jsonl"):
        assert (run_dir / path).exists(), path
    cmd = [sys.executable, "-m", "parcae_megatron.quickstart", "--run-dir", str(run_dir)]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "training already finished" in again.stdout
    assert "stability runs already finished" in again.stdout
    assert json.loads((run_dir / "report.json").read_text()) == report


def test_quickstart_stability_comparison(quickstart_run):
    """Same tiny model, Adam at lr 1e-2, 150 steps each: the prior looped design's state blows
    up by orders of magnitude where Parcae's stays bounded, and Parcae trains further.

    Spread measured over 5 seeds of exactly this setting (--seed 1234 = the default, what the
    quickstart runs, then 1, 2, 3, 4; max over every step of ‖h_T‖; 2 shared CPU cores):
      concat-linear max ‖h_T‖    9.7e7  8.8e5  1.4e8  1.6e7  7.2e6
      Parcae max ‖h_T‖           81     62     192    72     94
      ratio                      1.2e6  1.4e4  7.2e5  2.2e5  7.7e4  (log10 5.26 ± 0.78)
      final loss, concat-linear  6.66   6.39   6.46   6.28   6.49   (mean of the last 10 steps)
      final loss, Parcae         5.54   5.43   5.55   5.27   5.63   (gap 0.86 … 1.12)
    A seed's run is deterministic on one platform; the margins cover other seeds and
    platforms: ratio ≥ 1e3 (about 3σ below the mean log10 ratio, 14× below the smallest seen),
    Parcae's max norm ≤ 1000 (5× the largest seen), and Parcae's final loss at least 0.3
    below concat-linear's (a third of the smallest gap seen).
    """
    run_dir, stdout = quickstart_run
    stable = json.loads((run_dir / "report.json").read_text())["stability"]
    assert stable["lr"] == 1e-2 and stable["steps"] == 150
    concat, parcae = stable["runs"]["concat_linear"], stable["runs"]["diagonal"]
    assert concat["steps"] == parcae["steps"] == 150
    assert not parcae["diverged"] and parcae["max_state_norm"] <= 1000
    assert stable["state_norm_ratio"] == concat["max_state_norm"] / parcae["max_state_norm"]
    assert stable["state_norm_ratio"] >= 1e3
    assert parcae["loss_end"] < concat["loss_end"] - 0.3
    report_lines = stdout.split("Parcae quickstart report")[1].splitlines()
    for label in ("concat-linear (Huginn-style)", "Parcae (diagonal"):
        line = next(x for x in report_lines if label in x)
        assert "max loop-state norm" in line and "loss" in line
    assert all(Path(p).parent == run_dir / "stability" and Path(p).exists()
               for p in stable["telemetry"].values())
