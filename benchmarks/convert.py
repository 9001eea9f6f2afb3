"""Benchmark checkpoint conversion of a paper-size model (default parcae-1.3b) on the CPU.

In one process: build the model (uninitialised; values do not matter for timing), write it as
a Megatron torch_dist checkpoint, then time

* baseline I/O: ``dist_checkpointing.load`` of the model alone and a plain safetensors
  ``save_file`` of the same tensors (what any converter must at least do);
* ``convert to-hf`` (load + reshard + re-index + safetensors/config/code) and
  ``convert from-hf`` (read + re-index + argument rebuild + torch_dist save).

The five steps run in rounds, each once per round in that order (a Megatron write, its load,
the safetensors write, to-hf, from-hf), one warm-up round then ``--repeats`` timed ones; each
figure is the median with its min–max and each conversion/baseline ratio is taken round by
round (benchmarks/timing.py). Prints a table and ONE JSON object on the last line.

    .venv/bin/python benchmarks/convert.py [--preset parcae-1.3b] [--dtype bfloat16]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import Spread, Timings, alternate  # noqa: E402


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="parcae-1.3b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after 1 warm-up)")
    opts = parser.parse_args()
    if opts.repeats < 1:
        parser.error("--repeats must be >= 1")
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
        megatron, hf, back = tmp / "megatron", tmp / "hf", tmp / "back"

        def timed(fn):
            def run() -> float:
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start
            return run

        def write_megatron() -> float:
            for path in (megatron, hf, back):  # the previous round's outputs
                shutil.rmtree(path, ignore_errors=True)
            ckpt = megatron / "iter_0000001"
            ckpt.mkdir(parents=True)
            start = time.perf_counter()  # the clean-up above is not part of the figure
            dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args,
                                     "checkpoint_version": 3.0, "iteration": 1}, str(ckpt))
            (megatron / "latest_checkpointed_iteration.txt").write_text("1")
            return time.perf_counter() - start

        def write_safetensors() -> None:
            tensors = {k: v.contiguous() for k, v in model.state_dict().items()
                       if isinstance(v, torch.Tensor)}
            save_file(tensors, str(tmp / "plain.safetensors"))

        rounds = alternate({
            "write_megatron": write_megatron,
            "load_megatron": timed(lambda: dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, str(megatron / "iter_0000001"))),
            "write_safetensors": timed(write_safetensors),
            "to_hf": timed(lambda: to_hf(megatron, hf, dtype=opts.dtype)),
            "from_hf": timed(lambda: from_hf(hf, back))}, opts.repeats)
    times = Timings(rounds)
    to_hf_ratio = Spread.of([t / (load + write) for t, load, write in zip(
        rounds["to_hf"], rounds["load_megatron"], rounds["write_safetensors"])])
    from_hf_ratio = Spread.of([t / (megatron_w + write) for t, megatron_w, write in zip(
        rounds["from_hf"], rounds["write_megatron"], rounds["write_safetensors"])])
    result = {
        "preset": opts.preset, "dtype": opts.dtype, "parameters": params,
        **times.flat({"load_megatron": "baseline_load_megatron_s",
                      "write_safetensors": "baseline_write_safetensors_s",
                      "write_megatron": "write_megatron_s", "to_hf": "to_hf_s",
                      "from_hf": "from_hf_s"}),
        **to_hf_ratio.flat("to_hf_over_baseline"),
        **from_hf_ratio.flat("from_hf_over_baseline"),
    }
    print(f"{opts.preset} ({params:,} params, {opts.dtype}); medians [min–max] over "
          f"{opts.repeats} interleaved rounds")
    for name in rounds:
        print(f"  {name + ' s':<32} {times.time(name).text(fmt='.2f')}")
    print(f"  {'to_hf / (load + safetensors)':<32} {to_hf_ratio.text()}")
    print(f"  {'from_hf / (2 writes)':<32} {from_hf_ratio.text()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
