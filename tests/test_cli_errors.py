"""A newcomer's mistakes, each answered with one ``error:`` line (plus at most a ``did you
mean`` line) and exit 2 before anything runs, is written or is queued: by the trainer's
validation (in-process, as every start runs it), by ``launch.submit`` (in-process, stand-in
sbatch), by every entry point's own parser, and end to end through two real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from parcae_megatron import cli
from parcae_megatron.config_file import ConfigFileError, check_keys
from tests.distributed import ROOT

TINY = ROOT / "configs" / "parcae-tiny-cpu.yaml"
CPU_FLAGS = ["--transformer-impl", "local", "--distributed-backend", "gloo"]
TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "511"]
DATA = ["--mock-data", *TOKENIZER]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mistakes(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (trainer argv, what the message must name). ``tmp/good.{bin,idx}`` exist."""
    for ext in (".bin", ".idx"):
        (tmp / f"good{ext}").write_bytes(b"")
    typo = write(tmp / "typo.yaml", "base: parcae-tiny-cpu.yaml\nlearning-rat: 0.1\n")
    write(tmp / "a.yaml", "base: b.yaml\nlr: 0.1\n")
    write(tmp / "b.yaml", "base: a.yaml\n")
    deep = write(tmp / "deep.yaml", f"base: {typo}\nseed: 3\n")
    wrong = write(tmp / "wrong.yaml", "base: parcae-tiny-cpu.yaml\ntrain-iters: many\n")
    tiny = ["--config", str(TINY)]
    return {
        "config key": (["--config", str(typo), *DATA],
                       [str(typo), "unknown key 'learning-rat'", "did you mean 'lr'"]),
        "config key in base": (["--config", str(deep), *DATA], [str(typo), "'learning-rat'"]),
        "config value type": (["--config", str(wrong), *DATA], ["'train-iters'", "int"]),
        "config base cycle": (["--config", str(tmp / "a.yaml"), *DATA],
                              ["cycle", "a.yaml -> b.yaml -> a.yaml"]),
        "flag typo": ([*tiny, *DATA, "--train-iter", "3"],
                      ["--train-iter", "did you mean --train-iters?"]),
        "bad value": ([*tiny, *DATA, "--train-iters", "abc"], ["--train-iters", "'abc'"]),
        "missing data": ([*tiny, *TOKENIZER, "--data-path", "/nonexistent/ds"],
                         ["/nonexistent/ds"]),
        "blend, one prefix missing": (
            [*tiny, *TOKENIZER, "--data-path", "0.5", str(tmp / "good"), "0.5",
             str(tmp / "gone")], [f"'{tmp / 'gone'}'"]),
        "missing tokenizer and load": (
            [*tiny, "--mock-data", "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", "/nonexistent/tok.model", "--load", "/nonexistent/ckpt"],
            ["/nonexistent/tok.model", "/nonexistent/ckpt"]),
        "refused flag": ([*tiny, *DATA, "--swiglu"], ["--swiglu is not supported"]),
    }


MISTAKES = ["config key", "config key in base", "config value type", "config base cycle",
            "flag typo", "bad value", "missing data", "blend, one prefix missing",
            "missing tokenizer and load", "refused flag"]


def test_the_table_is_whole(tmp_path):
    assert list(mistakes(tmp_path)) == MISTAKES


def assert_one_line(err: str, named: list[str]) -> None:
    """At most 3 lines, one of them ``error:``, naming everything in ``named``."""
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and sum(ln.startswith("error:") for ln in lines) == 1, err
    for name in named:
        assert name in err, (name, err)


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


@pytest.mark.parametrize("name", MISTAKES)
def test_trainer_answers_each_mistake_in_one_line(name, tmp_path, monkeypatch, capsys):
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import destroy_global_vars

    from parcae_megatron.training import megatron_patches
    from parcae_megatron.training.validation import parse_args_or_exit

    argv, named = mistakes(tmp_path)[name]
    monkeypatch.setattr(sys, "argv", ["parcae_megatron.train"])
    megatron_patches.install("check", argv)
    try:
        with pytest.raises(SystemExit) as stop:
            parse_args_or_exit([*CPU_FLAGS, *argv])
    finally:
        destroy_global_vars()
        destroy_num_microbatches_calculator()
    out = capsys.readouterr()
    assert stop.value.code == 2
    assert "arguments" not in out.out  # no Megatron argument dump
    assert_one_line(out.err, named)


@pytest.fixture
def sbatch(tmp_path, monkeypatch) -> Path:
    """A stand-in ``sbatch`` on PATH that records each call; returns the record file."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    write(bin_dir / "sbatch", f"#!/bin/sh\necho \"$@\" >> {log}\necho 42\n").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "submit"])
@pytest.mark.parametrize("name", MISTAKES)
def test_submit_queues_nothing_that_cannot_start(name, dry, tmp_path, sbatch, capsys):
    from launch.submit import main

    argv, named = mistakes(tmp_path)[name]
    config = argv[argv.index("--config") + 1]
    train = [a for i, a in enumerate(argv) if "--config" not in (a, argv[i - 1])]
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["--config", config, "--run-dir", str(run_dir), *(["--dry-run"] if dry else []),
              "--", *train])
    assert stop.value.code == 2
    assert_one_line(capsys.readouterr().err, named)
    assert not run_dir.exists() and not sbatch.exists()


def test_submit_no_check_writes_and_default_check_passes_good_flags(tmp_path, sbatch, capsys):
    from launch.submit import main

    main(["--config", str(TINY), "--run-dir", str(tmp_path / "good"), "--", *DATA])
    assert sbatch.read_text().count("job.sbatch") == 1
    assert "submitted job 42" in capsys.readouterr().out
    typo = ["--config", str(TINY), "--dry-run", "--no-check", "--", *DATA, "--train-iter", "3"]
    main(["--run-dir", str(tmp_path / "unchecked"), *typo])
    assert (tmp_path / "unchecked" / "job.sbatch").is_file()


def _main(module: str) -> Callable[[list[str]], object]:
    import importlib

    return importlib.import_module(module).main


@pytest.mark.parametrize("module, argv, named", [
    ("parcae_megatron.quickstart", ["--nprocs", "2"], ["--nprocs", "--nproc"]),
    ("parcae_megatron.rehearse.__main__", [str(TINY), "--max-ranks", "two"], ["--max-ranks"]),
    ("parcae_megatron.probe.__main__", ["--sede", "3"], ["--sede", "--seed"]),
    ("parcae_megatron.evaluate.__main__", ["--max-tokenz", "5"], ["--max-tokenz", "--max-tokens"]),
    ("parcae_megatron.convert.__main__", ["to-hf", "--lod", "x", "--out", "y"],
     ["--lod", "--load"]),
    ("parcae_megatron.describe", ["parcae-tiny", "--sett", "a=1"], ["--sett", "--set"]),
    ("parcae_megatron.scaling.__main__", ["nope"], ["invalid choice"]),
    ("data_prep.preprocess", ["--input", "x", "--output-prefix", "y", "--tokenizer-model", "z",
                              "--workers", "many"], ["--workers", "'many'"]),
    ("data_prep.train_tokenizer", ["--vocab-sise", "8"], ["--vocab-sise", "--vocab-size"]),
    ("data_prep.inspect", [], ["required"]),
    ("data_prep.merge", ["--ouput", "x"], ["--ouput", "did you mean --output?"]),
    ("data_prep.corpus", ["--out-dir", "x", "--max-docz", "3"], ["--max-docz", "--max-docs"]),
    ("data_prep.blend", ["x", "--jason"], ["--jason", "--json"]),
    ("launch.submit", ["--config", str(TINY), "--nodez", "2"], ["--nodez", "--nodes"]),
    ("launch.rank", ["--modlue", "x"], ["--modlue", "--module"]),
])
def test_every_entry_point_parser_answers_in_one_line(module, argv, named, capsys):
    # (argparse takes a prefix of a flag as the flag: the typos here are no prefixes)
    with pytest.raises(SystemExit) as stop:
        _main(module)(argv)
    assert stop.value.code == 2
    assert_one_line(capsys.readouterr().err, named)


def test_help_still_prints_the_full_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        _main("data_prep.merge")(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_config_keys_are_checked_against_a_parser(tmp_path):
    parser = cli.ArgumentParser()
    parser.add_argument("--lr", type=float)
    parser.add_argument("--mock-data", action="store_true")
    parser.add_argument("--split", choices=["a", "b"])
    options = parser._option_string_actions
    check_keys(write(tmp_path / "ok.yaml", "lr: 1e-3\nmock_data: true\nsplit: a\n"), options)
    for text, message in [("mock-data: 3\n", "'mock-data' is a switch"),
                          ("lr: [1, 2]\n", "'lr' expects one float, got a list"),
                          ("split: c\n", "'split' expects one of a, b, got 'c'"),
                          ("lr: true\n", "'lr' expects float, got true")]:
        with pytest.raises(ConfigFileError, match=message):
            check_keys(write(tmp_path / "bad.yaml", text), options)


def _process(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(env, PYTHONPATH=str(ROOT)))


def test_end_to_end_the_whole_output_is_the_error(tmp_path):
    """The issue's first two mistakes as a user runs them: the whole output (stdout and
    stderr, import notes included) is the error and the suggestion."""
    argv, named = mistakes(tmp_path)["config key"]
    proc = _process("parcae_megatron.train", *argv)
    assert proc.returncode == 2 and not proc.stdout
    assert_one_line(proc.stderr, named)
    run_dir = tmp_path / "run"
    proc = _process("launch.submit", "--config", str(TINY), "--run-dir", str(run_dir),
                    "--dry-run", "--", *DATA, "--train-iter", "3")
    assert proc.returncode == 2 and not proc.stdout and not run_dir.exists()
    assert_one_line(proc.stderr, ["--train-iter", "did you mean --train-iters?"])
