"""`python -m parcae_megatron.probe`: does the loop earn its depth? A k-hop look-up probe.

Generates pointer-chasing documents (a permutation table in context, queries ``k x`` whose
answer is f^k(x)), turns them into indexed datasets with ``data_prep``, trains a looped
Parcae and a fixed-depth Transformer of the same parameter count through
``parcae_megatron.train``, and scores exact-match accuracy on held-out tables by k and by the
test-time loop count T = 1 … 3·μ_rec. Writes probe.json and probe.png in the run directory.

Any config and layout: ``--parcae-config`` / ``--transformer-config`` pick the YAML files,
``--train-args "..."`` passes trainer flags to both runs (e.g. ``--tensor-model-parallel-size 2
--fp8-format hybrid``), ``--nproc`` sets processes per run; on a cluster the same command
checks that a layout still learns the look-ups and still gains from loops.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from parcae_megatron import cli
from parcae_megatron.probe.task import TaskSpec

ROOT = Path(__file__).resolve().parents[2]

# The chosen recipe (docs/probe.md "What was tried"): 7-letter cycles, k = 1..3 weighted
# 2,1,1, the configs' Muon at lr 1e-2, batch 32, 3,500 steps. With the default (tiny) configs
# the probe trains a thin pair: Parcae with 1 prelude, 1 recurrent and no coda layer (2 layers
# deep at T = 1, 5 at T = μ_rec = 4) against an equal-parameter 2-layer Transformer. A look-up
# costs one layer once the prelude has bound each table value to its key, so a T = 1 pass
# answers k = 1 only, T = k answers k (run t: k = 3 at 0.18 for T = 1, 1.00 from T = 3), and the
# 2-layer Transformer stops short of k = 3. Dropping the coda halves the step time of the
# 1/1/1 pair and learns where it stalled (runs o, t). Full backprop through the loop
# (μ_bwd = μ_rec) learns the look-ups much faster than the preset's μ_bwd = 2 (runs g, h).
DEFAULT_TRAIN_ARGS = ""
DEFAULT_CONFIGS = {"parcae": ROOT / "configs" / "parcae-tiny-cpu.yaml",
                   "transformer": ROOT / "configs" / "transformer-tiny-cpu.yaml"}
THIN_PAIR_ARGS = {
    "parcae": "--num-prelude-layers 1 --num-recurrent-layers 1 --num-coda-layers 0 "
              "--mean-backprop-depth 4",
    "transformer": "--num-prelude-layers 2",
}


def build_parser() -> argparse.ArgumentParser:
    """The probe's command line."""
    p = cli.ArgumentParser(prog="python -m parcae_megatron.probe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/probe", help="where everything goes")
    p.add_argument("--models", default="parcae,transformer",
                   help="comma list of parcae, transformer (default both)")
    p.add_argument("--parcae-config", default=str(DEFAULT_CONFIGS["parcae"]),
                   help="Parcae's YAML config; with the default one the probe trains it "
                        f"as {THIN_PAIR_ARGS['parcae']!r}")
    p.add_argument("--transformer-config", default=str(DEFAULT_CONFIGS["transformer"]),
                   help="the Transformer's YAML config; with the default one the probe "
                        f"trains it as {THIN_PAIR_ARGS['transformer']!r}")
    p.add_argument("--train-iters", type=int, default=3500)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--nproc", type=int, default=1, help="training processes per run")
    p.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS,
                   help="extra trainer flags for both runs, one string (they come last)")
    p.add_argument("--parcae-args", default="", help="extra trainer flags for Parcae only")
    p.add_argument("--transformer-args", default="",
                   help="extra trainer flags for the Transformer only")
    p.add_argument("--n-symbols", type=int, default=7, help="letters the tables permute")
    p.add_argument("--max-k", type=int, default=3, help="longest chain (look-ups) in training")
    p.add_argument("--test-max-k", type=int, default=None,
                   help="longest held-out chain (default --max-k); longer than --max-k tests "
                        "chains no training document has (needs --query-form unary)")
    p.add_argument("--query-form", choices=("digit", "unary"), default="digit",
                   help="a query as 'k x y' (digit) or 'x' + k hop marks + 'y' (unary)")
    p.add_argument("--k-weights", default="2,1,1",
                   help="comma list, relative frequency of k = 1..max-k in training; "
                        "'' for uniform")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per document")
    p.add_argument("--train-docs", type=int, default=12000)
    p.add_argument("--test-docs", type=int, default=300)
    p.add_argument("--loop-counts", default=None,
                   help="comma list of test-time T (default 1 … --max-loops)")
    p.add_argument("--max-loops", type=int, default=None,
                   help="largest test-time T of the default sweep (default 3·μ_rec)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    return p


def model_flags(name: str, config: Path, common: list[str], own: str) -> list[str]:
    """Trainer flags of one model: the thin pair's shape (default configs only: a user's
    config keeps its own layers), then the flags of both runs, then this model's own."""
    thin = THIN_PAIR_ARGS[name] if config.resolve() == DEFAULT_CONFIGS[name] else ""
    return shlex.split(thin) + common + shlex.split(own)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"parcae", "transformer"}:
        print("error: --models takes parcae and/or transformer", file=sys.stderr)
        return 2
    for name in models:
        if not Path(getattr(args, f"{name}_config")).is_file():
            print(f"error: --{name}-config {getattr(args, f'{name}_config')} does not exist",
                  file=sys.stderr)
            return 2
    try:
        weights = (tuple(float(w) for w in args.k_weights.split(","))
                   if args.k_weights else None)
        spec = TaskSpec(n_symbols=args.n_symbols, max_k=args.max_k,
                        doc_chars=args.seq_length - 1, k_weights=weights,
                        test_max_k=args.test_max_k, query_form=args.query_form)
    except ValueError as err:
        cli.fail(str(err))
    try:
        counts = ([int(t) for t in args.loop_counts.split(",")] if args.loop_counts
                  else None)
    except ValueError:
        cli.fail(f"--loop-counts takes a comma list of integers, got {args.loop_counts!r}")
    if min(counts or [1]) < 1 or (args.max_loops is not None and args.max_loops < 1):
        cli.fail("loop counts (--loop-counts, --max-loops) must be at least 1")
    # heavy imports (Megatron, torch) only once the options are known to be good
    from parcae_megatron.probe.pipeline import prepare_data, train, train_command
    from parcae_megatron.probe.report import plot, summarise
    from parcae_megatron.probe.score import score_checkpoint

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "probe.log"
    started = time.time()
    print(f"==> data: {args.train_docs} train documents ({spec.n_queries} queries each, "
          f"k = 1..{spec.max_k}) / {args.test_docs} held-out "
          f"({spec.queries_per_document('test')} each, k = 1..{spec.test_max_k}); log: {log}",
          flush=True)
    data = prepare_data(run_dir / "data", spec, args.train_docs, args.test_docs, args.seed, log)
    extra = ["--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.global_batch_size), "--lr", str(args.lr),
             *shlex.split(args.train_args)]
    results = {}
    for name in models:
        config = Path(getattr(args, f"{name}_config"))
        ckpt, telemetry = run_dir / name / "checkpoints", run_dir / name / "telemetry.jsonl"
        cmd = train_command(config, data, ckpt, telemetry, args.seq_length, args.train_iters,
                            args.nproc, model_flags(name, config, extra,
                                                    getattr(args, f"{name}_args")))
        wall = train(name, cmd, ckpt, telemetry, args.train_iters, log)
        print(f"==> scoring {name} on held-out chains", flush=True)
        res = score_checkpoint(ckpt, data / "test.jsonl", data / "tokenizer.model", counts,
                               args.max_loops,
                               spec.symbols if spec.query_form == "unary" else None)
        res["train_wall_s"] = round(wall, 1)
        res["config"] = str(config)
        results[name] = res
    summary = summarise(results, spec, vars(args), time.time() - started)
    (run_dir / "probe.json").write_text(json.dumps(summary, indent=2))
    plot(run_dir / "probe.png", summary)
    print(summary["text"])
    print(f"  files  {run_dir / 'probe.json'}  {run_dir / 'probe.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
