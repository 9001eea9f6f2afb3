"""`python -m parcae_megatron.convert`: Megatron ↔ Hugging Face ↔ the authors' format.

    python -m parcae_megatron.convert to-hf --load runs/x/checkpoints --out hf/x
    python -m parcae_megatron.convert from-hf --hf hf/x --save ckpt/x --tensor-parallel 2
    python -m parcae_megatron.convert official-import path/to/release --out hf/release
    python -m parcae_megatron.convert official-export hf/x --out official/x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from parcae_megatron import cli
from parcae_megatron.convert.errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = cli.ArgumentParser(prog="python -m parcae_megatron.convert",
                                     description=__doc__.split("\n")[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron distributed checkpoint → Hugging Face dir")
    to_hf.add_argument("--load", type=Path, required=True,
                       help="Megatron --save directory (latest iteration) or one iter_* dir")
    to_hf.add_argument("--iteration", type=int, default=None, help="iteration to convert")
    to_hf.add_argument("--out", type=Path, required=True, help="HF directory to write")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    to_hf.add_argument("--tokenizer-model", type=Path, default=None,
                       help="tokenizer to ship, a SentencePiece .model (with its verified "
                            "tokenizer.json copy) or a tokenizer.json (default: the run's "
                            "--tokenizer-model)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from_hf = sub.add_parser("from-hf", help="Hugging Face dir → Megatron release checkpoint")
    from_hf.add_argument("--hf", type=Path, required=True, help="HF Parcae directory")
    from_hf.add_argument("--save", type=Path, required=True, help="checkpoint directory to write")
    from_hf.add_argument("--tensor-parallel", type=int, default=1,
                         help="TP size recorded for training (the checkpoint loads at any)")
    from_hf.add_argument("--pipeline-parallel", type=int, default=1)
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    from parcae_megatron.convert.official import add_official_subcommands

    add_official_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 2 on bad input with a one-line reason."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "handler"):  # official-import / official-export
        return args.handler(args)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # conversion is CPU work
    from parcae_megatron.convert.megatron_hf import from_hf, to_hf

    try:
        if args.command == "to-hf":
            summary = to_hf(args.load, args.out, args.iteration, args.dtype,
                            args.tokenizer_model, args.overwrite)
        else:
            summary = from_hf(args.hf, args.save, args.tensor_parallel, args.pipeline_parallel,
                              args.overwrite)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
