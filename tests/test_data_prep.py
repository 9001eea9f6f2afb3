"""data_prep end to end: tokenizer, preprocess, bad input, resume, merge, inspect, blends."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import inspect as dp_inspect
from data_prep import merge, preprocess
from data_prep.blend import BlendError, load_blend
from data_prep.corpus import build_default_corpus
from data_prep.tokenizer import META_SPACE, load_tokenizer
from data_prep.train_tokenizer import main as train_tokenizer_main
from data_prep.train_tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1000


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small slice of the embedded corpus, its valid split and a 1000-token tokenizer."""
    d = tmp_path_factory.mktemp("data_prep")
    build_default_corpus(str(d / "train.jsonl"), max_bytes=250_000)
    build_default_corpus(str(d / "valid.jsonl"), max_bytes=250_000, split="valid")
    info = train_tokenizer([str(d / "train.jsonl")], str(d / "tok"), vocab_size=VOCAB,
                           workers=1, character_coverage=1.0)
    texts = [json.loads(x)["text"] for x in (d / "train.jsonl").read_text().splitlines()]
    return SimpleNamespace(dir=d, train=str(d / "train.jsonl"), valid=str(d / "valid.jsonl"),
                           model=str(d / "tok.model"), info=info, texts=texts,
                           tok=load_tokenizer(str(d / "tok.model")))


def run(*args: str) -> int:
    return preprocess.main([*args, "--quiet"])


@pytest.fixture(scope="module")
def reference(assets):
    """The train split preprocessed with one worker and default pieces."""
    out = str(assets.dir / "ref" / "train")
    assert run(assets.train, "--tokenizer", assets.model, "--output", out, "--workers", "1") == 0
    return out


def read_docs(prefix: str) -> list[np.ndarray]:
    from data_prep.indexed import open_dataset

    ds = open_dataset(prefix)
    docs = ds.document_indices
    return [np.concatenate([ds[i] for i in range(docs[d], docs[d + 1])])
            for d in range(len(docs) - 1)]


def files_equal(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


# -- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_settings(assets, tmp_path):
    tok, info = assets.tok, assets.info
    assert tok.vocab_size == VOCAB and info["vocab_size"] == VOCAB
    assert (tok.unk, tok.bos, tok.eos, tok.pad, tok.eod) == (0, 1, 2, 3, 2)
    assert [tok.id_to_piece(i) for i in range(1, 4)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert tok.id_to_piece(4) == "<0x00>"  # byte fallback pieces follow the specials
    assert [tok.id_to_piece(i) for i in tok.tokenize("2024")] == ["2", "0", "2", "4"]
    assert tok.tokenize("\x07") == [4 + 7]  # an unseen character falls back to its byte
    assert info["sha256"] == hashlib.sha256(open(assets.model, "rb").read()).hexdigest()
    assert info["trainer"]["byte_fallback"] and info["trainer"]["split_digits"]
    assert train_tokenizer_main([assets.train, "--output", str(tmp_path / "tok"), "--vocab-size",
                                 str(VOCAB), "--workers", "2", "--character-coverage", "1"]) == 0
    again = json.load(open(tmp_path / "tok.settings.json"))
    assert again["sha256"] == info["sha256"]  # deterministic, whatever the worker count


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_tokenizer_round_trip(assets, text):
    """Identity normalisation: text comes back exactly, except U+2581 which becomes a space."""
    tok = assets.tok
    assert tok.detokenize(tok.tokenize(text)) == text.replace(META_SPACE, " ")


def test_cli_help_without_heavy_imports():
    code = ("import sys, data_prep.preprocess, data_prep.train_tokenizer, data_prep.merge, "
            "data_prep.inspect, data_prep.blend, data_prep.corpus; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    for tool in ("preprocess", "train_tokenizer", "merge", "inspect", "blend", "corpus"):
        proc = subprocess.run([sys.executable, "-m", f"data_prep.{tool}", "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage: python -m data_prep." + tool in proc.stdout


# -- preprocess -------------------------------------------------------------------------------
def test_round_trip_and_manifest(assets, reference):
    tok = assets.tok
    docs = read_docs(reference)
    assert len(docs) == len(assets.texts)
    for ids, text in zip(docs, assets.texts):
        assert ids[0] == tok.bos and ids[-1] == tok.eos
        assert tok.detokenize(ids[1:-1]) == text.replace(META_SPACE, " ")
    m = json.load(open(reference + ".manifest.json"))
    assert m["status"] == "complete" and m["documents"] == len(docs)
    assert m["tokens"] == sum(len(d) for d in docs) == m["datasets"][0]["tokens"]
    assert m["dtype"] == "uint16" and m["skipped_total"] == 0
    assert m["text_bytes"] == sum(len(t.encode()) for t in assets.texts)
    assert m["tokenizer"]["sha256"] == assets.info["sha256"]
    assert m["inputs"][0]["sha256"] == hashlib.sha256(open(assets.train, "rb").read()).hexdigest()
    assert m["inputs"][0]["size"] == os.path.getsize(assets.train)
    assert not os.path.exists(reference + ".work")  # pieces are removed after success


def test_two_workers_byte_identical(assets, reference, tmp_path):
    out = str(tmp_path / "w2")
    assert run(assets.train, "--tokenizer", assets.model, "--output", out, "--workers", "2",
               "--piece-size", "16KB") == 0
    m = json.load(open(out + ".manifest.json"))
    assert m["workers"] == 2 and m["pieces"] > 10
    assert files_equal(out, reference)


def test_existing_output_and_options(assets, reference, tmp_path, capsys):
    assert run(assets.train, "--tokenizer", assets.model, "--output", reference) == 2
    assert "exists" in capsys.readouterr().err
    assert preprocess.main([assets.train, "--tokenizer", assets.model, "--output", reference,
                            "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out
    out = str(tmp_path / "noeos")
    assert run(assets.train, "--tokenizer", assets.model, "--output", out, "--no-bos",
               "--no-eos") == 0
    ref_docs, docs = read_docs(reference), read_docs(out)
    assert all(np.array_equal(a[1:-1], b) for a, b in zip(ref_docs, docs))


def test_every_format_in_input_order(assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    d.mkdir()
    docs = [f"doc {i}: naïve café\tend {i * 11}" for i in range(12)]
    lines = "".join(json.dumps({"body": t}) + "\n" for t in docs[0:2])
    (d / "1.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    lines = "".join(json.dumps({"body": t}) + "\n" for t in docs[2:4])
    (d / "2.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": docs[4:8]}), d / "3.parquet", row_group_size=1)
    (d / "4.txt").write_text(docs[8] + "\n\n" + docs[9] + "\n")
    (d / "5.json").write_text(json.dumps([{"body": t} for t in docs[10:12]]))
    out = str(tmp_path / "formats")
    assert run(str(d), "--tokenizer", assets.model, "--output", out, "--text-key", "body",
               "--txt-mode", "paragraph", "--piece-size", "1", "--workers", "2") == 0
    assert [assets.tok.detokenize(ids) for ids in read_docs(out)] == docs
    m = json.load(open(out + ".manifest.json"))
    assert [i["format"] for i in m["inputs"]] == ["jsonl.gz", "jsonl.zst", "parquet", "txt",
                                                 "json_array"]
    assert m["pieces"] == 1 + 1 + 4 + 1 + 1


def _write_bad_inputs(d) -> None:
    good = [json.dumps({"text": f"good document {i}, value {i * 37}"}) for i in range(40)]
    (d / "a.jsonl").write_bytes(
        ("\n".join(good[:5]) + '\n{"text": "cut\n{"title": "x"}\n{"text": 7}\n{"text": "  "}\n'
         "\n").encode() + b'{"text": "caf\xe9"}\n' + ("\n".join(good[5:10]) + "\n").encode())
    blob = gzip.compress(("\n".join(good) + "\n").encode())
    (d / "b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (d / "c.txt").write_text("")


def test_bad_input_is_counted_not_fatal(assets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_bad_inputs(bad)
    out = str(tmp_path / "bad_out")
    assert preprocess.main([str(bad), "--tokenizer", assets.model, "--output", out,
                            "--max-bad-fraction", "0.5", "--workers", "2"]) == 0
    summary = capsys.readouterr().out
    m = json.load(open(out + ".manifest.json"))
    counts = {r: v["count"] for r, v in m["skipped"].items()}
    assert counts == {"malformed_json": 1, "missing_text_key": 1, "not_a_string": 1,
                      "empty_document": 2, "non_utf8": 1, "truncated_gzip": 1}
    a = str(bad / "a.jsonl")
    assert m["skipped"]["malformed_json"]["first"][0].startswith(f"{a}:6 ")
    assert m["skipped"]["non_utf8"]["first"] == [f"{a}:11 (byte 13)"]
    assert m["skipped"]["empty_document"]["first"] == [f"{a}:9", f"{bad / 'c.txt'}:1"]
    gz = [i for i in m["inputs"] if i["path"].endswith(".gz")][0]
    assert 0 < gz["documents"] < 40  # lines before the cut are kept
    assert m["skipped"]["truncated_gzip"]["first"][0].startswith(
        f"{bad / 'b.jsonl.gz'}:{gz['documents'] + 1} ")
    assert m["documents"] == 10 + gz["documents"] and m["blank_lines"] == 1
    assert m["records"] == m["documents"] + m["skipped_total"]
    for reason in counts:
        assert reason in summary


def test_max_bad_fraction_trips(assets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_bad_inputs(bad)
    out = str(tmp_path / "fail")
    assert preprocess.main([str(bad), "--tokenizer", assets.model, "--output", out,
                            "--max-bad-fraction", "0.1"]) == 1
    captured = capsys.readouterr()
    assert "over --max-bad-fraction 0.1" in captured.err and "FAILED" not in captured.err
    assert "status     failed" in captured.out
    assert not any(os.path.exists(out + s) for s in (".bin", ".idx", ".manifest.json"))
    # Raising the limit and resuming reuses every finished piece.
    assert run(str(bad), "--tokenizer", assets.model, "--output", out, "--resume",
               "--max-bad-fraction", "0.5") == 0
    m = json.load(open(out + ".manifest.json"))
    assert m["pieces_reused"] == m["pieces"]


def _killable_run(argv: list[str]) -> None:
    os.setsid()  # own process group: the test kills it together with its workers
    sys.stdout = sys.stderr = open(os.devnull, "w")
    os._exit(preprocess.main(argv))


def test_kill_then_resume_is_identical(assets, reference, tmp_path):
    out = str(tmp_path / "killed")
    work = out + ".work"
    argv = [assets.train, "--tokenizer", assets.model, "--output", out, "--workers", "1",
            "--piece-size", "2KB", "--quiet"]
    child = mp.get_context("fork").Process(target=_killable_run, args=(argv,))
    child.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        done = [f for f in os.listdir(work) if f.endswith(".json")] if os.path.isdir(work) else []
        if len(done) >= 5 or not child.is_alive():
            break
        time.sleep(0.005)
    os.killpg(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    # Nothing that looks like a finished dataset was left behind.
    assert not any(os.path.exists(out + s) for s in (".bin", ".idx", ".manifest.json"))
    finished = len([f for f in os.listdir(work) if f.endswith(".json")])
    assert finished >= 5
    assert run(*argv[:-1], "--resume") == 0
    m = json.load(open(out + ".manifest.json"))
    assert finished <= m["pieces_reused"] < m["pieces"]
    assert files_equal(out, reference)
    # A changed input (same size) invalidates its pieces: none is silently reused.
    changed = str(tmp_path / "changed.jsonl")
    shutil.copy(assets.train, changed)
    out2 = str(tmp_path / "changed")
    args2 = [changed, "--tokenizer", assets.model, "--output", out2, "--piece-size", "64KB",
             "--keep-work"]
    assert run(*args2) == 0
    data = bytearray(open(changed, "rb").read())
    data[100:104] = b"ABCD" if data[100:104] != b"ABCD" else b"WXYZ"
    open(changed, "wb").write(data)
    assert run(*args2, "--resume", "--overwrite") == 0
    m2 = json.load(open(out2 + ".manifest.json"))
    assert m2["pieces_reused"] == m2["pieces"] - 1


# -- shards, merge, inspect, blends -----------------------------------------------------------
def test_shards_merge_and_blend(assets, reference, tmp_path):
    out = str(tmp_path / "sharded")
    assert run(assets.train, "--tokenizer", assets.model, "--output", out, "--piece-size",
               "20KB", "--shard-size", "40KB") == 0
    m = json.load(open(out + ".manifest.json"))
    shards = [d["prefix"] for d in m["datasets"]]
    assert len(shards) >= 3 and shards[0] == out + "_00000"
    assert sum(d["documents"] for d in m["datasets"]) == m["documents"]
    merged = str(tmp_path / "merged")
    assert merge.main([out, "--output", merged]) == 0  # the manifest prefix stands for shards
    assert files_equal(merged, reference)
    assert open(merged + ".bin", "rb").read() == b"".join(open(s + ".bin", "rb").read()
                                                         for s in shards)
    blend_file = tmp_path / "blend.yaml"
    blend_file.write_text("train:\n  - {weight: 2, prefix: sharded}\n")
    entries = load_blend(str(blend_file)).per_split["train"]
    assert [p for _, p in entries] == shards  # the weight is shared by tokens
    assert [w for w, _ in entries] == pytest.approx(
        [2 * d["tokens"] / m["tokens"] for d in m["datasets"]])


def test_merge_equals_concatenation(assets, reference, tmp_path, capsys):
    valid = str(tmp_path / "valid")
    assert run(assets.valid, "--tokenizer", assets.model, "--output", valid) == 0
    out = str(tmp_path / "both")
    assert merge.main([reference, valid, "--output", out]) == 0
    assert all(np.array_equal(a, b) for a, b in
               zip(read_docs(out), read_docs(reference) + read_docs(valid)))
    assert open(out + ".bin", "rb").read() == (open(reference + ".bin", "rb").read()
                                               + open(valid + ".bin", "rb").read())
    m = json.load(open(out + ".manifest.json"))
    ref_m = json.load(open(reference + ".manifest.json"))
    assert m["documents"] == ref_m["documents"] + len(read_docs(valid))
    assert merge.main([reference, "--output", out]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err


def test_inspect_reports_and_detects_truncation(assets, reference, tmp_path, capsys):
    assert dp_inspect.main([reference, "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "check     OK" in text and "p50=" in text and "sample    document" in text
    report = dp_inspect.inspect_dataset(reference, assets.tok)
    assert report.ok and report.info["documents"] == len(assets.texts)
    assert report.info["max_token_id"] < VOCAB
    cut = str(tmp_path / "cut")
    shutil.copy(reference + ".idx", cut + ".idx")
    data = open(reference + ".bin", "rb").read()
    open(cut + ".bin", "wb").write(data[: len(data) // 2])
    assert dp_inspect.main([cut]) == 1
    assert ".bin is truncated" in capsys.readouterr().out
    open(cut + ".idx", "wb").write(open(reference + ".idx", "rb").read()[:40])
    assert dp_inspect.main([cut]) == 1
    assert "index is truncated or corrupt" in capsys.readouterr().out


def test_blend_builds_megatron_gpt_datasets(assets, reference, tmp_path):
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    valid = str(tmp_path / "valid")
    assert run(assets.valid, "--tokenizer", assets.model, "--output", valid) == 0
    other = str(tmp_path / "other")
    assert run(assets.train, "--tokenizer", assets.model, "--output", other, "--no-bos") == 0
    per_split = tmp_path / "per_split.yaml"
    per_split.write_text(f"train:\n  - {{weight: 1.0, prefix: {reference}}}\n"
                         "valid:\n  - valid\n")
    pooled = tmp_path / "pooled.yaml"
    pooled.write_text(f"split: '80,10,10'\ndatasets:\n  - {{weight: 0.75, prefix: {reference}}}"
                      "\n  - {weight: 0.25, prefix: other}\n")
    b1, b2 = load_blend(str(per_split)), load_blend(str(pooled))
    assert b1.megatron_args() == ["--train-data-path", "1.0", reference,
                                  "--valid-data-path", valid]
    assert b2.megatron_args() == ["--data-path", "0.75", reference, "0.25", other,
                                  "--split", "80,10,10"]
    for blend, sizes in ((b1, [40, 8, None]), (b2, [40, 8, 8])):
        config = GPTDatasetConfig(random_seed=1, sequence_length=32, tokenizer=assets.tok,
                                  reset_position_ids=False, reset_attention_mask=False,
                                  eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
                                  **blend.config_kwargs())
        train, val, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                         config).build()
        assert len(train) >= 40 and len(val) >= 8 and (test is None) == (sizes[2] is None)
        sample = train[0]
        assert sample["tokens"].shape == (32,) and sample["tokens"].dtype == torch.int64
        assert int(sample["tokens"].max()) < VOCAB
    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  - {weight: 1, prefix: a}\n  - {prefix: b}\n")
    with pytest.raises(BlendError, match="every entry or on none"):
        load_blend(str(bad), check=False)
    bad.write_text("train:\n  - {weight: 1, prefix: missing}\n")
    with pytest.raises(BlendError, match="no dataset"):
        load_blend(str(bad))
    # A split that leaves a dataset's share empty would hang Megatron: refused up front.
    bad.write_text(f"split: '98,1,1'\ndatasets:\n  - {valid}\n")
    with pytest.raises(BlendError, match="gets none"):
        load_blend(str(bad))
