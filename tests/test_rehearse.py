"""``parcae-rehearse``: every shipped config rehearses green (CPU, the real entry point).

One rehearsal per ``configs/*.yaml`` (a new config is covered with no new code), at the
cluster shape each config is written for (global batch / micro-batch data-parallel ranks:
4 nodes x 8 GPUs for the 770M and 1.3B configs, 16 and 8 GPUs for 370M and 140M): validation
at that world size, the full-size model
on the meta device with its memory estimate, a tiny training run of the config as shipped with
a checkpoint and a bit-exact resume, and the SLURM script. To keep the suite short the tiny run
uses one rank (two for parcae-1.3b and its FP8 variant: DP = 2 with the distributed
optimizer) and the data build runs for parcae-1.3b only, at 1 % of its samples (the
full-scale figure is in docs/training.md).
Configs whose tiny runs are identical (on a CPU: parcae-140m and -370m, transformer-140m and
-370m, parcae-1.3b and its FP8 variant without TE) share one training stage
(``--train-cache``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from parcae_megatron.config_file import load_config
from parcae_megatron.data.synthetic import lognormal_lengths, write_synthetic_dataset
from parcae_megatron.rehearse import tiny
from tests.distributed import ROOT

# parcae-1.3b before parcae-1.3b-fp8, whose tiny run (FP8 stripped without TE) it shares
CONFIGS = sorted((p.name for p in (ROOT / "configs").glob("*.yaml")),
                 key=lambda name: name.removesuffix(".yaml"))
DATA_CONFIG, DATA_FRACTION = "parcae-1.3b.yaml", 0.01
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           CUDA_VISIBLE_DEVICES="")


def rehearse(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parcae_megatron.rehearse", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_rehearses_green(config, tmp_path, train_cache):
    data = (["--data-fraction", str(DATA_FRACTION)] if config == DATA_CONFIG
            else ["--skip", "data"])
    ranks = "2" if config.startswith("parcae-1.3b") else "1"
    proc = rehearse(f"configs/{config}", "--max-ranks", ranks, "--work-dir", str(tmp_path),
                    "--train-cache", str(train_cache), *data)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-5000:]
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in ("config", "model", "data", "train",
                                                        "slurm")}
    expected = {"config": "pass", "model": "pass", "train": "pass", "slurm": "pass",
                "data": "pass" if config == DATA_CONFIG else "skip"}
    assert rows == expected, out
    assert ("resume bit-exact" in out or "same tiny run as" in out) and "bash -n clean" in out
    resolved = load_config(ROOT / "configs" / config)
    dp = resolved["global-batch-size"] // resolved["micro-batch-size"]
    assert f"{dp} ranks = TP 1 x PP 1 x DP {dp}" in out, out
    if "fp8" in config:
        assert "FP8 hybrid" in out, out
        assert "FP8 skipped" in out
    if config == DATA_CONFIG:
        assert "BestFitGPTDataset (best-fit packing), 0.01 of the run's samples" in out
        assert f"{ranks} rank(s)" in out


def test_bad_config_is_one_error_line(tmp_path):
    proc = rehearse(str(tmp_path / "missing.yaml"), timeout=300)
    assert proc.returncode == 2
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: config file not found: {tmp_path / 'missing.yaml'}"]


@pytest.mark.slow
def test_invalid_layout_fails_in_the_config_stage(tmp_path):
    """TP 3 does not divide 32 ranks: the trainer's own validation says so, exit 2."""
    proc = rehearse("configs/parcae-140m.yaml", "--nodes", "4", "--gpus-per-node", "8",
                    "--tensor-model-parallel-size", "3", "--work-dir", str(tmp_path),
                    timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rehearsal stage config:"), errors
    assert "config  fail" in proc.stdout


def test_tiny_plan_scales_the_shipped_config():
    resolved = load_config(ROOT / "configs/parcae-1.3b-fp8.yaml")
    layout = {"tp": 1, "pp": 1, "dp": 32, "global_batch_size": 256, "micro_batch_size": 8,
              "train_iters": 198364}
    plan = tiny.plan(resolved, layout, ["--seed", "7"], max_ranks=4, has_data=False)
    assert plan.ranks == 4 and plan.config["preset"] == "parcae-tiny"
    assert (plan.config["micro-batch-size"], plan.config["global-batch-size"]) == (2, 8)
    assert plan.config["lr-wsd-decay-iters"] == 2 and plan.config["train-iters"] == 4
    # as shipped: optimizer, precision, distributed optimizer, packing, recompute
    for key in ("optimizer", "bf16", "use-distributed-optimizer", "packing",
                "recompute-loop-iterations", "muon-tp-mode", "lr-decay-style"):
        assert plan.config[key] == resolved[key]
    if not tiny.te_usable():
        assert "fp8-format" not in plan.config and plan.skipped
    assert plan.flags[:2] == ["--seed", "7"]
    with pytest.raises(tiny.RehearsalError, match="exceed --max-ranks"):
        tiny.plan(resolved, {**layout, "tp": 8}, [], max_ranks=4, has_data=False)


def test_cluster_shape_of_a_config():
    from parcae_megatron.rehearse.__main__ import cluster_shape

    assert cluster_shape(load_config(ROOT / "configs/parcae-1.3b.yaml"), []) == (4, 8)
    assert cluster_shape(load_config(ROOT / "configs/parcae-140m.yaml"), []) == (1, 8)
    assert cluster_shape(load_config(ROOT / "configs/parcae-370m.yaml"), []) == (2, 8)
    assert cluster_shape(load_config(ROOT / "configs/parcae-tiny-cpu.yaml"), []) == (1, 2)
    assert cluster_shape(load_config(ROOT / "configs/parcae-1.3b.yaml"),
                         ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]) \
        == (16, 8)


def test_synthetic_corpus_is_a_megatron_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lengths = lognormal_lengths(2_000_000, seed=3)
    assert lengths.sum() == 2_000_000 and lengths.min() >= 1
    assert 900 < lengths.mean() < 1300
    corpus = write_synthetic_dataset(tmp_path / "c", 2_000_000, seed=3)
    dataset = IndexedDataset(str(tmp_path / "c"))
    assert len(dataset) == corpus.documents == len(lengths)
    numpy.testing.assert_array_equal(dataset.sequence_lengths, lengths)
    numpy.testing.assert_array_equal(dataset.document_indices, numpy.arange(len(lengths) + 1))
    assert dataset[len(dataset) - 1].shape == (lengths[-1],)
    assert Path(f"{tmp_path / 'c'}.bin").stat().st_size == 4_000_000
    assert os.stat(f"{tmp_path / 'c'}.bin").st_blocks == 0  # sparse
