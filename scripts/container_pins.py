"""Pin an NGC PyTorch image's CUDA stack for ``scripts/install.sh --container``.

    python scripts/container_pins.py REQUIREMENTS CONSTRAINTS_OUT REQUIREMENTS_OUT

Writes ``CONSTRAINTS_OUT``: ``name==version`` of every installed package of the image's CUDA
stack (torch, Transformer Engine, Apex, triton, flash-attn, nvidia-*), so that pip keeps them
or stops with a conflict instead of replacing them; and ``REQUIREMENTS_OUT``: REQUIREMENTS
without the lines of those packages (requirements.txt pins torch for the pip routes). Exits
with one ``error:`` line where the image has no CUDA build of torch or no Transformer Engine.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Iterable
from pathlib import Path

_STACK = re.compile(r"torch|torchvision|torchaudio|triton|pytorch-triton|apex"
                    r"|transformer-engine(-.+)?|flash-attn(-.+)?|nvidia-.+")


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def stack_pins(distributions: Iterable[tuple[str, str]]) -> list[str]:
    """``name==version`` of the CUDA-stack packages among ``(name, version)`` pairs, sorted."""
    return sorted({f"{canonical(name)}=={version}" for name, version in distributions
                   if _STACK.fullmatch(canonical(name))})


def without(requirements: str, pinned: set[str]) -> str:
    """``requirements`` (a requirements file's text) minus the lines of ``pinned`` names."""
    kept = []
    for line in requirements.splitlines():
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if name and canonical(name.group(1)) in pinned:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def installed() -> list[tuple[str, str]]:
    """``(name, version)`` of every distribution this Python sees."""
    return [(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()
            if d.metadata["Name"]]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    requirements, constraints_out, requirements_out = (Path(a) for a in argv)
    try:
        import torch
    except ImportError:
        print("error: this Python has no torch: --container is for NGC PyTorch images "
              "(use --gpu elsewhere)", file=sys.stderr)
        return 1
    if not torch.version.cuda:
        print(f"error: torch {torch.__version__} here has no CUDA build: --container is for "
              "NGC PyTorch images (use --gpu elsewhere)", file=sys.stderr)
        return 1
    pins = stack_pins(installed())
    if not any(p.startswith("transformer-engine") for p in pins):
        print("error: no Transformer Engine in this image: use an NGC PyTorch image, which "
              "ships it", file=sys.stderr)
        return 1
    constraints_out.write_text("\n".join(pins) + "\n")
    names = {p.split("==")[0] for p in pins}
    requirements_out.write_text(without(requirements.read_text(), names))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) and {len(pins) - 1} other "
          f"packages of the image pinned in {constraints_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
