"""The ``core`` / ``core-extended`` subcommands of ``python -m parcae_megatron.evaluate``
(parser and driver), and the model and eval-bundle options ``adaptive`` shares with them."""

from __future__ import annotations

import argparse
import os

from parcae_megatron import cli
from parcae_megatron.evaluate.core import PAPER_SEEDS
from parcae_megatron.evaluate.report import write_outputs

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--hf / --load, --tokenizer, --device, --dtype and the output options."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face export directory (safetensors)")
    src.add_argument("--load", metavar="CKPT", help="Megatron checkpoint directory")
    p.add_argument("--tokenizer", metavar="MODEL", help="SentencePiece .model or tokenizer.json "
                   "(default: the HF directory's / the run's tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--out", metavar="JSON", help="write the report here")
    p.add_argument("--plot", metavar="PNG", help="write the plot here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_bundle_args(p: argparse.ArgumentParser, bundle_required: bool) -> None:
    """--bundle and the task selection options."""
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
    """The parser of ``core`` or ``core-extended``."""
    prog = f"python -m parcae_megatron.evaluate {command}"
    which = "22 CORE" if command == "core" else "46 CORE-Extended"
    p = cli.ArgumentParser(prog=prog, description=f"Centered accuracy on the {which} "
                                "in-context tasks of the DCLM eval bundle at several loop "
                                "counts, mean ± std over seeds (few-shot draws and h0).")
    add_model_args(p)
    add_bundle_args(p, True)
    p.add_argument("--T", "--iterations", dest="iterations", type=int, nargs="+",
                   help="loop counts, all in one run (default: mu_rec)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS),
                   help="few-shot / h0 seeds (default: the paper's 1234 2345 3456)")
    p.add_argument("--resume", metavar="JSONL", help="finished (task, T, seed) results are "
                   "appended here and skipped on a rerun with the same settings "
                   "(default: OUT.partial.jsonl when --out is given)")
    return p


def load_model(args):
    """The model (on its device, in eval mode), its tokenizer, the device and its name."""
    import torch

    from parcae_megatron.evaluate.runner import (
        load_hf_model,
        load_hf_tokenizer,
        load_megatron_model,
        parse_dtype,
    )

    dtype = parse_dtype(args.dtype)
    model, tokenizer = load_hf_model(args.hf) if args.hf else load_megatron_model(args.load)
    if args.tokenizer:
        tokenizer = load_hf_tokenizer(args.tokenizer, model.config.vocab_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=dtype).eval()
    name = os.path.basename(os.path.normpath(args.hf or args.load))
    return model, tokenizer, device, name


def task_specs(args, extended: bool):
    """The selected task specs (``--tasks-yaml``, ``--tasks``)."""
    from parcae_megatron.evaluate.core import load_task_specs

    return load_task_specs(args.tasks_yaml, extended=extended, labels=args.tasks)


def run(args, extended: bool) -> int:
    """Run ``core`` (``extended``: ``core-extended``) with parsed ``args``."""
    from parcae_megatron.evaluate.core_runner import format_core_table, plot_core, run_core

    specs = task_specs(args, extended)
    if not specs:
        raise ValueError("no tasks selected")
    if not os.path.isdir(args.bundle):  # before the (slow) model load
        raise FileNotFoundError(f"eval bundle directory not found: {args.bundle} (download "
                                f"and unzip {BUNDLE_URL})")
    model, tokenizer, device, name = load_model(args)
    if tokenizer is None:
        raise ValueError("CORE needs a tokenizer (in the HF dir, or --tokenizer)")
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
