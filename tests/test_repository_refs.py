"""The repository explains itself: no tracked text file points at documents a clone does not
have (notes outside the repository, tracker issue numbers), and every reference to a section of
docs/design.md names a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

FORBIDDEN = {
    "a section of an outside spec": re.compile(r"spec §", re.IGNORECASE),
    "the outside spec file": re.compile(r"parcae_spec"),
    "a path to outside notes": re.compile(r"(^|[\s`'\"(])(\.\./)?shared/(notes\b)?"),
    "an absolute shared path": re.compile(r"/shared/"),
    "an outside note": re.compile(r"notes/(official-checkpoint-format|core-eval)"),
    "an issue number": re.compile(r"\b[Ii]ssues? #?\d+|\(issue"),
}
SECTION_REF = re.compile(r"design\.md §(\d+(?:\.\d+)*)((?:, §\d+(?:\.\d+)*)*)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)


def tracked_text_files() -> dict[str, list[str]]:
    """Every tracked file that is text (UTF-8 without NUL bytes), as its lines."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = {}
    for name in filter(None, names):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            continue
    return files


def design_sections() -> set[str]:
    """Section numbers of docs/design.md's numbered headings ('3', '3.1', ...)."""
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_no_reference_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 100  # the scan sees the repository, not an empty listing
    own = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples must match
    hits = [f"{name}:{n}: {what}: {line.strip()[:120]}"
            for name, lines in files.items() if name != own for n, line in enumerate(lines, 1)
            for what, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert not hits, "references a clone cannot follow:\n" + "\n".join(hits)


def test_design_sections_exist():
    sections = design_sections()
    assert {"1", "2.1", "3.1", "4.1", "5", "8.1", "9.3", "10.4", "12.4", "13"} <= sections
    refs, bad = 0, []
    for name, lines in tracked_text_files().items():
        for n, line in enumerate(lines, 1):
            for first, more in SECTION_REF.findall(line):
                for number in [first, *re.findall(r"§(\d+(?:\.\d+)*)", more)]:
                    refs += 1
                    if number not in sections:
                        bad.append(f"{name}:{n}: §{number}")
    assert refs > 100  # code, tests and docs do cite the design document
    assert not bad, "references to sections docs/design.md does not have:\n" + "\n".join(bad)


def test_patterns_catch_what_they_are_for():
    """Each pattern flags the kind of text it exists for, and not ordinary prose."""
    caught = ["see spec §1.3", "Spec §2.2: B and C", "the parcae_spec file",
              "``shared/notes/core-eval.md``", "/work/shared/notes/x.md", "(issue 20)",
              "Issue 20's four targets", "issues #12", "notes/official-checkpoint-format.md"]
    for text in caught:
        assert any(p.search(text) for p in FORBIDDEN.values()), text
    fine = ["the local spec's RMSNorm", "a shared directory", "read will be issued",
            "docs/design.md §3.1", "the spec of one block", "torch.distributed shared memory"]
    for text in fine:
        assert not any(p.search(text) for p in FORBIDDEN.values()), text
    assert SECTION_REF.findall("docs/design.md §2, §9.") == [("2", ", §9")]
