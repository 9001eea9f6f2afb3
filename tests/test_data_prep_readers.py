"""data_prep readers, planning and files helpers: no tokenizer, no megatron-core."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.corpus import build_default_corpus
from data_prep.files import InputError, detect_format, expand_inputs, parse_size
from data_prep.readers import PieceReader, plan_pieces


def _records(path: str, piece_size: int = 1 << 30, **kw) -> list[tuple]:
    """(piece-independent position, text, reason) of every record of ``path``."""
    out = []
    lines_before = 0
    for piece in plan_pieces([path], piece_size, kw.get("txt_mode", "document")):
        reader = PieceReader(piece, **kw)
        for r in reader:
            out.append((r.where + lines_before, r.text, r.reason))
        lines_before += reader.state.lines
    return out


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
                      min_size=1, max_size=30),
       piece_size=st.integers(1, 200), blank=st.booleans())
def test_byte_range_pieces_partition_the_lines(tmp_path_factory, texts, piece_size, blank):
    """However a JSON Lines file is cut, every line is read exactly once, in order."""
    path = str(tmp_path_factory.mktemp("pieces") / "x.jsonl")
    lines = [json.dumps({"text": t}) for t in texts]
    if blank:
        lines.insert(len(lines) // 2, "")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))  # no final newline: the last line must still be read
    whole = _records(path)
    assert [t for _, t, _ in whole] == texts
    assert _records(path, piece_size) == whole


def test_bad_records_and_positions(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "cut\n{"title": 1}\n{"text": null}\n'
                     b'{"text": 5}\n\n[1]\n{"text": "\xff"}\n{"text": "\\ud800 lone"}\n')
    got = [(w, t, r) for w, t, r in _records(str(path))]
    assert got == [(1, "ok", None), (2, None, "malformed_json"), (3, None, "missing_text_key"),
                   (4, None, "missing_text_key"), (5, None, "not_a_string"),
                   (7, None, "malformed_json"), (8, None, "non_utf8"),
                   (9, "\ud800 lone", None)]  # lone surrogates are caught at tokenization


def test_truncated_gzip_keeps_complete_lines(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * 50}) for i in range(400)]
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    recs = _records(str(path))
    kept = [t for _, t, _ in recs if t is not None]
    assert recs[-1][2] == "truncated_gzip" and recs[-1][0] == len(kept) + 1
    assert 0 < len(kept) < 400 and kept == [json.loads(x)["text"] for x in lines[: len(kept)]]


def test_truncated_zstd_is_counted(tmp_path):
    comp = zstandard.ZstdCompressor()
    first = comp.compress(b'{"text": "frame one"}\n')
    second = comp.compress(b'{"text": "frame two"}\n' * 50)
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(first + second[: len(second) - 5])
    recs = _records(str(path))
    assert recs[0][1] == "frame one" and recs[-1][2] == "truncated_zstd"
    path.write_bytes(first + second)  # intact multi-frame file: everything, no error
    assert [r for _, _, r in _records(str(path))] == [None] * 51


def test_txt_modes_json_array_and_parquet(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("p1 a\np1 b\n\n\np2\n")
    assert [t for _, t, _ in _records(str(txt))] == ["p1 a\np1 b\n\n\np2"]
    assert [t for _, t, _ in _records(str(txt), txt_mode="paragraph")] == ["p1 a\np1 b", "p2"]
    assert [(w, t) for w, t, _ in _records(str(txt), txt_mode="line")] == [
        (1, "p1 a"), (2, "p1 b"), (5, "p2")]
    arr = tmp_path / "f.json"
    arr.write_text(json.dumps([{"text": "a"}, {"no": 1}, {"text": "b"}]))
    assert [(w, t, r) for w, t, r in _records(str(arr))] == [
        (1, "a", None), (2, None, "missing_text_key"), (3, "b", None)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["r1", None, "r3", "r4", "r5"]}), tmp_path / "e.parquet",
                   row_group_size=2)
    pieces = plan_pieces([str(tmp_path / "e.parquet")], 1)
    assert [p.row_groups for p in pieces] == [(0,), (1,), (2,)]
    got = []
    for p in pieces:
        got += [(p.first_row + r.where, r.text, r.reason) for r in PieceReader(p, "body")]
    assert got == [(1, "r1", None), (2, None, "missing_text_key"), (3, "r3", None),
                   (4, "r4", None), (5, "r5", None)]
    assert {r.reason for r in PieceReader(pieces[0], "text")} == {"missing_text_key"}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert [r.reason for r in PieceReader(plan_pieces([str(tmp_path / "broken.parquet")],
                                                      1)[0])] == ["unreadable_file"]


def test_inputs_sizes_and_formats(tmp_path):
    for name in ("b.jsonl", "a.json.gz", "sub/c.txt.zst", "sub/d.parquet", "skip.csv",
                 ".hidden.jsonl"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path)])]
    assert found == ["a.json.gz", "b.jsonl", "sub/c.txt.zst", "sub/d.parquet"]
    glob_then_file = expand_inputs([str(tmp_path / "*.js*"), str(tmp_path / "b.jsonl")])
    assert [os.path.basename(p) for p in glob_then_file] == ["a.json.gz", "b.jsonl"]
    with pytest.raises(InputError, match="unsupported"):
        expand_inputs([str(tmp_path / "skip.csv")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    assert detect_format("x.ndjson.zst") == ("jsonl", "zst")
    assert parse_size("64KB") == 64_000 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("4096") == 4096


def test_default_corpus_is_deterministic(tmp_path):
    a = build_default_corpus(str(tmp_path / "a.jsonl"), max_bytes=150_000)
    build_default_corpus(str(tmp_path / "b.jsonl"), max_bytes=150_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a["documents"] > 3 and 150_000 < a["bytes"] < 1_000_000
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(r["text"].strip() and r["source"] for r in records)
    assert [r["source"] for r in records] == sorted(r["source"] for r in records)
    valid = build_default_corpus(str(tmp_path / "v.jsonl"), max_bytes=150_000, split="valid")
    train_modules = {r["source"].split("#")[0] for r in records}
    valid_modules = {json.loads(x)["source"].split("#")[0]
                     for x in (tmp_path / "v.jsonl").read_text().splitlines()}
    assert valid["documents"] > 0 and not train_modules & valid_modules
    capped = build_default_corpus(str(tmp_path / "c.jsonl"), max_docs=3)
    assert capped["documents"] == 3
