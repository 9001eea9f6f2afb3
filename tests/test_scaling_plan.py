"""Iso-FLOP planning: FLOPs/token per μ_rec from docs/design.md §8, token budgets, and a sweep file
that launch.submit accepts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from launch.sweep import load as load_sweep
from parcae_megatron.scaling.plan import plan_isoflop, sweep_document
from tests.distributed import ROOT


def test_plan_matches_spec_flops_and_budgets():
    runs = plan_isoflop("parcae-140m", [16e18], [2, 8])
    by_mu = {r.mean_recurrence: r for r in runs}
    assert f"{by_mu[8].flops_per_token:.2e}" == "1.36e+09"  # docs/design.md §8.4, μ=8, μ_bwd=4
    assert by_mu[2].mean_backprop_depth == 1 and by_mu[8].mean_backprop_depth == 4
    for r in runs:  # tokens · FLOPs/token hits the budget within one step
        assert abs(r.tokens * r.flops_per_token - 16e18) <= 524288 * r.flops_per_token
        assert r.tokens == r.train_iters * 256 * 2048
    # deeper loops cost more per token, so they get fewer tokens at the same budget
    assert by_mu[8].tokens < by_mu[2].tokens
    assert math.isclose(by_mu[8].tokens / 1e9, 16e18 / 1.36e9 / 1e9, rel_tol=0.01)


def test_plan_cli_writes_a_sweep_launch_accepts(tmp_path):
    out = tmp_path / "isoflop.yaml"
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "plan",
                           "--preset", "parcae-tiny", "--config", "configs/parcae-tiny-cpu.yaml",
                           "--budgets", "1e12", "2e12", "--recurrences", "2", "4",
                           "--global-batch-size", "8", "--seq-length", "64", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FLOPs/tok code" in proc.stdout and "FLOPs/tok paper" in proc.stdout
    doc = yaml.safe_load(out.read_text())
    assert out.read_text().startswith("# iso-FLOP plan") and "code FLOP formula" in out.read_text()
    assert len(doc["runs"]) == 4
    assert doc["runs"][0]["args"][:4] == ["--mean-recurrence", "2", "--mean-backprop-depth", "1"]
    sweep = load_sweep(out)
    assert [e.name for e in sweep.elements] == [r["name"] for r in doc["runs"]]


def test_sweep_document_shape():
    runs = plan_isoflop("parcae-tiny", [1e12], [4], global_batch=8, seq_length=64)
    doc = sweep_document(runs, "configs/parcae-tiny-cpu.yaml", "s", concurrency=2)
    assert doc["concurrency"] == 2 and doc["runs"][0]["config"] == "configs/parcae-tiny-cpu.yaml"


def test_plan_with_paper_formula():
    # docs/design.md §8.2 (App. D) formula, 140M at μ_rec = 8, μ_bwd = 4: 1,057,913,088 FLOPs/token
    # (worked out in tests/test_accounting_flops.py); code formula 1,359,902,976
    runs = plan_isoflop("parcae-140m", [16e18], [8], flops_formula="paper")
    (run,) = runs
    assert run.flops_per_token == run.paper_flops_per_token == 1_057_913_088
    assert run.code_flops_per_token == 1_359_902_976 and run.flops_formula == "paper"
    assert abs(run.tokens * 1_057_913_088 - 16e18) <= 524288 * 1_057_913_088
    code = plan_isoflop("parcae-140m", [16e18], [8])[0]
    assert code.paper_flops_per_token == run.paper_flops_per_token
    assert run.tokens > code.tokens  # cheaper tokens under the paper formula: more of them
    with pytest.raises(ValueError, match="unknown FLOP formula"):
        plan_isoflop("parcae-140m", [16e18], [8], flops_formula="chinchilla")


def test_plan_names_are_unique_across_close_budgets(tmp_path):
    runs = plan_isoflop("parcae-tiny", [1e12, 1.5e12, 2e12], [2], global_batch=8, seq_length=64)
    assert [r.name for r in runs] == ["parcae-tiny-C1e12-mu2", "parcae-tiny-C1.5e12-mu2",
                                      "parcae-tiny-C2e12-mu2"]
    out = tmp_path / "p.yaml"
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "plan",
                           "--preset", "parcae-tiny", "--config", "configs/parcae-tiny-cpu.yaml",
                           "--budgets", "1e12", "--recurrences", "2", "--flops-formula",
                           "paper", "--global-batch-size", "8", "--seq-length", "64",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["flops_formula"] == "paper"
    paper = plan_isoflop("parcae-tiny", [1e12], [2], global_batch=8, seq_length=64,
                         flops_formula="paper")[0]
    assert yaml.safe_load(out.read_text())["runs"][0]["args"][5] == str(paper.train_iters)
