"""benchmarks/gpu_acceptance.py --cpu-dry-run: every part runs at a tiny size on the CPU, the
parts that need CUDA say so, and the JSON line keeps every key with its type (null where a
part could not run), so the GPU run's output has a fixed shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed import ROOT

NUM = (int, float)
# part -> key -> type of its value (None allowed where the part needs CUDA or a module)
KEYS = {
    "te_vs_local": dict.fromkeys(("tiny_max_abs_diff", "tiny_rel_diff",
                                  "width_1p3b_max_abs_diff", "width_1p3b_rel_diff"), NUM),
    "step_time": {"layers": int, "micro_batch": int, "seq": int, "repeats": int,
                  "bf16_step_s": NUM, "bf16_step_s_min": NUM, "bf16_step_s_max": NUM,
                  "bf16_tokens_per_s": NUM, "bf16_mfu": NUM, "fp8_step_s": NUM,
                  "fp8_step_s_min": NUM, "fp8_step_s_max": NUM,
                  "fp8_tokens_per_s": NUM, "fp8_mfu": NUM, "fp8_over_bf16_time": NUM,
                  "flops_per_token": NUM},
    "vs_gpt": {"executed_layers": int, "micro_batch": int, "seq": int, "repeats": int,
               "gpt_step_s": NUM, "gpt_step_s_min": NUM, "gpt_step_s_max": NUM,
               "parcae_step_s": NUM, "parcae_step_s_min": NUM, "parcae_step_s_max": NUM,
               "parcae_over_gpt": NUM, "parcae_over_gpt_min": NUM, "parcae_over_gpt_max": NUM},
    "memory": {f"{p}_{k}": kind for p in ("bf16", "fp8") for k, kind in (
        ("peak_bytes", int), ("estimate_bytes", int), ("peak_over_estimate", NUM),
        ("reserved_bytes", int), ("reserved_estimate_bytes", int),
        ("reserved_over_estimate", NUM))},
    "initial_state": {"step_device_h0_s": NUM, "step_host_h0_s": NUM,
                      "step_host_over_device": NUM, "draw_device_s": NUM, "draw_host_s": NUM,
                      "draw_host_over_device": NUM},
    "fp8_vs_bf16_loss": {"steps": int, "bf16_first": NUM, "bf16_last": NUM, "fp8_first": NUM,
                         "fp8_last": NUM, "rel_diff_last": NUM, "rtol": NUM, "agree": bool},
    "loop_execution": {"layers": str, "mean_recurrence": int, "micro_batch": int, "seq": int,
                       "repeats": int, "mean_sampled_depth": NUM,
                       "compact_over_mean_depth": NUM, "masked_over_mean_depth": NUM,
                       "compact_s": NUM, "compact_s_min": NUM, "compact_s_max": NUM,
                       "masked_s": NUM, "masked_s_min": NUM, "masked_s_max": NUM,
                       "masked_over_compact_time": NUM, "masked_over_compact_time_min": NUM,
                       "masked_over_compact_time_max": NUM, "saving_reaching_wall": NUM},
}
# Values the dry run cannot produce without CUDA (Transformer Engine, FP8, device memory).
NEEDS_CUDA = {
    "te_vs_local": set(KEYS["te_vs_local"]),
    "step_time": {"bf16_mfu", "fp8_step_s", "fp8_step_s_min", "fp8_step_s_max",
                  "fp8_tokens_per_s", "fp8_mfu", "fp8_over_bf16_time"},
    "memory": {f"{p}_{k}" for p in ("bf16", "fp8") for k in (
        "peak_bytes", "peak_over_estimate", "reserved_bytes", "reserved_over_estimate")},
    "fp8_vs_bf16_loss": {"fp8_first", "fp8_last", "rel_diff_last", "agree"},
}


@pytest.fixture(scope="module")
def dry_run():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--cpu-dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                                   CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_key_is_present_with_its_type(dry_run):
    _, result = dry_run
    assert result["benchmark"] == "gpu_acceptance" and result["mode"] == "cpu-dry-run"
    for part, keys in KEYS.items():
        row = result[part]
        assert isinstance(row["status"], str), part
        assert not row["status"].startswith("error"), (part, row["status"])
        for key, kind in keys.items():
            assert key in row, (part, key)
            value = row[key]
            if value is None:
                assert key in NEEDS_CUDA.get(part, set()), (part, key)
            elif kind is bool:
                assert isinstance(value, bool), (part, key, value)
            else:
                assert isinstance(value, kind) and not isinstance(value, bool), (part, key, value)


def test_cuda_parts_are_skipped_with_a_reason(dry_run):
    out, result = dry_run
    assert result["te_vs_local"]["status"] == "skipped: no CUDA"
    assert result["fp8_vs_bf16_loss"]["status"] == "skipped: no CUDA"
    assert result["step_time"]["status"] == "fp8 skipped: no CUDA"
    for part, keys in NEEDS_CUDA.items():
        assert all(result[part][k] is None for k in keys), part
    assert "(a) te_vs_local       skipped: no CUDA" in out  # the table before the JSON


def test_parts_that_run_on_cpu_measure_something(dry_run):
    _, result = dry_run
    loop = result["loop_execution"]
    assert loop["layers"] == "8/8/8" and loop["mean_recurrence"] == 8
    assert loop["micro_batch"] == 8
    for part, key in (("loop_execution", "masked_over_compact_time"),
                      ("vs_gpt", "parcae_over_gpt"), ("step_time", "bf16_step_s")):
        row = result[part]  # every timing: median within its range, over the stated repeats
        assert row["repeats"] >= 1 and row[f"{key}_min"] <= row[key] <= row[f"{key}_max"]
    assert loop["compact_over_mean_depth"] == pytest.approx(1.0)  # compaction: Σ T_i exactly
    assert loop["masked_over_mean_depth"] > 1.0                  # masking: b · max T_i
    loss = result["fp8_vs_bf16_loss"]
    assert loss["steps"] == 20 and loss["bf16_last"] < loss["bf16_first"]
    assert result["vs_gpt"]["executed_layers"] == 1 + 2 * 1 + 1
    assert result["step_time"]["bf16_tokens_per_s"] > 0
    memory = result["memory"]  # model/memory.py's estimate needs no device
    assert memory["fp8_estimate_bytes"] > memory["bf16_estimate_bytes"] > 0  # + FP8 copies
    assert memory["bf16_reserved_estimate_bytes"] > memory["bf16_estimate_bytes"]
    assert result["wall_s"] <= 60, result["part_seconds"]
