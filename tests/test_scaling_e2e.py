"""The scaling-law workflow end to end on the local SLURM cluster: ``scaling plan`` (tiny
Parcae, 2 budgets x 2 μ_rec) → ``launch.submit --sweep`` (one job array) → ``scaling fit`` over
the finished run directories → JSON with finite constants and the three PNGs.

Skipped when no cluster answers, unless PARCAE_REQUIRE_SLURM=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from tests.distributed import ROOT
from tests.test_launch_cluster import TINY, cluster_problem, diagnostics, status, wait_done

pytestmark = pytest.mark.slow
# parcae-tiny at 8 x 64 tokens per step: ~20 / 15 steps at 3e10 FLOPs, ~40 / 30 at 6e10
BUDGETS = ("3e10", "6e10")
RECURRENCES = ("2", "4")
EVAL_T = ("1", "2", "3", "4", "6", "8")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _finite(values) -> bool:
    return all(isinstance(v, float | int) and math.isfinite(v) for v in values)


def test_plan_submit_fit_on_local_cluster(tmp_path):
    problem = cluster_problem()
    if problem:
        if os.environ.get("PARCAE_REQUIRE_SLURM") == "1":
            pytest.fail(f"PARCAE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    sweep = tmp_path / "isoflop.yaml"
    _run("parcae_megatron.scaling", "plan", "--preset", "parcae-tiny",
         "--config", "configs/parcae-tiny-cpu.yaml", "--budgets", *BUDGETS,
         "--recurrences", *RECURRENCES, "--global-batch-size", "8", "--seq-length", "64",
         "--concurrency", "2", "--out", str(sweep))
    planned = yaml.safe_load(sweep.read_text())["runs"]
    assert len(planned) == 4
    root = tmp_path / "isoflop"
    _run("launch.submit", "--sweep", str(sweep), "--run-dir", str(root), "--nodes", "1",
         "--procs-per-node", "1", "--", *TINY, "--eval-iters", "2", "--eval-interval", "10000",
         "--eval-loop-counts", *EVAL_T)
    job = json.loads((root / "launch.json").read_text())["job_id"]
    runs = [root / f"{i}-{p['name']}" for i, p in enumerate(planned)]
    try:
        wait_done(job, runs, timeout=420)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
    for run in runs:
        assert status(run) == "completed", diagnostics(run)

    out, plots = tmp_path / "fit.json", tmp_path / "plots"
    _run("parcae_megatron.scaling", "fit", *map(str, runs), "--out", str(out), "--plots",
         str(plots), "--restarts", "20", "--holdout", "fraction", "--holdout-fraction", "0.25")
    result = json.loads(out.read_text())
    assert result["runs"] == 4 and result["holdout"]["applied"]
    assert len(result["holdout"]["runs"]) == 1
    # every run trained exactly its planned steps and landed on its budget
    steps = {p["name"]: int(p["args"][p["args"].index("--train-iters") + 1]) for p in planned}
    for run in result["run_compute"]:
        name = run["name"].split("-", 1)[1]
        assert run["tokens"] == steps[name] * 8 * 64
        budget = float(name.split("-C")[1].split("-mu")[0])
        assert abs(run["flops_code"] / budget - 1) < 0.05
        assert 0 < run["flops_paper"] < run["flops_code"] and math.isfinite(run["loss"])
    frontier = result["isoflop"]
    assert [f["budget"] for f in frontier] == pytest.approx([3e10, 6e10], rel=0.05)
    assert all(_finite([f["mu_star"], f["tokens_star"], f["loss_star"]]) for f in frontier)
    law = result["loss_star_law"]
    assert _finite([law["coefficient"], law["exponent"]])
    unified = result["unified_test_time_law"]
    assert _finite([unified[k] for k in ("E", "X", "x", "Y", "y", "Z", "z", "huber")])
    assert unified["train"]["points"] == 3 * len(EVAL_T)
    assert unified["heldout"]["points"] == len(EVAL_T)
    assert _finite([unified["heldout"]["rmse"], unified["heldout"]["mean_abs_rel_error"]])
    assert len(result["test_time"]) == 4
    assert sorted(p.name for p in plots.iterdir()) == ["frontier.png", "isoflop.png",
                                                       "test_time.png"]
    assert all(p.stat().st_size > 5000 for p in plots.iterdir())
