"""Overhead of CORE while training (``--eval-core-interval``), as a share of training time.

(a) Measured, CPU backend: the tiny config on 2 data-parallel gloo ranks, the same run with and
    without ``--eval-core-interval K``, interleaved run by run (A B A B …, benchmarks/timing.py).
    A run's span is the time from its first step record (the warm-up step left out) to its last
    record in ``telemetry.jsonl`` (the CORE pauses fall inside it). Reported pair by pair: the
    measured overhead span_with / span_without − 1, and the formula's prediction from the
    runs' own records: evaluations × median CORE ``wall_time_s`` / (steps × median
    ``step_time_s``), which at interval N is t_core / (N · t_step). The interval that keeps
    the overhead ≤ 2 % at this shape is ceil(t_core / (0.02 · t_step)).
(b) Counted, the 1.3B run's shape (no GPU here): CORE's forward FLOPs per evaluation over one
    training step's FLOPs, r = Σ_prompts Σ_T F_fwd(T, S) · S / (F_train · 256 · 2048), with
    F_fwd(T, S) = 2·N_nc + A·(L_P+L_C) + (2·N_R + A·L_R)·T per token (A = 4·d·S, the design
    doc's formula without its backward terms, S a prompt's length), loop counts 1, μ_rec and
    2·μ_rec. The prompts are counted from the real bundle with ``--bundle`` and
    ``--tokenizer``; without them ``--core-tokens`` tokens in prompts of 400 tokens are
    assumed (flagged in the JSON). The interval for ≤ 2 % is r · e / 0.02, where e is how much
    less efficiently CORE's forwards use the hardware than a training step, measured in (a)
    on the CPU as (training FLOP/s) / (CORE FLOP/s), not on a GPU.

Usage: python benchmarks/core_overhead.py [--repeats 3] [--steps 40] [--interval 10]
[--max-per-task 40] [--core-tokens N | --bundle DIR --tokenizer MODEL]. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import Spread, alternate  # noqa: E402

from parcae_megatron.model.accounting import count_parameters_from_config  # noqa: E402
from parcae_megatron.model.presets import preset_config  # noqa: E402
from parcae_megatron.training.telemetry import read_records  # noqa: E402
from tests.sentencepiece_models import TEXT, train_standard_spm  # noqa: E402
from tests.test_core_eval import write_bundle  # noqa: E402

TASKS = """icl_tasks:
- {label: mc_task, dataset_uri: cat_a/mc.jsonl, num_fewshot: 2, icl_task_type: multiple_choice}
- {label: schema_task, dataset_uri: cat_a/schema.jsonl, num_fewshot: 2, icl_task_type: schema}
- {label: lm_task, dataset_uri: cat_b/lm.jsonl, num_fewshot: 2,
   icl_task_type: language_modeling}
"""
# Assumed CORE prompt tokens per loop count at --eval-core-max-per-task 500: 22 tasks × ≤ 500
# items × ~3 prompts × ~400 tokens (few-shot prompts, cropped at 2,048). An assumption.
ASSUMED_CORE_TOKENS = 22 * 500 * 3 * 400


def synthetic_bundle(root: Path, records: int) -> Path:
    """Three tasks (one per type) of ``records`` records each, words of the tokenizer's text."""
    words, rng = TEXT.split(), random.Random(0)
    phrase = lambda n: " ".join(rng.choice(words) for _ in range(n))
    write_bundle(root, [(phrase(6), [phrase(3) for _ in range(4)], i % 4) for i in range(records)],
                 [([phrase(4), phrase(4)], phrase(4), i % 2) for i in range(records)],
                 [(phrase(6), rng.choice(words)) for _ in range(records)])
    (root / "tasks.yaml").write_text(TASKS)
    return root


def run(work: Path, name: str, tokenizer: Path, steps: int, core: list[str]) -> dict:
    """One training run; its span, median step time and CORE wall times."""
    save = work / name
    telemetry = save / "telemetry.jsonl"
    telemetry.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "parcae_megatron.train", "--config", "configs/parcae-tiny-cpu.yaml",
           "--mock-data", "--tokenizer-model", str(tokenizer), "--train-iters", str(steps),
           "--log-interval", "1", "--eval-iters", "0", "--save-interval", str(10 * steps),
           "--telemetry-path", str(telemetry), *core]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: training run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    train, cores = read_records(telemetry, "train"), read_records(telemetry, "core")
    # From the end of the first (warm-up) step to the last record: a CORE evaluation after
    # the last step ends the span of the run that has one.
    end = max(r["time"] for r in train + cores)
    return {"span": end - train[0]["time"], "steps": len(train) - 1,
            "step": statistics.median(r["step_time_s"] for r in train[1:]),
            "cores": [r["wall_time_s"] for r in cores if r["iteration"] > 1]}


def tiny_flops(max_per_task: int, bundle: Path, tokenizer: Path) -> tuple[float, float]:
    """(CORE forward FLOPs per evaluation, training FLOPs per step) of the tiny config, its
    prompts tokenized as CORE tokenizes them."""
    from parcae_megatron.evaluate.core import load_task_specs, prepare_task
    from parcae_megatron.evaluate.core_runner import bos_encoder, load_bundle
    from parcae_megatron.evaluate.runner import load_hf_tokenizer

    cfg = preset_config("parcae-tiny", seq_length=64, vocab_size=320)
    specs = load_task_specs(bundle / "tasks.yaml")
    data, _, _ = load_bundle(bundle, specs, max_per_task)
    encode = bos_encoder(load_hf_tokenizer(str(tokenizer), 320), 320)
    lengths = [len(t) for s in specs for item in prepare_task(s, data[s.label], 1234, encode, 64)
               for t in item.tokens]
    mu = cfg.mean_recurrence
    core = sum(forward_flops(cfg, n, t) * n for n in lengths for t in (1, mu, 2 * mu))
    return core, train_flops(cfg) * 8 * 64


def prompt_lengths(bundle: Path, tokenizer: str, vocab: int, max_per_task: int = 500,
                   max_len: int = 2048) -> list[int]:
    """Token length of every prompt CORE runs per loop count (22 CORE tasks, the cut)."""
    from parcae_megatron.evaluate.core import load_task_specs, prepare_task
    from parcae_megatron.evaluate.core_runner import bos_encoder, load_bundle
    from parcae_megatron.evaluate.runner import load_hf_tokenizer

    specs = load_task_specs()
    data, _, _ = load_bundle(bundle, specs, max_per_task)
    encode = bos_encoder(load_hf_tokenizer(tokenizer, vocab), vocab)
    return [len(t) for s in specs
            for item in prepare_task(s, data[s.label], 1234, encode, max_len)
            for t in item.tokens]


def forward_flops(cfg, seq: int, t: int) -> float:
    """Forward FLOPs per token at loop count ``t`` and context ``seq``."""
    from parcae_megatron.model.accounting import token_embedding_params

    counts = count_parameters_from_config(cfg)
    attn = 4 * cfg.hidden_size * seq
    n_rec = counts["recurrent_params"]
    n_nc = counts["total_params"] - token_embedding_params(cfg) - n_rec
    return (2 * n_nc + attn * (cfg.num_prelude_layers + cfg.num_coda_layers)
            + (2 * n_rec + attn * cfg.num_recurrent_layers) * t)


def train_flops(cfg) -> float:
    """Training FLOPs per token (the design doc's formula)."""
    from parcae_megatron.model.accounting import flops_per_token

    return flops_per_token(cfg, count_parameters_from_config(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--max-per-task", type=int, default=40)
    parser.add_argument("--core-tokens", type=int, default=ASSUMED_CORE_TOKENS,
                        help="CORE prompt tokens per loop count at the 1.3B shape")
    parser.add_argument("--bundle", default=None, help="the real eval bundle: count its "
                        "prompt tokens (with --tokenizer) instead of --core-tokens")
    parser.add_argument("--tokenizer", default=None, help="the 1.3B run's tokenizer model")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="parcae-core-overhead-"))
    tokenizer = train_standard_spm(work / "spm.model")
    bundle = synthetic_bundle(work / "bundle", args.max_per_task)
    core = ["--eval-core-interval", str(args.interval), "--eval-core-bundle", str(bundle),
            "--eval-core-tasks-yaml", str(bundle / "tasks.yaml"), "--eval-core-max-per-task",
            str(args.max_per_task)]
    res = alternate({"with": lambda: run(work, "with", tokenizer, args.steps, core),
                     "without": lambda: run(work, "without", tokenizer, args.steps, [])},
                    args.repeats, args.warmup)
    measured = Spread.of([w["span"] / o["span"] - 1 for w, o in zip(res["with"],
                                                                     res["without"])])
    # The same pairs through the formula: evaluations × their wall time / training time.
    predicted = Spread.of([len(w["cores"]) * statistics.median(w["cores"])
                           / (o["steps"] * o["step"])
                           for w, o in zip(res["with"], res["without"])])
    t_core = statistics.median(c for w in res["with"] for c in w["cores"])
    t_step = statistics.median(o["step"] for o in res["without"])
    core_flops, step_flops = tiny_flops(args.max_per_task, bundle, tokenizer)
    # e: training FLOP/s over CORE FLOP/s on this machine (how much slower CORE's short,
    # small-batch forwards run per FLOP than a training step).
    efficiency_gap = (step_flops / t_step) / (core_flops / t_core)

    big = preset_config("parcae-1.3b", seq_length=2048)
    mu = big.mean_recurrence
    lengths = (prompt_lengths(Path(args.bundle), args.tokenizer, big.vocab_size)
               if args.bundle else [400] * (args.core_tokens // 400))
    args.core_tokens = sum(lengths)
    core_big = sum(forward_flops(big, n, t) * n for n in lengths for t in (1, mu, 2 * mu))
    ratio = core_big / (train_flops(big) * 256 * 2048)
    result = {
        "benchmark": "core_overhead", "load_avg_1min": os.getloadavg()[0],
        "cpu_interval": args.interval, "cpu_steps": args.steps,
        "cpu_max_per_task": args.max_per_task, "cpu_core_s": t_core, "cpu_step_s": t_step,
        **measured.flat("cpu_overhead_measured"), **predicted.flat("cpu_overhead_predicted"),
        "cpu_interval_for_2pct": math.ceil(t_core / (0.02 * t_step)),
        "cpu_efficiency_gap": efficiency_gap,
        "b13_core_tokens_per_T": args.core_tokens,
        "b13_core_tokens_assumed": args.bundle is None,
        "b13_core_over_step_flops": ratio,
        "b13_interval_for_2pct_equal_efficiency": math.ceil(ratio / 0.02),
        "b13_interval_for_2pct_cpu_gap": math.ceil(ratio * efficiency_gap / 0.02),
        "repeats": args.repeats,
    }
    print(f"CPU tiny, interval {args.interval}: CORE {t_core:.2f} s, step {t_step:.3f} s; "
          f"overhead measured {measured.text(100, '.1f')} %, predicted "
          f"{predicted.text(100, '.1f')} %; ≤ 2 % from interval "
          f"{result['cpu_interval_for_2pct']}")
    print(f"1.3B shape: one CORE evaluation = {ratio:.2f} training steps of FLOPs "
          f"({args.core_tokens:,} prompt tokens per T"
          f"{', assumed' if result['b13_core_tokens_assumed'] else ''}); ≤ 2 % from interval "
          f"{result['b13_interval_for_2pct_equal_efficiency']} at equal efficiency, "
          f"{result['b13_interval_for_2pct_cpu_gap']} with the CPU's efficiency gap "
          f"{efficiency_gap:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
