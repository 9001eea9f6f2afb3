"""`python -m parcae_megatron.scaling plan|fit ...`: plan an iso-FLOP sweep (docs/design.md §10.1),
fit the scaling laws to its finished runs (docs/design.md §10).

Example::

    python -m parcae_megatron.scaling plan --preset parcae-140m --config configs/parcae-140m.yaml \\
        --budgets 1e18 2e18 4e18 --recurrences 1 2 4 6 8 10 12 --out isoflop.yaml
    python -m launch.submit --sweep isoflop.yaml --nodes 1 --gpus-per-node 8 -- --data-path ...
    python -m parcae_megatron.scaling fit runs/isoflop/*/ --out fit.json --plots plots/
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from parcae_megatron import cli

HOLDOUTS = ("largest-budget", "fraction", "none")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = cli.ArgumentParser(prog="python -m parcae_megatron.scaling",
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
    plan.add_argument("--vocab-size", type=int, default=None,
                      help="padded vocabulary of the runs (default: the preset's); it sets the "
                           "value-embedding and LM-head FLOPs")
    plan.add_argument("--flops-formula", choices=("code", "paper"), default="code",
                      help="FLOPs per token that set the tokens of a budget: the authors' code "
                           "formula (default, the paper's budgets) or App. D's 2·N̂₁ + 6·N̂₂")
    plan.add_argument("--concurrency", type=int, default=None)
    plan.add_argument("--out", required=True, help="sweep YAML to write")
    fit = sub.add_parser("fit", help="fit iso-FLOP, parametric and test-time laws to runs")
    fit.add_argument("runs", nargs="+", help="run directories (or their telemetry.jsonl)")
    fit.add_argument("--out", default="scaling_fit.json", help="JSON results")
    fit.add_argument("--plots", default=None, help="directory for PNG plots")
    fit.add_argument("--restarts", type=int, default=500, help="L-BFGS restarts")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--flops-formula", choices=("code", "paper"), default="code",
                     help="compute axis C (use the formula the sweep was planned with)")
    fit.add_argument("--holdout", choices=HOLDOUTS, default="largest-budget",
                     help="points kept out of the fits to measure prediction error: every run "
                          "of the largest budget (default; only with >= 3 budgets), a seeded "
                          "random fraction of runs, or none")
    fit.add_argument("--holdout-fraction", type=float, default=0.2,
                     help="share of runs held out with --holdout fraction (at least one)")
    args = parser.parse_args(argv)
    if args.command == "fit":
        return _fit(args)
    return _plan(args)


def _plan(args) -> int:
    import yaml

    from parcae_megatron.model.config import ParcaeConfigError
    from parcae_megatron.scaling.plan import plan_isoflop, sweep_document, sweep_header

    try:
        runs = plan_isoflop(args.preset, args.budgets, args.recurrences,
                            args.global_batch_size, args.seq_length, args.flops_formula,
                            args.vocab_size)
    except ParcaeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = sweep_document(runs, args.config, Path(args.out).stem, args.concurrency)
    Path(args.out).write_text(sweep_header(runs) + yaml.safe_dump(doc, sort_keys=False))
    print(f"tokens from the {args.flops_formula} FLOP formula (docs/design.md §8)")
    print(f"{'run':<30} {'FLOPs/tok code':>14} {'FLOPs/tok paper':>15} {'tokens':>14} "
          f"{'steps':>8} {'FLOPs code':>11} {'FLOPs paper':>11}")
    for r in runs:
        print(f"{r.name:<30} {r.code_flops_per_token:14.3e} {r.paper_flops_per_token:15.3e} "
              f"{r.tokens:14,d} {r.train_iters:8d} {r.tokens * r.code_flops_per_token:11.3e} "
              f"{r.tokens * r.paper_flops_per_token:11.3e}")
    print(json.dumps({"out": args.out, "runs": len(runs), "flops_formula": args.flops_formula}))
    return 0


def _fit(args) -> int:
    # Single-threaded BLAS (set before numpy loads): the fits' arrays are tiny, and threaded
    # OpenBLAS makes each L-BFGS step wait for busy cores (10x slower on a loaded machine).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from parcae_megatron.scaling.results import fit_runs, load_run, write_json

    try:
        runs = [load_run(Path(p)) for p in args.runs]
        result = fit_runs(runs, args.restarts, args.seed,
                          Path(args.plots) if args.plots else None,
                          flops_formula=args.flops_formula, holdout=args.holdout,
                          holdout_fraction=args.holdout_fraction)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(result, Path(args.out))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
