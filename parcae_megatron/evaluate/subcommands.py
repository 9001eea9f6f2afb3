"""Subcommands ``core``, ``core-extended``, ``adaptive`` and ``lambada`` of
``python -m parcae_megatron.evaluate`` (``loss``, the default, lives in ``__main__``)."""

from __future__ import annotations

import argparse
import os
import sys

from parcae_megatron.evaluate.core import PAPER_SEEDS
from parcae_megatron.evaluate.report import write_outputs

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face export directory (safetensors)")
    src.add_argument("--load", metavar="CKPT", help="Megatron checkpoint directory")
    p.add_argument("--tokenizer", metavar="MODEL", help="SentencePiece .model (default: "
                   "tokenizer.model of the HF directory / the run's tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--out", metavar="JSON", help="write the report here")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _core_args(p: argparse.ArgumentParser, bundle_required: bool) -> None:
    p.add_argument("--bundle", metavar="DIR", required=bundle_required,
                   help=f"unzipped DCLM/nanochat eval bundle (eval_meta_data.csv, eval_data/); "
                        f"download: {BUNDLE_URL}")
    p.add_argument("--max-per-task", type=int, default=None,
                   help="score at most N records per task (after the seed-1337 shuffle)")
    p.add_argument("--tasks-yaml", metavar="YAML", help="task list (default: the shipped "
                   "46-task parcae_megatron/evaluate/core_tasks.yaml)")
    p.add_argument("--tasks", nargs="+", metavar="LABEL", help="only these tasks")
    p.add_argument("--prompts-per-batch", type=int, default=32,
                   help="prompts per forward; all prompts of an item share one (default 32)")


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand."""
    prog = f"python -m parcae_megatron.evaluate {command}"
    if command in ("core", "core-extended"):
        which = "22 CORE" if command == "core" else "46 CORE-Extended"
        p = argparse.ArgumentParser(prog=prog, description=f"Centered accuracy on the {which} "
                                    "in-context tasks of the DCLM eval bundle at several loop "
                                    "counts, mean ± std over seeds (few-shot draws and h0).")
        _model_args(p)
        _core_args(p, True)
        p.add_argument("--T", "--iterations", dest="iterations", type=int, nargs="+",
                       help="loop counts, all in one run (default: mu_rec)")
        p.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS),
                       help="few-shot / h0 seeds (default: the paper's 1234 2345 3456)")
        p.add_argument("--resume", metavar="JSONL", help="finished (task, T, seed) results are "
                       "appended here and skipped on a rerun with the same settings "
                       "(default: OUT.partial.jsonl when --out is given)")
        return p
    if command == "adaptive":
        p = argparse.ArgumentParser(prog=prog, description="Per-token early exit: loss (and "
                                    "CORE with --bundle) against mean iterations per token for "
                                    "a sweep of thresholds, beside the fixed-T curve.")
        _model_args(p)
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
        _core_args(p, False)
        return p
    p = argparse.ArgumentParser(prog=prog, description="LAMBADA (lm-eval lambada_openai, "
                                "0-shot) at several loop counts; needs the dataset from the "
                                "Hugging Face Hub (or its datasets cache).")
    p.add_argument("--hf", metavar="DIR", required=True, help="Hugging Face export directory")
    p.add_argument("--T", "--iterations", dest="iterations", type=int, nargs="+",
                   help="loop counts (default: mu_rec)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="at most N documents")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", metavar="JSON")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(command: str, argv: list[str]) -> int:
    """Run a subcommand; returns the exit code (2 with a one-line error on bad input)."""
    args = build_parser(command).parse_args(argv)
    for path in (args.out, getattr(args, "plot", None)):
        if path and os.path.exists(path) and not args.overwrite:
            print(f"error: {path} already exists; pass --overwrite to replace it",
                  file=sys.stderr)
            return 2
    try:
        if command == "lambada":
            from parcae_megatron.evaluate.lambada import run_lambada_cli

            return run_lambada_cli(args)
        if command == "adaptive":
            return _adaptive(args)
        return _core(args, extended=command == "core-extended")
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2


def _load(args):
    import torch

    from parcae_megatron.evaluate.runner import (
        load_hf_model,
        load_megatron_model,
        load_tokenizer,
        parse_dtype,
    )

    dtype = parse_dtype(args.dtype)
    model, tokenizer = load_hf_model(args.hf) if args.hf else load_megatron_model(args.load)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=dtype).eval()
    name = os.path.basename(os.path.normpath(args.hf or args.load))
    return model, tokenizer, device, name


def _specs(args, extended: bool):
    from parcae_megatron.evaluate.core import load_task_specs

    return load_task_specs(args.tasks_yaml, extended=extended, labels=args.tasks)


def _core(args, extended: bool) -> int:
    from parcae_megatron.evaluate.core_runner import format_core_table, plot_core, run_core

    specs = _specs(args, extended)
    if not specs:
        raise ValueError("no tasks selected")
    if not os.path.isdir(args.bundle):  # before the (slow) model load
        raise FileNotFoundError(f"eval bundle directory not found: {args.bundle} (download "
                                f"and unzip {BUNDLE_URL})")
    model, tokenizer, device, name = _load(args)
    if tokenizer is None:
        raise ValueError("CORE needs a tokenizer (tokenizer.model in the HF dir, or --tokenizer)")
    iterations = sorted(set(args.iterations or [int(model.config.mean_recurrence)]))
    if iterations[0] < 1:
        raise ValueError("loop counts must be >= 1")
    resume = args.resume or (args.out + ".partial.jsonl" if args.out else None)
    report = run_core(model, tokenizer, args.bundle, specs, iterations, args.seeds,
                      max_per_task=args.max_per_task, batch_size=args.prompts_per_batch,
                      device=device, progress=not args.quiet, resume_path=resume,
                      settings={"model": os.path.abspath(args.hf or args.load),
                                "dtype": args.dtype},
                      name="CORE-Extended" if extended else "CORE")
    report["model"] = name
    print(format_core_table(report))
    print(f"bundle sha256 (over the files read): {report['bundle_sha256']}")
    write_outputs(report, args.out, args.plot, plot_core)
    return 0


def _adaptive(args) -> int:
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

    model, tokenizer, device, name = _load(args)
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

        specs = _specs(args, args.extended)
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
