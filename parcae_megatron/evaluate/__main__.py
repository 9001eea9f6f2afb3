"""``python -m parcae_megatron.evaluate [loss|core|core-extended|adaptive|lambada] ...``: the
``loss`` command here, the others in ``core_cli``, ``adaptive_cli`` and ``lambada``.

``loss`` (the default when no subcommand is given): loss / perplexity / bits per byte of a
held-out token stream at each T (default 1, 2, 4, …, 2·μ_rec) and seed of the initial state,
with the fit L(T) = L∞ + Z·exp(−z·T) (docs/design.md §10.3). ``core`` / ``core-extended``: the
paper's in-context benchmarks on the DCLM eval bundle. ``adaptive``: loss (and CORE) against mean
iterations per token under per-token early exit. ``lambada``: lm-eval's lambada_openai.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from parcae_megatron import cli


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = cli.ArgumentParser(
        prog="python -m parcae_megatron.evaluate [loss]",
        description="Validation loss, perplexity and bits per byte of a Parcae model at "
                    "several loop counts T and initial-state seeds, with the test-time law fit "
                    "L(T) = L_inf + Z*exp(-z*T).",
        epilog="example: python -m parcae_megatron.evaluate --hf exports/tiny --text "
               "data/valid.jsonl --seq-length 128 --seeds 0 1 2 --out eval.json --plot eval.png"
               "\n\nother subcommands: core, core-extended, adaptive, lambada (each with --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face export directory (safetensors)")
    src.add_argument("--load", metavar="CKPT", help="Megatron checkpoint directory")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-prefix", metavar="PREFIX",
                      help="Megatron indexed dataset (PREFIX.bin / PREFIX.idx)")
    data.add_argument("--text", nargs="+", metavar="FILE",
                      help=".txt (one document per file) or .jsonl (one per line) files, "
                           "optionally .gz; tokenized as <|bos|> text <|eos|>")
    p.add_argument("--text-key", default="text", help="JSON field with the text (default text)")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="SentencePiece .model or tokenizer.json (default: the HF directory's); "
                        "needed for --text and for bits per byte")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per window (default: the model's max_position_embeddings)")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="score at most this many tokens (default %(default)s; 0 = all)")
    p.add_argument("--max-sequences", type=int, default=None, help="score at most N windows")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--iterations", type=int, nargs="+", metavar="T",
                   help="loop counts (default 1 2 4 ... 2*mu_rec, with mu_rec)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="initial-state seeds; results are mean ± std over them (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if "
                                                   "available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--out", metavar="JSON", help="write the report here")
    p.add_argument("--plot", metavar="PNG", help="write loss vs T with the fit here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out/--plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


SUBCOMMANDS = ("loss", "core", "core-extended", "adaptive", "lambada")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS[1:]:
        return _run_subcommand(argv[0], argv[1:])
    if argv and argv[0] == "loss":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if _refuses_overwrite(args):
        return 2
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _refuses_overwrite(args: argparse.Namespace) -> bool:
    """Whether ``--out`` / ``--plot`` name an existing file without ``--overwrite`` (said in
    one ``error:`` line)."""
    for path in (args.out, getattr(args, "plot", None)):
        if path and os.path.exists(path) and not args.overwrite:
            print(f"error: {path} already exists; pass --overwrite to replace it",
                  file=sys.stderr)
            return True
    return False


def _run_subcommand(command: str, argv: list[str]) -> int:
    """Run ``core``, ``core-extended``, ``adaptive`` or ``lambada`` (each in its own module);
    returns the exit code (2 with a one-line error on bad input)."""
    if command == "lambada":
        from parcae_megatron.evaluate import lambada

        parser, run = lambada.build_parser(), lambada.run_lambada_cli
    elif command == "adaptive":
        from parcae_megatron.evaluate import adaptive_cli

        parser, run = adaptive_cli.build_parser(), adaptive_cli.run
    else:
        from parcae_megatron.evaluate import core_cli

        parser = core_cli.build_parser(command)
        run = functools.partial(core_cli.run, extended=command == "core-extended")
    args = parser.parse_args(argv)
    if _refuses_overwrite(args):
        return 2
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from parcae_megatron.evaluate.report import format_table, plot, write_outputs
    from parcae_megatron.evaluate.runner import (
        build_windows,
        evaluate,
        load_hf_model,
        load_hf_tokenizer,
        load_megatron_model,
        parse_dtype,
    )

    dtype = parse_dtype(args.dtype)
    if args.hf:
        model, tokenizer = load_hf_model(args.hf)
    else:
        model, tokenizer = load_megatron_model(args.load)
    if args.tokenizer:
        tokenizer = load_hf_tokenizer(args.tokenizer, model.config.vocab_size)
    seq_length = args.seq_length or model.config.max_position_embeddings
    windows = build_windows(seq_length, data_prefix=args.data_prefix, text_files=args.text,
                            tokenizer=tokenizer, max_tokens=args.max_tokens or None,
                            max_sequences=args.max_sequences, text_key=args.text_key)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate(model, windows, iterations=args.iterations, seeds=args.seeds,
                      batch_size=args.batch_size, tokenizer=tokenizer, device=device,
                      dtype=dtype, progress=not args.quiet,
                      model_name=os.path.basename(os.path.normpath(args.hf or args.load)))
    print(format_table(report))
    write_outputs(report, args.out, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
