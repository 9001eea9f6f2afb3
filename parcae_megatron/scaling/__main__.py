"""`python -m parcae_megatron.scaling plan ...`: plan an iso-FLOP sweep (spec §5.2).

Example::

    python -m parcae_megatron.scaling plan --preset parcae-140m --config configs/parcae-140m.yaml \\
        --budgets 1e18 2e18 4e18 --recurrences 1 2 4 6 8 10 12 --out isoflop.yaml
    python -m launch.submit --sweep isoflop.yaml --nodes 1 --gpus-per-node 8 -- --data-path ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from parcae_megatron.model.config import ParcaeConfigError
from parcae_megatron.scaling.plan import plan_isoflop, sweep_document


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m parcae_megatron.scaling",
                                     description="Scaling-law tools for looped models.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="iso-FLOP sweep → a launch.submit sweep file")
    plan.add_argument("--preset", required=True, help="model size, e.g. parcae-140m")
    plan.add_argument("--config", required=True, help="base run config of every element")
    plan.add_argument("--budgets", type=float, nargs="+", required=True, help="FLOPs, e.g. 1e18")
    plan.add_argument("--recurrences", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12],
                      help="μ_rec values (μ_bwd = ceil(μ_rec / 2))")
    plan.add_argument("--global-batch-size", type=int, default=256)
    plan.add_argument("--seq-length", type=int, default=2048)
    plan.add_argument("--concurrency", type=int, default=None)
    plan.add_argument("--out", required=True, help="sweep YAML to write")
    fit = sub.add_parser("fit", help="fit iso-FLOP, parametric and test-time laws to runs")
    fit.add_argument("runs", nargs="+", help="run directories (or their telemetry.jsonl)")
    fit.add_argument("--out", default="scaling_fit.json", help="JSON results")
    fit.add_argument("--plots", default=None, help="directory for PNG plots")
    fit.add_argument("--restarts", type=int, default=500, help="L-BFGS restarts")
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "fit":
        return _fit(args)
    try:
        runs = plan_isoflop(args.preset, args.budgets, args.recurrences,
                            args.global_batch_size, args.seq_length)
    except ParcaeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = sweep_document(runs, args.config, Path(args.out).stem, args.concurrency)
    Path(args.out).write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"{'run':<28} {'FLOPs/token':>12} {'tokens':>14} {'steps':>8}")
    for r in runs:
        print(f"{r.name:<28} {r.flops_per_token:12.3e} {r.tokens:14,d} {r.train_iters:8d}")
    print(json.dumps({"out": args.out, "runs": len(runs)}))
    return 0


def _fit(args) -> int:
    from parcae_megatron.scaling.results import fit_runs, load_run, write_json

    try:
        runs = [load_run(Path(p)) for p in args.runs]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = fit_runs(runs, args.restarts, args.seed,
                      Path(args.plots) if args.plots else None)
    write_json(result, Path(args.out))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
