"""Adaptive-depth scoring (teacher-forced cached decoding under per-token exit) against the
fixed-T scorer, the ``adaptive`` CLI on the quickstart model, and LAMBADA's error when its
dataset is out of reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from parcae_megatron.evaluate.adaptive import adaptive_loss, best_saving
from parcae_megatron.evaluate.validation_loss import score
from parcae_megatron.hf.configuration_parcae import ParcaeConfig
from parcae_megatron.hf.modeling_parcae import ParcaeForCausalLM
from tests.distributed import ROOT


@pytest.fixture(scope="module")
def model() -> ParcaeForCausalLM:
    cfg = ParcaeConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_attention_heads=2, head_dim=32, num_prelude_layers=1,
                       num_recurrent_layers=1, num_coda_layers=1, mean_recurrence=3,
                       max_position_embeddings=32)
    torch.manual_seed(0)
    m = ParcaeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_adaptive_loss_brackets_fixed_depth(model):
    gen = np.random.default_rng(0)
    windows = [gen.integers(0, 128, 17) for _ in range(5)]
    fixed = {r["T"]: r["loss"] for r in score(model, windows, [1, 4], [0], 8, None, False)}
    never = adaptive_loss(model, windows, 4, "residual", 0.0, seed=0, batch_size=3)
    always = adaptive_loss(model, windows, 4, "residual", 1e9, seed=0, batch_size=3)
    # ε = 0: every token runs T_max — the fixed-T loss (cached decoding vs one forward)
    assert never["loss"] == pytest.approx(fixed[4], rel=1e-5) and never["mean_iterations"] == 4
    assert always["loss"] == pytest.approx(fixed[1], rel=1e-5) and always["mean_iterations"] == 1
    for p in (never, always):  # the histogram counts every scored token once
        assert sum(p["histogram"]) == p["tokens"] == 5 * 16
    mid = adaptive_loss(model, windows, 4, "kl", 1e-3, seed=0, batch_size=5)
    assert 2 <= mid["mean_iterations"] <= 4 and sum(mid["histogram"]) == 80
    pts = [dict(never, mean_iterations=2.0, loss=fixed[4] * 1.004), never]
    assert best_saving(fixed, pts, 4)["saving"] == 0.5
    assert best_saving(fixed, [dict(never, mean_iterations=2.0, loss=fixed[4] * 1.01)], 4) is None


@pytest.mark.slow
def test_adaptive_cli_on_the_quickstart_model(quickstart_run, tmp_path):
    from tests.test_core_eval import write_bundle

    run_dir, _ = quickstart_run
    docs = [json.loads(x)["text"] for x in
            (run_dir / "data" / "train.jsonl").read_text().splitlines()[:100]]
    docs = [d for d in docs if len(d) > 120][:2]
    mc = [(d[:50], [d[50:70], "qzkx vbnm wrtp"], 0) for d in docs]
    bundle = write_bundle(tmp_path / "bundle", mc, [], [])
    (bundle / "tasks.yaml").write_text((bundle / "tasks.yaml").read_text().split(
        "- label: schema_task")[0].replace("num_fewshot: 2", "num_fewshot: 1"))
    out = tmp_path / "adaptive.json"
    proc = subprocess.run(
        [sys.executable, "-m", "parcae_megatron.evaluate", "adaptive", "--load",
         str(run_dir / "checkpoints"), "--data-prefix", str(run_dir / "data" / "valid"),
         "--max-tokens", "256", "--thresholds", "0", "1e9", "--max-T", "4", "--bundle",
         str(bundle), "--tasks-yaml", str(bundle / "tasks.yaml"), "--quiet", "--device", "cpu",
         "--out", str(out), "--plot", str(tmp_path / "a.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    fixed = {r["T"]: r["loss"] for r in report["fixed"]}
    zero, huge = report["adaptive"]
    assert zero["loss"] == pytest.approx(fixed[4], rel=1e-5) and zero["mean_iterations"] == 4
    assert huge["loss"] == pytest.approx(fixed[1], rel=1e-5) and huge["mean_iterations"] == 1
    assert sum(zero["histogram"]) == report["tokens"] == 256
    core = report["core"]
    assert [p["mean_iterations"] for p in core["adaptive"]] == [4.0, 1.0]
    assert core["adaptive"][0]["score"] == pytest.approx(core["fixed"][3]["score"])
    assert core["adaptive"][1]["score"] == pytest.approx(core["fixed"][0]["score"])
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_lambada_without_the_dataset_is_one_error_line(tmp_path, monkeypatch):
    from parcae_megatron.evaluate.lambada import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert not hub_reachable(timeout=2)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "parcae_megatron.evaluate", "lambada", "--hf",
                           str(tmp_path / "hf"), "--T", "1", "4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "cannot load the lambada_openai dataset" in lines[0], proc.stderr
