"""Command-line mistakes answered in one line: the ``ArgumentParser`` every entry point uses.

An unknown flag, a bad value or a missing argument prints ``error: ...`` and, for an unknown
flag close to a known one, ``did you mean --x?``, then exits 2; ``--help`` prints the full
usage as usual. Standard library only: the data-preparation and launch tools import it too.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from typing import NoReturn

# Names users bring from other trainers, mapped to the flag this project uses: a typo of one
# of them ("learning-rat") is answered with the flag ("lr").
ALIASES = {
    "learning-rate": "lr", "min-learning-rate": "min-lr", "max-learning-rate": "lr",
    "batch-size": "global-batch-size", "max-steps": "train-iters", "steps": "train-iters",
    "iters": "train-iters", "warmup-steps": "lr-warmup-iters", "seq-len": "seq-length",
    "sequence-length": "seq-length", "grad-clip": "clip-grad", "layers": "num-layers",
    "heads": "num-attention-heads", "hidden-dim": "hidden-size", "beta1": "adam-beta1",
    "beta2": "adam-beta2",
}


class UsageError(ValueError):
    """A command-line mistake, raised by ``RaisingParser`` for callers that report it
    themselves (e.g. on rank 0 only); its text is the error line and any suggestion line."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message + (f"\ndid you mean {suggestion}?" if suggestion else ""))


def fail(message: str, suggestion: str | None = None) -> NoReturn:
    """Print ``error: MESSAGE`` (and ``did you mean SUGGESTION?``) to stderr; exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if suggestion:
        print(f"did you mean {suggestion}?", file=sys.stderr, flush=True)
    raise SystemExit(2)


def closest(word: str, known: Iterable[str], aliases: dict[str, str] | None = None
            ) -> str | None:
    """The known name closest to ``word`` by edit similarity (aliases map to their target),
    or None when nothing is close."""
    candidates = {name: name for name in known}
    for alias, target in (aliases or {}).items():
        candidates.setdefault(alias, target)
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return candidates[match[0]] if match else None


def closest_flag(flag: str, parser: argparse.ArgumentParser) -> str | None:
    """The parser's long option closest to ``flag`` (``--train-iter`` -> ``--train-iters``)."""
    name = flag.split("=", 1)[0]
    options = [o[2:] for o in _option_strings(parser) if o.startswith("--")]
    found = closest(name.lstrip("-"), options, ALIASES)
    return f"--{found}" if found else None


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's option strings and those of its subcommands."""
    found = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
    return found


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error:`` line (plus a suggestion
    for an unknown flag), exit 2. Subparsers inherit the class."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's
        self._given = list(sys.argv[1:] if args is None else args)  # (subcommands call it)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse's contract
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.unrecognized(extras)
        return parsed

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Report arguments no option took, suggesting the flag the first unknown one meant."""
        flag = next((a for a in extras if a.startswith("-") and len(a) > 1), None)
        self.stop(f"unrecognized arguments: {' '.join(extras)}",
                  closest_flag(flag, self) if flag else None)

    def error(self, message: str) -> NoReturn:
        # A misspelled required flag shows up as "required: --x"; name the typo instead.
        if "required" in message:  # "the following arguments are" / "one of ... is"
            known = _option_strings(self)
            unknown = [a for a in getattr(self, "_given", [])
                       if a.startswith("--") and a.split("=", 1)[0] not in known]
            if unknown:
                self.unrecognized(unknown)
        self.stop(message)

    def stop(self, message: str, suggestion: str | None = None) -> NoReturn:
        """Report a mistake: print it and exit 2."""
        fail(message, suggestion)


class RaisingParser(ArgumentParser):
    """The same rules, but a mistake raises ``UsageError`` instead of printing."""

    def stop(self, message: str, suggestion: str | None = None) -> NoReturn:
        raise UsageError(message, suggestion)

