"""`python -m parcae_megatron.describe` prints one JSON object with counts and FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed import ROOT


def _describe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parcae_megatron.describe", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_describe_140m():
    proc = _describe("parcae-140m")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["total_params"] == 144_323_136
    assert out["embedding_params"] == 75_497_472 + 32768 * 768
    assert out["recurrent_params"] == 14_159_040
    assert out["prelude_params"] == out["coda_params"]
    assert f"{out['flops_per_token']:.2e}" == "1.36e+09"
    assert out["config"]["mean_recurrence"] == 8 and out["config"]["hidden_size"] == 768


def test_describe_override_and_errors():
    proc = _describe("parcae-140m", "--set", "mean_recurrence=4", "mean_backprop_depth=2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["mean_recurrence"] == 4
    bad = _describe("parcae-140m", "--set", "mean_backprop_depth=12")
    assert bad.returncode == 2 and "mean_backprop_depth (12)" in bad.stderr
    unknown = _describe("parcae-9b")
    assert unknown.returncode == 2 and "unknown preset" in unknown.stderr
