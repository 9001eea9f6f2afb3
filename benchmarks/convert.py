"""Benchmark checkpoint conversion of a paper-size model (default parcae-1.3b) on the CPU.

In one process: build the model (uninitialised; values do not matter for timing), write it as
a Megatron torch_dist checkpoint, then time

* baseline I/O: ``dist_checkpointing.load`` of the model alone and a plain safetensors
  ``save_file`` of the same tensors (what any converter must at least do);
* ``convert to-hf`` (load + reshard + re-index + safetensors/config/code) and
  ``convert from-hf`` (read + re-index + argument rebuild + torch_dist save).

Prints a table and ONE JSON object on the last line (seconds and conversion/baseline ratios).

    .venv/bin/python benchmarks/convert.py [--preset parcae-1.3b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="parcae-1.3b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    opts = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from parcae_megatron.convert.megatron_ckpt import (
        args_for_model,
        build_model,
        single_process_config,
    )
    from parcae_megatron.convert.megatron_hf import from_hf, to_hf
    from parcae_megatron.model.presets import PRESETS

    preset = PRESETS[opts.preset]
    fields = dict(
        hidden_size=preset["hidden_size"], ffn_hidden_size=preset["ffn_hidden_size"],
        num_attention_heads=preset["num_attention_heads"],
        num_query_groups=preset.get("num_query_groups") or preset["num_attention_heads"],
        kv_channels=preset.get("kv_channels", 128),
        num_prelude_layers=preset["num_prelude_layers"],
        num_recurrent_layers=preset["num_recurrent_layers"],
        num_coda_layers=preset["num_coda_layers"], mean_recurrence=preset["mean_recurrence"],
        mean_backprop_depth=preset["mean_backprop_depth"], injection_type="diagonal",
        state_init="like_init", seq_length=preset["seq_length"], layernorm_epsilon=1e-5,
        rotary_base=50000, prelude_norm=True, value_embeddings=True)
    args = args_for_model(fields, 1, 1, None, 32768)
    if opts.dtype == "bfloat16":
        args.bf16, args.params_dtype = True, torch.bfloat16
    model = build_model(single_process_config(args))
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=opts.workdir) as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "megatron" / "iter_0000001"
        ckpt.mkdir(parents=True)
        t = time.perf_counter()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args,
                                 "checkpoint_version": 3.0, "iteration": 1}, str(ckpt))
        (tmp / "megatron" / "latest_checkpointed_iteration.txt").write_text("1")
        write_megatron = time.perf_counter() - t
        t = time.perf_counter()
        dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        load_megatron = time.perf_counter() - t
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()
                   if isinstance(v, torch.Tensor)}
        t = time.perf_counter()
        save_file(tensors, str(tmp / "plain.safetensors"))
        write_safetensors = time.perf_counter() - t
        del tensors, model
        t = time.perf_counter()
        to_hf(tmp / "megatron", tmp / "hf", dtype=opts.dtype)
        to_hf_s = time.perf_counter() - t
        t = time.perf_counter()
        from_hf(tmp / "hf", tmp / "back")
        from_hf_s = time.perf_counter() - t
    baseline = load_megatron + write_safetensors
    result = {
        "preset": opts.preset, "dtype": opts.dtype, "parameters": params,
        "baseline_load_megatron_s": round(load_megatron, 2),
        "baseline_write_safetensors_s": round(write_safetensors, 2),
        "write_megatron_s": round(write_megatron, 2),
        "to_hf_s": round(to_hf_s, 2), "from_hf_s": round(from_hf_s, 2),
        "to_hf_over_baseline": round(to_hf_s / baseline, 3),
        "from_hf_over_baseline": round(from_hf_s / (write_megatron + write_safetensors), 3),
    }
    print(f"{opts.preset} ({params:,} params, {opts.dtype})")
    for key, value in result.items():
        if key.endswith("_s") or key.endswith("baseline"):
            print(f"  {key:<32} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
