"""`scaling fit` on run directories: synthetic finished runs generated from known laws."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.distributed import ROOT

E, A, ALPHA, B, BETA = 2.662, 522733.307, 0.771, 25420.102, 0.525
N_BASE, N_REC = 1.0e8, 1.4e7  # non-embedding params and one recurrent block (≈140M)


def _write_run(path, mu, budget):
    flops_per_token = 6 * (N_BASE + (mu - 1) * N_REC)  # any per-μ cost works for the test
    tokens = budget / flops_per_token
    n_eff = N_BASE + (mu - 1) * N_REC
    loss = E + A * n_eff ** -ALPHA + B * tokens ** -BETA
    by_t = {f"lm_loss_T={t}": loss + 0.5 * math.exp(-0.6 * t / mu * 4) for t in range(1, 13)}
    record = {"type": "validation", "iteration": 100, "tokens_seen": tokens,
              "mean_recurrence": mu, "mean_backprop_depth": math.ceil(mu / 2),
              "flops_per_token": flops_per_token, "effective_params": n_eff, "lm_loss": loss,
              **by_t}
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
    assert len(result["test_time"]) == 18
    for path in result["plots"]:
        assert (tmp_path / "plots").exists() and np.isfinite(len(path))
        assert __import__("pathlib").Path(path).stat().st_size > 5000


def test_fit_cli_reports_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "telemetry.jsonl").write_text('{"type": "train", "iteration": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.scaling", "fit",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no validation record" in proc.stderr
