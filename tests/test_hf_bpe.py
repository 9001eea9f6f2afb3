"""The paper's tokenizer kind (``train_tokenizer --kind hf-bpe``) and the one tokenizer
interface: training, round trip, digit split, preprocessing, the trainer's Megatron tokenizer,
and ``load_tokenizer`` telling kinds apart by content."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import preprocess
from data_prep.corpus import build_default_corpus
from data_prep.indexed import open_dataset
from data_prep.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)
from data_prep.train_tokenizer import main as train_tokenizer_main
from data_prep.train_tokenizer import train_tokenizer

VOCAB = 512
SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "digits 1234567890 and 3.14159e-10",
    "unicode: é ñ ü ß 日本語 中文 🤖🚀 Ω≈ç√ \u2581",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A slice of the embedded corpus, an hf-bpe tokenizer and a SentencePiece one on it."""
    d = tmp_path_factory.mktemp("hf_bpe")
    build_default_corpus(str(d / "train.jsonl"), max_bytes=250_000)
    info = train_tokenizer([str(d / "train.jsonl")], str(d / "bpe"), vocab_size=VOCAB,
                           workers=1, kind="hf-bpe")
    train_tokenizer([str(d / "train.jsonl")], str(d / "sp"), vocab_size=400, workers=1,
                    character_coverage=1.0)
    texts = [json.loads(x)["text"] for x in (d / "train.jsonl").read_text().splitlines()]
    return SimpleNamespace(dir=d, train=str(d / "train.jsonl"), info=info, texts=texts,
                           tok=load_tokenizer(str(d / "bpe")))


def test_training_writes_a_loadable_deterministic_tokenizer(assets, tmp_path):
    tok, d = assets.tok, assets.dir
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert {p.name for p in (d / "bpe").iterdir()} == {"tokenizer.json",
                                                        "tokenizer_config.json"}
    settings_file = json.loads((d / "bpe.settings.json").read_text())
    assert settings_file["kind"] == "hf-bpe" and settings_file["sha256"] == tok.sha256
    assert not (d / "bpe.json").exists() and (d / "sp.settings.json").exists()
    # Deterministic whatever the reader count; the CLI writes the same files.
    assert train_tokenizer_main([assets.train, "--output", str(tmp_path / "again"), "--kind",
                                 "hf-bpe", "--vocab-size", str(VOCAB), "--workers", "2"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (d / "bpe" / name).read_bytes()
    # Hugging Face users load it as a fast tokenizer, no remote code, same ids.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d / "bpe"), local_files_only=True)
    assert hf.is_fast and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in SAMPLES + assets.texts[:5]:
        assert hf.encode(text, add_special_tokens=False) == tok.tokenize(text)
        assert hf.decode(tok.tokenize(text)) == text


def test_round_trip(assets):
    tok = assets.tok
    for text in SAMPLES + assets.texts:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
    n_bytes = sum(len(t.encode()) for t in assets.texts)
    assert sum(len(tok.tokenize(t)) for t in assets.texts) < 0.8 * n_bytes  # it merges


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=200))
def test_round_trip_any_text(assets, text):
    """Byte level: every string comes back exactly (literal special-token text aside, which
    the tokenizers library encodes as the special token)."""
    if "<|" not in text:
        assert assets.tok.detokenize(assets.tok.tokenize(text)) == text


def test_digits_split_in_runs_of_at_most_two(assets):
    tok = assets.tok
    pieces = [tok.detokenize([i]) for i in tok.tokenize("year 2024, pi 3.14159, n=1234567")]
    assert "".join(pieces) == "year 2024, pi 3.14159, n=1234567"
    assert max(len(r) for p in pieces for r in re.findall(r"\d+", p)) <= 2
    # The split itself: digits in pairs, whatever merges a small vocabulary learned.
    from tokenizers import Tokenizer

    split = Tokenizer.from_file(str(assets.dir / "bpe" / "tokenizer.json")).pre_tokenizer
    words = [w for w, _ in split.pre_tokenize_str("n=1234567 x")]
    assert [w for w in words if w.isdigit()] == ["12", "34", "56", "7"]
    vocab = json.loads((assets.dir / "bpe" / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(len(r) <= 2 for token in vocab for r in re.findall(r"\d+", token))


def _docs(prefix: str) -> list[list[int]]:
    ds = open_dataset(prefix)
    idx = ds.document_indices
    return [np.concatenate([ds[i] for i in range(idx[k], idx[k + 1])]).tolist()
            for k in range(len(idx) - 1)]


def test_preprocess_gives_the_library_ids_and_the_trainer_agrees(assets, monkeypatch):
    from tokenizers import Tokenizer

    d = assets.dir
    tok_json = str(d / "bpe" / "tokenizer.json")
    for workers, out in (("1", "one"), ("3", "three")):
        assert preprocess.main([assets.train, "--tokenizer", tok_json, "--output",
                                str(d / out), "--workers", workers, "--piece-size", "40KB",
                                "--quiet"]) == 0
    for suffix in (".bin", ".idx"):
        assert (d / f"one{suffix}").read_bytes() == (d / f"three{suffix}").read_bytes()
    library = Tokenizer.from_file(tok_json)
    expected = [[0, *library.encode(t, add_special_tokens=False).ids, 1] for t in assets.texts]
    assert _docs(str(d / "one")) == expected
    manifest = json.loads((d / "one.manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "huggingface"

    # The trainer's tokenizer: the config says SentencePiece, the file decides.
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args

    from parcae_megatron.training.config_expansion import expand_argv

    argv = expand_argv(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "1",
                        "--seq-length", "8", "--max-position-embeddings", "8",
                        "--micro-batch-size", "1", "--tokenizer-type", "SentencePieceTokenizer",
                        "--tokenizer-model", tok_json])
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    args = parse_args()
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer",
                                                           str(d / "bpe"))
    args.rank = 0
    megatron_tok = build_tokenizer(args)
    assert (megatron_tok.vocab_size, megatron_tok.bos, megatron_tok.eod, megatron_tok.pad) \
        == (VOCAB, 0, 1, 2)
    for text in SAMPLES + assets.texts[:5]:
        assert megatron_tok.tokenize(text) == assets.tok.tokenize(text)


def test_evaluation_tokenizer_and_bytes_per_token(assets):
    """Evaluation's transformers tokenizer gives the same ids; bits per byte counts each
    token's bytes exactly, also where a character is split over several tokens."""
    from parcae_megatron.evaluate.data import token_byte_lengths
    from parcae_megatron.evaluate.runner import load_hf_tokenizer

    tok = load_hf_tokenizer(str(assets.dir / "bpe"), VOCAB)
    table = token_byte_lengths(tok, VOCAB)
    assert table[:3].tolist() == [0, 0, 0]
    for text in SAMPLES + assets.texts[:5]:
        ids = assets.tok.tokenize(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert int(table[ids].sum()) == len(text.encode())
    with pytest.raises(ValueError, match="512 tokens but the model's vocabulary has 256"):
        load_hf_tokenizer(str(assets.dir / "bpe"), 256)


def test_load_tokenizer_by_content(assets, tmp_path):
    d = assets.dir
    assert isinstance(load_tokenizer(str(d / "sp.model")), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(str(d / "bpe" / "tokenizer.json")), HFTokenizer)
    assert isinstance(load_tokenizer(str(d / "bpe")), HFTokenizer)
    shutil.copy(d / "sp.model", tmp_path / "x.json")
    shutil.copy(d / "bpe" / "tokenizer.json", tmp_path / "x.model")
    sp, hf = load_tokenizer(str(tmp_path / "x.json")), load_tokenizer(str(tmp_path / "x.model"))
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(hf, HFTokenizer)
    assert hf.tokenize("hello 42") == assets.tok.tokenize("hello 42")
    assert (hf.bos, hf.eos, hf.pad) == (0, 1, 2)  # found by name, no tokenizer_config.json
    assert sp.megatron_args()[:2] == ["--tokenizer-type", "SentencePieceTokenizer"]
    # Megatron's HuggingFaceTokenizer needs the config naming BOS/EOS: said in one line.
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        hf.megatron_args()
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer"):
        load_tokenizer(str(d / "bpe.settings.json"))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(str(tmp_path / "junk.model"))


def test_tokenizer_without_bos_is_refused_in_one_line(assets, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train_from_iterator(assets.texts[:3], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "nobos").mkdir()
    tk.save(str(tmp_path / "nobos" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="has no BOS token"):
        load_tokenizer(str(tmp_path / "nobos"))
    assert preprocess.main([assets.train, "--tokenizer", str(tmp_path / "nobos"), "--output",
                            str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no BOS" in err[0]
    assert not Path(str(tmp_path / "out") + ".bin").exists()


@pytest.mark.slow
def test_trainer_runs_on_hf_bpe_data(assets, tmp_path):
    """A few steps of the real trainer, one process, on data preprocessed with the
    tokenizer.json; the config's SentencePiece type gives way to the file's kind."""
    from tests.training_runs import train

    d = assets.dir
    out = str(tmp_path / "train")
    assert preprocess.main([assets.train, "--tokenizer", str(d / "bpe"), "--output", out,
                            "--quiet"]) == 0
    proc = train(1, "--config", "configs/parcae-tiny-cpu.yaml", "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", str(d / "bpe"),
                 "--train-data-path", "1.0", out, "--valid-data-path", "1.0", out,
                 "--train-iters", "3", "--lr-wsd-decay-iters", "1", "--log-interval", "1",
                 "--eval-interval", "4", "--eval-iters", "1")
    log = proc.stdout + proc.stderr
    assert re.search(r"tokenizer_type \.+ HuggingFaceTokenizer", log)
    losses = [float(x) for x in re.findall(r"iteration +\d+/ +3 .*?lm loss: ([0-9.E+-]+)", log)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert abs(losses[0] - np.log(VOCAB)) < 1.0  # starts near uniform over the vocabulary
