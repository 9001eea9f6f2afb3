"""`scaling fit` on run directories: synthetic finished runs generated from known laws."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT

E, A, ALPHA, B, BETA = 2.662, 522733.307, 0.771, 25420.102, 0.525
N_BASE, N_REC = 1.0e8, 1.4e7  # non-embedding params and one recurrent block (≈140M)


def _write_run(path, mu, budget, paper_offset=None):
    """A finished run at ``budget`` FLOPs; with ``paper_offset`` the budget is met under a
    "paper" FLOPs/token that is the code one minus that offset (as in docs/design.md §8.2)."""
    flops_per_token = 6 * (N_BASE + (mu - 1) * N_REC)  # any per-μ cost works for the test
    paper = None if paper_offset is None else flops_per_token - paper_offset
    tokens = budget / (flops_per_token if paper is None else paper)
    n_eff = N_BASE + (mu - 1) * N_REC
    loss = E + A * n_eff ** -ALPHA + B * tokens ** -BETA
    by_t = {f"lm_loss_T={t}": loss + 0.5 * math.exp(-0.6 * t / mu * 4) for t in range(1, 13)}
    record = {"type": "validation", "iteration": 100, "tokens_seen": tokens,
              "mean_recurrence": mu, "mean_backprop_depth": math.ceil(mu / 2),
              "flops_per_token": flops_per_token, "effective_params": n_eff, "lm_loss": loss,
              **by_t}
    if paper is not None:
        record["paper_flops_per_token"] = paper
    path.mkdir(parents=True)
    (path / "telemetry.jsonl").write_text(json.dumps(record) + "\n")


def test_fit_cli_on_runs(tmp_path):
    runs = []
    for budget in (1e18, 1.5e18, 2e18):
        for mu in (1, 2, 4, 6, 8, 12):
            run = tmp_path / f"C{budget:.2e}-mu{mu}"
            _write_run(run, mu, budget)
            runs.append(str(run))
    out = tmp_path / "fit.json"
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "fit", *runs,
                           "--out", str(out), "--plots", str(tmp_path / "plots"),
                           "--restarts", "40"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["runs"] == 18 and len(result["isoflop"]) == 3
    mus = [f["mu_star"] for f in result["isoflop"]]
    assert mus == sorted(mus)  # the optimal depth grows with compute
    assert result["mu_star_law"]["exponent"] > 0
    law = result["parametric_law"]
    assert law["E"] == pytest.approx(E, rel=0.01)
    assert law["a"] == pytest.approx(ALPHA, rel=0.05) and law["b"] == pytest.approx(BETA, rel=0.05)
    assert law["mean_rel_error"] < 1e-3
    # default holdout: the largest budget, predicted by laws fitted on the two others
    assert result["holdout"]["applied"] and result["holdout"]["budget"] == 2e18
    assert len(result["holdout"]["runs"]) == 6 and law["train"]["points"] == 12
    assert law["heldout"]["points"] == 6 and law["heldout"]["mean_abs_rel_error"] < 1e-3
    assert [f["heldout"] for f in result["isoflop"]] == [False, False, True]
    frontier_law = result["loss_star_law"]
    assert frontier_law["exponent"] < 0 and frontier_law["heldout"]["points"] == 1
    assert frontier_law["heldout"]["mean_abs_rel_error"] < 0.01
    # the runs' T-curves are loss + 0.5·exp(−2.4·T/μ): the unified law's floor is the
    # parametric law, Z = 0.5, z = 2.4
    unified = result["unified_test_time_law"]
    assert unified["Z"] == pytest.approx(0.5, rel=0.01) and unified["z"] == pytest.approx(2.4,
                                                                                       rel=0.01)
    assert unified["E"] == pytest.approx(E, rel=0.01)
    assert unified["heldout"]["points"] == 6 * 12
    assert unified["heldout"]["mean_abs_rel_error"] < 1e-3
    assert len(result["test_time"]) == 18
    # per-curve laws: fitted on T <= μ_rec where that leaves 4 points, checked on T > μ_rec
    assert result["test_time"]["C1.00e+18-mu6"]["fit_T"] == [1, 2, 3, 4, 5, 6]
    # μ = 4, 6, 8 predict T = 5…12, 7…12, 9…12 (μ = 1, 2 have < 4 points, μ = 12 none after)
    assert result["test_time_heldout"]["points"] == 3 * (8 + 6 + 4)
    names = sorted(Path(p).name for p in result["plots"])
    assert names == ["frontier.png", "isoflop.png", "test_time.png"]
    for path in result["plots"]:
        assert Path(path).stat().st_size > 5000


def _fit(paths, *flags):
    """``scaling fit`` on run directories; the CLI prints the results as its last line."""
    out = Path(paths[0]).parent / "fit.json"
    return subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "fit",
                           *map(str, paths), "--out", str(out), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_fit_fraction_holdout_and_paper_formula(tmp_path):
    runs = []
    for budget in (1e18, 2e18):
        for mu in (2, 4, 8):
            runs.append(tmp_path / f"C{budget:.0e}-mu{mu}")
            _write_run(runs[-1], mu, budget, paper_offset=3e8)
    flags = ("--restarts", "3", "--holdout", "fraction", "--holdout-fraction", "0.3")
    proc = _fit(runs, "--flops-formula", "paper", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    # planned under the paper formula: two budgets under it, exactly
    assert [f["budget"] for f in result["isoflop"]] == [1e18, 2e18]
    held = result["holdout"]["runs"]
    assert result["holdout"]["applied"] and len(held) == 2  # round(0.3 · 6)
    again = json.loads(_fit(runs, "--flops-formula", "paper", *flags).stdout.splitlines()[-1])
    assert again["holdout"]["runs"] == held  # seeded
    assert again["unified_test_time_law"] == result["unified_test_time_law"]
    for run in result["run_compute"]:
        assert run["heldout"] == (run["name"] in held)
        assert run["flops_code"] - run["flops_paper"] == pytest.approx(3e8 * run["tokens"])
    assert result["unified_test_time_law"]["heldout"]["points"] == 2 * 12
    # the same runs on the code formula's axis spread over more than two budgets
    code = json.loads(_fit(runs, "--holdout", "none", "--restarts", "3").stdout.splitlines()[-1])
    assert len(code["isoflop"]) > 2 and code["holdout"]["applied"] is False
    assert "test_time_heldout" in code and code["test_time_heldout"]["points"] == 0


def test_fit_paper_formula_needs_paper_telemetry(tmp_path):
    _write_run(tmp_path / "old", 2, 1e18)
    proc = _fit([tmp_path / "old"], "--flops-formula", "paper")
    assert proc.returncode == 2 and "no paper_flops_per_token" in proc.stderr


def test_fit_cli_reports_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "telemetry.jsonl").write_text('{"type": "train", "iteration": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "fit",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no validation record" in proc.stderr
