"""The ``adaptive`` subcommand of ``python -m parcae_megatron.evaluate`` (parser and driver):
loss, and CORE with ``--bundle``, against mean iterations per token under per-token early exit."""

from __future__ import annotations

import argparse

from parcae_megatron import cli
from parcae_megatron.evaluate.core_cli import (
    add_bundle_args,
    add_model_args,
    load_model,
    task_specs,
)
from parcae_megatron.evaluate.report import write_outputs


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``adaptive``."""
    prog = "python -m parcae_megatron.evaluate adaptive"
    p = cli.ArgumentParser(prog=prog, description="Per-token early exit: loss (and "
                                "CORE with --bundle) against mean iterations per token for "
                                "a sweep of thresholds, beside the fixed-T curve.")
    add_model_args(p)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-prefix", metavar="PREFIX", help="Megatron indexed dataset")
    data.add_argument("--text", nargs="+", metavar="FILE", help=".txt/.jsonl files")
    p.add_argument("--text-key", default="text")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per window (default: max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="score at most this many tokens (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--criterion", choices=("residual", "kl", "argmax"), default="residual")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="exit thresholds ε (argmax: patience k); default per criterion")
    p.add_argument("--max-T", type=int, default=None, help="maximum loop count (default "
                   "mu_rec); the fixed-T curve runs 1 … max-T")
    p.add_argument("--seed", type=int, default=0, help="h0 seed (default 0)")
    p.add_argument("--extended", action="store_true", help="CORE-Extended with --bundle")
    add_bundle_args(p, False)
    return p


def run(args) -> int:
    """Run ``adaptive`` with parsed ``args``."""
    import torch
    from tqdm import tqdm

    from parcae_megatron.evaluate.adaptive import (
        adaptive_forward,
        adaptive_loss,
        best_saving,
        plot_adaptive,
        summarise_histogram,
    )
    from parcae_megatron.evaluate.runner import build_windows
    from parcae_megatron.evaluate.validation_loss import score

    model, tokenizer, device, name = load_model(args)
    max_t = args.max_T or int(model.config.mean_recurrence)
    defaults = {"residual": [0.3, 0.1, 0.03, 0.01], "kl": [0.1, 0.01, 1e-3, 1e-4],
                "argmax": [1, 2, 3]}
    thresholds = args.thresholds or defaults[args.criterion]
    if max_t < 1 or any(x < 0 for x in thresholds):
        raise ValueError("--max-T must be >= 1 and thresholds >= 0")
    seq = args.seq_length or model.config.max_position_embeddings
    windows = build_windows(seq, data_prefix=args.data_prefix, text_files=args.text,
                            tokenizer=tokenizer, max_tokens=args.max_tokens or None,
                            text_key=args.text_key)
    fixed_rows = score(model, windows.windows, list(range(1, max_t + 1)), [args.seed],
                       args.batch_size, None, progress=not args.quiet)
    fixed = {r["T"]: r["loss"] for r in fixed_rows}
    nb = len({len(w) for w in windows.windows}) + len(windows.windows) // args.batch_size
    bar = tqdm(total=len(thresholds) * nb, unit="batch", disable=args.quiet)
    points = []
    for eps in thresholds:
        k = int(eps) if args.criterion == "argmax" else 2
        bar.set_description(f"{args.criterion} {eps:g}")
        points.append(adaptive_loss(model, windows.windows, max_t, args.criterion, eps, k,
                                    args.seed, args.batch_size, bar))
    bar.close()
    report = {"model": name, "criterion": args.criterion, "max_T": max_t, "seed": args.seed,
              "mean_recurrence": int(model.config.mean_recurrence),
              "tokens": windows.targets, "scoring": "teacher-forced cached decoding",
              "fixed": [{"T": t, "loss": v} for t, v in fixed.items()], "adaptive": points}
    mu = int(model.config.mean_recurrence)
    if mu in fixed:
        report["best_vs_mu_rec"] = best_saving(fixed, points, mu)
    if args.bundle:
        from parcae_megatron.evaluate.core_runner import run_core

        specs = task_specs(args, args.extended)
        common = dict(max_per_task=args.max_per_task, batch_size=args.prompts_per_batch,
                      device=device, progress=not args.quiet, name="CORE-Extended"
                      if args.extended else "CORE")
        fixed_core = run_core(model, tokenizer, args.bundle, specs, list(range(1, max_t + 1)),
                              [args.seed], **common)
        core = {"metric": fixed_core["metric"], "bundle_sha256": fixed_core["bundle_sha256"],
                "fixed": [{"T": r["T"], "score": r["score"]} for r in fixed_core["results"]],
                "adaptive": []}
        for eps in thresholds:
            log: list = []
            k = int(eps) if args.criterion == "argmax" else 2
            res = run_core(model, tokenizer, args.bundle, specs, [max_t], [args.seed],
                           forward_for=adaptive_forward(model, max_t, args.criterion, eps, k,
                                                        log, tokenizer.bos_token_id), **common)
            its = torch.cat(log) if log else torch.zeros(1)
            core["adaptive"].append({"threshold": eps, "score": res["results"][0]["score"],
                                     "mean_iterations": float(its.float().mean())})
        report["core"] = core
    print(f"{'rule':>18}  {'mean its':>8}  {'loss':>8}  histogram (iterations:tokens)")
    for t, v in fixed.items():
        print(f"{'fixed T=' + str(t):>18}  {t:>8.2f}  {v:>8.4f}")
    for p in points:
        print(f"{args.criterion + ' ' + format(p['threshold'], 'g'):>18}  "
              f"{p['mean_iterations']:>8.2f}  {p['loss']:>8.4f}  "
              f"{summarise_histogram(p['histogram'])}")
    write_outputs(report, args.out, args.plot, plot_adaptive)
    return 0
