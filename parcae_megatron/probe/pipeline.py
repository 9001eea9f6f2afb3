"""Probe pipeline stages: corpus → tokenizer → indexed datasets, and training runs.

Every stage goes through the project's real tools: ``data_prep.train_tokenizer`` and
``data_prep.preprocess`` (subprocesses, as a user would run them) and ``parcae_megatron.train``
under ``torch.distributed.run``. Stages are idempotent: finished outputs are kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_prep.tokenizer import megatron_tokenizer_args
from parcae_megatron.probe.task import TaskSpec, generate
from parcae_megatron.training.telemetry import read_records

ROOT = Path(__file__).resolve().parents[2]
SPECIAL_AND_BYTE_PIECES = 4 + 256  # data_prep's tokenizer: 4 specials + byte fallback


def env() -> dict:
    """Child environment: this checkout first on the path, one thread per process."""
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Run ``cmd`` with output appended to ``log``; one ``error:`` line on failure."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env())
    if proc.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}); see {log}\n"
                         f"{log.read_text()[-2000:]}")


def prepare_data(data: Path, spec: TaskSpec, n_train: int, n_test: int, seed: int,
                 log: Path) -> Path:
    """Write train/test corpora, a character-level tokenizer and indexed datasets."""
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        path = data / f"{split}.jsonl"
        if not path.exists():
            docs = generate(spec, split, n, seed)
            lines = [json.dumps(d.to_json()) + "\n" for d in docs]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(lines))
            tmp.rename(path)
    if not (data / "tokenizer.model").exists():
        # The smallest vocabulary SentencePiece accepts has no merges: one token per character,
        # so an answer is one token and a document is doc_chars + 1 (EOS) tokens.
        vocab = SPECIAL_AND_BYTE_PIECES + len(spec.alphabet)
        run_logged([sys.executable, "-m", "data_prep.train_tokenizer", str(data / "train.jsonl"),
                    "--output", str(data / "tokenizer"), "--vocab-size", str(vocab),
                    "--threads", "1", "--workers", "1"], log,
                   "training the character-level tokenizer")
    for split in ("train", "test"):
        if not (data / f"{split}.idx").exists():
            run_logged([sys.executable, "-m", "data_prep.preprocess", str(data / f"{split}.jsonl"),
                        "--tokenizer", str(data / "tokenizer.model"), "--output",
                        str(data / split), "--no-bos", "--workers", "1", "--quiet"], log,
                       f"preprocessing the {split} split")
    return data


def train_command(config: Path, data: Path, ckpt: Path, telemetry: Path, seq_length: int,
                  iters: int, nproc: int, extra: list[str]) -> list[str]:
    """torchrun command for one probe model; ``extra`` flags come last and win."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "parcae_megatron.train",
        "--config", str(config),
        *megatron_tokenizer_args(data / "tokenizer.model"),
        "--train-data-path", "1.0", str(data / "train"),
        "--valid-data-path", "1.0", str(data / "test"),
        "--seq-length", str(seq_length), "--max-position-embeddings", str(seq_length),
        "--train-iters", str(iters), "--lr-wsd-decay-iters", str(max(1, iters // 3)),
        "--eval-interval", str(iters + 1), "--eval-iters", "2",
        "--save", str(ckpt), "--load", str(ckpt), "--save-interval", str(iters),
        "--log-interval", "10", "--telemetry-interval", "10",
        "--telemetry-path", str(telemetry), *extra,
    ]


def train(name: str, cmd: list[str], ckpt: Path, telemetry: Path, iters: int, log: Path) -> float:
    """Train one model (skipped when its final checkpoint exists); returns the training's
    wall seconds (for a skipped model, those recorded when it was trained)."""
    from tqdm import tqdm

    marker = ckpt / "latest_checkpointed_iteration.txt"
    wall_file = ckpt.parent / "train_wall_s.txt"
    if marker.exists() and marker.read_text().strip() == str(iters):
        return float(wall_file.read_text()) if wall_file.exists() else 0.0
    start = time.time()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env())
        with tqdm(total=iters, unit="step", desc=f"training {name}", dynamic_ncols=True,
                  mininterval=2.0) as bar:
            while proc.poll() is None:
                time.sleep(1.0)
                steps = read_records(telemetry, "train")
                if steps:
                    bar.n = steps[-1]["iteration"]
                    bar.set_postfix(loss=f"{steps[-1]['loss']:.3f}")
                    bar.refresh()
    if proc.returncode != 0:
        raise SystemExit(f"error: training {name} failed (exit {proc.returncode}); see {log}\n"
                         f"{log.read_text()[-2000:]}")
    wall = time.time() - start
    wall_file.write_text(f"{wall:.1f}\n")
    return wall
